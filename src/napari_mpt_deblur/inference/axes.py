"""Axes strings (moved to :mod:`napari_mpt_deblur.io.axes`, below both ``io`` and ``inference``);
re-exported here for existing imports."""

from __future__ import annotations

from ..io.axes import CHANNEL_LETTERS, AxesLayout, guess_axes, layout_for, normalise_axes

__all__ = ["CHANNEL_LETTERS", "AxesLayout", "guess_axes", "layout_for", "normalise_axes"]
