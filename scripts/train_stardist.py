"""Train the project's shipped StarDist2D model on the real U2OS nuclei (BBBC038) in ``../shared/data``.

Reproduces ``src/napari_mpt_deblur/evaluation/stardist_models/<name>/``:

* training images: ``data.splits.U2OS_TRAIN`` (32), validation: ``U2OS_STARDIST_VAL`` (8, = 20% of the
  40 non-test images); ``U2OS_TEST`` (20) is never seen (it is what the benchmark tables use);
* images normalised per image with csbdeep ``normalize(img, 1, 99.8)`` (what the runner does too);
* augmentation: random flips / 90-degree rotations and a random intensity scale and shift;
* after training, NMS / probability thresholds optimised on the validation images, then the
  validation matching at IoU 0.5 / 0.7 / 0.9 is measured and written to ``training.json``.

Only ``config.json``, ``thresholds.json``, ``weights_best.h5`` and ``training.json`` are copied into the
package (a few MB). Example (the command that made the shipped model; see docs/stardist.md)::

    nice .venv/bin/python scripts/train_stardist.py --epochs 100 --steps 100 --patch 160 --log runs/stardist_train.log

(35 minutes on 2 shared CPU cores; these are also the defaults.)

Runs on the CPU (TensorFlow's GPUs are hidden unless ``--gpu`` is given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "u2os_nuclei"
DEFAULT_DEST = REPO / "src" / "napari_mpt_deblur" / "evaluation" / "stardist_models"
SHIPPED_FILES = ("config.json", "thresholds.json", "weights_best.h5", "training.json")
IOU_THRESHOLDS = (0.5, 0.7, 0.9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with images/ and labels/")
    p.add_argument("--name", default="u2os_nuclei_2d", help="model name (folder name in the package)")
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "stardist", help="where training writes")
    p.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="package folder to copy the model into")
    p.add_argument("--no-install", action="store_true", help="do not copy the result into the package")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--steps", type=int, default=100, help="steps per epoch")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--patch", type=int, default=160, help="training patch side in pixels (multiple of 16)")
    p.add_argument("--rays", type=int, default=32)
    p.add_argument("--depth", type=int, default=3, help="U-Net depth")
    p.add_argument("--filters", type=int, default=16, help="U-Net filters at the first level")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--threads", type=int, default=2, help="TensorFlow intra/inter-op threads")
    p.add_argument("--gpu", action="store_true", help="let TensorFlow use a GPU if it has one")
    p.add_argument("--log", type=Path, default=None, help="append progress lines to this file too")
    p.add_argument("--thresholds-only", action="store_true", help="skip training: optimise thresholds of the model in workdir")
    return p.parse_args(argv)


def _portable(path: Path) -> str:
    """A path relative to the repository when it is inside or beside it (no machine-specific prefixes)."""
    try:
        return os.path.relpath(path.resolve(), REPO)
    except ValueError:
        return str(path)


class Log:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - self.t0:7.0f}s] {msg}"
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(line + "\n")


def read_split(data: Path, names: tuple[str, ...]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(images float32 normalised 1/99.8, labels int32 with holes filled) for the named files."""
    import tifffile
    from csbdeep.utils import normalize
    from stardist import fill_label_holes

    images, labels = [], []
    for n in names:
        img_path, lab_path = data / "images" / f"{n}.tif", data / "labels" / f"{n}.tif"
        for path in (img_path, lab_path):
            if not path.is_file():
                raise FileNotFoundError(f"missing training file {path}")
        img = tifffile.imread(img_path)
        if img.ndim == 3:  # RGB(A) copies of a grey image: keep one channel
            img = img[..., 0]
        images.append(normalize(img.astype(np.float32), 1, 99.8, axis=(0, 1)).astype(np.float32))
        labels.append(fill_label_holes(tifffile.imread(lab_path).astype(np.int32)))
    return images, labels


