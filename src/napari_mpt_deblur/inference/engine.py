"""The inference engine: tiled, blended, lazy deblurring of planes and stacks (SPEC section 6).

Use it from Python, the CLI (``mpt-deblur predict``) or a napari ``thread_worker``::

    from napari_mpt_deblur.inference import Deblurrer, InferenceSettings

    engine = Deblurrer("mpt-small-fluo", InferenceSettings(tile=256, overlap=32))
    restored = engine.deblur_plane(image)                       # 2D numpy in, numpy out
    lazy = engine.deblur(stack, axes="ZYX")                      # dask array, nothing computed yet
    engine.write_zarr(stack, "out.zarr", axes="ZYX", progress=cb, cancel=event)   # streamed

Every plane is normalised by its own percentiles (the model's ``normalisation``), restored tile by
tile, blended (:mod:`.tiling`) and mapped back to the input's units. The model is loaded once per
process (:func:`load_model_once`); an engine sent to a ``dask.distributed`` worker is rebuilt
there from its model path and settings, once per worker process (:func:`engine_for`).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .._version import __version__
from ..data.normalisation import denormalise, normalise, percentile_range
from ..models.registry import LoadedModel, load_model, resolve_model_path
from .axes import AxesLayout, guess_axes, layout_for
from .devices import select_device
from .progress import Cancelled, CancelRequest, ProgressCallback, TileProgress, stop_check
from .tiling import plan_tiles, tile_and_blend

Precision = Literal["auto", "fp32", "fp16", "bf16"]


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
      the caller's thread, one plane per forward pass (the reference the batched path is tested against).
    * ``precision``: ``fp16``/``bf16`` autocast on GPUs only; ``auto`` is bf16 on CUDA GPUs
      that support it, fp32 elsewhere.
    * ``output_dtype``: ``float32``, or ``input`` (rounded and clipped for integer inputs).
    * ``normalisation_scope``: ``plane`` (default; each 2D plane scaled by its own percentiles),
      ``stack`` (one range for the whole array, from up to ~16 M sampled pixels) or ``fixed``
      (``intensity_range`` as given).
    """

    model_config = ConfigDict(extra="forbid")

    tile: int | None = Field(None, ge=8, le=16384)
    overlap: int | None = Field(None, ge=0, le=4096)
    batch_size: int | None = Field(None, ge=1, le=256)
    device: str = "auto"
    precision: Precision = "auto"
    output_dtype: Literal["float32", "input"] = "float32"
    normalisation_scope: Literal["plane", "stack", "fixed"] = "plane"
    intensity_range: tuple[float, float] | None = None
    channels_last: bool = True
    plane_batch: int | None = Field(None, ge=1, le=1024)
    pipeline: bool = True
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


@dataclass(frozen=True)
class DeviceDefaults:
    tile: int
    overlap: int
    batch_size: int


#: Defaults per device type. CPU: 512 px tiles keep a paper-preset forward pass under ~2 GB and
#: make the overlap overhead small; GPUs get bigger tiles (the OOM fallback shrinks them).
DEVICE_DEFAULTS = {
    "cpu": DeviceDefaults(tile=512, overlap=32, batch_size=1),
    "cuda": DeviceDefaults(tile=1024, overlap=64, batch_size=1),
    "mps": DeviceDefaults(tile=512, overlap=64, batch_size=1),
}


