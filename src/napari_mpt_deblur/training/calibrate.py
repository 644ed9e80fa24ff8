"""Calibrate a model to one microscope: a supervised, time-budgeted fine-tune on synthetic pairs made
with exactly the user's optics (``mpt-deblur calibrate``, the napari Calibrate widget).

A generalist model covers 10x/0.30 to 60x/1.40 oil, 450-620 nm and blur radii of 0.5-12 px; a
calibrated one sees only the user's objective, immersion, emission wavelength and pixel size
(:class:`~napari_mpt_deblur.data.optics.Acquisition`), with the defocus (unknown) drawn over a range
of both signs. Training pairs come from sharp images: the user's own (in-focus images, or the
best-focus plane of a z-stack) and the bundled set (``sample_data/calibration_sharp``); EFCR as in
training, EFCRex when the user's blurry images are given (``unlabeled``). Validation: held-back
sharp images (or held-back crops, when there are few) blurred at four defocus values across the
range with the PSF's full extent and seeded camera noise. The run stops inside its time budget and
keeps the best validated weights; the saved model's record holds the optics
(``ModelRecord.optics``) and the calibration settings (``training["calibration"]``).

Work files (checkpoints, logs) go to ``work_dir``, so an interrupted calibration resumes
(``resume=True``) instead of starting again.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..data import datasets as D
from ..data.optics import MAX_BLUR_RADIUS_PX, OPTICS_FLAGS, Acquisition
from ..inference.settings import Precision
from ..losses.efcr import WARM_START_NYQUIST_WEIGHT, EFCRConfig
from .config import ArraysSource, ArraysValidation, ModelChoice, OptimConfig, TrainConfig, ValidationConfig
from .trainer import StepRecord, Trainer, TrainerJob

#: Folder of the bundled sharp images (provenance in its PROVENANCE.md).
BUNDLED_SHARP_DIR = Path(__file__).resolve().parent.parent / "sample_data" / "calibration_sharp"

#: Largest PSF kernel side used for the training pairs: 257 px holds the blur disc of the default
#: range (radius <= 12 px) with its diffraction rings; the validation pairs use the full kernel.
CALIBRATION_MAX_KERNEL = 257

#: Hold back whole images for validation when at least this many sharp images are given (one in
#: eight, at most ``validation_images``); with fewer, a band of each image is held back instead.
MIN_IMAGES_FOR_WHOLE_HOLDOUT = 8

#: Smallest side of a sharp image (its held-back band must still hold a validation crop).
MIN_SHARP_SIDE = 64

#: Share of each image's width held back as validation crop when there are too few images.
HOLDOUT_BAND = 0.25


class CalibrationSettings(BaseModel):
    """Everything a calibration run needs except the images (CLI flags and widget fields map 1:1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="starting model: a name (see `mpt-deblur info`) or a model file path")
    optics: Acquisition
    #: Defocus magnitudes to train on, um (both signs are drawn); None = what the optics make
    #: visible (``Acquisition.visible_defocus_um``) up to a blur radius of ``max_blur_radius_px``.
    defocus_um: tuple[float, float] | None = None
    #: Largest blur radius (px) of the default range. None: 12 px (``data.optics.MAX_BLUR_RADIUS_PX``),
    #: or the starting model's own training range where that is wider (``Calibrator`` resolves it
    #: from the model's record), so calibrating a model trained on far defocus does not quietly
    #: un-train it (``mpt-tiny-fluo-wide``: 26 px).
    max_blur_radius_px: float | None = Field(None, gt=0)
    peak_photons: tuple[float, float] = (200.0, 5000.0)
    read_sigma_photons: tuple[float, float] = (1.0, 5.0)
    time_budget_minutes: float = Field(15.0, gt=0, le=7 * 24 * 60)
    #: Low: the starting model is already trained, and larger steps (2e-4, 5e-5) lowered the
    #: validation PSNR in the first 100-200 steps (docs/calibrate.md).
    lr: float = Field(2e-5, gt=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    batch_size: int = Field(4, ge=1)
    patch: int = Field(128, ge=16, description="training patch side, px (rounded up to the model's size multiple)")
    #: Random zoom of the sharp crops. Off by default: the pixel size is known exactly here, and
    #: zooming changes how big the objects are relative to the PSF.
    patch_scale: tuple[float, float] = (1.0, 1.0)
    #: Weight of the contrastive term (the paper's 1e-5: larger values grow a period-2 texture, issue 13).
    beta: float = Field(1e-5, gt=0)
    #: Weight of the Nyquist-coefficient loss, which keeps a warm start from growing a period-2
    #: pattern locked to the pixel grid (0: off, the paper's objective).
    nyquist_weight: float = Field(WARM_START_NYQUIST_WEIGHT, ge=0)
    use_bundled: bool = True
    validation_images: int = Field(4, ge=1)
    validation_crop: int = Field(256, ge=32)
    validate_every: int = Field(100, ge=1)
    #: A checkpoint replaces the best so far (at first: the starting model) only if its validation
    #: gain exceeds this many standard errors of the per-pair differences. 0 (any gain) by default:
    #: on four held-back images, gains of 0.5-0.9 standard errors were real on unseen images in two
    #: calibrations and not in a third (docs/calibrate.md), so 2 would have kept the start every
    #: time. The summary states the gain in standard errors either way.
    min_gain_se: float = Field(0.0, ge=0)
    seed: int = 0
    device: str = "auto"
    precision: Precision = "auto"
    cpu_threads: int | None = Field(None, ge=1)

    @field_validator("defocus_um", "peak_photons", "read_sigma_photons")
    @classmethod
    def _ordered(cls, value):
        if value is not None and not 0 <= value[0] <= value[1]:
            raise ValueError(f"range must be (min, max) with 0 <= min <= max, got {value}")
        return value

    def training_defocus_um(self) -> tuple[float, float]:
        if self.defocus_um is not None:
            return self.defocus_um
        if self.max_blur_radius_px is None:
            return self.optics.visible_defocus_um()
        return self.optics.visible_defocus_um(self.max_blur_radius_px)

    def for_start_model(self, record: Any) -> CalibrationSettings:
        """These settings with the default range widened to ``record``'s training range where that
        is wider than 12 px and neither the range nor its radius was given."""
        trained = record.trained_blur_radius_px()
        if self.defocus_um is not None or self.max_blur_radius_px is not None or trained is None:
            return self
        return self.model_copy(update={"max_blur_radius_px": trained}) if trained > MAX_BLUR_RADIUS_PX else self

    def validation_defocus_um(self) -> list[float]:
        """Four defocus values spread over the range (at 1/8, 3/8, 5/8, 7/8 of it), um."""
        low, high = self.training_defocus_um()
        return [round(low + (high - low) * f, 2) for f in (0.125, 0.375, 0.625, 0.875)]

    def validation_photons(self) -> tuple[float, float]:
        """(peak photons, read noise) of the validation pairs: the middle of the training ranges."""
        p, r = self.peak_photons, self.read_sigma_photons
        return float(math.sqrt(p[0] * p[1])), float((r[0] + r[1]) / 2)


@dataclass
class SharpSet:
    """Sharp 2D images with names: what a calibration trains and validates on."""

    images: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, image: np.ndarray, name: str) -> None:
        """Add a 2D image, or the best-focus plane of a (Z, Y, X) stack (noted)."""
        arr = np.squeeze(np.asarray(image))
        if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
            plane = D.best_focus_plane(arr)
            self.notes.append(f"{name}: z-stack of {arr.shape[0]} planes, best-focus plane {plane} used as sharp image")
            arr, name = arr[plane], f"{name}[z={plane}]"
        image = D.as_2d(arr, name)
        if min(image.shape) < MIN_SHARP_SIDE:
            raise ValueError(f"sharp image {name} is {image.shape[0]} x {image.shape[1]} px; calibration needs sharp "
                             f"images of at least {MIN_SHARP_SIDE} px on each side")
        self.images.append(image)
        self.names.append(name)


