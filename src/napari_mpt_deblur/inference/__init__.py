"""Tiled, blended, lazy inference over planes and stacks (docs/inference.md).

The main entry points are re-exported lazily (so importing this package does not import torch)::

    from napari_mpt_deblur.inference import Deblurrer, InferenceSettings, Cancelled

Submodules: :mod:`.settings` (what to run with), :mod:`.model_cache` (models loaded once),
:mod:`.restorer` (one plane: normalise, tile, forward with out-of-memory back-off, blend),
:mod:`.drivers` (:class:`Deblurrer`: lazy, array, zarr, TIFF, cluster), :mod:`.batching` (the local
stack pipeline), :mod:`.distributed` (dask.distributed), :mod:`.tiling` (tile grid and blending),
:mod:`.progress` (progress and cancel), :mod:`.devices` (devices and precision), :mod:`.compiled`
(``torch.compile``); :mod:`.engine` re-exports the public names.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Deblurrer": "drivers",
    "InferenceSettings": "settings",
    "ResolvedSettings": "settings",
    "Cancelled": "progress",
    "TileProgress": "progress",
    "plan_tiles": "tiling",
    "tile_and_blend": "tiling",
    "layout_for": "axes",
    "guess_axes": "axes",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
