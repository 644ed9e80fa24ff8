"""Real defocus, no ground truth: BBBC006 z_00 planes before and after deblurring.

For each real defocused image (plane z_00, ~32 um from focus; 16 fields, 520 x 696) and each
model: no-reference sharpness (normalised Laplacian variance, Brenner, Vollath F4; larger is
sharper), the number of StarDist nuclei, and how many of them are fragments (under a quarter of the
in-focus fields' median nucleus area: StarDist cutting a clump into pieces), before and after. The
6 in-focus BBBC006 fields
(other fields of the same plates, so not pixel-aligned) give the typical in-focus values.

There is no ground truth here, so these numbers say "sharper" and "more nuclei found", not
"correct": a model that invents edges also raises sharpness. Look at the figure.

    .venv/bin/python benchmarks/bbbc006_real_defocus.py --models mpt-small-fluo,h2t-unet-fluo \
        --out runs/bbbc006_z00 --figure docs/images/bbbc006_z00_real_defocus.png

Prints a markdown table (per-image means) and writes ``rows.csv`` (one row per image x method).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

import numpy as np


#: The method name of the in-focus reference rows.
IN_FOCUS = "in focus (other fields)"


def _shared() -> Path:
    return Path(os.environ.get("MPT_DEBLUR_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mpt-small-fluo,h2t-unet-fluo", help="comma-separated model names or paths")
    p.add_argument("--defocused", type=Path, default=_shared() / "data/bbbc006_w1/defocused_z00")
    p.add_argument("--in-focus", type=Path, default=_shared() / "data/bbbc006_w1/in_focus")
    p.add_argument("--out", type=Path, default=Path("runs/bbbc006_z00"))
    p.add_argument("--figure", type=Path, default=None, help="PNG: three fields, input vs each model, with nuclei")
    p.add_argument("--figure-fields", default="h01_s2_w1,d02_s2_w1,l22_s2_w1")
    p.add_argument("--orientations", choices=["1", "4", "8", "model"], default="1",
                   help="orientations averaged per tile: 1 (default, one pass: the docs' table) or each model's default")
    p.add_argument("--shifts", choices=["1", "2", "model"], default="model",
                   help="one-pixel shifts averaged per orientation: each model's default (default: 2 for "
                        "mpt-tiny-fluo, whose single pass has a period-2 pattern, 1 for the others), 1 or 2")
    args = p.parse_args(argv)

    from napari_mpt_deblur.evaluation.compare import rows_to_csv
    from napari_mpt_deblur.evaluation.matching import count_objects
    from napari_mpt_deblur.evaluation.sharpness import sharpness
    from napari_mpt_deblur.evaluation.stardist_runner import load_stardist, segment
    from napari_mpt_deblur.inference.devices import tune_cpu_allocator
    from napari_mpt_deblur.inference.engine import Deblurrer, InferenceSettings
    from napari_mpt_deblur.io.images import read_array

    tune_cpu_allocator()
    models = [m for m in args.models.split(",") if m]
    settings = InferenceSettings(orientations=None if args.orientations == "model" else int(args.orientations),
                                 shifts=None if args.shifts == "model" else int(args.shifts))
    engines = {m: Deblurrer(m, settings) for m in models}
    stardist = load_stardist()
    args.out.mkdir(parents=True, exist_ok=True)

    rows, keep, in_focus_areas = [], {}, []
    figure_fields = set(args.figure_fields.split(","))
    for f in sorted(args.in_focus.glob("*.tif")):
        img = read_array(f)
        labels = segment(img, stardist)
        in_focus_areas.append(_object_areas(labels))
        rows.append({"image": f.stem, "set": "in_focus", "method": IN_FOCUS, "nuclei": count_objects(labels),
                     "areas": in_focus_areas[-1], **sharpness(img)})
    # A "fragment" is an object under a quarter of the typical in-focus nucleus: StarDist cutting
    # a clump into pieces shows here, while the plain count rises.
    small_px = 0.25 * float(np.median(np.concatenate(in_focus_areas)))
    for f in sorted(args.defocused.glob("*.tif")):
        img = read_array(f)
        outputs = {"input": img.astype(np.float32)}
        for name, engine in engines.items():
            outputs[name] = np.asarray(engine.deblur_array(img, "YX"), dtype=np.float32)
        for method, arr in outputs.items():
            labels = segment(arr, stardist)
            rows.append({"image": f.stem, "set": "z00", "method": method, "nuclei": count_objects(labels),
                         "areas": _object_areas(labels), **sharpness(arr)})
            if f.stem in figure_fields:
                keep[(f.stem, method)] = (arr, labels)
        print(f"{f.stem}: " + ", ".join(f"{r['method']} {r['nuclei']} nuclei nvl {r['nvl']:.3g}"
                                        for r in rows if r["image"] == f.stem), file=sys.stderr)
    for r in rows:
        r["fragments"] = int(np.count_nonzero(r.pop("areas") < small_px))
    rows_to_csv(args.out / "rows.csv", rows)

    methods = [IN_FOCUS, "input", *models]
    print(f"fragments: objects under {small_px:.0f} px, a quarter of the in-focus fields' median nucleus area", file=sys.stderr)
    print("| method | images | nuclei / image | fragments / image | NVL | Brenner | Vollath F4 | fields with more nuclei than input |")
    print("|---|---|---|---|---|---|---|---|")
    by_image_input = {r["image"]: r["nuclei"] for r in rows if r["method"] == "input"}
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        more = "–" if m in ("input", IN_FOCUS) else \
            f"{sum(r['nuclei'] > by_image_input[r['image']] for r in sel)} / {len(sel)}"
        print(f"| {m} | {len(sel)} | {np.mean([r['nuclei'] for r in sel]):.1f} | {np.mean([r['fragments'] for r in sel]):.1f} | "
              f"{np.mean([r['nvl'] for r in sel]):.4g} | {np.mean([r['brenner'] for r in sel]):.4g} | "
              f"{np.mean([r['vollath_f4'] for r in sel]):.4g} | {more} |")

    if args.figure is not None and keep:
        _figure(keep, ["input", *models], sorted(figure_fields & {k[0] for k in keep}), rows, args.figure)
        print(f"\nfigure: {args.figure}", file=sys.stderr)
    return 0


def _object_areas(labels: np.ndarray) -> np.ndarray:
    """Pixel area of each object of a 2-D label image (background 0), shape (n_objects,)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel())
    return counts[1:][counts[1:] > 0]


def _figure(keep, methods, fields, rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from napari_mpt_deblur.data.normalisation import percentile_range
    from napari_mpt_deblur.demo import outline_overlay
    from napari_mpt_deblur.io.atomic import write_bytes_atomic

    fig, axes = plt.subplots(len(fields), len(methods), figsize=(4.2 * len(methods), 3.3 * len(fields)), dpi=90,
                             squeeze=False)
    for i, field in enumerate(fields):
        lo, hi = percentile_range(keep[(field, "input")][0], 0.1, 99.9)
        for j, method in enumerate(methods):
            arr, labels = keep[(field, method)]
            ax = axes[i, j]
            ax.imshow(arr, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.imshow(outline_overlay(labels), interpolation="nearest")
            row = next(r for r in rows if r["image"] == field and r["method"] == method)
            ax.set_title(f"{field} · {method}\n{row['nuclei']} nuclei, NVL {row['nvl']:.3g}", fontsize=9)
            ax.axis("off")
    fig.suptitle("Real BBBC006 defocus (z_00, ~32 um): StarDist nuclei (yellow) before and after", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buf.getvalue())


if __name__ == "__main__":
    raise SystemExit(main())