def bundled_sharp() -> SharpSet:
    """The sharp images that ship with the package (``sample_data/calibration_sharp``)."""
    out = SharpSet()
    for image, name in zip(*D.load_images(BUNDLED_SHARP_DIR)):
        out.add(image, f"bundled/{name}")
    return out


def _image_files(path: Path) -> list[Path]:
    """A zarr store or image file as itself, a folder as its image files."""
    from ..io.images import is_zarr_path

    return D.list_images(path) if path.is_dir() and not is_zarr_path(path) else [path]


def _read_whole(path: Path) -> np.ndarray:
    from ..io.images import is_zarr_path, read_array, read_image

    return np.asarray(read_image(path).data) if is_zarr_path(path) else read_array(path)


def read_sharp(paths: Sequence[str | os.PathLike], names: Sequence[str] | str | None = None) -> SharpSet:
    """Sharp images from files, folders and zarr stores; a folder may be limited to ``names`` (file
    stems, or a split name of ``data.splits`` such as ``u2os_train_and_val``). Z-stacks give their
    best-focus plane."""
    from ..data.splits import split_names
    from ..io.images import is_zarr_path

    out = SharpSet()
    for path in map(Path, paths):
        if path.is_dir() and not is_zarr_path(path):
            files = D.list_images(path)
            if names is not None:
                wanted = split_names(names, [f.stem for f in files]) if isinstance(names, str) else list(names)
                missing = sorted(set(wanted) - {f.stem for f in files})
                if missing:
                    raise ValueError(f"{path}: no image named {', '.join(missing[:5])}")
                files = [f for f in files if f.stem in set(wanted)]
        else:
            files = [path]
        for f in files:
            out.add(_read_whole(f), f.stem)
    return out


