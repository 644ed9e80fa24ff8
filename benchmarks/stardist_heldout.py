"""Accuracy of a StarDist model on the held-out U2OS images (``data.splits.U2OS_TEST``, never trained on).

Prints a per-image table (objects, F1 / AP at IoU 0.5, AP at 0.7 / 0.9) and the pooled numbers; the
lowest per-image F1@0.5 is what the floor in ``tests/test_evaluation_stardist.py`` is based on.

    .venv/bin/python benchmarks/stardist_heldout.py [--model shipped|FOLDER|NAME] [--split test|val]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="StarDist model (default: the shipped one)")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "u2os_nuclei")
    args = p.parse_args(argv)

    import tifffile

    from napari_mpt_deblur.data.splits import U2OS_STARDIST_VAL, U2OS_TEST
    from napari_mpt_deblur.evaluation.matching import count_objects, match_dataset, match_labels
    from napari_mpt_deblur.evaluation.stardist_runner import load_stardist, segment

    names = U2OS_TEST if args.split == "test" else U2OS_STARDIST_VAL
    model = load_stardist(args.model)
    print(f"{model.source.describe()}, thresholds {model.thresholds}; {len(names)} {args.split} images")
    print(f"{'image':<14} {'true':>5} {'pred':>5} {'F1@0.5':>7} {'AP@0.5':>7} {'AP@0.7':>7} {'AP@0.9':>7} {'s':>5}")
    gts, preds, f1s = [], [], []
    for n in names:
        img = tifffile.imread(args.data / "images" / f"{n}.tif")
        gt = tifffile.imread(args.data / "labels" / f"{n}.tif")
        t0 = time.perf_counter()
        lab = segment(img, model)
        dt = time.perf_counter() - t0
        r = match_labels(gt, lab)
        f1s.append(r.at(0.5).f1)
        gts.append(gt)
        preds.append(lab)
        print(f"{n:<14} {count_objects(gt):>5} {count_objects(lab):>5} {r.at(0.5).f1:>7.3f} {r.at(0.5).ap:>7.3f} "
              f"{r.at(0.7).ap:>7.3f} {r.at(0.9).ap:>7.3f} {dt:>5.1f}")
    pooled = match_dataset(gts, preds)
    print(f"pooled: F1@0.5 {pooled.at(0.5).f1:.3f}  AP@0.5 {pooled.at(0.5).ap:.3f}  AP@0.7 {pooled.at(0.7).ap:.3f}  "
          f"AP@0.9 {pooled.at(0.9).ap:.3f}  mean AP {pooled.mean_ap:.3f}")
    print(f"per-image F1@0.5: min {min(f1s):.3f}  median {np.median(f1s):.3f}  max {max(f1s):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
