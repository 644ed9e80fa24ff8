"""Synthetic defocus: PSF blur, Poisson-Gaussian camera noise, and mask-based depth synthesis.

All functions take and return images in [0, 1]-like float units (a sharp image normalised by its
0.1 / 99.9 percentiles, docs/benchmarks.md). A plain Gaussian blur is never the training degradation:
it is only the EFCR reblur (``losses.efcr``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .psf import PSFParams, defocus_psf

RngLike = np.random.Generator | int | None
#: The wavelength (um) each channel of a multi-channel (colour) image is seen at, e.g.
#: ``data.optics.RGB_WAVELENGTHS_UM``; one type for training, validation and the benchmark.
ChannelWavelengths = Annotated[tuple[Annotated[float, Field(gt=0.2, lt=2.0)], ...], Field(min_length=2, max_length=16)]
#: Per-object depth synthesis in training: the background's defocus and three object depths.
DEPTH_LEVELS = 4


def _rng(rng: RngLike) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def blur(image: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """Convolve the last two axes of ``image`` (..., H, W) with ``psf`` (kh, kw) by FFT.

    The image is reflect-padded by the kernel's half size (mirror without repeating the edge
    pixel), so the borders see plausible neighbours instead of zeros or the opposite edge; the
    output has the image's shape. float64 in -> float64 out, anything else -> float32.
    """
    from scipy.signal import fftconvolve

    img = np.asarray(image)
    kernel = np.asarray(psf, dtype=np.float64)
    if img.ndim < 2:
        raise ValueError(f"blur needs an image with at least 2 dimensions, got shape {img.shape}")
    if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        raise ValueError(f"psf must be a 2D kernel with odd sides, got shape {kernel.shape}")
    out_dtype = np.float64 if img.dtype == np.float64 else np.float32
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    pad = [(0, 0)] * (img.ndim - 2) + [(ph, ph), (pw, pw)]
    padded = np.pad(img.astype(np.float64, copy=False), pad, mode="reflect")
    k = kernel.reshape((1,) * (img.ndim - 2) + kernel.shape)
    out = fftconvolve(padded, k, mode="valid", axes=(-2, -1))
    return out.astype(out_dtype, copy=False)


def add_camera_noise(
    image01: np.ndarray,
    peak_photons: float = 1000.0,
    read_sigma_photons: float = 3.0,
    rng: RngLike = None,
) -> np.ndarray:
    """Poisson shot noise plus Gaussian read noise, in the input's units, as float32.

    ``image01 * peak_photons`` is the expected photon count (negative values count as 0); the
    result is ``(Poisson(counts) + N(0, read_sigma_photons)) / peak_photons``. So 1.0 in the input
    means ``peak_photons`` photons, and the noise variance at intensity x is
    ``x / peak + (read_sigma / peak)^2``.
    """
    if peak_photons <= 0:
        raise ValueError(f"peak_photons must be positive, got {peak_photons}")
    if read_sigma_photons < 0:
        raise ValueError(f"read_sigma_photons must be >= 0, got {read_sigma_photons}")
    gen = _rng(rng)
    counts = np.clip(np.asarray(image01, dtype=np.float64), 0.0, None) * peak_photons
    noisy = gen.poisson(counts).astype(np.float64)
    if read_sigma_photons > 0:
        noisy += gen.normal(0.0, read_sigma_photons, size=noisy.shape)
    return (noisy / peak_photons).astype(np.float32)


def synthesize_defocus(
    sharp01: np.ndarray,
    params: PSFParams,
    peak_photons: float | None = 1000.0,
    read_sigma_photons: float = 3.0,
    rng: RngLike = None,
    channel_wavelengths_um: Sequence[float] | None = None,
) -> np.ndarray:
    """A defocused, noisy version of ``sharp01``: ``add_camera_noise(blur(sharp01, PSF(params)))``.

    ``peak_photons=None`` means noise-free (the blurred image as float32).
    ``channel_wavelengths_um``: ``sharp01`` is (C, H, W) and channel ``c`` is seen at
    ``channel_wavelengths_um[c]`` (the PSF of ``params`` at that wavelength, e.g. RGB); the noise
    is drawn for all channels at once.
    """
    img = np.asarray(sharp01, dtype=np.float64)
    if channel_wavelengths_um is None:
        blurred = blur(img, defocus_psf(params))
    else:
        if img.ndim != 3 or img.shape[0] != len(channel_wavelengths_um):
            n = len(channel_wavelengths_um)
            raise ValueError(f"expected a ({n}, H, W) image for {n} channel wavelengths, got shape {img.shape}")
        blurred = np.stack([blur(plane, defocus_psf(params.model_copy(update={"wavelength_um": float(w)})))
                            for plane, w in zip(img, channel_wavelengths_um)])
    if peak_photons is None:
        return blurred.astype(np.float32)
    return add_camera_noise(blurred, peak_photons, read_sigma_photons, rng)


def _smooth_weights(mask: np.ndarray, feather_px: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    weights = mask.astype(np.float64)
    return gaussian_filter(weights, feather_px, mode="reflect") if feather_px > 0 else weights


def synthesize_depth(
    sharp01: np.ndarray,
    labels: np.ndarray,
    params: PSFParams,
    defocus_by_label: Mapping[int, float],
    background_defocus_um: float | None = None,
    feather_px: float = 3.0,
    peak_photons: float | None = 1000.0,
    read_sigma_photons: float = 3.0,
    rng: RngLike = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask-based depth synthesis (the MPT paper's CaDISBlur method) for objects at several depths.

    Every labeled region gets its own defocus (``defocus_by_label[label]`` in um; labels missing
    from the mapping and the background (label 0) use ``background_defocus_um``, default
    ``params.defocus_um``). The whole image is blurred once per distinct defocus value and the
    blurred versions are composited with weights that are the region masks smoothed by a Gaussian
    of ``feather_px`` pixels and normalised to sum 1 at every pixel, so region borders blend
    smoothly instead of showing seams. Camera noise is added once, after compositing.

    Returns ``(blurred, defocus_map)``: the composite (float32, H x W) and the per-pixel defocus in
    um that each region was given (float32, unsmoothed), useful as a depth ground truth.
    """
    img = np.asarray(sharp01, dtype=np.float64)
    lab = np.asarray(labels)
    if img.ndim != 2 or lab.shape != img.shape:
        raise ValueError(f"image and labels must be 2D and the same shape, got {img.shape} and {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be an integer label image, got dtype {lab.dtype}")
    background = params.defocus_um if background_defocus_um is None else float(background_defocus_um)
    defocus_map = np.full(img.shape, background, dtype=np.float64)
    for label, dz in defocus_by_label.items():
        if label == 0:
            raise ValueError("defocus_by_label: label 0 is the background; use background_defocus_um")
        defocus_map[lab == label] = float(dz)
    values = np.unique(defocus_map)
    weights = np.stack([_smooth_weights(defocus_map == v, feather_px) for v in values])
    weights /= np.maximum(weights.sum(axis=0, keepdims=True), 1e-12)
    out = np.zeros_like(img)
    for v, w in zip(values, weights):
        out += w * blur(img, defocus_psf(params.model_copy(update={"defocus_um": float(v)})))
    if peak_photons is not None:
        out = add_camera_noise(out, peak_photons, read_sigma_photons, rng)
    return out.astype(np.float32), defocus_map.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Random microscope settings for training data


