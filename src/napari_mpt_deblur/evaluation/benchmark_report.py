"""The benchmark's report: config.json, summary.md (the table in docs/benchmarks.md) and the two
figures (image grid, AP vs IoU), written by :func:`~napari_mpt_deblur.evaluation.benchmark.run_benchmark`."""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..io.atomic import write_text_atomic, write_with
from .matching import IOU_CURVE, pool_counts

if TYPE_CHECKING:
    from .benchmark import BenchmarkConfig

#: Below this blur-to-sharp mean-AP gap, "gap recovered" is reported as n/a: a ratio of two tiny,
#: noisy differences says nothing (at 2 um the blur costs StarDist almost nothing).
MIN_AP_GAP = 0.01


def _write_config(path: Path, cfg: BenchmarkConfig, specs, balances, tune_source, reference, models, stardist_info) -> None:
    import sys

    from .._version import __version__

    record = {
        "config": json.loads(cfg.model_dump_json()),
        "methods": [s.__dict__ for s in specs],
        "wiener_balance": {str(k): v for k, v in balances.items()},
        "wiener_tuned_on": tune_source,
        "matching_reference": reference,
        "stardist": stardist_info,
        "models": {k: m.engine.metadata() for k, m in models.items()},
        "package_version": __version__,
        "python": sys.version.split()[0],
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
    }
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def _fmt(v: Any, digits: int) -> str:
    if v == "" or v is None:
        return "–"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞"
        if math.isnan(v):
            return "n/a"
        return f"{v:.{digits}f}"
    return str(v)


def summary_markdown(summary, cfg: BenchmarkConfig, specs, balances, tune_source, reference, n_images, models,
                     stardist_info: dict[str, Any] | None) -> str:
    with_ap = stardist_info is not None
    noise = ("no noise" if cfg.peak_photons is None else
             f"Poisson noise at {cfg.peak_photons:g} photons peak + Gaussian read noise sigma "
             f"{cfg.read_sigma_photons:g} photons, seed {cfg.seed}")
    o = cfg.optics
    if cfg.channel_wavelengths_um is None:
        light = f"emission {o.wavelength_um} um"
        units = "PSNR and SSIM with data range 1."
    else:
        light = ("colour images, each channel blurred at its own wavelength ("
                 + ", ".join(f"{w:g}" for w in cfg.channel_wavelengths_um) + " um) and restored by RL/Wiener with its "
                 "own true PSF")
        units = ("PSNR over all channels, SSIM the mean of the channels' SSIMs, data range 1 (all channels share "
                 "one normalisation).")
    setup = (f"{n_images} images from `{cfg.sharp_dir}`; {cfg.psf_model} PSF, NA {o.na}, {light}, "
             f"pixel {o.pixel_um} um, immersion n = {o.immersion_index}; {noise}. "
             f"Sharp images normalised by their {cfg.norm_low}/{cfg.norm_high} percentiles to [0, 1]; {units}")
    lines = ["# Defocus benchmark", "", setup, ""]
    if with_ap:
        ap_note = (f"StarDist AP = TP / (TP + FP + FN) at each IoU, counts pooled over images, against {reference}; "
                   "mean AP = mean of AP at IoU 0.5, 0.7, 0.9 (the MPT paper's Table 6). Gap recovered = "
                   "(mean AP - input mean AP) / (sharp mean AP - input mean AP); n/a when the blur costs less than "
                   f"{MIN_AP_GAP} mean AP.")
        lines += [ap_note, "", f"StarDist: {stardist_info['model']}, thresholds {stardist_info['thresholds']}.", ""]
    if balances:
        lines += ["Wiener balance (tuned per defocus on " + tune_source + "): "
                  + ", ".join(f"{d:g} um: {b:.3g}" for d, b in balances.items()), ""]
    for s in specs:
        if s.kind == "model":
            lines += [f"`{s.key}`: {models[s.key].description}"]
    if any(s.kind == "model" for s in specs):
        lines += [""]
    lines += ["RL and Wiener use the TRUE PSF (an oracle no real user has).",
              "Nyquist = mean Nyquist energy ratio of the outputs (`evaluation.spectral.nyquist_energy_ratio`: "
              "period-2 'checkerboard' power over the median high-frequency power; camera noise about 1): "
              "far above the input's and the sharp images' means the method adds a grid pattern.", ""]
    head = ["defocus (um)", "method", "PSNR (dB)", "SSIM", "Nyquist"]
    if with_ap:
        head += ["AP@0.5", "AP@0.7", "AP@0.9", "mean AP", "gap recovered", "objects"]
    head += ["s / MP"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [_fmt(r["defocus_um"], 0) if r["defocus_um"] != "" else "sharp", r["method"], _fmt(r["psnr"], 2), _fmt(r["ssim"], 4),
                 _fmt(r["nyquist_ratio"], 2)]
        if with_ap:
            cells += [_fmt(r.get("ap@0.5", ""), 4), _fmt(r.get("ap@0.7", ""), 4), _fmt(r.get("ap@0.9", ""), 4),
                      _fmt(r.get("mean_ap", ""), 4), _fmt(r.get("ap_gap_recovered", ""), 2), _fmt(r.get("n_objects", ""), 1)]
        cells += [_fmt(r["sec_per_mp"], 2)]
        if r["defocus_um"] != "":
            cells[0] = f"{r['defocus_um']:g}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    write_with(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _image_grid(path: Path, tiles: dict, cfg: BenchmarkConfig, methods: Sequence[str], name: str) -> None:
    """Rows: defocus values; columns: sharp, then each method; a centre crop of the first image."""
    plt = _pyplot()
    sharp = tiles[(None, "sharp")]
    c = min(cfg.figure_crop, *sharp.shape[-2:])
    y0, x0 = (sharp.shape[-2] - c) // 2, (sharp.shape[-1] - c) // 2
    crop = (Ellipsis, slice(y0, y0 + c), slice(x0, x0 + c))
    rows, cols = len(cfg.defocus_um), len(methods) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows + 0.4), squeeze=False)
    for r, d in enumerate(cfg.defocus_um):
        for col, key in enumerate(["sharp", *methods]):
            ax = axes[r, col]
            img = (sharp if key == "sharp" else tiles[(d, key)])[crop]
            if img.ndim == 3:  # (C, H, W) colour: shown as RGB, clipped to the same [0, 1]
                ax.imshow(np.clip(np.moveaxis(img, 0, -1), 0.0, 1.0), interpolation="nearest")
            else:
                ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(key, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{d:g} um", fontsize=9)
    fig.suptitle(f"{name}: centre {c} x {c} px crop, display range [0, 1] of the sharp image", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)


def _ap_plot(path: Path, reports: dict, defocus: Sequence[float], methods: Sequence[str], reference: str) -> None:
    plt = _pyplot()
    n = len(defocus)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.2), squeeze=False, sharey=True)
    sharp = pool_counts(reports[(None, "sharp")])
    for ax, d in zip(axes[0], defocus):
        ax.plot(IOU_CURVE, [sharp.at(t).ap for t in IOU_CURVE], "k--", label="sharp")
        for m in methods:
            rep = pool_counts(reports[(d, m)])
            ax.plot(IOU_CURVE, [rep.at(t).ap for t in IOU_CURVE], marker=".", label=m)
        ax.set_title(f"defocus {d:g} um", fontsize=10)
        ax.set_xlabel("IoU threshold")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("StarDist AP = TP / (TP + FP + FN)")
    axes[0, -1].legend(fontsize=8)
    fig.suptitle(f"AP vs IoU, against {reference}", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)
