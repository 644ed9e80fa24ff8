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


class MissingMainGuard(RuntimeError):
    """A script starts StarDist at import time; the spawned worker would run it again."""


def _guard_message(script: str) -> str:
    return (f"{script} runs napari-mpt-deblur's StarDist step at the top level of the script. StarDist runs in a "
            "separate, spawned process, which imports the script again and would start everything a second time. "
            'Put the script\'s code under `if __name__ == "__main__":` (see docs/napari.md, "Scripting the widgets").')


def _check_main_guard() -> None:
    """Refuse, with a message that says what to do, when the StarDist worker cannot be started:

    * in the spawned child while it re-imports an unguarded script (multiprocessing would raise a
      long "bootstrapping phase" RuntimeError there and the parent would only see a dead worker);
    * in the parent, when ``__main__`` is a ``.py`` script with no ``if __name__ == "__main__":``
      block, before anything is spawned.
    """
    import ast
    import sys

    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None) or "the script"
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise MissingMainGuard(_guard_message(script))
    if not (isinstance(script, str) and script.endswith(".py") and os.path.isfile(script)):
        return  # an interpreter, a notebook, python -m ...: nothing is re-run
    try:
        with open(script, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return
    guarded = any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)
    if not guarded:
        raise MissingMainGuard(_guard_message(script))


def _executor() -> ProcessPoolExecutor:
    global _EXECUTOR
    with _LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init)
        return _EXECUTOR


def run_isolated(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in the StarDist worker process; blocks until it returns.

    Generic: nothing here knows StarDist (callers check that what ``fn`` needs is installed, as
    :mod:`.stardist_runner` does, so a missing package is reported before a process is spawned).
    ``fn`` must be importable by name (a module-level function) and its arguments and result
    picklable (numpy arrays are). Exceptions raised by ``fn`` are re-raised here. If the
    worker process dies, a ``RuntimeError`` says so and the next call starts a fresh one.
    """
    _check_main_guard()
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