def split_validation(sharp: SharpSet, count: int, seed: int) -> tuple[SharpSet, SharpSet]:
    """(training, validation) images. Many images: every held-back image is whole (one in eight,
    at most ``count``, chosen by ``seed``). Few: the right-hand band (:data:`HOLDOUT_BAND` of the
    width) of up to ``count`` images is held back and the rest of each image trains."""
    n = len(sharp.images)
    if n == 0:
        raise ValueError("calibration needs sharp images: give --sharp or keep the bundled set")
    train, val = SharpSet(notes=list(sharp.notes)), SharpSet()
    if n >= MIN_IMAGES_FOR_WHOLE_HOLDOUT:
        k = min(count, n // MIN_IMAGES_FOR_WHOLE_HOLDOUT)
        held = set(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())
        for i, (img, name) in enumerate(zip(sharp.images, sharp.names)):
            (val if i in held else train).images.append(img)
            (val if i in held else train).names.append(name)
        return train, val
    for i, (img, name) in enumerate(zip(sharp.images, sharp.names)):
        cut = int(round(img.shape[1] * (1 - HOLDOUT_BAND))) if i < count else img.shape[1]
        train.images.append(img[:, :cut])
        train.names.append(name)
        if cut < img.shape[1]:
            val.images.append(img[:, cut:])
            val.names.append(f"{name}[x>={cut}]")
    return train, val


def _content_key(image: np.ndarray) -> str:
    import hashlib

    a = np.ascontiguousarray(image)
    return hashlib.sha1(a.tobytes() + str((a.shape, a.dtype)).encode()).hexdigest()


@dataclass
class CalibrationResult:
    steps_done: int
    stopped: bool
    start_validation: dict[str, float] | None
    best: dict[str, float] | None
    history: list[dict[str, Any]]


class Calibrator(TrainerJob):
    """One calibration run (use :meth:`steps` for a live view, or :meth:`run`, then :meth:`save`)."""

    def __init__(self, settings: CalibrationSettings, sharp: SharpSet | None = None,
                 unlabeled: Sequence[np.ndarray] = (), *, work_dir: str | os.PathLike,
                 resume: bool = False, optics_sources: dict[str, str] | None = None) -> None:
        from ..data.datasets import PatchConfig
        from ..models.registry import load_model

        self.optics_sources = dict(optics_sources or {})
        loaded = load_model(settings.model, "cpu")
        self.settings = s = settings.for_start_model(loaded.record)
        self.base_name, self.base_sha = loaded.record.name, loaded.record.weights_sha256
        self.normalisation = loaded.record.normalisation
        self.ensemble_defaults = loaded.record.ensemble_defaults()  # the base's inference defaults carry over
        net = loaded.model
        if getattr(net.config, "in_channels", 1) != 1:
            raise ValueError(f"calibration synthesises single-channel pairs; {self.base_name} takes "
                             f"{net.config.in_channels} channels")
        multiple = getattr(net.config, "size_multiple", 1)
        patch = int(math.ceil(s.patch / multiple) * multiple)

        images = SharpSet()
        seen: set[str] = set()
        for part in ([sharp] if sharp is not None else []) + ([bundled_sharp()] if s.use_bundled else []):
            images.notes += part.notes
            for img, name in zip(part.images, part.names):
                key = _content_key(img)
                if key not in seen:  # a bundled image the user also gave would leak into validation
                    seen.add(key)
                    images.images.append(img)
                    images.names.append(name)
        train, val = split_validation(images, s.validation_images, s.seed)
        self.sharp_notes = images.notes
        self.train_names, self.val_names = train.names, val.names

        draws = s.optics.defocus_range(s.training_defocus_um(), s.peak_photons, s.read_sigma_photons)
        draws = draws.model_copy(update={"max_kernel": CALIBRATION_MAX_KERNEL})
        patch_cfg = PatchConfig(size=patch, normalisation=self.normalisation, scale=s.patch_scale)
        train_data = D.SyntheticPatches(train.images, patch_cfg, draws, seed=s.seed, names=train.names)
        unlabeled = [D.as_2d(im, f"unlabeled image {i}") for i, im in enumerate(unlabeled)]
        extra = D.UnlabeledPatches(unlabeled, patch_cfg, seed=s.seed + 1) if unlabeled else None
        peak, read = s.validation_photons()
        o = s.optics
        val_pairs = D.synthetic_validation_pairs(val.images, val.names, s.validation_defocus_um(), o, "scalar",
                                                 peak, read, crop=s.validation_crop, seed=s.seed)
        self.config = TrainConfig(
            name=f"calibrate-{self.base_name}",
            out_dir=Path(work_dir),
            seed=s.seed,
            model=ModelChoice(init=s.model),
            data=[ArraysSource(description=f"synthetic pairs at {o.label()} from {len(train.names)} sharp images",
                               count=len(train.names))],
            unlabeled=[ArraysSource(description="the user's blurry images", count=len(unlabeled))] if unlabeled else None,
            patch=patch_cfg,
            batch_size=s.batch_size,
            steps=1_000_000,
            efcr=EFCRConfig(beta=s.beta, extended=bool(unlabeled), extended_grad=bool(unlabeled),
                            nyquist_weight=s.nyquist_weight),
            optim=OptimConfig(lr=s.lr, lr_min=min(s.lr, 1e-6), warmup_steps=s.warmup_steps),
            precision=s.precision,
            device=s.device,
            validation=ValidationConfig(
                data=ArraysValidation(description=f"{len(val.names)} held-back sharp images at "
                                                  f"{s.validation_defocus_um()} um", count=len(val_pairs)),
                every=s.validate_every, crop=s.validation_crop, min_gain_se=s.min_gain_se),
            checkpoint_every=s.validate_every,
            time_budget_minutes=s.time_budget_minutes,
            progress=False,
            cpu_threads=s.cpu_threads,
        )
        self.trainer = Trainer(self.config, resume=resume, model=net, train_data=train_data, extra_data=extra,
                               extra_labeled=False, val_pairs=val_pairs)
        self.trainer.provenance = {"init": "calibrated from", "init_name": self.base_name, "init_sha256": self.base_sha}
        self.start_validation: dict[str, float] | None = None
        if self.trainer.step == 0:
            # The starting model's score: what the calibration has to beat. Counted in the budget.
            self.start_validation = self.trainer.validate()
            # The starting weights are the first candidate for "best": a calibration that does not
            # improve on them within its budget hands them back instead of something worse.
            if self.start_validation is not None:
                self.trainer.save_checkpoint(self.start_validation)
        else:  # resumed: the start's score is the first row of the validation log
            import csv

            rows = list(csv.DictReader((self.trainer.out_dir / "val.csv").open(encoding="utf-8")))
            if rows and int(float(rows[0]["step"])) == 0:
                self.start_validation = {k: float(v) for k, v in rows[0].items() if v != ""}
        self.unlabeled_count = len(unlabeled)

    def run(self, callback: Callable[[StepRecord], Any] | None = None,
            should_stop: Callable[[], bool] | None = None) -> CalibrationResult:
        self.trainer.drive(callback, should_stop)
        self.trainer.finish()
        return CalibrationResult(self.trainer.step, self.trainer.stopped, self.start_validation,
                                 self.trainer.best, self.trainer.history)

    def verdict(self) -> str:
        """One line on what the calibration achieved on its held-back validation: the best score,
        its gain over the start and how far that gain stands above the validation's noise (in
        standard errors of the per-pair differences), or that the start was kept."""
        from .network import gain_standard_errors

        best, start = self.trainer.best, self.start_validation
        if best is None:
            return "no validation ran"
        text = f"best validation PSNR {best['psnr']:.2f} dB at step {best['step']}"
        if start is None or int(best["step"]) == 0:
            return text + " (the starting model: no checkpoint beat it; the saved model has its weights)"
        text += f", {best['psnr'] - start['psnr']:+.2f} dB over the start"
        z = gain_standard_errors(best, start)
        if z is not None:
            n = len(best["psnr_pairs"])
            text += f" ({z:.1f} standard errors of its {n} per-pair differences"
            text += "; under 2: the held-back images cannot tell it from noise)" if z < 2 else ")"
        return text

    def record(self) -> dict[str, Any]:
        """What the saved model's ``training["calibration"]`` holds."""
        return {
            "settings": self.settings.model_dump(mode="json"),
            "optics_sources": self.optics_sources,
            "training_defocus_um": list(self.settings.training_defocus_um()),
            "validation_defocus_um": self.settings.validation_defocus_um(),
            "from_model": {"name": self.base_name, "sha256": self.base_sha},
            "sharp_images": {"train": len(self.train_names), "validation": self.val_names,
                             "bundled": self.settings.use_bundled, "notes": self.sharp_notes},
            "unlabeled_images": self.unlabeled_count,
            "start_validation": self.start_validation,
        }

    def save(self, out: str | os.PathLike, description: str = "") -> Path:
        """Save the best validated weights (or the last, if no validation ran) as a model NAME
        (user model folder) or file path; never overwrites, refuses shipped names."""
        from ..models.registry import load_model, model_paths, model_save_target, save_model
        from . import checkpoint as C

        target = model_save_target(out)
        which = "best" if C.pointer(self.trainer.ckpt_dir, "best") is not None else "last"
        ptr = C.pointer(self.trainer.ckpt_dir, which)
        if ptr is None:
            raise RuntimeError("the calibration has not run a step yet: nothing to save")
        net = load_model(self.trainer.ckpt_dir / ptr["folder"] / "model.json", "cpu").model
        training = self.trainer._training_record()
        training.update(calibration=self.record(), exported_from={"checkpoint": which, "step": int(ptr["step"])})
        weights, _ = model_paths(target)
        best = self.trainer.best
        score = f"; validation PSNR {best['psnr']:.2f} dB (input {best['input_psnr']:.2f})" if best else ""
        return save_model(net, weights, name=Path(weights).stem,
                          description=description or f"{self.base_name} calibrated to {self.settings.optics.label()}{score}",
                          normalisation=self.normalisation, training=training, trained=True,
                          optics=self.settings.optics, **self.ensemble_defaults)


def resolve_optics(given: dict[str, float | None], files: Sequence[str | os.PathLike] = ()
                   ) -> tuple[Acquisition, dict[str, str]]:
    """The microscope from the values ``given`` (command line or widget; None = not given) and,
    for the missing ones, the metadata of ``files`` (OME-TIFF, OME-Zarr, ImageJ TIFF). Returns the
    optics and, per field, where its value came from. A dry objective is assumed when the NA is
    below 1 and nothing states the immersion (said so in the sources)."""
    values: dict[str, float] = {}
    sources: dict[str, str] = {}
    for key, value in given.items():
        if value is not None:
            values[key], sources[key] = float(value), "given"
    missing = [k for k in OPTICS_FLAGS if k not in values]
    if missing and files:
        from ..io.optics_metadata import optics_from_files

        for key, found in optics_from_files(files).items():
            if key in missing:
                values[key], sources[key] = found.value, found.source
    wavelength = values.get("wavelength_um")
    if wavelength is not None and wavelength > 2.0:
        raise ValueError(f"--wavelength {wavelength:g}: the emission wavelength is in micrometres (e.g. 0.461 for "
                         "461 nm)")
    if "immersion_index" not in values and values.get("na", 2.0) < 1.0:
        values["immersion_index"], sources["immersion_index"] = 1.0, "assumed: air (NA below 1, no immersion given)"
    missing = [k for k in OPTICS_FLAGS if k not in values]
    if missing:
        where = " or in the metadata of the given images" if files else ""
        raise ValueError(f"calibration needs the microscope's {', '.join(OPTICS_FLAGS[k] for k in missing)}: "
                         f"not given on the command line{where}")
    return Acquisition(**values), sources


def read_unlabeled(paths: Sequence[str | os.PathLike]) -> list[np.ndarray]:
    """Blurry 2D images from files, folders and zarr stores; every plane of a (Z, Y, X) stack is
    one image."""
    out: list[np.ndarray] = []
    for path in map(Path, paths):
        for f in _image_files(path):
            arr = np.squeeze(_read_whole(f))
            planes = list(arr) if arr.ndim == 3 and arr.shape[-1] not in (3, 4) else [arr]
            out += [D.as_2d(p, f.name) for p in planes]
    return out