def _round_to_multiple(value: int, multiple: int) -> int:
    return max(multiple, (value // multiple) * multiple)


def resolve_settings(settings: InferenceSettings, device: torch.device, size_multiple: int,
                     model_name: str = "the model") -> ResolvedSettings:
    """Fill in device defaults and check tile/overlap against the model; errors say how to fix them."""
    d = DEVICE_DEFAULTS.get(device.type, DEVICE_DEFAULTS["cpu"])
    tile = settings.tile if settings.tile is not None else _round_to_multiple(d.tile, size_multiple)
    if tile % size_multiple:
        low = _round_to_multiple(tile, size_multiple)
        raise ValueError(
            f"tile {tile} is not a multiple of {size_multiple}, the size multiple of {model_name}; "
            f"use {low} or {low + size_multiple}"
        )
    overlap = settings.overlap if settings.overlap is not None else min(d.overlap, tile // 4)
    if overlap >= tile:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    batch = settings.batch_size if settings.batch_size is not None else d.batch_size
    # On CUDA an unset batch is sized from free memory at the first tile (Deblurrer._ensure_batch).
    batch_auto = settings.batch_size is None and device.type == "cuda"
    precision = settings.precision
    gpu = device.type in ("cuda", "mps")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    elif precision in ("fp16", "bf16") and not gpu:
        warnings.warn(f"precision {precision} is only used on a GPU; running in fp32 on {device}", RuntimeWarning,
                      stacklevel=3)
        precision = "fp32"
    elif precision == "bf16" and device.type == "mps":
        warnings.warn("bf16 autocast is not supported on MPS; using fp16", RuntimeWarning, stacklevel=3)
        precision = "fp16"
    return ResolvedSettings(
        tile=tile, overlap=overlap, batch_size=batch, device=str(device), precision=precision,
        output_dtype=settings.output_dtype, normalisation_scope=settings.normalisation_scope,
        intensity_range=settings.intensity_range, channels_last=settings.channels_last,
        size_multiple=size_multiple, plane_batch=settings.plane_batch, pipeline=settings.pipeline,
        batch_auto=batch_auto,
    )


# --------------------------------------------------------------------------------------------
# Model loading: once per process


_MODELS: dict[tuple, LoadedModel] = {}
_MODELS_LOCK = threading.Lock()
_MODEL_LOADS = 0


def model_load_count() -> int:
    """How many times this process has read model weights from disk (for tests and workers)."""
    return _MODEL_LOADS


def load_model_once(name_or_path: str | os.PathLike, device: torch.device, channels_last: bool = True) -> LoadedModel:
    """:func:`~napari_mpt_deblur.models.registry.load_model`, cached per process.

    The key includes the file's modification time and size, so a model file saved again is
    reloaded. Raises ``ModelFileError`` (a ``ValueError``) for unknown or broken models.
    """
    global _MODEL_LOADS
    path = resolve_model_path(name_or_path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(device), channels_last)
    with _MODELS_LOCK:
        loaded = _MODELS.get(key)
        if loaded is None:
            loaded = load_model(path, device=device)
            if channels_last:
                loaded.model.to(memory_format=torch.channels_last)
            _MODELS[key] = loaded
            _MODEL_LOADS += 1
        return loaded


_ENGINES: dict[tuple[str, str], Deblurrer] = {}
_ENGINES_LOCK = threading.Lock()


def engine_for(model_path: str, settings_json: str) -> Deblurrer:
    """The process-wide engine for a model file and settings (how workers rebuild a pickled engine)."""
    key = (model_path, settings_json)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = Deblurrer(model_path, InferenceSettings.model_validate_json(settings_json))
            _ENGINES[key] = engine
        return engine


# --------------------------------------------------------------------------------------------
# Out-of-memory handling


class TileTooLarge(RuntimeError):
    """One tile alone does not fit in device memory (internal: the plane is re-planned smaller)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/MPS/CPU allocator failures (``torch.OutOfMemoryError`` or their messages)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass
class PreparedInput:
    """An input ready for per-plane work: the lazy array in internal order and its layout."""

    internal: Any  # dask array (leading..., [C], Y, X), one plane per chunk
    layout: AxesLayout
    dtype: np.dtype
    axes_from: str  # "given", "file" or "guessed"
    in_memory: bool
    source: dict[str, Any]


def _as_dask(data: Any, plane_chunks: tuple[int, ...] | None = None) -> Any:
    """A dask view of numpy/zarr/array-like ``data`` (dask arrays pass through unchanged)."""
    import dask.array as da

    if isinstance(data, da.Array):
        return data
    if isinstance(data, np.ndarray):
        return da.from_array(data, chunks=plane_chunks or "auto")
    chunks = getattr(data, "chunks", None)
    return da.from_array(data, chunks=chunks if isinstance(chunks, tuple) else (plane_chunks or "auto"))


def _check_dtype(dtype: np.dtype) -> None:
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"unsupported image dtype {dtype}: use integer or floating-point images")


# --------------------------------------------------------------------------------------------
# The engine


class Deblurrer:
    """Loads a model once and restores planes, stacks and files with it.

    ``model``: a model name or path (see :func:`~napari_mpt_deblur.models.registry.load_model`) or
    an already loaded :class:`~napari_mpt_deblur.models.registry.LoadedModel` (an in-memory model
    cannot be sent to a dask.distributed cluster). ``settings``: :class:`InferenceSettings`;
    keyword ``overrides`` replace its fields.

    Thread-safe: model calls are serialised by a lock (a forward pass already uses every core or
    the whole GPU), so dask may call it from several threads.
    """

    def __init__(self, model: str | os.PathLike | LoadedModel, settings: InferenceSettings | None = None,
                 **overrides: Any) -> None:
        base = settings if settings is not None else InferenceSettings()
        self.requested = base.model_copy(update=overrides) if overrides else base
        if overrides:
            self.requested = InferenceSettings.model_validate(self.requested.model_dump())
        self.device = select_device(self.requested.device)
        if isinstance(model, LoadedModel):
            loaded = model
            loaded.model.eval().to(self.device)
            if self.requested.channels_last:
                loaded.model.to(memory_format=torch.channels_last)
        else:
            loaded = load_model_once(model, self.device, self.requested.channels_last)
        self.loaded = loaded
        self.model = loaded.model
        self.record = loaded.record
        self.path: Path | None = loaded.path
        arch = self.record.architecture
        if arch.in_channels != arch.out_channels:
            raise ValueError(
                f"model {self.record.name!r} maps {arch.in_channels} to {arch.out_channels} channels; "
                "the engine restores images in place and needs equal input and output channels"
            )
        self.settings = resolve_settings(self.requested, self.device, arch.size_multiple,
                                         f"model {self.record.name!r} ({arch.arch}/{arch.preset})")
        self._tile = self.settings.tile
        self._overlap = self.settings.overlap
        self._batch = self.settings.batch_size
        self._batch_sized = not self.settings.batch_auto
        self._lock = threading.RLock()
        #: Out-of-memory fallbacks taken so far (also in :meth:`metadata`).
        self.events: list[str] = []

    # ---- properties -----------------------------------------------------------------------

    @property
    def in_channels(self) -> int:
        return self.record.architecture.in_channels

    @property
    def size_multiple(self) -> int:
        return self.record.architecture.size_multiple

    @property
    def current_tile(self) -> tuple[int, int, int]:
        """(tile, overlap, batch) in use now (smaller than the settings after an OOM fallback)."""
        return self._tile, self._overlap, self._batch

    def __repr__(self) -> str:
        return f"Deblurrer({self.record.name!r}, device={self.device}, tile={self._tile}, overlap={self._overlap})"

    # ---- pickling: by reference, rebuilt once per process -----------------------------------

    def __reduce__(self):
        if self.path is None:
            raise TypeError(
                f"model {self.record.name!r} exists only in memory and cannot be sent to dask.distributed "
                "workers; save it with napari_mpt_deblur.models.registry.save_model and pass its path"
            )
        return engine_for, (str(self.path), self.requested.model_dump_json())

    def __dask_tokenize__(self):
        ref = str(self.path) if self.path is not None else f"memory-{id(self)}"
        return ("mpt-deblur-engine", ref, self.requested.model_dump_json())

    # ---- metadata -------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """Model, settings and fallbacks: what to store with an output (JSON-serialisable)."""
        rec = self.record
        tile, overlap, batch = self.current_tile
        return {
            "software": "napari-mpt-deblur",
            "version": __version__,
            "model": {
                "name": rec.name,
                "path": str(self.path) if self.path is not None else None,
                "trained": rec.trained,
                "architecture": rec.architecture.model_dump(mode="json"),
                "normalisation": rec.normalisation.model_dump(mode="json"),
                "weights_sha256": rec.weights_sha256,
            },
            "settings": self.settings.model_dump(mode="json"),
            "tile_in_use": {"tile": tile, "overlap": overlap, "batch_size": batch},
            "fallbacks": list(self.events),
        }

    def run_metadata(self, prep: PreparedInput, intensity_range: tuple[float, float] | None) -> dict[str, Any]:
        meta = self.metadata()
        meta.update({
            "axes": prep.layout.axes,
            "axes_from": prep.axes_from,
            "input": {"shape": list(prep.layout.shape), "dtype": str(prep.dtype), **prep.source},
            "output_dtype": str(self.output_dtype(prep.dtype)),
            "normalisation_range": list(intensity_range) if intensity_range is not None else "per plane",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        return meta

    # ---- inputs ---------------------------------------------------------------------------

    def output_dtype(self, input_dtype: np.dtype) -> np.dtype:
        return np.dtype(np.float32) if self.settings.output_dtype == "float32" else np.dtype(input_dtype)

    def prepare(self, data: Any, axes: str | None = None) -> PreparedInput:
        """Validate ``data`` (numpy, dask, zarr or an :class:`~napari_mpt_deblur.io.images.ImageSource`)
        and its axes; return it lazily, transposed to (leading..., [C], Y, X), one plane per chunk."""
        from ..io.images import ImageSource

        source: dict[str, Any] = {}
        axes_from = "given"
        if isinstance(data, ImageSource):
            if data.path is not None:
                source["path"] = str(data.path)
            if axes is None:
                axes, axes_from = data.axes, data.axes_from
            data = data.data
        if not hasattr(data, "shape") or not hasattr(data, "dtype"):
            data = np.asarray(data)
        in_memory = isinstance(data, np.ndarray)
        shape, dtype = tuple(int(s) for s in data.shape), np.dtype(data.dtype)
        _check_dtype(dtype)
        if len(shape) < 2:
            raise ValueError(f"an image needs at least 2 dimensions (Y, X); got shape {shape}")
        if axes is None:
            axes, axes_from = guess_axes(shape, self.in_channels), "guessed"
        layout = layout_for(axes, shape, self.in_channels)
        arr = _as_dask(data, _user_chunks(layout, max_side=1 << 30))
        internal = arr.transpose(layout.to_internal)
        plane_chunks = (1,) * len(layout.leading_shape) + internal.shape[len(layout.leading_shape):]
        internal = internal.rechunk(plane_chunks)
        return PreparedInput(internal, layout, dtype, axes_from, in_memory, source)

    def intensity_range(self, prep: PreparedInput, max_pixels: int = 2**24) -> tuple[float, float] | None:
        """The fixed or stack-wide (lo, hi) for the settings' scope; None for per-plane normalisation.

        ``stack``: percentiles of evenly spaced planes totalling at most ``max_pixels`` values.
        """
        scope = self.settings.normalisation_scope
        if scope == "plane":
            return None
        if scope == "fixed":
            lo, hi = self.settings.intensity_range  # type: ignore[misc]
            return float(lo), float(hi)
        layout = prep.layout
        plane_size = int(np.prod(prep.internal.shape[len(layout.leading_shape):]))
        k = max(1, min(layout.n_planes, max_pixels // max(1, plane_size)))
        picks = np.unique(np.linspace(0, layout.n_planes - 1, k).round().astype(int))
        values = []
        for flat in picks:
            idx = np.unravel_index(int(flat), layout.leading_shape) if layout.leading_shape else ()
            plane = np.asarray(prep.internal[tuple(int(i) for i in idx)].compute(scheduler="synchronous"))
            self._check_finite(plane, self._plane_label(layout, tuple(int(i) for i in idx)))
            values.append(plane.ravel())
        norm = self.record.normalisation
        return percentile_range(np.concatenate(values), norm.low, norm.high)

    # ---- per plane ------------------------------------------------------------------------

    @staticmethod
    def _plane_label(layout: AxesLayout, index: tuple[int, ...]) -> str:
        if not index:
            return "the image"
        return "plane " + ", ".join(f"{a}={i}" for a, i in zip(layout.leading_axes, index))

    @staticmethod
    def _check_finite(plane: np.ndarray, label: str) -> None:
        if np.issubdtype(plane.dtype, np.floating) and not np.isfinite(plane).all():
            bad = int(np.size(plane) - np.count_nonzero(np.isfinite(plane)))
            raise ValueError(f"{label} contains {bad} NaN or Inf value(s); replace them before deblurring")

    def tiles_per_plane(self, height: int, width: int) -> int:
        return len(plan_tiles(height, width, self._tile, self._overlap, self.size_multiple))

    def restore_plane(
        self,
        plane: np.ndarray,
        out_dtype: np.dtype,
        intensity_range: tuple[float, float] | None = None,
        counter: TileProgress | None = None,
        should_stop=None,
        label: str = "the image",
    ) -> np.ndarray:
        """Restore one model input plane: (C, H, W) raw values -> (C, H, W) in ``out_dtype``, input units.

        A constant plane is returned as is (nothing to deblur; no NaN from a zero range).
        """
        self._check_finite(plane, label)
        if plane.size == 0:
            raise ValueError(f"{label} is empty")
        h, w = plane.shape[-2:]
        if plane.min() == plane.max():
            if counter is not None:
                counter.advance(self.tiles_per_plane(h, w))
            return plane.astype(out_dtype)
        norm = self.record.normalisation
        lo, hi = intensity_range if intensity_range is not None else percentile_range(plane, norm.low, norm.high)
        x = normalise(plane, lo, hi)
        y = self._run_tiles(x, counter, should_stop)
        return denormalise(y, lo, hi, out_dtype)

    def _run_tiles(self, x: np.ndarray, counter: TileProgress | None, should_stop) -> np.ndarray:
        """Tile, restore, blend one normalised (C, H, W) float32 plane, shrinking tiles on OOM."""
        h, w = x.shape[-2:]
        while True:
            grid = plan_tiles(h, w, self._tile, self._overlap, self.size_multiple)
            done_here = 0

            def on_done(n: int) -> None:
                nonlocal done_here
                done_here += n
                if counter is not None:
                    counter.advance(n)

            self._ensure_batch((x.shape[0], grid.tile_h, grid.tile_w))
            try:
                return tile_and_blend(x, self._forward_tiles, grid, self._batch, on_done, should_stop)
            except Cancelled as exc:
                raise (counter.cancelled() if counter is not None else exc) from None
            except TileTooLarge as exc:
                self._shrink_tile(grid, exc)
                if counter is not None:
                    new_grid = plan_tiles(h, w, self._tile, self._overlap, self.size_multiple)
                    counter.replan(removed=len(grid) - done_here, added=len(new_grid))

    def _shrink_tile(self, grid, exc: TileTooLarge) -> int:
        """Halve the tile after one tile alone ran out of memory (warns, records); returns the new tile."""
        old = self._tile
        if old <= self.size_multiple:
            raise RuntimeError(
                f"out of memory on {self.device} even with one {grid.tile_h}x{grid.tile_w} tile; "
                "free GPU memory or use device 'cpu'"
            ) from exc
        self._tile = _round_to_multiple(old // 2, self.size_multiple)
        self._overlap = min(self._overlap, self._tile // 4)
        msg = f"out of memory on {self.device} with {grid.tile_h}x{grid.tile_w} tiles; retrying with tile {self._tile}"
        self.events.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return self._tile

    def _ensure_batch(self, tile_shape: tuple[int, int, int], max_batch: int = 64, memory_share: float = 0.5) -> int:
        """On CUDA with ``batch_size=None``: size the batch once from free memory and one measured tile.

        ``tile_shape``: (C, h, w). The peak memory of a batch-1 forward pass (activations under
        the settings' precision) is measured; the batch is ``memory_share`` of the free memory
        divided by it, between 1 and ``max_batch``. An out-of-memory error later still halves it.
        """
        if self._batch_sized:
            return self._batch
        with self._lock:
            if self._batch_sized:
                return self._batch
            self._batch_sized = True
            if self.device.type != "cuda":
                return self._batch
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                self._forward_once(np.zeros((1, *tile_shape), dtype=np.float32))
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                self._release_memory()
                self._batch = 1
                return 1
            per_tile = max(1, torch.cuda.max_memory_allocated(self.device) - base)
            free, _ = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            self._batch = int(max(1, min(max_batch, memory_share * (free + cached) // per_tile)))
            self.events.append(f"batch of {self._batch} tiles of {tile_shape[1]}x{tile_shape[2]} sized from "
                               f"{(free + cached) / 2**30:.1f} GiB free ({per_tile / 2**20:.0f} MiB per tile)")
            return self._batch

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps" and hasattr(torch, "mps"):
            torch.mps.empty_cache()

    def _forward_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """(B, C, h, w) float32 -> (B, C, h, w) float32, in micro-batches halved on out-of-memory."""
        outs = []
        i = 0
        with self._lock:
            while i < len(tiles):
                n = min(self._batch, len(tiles) - i)
                try:
                    outs.append(self._forward_once(tiles[i : i + n]))
                    i += n
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    self._release_memory()
                    if n <= 1:
                        raise TileTooLarge(str(exc)) from exc
                    self._batch = max(1, n // 2)
                    msg = (f"out of memory on {self.device} with {n} tiles of {tiles.shape[-2]}x{tiles.shape[-1]} "
                           f"per batch; retrying with {self._batch}")
                    self.events.append(msg)
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def _autocast(self):
        p = self.settings.precision
        if p == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.float16 if p == "fp16" else torch.bfloat16)

    def _forward_once(self, tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))
        cuda = self.device.type == "cuda"
        # CUDA: copy through page-locked host memory, asynchronously (the copy engine, not the CPU).
        x = x.pin_memory().to(self.device, non_blocking=True) if cuda else x.to(self.device)
        if self.settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            from .compiled import compiled_forward  # eager unless settings.compile / the device default

            y = compiled_forward(self, x)
        if cuda:
            host = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(y, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            return host.numpy()
        return y.float().cpu().numpy()

    # ---- public API -----------------------------------------------------------------------

    def deblur_plane(self, image: np.ndarray, *, progress: ProgressCallback | None = None,
                     cancel: CancelRequest = None) -> np.ndarray:
        """Restore one 2D (Y, X) or (Y, X, C) image now; same shape, dtype per the settings.

        A 3D array is taken as (Y, X, C) only when C can be channels: the model's channel count,
        or up to 4 (e.g. RGB/RGBA, each channel restored separately by a one-channel model) on an
        image much larger than that. Anything else,
        e.g. a (3, 201, 101) z-stack, is refused rather than read as 101 channels.
        """
        image = np.asarray(image)
        if image.ndim == 2:
            axes = "YX"
        elif image.ndim == 3:
            axes = "YXC"
            c = image.shape[-1]
            rgb_like = self.in_channels == 1 and c <= 4 and min(image.shape[:2]) > 4 * c
            if c != self.in_channels and not rgb_like:
                raise ValueError(
                    f"deblur_plane got shape {tuple(image.shape)}: as a (Y, X, C) image that would be {c} channels, "
                    f"but the model takes {self.in_channels}. For a stack of planes use "
                    f"deblur(data, axes='ZYX') (or deblur_array); for channels first use axes='CYX'"
                )
        else:
            raise ValueError(
                f"deblur_plane takes a 2D (Y, X) or (Y, X, C) image, got shape {image.shape}; "
                "use deblur(data, axes=...) for stacks"
            )
        return self.deblur_array(image, axes, progress=progress, cancel=cancel)

    def deblur(self, data: Any, axes: str | None = None, *, progress: ProgressCallback | None = None,
               cancel: CancelRequest = None):
        """Lazy restoration: a dask array with ``data``'s shape and axes, one plane per chunk.

        Nothing runs until it is computed (by any dask scheduler, or planes sliced by a viewer).
        ``progress(done, total)`` counts tiles over this array; ``cancel`` stops between tiles by
        raising :class:`Cancelled` from ``compute()``. Both hooks work in this process only; on a
        dask.distributed cluster use :meth:`write_zarr` / :meth:`deblur_array` with ``client=``.
        """
        prep = self.prepare(data, axes)
        lohi = self.intensity_range(prep)
        return self._lazy(prep, lohi, progress, cancel).transpose(prep.layout.to_user)

    def _lazy(self, prep: PreparedInput, lohi, progress=None, cancel=None):
        from dask.base import tokenize

        layout = prep.layout
        out_dtype = self.output_dtype(prep.dtype)
        counter = None
        if progress is not None:
            counter = TileProgress(layout.n_planes * self.tiles_per_plane(*layout.plane_hw), progress)
        fn = PlaneFunction(self, layout, out_dtype, lohi, counter, cancel)
        name = "mpt-deblur-" + tokenize(prep.internal.name, self, out_dtype.str, lohi, id(counter), id(cancel))
        return prep.internal.map_blocks(fn, dtype=out_dtype, name=name,
                                        meta=np.empty((0,) * prep.internal.ndim, dtype=out_dtype))

    def deblur_array(self, data: Any, axes: str | None = None, *, progress: ProgressCallback | None = None,
                     cancel: CancelRequest = None, client=None) -> np.ndarray:
        """Restore now, plane by plane, into a numpy array of ``data``'s shape and axes."""
        prep = self.prepare(data, axes)
        lohi = self.intensity_range(prep)
        layout = prep.layout
        out = np.empty(layout.shape, dtype=self.output_dtype(prep.dtype))
        done = 0
        try:
            for index, plane in self.iter_planes(prep, lohi, progress, cancel, client=client):
                out[layout.user_region(index)] = _to_user_block(plane, layout)
                done += 1
        except Cancelled as exc:
            raise exc.with_planes(done, layout.n_planes) from None
        return out

    def iter_planes(self, prep: PreparedInput, lohi, progress: ProgressCallback | None = None,
                    cancel: CancelRequest = None, *, client=None, ordered: bool = True,
                    ) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        """Yield ``(leading index, restored plane)`` one plane at a time; planes are (C, H, W) or (H, W).

        Locally, with ``pipeline`` on (the default), planes are read ahead on one thread, their
        tiles batched (several small planes per forward pass) on another, and blended and yielded
        here (:mod:`.batching`); at most a few groups of planes are held, so memory does not depend
        on the number of planes. With ``pipeline`` off each plane is read, restored and yielded
        before the next is read. With a dask.distributed ``client`` planes are computed
        on the cluster, a bounded number at a time (see :mod:`.distributed`).
        """
        layout = prep.layout
        should_stop = stop_check(cancel)
        counter = TileProgress(layout.n_planes * self.tiles_per_plane(*layout.plane_hw), progress)
        if client is not None:
            from .distributed import iter_planes_on_cluster

            yield from iter_planes_on_cluster(self, prep, lohi, counter, should_stop, client, ordered=ordered)
            return
        if self.settings.pipeline:
            from .batching import iter_planes_batched

            yield from iter_planes_batched(self, prep, lohi, counter, should_stop, self.settings.plane_batch)
            return
        out_dtype = self.output_dtype(prep.dtype)
        for index in np.ndindex(*layout.leading_shape):
            if should_stop():
                raise counter.cancelled()
            raw = np.asarray(prep.internal[index].compute(scheduler="synchronous"))
            chw = raw if layout.channels_in_model else raw[None]
            restored = self.restore_plane(chw, out_dtype, lohi, counter, should_stop, self._plane_label(layout, index))
            yield index, (restored if layout.channels_in_model else restored[0])

    # ---- writers --------------------------------------------------------------------------

    def write_zarr(self, data: Any, out: str | os.PathLike, axes: str | None = None, *, overwrite: bool = False,
                   progress: ProgressCallback | None = None, cancel: CancelRequest = None, client=None) -> Path:
        """Stream the restored array into a zarr store at ``out``, plane by plane.

        The store is created first with ``attrs["mpt_deblur"]["complete"] = False`` and the OME-Zarr
        multiscales metadata is written only when every plane is in, so a cancelled or crashed
        write is never mistaken for a finished one (:func:`~napari_mpt_deblur.io.images.read_image`
        refuses it). Refuses to replace an existing ``out`` unless ``overwrite``.
        """
        from ..io.images import ZarrOutput, check_output

        out = Path(out)
        source_path = getattr(data, "path", None)
        check_output(out, overwrite=overwrite, input_path=source_path)
        prep = self.prepare(data, axes)
        lohi = self.intensity_range(prep)
        layout = prep.layout
        meta = self.run_metadata(prep, lohi)
        store = ZarrOutput.create(out, shape=layout.shape, dtype=self.output_dtype(prep.dtype), axes=layout.axes,
                                  chunks=_user_chunks(layout), metadata=meta, planes_total=layout.n_planes,
                                  overwrite=overwrite, scale=getattr(data, "scale", None))
        try:
            for index, plane in self.iter_planes(prep, lohi, progress, cancel, client=client, ordered=False):
                store.write(layout.user_region(index), _to_user_block(plane, layout))
        except Cancelled as exc:
            store.mark_stopped("cancelled")
            raise exc.with_planes(store.planes_done, layout.n_planes, str(out)) from None
        except KeyboardInterrupt:
            store.mark_stopped("interrupted")
            raise
        except Exception as exc:
            store.mark_stopped(f"failed: {type(exc).__name__}: {exc}"[:500])
            raise
        store.finish(self.metadata())
        return out

    def write_tiff(self, data: Any, out: str | os.PathLike, axes: str | None = None, *, overwrite: bool = False,
                   progress: ProgressCallback | None = None, cancel: CancelRequest = None, client=None,
                   compression: str | None = "zlib") -> Path:
        """Stream the restored array into a TIFF at ``out`` (atomically: nothing appears if cancelled).

        Pages are the Y, X planes (with RGB samples last for a 3-channel model); the axes and the
        :meth:`metadata` are stored as JSON in the ImageDescription (tifffile "shaped" metadata).
        """
        from ..io.images import check_output, write_tiff_pages

        out = Path(out)
        check_output(out, overwrite=overwrite, input_path=getattr(data, "path", None))
        prep = self.prepare(data, axes)
        lohi = self.intensity_range(prep)
        layout = prep.layout
        meta = self.run_metadata(prep, lohi)
        lead = layout.leading_shape
        h, w = layout.plane_hw
        if layout.channels_in_model:
            c = layout.internal_shape[-3]
            shape, tiff_axes = (*lead, h, w, c), layout.leading_axes + "YXS"
        else:
            shape, tiff_axes = (*lead, h, w), layout.leading_axes + "YX"
        meta["axes"] = tiff_axes
        if tiff_axes != layout.axes:
            meta["axes_note"] = f"input axes {layout.axes} written as {tiff_axes} (TIFF pages are Y, X planes)"
        planes_done = 0

        def pages() -> Iterator[np.ndarray]:
            nonlocal planes_done
            for _, plane in self.iter_planes(prep, lohi, progress, cancel, client=client, ordered=True):
                yield np.moveaxis(plane, 0, -1) if layout.channels_in_model else plane
                planes_done += 1

        try:
            write_tiff_pages(out, pages(), shape=shape, dtype=self.output_dtype(prep.dtype), axes=tiff_axes,
                             metadata=meta, rgb=layout.channels_in_model and shape[-1] in (3, 4),
                             compression=compression)
        except Cancelled as exc:
            raise exc.with_planes(planes_done, layout.n_planes) from None
        return out


def _user_chunks(layout: AxesLayout, max_side: int = 2048) -> tuple[int, ...]:
    """Zarr chunks in the user's axis order: one plane deep, Y/X up to ``max_side``."""
    chunks = []
    for i, a in enumerate(layout.axes):
        if a in "YX":
            chunks.append(min(layout.shape[i], max_side))
        elif i == layout.channel_axis and layout.channels_in_model:
            chunks.append(layout.shape[i])
        else:
            chunks.append(1)
    return tuple(chunks)


def _to_user_block(plane: np.ndarray, layout: AxesLayout) -> np.ndarray:
    """A restored (C, H, W) or (H, W) plane as the block it occupies in the user's axis order."""
    block = plane.reshape((1,) * len(layout.leading_shape) + plane.shape)
    return block.transpose(layout.to_user)


class PlaneFunction:
    """The per-chunk function: one plane block (1, .., 1, [C], Y, X) -> its restored block.

    Used by :meth:`Deblurrer.deblur` through ``dask.array.map_blocks`` and sent as is to
    dask.distributed workers (the engine pickles by model path; progress and cancel hooks stay
    behind, they only work in the calling process).
    """

    def __init__(self, engine: Deblurrer, layout: AxesLayout, out_dtype: np.dtype,
                 intensity_range: tuple[float, float] | None, counter: TileProgress | None = None,
                 cancel: CancelRequest = None) -> None:
        self.engine = engine
        self.layout = layout
        self.out_dtype = np.dtype(out_dtype)
        self.intensity_range = intensity_range
        self.counter = counter
        self.cancel = cancel

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["counter"] = None
        state["cancel"] = None
        return state

    def __dask_tokenize__(self):
        return ("mpt-deblur-plane", self.engine.__dask_tokenize__(), self.layout, self.out_dtype.str,
                self.intensity_range, id(self.counter), id(self.cancel))

    def __call__(self, block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        layout = self.layout
        n_lead = len(layout.leading_shape)
        index: tuple[int, ...] = ()
        if block_info and None in block_info:
            index = tuple(block_info[None]["chunk-location"][:n_lead])
        plane = block.reshape(block.shape[n_lead:])
        chw = plane if layout.channels_in_model else plane[None]
        label = self.engine._plane_label(layout, index)
        restored = self.engine.restore_plane(chw, self.out_dtype, self.intensity_range, self.counter,
                                             stop_check(self.cancel), label)
        return restored.reshape(block.shape)
