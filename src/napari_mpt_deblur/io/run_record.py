"""The run record: how an output was made, in one schema (docs/inference.md, "The run record").

One :class:`RunRecord` per deblurring run: the model (name, file, SHA-256 of its weights,
architecture, normalisation), the resolved settings asked for and the settings in use at the end
(smaller tiles or batches after an out-of-memory fallback, with the fallback messages), the input
(shape, dtype, axes, file), software versions, timing and whether the output is complete. It is
written the same way to the napari layer's ``metadata["mpt_deblur"]``, the zarr group attribute
``mpt_deblur`` and the TIFF ImageDescription (JSON, key ``mpt_deblur``), and
:func:`~napari_mpt_deblur.io.images.read_image` gives it back as ``ImageSource.run_record``.

The JSON keeps the flat keys earlier outputs had (``model``, ``settings``, ``axes``, ``input``,
``fallbacks``, ``tile_in_use``...), so older files still parse (missing fields are ``None``).
"""

from __future__ import annotations

import platform
from typing import Any

from pydantic import BaseModel, ConfigDict

from .._version import __version__
from ..inference.settings import ResolvedSettings

#: Version of this schema (bumped when a field changes meaning).
RUN_RECORD_VERSION = 1


class ModelSummary(BaseModel):
    """The model a run used (from its record; ``path`` None for an in-memory model)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    path: str | None = None
    trained: bool = True
    weights_sha256: str = ""
    architecture: dict[str, Any] = {}
    normalisation: dict[str, Any] = {}


class InputSummary(BaseModel):
    """The input of a run: array shape and dtype in the user's axis order, and its file if any."""

    model_config = ConfigDict(extra="allow")

    shape: list[int]
    dtype: str
    path: str | None = None


class TileInUse(BaseModel):
    tile: int
    overlap: int
    batch_size: int


class RunRecord(BaseModel):
    """How an output was made (see the module docstring). Shapes are in the user's axis order."""

    # zarr outputs keep their write status (planes_done, state, ome...) next to the record.
    model_config = ConfigDict(extra="ignore")

    record_version: int = RUN_RECORD_VERSION
    software: str = "napari-mpt-deblur"
    version: str = __version__
    #: Versions of the packages that shape the numbers (napari-mpt-deblur, torch, numpy, python).
    versions: dict[str, str] = {}
    model: ModelSummary
    #: The resolved settings the run started with (device defaults filled in).
    settings: ResolvedSettings
    #: The settings in use when the run ended: a new object after each out-of-memory fallback.
    settings_in_use: ResolvedSettings | None = None
    tile_in_use: TileInUse | None = None
    fallbacks: list[str] = []
    axes: str | None = None
    axes_from: str | None = None
    #: Set when the output's axes differ from the input's (a TIFF stores Y, X planes).
    axes_note: str | None = None
    input: InputSummary | None = None
    output_dtype: str | None = None
    #: (lo, hi) of a stack-wide or fixed normalisation, or "per plane".
    normalisation_range: list[float] | str | None = None
    #: Local time the run started (ISO 8601), and its duration once it finished (zarr, layers).
    created: str | None = None
    seconds: float | None = None
    #: True once every plane is in (a TIFF appears only then; a zarr store flips it at the end).
    complete: bool = False

    def to_metadata(self) -> dict[str, Any]:
        """The JSON-ready dict stored in layer metadata, zarr attributes and TIFF descriptions."""
        return self.model_dump(mode="json")

    @classmethod
    def from_metadata(cls, meta: dict[str, Any] | None) -> RunRecord | None:
        """The record in an output's ``mpt_deblur`` metadata; None when there is none (not an
        mpt-deblur output). A malformed record raises pydantic's ``ValidationError``."""
        if not isinstance(meta, dict) or "model" not in meta or "settings" not in meta:
            return None
        return cls.model_validate(meta)


def software_versions() -> dict[str, str]:
    """Versions that shape a run's numbers: this package, torch and numpy (if imported), python."""
    import sys

    versions = {"napari-mpt-deblur": __version__, "python": platform.python_version()}
    for name in ("torch", "numpy"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = str(getattr(module, "__version__", "?"))
    return versions


def rewrite_tiff_record(path: Any, key: str, record: dict[str, Any]) -> None:
    """Replace ``key`` in the JSON ImageDescription of a TIFF's first page with ``record``.

    Why: tifffile writes the description with the first page, before the planes are restored, so
    what is only known at the end (out-of-memory fallbacks, the settings in use, the duration) is
    written in afterwards, into the not yet published temporary file."""
    import json

    import tifffile

    with tifffile.TiffFile(path) as tif:
        description = json.loads(tif.pages[0].description)
    description[key] = record
    tifffile.tiffcomment(path, json.dumps(description))
