"""Widefield defocus point-spread functions from physical microscope settings (docs/training.md).

Two families of models, all normalised to unit sum (the blur keeps the image's flux):

* ``"pupil"``: our own scalar Fourier-optics model (numpy/scipy only). The pupil is a disc of
  radius NA / lambda in spatial frequency with the exact (non-paraxial) defocus phase
  ``2 pi dz (sqrt((n / lambda)^2 - k^2) - n / lambda)``; the amplitude PSF is its Fourier transform,
  computed as a Hankel transform (the pupil is radially symmetric) on a grid ``oversample`` times
  finer than the camera pixels, and the intensity is integrated over each camera pixel (box sum).
* ``"scalar"`` / ``"gibson_lanni"`` and ``"vectorial"``: the Gibson-Lanni scalar model and the
  Aguet vectorial model of ``psfmodels`` (both integrate over pixels too). With the default
  ``sample_index=None`` and ``source_depth_um=0`` the system is index-matched and the only
  aberration is the defocus itself; ``"gibson_lanni"`` is the same ``psfmodels`` scalar model
  (named for users who think of it that way) and is the one to use with a point source at
  ``source_depth_um`` inside a sample of another refractive index (spherical aberration).

Units: micrometres for lengths (``pixel_um`` is the pixel size in the SAMPLE plane, i.e. camera
pixel / magnification); ``defocus_um`` is the distance between the focal plane and the object.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Energy fraction that an automatically sized kernel keeps (``size=None``).
AUTO_ENERGY = 0.999
#: Largest automatic kernel side; pass ``size`` explicitly for finer sampling than this allows.
MAX_AUTO_SIZE = 1025


class PSFParams(BaseModel):
    """Physical settings of a widefield defocus PSF. Lengths in micrometres."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    na: float = Field(0.45, gt=0, le=1.7, description="numerical aperture of the objective")
    wavelength_um: float = Field(0.461, gt=0.1, lt=2.0, description="emission wavelength in um")
    immersion_index: float = Field(1.0, ge=1.0, le=2.0, description="refractive index of the immersion medium")
    pixel_um: float = Field(0.645, gt=0, le=20, description="pixel size in the sample plane, um")
    defocus_um: float = Field(0.0, ge=-500, le=500, description="focal plane minus object position, um")
    model: Literal["scalar", "vectorial", "gibson_lanni", "pupil"] = "scalar"
    size: int | None = Field(None, ge=3, le=4097, description="odd kernel side in pixels; None = automatic")
    #: Only for the psfmodels models: refractive index of the sample (None = immersion index).
    sample_index: float | None = Field(None, ge=1.0, le=2.0)
    #: Only for the psfmodels models: depth of the point source below the coverslip, um.
    source_depth_um: float = Field(0.0, ge=0.0, le=500)

    @model_validator(mode="after")
    def _check(self) -> PSFParams:
        if self.na >= self.immersion_index:
            raise ValueError(
                f"na: numerical aperture {self.na} must be below the immersion index {self.immersion_index}"
            )
        if self.size is not None and self.size % 2 == 0:
            raise ValueError(f"size: kernel side must be odd so the PSF has a centre pixel, got {self.size}")
        return self


def geometric_blur_radius_um(params: PSFParams) -> float:
    """Radius of the geometric-optics defocus disc: ``|dz| tan(theta_max)``, in um."""
    n, na = params.immersion_index, params.na
    return abs(params.defocus_um) * na / math.sqrt(n * n - na * na)


def airy_first_zero_um(params: PSFParams) -> float:
    """Radius of the first dark ring of the in-focus PSF, ``0.61 lambda / NA``, in um."""
    return 0.6098 * params.wavelength_um / params.na


def auto_size(params: PSFParams, energy: float = AUTO_ENERGY) -> int:
    """Odd kernel side (pixels) that holds ``energy`` of the PSF's total energy.

    A hard-edged pupil gives every PSF, focused or not, a diffraction tail whose encircled energy
    outside radius r falls as ``lambda / (pi^2 NA r)`` (the asymptote of the Airy pattern's
    ``1 - EE``), so the tail, not the defocus disc, sets the size: the radius is the geometric disc
    plus that tail radius. Capped at :data:`MAX_AUTO_SIZE`.
    """
    tail_um = params.wavelength_um / (math.pi**2 * params.na * (1.0 - energy))
    half = math.ceil((geometric_blur_radius_um(params) + tail_um) / params.pixel_um)
    return int(min(2 * half + 1, MAX_AUTO_SIZE))


def kernel_size(params: PSFParams) -> int:
    return params.size if params.size is not None else auto_size(params)


def _oversample(params: PSFParams) -> int:
    """Odd sub-pixel factor so the fine grid samples the intensity band (2 NA / lambda) at Nyquist."""
    nyquist_um = params.wavelength_um / (4.0 * params.na)
    factor = max(3, math.ceil(params.pixel_um / nyquist_um))
    return factor if factor % 2 else factor + 1


@lru_cache(maxsize=16)
def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy.special import roots_legendre

    return roots_legendre(n)


