"""Where training and validation data come from: the typed data sources of a training config.

These are the ``data``, ``extra_pairs``, ``unlabeled`` and ``validation.data`` entries of a
:class:`napari_mpt_deblur.training.config.TrainConfig` (which re-exports them); the datasets they
describe are built by :mod:`napari_mpt_deblur.data.builders`. Every model is ``extra="forbid"``:
a misspelt field is an error that names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .optics import BENCHMARK_OPTICS, Acquisition, fold_optics
from .synthesis import ChannelWavelengths, DefocusRange


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


SplitName = Literal["u2os_train", "u2os_train_and_val", "u2os_test", "dsb_fluo_train", "dsb_fluo_test",
                    "dsb_rgb_train", "dsb_rgb_test"]


class SyntheticSource(_Strict):
    """Synthetic defocus pairs made on the fly from a folder of sharp images."""

    kind: Literal["synthetic"] = "synthetic"
    sharp: Path
    #: Only these file stems, or one of the project's named splits (``data.splits``): ``u2os_train``,
    #: ``u2os_train_and_val``, ``u2os_test``, ``dsb_fluo_train`` / ``_test`` (dsb2018_extra/fluorescence,
    #: 10% held out), ``dsb_rgb_train`` / ``_test`` (dsb2018_extra/histology_rgb).
    names: list[str] | SplitName | None = None
    exclude: list[str] = Field(default_factory=list, description="skip files whose stem contains any of these")
    labels: Path | None = Field(None, description="folder of label images (same names) for per-object depth")
    per_object_prob: float = Field(0.0, ge=0, le=1, description="share of samples with per-object defocus")
    defocus: DefocusRange = Field(default_factory=DefocusRange)


class PairedFolderSource(_Strict):
    """Blurred and sharp folders with matching file names."""

    kind: Literal["paired_folders"] = "paired_folders"
    blurred: Path
    sharp: Path
    match: str | None = Field(None, description="regex whose first group is the matching key (default: file stem)")
    exclude: list[str] = Field(default_factory=list)


class PlaneFolderSource(_Strict):
    """BBBC006-style plane folders ``z_00 ... z_32``: each plane vs the in-focus one."""

    kind: Literal["plane_folders"] = "plane_folders"
    root: Path
    in_focus: int = 16
    planes: list[int] | None = None
    match: str | None = None
    exclude: list[str] = Field(default_factory=list)


class ZStackSource(_Strict):
    """One z-stack file: each plane vs the best-focus plane (found by LoG variance if not given)."""

    kind: Literal["zstack"] = "zstack"
    path: Path
    focus_plane: int | None = None
    max_distance: int | None = Field(None, ge=1)


class UnlabeledSource(_Strict):
    """Unlabeled (blurry) images for EFCRex."""

    kind: Literal["unlabeled"] = "unlabeled"
    folder: Path
    names: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)


class ArraysSource(_Strict):
    """Images handed over in memory (fine-tuning from napari layers); recorded for provenance.
    A config file cannot load them: pass the data to ``Trainer(train_data=..., extra_data=...)``."""

    kind: Literal["arrays"] = "arrays"
    description: str = ""
    count: int = Field(0, ge=0)


PairedSource = Annotated[
    SyntheticSource | PairedFolderSource | PlaneFolderSource | ZStackSource | ArraysSource,
    Field(discriminator="kind"),
]


class SyntheticValidation(_Strict):
    """Fixed synthetic validation pairs with the benchmark's settings (docs/benchmarks.md): the
    microscope ``optics`` (default: 20x/0.45 air, 0.461 um emission, 0.645 um pixels) at each of
    ``defocus_um``, Poisson-Gaussian noise. The flat keys ``na``, ``wavelength_um``, ``pixel_um``,
    ``immersion_index`` of older configs are read into ``optics``."""

    kind: Literal["synthetic"] = "synthetic"
    sharp: Path
    names: list[str] | SplitName | None = None
    max_images: int | None = Field(4, ge=1)
    defocus_um: list[float] = Field(default_factory=lambda: [4.0, 8.0])
    optics: Acquisition = BENCHMARK_OPTICS
    psf_model: Literal["scalar", "vectorial", "gibson_lanni", "pupil"] = "scalar"
    peak_photons: float | None = 1000.0
    read_sigma_photons: float = 3.0
    #: Multi-channel (RGB) validation: the wavelength each channel is blurred at, um (e.g.
    #: ``data.optics.RGB_WAVELENGTHS_UM``); ``optics.wavelength_um`` is then unused.
    channel_wavelengths_um: ChannelWavelengths | None = None

    @model_validator(mode="before")
    @classmethod
    def _flat_optics(cls, data: Any) -> Any:
        return fold_optics(data)


class PairedValidation(_Strict):
    kind: Literal["paired"] = "paired"
    source: PairedSource
    max_images: int | None = Field(8, ge=1)


class ArraysValidation(_Strict):
    """Validation pairs handed over in memory (a calibration's held-back crops); recorded for
    provenance. A config file cannot load them: pass ``Trainer(val_pairs=...)``."""

    kind: Literal["arrays"] = "arrays"
    description: str = ""
    count: int = Field(0, ge=0)


__all__ = [
    "ArraysSource", "ArraysValidation", "PairedFolderSource", "PairedSource", "PairedValidation", "PlaneFolderSource",
    "SplitName", "SyntheticSource", "SyntheticValidation", "UnlabeledSource", "ZStackSource",
]
