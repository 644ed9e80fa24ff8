"""Inference settings: what a front end asks for (:class:`InferenceSettings`) and what a run used
(:class:`ResolvedSettings`).

Every front end (napari widget, CLI, benchmark, Python) builds an :class:`InferenceSettings`; the
engine resolves it against the device and the model (:func:`resolve_settings`). This module does
not import torch, so a widget can check settings on the GUI thread
(:func:`check_tile` with the model's size multiple, read from its JSON record).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

Precision = Literal["auto", "fp32", "fp16", "bf16"]
#: A tile side in pixels, as every front end accepts it (the benchmark's config reuses this type).
TileSide = Annotated[int, Field(ge=8, le=16384)]
#: Orientations averaged per tile (:mod:`.orientations`): 1 (off), 4 flips, 8 with the transposes.
OrientationCount = Literal[1, 4, 8]
ORIENTATION_COUNTS: tuple[int, ...] = get_args(OrientationCount)
#: Pixel phases averaged per orientation (:mod:`.orientations`): 1 (off) or 2 (the tile and its
#: one-pixel diagonal shift).
ShiftCount = Literal[1, 2]
SHIFT_COUNTS: tuple[int, ...] = get_args(ShiftCount)


class InferenceSettings(BaseModel):
    """What the user asks for; ``None`` means "the default for the device" (see :data:`DEVICE_DEFAULTS`).

    * ``tile``: largest tile side in pixels, a multiple of the model's size multiple.
    * ``overlap``: pixels shared by neighbouring tiles, blended with a raised-cosine ramp.
    * ``batch_size``: tiles per forward pass; ``None``: the device default on CPU/MPS, and on CUDA
      as many as fit in about half the free GPU memory (measured with one tile, at most 64).
    * ``plane_batch``: planes whose tiles may share a forward pass (small planes, e.g. 64 planes of
      520 x 696); ``None``: as many as fill one batch. Used by the local stack path (``iter_planes``).
    * ``pipeline``: read and normalise the next planes, and blend/write the previous ones, on other
      threads while the model computes (``iter_planes``). ``False`` restores plane after plane in
      the caller's thread, one plane per forward pass (the reference the batched path is tested
      against). ``None``: the device default, on for GPUs, off on CPU, where the extra threads
      compete with torch's for the cores (64 planes of 520 x 696 on 2 cores: 0.91x, docs/performance.md).
    * ``precision``: ``fp16``/``bf16`` autocast on GPUs, and ``bf16`` on CPUs with AMX or
      AVX-512 BF16; ``auto`` is bf16 on CUDA GPUs that support it, fp32 elsewhere (:func:`~napari_mpt_deblur.inference.devices.resolve_precision`).
    * ``output_dtype``: ``float32``, or ``input`` (rounded and clipped for integer inputs).
    * ``orientations``: 1, 4 or 8: restore every tile in that many orientations (its four flips;
      with 8 also those of its transpose), map back and average (:mod:`.orientations`). It cancels
      a model's grid-locked period-2 pattern and lowers the error, at 4x or 8x the time. ``None``
      (default): the model's own default, ``ModelRecord.orientations`` (4 for the shipped MPT,
      whose single pass shows a grid pattern; 1 for a model that names none).
    * ``shifts``: 1 or 2: with 2 every orientation is also restored shifted by one pixel along
      both axes and the two are averaged (:mod:`.orientations`). It cancels a period-2 pattern
      locked to the model's stride-2 grid that flips do not (``mpt-tiny-fluo``), at 2x the time.
      ``None`` (default): the model's own default, ``ModelRecord.shifts`` (1 when it names none).
    * ``normalisation_scope``: ``plane`` (default; each 2D plane scaled by its own percentiles),
      ``stack`` (one range for the whole array, from up to ~16 M sampled pixels) or ``fixed``
      (``intensity_range`` as given).
    """

    model_config = ConfigDict(extra="forbid")

    tile: TileSide | None = None
    overlap: int | None = Field(None, ge=0, le=4096)
    batch_size: int | None = Field(None, ge=1, le=256)
    device: str = "auto"
    precision: Precision = "auto"
    output_dtype: Literal["float32", "input"] = "float32"
    normalisation_scope: Literal["plane", "stack", "fixed"] = "plane"
    intensity_range: tuple[float, float] | None = None
    channels_last: bool = True
    plane_batch: int | None = Field(None, ge=1, le=1024)
    pipeline: bool | None = None
    orientations: OrientationCount | None = None
    shifts: ShiftCount | None = None
    #: ``torch.compile`` the model for the tile shape (None: the device default, see
    #: :data:`.compiled.COMPILE_DEFAULTS`); falls back to eager with a warning when it fails.
    compile: bool | None = None

    @model_validator(mode="after")
    def _check_range(self) -> InferenceSettings:
        if self.normalisation_scope == "fixed":
            if self.intensity_range is None:
                raise ValueError("normalisation_scope 'fixed' needs intensity_range=(low, high)")
            lo, hi = self.intensity_range
            if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
                raise ValueError(f"intensity_range {self.intensity_range} must be finite with high > low")
        elif self.intensity_range is not None:
            raise ValueError("intensity_range is only used with normalisation_scope='fixed'")
        return self

    @classmethod
    def for_model(cls, size_multiple: int, model_name: str = "the model", **fields: Any) -> InferenceSettings:
        """Validated settings that also fit a model (``tile`` a multiple of ``size_multiple``, the
        overlap smaller than the tile): how a front end checks a request before starting any work.
        Raises ``ValueError`` (pydantic's ``ValidationError`` for field bounds) naming the fix."""
        settings = cls(**fields)
        check_tile(settings.tile, settings.overlap, size_multiple, model_name)
        return settings


class ResolvedSettings(BaseModel):
    """The concrete values a run used (saved in output metadata)."""

    model_config = ConfigDict(extra="forbid")

    tile: int
    overlap: int
    batch_size: int
    device: str
    precision: Literal["fp32", "fp16", "bf16"]
    output_dtype: Literal["float32", "input"]
    normalisation_scope: Literal["plane", "stack", "fixed"]
    intensity_range: tuple[float, float] | None
    channels_last: bool
    size_multiple: int
    plane_batch: int | None = None
    pipeline: bool = True
    batch_auto: bool = False
    orientations: OrientationCount = 1
    #: Where ``orientations`` came from: the request; the model's record (the request said None);
    #: or neither (1). Records written before this field: 1 was the default, more was asked for.
    orientations_from: Literal["settings", "model", "default"]
    shifts: ShiftCount = 1
    #: Where ``shifts`` came from, as ``orientations_from``.
    shifts_from: Literal["settings", "model", "default"] = "default"

    @model_validator(mode="before")
    @classmethod
    def _source_of_old_records(cls, data: Any) -> Any:
        if isinstance(data, dict) and "orientations_from" not in data:
            data = {**data, "orientations_from": "settings" if data.get("orientations", 1) > 1 else "default"}
        return data

    @property
    def passes(self) -> int:
        """Forward passes per tile: orientations x shifts."""
        return self.orientations * self.shifts

    @property
    def averaging_note(self) -> str:
        """``", 4 orientations averaged"`` (and ``" x 2 pixel shifts"``) for a log line, saying so
        when it is the model's default, so a user who wonders why a model is slower learns the
        remedy; empty for a single pass."""
        parts = []
        if self.orientations > 1:
            parts.append(f"{self.orientations} orientations")
        if self.shifts > 1:
            parts.append(f"{self.shifts} pixel shifts")
        if not parts:
            return ""
        note = f", {' x '.join(parts)} averaged"
        from_model = [f"{name} 1" for name, source in (("orientations", self.orientations_from),
                                                      ("shifts", self.shifts_from)) if source == "model"]
        if from_model:
            return note + f" (the model's default; {' and '.join(from_model)} for one pass)"
        return note


@dataclass(frozen=True)
class DeviceDefaults:
    tile: int
    overlap: int
    batch_size: int
    pipeline: bool


#: Defaults per device type. CPU: 512 px tiles keep a paper-preset forward pass under ~2 GB and
#: make the overlap overhead small; GPUs get bigger tiles (the OOM fallback shrinks them).
DEVICE_DEFAULTS = {
    "cpu": DeviceDefaults(tile=512, overlap=32, batch_size=1, pipeline=False),
    "cuda": DeviceDefaults(tile=1024, overlap=64, batch_size=1, pipeline=True),
    "mps": DeviceDefaults(tile=512, overlap=64, batch_size=1, pipeline=True),
}


def round_to_multiple(value: int, multiple: int) -> int:
    """``value`` rounded down to a multiple of ``multiple`` (at least ``multiple``)."""
    return max(multiple, (value // multiple) * multiple)


def check_tile(tile: int | None, overlap: int | None, size_multiple: int, model_name: str = "the model") -> None:
    """Refuse a tile that is not a multiple of the model's size multiple, or an overlap not smaller
    than the tile (``None`` is "auto" and always fits); the message names both fixes."""
    if tile is not None and tile % size_multiple:
        low = round_to_multiple(tile, size_multiple)
        raise ValueError(
            f"tile {tile} is not a multiple of {size_multiple}, the size multiple of {model_name}; "
            f"use {low} or {low + size_multiple}"
        )
    if tile is not None and overlap is not None and overlap >= tile:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")


def resolve_settings(settings: InferenceSettings, device: Any, size_multiple: int,
                     model_name: str = "the model", model_orientations: OrientationCount | None = None,
                     model_shifts: ShiftCount | None = None) -> ResolvedSettings:
    """Fill in device defaults (``device``: a ``torch.device``) and the model's defaults
    (``model_orientations``, ``model_shifts``, from its record; None: 1) and check tile/overlap
    against the model;
    errors say how to fix them."""
    from .devices import resolve_precision

    d = DEVICE_DEFAULTS.get(device.type, DEVICE_DEFAULTS["cpu"])
    tile = settings.tile if settings.tile is not None else round_to_multiple(d.tile, size_multiple)
    overlap = settings.overlap if settings.overlap is not None else min(d.overlap, tile // 4)
    check_tile(tile, overlap, size_multiple, model_name)
    batch = settings.batch_size if settings.batch_size is not None else d.batch_size
    # On CUDA an unset batch is sized from free memory at the first tile (PlaneRestorer._ensure_batch).
    batch_auto = settings.batch_size is None and device.type == "cuda"
    return ResolvedSettings(
        tile=tile, overlap=overlap, batch_size=batch, device=str(device),
        precision=resolve_precision(settings.precision, device),
        output_dtype=settings.output_dtype, normalisation_scope=settings.normalisation_scope,
        intensity_range=settings.intensity_range, channels_last=settings.channels_last,
        size_multiple=size_multiple, plane_batch=settings.plane_batch, pipeline=d.pipeline if settings.pipeline is None else settings.pipeline,
        batch_auto=batch_auto,
        orientations=settings.orientations or model_orientations or 1,
        orientations_from=("settings" if settings.orientations is not None
                           else "model" if model_orientations is not None else "default"),
        shifts=settings.shifts or model_shifts or 1,
        shifts_from=("settings" if settings.shifts is not None
                     else "model" if model_shifts is not None else "default"),
    )
