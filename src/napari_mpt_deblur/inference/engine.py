"""The inference engine's public names, kept here for existing imports.

The engine lives in four modules (see docs/architecture.md):

* :mod:`.settings`: :class:`InferenceSettings` (what a front end asks for), :class:`ResolvedSettings`
  (what ran), :func:`resolve_settings`, the device defaults;
* :mod:`.model_cache`: :func:`load_model_once` (each model file read once per process and device);
* :mod:`.restorer`: :class:`PlaneRestorer` (normalise -> tile -> forward with out-of-memory back-off
  -> blend -> denormalise), :class:`PlaneFunction` (the per-chunk dask function);
* :mod:`.drivers`: :class:`Deblurrer` (lazy, array, zarr, TIFF and cluster drivers) and :func:`engine_for`.

Use it from Python, the CLI (``mpt-deblur predict``) or a napari ``thread_worker``::

    from napari_mpt_deblur.inference import Deblurrer, InferenceSettings

    engine = Deblurrer("mpt-small-fluo", InferenceSettings(tile=256, overlap=32))
    restored = engine.deblur_plane(image)
"""

from __future__ import annotations

from .devices import is_out_of_memory
from .drivers import Deblurrer, engine_for
from .model_cache import load_model_once, model_load_count
from .restorer import PlaneFunction, PlaneRestorer, PreparedInput, TileTooLarge
from .settings import DEVICE_DEFAULTS, DeviceDefaults, InferenceSettings, Precision, ResolvedSettings, resolve_settings

__all__ = [
    "DEVICE_DEFAULTS", "Deblurrer", "DeviceDefaults", "InferenceSettings", "PlaneFunction", "PlaneRestorer",
    "Precision", "PreparedInput", "ResolvedSettings", "TileTooLarge", "engine_for", "is_out_of_memory",
    "load_model_once", "model_load_count", "resolve_settings",
]
