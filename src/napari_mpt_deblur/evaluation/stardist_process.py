"""Run StarDist (TensorFlow) in a separate, persistent worker process.

Why: TensorFlow carries its own copy of LLVM, and Mesa's OpenGL drivers that use LLVM
(llvmpipe, the software GL of VMs, remote desktops and Xvfb, and radeonsi on AMD GPUs) load
the system libLLVM into the process. With both loaded, whichever comes second crashes in an
LLVM static initialiser: on the reference machine (TensorFlow 2.21, Mesa llvmpipe under Xvfb)
``import tensorflow`` in a process that has shown a napari canvas segfaults, and so does
opening a napari canvas after importing TensorFlow. napari widgets (and anything else that
shares a process with an OpenGL canvas) therefore call StarDist through :func:`run_isolated`,
which keeps TensorFlow in a child process started with ``spawn`` (no GL, no inherited state).
The child stays alive, so TensorFlow is imported and each model loaded once per session.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

T = TypeVar("T")

_LOCK = threading.Lock()
_EXECUTOR: ProcessPoolExecutor | None = None


def _worker_init() -> None:
    # Inside the worker, StarDist runs where it is called: without this, library code run here
    # (e.g. compare_stardist) would start a worker of its own, which never exits with its parent.
    os.environ["MPT_DEBLUR_STARDIST_IN_PROCESS"] = "1"


def _executor() -> ProcessPoolExecutor:
    global _EXECUTOR
    with _LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init)
        return _EXECUTOR


def run_isolated(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in the StarDist worker process; blocks until it returns.

    ``fn`` must be importable by name (a module-level function) and its arguments and result
    picklable (numpy arrays are). Exceptions raised by ``fn`` are re-raised here. If the
    worker process dies, a ``RuntimeError`` says so and the next call starts a fresh one.
    """
    from .stardist_runner import require_stardist

    require_stardist()
    future = _executor().submit(fn, *args, **kwargs)
    try:
        return future.result()
    except BrokenProcessPool as exc:
        shutdown()
        raise RuntimeError(f"the StarDist worker process stopped unexpectedly ({exc}); try again") from exc


@atexit.register
def shutdown(timeout_s: float = 20.0) -> None:
    """Stop the worker process (it is restarted on the next :func:`run_isolated`).

    A worker still busy after ``timeout_s`` seconds is terminated.
    """
    global _EXECUTOR
    with _LOCK:
        executor, _EXECUTOR = _EXECUTOR, None
    if executor is None:
        return
    # Never hang the interpreter's exit on a stuck worker: ask it to stop, wait a little, then end it.
    processes = list(getattr(executor, "_processes", {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.join(timeout=timeout_s)
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
