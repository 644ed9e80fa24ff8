"""Does a calibration's training pull the same way as its validation? (issue 17, docs/calibrate.md)

At the starting weights, averages the gradient of the calibration's training loss over a number of
batches and compares it (cosine similarity) with the gradient of the L1 loss on the calibration's
held-back validation pairs (each normalised by its own percentiles, as inference does). A
negative cosine means that training steps make the validation worse, whatever the learning rate.
The brightness direction (the gradient of the mean output level on the validation inputs) says
how much of either gradient is a global offset. The batches can be drawn from the training images as the calibration does (``--images train``),
from their U2OS or non-U2OS part, or from the held-back images through the same pipeline
(``--images held-back``: the pipeline's own consistency), or one row per training image
(``--images per-image``: are a few images the pull, or all of them?). The cosine between the gradients of the
even and the odd batches says how far the average is from noise.

    .venv/bin/python benchmarks/calibration_gradients.py --images train --matched-noise

Prints one table row per loss term. CPU, one thread, about two minutes per call for H2T.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from napari_mpt_deblur.data import datasets as D
from napari_mpt_deblur.data.normalisation import normalise, percentile_range
from napari_mpt_deblur.data.optics import BENCHMARK_OPTICS
from napari_mpt_deblur.training import calibrate as cal

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]).clone()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm() + 1e-20))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="h2t-unet-fluo")
    ap.add_argument("--images", choices=["train", "u2os", "other", "held-back", "per-image"], default="train")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--matched-noise", action="store_true",
                    help="train at the validation's noise (1000 photons, read noise 3) instead of 200-5000 / 1-5")
    args = ap.parse_args()
    torch.set_num_threads(1)

    noise = {"peak_photons": (1000.0, 1000.0), "read_sigma_photons": (3.0, 3.0)} if args.matched_noise else {}
    settings = cal.CalibrationSettings(model=args.model, optics=BENCHMARK_OPTICS, time_budget_minutes=1.0, **noise)
    sharp = cal.read_sharp([SHARED / "u2os_nuclei" / "images"], "u2os_train_and_val")
    calibrator = cal.Calibrator(settings, sharp, work_dir=Path(tempfile.mkdtemp()))
    trainer = calibrator.trainer
    bundled = cal.bundled_sharp()
    pool = dict(zip(list(sharp.names) + list(bundled.names), list(sharp.images) + list(bundled.images)))
    if args.images not in ("train", "per-image"):
        names = list(calibrator.val_names) if args.images == "held-back" else [
            n for n in calibrator.train_names if (not n.startswith("bundled/")) == (args.images == "u2os")]
        # The calibration's own patch settings and defocus draws (so also its PSF bank, which the
        # trainer already holds): only the images change.
        own = trainer.train_data
        trainer.train_data = D.SyntheticPatches([pool[n] for n in names], own.patch, own.defocus, seed=own.seed, names=names)
    params = [p for p in trainer.net.parameters() if p.requires_grad]

    def zero() -> None:
        for p in params:
            p.grad = None

    def validation_gradient(loss_of) -> torch.Tensor:
        zero()
        for pair in trainer.val_pairs:
            inp = np.asarray(pair.inp, np.float32)
            lo, hi = percentile_range(inp, calibrator.normalisation.low, calibrator.normalisation.high)
            x = torch.from_numpy(normalise(inp, lo, hi))[None, None]
            y = torch.from_numpy(normalise(np.asarray(pair.gt, np.float32), lo, hi))[None, None]
            (loss_of(trainer.forward(x)[-1], y) / len(trainer.val_pairs)).backward()
        return _flat_grad(params)

    g_val = validation_gradient(torch.nn.functional.l1_loss)
    # The direction that brightens every output: the gradient of the mean output level.
    g_bright = validation_gradient(lambda out, y: out.mean())

    def training_gradient(batches_count: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], float]:
        """Mean gradient per loss term over ``batches_count`` batches, the even/odd batch sums and
        the mean of (output - truth) over the batches' patches (normalised units)."""
        weight = trainer.config.efcr.nyquist_weight
        sums: dict[str, torch.Tensor] = {}
        halves = [torch.zeros_like(g_val), torch.zeros_like(g_val)]
        offsets = []
        batches = trainer._batches(0)
        for k in range(batches_count):
            idx, batch, _ = next(batches)
            m = trainer._materialise(batch)
            terms = trainer.objective(trainer.forward, m["inp"], m["gt"], reblur_sizes=trainer._reblur_sizes(idx))
            with torch.no_grad():
                offsets.append(float((trainer.forward(m["inp"])[-1] - m["gt"]).mean()))
            nyquist = weight * terms.nyquist if terms.nyquist is not None else None
            parts = {"pixel": terms.pixel, "nyquist": nyquist,
                     "contrastive": terms.total - terms.pixel - (nyquist if nyquist is not None else 0)}
            for name, term in parts.items():
                if term is not None and term.requires_grad:
                    zero()
                    term.backward(retain_graph=True)
                    sums[name] = sums.get(name, 0) + _flat_grad(params)
            zero()
            terms.total.backward()
            g = _flat_grad(params)
            sums["total"] = sums.get("total", 0) + g
            halves[k % 2] += g
        return {name: g / batches_count for name, g in sums.items()}, halves, float(np.mean(offsets))

    if args.images == "per-image":
        own = trainer.train_data
        print(f"model {args.model}; {args.batches} batches from each training image alone; validation: "
              f"{len(trainer.val_pairs)} pairs of {list(calibrator.val_names)}")
        print("| image | total gradient norm | cosine with validation gradient | cosine with brightness direction "
              "| mean output - truth |")
        print("|---|---|---|---|---|")
        for name in calibrator.train_names:
            trainer.train_data = D.SyntheticPatches([pool[name]], own.patch, own.defocus, seed=own.seed, names=[name])
            sums, _, offset = training_gradient(args.batches)
            g = sums["total"]
            print(f"| {name} | {float(g.norm()):.4g} | {_cosine(g, g_val):+.3f} | {_cosine(g, g_bright):+.3f} "
                  f"| {offset:+.5f} |", flush=True)
        return

    sums, halves, offset = training_gradient(args.batches)
    print(f"model {args.model}; batches from: {args.images} ({len(trainer.train_data.images)} images); "
          f"noise {'matched to validation' if args.matched_noise else 'as calibrated'}; "
          f"validation: {len(trainer.val_pairs)} pairs of {list(calibrator.val_names)}")
    print(f"cosine of the validation gradient with the brightness direction: {_cosine(g_val, g_bright):+.3f}")
    print("| term | gradient norm | cosine with validation gradient | cosine with brightness direction |")
    print("|---|---|---|---|")
    for name, g in sums.items():
        print(f"| {name} | {float(g.norm()):.4g} | {_cosine(g, g_val):+.3f} | {_cosine(g, g_bright):+.3f} |")
    print(f"noise check: cosine between the even and the odd batches' total gradients {_cosine(*halves):+.3f}")
    print(f"mean output - truth over the training batches (normalised units): {offset:+.5f}")


if __name__ == "__main__":
    main()
