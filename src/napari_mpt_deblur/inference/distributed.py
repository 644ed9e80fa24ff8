"""Run the engine's per-chunk function on a dask.distributed cluster (SPEC section 6).

The same :class:`~napari_mpt_deblur.inference.engine.PlaneFunction` that ``Deblurrer.deblur``
maps over planes is sent to the workers. A :class:`~napari_mpt_deblur.inference.engine.Deblurrer`
pickles *by reference* (model path + requested settings) and is rebuilt on the worker by
:func:`~napari_mpt_deblur.inference.engine.engine_for`, which caches it per process: each worker
process reads the model once, however many planes it restores. ``device="auto"`` is resolved on
the worker, so GPU workers use their GPU.

::

    from napari_mpt_deblur.inference.distributed import cluster_client

    with cluster_client("local") as client:            # or "tcp://scheduler:8786"
        engine.write_zarr(source, "out.zarr", client=client, progress=cb)

Inputs should be files every worker can read (TIFF, zarr on a shared filesystem); an in-memory
numpy input is sent to the cluster once (``client.persist``). Results come back to the calling
process, which writes the output, so the output path only needs to be writable here.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from .progress import TileProgress


def _set_torch_threads(n: int) -> int:
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()


def connect(scheduler: str | None = "local", *, n_workers: int = 1, threads_per_worker: int = 1,
            processes: bool = True, torch_threads: int | None = None, timeout: float = 30.0):
    """A ``distributed.Client``: a new LocalCluster for ``"local"``/None, else the scheduler at that address.

    dask starts worker processes with ``OMP_NUM_THREADS=1``; for a LocalCluster of processes the
    torch thread count of each worker is set to ``torch_threads`` (default: the CPU cores divided
    by the number of worker threads), since one forward pass uses all the threads it is given.
    """
    from distributed import Client, LocalCluster

    if scheduler in (None, "", "local"):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=processes,
                               dashboard_address=None)
        client = Client(cluster)
        if processes:
            threads = torch_threads or max(1, (os.cpu_count() or 1) // max(1, n_workers * threads_per_worker))
            client.run(_set_torch_threads, threads)
        return client
    try:
        return Client(scheduler, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise ValueError(f"cannot reach the dask scheduler at {scheduler!r}: {exc}") from exc


@contextlib.contextmanager
def cluster_client(scheduler: str | None = "local", **kwargs: Any) -> Iterator[Any]:
    """:func:`connect`, closing the client (and the LocalCluster it started) on exit."""
    client = connect(scheduler, **kwargs)
    try:
        yield client
    finally:
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None and scheduler in (None, "", "local"):
            cluster.close()


def worker_model_loads(client) -> dict[str, int]:
    """How many times each worker process has read model weights (one per model and device)."""
    from .engine import model_load_count

    return client.run(model_load_count)


def iter_planes_on_cluster(engine, prep, lohi, counter: TileProgress, should_stop, client, *,
                           ordered: bool = True, window: int | None = None,
                           ) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """Yield ``(leading index, restored plane)`` computed on the cluster, at most ``window`` in flight.

    ``ordered`` yields in plane order (for TIFF pages); otherwise as planes finish. Progress
    advances by whole planes; a cancel request cancels the planes in flight and raises
    :class:`~napari_mpt_deblur.inference.progress.Cancelled`.
    """
    from .engine import PlaneFunction

    engine.__reduce__()  # fails early, with a clear message, for an in-memory model
    layout = prep.layout
    internal = client.persist(prep.internal) if prep.in_memory else prep.internal
    out_dtype = engine.output_dtype(prep.dtype)
    fn = PlaneFunction(engine, layout, out_dtype, lohi)
    result = internal.map_blocks(fn, dtype=out_dtype, meta=np.empty((0,) * internal.ndim, dtype=out_dtype))
    tiles = engine.tiles_per_plane(*layout.plane_hw)
    if window is None:
        window = max(2, 2 * sum(client.nthreads().values()))
    tail = (0,) * layout.plane_ndim
    todo = iter(np.ndindex(*layout.leading_shape))
    pending: deque = deque()

    def fill() -> None:
        while len(pending) < window:
            index = next(todo, None)
            if index is None:
                return
            pending.append((index, client.compute(result.blocks[index + tail])))

    try:
        fill()
        while pending:
            if should_stop():
                raise counter.cancelled()
            if ordered:
                ready = 0 if pending[0][1].done() else None
            else:
                ready = next((i for i, (_, f) in enumerate(pending) if f.done()), None)
            if ready is None:
                time.sleep(0.05)
                continue
            index, future = pending[ready]
            del pending[ready]
            block = np.asarray(future.result())
            future.release()
            counter.advance(tiles)
            fill()
            yield index, block.reshape(block.shape[len(index):])
    finally:
        if pending:
            client.cancel([f for _, f in pending])
