"""The JSON record of a model file, read and validated without torch.

A model file is a pair ``<stem>.safetensors`` (weights) and ``<stem>.json`` (a
:class:`ModelRecord`). The record type and its reader live here, apart from
:mod:`napari_mpt_deblur.models.registry` (which builds, saves and loads networks and imports
torch), so that importers of packaged models (:mod:`napari_mpt_deblur.io.bioimageio_package`) and
light front-end code can check a record without loading the networks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .._version import __version__
from ..data.normalisation import NormalisationConfig
from ..data.optics import Acquisition
from ..inference.settings import OrientationCount, ShiftCount
from .config import ArchConfig

#: Version of the record format; a newer record is refused with a message to upgrade.
#: 2: ``orientations`` (older packages would reject the field with a bare validation error).
#: 3: ``shifts``.
FORMAT_VERSION = 3


class ModelFileError(ValueError):
    """A model file is missing, corrupt, or does not match its configuration."""


class ModelRecord(BaseModel):
    """Everything about a saved model except its weights (the ``.json`` beside them)."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str
    description: str = ""
    architecture: ArchConfig
    normalisation: NormalisationConfig = Field(default_factory=NormalisationConfig)
    package_version: str = __version__
    weights_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    weights_sha256: str = ""
    trained: bool = True
    #: Provenance: data, settings, steps, hardware, wall time, validation metrics.
    training: dict[str, Any] = Field(default_factory=dict)
    #: The microscope a calibrated model was specialised to (``mpt-deblur calibrate``); None for
    #: generalist models.
    optics: Acquisition | None = None
    #: Orientations the engine averages for this model when the user does not choose
    #: (``InferenceSettings.orientations=None``); None: one pass. Set where one pass leaves a
    #: grid-locked pattern: the shipped MPT (4; its Nyquist energy ratio on the demo image 7.29 in
    #: one pass, 1.31 with 4, the input's 1.07; docs/inference.md).
    orientations: OrientationCount | None = None
    #: Pixel shifts the engine averages per orientation when the user does not choose
    #: (``InferenceSettings.shifts=None``); None: one. 2 for ``mpt-tiny-fluo``, whose period-2
    #: pattern flips do not cancel (Nyquist energy ratio on the demo image 7.2 in one pass, 1.8
    #: with 2 shifts; docs/inference.md).
    shifts: ShiftCount | None = None

    def ensemble_defaults(self) -> dict[str, int | None]:
        """The inference defaults a model derived from this one (fine-tune, calibration) inherits:
        keyword arguments of :func:`~napari_mpt_deblur.models.registry.save_model`."""
        return {"orientations": self.orientations, "shifts": self.shifts}

    def trained_blur_radius_px(self) -> float | None:
        """The largest geometric blur radius (px) that the synthetic training data of this model
        drew (its training config's ``defocus.blur_radius_px``), e.g. 12 for the generalists and 26
        for ``mpt-tiny-fluo-wide``; None where the record does not say (no config, in-memory data,
        or ranges given in micrometres)."""
        config = self.training.get("config") if isinstance(self.training, dict) else None
        radii = []
        for source in (config or {}).get("data") or []:
            defocus = source.get("defocus") if isinstance(source, dict) else None
            if source.get("kind") == "synthetic" and defocus and defocus.get("blur_radius_px") and not defocus.get("defocus_um"):
                radii.append(float(defocus["blur_radius_px"][1]))
        return max(radii) if radii else None


def model_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, record) paths for a model given by its ``.safetensors``, ``.json`` or stem."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def read_record(path: str | os.PathLike) -> ModelRecord:
    """Read and validate the JSON record of a model; errors name the file and the field."""
    _, record_path = model_paths(path)
    if not record_path.is_file():
        raise ModelFileError(f"model record not found: {record_path}")
    try:
        raw = json.loads(record_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{record_path}: not valid JSON ({exc})") from exc
    if isinstance(raw, dict) and raw.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ModelFileError(
            f"{record_path}: format version {raw['format_version']} is newer than this package "
            f"understands ({FORMAT_VERSION}); upgrade napari-mpt-deblur"
        )
    try:
        return ModelRecord.model_validate(raw)
    except ValidationError as exc:
        raise ModelFileError(f"{record_path}: invalid model record:\n{exc}") from exc


__all__ = ["FORMAT_VERSION", "ModelFileError", "ModelRecord", "model_paths", "read_record"]
