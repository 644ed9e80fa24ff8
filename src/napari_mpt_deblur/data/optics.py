"""One typed description of the user's microscope: objective, immersion, emission, pixel size.

:class:`Acquisition` is what a calibration run (``mpt-deblur calibrate``) specialises a model to
and what the calibrated model's record keeps (``ModelRecord.optics``). From it come the PSF at any
defocus (:meth:`Acquisition.psf_params`), the training draws (:meth:`Acquisition.defocus_range`)
and the defocus range a model should cover (:meth:`Acquisition.visible_defocus_um`).

All lengths in micrometres; ``pixel_um`` is the pixel size in the SAMPLE plane (camera pixel /
total magnification), as in OME ``PhysicalSizeX``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .psf import PSFParams
from .synthesis import DefocusRange, Objective

#: Refractive index of each immersion medium by its OME ``Immersion`` name (lower case).
IMMERSION_INDEX = {"air": 1.0, "water": 1.333, "glycerol": 1.47, "oil": 1.518, "silicone": 1.406}

#: Largest geometric blur radius (px) of the default calibration range: the blur the shipped models
#: were trained to undo (``DefocusRange.blur_radius_px``). Beyond it little detail is left to restore.
MAX_BLUR_RADIUS_PX = 12.0

#: Smallest defocus of the default range, as a fraction of the depth of field ``lambda n / NA^2``:
#: closer to focus the blur is below the noise and there is nothing to calibrate for.
MIN_DEFOCUS_DOF_FRACTION = 0.5


def fold_optics(data: Any) -> Any:
    """A settings mapping whose flat optics keys (``na``, ``wavelength_um``, ``pixel_um``,
    ``immersion_index``: configs written before :class:`Acquisition` existed) are moved into
    ``optics`` (the fields given flat override the ones in ``optics``); anything else unchanged."""
    if not isinstance(data, dict) or not any(k in data for k in OPTICS_FIELDS):
        return data
    data = dict(data)
    given = data.get("optics")
    optics = dict(given.model_dump() if isinstance(given, BaseModel) else (given or BENCHMARK_OPTICS.model_dump()))
    for key in OPTICS_FIELDS:
        if key in data:
            optics[key] = data.pop(key)
    data["optics"] = optics
    return data


def immersion_name(index: float) -> str:
    """The medium whose refractive index is nearest ``index`` ("n=1.40" when none is within 0.01)."""
    name, value = min(IMMERSION_INDEX.items(), key=lambda kv: abs(kv[1] - index))
    return name if abs(value - index) < 0.01 else f"n={index:g}"


class Acquisition(BaseModel):
    """A widefield microscope as a calibration sees it (frozen, JSON round-trip safe)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    na: float = Field(gt=0, le=1.7, description="numerical aperture of the objective")
    immersion_index: float = Field(1.0, ge=1.0, le=2.0, description="refractive index of the immersion medium")
    wavelength_um: float = Field(gt=0.2, lt=2.0, description="emission wavelength, um")
    pixel_um: float = Field(gt=0, le=20, description="pixel size in the sample plane, um")

    @model_validator(mode="after")
    def _check(self) -> Acquisition:
        if self.na >= self.immersion_index:
            raise ValueError(f"NA {self.na} must be below the immersion index {self.immersion_index} "
                             f"({immersion_name(self.immersion_index)}); an oil objective needs immersion 1.518")
        return self

    @property
    def tan_theta(self) -> float:
        """Tangent of the objective's half-angle of collection in the immersion medium."""
        return self.na / math.sqrt(self.immersion_index**2 - self.na**2)

    @property
    def depth_of_field_um(self) -> float:
        """Wave-optical depth of field, ``lambda n / NA^2`` (um)."""
        return self.wavelength_um * self.immersion_index / self.na**2

    def blur_radius_px(self, defocus_um: float) -> float:
        """Geometric radius of the defocus disc, ``|dz| tan(theta) / pixel``, in pixels."""
        return abs(defocus_um) * self.tan_theta / self.pixel_um

    def visible_defocus_um(self, max_radius_px: float = MAX_BLUR_RADIUS_PX) -> tuple[float, float]:
        """Default defocus range (um, magnitudes; both signs are drawn): from half the depth of field,
        where the blur starts to exceed the noise, to the defocus whose blur radius is
        ``max_radius_px`` pixels. E.g. 20x/0.45 air, 461 nm, 0.645 um: 1.14 to 15.4 um."""
        low = MIN_DEFOCUS_DOF_FRACTION * self.depth_of_field_um
        high = max_radius_px * self.pixel_um / self.tan_theta
        return (round(low, 3), round(max(high, 2 * low), 3))

    def psf_params(self, defocus_um: float = 0.0, model: Literal["scalar", "vectorial", "gibson_lanni", "pupil"] = "scalar") -> PSFParams:
        return PSFParams(na=self.na, wavelength_um=self.wavelength_um, immersion_index=self.immersion_index,
                         pixel_um=self.pixel_um, defocus_um=defocus_um, model=model)

    def objective(self) -> Objective:
        return Objective(name=self.label(), na=self.na, immersion_index=self.immersion_index,
                         pixel_um=(self.pixel_um, self.pixel_um))

    def defocus_range(self, defocus_um: tuple[float, float] | None = None,
                      peak_photons: tuple[float, float] | None = (200.0, 5000.0),
                      read_sigma_photons: tuple[float, float] = (1.0, 5.0)) -> DefocusRange:
        """Training draws for exactly this microscope: its objective, wavelength and pixel size;
        defocus uniform in ``defocus_um`` (default :meth:`visible_defocus_um`), both signs."""
        return DefocusRange(objectives=(self.objective(),), wavelength_um=(self.wavelength_um, self.wavelength_um),
                            defocus_um=defocus_um or self.visible_defocus_um(), both_signs=True,
                            peak_photons=peak_photons, read_sigma_photons=read_sigma_photons)

    def label(self) -> str:
        """Human-readable, e.g. ``NA 0.45 air, 461 nm, 0.645 um/px``."""
        return (f"NA {self.na:g} {immersion_name(self.immersion_index)}, {self.wavelength_um * 1000:.0f} nm, "
                f"{self.pixel_um:g} um/px")

    def slug(self) -> str:
        """For model names, e.g. ``NA0.45-air-461nm-0.645um``."""
        return (f"NA{self.na:g}-{immersion_name(self.immersion_index).replace('=', '')}-"
                f"{self.wavelength_um * 1000:.0f}nm-{self.pixel_um:g}um")


