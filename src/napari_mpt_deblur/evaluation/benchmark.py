"""Synthetic-defocus benchmark (docs/benchmarks.md): PSNR, SSIM, StarDist AP and speed per method.

For every sharp image and defocus value: normalise the sharp image by its 0.1 / 99.9 percentiles
to [0, 1], blur it with the realistic widefield PSF (``data.psf``, scalar model, 20x / 0.45 NA air,
0.461 um emission, 0.645 um pixels by default), add Poisson (peak 1000 photons) + Gaussian read
noise (sigma 3 photons) with a seed derived from (seed, image name, defocus), then restore it with
each method and compare with the sharp image:

* ``input``: the blurred image itself;
* ``rlN`` (``rl`` = ``rl30``): Richardson-Lucy with N iterations and the TRUE PSF (an oracle);
* ``wiener``: Wiener filter with the true PSF, balance tuned per defocus on a few tuning images
  (``wiener_tune_dir``, else the first benchmark images, said in the report); ``wiener:B`` uses B;
* ``mpt:NAME`` / ``h2t:NAME`` / ``model:NAME``: a saved deblurring model (``models.registry``).

Colour images (``channel_wavelengths_um``, ``--rgb``): every channel is blurred with the PSF at its
own wavelength, RL and Wiener restore each channel with its own true PSF (one Wiener balance for all
channels), PSNR is over all channels, SSIM the mean of the per-channel SSIMs; no StarDist (the shipped
StarDist model is for fluorescence nuclei).

StarDist (the project's shipped model unless another is named) segments the sharp image and every
restored one; with ground-truth labels the matching is against them, otherwise against StarDist's
segmentation of the sharp image (the table says which). Writes, atomically, into ``out_dir``:
``summary.md``, ``summary.csv``, ``per_image.csv`` (rewritten after every image, so an
interrupted run keeps what it finished), ``config.json``, ``benchmark.png`` (image grid) and
``ap_vs_iou.png``.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data.optics import BENCHMARK_OPTICS, Acquisition, fold_optics
from ..data.synthesis import ChannelWavelengths
from ..inference.settings import TileSide
from ..io.atomic import write_text_atomic
from ..io.paths import TIFF_SUFFIXES, list_images
from .benchmark_methods import (  # noqa: F401  (re-exported: the benchmark's methods live there)
    MethodSpec,
    ModelRestorer,
    Restorer,
    make_restorer,
    parse_method,
    parse_methods,
)
from .compare import rows_to_csv
from .matching import IOU_CURVE, IOU_THRESHOLDS, MatchingReport, gap_recovered, match_labels, pool_counts
from .benchmark_report import MIN_AP_GAP, _ap_plot, _image_grid, _write_config, summary_markdown
from .spectral import nyquist_energy_ratio

OUTPUT_FILES = ("summary.md", "summary.csv", "per_image.csv", "config.json", "benchmark.png", "ap_vs_iou.png")


class BenchmarkConfig(BaseModel):
    """Everything that defines a benchmark run; saved as ``config.json`` beside the results."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _flat_optics(cls, data: Any) -> Any:  # config.json files written before ``optics`` existed
        return fold_optics(data)

    sharp_dir: Path
    labels_dir: Path | None = None
    #: File stems to use (``<stem>.tif``); None = every TIFF in ``sharp_dir``.
    names: list[str] | None = None
    max_images: int | None = Field(None, ge=1)
    defocus_um: list[float] = Field(default_factory=lambda: [2.0, 4.0, 8.0, 12.0], min_length=1)
    #: The microscope the defocus is synthesised for (default: 20x/0.45 air, 0.461 um, 0.645 um).
    optics: Acquisition = BENCHMARK_OPTICS
    psf_model: Literal["scalar", "vectorial", "gibson_lanni", "pupil"] = "scalar"
    #: Colour images: the wavelength each channel is blurred at, um (``optics.wavelength_um`` is then
    #: unused); e.g. ``data.optics.RGB_WAVELENGTHS_UM``. None: grey images.
    channel_wavelengths_um: ChannelWavelengths | None = None
    peak_photons: float | None = 1000.0
    read_sigma_photons: float = 3.0
    seed: int = 0
    norm_low: float = 0.1
    norm_high: float = 99.9
    methods: list[str] = Field(default_factory=lambda: ["input", "rl10", "rl30", "wiener"], min_length=1)
    #: Where the Wiener tuning images are (default: ``sharp_dir``) and which (default: the first
    #: ``wiener_tune_images`` TIFFs there, or of the benchmark's own images when no dir is given).
    wiener_tune_dir: Path | None = None
    wiener_tune_names: list[str] | None = None
    wiener_tune_images: int = Field(3, ge=1)
    stardist: bool = True
    stardist_model: str | None = None
    device: str = "auto"
    #: Largest tile side for model inference (None: the inference engine's default for the device);
    #: the engine's own type, so the benchmark accepts exactly what InferenceSettings does.
    tile: TileSide | None = None
    figure_crop: int = Field(256, ge=16)

    @field_validator("defocus_um")
    @classmethod
    def _defocus_ok(cls, v: list[float]) -> list[float]:
        if any(not math.isfinite(d) for d in v):
            raise ValueError("defocus values must be finite numbers (um)")
        return v

    @model_validator(mode="after")
    def _colour_without_stardist(self) -> BenchmarkConfig:
        if self.channel_wavelengths_um is not None and self.stardist:
            raise ValueError("StarDist AP is for grey fluorescence images; a colour benchmark needs stardist off "
                             "(--no-stardist)")
        return self

    @property
    def channels(self) -> int:
        return 1 if self.channel_wavelengths_um is None else len(self.channel_wavelengths_um)


