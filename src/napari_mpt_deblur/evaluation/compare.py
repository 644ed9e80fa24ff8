"""Library side of ``mpt-deblur evaluate`` and ``mpt-deblur compare`` (and the napari StarDist widget).

* :func:`evaluate_images`: PSNR / SSIM of restored images against references (both scaled by the
  reference's 0.1 / 99.9 percentiles, data range 1), optional LPIPS, and no-reference sharpness.
* :func:`compare_stardist`: StarDist on a "before" and an "after" image (or stack): object
  counts, and with ground-truth labels precision / recall / F1 / AP at IoU 0.5, 0.7, 0.9 and mean AP.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..io.atomic import write_text_atomic
from ..io.images import read_array
from ..io.paths import TIFF_SUFFIXES, list_images
from .matching import IOU_THRESHOLDS, count_objects, match_labels

def _image_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    return list_images(path, TIFF_SUFFIXES)


def evaluate_images(
    pred: str | Path, ref: str | Path | None = None, use_lpips: bool = False, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """One row per restored image in ``pred`` (a file or a folder of TIFFs).

    With ``ref`` (a file, or a folder holding images of the same names) PSNR and SSIM are
    computed after scaling BOTH images with the reference's 0.1 / 99.9 percentile range (data
    range 1, no clipping), so the numbers match the benchmark's; with ``use_lpips`` also LPIPS
    (an error when it is not available). Sharpness (NVL, Brenner, Vollath F4) of each 2D restored
    image is always reported.
    """
    from ..data.normalisation import normalise, percentile_range
    from .metrics import MetricUnavailable, lpips, lpips_status, psnr, ssim
    from .sharpness import sharpness

    if use_lpips:
        ok, reason = lpips_status()
        if not ok:
            raise MetricUnavailable(reason)
    pred = Path(pred)
    files = _image_files(pred)
    rows = []
    for f in files:
        p = read_array(f)
        row: dict[str, Any] = {"image": f.name, "shape": "x".join(map(str, p.shape))}
        if ref is not None:
            ref_path = Path(ref)
            r_file = ref_path / f.name if ref_path.is_dir() else ref_path
            r = read_array(r_file)
            if r.shape != p.shape:
                raise ValueError(f"{f} has shape {p.shape} but its reference {r_file} has {r.shape}")
            lo, hi = percentile_range(r, 0.1, 99.9)
            p01, r01 = normalise(p, lo, hi), normalise(r, lo, hi)
            row["psnr"] = psnr(p01, r01)
            row["ssim"] = ssim(p01, r01)
            if use_lpips:
                row["lpips"] = lpips(p01, r01)
        if p.ndim == 2:
            row.update(sharpness(p))
        rows.append(row)
        log("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return rows


@dataclass
class CompareResult:
    rows: list[dict[str, Any]]
    labels: dict[str, np.ndarray]
    model: str


def compare_stardist(
    images: dict[str, np.ndarray],
    gt_labels: np.ndarray | None = None,
    stardist_model: str | Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> CompareResult:
    """Segment each named image (e.g. ``{"before": ..., "after": ..., "sharp": ...}``) with StarDist.

    Returns a row per image with its object count and, with ``gt_labels`` (same shape), the
    matching at IoU 0.5 / 0.7 / 0.9 and mean AP; plus the label images themselves.
    """
    from .stardist_runner import load_stardist, segment

    shapes = {k: tuple(v.shape) for k, v in images.items()}
    if len(set(shapes.values())) > 1:
        # Counts of different fields of view (or crops) are no before/after comparison.
        raise ValueError("the images must have the same shape to be compared: "
                         + ", ".join(f"{k} {s}" for k, s in shapes.items()))
    if gt_labels is not None:
        for k, s in shapes.items():
            if s != tuple(gt_labels.shape):
                raise ValueError(f"image '{k}' has shape {s} but the ground-truth labels have {tuple(gt_labels.shape)}")
    model = load_stardist(stardist_model)  # after the cheap checks: loading starts TensorFlow
    rows, labels = [], {}
    for key, img in images.items():
        cb = (lambda d, n, key=key: progress(key, d, n)) if progress is not None else None
        lab = segment(img, model, progress=cb)
        labels[key] = lab
        row: dict[str, Any] = {"image": key, "objects": count_objects(lab) if lab.ndim == 2 else
                               sum(count_objects(p) for p in lab.reshape(-1, *lab.shape[-2:]))}
        if gt_labels is not None:
            row.update(match_labels(np.asarray(gt_labels), lab, IOU_THRESHOLDS).as_row())
        rows.append(row)
    return CompareResult(rows, labels, model.source.describe())


def rows_to_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write dict rows as CSV atomically (floats with 6 significant digits)."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, restval="")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_text_atomic(path, buf.getvalue())


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table of ``columns`` (missing values shown as '-')."""
    def cell(v: Any) -> str:
        if isinstance(v, float) and v != v:  # NaN: a 0/0 score, e.g. AP with no true and no found objects
            return "undefined"
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None or v == "" else str(v))

    table = [columns] + [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in table)
