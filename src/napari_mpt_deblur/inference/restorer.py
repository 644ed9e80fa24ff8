"""The plane restorer: normalise -> tile -> forward (with out-of-memory back-off) -> blend -> denormalise.

:class:`PlaneRestorer` holds a loaded model and its resolved settings and restores one plane at a
time (:meth:`PlaneRestorer.restore_plane`); the drivers that walk arrays, stacks and files are in
:mod:`.drivers` (:class:`~napari_mpt_deblur.inference.drivers.Deblurrer`). The trainer's
validation restores its planes with the same class, so a validation score means what inference does.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.normalisation import denormalise, normalise, percentile_range
from ..models.registry import LoadedModel
from ..io.axes import AxesLayout, guess_axes, layout_for
from ..io.axes import user_chunks as _user_chunks
from ..io.run_record import InputSummary, ModelSummary, RunRecord, TileInUse, software_versions
from .devices import autocast_dtype_for, is_out_of_memory, select_device
from .model_cache import load_model_once
from .orientations import average_orientations
from .progress import Cancelled, CancelRequest, TileProgress, stop_check
from .settings import InferenceSettings, ResolvedSettings, round_to_multiple, resolve_settings
from .tiling import plan_tiles, tile_and_blend

# --------------------------------------------------------------------------------------------
# Out-of-memory handling


class TileTooLarge(RuntimeError):
    """One tile alone does not fit in device memory (internal: the plane is re-planned smaller)."""



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


# --------------------------------------------------------------------------------------------
# The restorer


class PlaneRestorer:
    """Loads a model once and restores planes with it (the drivers in :class:`~.drivers.Deblurrer`
    walk arrays, stacks and files).

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
                                         f"model {self.record.name!r} ({arch.arch}/{arch.preset})",
                                         self.record.orientations, self.record.shifts)
        #: The settings in use now: ``settings`` until an out-of-memory fallback (or the CUDA batch
        #: sizing) replaces it with a new resolved object; never mutated, so metadata states what ran.
        self.in_use: ResolvedSettings = self.settings
        self._batch_sized = not self.settings.batch_auto
        self._lock = threading.RLock()
        #: Out-of-memory fallbacks taken so far (also in :meth:`metadata`).
        self.events: list[str] = []

    @classmethod
    def for_network(cls, net: torch.nn.Module, normalisation: Any, device: torch.device | str,
                    precision: str = "fp32", name: str = "the network in training") -> PlaneRestorer:
        """A restorer around a network that has no model file (the trainer's validation): the same
        per-plane normalisation, tiling, out-of-memory back-off and mapping back to input units
        as inference. ``net.config`` is its architecture config; ``normalisation`` a
        :class:`~napari_mpt_deblur.data.normalisation.NormalisationConfig`. The network is left
        in eval mode and in its memory format (``channels_last`` off: training owns the layout)."""
        from ..models.registry import ModelRecord

        record = ModelRecord(name=name, architecture=net.config, normalisation=normalisation, trained=False)
        settings = InferenceSettings(device=str(device), precision=precision, channels_last=False, pipeline=False)
        return cls(LoadedModel(net, record, None), settings)

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

    @property
    def _tile(self) -> int:
        return self.in_use.tile

    @property
    def _overlap(self) -> int:
        return self.in_use.overlap

    @property
    def _batch(self) -> int:
        return self.in_use.batch_size

    def _use(self, **changes: Any) -> None:
        """Switch to new resolved settings (tile, overlap or batch_size changed)."""
        self.in_use = self.in_use.model_copy(update=changes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.record.name!r}, device={self.device}, tile={self._tile}, overlap={self._overlap})"


    def __dask_tokenize__(self):
        ref = str(self.path) if self.path is not None else f"memory-{id(self)}"
        return ("mpt-deblur-engine", ref, self.requested.model_dump_json())

    # ---- metadata -------------------------------------------------------------------------

    def run_record(self, prep: PreparedInput | None = None, intensity_range: tuple[float, float] | None = None,
                   *, complete: bool = False, seconds: float | None = None) -> RunRecord:
        """The typed record of a run (:class:`~napari_mpt_deblur.io.run_record.RunRecord`): model,
        resolved settings (as started and as in use now), fallbacks, versions, and with ``prep``
        the input, output dtype, normalisation range and start time."""
        rec = self.record
        tile, overlap, batch = self.current_tile
        fields: dict[str, Any] = dict(
            versions=software_versions(),
            model=ModelSummary(name=rec.name, path=str(self.path) if self.path is not None else None,
                               trained=rec.trained, weights_sha256=rec.weights_sha256,
                               architecture=rec.architecture.model_dump(mode="json"),
                               normalisation=rec.normalisation.model_dump(mode="json")),
            settings=self.settings, settings_in_use=self.in_use,
            tile_in_use=TileInUse(tile=tile, overlap=overlap, batch_size=batch),
            fallbacks=list(self.events), complete=complete, seconds=seconds,
        )
        if prep is not None:
            fields.update(
                axes=prep.layout.axes, axes_from=prep.axes_from,
                input=InputSummary(shape=list(prep.layout.shape), dtype=str(prep.dtype), **prep.source),
                output_dtype=str(self.output_dtype(prep.dtype)),
                normalisation_range=list(intensity_range) if intensity_range is not None else "per plane",
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
        return RunRecord(**fields)

    def metadata(self) -> dict[str, Any]:
        """The run record without input details, as JSON (what the napari layer of an in-memory
        run stores; see :meth:`run_record`)."""
        return self.run_record(complete=True).to_metadata()

    def run_metadata(self, prep: PreparedInput, intensity_range: tuple[float, float] | None) -> dict[str, Any]:
        """The run record of a file output as it starts, as JSON (see :meth:`run_record`)."""
        return self.run_record(prep, intensity_range).to_metadata()

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
        tile = round_to_multiple(old // 2, self.size_multiple)
        self._use(tile=tile, overlap=min(self._overlap, tile // 4))
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
                self._use(batch_size=1)
                return 1
            per_tile = max(1, torch.cuda.max_memory_allocated(self.device) - base)
            free, _ = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            self._use(batch_size=int(max(1, min(max_batch, memory_share * (free + cached) // per_tile))))
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
                    self._use(batch_size=max(1, n // 2))
                    msg = (f"out of memory on {self.device} with {n} tiles of {tiles.shape[-2]}x{tiles.shape[-1]} "
                           f"per batch; retrying with {self._batch}")
                    self.events.append(msg)
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def _autocast(self):
        dtype = autocast_dtype_for(self.settings.precision)
        return nullcontext() if dtype is None else torch.autocast(device_type=self.device.type, dtype=dtype)

    def _forward_once(self, tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))
        cuda = self.device.type == "cuda"
        # CUDA: copy through page-locked host memory, asynchronously (the copy engine, not the CPU).
        x = x.pin_memory().to(self.device, non_blocking=True) if cuda else x.to(self.device)
        if self.settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            from .compiled import compiled_forward  # eager unless settings.compile / the device default

            y = average_orientations(lambda t: compiled_forward(self, t), x, self.settings.orientations,
                                     self.settings.channels_last, self.settings.shifts)
        if cuda:
            host = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(y, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            return host.numpy()
        return y.float().cpu().numpy()

    # ---- public API -----------------------------------------------------------------------


class PlaneFunction:
    """The per-chunk function: one plane block (1, .., 1, [C], Y, X) -> its restored block.

    Used by :meth:`~.drivers.Deblurrer.deblur` through ``dask.array.map_blocks`` and sent as is to
    dask.distributed workers (the engine pickles by model path; progress and cancel hooks stay
    behind, they only work in the calling process).
    """

    def __init__(self, engine: PlaneRestorer, layout: AxesLayout, out_dtype: np.dtype,
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
