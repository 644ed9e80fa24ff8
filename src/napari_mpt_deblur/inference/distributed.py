"""Run the engine's per-chunk function on a dask.distributed cluster (docs/inference.md).

The same :class:`~napari_mpt_deblur.inference.restorer.PlaneFunction` that ``Deblurrer.deblur``
maps over planes is sent to the workers. A :class:`~napari_mpt_deblur.inference.engine.Deblurrer`
pickles *by reference* (model path + requested settings) and is rebuilt on the worker by
:func:`~napari_mpt_deblur.inference.drivers.engine_for`, which caches it per process: each worker
process reads the model once, however many planes it restores. ``device="auto"`` is resolved on
the worker, so GPU workers use their GPU.

One GPU per worker: a LocalCluster started here on a machine with N visible GPUs has N worker
processes, each started with ``CUDA_VISIBLE_DEVICES`` set to its own GPU (as dask-cuda's
``LocalCUDACluster`` does), so ``cuda`` inside worker k is GPU k. Workers of a remote cluster
are pinned the same way when each is started with its own ``CUDA_VISIBLE_DEVICES`` (or by
``dask cuda worker``); workers that all see every GPU of their host can be spread over them
afterwards with :func:`pin_gpus`.

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


def visible_gpus() -> list[str]:
    """The CUDA GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` entries if set, else 0..N-1.

    Entries are kept as given (indices or ``GPU-...`` UUIDs); like CUDA, the list ends at the first
    negative index. Does not initialise CUDA.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        gpus = []
        for entry in (e.strip() for e in env.split(",")):
            if not entry or entry.startswith("-"):
                break
            gpus.append(entry)
        return gpus
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable CUDA runtime: no GPUs
        return []


def gpu_worker_specs(gpus: list[str], threads_per_worker: int = 1) -> dict[str, dict]:
    """dask worker specs (``SpecCluster(workers=...)``): one Nanny-managed process per GPU.

    Worker ``gpu-<id>`` is started with ``CUDA_VISIBLE_DEVICES=<id>``, so it sees one GPU, as
    ``cuda`` (= ``cuda:0``) inside it.
    """
    from distributed import Nanny

    return {f"gpu-{g}": {"cls": Nanny, "options": {"nthreads": threads_per_worker,
                                                   "env": {"CUDA_VISIBLE_DEVICES": str(g)}}}
            for g in gpus}


def connect(scheduler: str | None = "local", *, n_workers: int | None = None, threads_per_worker: int = 1,
            processes: bool = True, torch_threads: int | None = None, timeout: float = 30.0,
            gpus: str | list[str] | None = "auto"):
    """A ``distributed.Client``: a new LocalCluster for ``"local"``/None, else the scheduler at that address.

    ``gpus`` (local cluster of processes only): ``"auto"`` starts one worker per visible GPU
    (:func:`visible_gpus`), each pinned to its GPU with ``CUDA_VISIBLE_DEVICES``, when there are
    any; a list of GPU ids does the same for those GPUs; ``None`` or no GPU: ``n_workers``
    (default 1) workers that each see every GPU. A worker count given together with GPUs must
    equal their number.

    dask starts worker processes with ``OMP_NUM_THREADS=1``; for a LocalCluster of processes the
    torch thread count of each worker is set to ``torch_threads`` (default: the CPU cores divided
    by the number of worker threads), since one forward pass uses all the threads it is given.
    """
    from distributed import Client, LocalCluster

    if scheduler in (None, "", "local"):
        gpu_list = (visible_gpus() if gpus == "auto" else [str(g) for g in gpus]) if gpus and processes else []
        if gpu_list:
            if n_workers is not None and n_workers != len(gpu_list):
                raise ValueError(f"n_workers={n_workers} but {len(gpu_list)} GPUs ({','.join(gpu_list)}): "
                                 "one worker per GPU; pass gpus=None for workers that share the GPUs")
            from distributed import Scheduler, SpecCluster

            cluster = SpecCluster(
                workers=gpu_worker_specs(gpu_list, threads_per_worker),
                scheduler={"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": None}},
                name="mpt-deblur-gpus",
            )
            n_workers = len(gpu_list)
        else:
            n_workers = 1 if n_workers is None else n_workers
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=processes,
                                   dashboard_address=None)
        client = Client(cluster)
        client.wait_for_workers(n_workers, timeout=max(timeout, 120))
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


def assign_gpus(workers: dict[str, tuple[str, int]]) -> dict[str, int]:
    """Spread workers over the GPUs of their host: ``{address: (host, n_gpus)}`` -> ``{address: gpu index}``.

    Workers of one host, in address order, get GPUs 0, 1, ... (round robin when there are more
    workers than GPUs); a host without GPUs gets none (-1).
    """
    by_host: dict[str, list[str]] = {}
    for addr, (host, _) in workers.items():
        by_host.setdefault(host, []).append(addr)
    choice = {}
    for addrs in by_host.values():
        for i, addr in enumerate(sorted(addrs)):
            n = workers[addr][1]
            choice[addr] = i % n if n > 0 else -1
    return choice


def _worker_gpus() -> tuple[str, int]:
    import socket

    return socket.gethostname(), len(visible_gpus())


def _use_gpu(index: int) -> int:
    from .devices import set_default_cuda_device

    set_default_cuda_device(index if index >= 0 else None)
    return index


def pin_gpus(client) -> dict[str, int]:
    """Give each worker of a running cluster its own GPU of its host (``device="auto"`` -> ``cuda:k``).

    For workers that all see every GPU (e.g. ``dask worker --nworkers 4`` on a 4-GPU node). Call it
    right after connecting, before any model is loaded on the workers. Returns ``{address: k}``.
    """
    choice = assign_gpus(client.run(_worker_gpus))
    for addr, k in choice.items():
        client.run(_use_gpu, k, workers=[addr])
    return choice


def worker_model_loads(client) -> dict[str, int]:
    """How many times each worker process has read model weights (one per model and device)."""
    from .model_cache import model_load_count

    return client.run(model_load_count)


def iter_planes_on_cluster(engine, prep, lohi, counter: TileProgress, should_stop, client, *,
                           ordered: bool = True, window: int | None = None,
                           ) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """Yield ``(leading index, restored plane)`` computed on the cluster, at most ``window`` in flight.

    ``ordered`` yields in plane order (for TIFF pages); otherwise as planes finish. Progress
    advances by whole planes; a cancel request cancels the planes in flight and raises
    :class:`~napari_mpt_deblur.inference.progress.Cancelled`.
    """
    from .restorer import PlaneFunction

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