class Objective(BaseModel):
    """A widefield objective and the range of sample-plane pixel sizes it is used with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    na: float = Field(gt=0, le=1.7)
    immersion_index: float = Field(1.0, ge=1.0, le=2.0)
    pixel_um: tuple[float, float] = Field(description="(min, max) pixel size in the sample plane, um")

    @model_validator(mode="after")
    def _check(self) -> Objective:
        if self.na >= self.immersion_index:
            raise ValueError(f"objective {self.name or self.na}: NA {self.na} must be below the immersion index")
        if not 0 < self.pixel_um[0] <= self.pixel_um[1]:
            raise ValueError(f"objective {self.name or self.na}: pixel_um must be (min, max) with 0 < min <= max")
        return self


def _camera_range(magnification: float) -> tuple[float, float]:
    # 6.5 um (sCMOS) to 12.9 um (BBBC006's camera, or 2x binning) camera pixels.
    return (round(6.5 / magnification, 4), round(12.9 / magnification, 4))


#: Widefield objectives from 10x to 60x (air and oil), with typical camera pixel sizes.
WIDEFIELD_OBJECTIVES: tuple[Objective, ...] = (
    Objective(name="10x/0.30 air", na=0.30, pixel_um=_camera_range(10)),
    Objective(name="20x/0.45 air", na=0.45, pixel_um=_camera_range(20)),
    Objective(name="20x/0.75 air", na=0.75, pixel_um=_camera_range(20)),
    Objective(name="40x/0.95 air", na=0.95, pixel_um=_camera_range(40)),
    Objective(name="40x/1.30 oil", na=1.30, immersion_index=1.518, pixel_um=_camera_range(40)),
    Objective(name="60x/1.40 oil", na=1.40, immersion_index=1.518, pixel_um=_camera_range(60)),
)


class DefocusRange(BaseModel):
    """Ranges that synthetic training pairs are drawn from (one draw per sample).

    The defocus is drawn so that the geometric blur RADIUS in pixels, ``|dz| tan(theta) / pixel``,
    is uniform in ``blur_radius_px`` (so every objective and pixel size contributes blurs of every
    size the network must learn), unless ``defocus_um`` fixes a range in micrometres instead
    (e.g. to match one microscope). Noise: the peak photon count is log-uniform in
    ``peak_photons`` and the read noise uniform in ``read_sigma_photons``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    objectives: tuple[Objective, ...] = WIDEFIELD_OBJECTIVES
    wavelength_um: tuple[float, float] = (0.45, 0.62)
    blur_radius_px: tuple[float, float] = (0.5, 12.0)
    defocus_um: tuple[float, float] | None = None
    both_signs: bool = True
    model: Literal["scalar", "vectorial", "gibson_lanni", "pupil"] = "scalar"
    #: Largest PSF kernel side (odd): bigger automatic kernels are cut to it and renormalised
    #: (the far diffraction tail beyond it holds well under 1% of the energy).
    max_kernel: int = Field(129, ge=3)
    peak_photons: tuple[float, float] | None = (200.0, 5000.0)
    read_sigma_photons: tuple[float, float] = (1.0, 5.0)
    #: Multi-channel images (RGB): the centre wavelength of each channel, um. Every channel is
    #: blurred with the draw's PSF (same objective, pixel size, defocus) at its own wavelength, and
    #: ``wavelength_um`` is not drawn from. None: single-channel images at the drawn wavelength.
    channel_wavelengths_um: ChannelWavelengths | None = None

    @property
    def channels(self) -> int:
        """Channels of the images this range blurs (1 unless ``channel_wavelengths_um`` is set)."""
        return 1 if self.channel_wavelengths_um is None else len(self.channel_wavelengths_um)

    def channel_wavelengths(self, draw: OpticsDraw) -> tuple[float, ...]:
        """The wavelength each channel of a draw is blurred at, um."""
        return self.channel_wavelengths_um or (draw.wavelength_um,)

    @field_validator("wavelength_um", "blur_radius_px", "defocus_um", "peak_photons", "read_sigma_photons")
    @classmethod
    def _ordered(cls, value):
        if value is not None and not value[0] <= value[1]:
            raise ValueError(f"range must be (min, max) with min <= max, got {value}")
        return value

    @field_validator("max_kernel")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"max_kernel must be odd, got {value}")
        return value

    def draw(self, rng: np.random.Generator) -> OpticsDraw:
        """One draw of the microscope, defocus and camera (the random numbers :meth:`sample` uses)."""
        index = int(rng.integers(len(self.objectives)))
        obj = self.objectives[index]
        pixel = float(rng.uniform(*obj.pixel_um))
        wavelength = float(rng.uniform(*self.wavelength_um))
        tan_theta = obj.na / np.sqrt(obj.immersion_index**2 - obj.na**2)
        if self.defocus_um is not None:
            dz = float(rng.uniform(*self.defocus_um))
        else:
            dz = float(rng.uniform(*self.blur_radius_px)) * pixel / tan_theta
        if self.both_signs and rng.random() < 0.5:
            dz = -dz
        peak = None if self.peak_photons is None else float(np.exp(rng.uniform(*np.log(self.peak_photons))))
        read = float(rng.uniform(*self.read_sigma_photons))
        return OpticsDraw(index, wavelength, pixel, float(dz), float(abs(dz) * tan_theta / pixel), peak, read)

    def psf_params(self, draw: OpticsDraw, defocus_um: float | None = None) -> PSFParams:
        """The PSF of a draw (kernel side cut to ``max_kernel``), optionally at another defocus."""
        from .psf import auto_size

        obj = self.objectives[draw.objective]
        params = PSFParams(na=obj.na, wavelength_um=draw.wavelength_um, immersion_index=obj.immersion_index,
                           pixel_um=draw.pixel_um, defocus_um=draw.defocus_um if defocus_um is None else defocus_um,
                           model=self.model)
        return params.model_copy(update={"size": min(auto_size(params), self.max_kernel)})

    def sample(self, rng: np.random.Generator) -> tuple[PSFParams, float | None, float]:
        """One draw: ``(psf_params, peak_photons or None, read_sigma_photons)``."""
        draw = self.draw(rng)
        return self.psf_params(draw), draw.peak_photons, draw.read_sigma_photons


@dataclass(frozen=True)
class OpticsDraw:
    """One random microscope setting. Lengths in um; ``radius_px`` is the geometric blur radius."""

    objective: int
    wavelength_um: float
    pixel_um: float
    defocus_um: float
    radius_px: float
    peak_photons: float | None
    read_sigma_photons: float