def calibrated_model_name(base: str, optics: Acquisition) -> str:
    """Default name of a model calibrated from ``base`` (a name or path) to ``optics``:
    ``<base>-cal-<optics slug>``, e.g. ``h2t-unet-fluo-cal-NA0.45-air-461nm-0.645um``."""
    from pathlib import Path

    return f"{Path(base).stem}-cal-{optics.slug()}"


#: The benchmark's microscope (docs/benchmarks.md): 20x/0.45 NA air objective, Hoechst emission
#: 0.461 um, 0.645 um pixels in the sample plane. Also the synthetic sample z-stack's optics.
BENCHMARK_OPTICS = Acquisition(na=0.45, immersion_index=1.0, wavelength_um=0.461, pixel_um=0.645)

#: Centre wavelengths (um) of a colour camera's red, green and blue channels under white light (the
#: transmission peaks of typical Bayer filters): what an RGB model's training and the RGB benchmark
#: blur each channel at. Brightfield (transmitted-light) imaging is modelled as INCOHERENT, like
#: fluorescence: an approximation (partially coherent illumination, absorption and phase make the
#: real defocus of a stained section differ, most at high condenser coherence).
RGB_WAVELENGTHS_UM = (0.61, 0.53, 0.46)

#: The fields of :class:`Acquisition`, in the order messages and flags list them.
OPTICS_FIELDS = ("na", "immersion_index", "wavelength_um", "pixel_um")


#: Command-line flag of each optics field (messages name the flag the user can pass).
OPTICS_FLAGS = {"na": "--na", "immersion_index": "--immersion", "wavelength_um": "--wavelength", "pixel_um": "--pixel"}


def parse_immersion(value: str | float) -> float:
    """A refractive index, or a medium name (``air``, ``water``, ``glycerol``, ``silicone``, ``oil``)."""
    text = str(value).strip().lower()
    if text in IMMERSION_INDEX:
        return IMMERSION_INDEX[text]
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--immersion {value!r}: give a refractive index (e.g. 1.518) or one of "
                         f"{', '.join(IMMERSION_INDEX)}") from None
