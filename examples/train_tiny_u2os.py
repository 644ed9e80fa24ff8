"""Short CPU training of the `tiny` MPT on synthetic defocus pairs from the real U2OS nuclei.

Runs ``examples/train_tiny_u2os.yaml`` (resuming if the run folder already has a checkpoint) and
prints the validation curve: mean PSNR / SSIM of the model and of the blurred input on 4 held-out
U2OS_TEST images at 4 and 8 um defocus (benchmark settings, SPEC section 8).

    OMP_NUM_THREADS=1 nice python examples/train_tiny_u2os.py            # ~400 steps
    python examples/train_tiny_u2os.py --steps 100 --out runs/tiny_quick
    python examples/train_tiny_u2os.py --curve-only                        # print the curve of a run
    python examples/train_tiny_u2os.py --curve-only --evaluate 20          # + whole-image test table
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

HERE = Path(__file__).resolve().parent


def print_curve(run: Path) -> None:
    rows = list(csv.DictReader((run / "val.csv").open()))
    print(f"validation curve of {run} (PSNR dB / SSIM, mean over images and defocus)")
    print(f"{'step':>6} {'model PSNR':>11} {'input PSNR':>11} {'gain':>6} {'model SSIM':>11} {'input SSIM':>11}")
    for r in rows:
        p, ip = float(r["psnr"]), float(r["input_psnr"])
        print(f"{int(r['step']):>6} {p:>11.2f} {ip:>11.2f} {p - ip:>+6.2f} {float(r['ssim']):>11.4f} {float(r['input_ssim']):>11.4f}")


def evaluate_run(run: Path, sharp_dir: Path, n_images: int, defocus: list[float]) -> None:
    """PSNR / SSIM of the run's final model on whole U2OS_TEST images, per defocus (SPEC 8 settings)."""
    from napari_mpt_deblur.data.datasets import load_images, synthetic_validation_pairs
    from napari_mpt_deblur.data.splits import U2OS_TEST
    from napari_mpt_deblur.models.registry import load_model
    from napari_mpt_deblur.training.trainer import evaluate_pairs

    model = load_model(run / "model").model
    images, names = load_images(sharp_dir, list(U2OS_TEST[:n_images]))
    print(f"\nwhole {images[0].shape[1]}x{images[0].shape[0]} images, {len(images)} U2OS_TEST images, "
          "scalar PSF 20x/0.45, 0.645 um px, Poisson 1000 photons + read noise 3 (seeded)")
    print(f"{'defocus':>8} {'input PSNR':>11} {'model PSNR':>11} {'gain':>6} {'input SSIM':>11} {'model SSIM':>11}")
    for dz in defocus:
        pairs = synthetic_validation_pairs(images, names, [dz], crop=None, seed=1)
        m = evaluate_pairs(model, pairs, next(model.parameters()).device)
        print(f"{dz:>6g}um {m['input_psnr']:>11.2f} {m['psnr']:>11.2f} {m['psnr'] - m['input_psnr']:>+6.2f} "
              f"{m['input_ssim']:>11.4f} {m['ssim']:>11.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=HERE / "train_tiny_u2os.yaml")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--curve-only", action="store_true")
    ap.add_argument("--evaluate", type=int, default=0, metavar="N",
                    help="also evaluate the final model on N whole U2OS_TEST images at 2/4/8/12 um")
    args = ap.parse_args()

    from napari_mpt_deblur.inference.devices import tune_cpu_allocator
    from napari_mpt_deblur.training.config import load_config
    from napari_mpt_deblur.training.trainer import train

    config = load_config(args.config)
    update = {k: v for k, v in (("out_dir", args.out), ("steps", args.steps)) if v is not None}
    if update:
        config = type(config).model_validate({**config.model_dump(), **update})
    if not args.curve_only:
        tune_cpu_allocator()
        resume = (Path(config.out_dir) / "checkpoints" / "last.json").is_file()
        result = train(config, resume=resume)
        print(f"{'finished' if result.completed else 'stopped'} at step {result.steps_done}; model {result.model_path}")
    print_curve(Path(config.out_dir))
    if args.evaluate:
        evaluate_run(Path(config.out_dir), config.data[0].sharp, args.evaluate, [2.0, 4.0, 8.0, 12.0])


if __name__ == "__main__":
    main()