def augmenter(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Random flips / rot90 (same on image and labels) and a random intensity scale and shift."""
    k = np.random.randint(4)
    x, y = np.rot90(x, k), np.rot90(y, k)
    if np.random.rand() < 0.5:
        x, y = x[:, ::-1], y[:, ::-1]
    x = x * np.random.uniform(0.7, 1.3) + np.random.uniform(-0.1, 0.1)
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y)


def evaluate(model, X: list[np.ndarray], Y: list[np.ndarray]) -> dict[str, dict[str, float]]:
    from stardist.matching import matching_dataset

    preds = [model.predict_instances(x, show_tile_progress=False, verbose=False)[0] for x in X]
    out = {}
    for t in IOU_THRESHOLDS:
        s = matching_dataset(Y, preds, thresh=t, show_progress=False)
        out[f"{t:.1f}"] = {"ap": float(s.accuracy), "precision": float(s.precision), "recall": float(s.recall),
                           "f1": float(s.f1), "tp": int(s.tp), "fp": int(s.fp), "fn": int(s.fn)}
    out["mean_ap"] = float(np.mean([out[f"{t:.1f}"]["ap"] for t in IOU_THRESHOLDS]))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = Log(args.log)
    sys.path.insert(0, str(REPO / "src"))
    from napari_mpt_deblur.data.splits import U2OS_STARDIST_VAL, U2OS_TEST, U2OS_TRAIN

    assert not set(U2OS_TEST) & (set(U2OS_TRAIN) | set(U2OS_STARDIST_VAL)), "test images leaked into training"

    import tensorflow as tf

    if not args.gpu:
        tf.config.set_visible_devices([], "GPU")
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    np.random.seed(args.seed)
    tf.random.set_seed(args.seed)

    from stardist import calculate_extents, gputools_available  # noqa: F401
    from stardist.models import Config2D, StarDist2D

    X_trn, Y_trn = read_split(args.data, U2OS_TRAIN)
    X_val, Y_val = read_split(args.data, U2OS_STARDIST_VAL)
    log(f"train {len(X_trn)} images, val {len(X_val)} images from {args.data}")
    extents = calculate_extents(Y_trn, np.median)
    log(f"median object extents (y, x) px: {np.round(extents, 1).tolist()}")

    args.workdir.mkdir(parents=True, exist_ok=True)
    train_seconds = 0.0
    if args.thresholds_only:
        model = StarDist2D(None, name=args.name, basedir=str(args.workdir))
    else:
        conf = Config2D(
            n_rays=args.rays,
            grid=(2, 2),
            n_channel_in=1,
            unet_n_depth=args.depth,
            unet_n_filter_base=args.filters,
            net_conv_after_unet=64,
            train_patch_size=(args.patch, args.patch),
            train_batch_size=args.batch,
            train_epochs=args.epochs,
            train_steps_per_epoch=args.steps,
            train_learning_rate=args.lr,
            train_tensorboard=False,
            train_reduce_lr={"factor": 0.5, "patience": 10, "min_delta": 0},
        )
        if (args.workdir / args.name).exists():
            shutil.rmtree(args.workdir / args.name)
        model = StarDist2D(conf, name=args.name, basedir=str(args.workdir))
        log(f"config: {json.dumps({k: v for k, v in vars(conf).items() if k.startswith(('n_', 'grid', 'unet', 'train_'))})}")
        log(f"parameters: {model.keras_model.count_params():,}")

        class EpochLog(tf.keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                keys = ("loss", "prob_loss", "dist_loss", "val_loss", "val_prob_loss", "val_dist_loss")
                log(f"epoch {epoch + 1}/{args.epochs} " + " ".join(f"{k}={logs[k]:.4f}" for k in keys if k in logs))

        model.prepare_for_training()
        model.callbacks.append(EpochLog())
        t0 = time.time()
        model.train(X_trn, Y_trn, validation_data=(X_val, Y_val), augmenter=augmenter, seed=args.seed)
        train_seconds = time.time() - t0
        log(f"training done in {train_seconds:.0f} s")
        model.keras_model.load_weights(str(args.workdir / args.name / "weights_best.h5"))

    t0 = time.time()
    model.optimize_thresholds(X_val, Y_val)
    log(f"thresholds {model.thresholds} optimised on val in {time.time() - t0:.0f} s")
    val = evaluate(model, X_val, Y_val)
    log("val matching: " + json.dumps(val))

    model_dir = args.workdir / args.name
    provenance = {
        "name": args.name,
        "data": "BBBC038 U2OS nuclei (../shared/data/u2os_nuclei), CC0, Caicedo et al. Nat Methods 2019",
        "train_images": list(U2OS_TRAIN),
        "val_images": list(U2OS_STARDIST_VAL),
        "never_seen": "data.splits.U2OS_TEST",
        "normalisation": "csbdeep normalize(img, 1, 99.8) per image",
        "command": "python scripts/train_stardist.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: (_portable(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_seconds": round(train_seconds),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores visible, TensorFlow GPUs {'used' if args.gpu else 'hidden'}",
        "thresholds": {k: float(v) for k, v in model.thresholds._asdict().items()},
        "val_matching": val,
        "stardist": __import__("stardist").__version__,
        "tensorflow": tf.__version__,
    }
    (model_dir / "training.json").write_text(json.dumps(provenance, indent=2) + "\n")
    if not args.no_install:
        dest = args.dest / args.name
        tmp = args.dest / f".{args.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for f in SHIPPED_FILES:
            shutil.copy2(model_dir / f, tmp / f)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        log(f"installed {', '.join(SHIPPED_FILES)} into {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
