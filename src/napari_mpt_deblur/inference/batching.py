"""Batched, overlapped restoration of many planes in one process (``Deblurrer.iter_planes``).

Three stages run at the same time, joined by small bounded queues:

1. a **reader** thread reads the next planes (dask/zarr/TIFF), checks them, computes each
   plane's percentile range and normalises it;
2. a **compute** thread cuts the tiles of one or several planes of the same shape and sends them
   to the model in batches of ``engine._batch`` tiles (small planes share a batch: 64 planes of
   520 x 696 with 4 tiles each fill a batch of 16 tiles with 4 planes), with the engine's
   out-of-memory back-off (halve the batch, then the tile);
3. the **caller's** thread (this generator) blends the tiles, maps the plane back to input units
   and yields it, so whatever the caller does with it (zarr/TIFF writing) overlaps the next
   forward passes.

Only about ``2 * plane_batch`` planes are held at any time, so memory does not grow with the
stack depth. Each plane's result is what :meth:`Deblurrer.restore_plane` returns for it (same
normalisation, same tiles, same blending arithmetic; tests check equality within 1e-5 of the
normalised range). Progress is counted in tiles after every batch; a cancel request is honoured
before the next batch. Planes are yielded in order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.normalisation import denormalise, normalise, percentile_range
from .progress import TileProgress
from .tiling import TileGrid, blend_tiles, cut_tiles, plan_tiles

if TYPE_CHECKING:
    from .drivers import Deblurrer
    from .restorer import PreparedInput

_DONE = object()
_POLL_S = 0.1


class _Stopped(Exception):
    """The consumer went away (generator closed): the worker threads end quietly."""


@dataclass
class _Failure:
    exc: BaseException


@dataclass
class _Plane:
    """One plane read and normalised: ``x`` (C, H, W) float32, or ``raw`` for a constant plane."""

    index: tuple[int, ...]
    label: str
    x: np.ndarray | None
    raw: np.ndarray | None
    lo: float = 0.0
    hi: float = 1.0


@dataclass
class _Restored:
    plane: _Plane
    grid: TileGrid | None
    tiles: np.ndarray | None  # (len(grid), C, th, tw) model outputs; None for a constant plane


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            q.put(item, timeout=_POLL_S)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            continue


def _read_planes(engine: Deblurrer, prep: PreparedInput, lohi, out_q: queue.Queue, stop: threading.Event) -> None:
    """Reader stage: the same checks and normalisation as :meth:`Deblurrer.restore_plane`."""
    try:
        layout = prep.layout
        norm = engine.record.normalisation
        for index in np.ndindex(*layout.leading_shape):
            raw = np.asarray(prep.internal[index].compute(scheduler="synchronous"))
            chw = raw if layout.channels_in_model else raw[None]
            label = engine._plane_label(layout, index)
            engine._check_finite(chw, label)
            if chw.size == 0:
                raise ValueError(f"{label} is empty")
            if chw.min() == chw.max():
                item = _Plane(index, label, None, chw)
            else:
                lo, hi = lohi if lohi is not None else percentile_range(chw, norm.low, norm.high)
                item = _Plane(index, label, normalise(chw, lo, hi), None, lo, hi)
            _put(out_q, item, stop)
        _put(out_q, _DONE, stop)
    except _Stopped:
        return
    except BaseException as exc:  # handed to the consumer, which raises it in the caller's thread
        try:
            _put(out_q, _Failure(exc), stop)
        except _Stopped:
            return


def _run_group(engine: Deblurrer, group: list[_Plane], counter: TileProgress, should_stop,
               stop: threading.Event, planned: int) -> list[_Restored]:
    """Restore the tiles of planes of one shape together, in batches; re-plan smaller tiles on OOM.

    ``planned``: tiles per plane the progress counter was given for these planes (it is corrected
    when an out-of-memory fallback changed the tiles, so progress still ends at its total).
    """
    from .restorer import TileTooLarge

    live = [p for p in group if p.x is not None]
    results: dict[int, _Restored] = {}
    if live:
        h, w = live[0].x.shape[-2:]
        expected = planned * len(live)
        while True:
            grid = plan_tiles(h, w, engine._tile, engine._overlap, engine.size_multiple)
            n = len(grid)
            if n * len(live) != expected:
                counter.replan(removed=expected, added=n * len(live))
                expected = n * len(live)
            tiles = np.empty((n * len(live), live[0].x.shape[0], grid.tile_h, grid.tile_w), dtype=np.float32)
            for k, p in enumerate(live):
                cut_tiles(p.x, grid, tiles[k * n : (k + 1) * n])
            engine._ensure_batch(tiles.shape[1:])
            outs: list[np.ndarray] = []
            done_here = 0
            try:
                while done_here < len(tiles):
                    if stop.is_set():
                        raise _Stopped
                    if should_stop():
                        raise counter.cancelled()
                    step = max(1, engine._batch)
                    outs.append(engine._forward_tiles(tiles[done_here : done_here + step]))
                    done_here += len(outs[-1])
                    counter.advance(len(outs[-1]))
                break
            except TileTooLarge as exc:
                engine._shrink_tile(grid, exc)
                # Tiles done stay counted; the whole group is planned again (top of the loop).
                counter.replan(removed=len(tiles) - done_here, added=0)
                expected = 0
        out = np.concatenate(outs) if len(outs) > 1 else outs[0]
        for k, p in enumerate(live):
            results[id(p)] = _Restored(p, grid, out[k * n : (k + 1) * n])
    restored = []
    for p in group:
        if p.x is None:
            counter.advance(planned)
            restored.append(_Restored(p, None, None))
        else:
            restored.append(results[id(p)])
    return restored


def _compute(engine: Deblurrer, in_q: queue.Queue, out_q: queue.Queue, counter: TileProgress, should_stop,
             stop: threading.Event, plane_batch: int | None, planned: int) -> None:
    """Compute stage: group planes of one shape (up to ``plane_batch``, or as many as fill a batch)."""
    try:
        pending = None
        while True:
            first = pending if pending is not None else _get(in_q, stop)
            pending = None
            if first is _DONE or isinstance(first, _Failure):
                _put(out_q, first, stop)
                return
            group = [first]
            shape = (first.x if first.x is not None else first.raw).shape
            limit = plane_batch or max(1, engine._batch // max(1, engine.tiles_per_plane(*shape[-2:])))
            end = None
            while len(group) < limit:
                try:  # take what the reader has ready; wait only while the group is short of a batch
                    nxt = in_q.get(timeout=_POLL_S)
                except queue.Empty:
                    if stop.is_set():
                        raise _Stopped from None
                    continue
                if nxt is _DONE or isinstance(nxt, _Failure):
                    end = nxt
                    break
                if (nxt.x if nxt.x is not None else nxt.raw).shape != shape:
                    pending = nxt
                    break
                group.append(nxt)
            for item in _run_group(engine, group, counter, should_stop, stop, planned):
                _put(out_q, item, stop)
            if end is not None:
                _put(out_q, end, stop)
                return
    except _Stopped:
        return
    except BaseException as exc:
        try:
            _put(out_q, _Failure(exc), stop)
        except _Stopped:
            return


def iter_planes_batched(engine: Deblurrer, prep: PreparedInput, lohi, counter: TileProgress, should_stop,
                        plane_batch: int | None = None, read_ahead: int = 2,
                        ) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """Yield ``(leading index, restored plane)`` in plane order; planes are (C, H, W) or (H, W).

    ``plane_batch``: planes per group (None: as many as fill one batch of tiles). ``read_ahead``:
    groups' worth of planes read and normalised ahead of the model.
    """
    layout = prep.layout
    out_dtype = engine.output_dtype(prep.dtype)
    planned = engine.tiles_per_plane(*layout.plane_hw)  # what ``counter`` was given per plane
    grid = plan_tiles(*layout.plane_hw, engine._tile, engine._overlap, engine.size_multiple)
    channels = layout.internal_shape[-3] if layout.channels_in_model else 1
    engine._ensure_batch((channels, grid.tile_h, grid.tile_w))  # CUDA: size the batch before grouping planes
    # Queue depth in planes: ``read_ahead`` groups (memory: a few groups of planes, not the stack).
    depth = max(2, read_ahead * (plane_batch or max(1, engine._batch // max(1, planned))))
    read_q: queue.Queue = queue.Queue(maxsize=depth)
    done_q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    threads = [
        threading.Thread(target=_read_planes, args=(engine, prep, lohi, read_q, stop), name="mpt-deblur-read",
                         daemon=True),
        threading.Thread(target=_compute, args=(engine, read_q, done_q, counter, should_stop, stop, plane_batch, planned),
                         name="mpt-deblur-compute", daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        while True:
            item = _get(done_q, stop)
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            p = item.plane
            if item.tiles is None:
                restored = p.raw.astype(out_dtype)
            else:
                restored = denormalise(blend_tiles(item.tiles, item.grid), p.lo, p.hi, out_dtype)
            yield p.index, (restored if layout.channels_in_model else restored[0])
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
