"""Drivers: restore a whole array, stack or file with a :class:`~.restorer.PlaneRestorer`.

Use them from Python, the CLI (``mpt-deblur predict``) or a napari ``thread_worker``::

    from napari_mpt_deblur.inference import Deblurrer, InferenceSettings

    engine = Deblurrer("mpt-small-fluo", InferenceSettings(tile=256, overlap=32))
    restored = engine.deblur_plane(image)                       # 2D numpy in, numpy out
    lazy = engine.deblur(stack, axes="ZYX")                      # dask array, nothing computed yet
    engine.write_zarr(stack, "out.zarr", axes="ZYX", progress=cb, cancel=event)   # streamed

The drivers: lazy (:meth:`Deblurrer.deblur`, dask), array (:meth:`Deblurrer.deblur_array`),
zarr and TIFF writers, and the cluster path (:mod:`.distributed`, chosen by ``client=``); local
stacks go through the batched pipeline (:mod:`.batching`). An engine sent to a
``dask.distributed`` worker is rebuilt there from its model path and settings, once per worker
process (:func:`engine_for`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .progress import Cancelled, CancelRequest, ProgressCallback, TileProgress, stop_check
from ..io.axes import to_user_block as _to_user_block
from ..io.axes import user_chunks as _user_chunks
from .restorer import PlaneFunction, PlaneRestorer, PreparedInput
from .settings import InferenceSettings


class Deblurrer(PlaneRestorer):
    """Loads a model once and restores planes, stacks and files with it (see :class:`PlaneRestorer`
    for ``model`` and ``settings``). Pickles by reference (model path + settings): a dask worker
    rebuilds it once per process with :func:`engine_for`."""



    def __reduce__(self):
        if self.path is None:
            raise TypeError(
                f"model {self.record.name!r} exists only in memory and cannot be sent to dask.distributed "
                "workers; save it with napari_mpt_deblur.models.registry.save_model and pass its path"
            )
        return engine_for, (str(self.path), self.requested.model_dump_json())


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

        Locally, with ``pipeline`` on (the default on GPUs), planes are read ahead on one thread, their
        tiles batched (several small planes per forward pass) on another, and blended and yielded
        here (:mod:`.batching`); at most a few groups of planes are held, so memory does not depend
        on the number of planes. With ``pipeline`` off (the CPU default) each plane is read, restored and yielded
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
        started = time.perf_counter()
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
        # The fallbacks and settings in use at the end, and the duration (see io.run_record).
        store.finish(self.run_record(seconds=round(time.perf_counter() - started, 3)).to_metadata())
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
        started = time.perf_counter()

        def final_metadata() -> dict[str, Any]:
            # Written into the temporary file once every page is in: a TIFF appears only complete.
            end = self.run_record(complete=True, seconds=round(time.perf_counter() - started, 3)).to_metadata()
            keep = ("fallbacks", "tile_in_use", "settings_in_use", "seconds", "complete", "versions")
            return {**meta, **{k: end[k] for k in keep}}

        def pages() -> Iterator[np.ndarray]:
            nonlocal planes_done
            for _, plane in self.iter_planes(prep, lohi, progress, cancel, client=client, ordered=True):
                yield np.moveaxis(plane, 0, -1) if layout.channels_in_model else plane
                planes_done += 1

        try:
            write_tiff_pages(out, pages(), shape=shape, dtype=self.output_dtype(prep.dtype), axes=tiff_axes,
                             metadata=meta, rgb=layout.channels_in_model and shape[-1] in (3, 4),
                             compression=compression, final_metadata=final_metadata)
        except Cancelled as exc:
            raise exc.with_planes(planes_done, layout.n_planes) from None
        return out

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
