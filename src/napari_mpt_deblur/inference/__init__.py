"""Tiled, blended, lazy inference over planes and stacks (SPEC section 6).

The main entry points are re-exported lazily (so importing this package does not import torch)::

    from napari_mpt_deblur.inference import Deblurrer, InferenceSettings, Cancelled

Submodules: :mod:`.engine` (settings, :class:`Deblurrer`), :mod:`.tiling` (tile grid and blending),
:mod:`.axes` (axes strings), :mod:`.progress` (progress and cancel), :mod:`.distributed`
(dask.distributed), :mod:`.devices` (device choice).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Deblurrer": "engine",
    "InferenceSettings": "engine",
    "ResolvedSettings": "engine",
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