def _radial_amplitude(params: PSFParams, radii_um: np.ndarray) -> np.ndarray:
    """Complex amplitude of the defocused circular pupil at radii ``radii_um`` (1D).

    A circular pupil with a defocus phase is radially symmetric, so its 2D Fourier transform is
    the Hankel transform ``2 pi int_0^kc exp(i phi(k)) J0(2 pi k r) k dk``, evaluated here by
    Gauss-Legendre quadrature with enough nodes for every oscillation of the integrand (the
    Bessel function's ``kc * r_max`` cycles plus the defocus phase's cycles across the pupil).
    Unlike an FFT of a pixelated pupil this has no wrap-around of the diffraction tail and no
    jagged pupil edge, at any pixel size.
    """
    from scipy.special import j0

    kc = params.na / params.wavelength_um
    k_medium = params.immersion_index / params.wavelength_um
    phase_cycles = abs(params.defocus_um) * (k_medium - math.sqrt(k_medium**2 - kc**2))
    cycles = kc * float(radii_um.max(initial=0.0)) + phase_cycles
    nodes, weights = _gauss_legendre(64 * math.ceil((8 * math.ceil(cycles) + 128) / 64))
    k = 0.5 * kc * (nodes + 1.0)
    w = 0.5 * kc * weights
    kz = np.sqrt(k_medium**2 - k**2) - k_medium
    integrand = np.exp(2j * np.pi * params.defocus_um * kz) * (2.0 * np.pi * k * w)
    amplitude = np.empty(radii_um.shape, dtype=np.complex128)
    for start in range(0, radii_um.size, 512):  # bounded memory: 512 radii x nodes at a time
        r = radii_um[start : start + 512]
        amplitude[start : start + 512] = j0(2.0 * np.pi * np.outer(r, k)) @ integrand
    return amplitude


def pupil_psf(params: PSFParams) -> np.ndarray:
    """Scalar Fourier-optics defocus PSF, (size, size) float64, centred, unit sum.

    The intensity ``|amplitude(r)|^2`` is tabulated on a radial grid a quarter of a sub-pixel
    apart, interpolated onto a grid ``oversample`` times finer than the camera pixels, and
    box-summed over each pixel (the camera integrates over its pixel area).
    """
    size = kernel_size(params)
    os_ = _oversample(params)
    n_fine = size * os_
    d_fine = params.pixel_um / os_
    coords = (np.arange(n_fine) - (n_fine - 1) / 2.0) * d_fine
    r_fine = np.hypot(coords[:, None], coords[None, :])
    step = d_fine / 4.0
    radii = np.arange(0.0, float(r_fine.max()) + 2 * step, step)
    amplitude = _radial_amplitude(params, radii)
    intensity_r = amplitude.real**2 + amplitude.imag**2
    intensity = np.interp(r_fine.ravel(), radii, intensity_r).reshape(n_fine, n_fine)
    kernel = intensity.reshape(size, os_, size, os_).sum(axis=(1, 3))
    return kernel / kernel.sum()


def _psfmodels_psf(params: PSFParams) -> np.ndarray:
    import psfmodels

    size = kernel_size(params)
    n = params.immersion_index
    ns = n if params.sample_index is None else params.sample_index
    model = "vectorial" if params.model == "vectorial" else "scalar"
    # z must be a LIST of defocus values in um: a bare number is read as a count of planes.
    stack = psfmodels.make_psf(
        [float(params.defocus_um)], size, dxy=params.pixel_um, NA=params.na, wvl=params.wavelength_um,
        ns=ns, ni=n, ni0=n, pz=params.source_depth_um, model=model,
    )
    kernel = np.asarray(stack[0], dtype=np.float64)
    total = kernel.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"psfmodels returned an invalid PSF for {params.model_dump()}")
    # psfmodels scales the peak to 1 (normalize=True): unit SUM is what keeps flux.
    return kernel / total


@lru_cache(maxsize=64)
def _cached(params: PSFParams) -> np.ndarray:
    kernel = pupil_psf(params) if params.model == "pupil" else _psfmodels_psf(params)
    kernel.setflags(write=False)
    return kernel


def defocus_psf(params: PSFParams) -> np.ndarray:
    """The defocus PSF for ``params``: 2D float64 (size, size), centred, sums to 1.

    Results are cached per parameter set (the params are frozen); a fresh writable copy is
    returned each time.
    """
    return _cached(params).copy()


def encircled_energy_diameter_px(kernel: np.ndarray, fraction: float = 0.5) -> float:
    """Width of a PSF as the diameter (pixels) of the centred disc holding ``fraction`` of its
    energy (robust for the ring-shaped defocused PSFs, where the half-maximum width is ill defined)."""
    k = np.asarray(kernel, dtype=np.float64)
    c = (np.array(k.shape) - 1) / 2.0
    yy, xx = np.indices(k.shape)
    r = np.hypot(yy - c[0], xx - c[1]).ravel()
    order = np.argsort(r)
    cum = np.cumsum(k.ravel()[order]) / k.sum()
    return float(2.0 * np.interp(fraction, cum, r[order]))