# --------------------------------------------------------------------------------------------
# Data


@dataclass
class BenchImage:
    name: str
    sharp01: np.ndarray  # (H, W), or (C, H, W) for colour, float64, 0.1/99.9 percentiles -> 0/1
    labels: np.ndarray | None  # (H, W) int32 ground truth, or None


def _read_plane(path: Path, channels: int = 1) -> np.ndarray:
    """(H, W) grey, or (C, H, W) float32 for ``channels`` > 1 (an H x W x C file)."""
    from ..data.loaders import as_channels
    from ..io.images import read_array

    arr = read_array(path)
    if channels > 1:
        try:
            return as_channels(arr, channels, str(path))
        except ValueError as exc:
            raise ValueError(f"{exc}; the colour benchmark needs {channels}-channel images") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and np.ptp(arr[..., :3].astype(np.int64), axis=-1).max() == 0:
        arr = arr[..., 0]  # RGB(A) file holding a grey image
    if arr.ndim != 2:
        hint = " (colour images: --rgb)" if arr.ndim == 3 and arr.shape[-1] in (3, 4) else ""
        raise ValueError(f"{path}: the benchmark needs 2D grey images, got shape {arr.shape}{hint}")
    return arr


def find_images(cfg: BenchmarkConfig) -> list[Path]:
    folder = cfg.sharp_dir
    if not folder.is_dir():
        raise FileNotFoundError(f"sharp image folder {folder} does not exist")
    if cfg.names is not None:
        paths = []
        for n in cfg.names:
            hits = [folder / f"{n}{s}" for s in TIFF_SUFFIXES if (folder / f"{n}{s}").is_file()]
            if not hits:
                raise FileNotFoundError(f"image {n!r} not found in {folder} (looked for {n}.tif / {n}.tiff)")
            paths.append(hits[0])
    else:
        paths = list_images(folder, TIFF_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no TIFF images in {folder}")
    return paths[: cfg.max_images] if cfg.max_images else paths


def load_image(path: Path, cfg: BenchmarkConfig, labels_dir: Path | None) -> BenchImage:
    from ..data.normalisation import normalise, percentile_range

    img = _read_plane(path, cfg.channels)
    lo, hi = percentile_range(img, cfg.norm_low, cfg.norm_high)  # all channels together
    sharp01 = normalise(img, lo, hi).astype(np.float64)
    labels = None
    if labels_dir is not None:
        lab_path = labels_dir / path.name
        if not lab_path.is_file():
            raise FileNotFoundError(f"ground-truth labels {lab_path} missing for image {path}")
        labels = _read_plane(lab_path)
        if labels.shape != img.shape[-2:]:
            raise ValueError(f"labels {lab_path} have shape {labels.shape}, image {path} has {img.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels {lab_path} must be an integer label image, got {labels.dtype}")
        labels = labels.astype(np.int32)
    return BenchImage(path.stem, sharp01, labels)


def psf_params(cfg: BenchmarkConfig, defocus_um: float):
    return cfg.optics.psf_params(float(defocus_um), model=cfg.psf_model)


def channel_psfs(cfg: BenchmarkConfig, defocus_um: float) -> list[np.ndarray]:
    """The true PSF of each channel at ``defocus_um`` (one for grey images)."""
    from ..data.psf import defocus_psf

    params = psf_params(cfg, defocus_um)
    if cfg.channel_wavelengths_um is None:
        return [defocus_psf(params)]
    return [defocus_psf(params.model_copy(update={"wavelength_um": float(w)})) for w in cfg.channel_wavelengths_um]


def _nyquist(image: np.ndarray) -> float:
    """Nyquist energy ratio of a grey image, the mean of the channels' for a colour one."""
    img = np.asarray(image)
    return nyquist_energy_ratio(img) if img.ndim == 2 else float(np.mean([nyquist_energy_ratio(p) for p in img]))


def _ssim(restored: np.ndarray, sharp: np.ndarray) -> float:
    from .metrics import ssim

    return ssim(restored, sharp, channel_axis=0 if np.ndim(sharp) == 3 else None)


def _megapixels(image: np.ndarray) -> float:
    """Image size in megapixels (a colour pixel counts once)."""
    return image.shape[-2] * image.shape[-1] / 1e6


def noise_rng(seed: int, name: str, defocus_um: float, stream: int = 0) -> np.random.Generator:
    """Seeded per (seed, image name, defocus): the same image gets the same noise in every run."""
    return np.random.default_rng([seed, stream, zlib.crc32(name.encode()), round(defocus_um * 1000)])


def degrade(img: BenchImage, cfg: BenchmarkConfig, defocus_um: float, stream: int = 0) -> np.ndarray:
    from ..data.synthesis import synthesize_defocus

    return synthesize_defocus(
        img.sharp01, psf_params(cfg, defocus_um), peak_photons=cfg.peak_photons,
        read_sigma_photons=cfg.read_sigma_photons, rng=noise_rng(cfg.seed, img.name, defocus_um, stream),
        channel_wavelengths_um=cfg.channel_wavelengths_um,
    )


# --------------------------------------------------------------------------------------------
# Running


@dataclass
class BenchmarkResult:
    out_dir: Path
    per_image: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    wiener_balance: dict[float, float]
    reference: str
    files: dict[str, Path] = field(default_factory=dict)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    existing = [f for f in OUTPUT_FILES if (out_dir / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds benchmark results ({', '.join(existing)}); choose another --out or pass --overwrite"
        )


def _tune_wiener(cfg: BenchmarkConfig, images: list[BenchImage], log: Callable[[str], None]) -> tuple[dict[float, float], str]:
    from .classical import tune_wiener_balance

    if cfg.wiener_tune_dir is not None or cfg.wiener_tune_names is not None:
        tune_dir = cfg.wiener_tune_dir or cfg.sharp_dir
        tune_cfg = cfg.model_copy(update={"sharp_dir": tune_dir, "names": cfg.wiener_tune_names,
                                          "max_images": cfg.wiener_tune_images})
        tune_images = [load_image(p, cfg, None) for p in find_images(tune_cfg)]
        source = f"{len(tune_images)} images of {tune_dir} ({', '.join(im.name for im in tune_images)})"
    else:
        tune_images = images[: cfg.wiener_tune_images]
        source = (f"the first {len(tune_images)} benchmark images ({', '.join(im.name for im in tune_images)}; "
                  "tuning on other images is fairer: --wiener-tune)")
    overlap = {im.name for im in tune_images} & {im.name for im in images}
    if overlap and (cfg.wiener_tune_dir is not None or cfg.wiener_tune_names is not None):
        log(f"WARNING: Wiener tuning images are also benchmark images: {', '.join(sorted(overlap))}")
    balances = {}
    for d in cfg.defocus_um:
        blurred = [degrade(im, cfg, d, stream=1) for im in tune_images]  # other noise than the benchmark's
        best, scores = tune_wiener_balance(blurred, [im.sharp01 for im in tune_images], channel_psfs(cfg, d))
        balances[d] = best
        log(f"wiener balance at {d:g} um: {best:.4g} (mean PSNR {scores[best]:.2f} dB on {len(tune_images)} tuning images)")
    return balances, source


def run_benchmark(
    cfg: BenchmarkConfig,
    out_dir: str | Path,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> BenchmarkResult:
    """Run the benchmark described by ``cfg`` and write its tables and figures into ``out_dir``."""
    from ..inference.devices import tune_cpu_allocator
    from .metrics import psnr

    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    specs = parse_methods(cfg.methods)
    paths = find_images(cfg)
    tune_cpu_allocator()

    segmenter = None
    stardist_info: dict[str, Any] | None = None
    if cfg.stardist:
        from .stardist_runner import load_stardist, segment

        sd_model = load_stardist(cfg.stardist_model)
        log(f"StarDist: {sd_model.source.describe()}")
        stardist_info = {"model": sd_model.source.describe(), "thresholds": sd_model.thresholds,
                         "normalisation": "csbdeep normalize(img, 1, 99.8) per image"}

        def segmenter(img: np.ndarray) -> np.ndarray:
            return segment(img, sd_model)

    models = {s.key: ModelRestorer(s.model, cfg.device, s.arch, cfg.tile, s.orientations, s.shifts) for s in specs if s.kind == "model"}
    for key, m in models.items():
        log(f"{key}: {m.description} on {m.device}")

    images = [load_image(p, cfg, cfg.labels_dir) for p in paths]
    has_labels = cfg.labels_dir is not None
    reference = "ground-truth labels" if has_labels else "StarDist on the sharp image (no ground-truth labels given)"
    log(f"{len(images)} images from {cfg.sharp_dir}; defocus {cfg.defocus_um} um; methods {[s.key for s in specs]}")

    needs_tuning = any(s.kind == "wiener" and s.balance is None for s in specs)
    balances, tune_source = _tune_wiener(cfg, images, log) if needs_tuning else ({}, "")
    psfs = {d: channel_psfs(cfg, d) for d in cfg.defocus_um}

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"summary_md": out_dir / "summary.md", "summary_csv": out_dir / "summary.csv",
             "per_image": out_dir / "per_image.csv", "config": out_dir / "config.json",
             "benchmark": out_dir / "benchmark.png", "ap_vs_iou": out_dir / "ap_vs_iou.png"}
    _write_config(files["config"], cfg, specs, balances, tune_source, reference, models, stardist_info)

    per_image: list[dict[str, Any]] = []
    reports: dict[tuple[float | None, str], list[MatchingReport]] = {}
    figure_tiles: dict[tuple[float | None, str], np.ndarray] = {}
    for i, im in enumerate(images):
        t_img = time.perf_counter()
        ref_labels = im.labels
        sharp_row: dict[str, Any] = {"image": im.name, "defocus_um": "", "method": "sharp", "psnr": math.inf, "ssim": 1.0,
                                     "nyquist_ratio": _nyquist(im.sharp01),
                                     "seconds": 0.0, "megapixels": _megapixels(im.sharp01)}
        if segmenter is not None:
            sharp_labels = segmenter(im.sharp01)
            if ref_labels is None:
                ref_labels = sharp_labels
            sharp_row["n_objects"] = int(len(np.unique(sharp_labels)) - 1)
            rep = match_labels(ref_labels, sharp_labels, IOU_CURVE)
            sharp_row.update(rep.as_row())
            reports.setdefault((None, "sharp"), []).append(rep)
        per_image.append(sharp_row)
        if i == 0:
            figure_tiles[(None, "sharp")] = im.sharp01
        for d in cfg.defocus_um:
            blurred = degrade(im, cfg, d)
            for spec in specs:
                restore = make_restorer(spec, psfs[d], spec.balance if spec.balance is not None else balances.get(d), models)
                t0 = time.perf_counter()
                restored = np.asarray(restore(blurred), dtype=np.float32)
                seconds = time.perf_counter() - t0 if spec.kind != "input" else 0.0
                row = {"image": im.name, "defocus_um": d, "method": spec.key, "psnr": psnr(restored, im.sharp01),
                       "ssim": _ssim(restored, im.sharp01), "nyquist_ratio": _nyquist(restored),
                       "seconds": seconds, "megapixels": _megapixels(restored)}
                if segmenter is not None:
                    labels = segmenter(restored)
                    row["n_objects"] = int(len(np.unique(labels)) - 1)
                    rep = match_labels(ref_labels, labels, IOU_CURVE)
                    row.update(rep.as_row())
                    reports.setdefault((d, spec.key), []).append(rep)
                per_image.append(row)
                if i == 0:
                    figure_tiles[(d, spec.key)] = restored
        log(f"[{i + 1}/{len(images)}] {im.name}: {time.perf_counter() - t_img:.1f} s")
        rows_to_csv(files["per_image"], per_image)

    summary = summarise(per_image, reports, cfg.defocus_um, [s.key for s in specs])
    rows_to_csv(files["summary_csv"], summary)
    write_text_atomic(files["summary_md"], summary_markdown(summary, cfg, specs, balances, tune_source, reference,
                                                            len(images), models, stardist_info))
    _image_grid(files["benchmark"], figure_tiles, cfg, [s.key for s in specs], images[0].name)
    if segmenter is not None:
        _ap_plot(files["ap_vs_iou"], reports, cfg.defocus_um, [s.key for s in specs], reference)
    else:
        files.pop("ap_vs_iou")
    for f in files.values():
        log(f"wrote {f}")
    return BenchmarkResult(out_dir, per_image, summary, balances, reference, files)


def summarise(
    per_image: list[dict[str, Any]],
    reports: dict[tuple[float | None, str], list[MatchingReport]],
    defocus: Sequence[float],
    methods: Sequence[str],
) -> list[dict[str, Any]]:
    """One row per (defocus, method) plus one for the sharp images: means, pooled AP, gap recovered."""
    rows = []

    def pooled(key) -> dict[str, float]:
        if key not in reports:
            return {}
        rep = pool_counts(reports[key])
        return {f"ap@{t:g}": rep.at(t).ap for t in IOU_THRESHOLDS} | {"mean_ap": rep.mean_ap}

    sharp = pooled((None, "sharp"))
    sharp_counts = [r["n_objects"] for r in per_image if r["method"] == "sharp" and "n_objects" in r]
    rows.append({"defocus_um": "", "method": "sharp", "images": sum(r["method"] == "sharp" for r in per_image),
                 "psnr": math.inf, "ssim": 1.0,
                 "nyquist_ratio": float(np.mean([r["nyquist_ratio"] for r in per_image if r["method"] == "sharp"])),
                 **sharp, "ap_gap_recovered": 1.0 if sharp else "",
                 "n_objects": float(np.mean(sharp_counts)) if sharp_counts else "", "sec_per_mp": ""})
    for d in defocus:
        base = pooled((d, "input"))
        for m in methods:
            sel = [r for r in per_image if r["method"] == m and r["defocus_um"] == d]
            ap = pooled((d, m))
            gap = gap_recovered(ap["mean_ap"], base["mean_ap"], sharp["mean_ap"], MIN_AP_GAP) if ap and base and sharp else ""
            mp = sum(r["megapixels"] for r in sel)
            counts = [r["n_objects"] for r in sel if "n_objects" in r]
            rows.append({
                "defocus_um": d, "method": m, "images": len(sel),
                "psnr": float(np.mean([r["psnr"] for r in sel])), "ssim": float(np.mean([r["ssim"] for r in sel])),
                "nyquist_ratio": float(np.mean([r["nyquist_ratio"] for r in sel])),
                **ap, "ap_gap_recovered": gap, "n_objects": float(np.mean(counts)) if counts else "",
                "sec_per_mp": (sum(r["seconds"] for r in sel) / mp) if m != "input" and mp else "",
            })
    return rows
