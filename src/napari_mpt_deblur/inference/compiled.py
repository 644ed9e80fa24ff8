"""Optional ``torch.compile`` of the model for the engine's fixed tile shapes.

The engine cuts every plane into tiles of one shape (:func:`.tiling.plan_tiles`) and calls the
model on batches of ``batch_size`` of them, so one compiled graph per (batch, C, h, w) serves a
whole run. Partial last batches are padded to the full batch so they reuse that graph instead
of compiling another. :func:`warm_up` compiles and runs the graph once on zeros, so that the
first real plane does not pay for compilation (a GUI can call it while the user looks around).
With ``orientations`` (:mod:`.orientations`), 8 orientations of a non-square tile and an odd
whole-image tile extended to even each bring a second shape, hence a second compiled graph (the
four flips of one shape share one).

Compilation is an optimisation only: when it fails (no C++ compiler for inductor on CPU, an
unsupported platform or operator), a ``RuntimeWarning`` says why, the engine's ``events`` (saved
in output metadata as a fallback) record it, and the model runs eagerly from then on.
Out-of-memory errors are not compile failures: they go back to the engine, which shrinks tiles.

Whether compile is on by default per device: :data:`COMPILE_DEFAULTS` (decided from the
measurements in docs/performance.md).
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable

import torch

#: ``InferenceSettings.compile = None`` means this per device type. CPU: off, because on the
#: 2-core reference machine compiling the MPT took longer than it saved on a typical plane and
#: the steady-state gain was small (docs/performance.md, "Compiled inference"). GPUs: off until
#: measured on one (no GPU was available to the session that wrote this).
COMPILE_DEFAULTS = {"cpu": False, "cuda": False, "mps": False}


def compile_wanted(setting: bool | None, device: torch.device) -> bool:
    """The user's ``compile`` setting, or the device default when it is None."""
    if setting is not None:
        return bool(setting)
    return COMPILE_DEFAULTS.get(device.type, False)


class CompiledForward:
    """Calls ``model`` through ``torch.compile`` (static shapes), falling back to eager once it fails.

    ``model``: an ``nn.Module`` taking (B, C, h, w) float tensors. ``backend`` and ``mode`` go to
    ``torch.compile``. ``on_fallback(message)`` is called once when compilation fails.
    Thread-safe (calls are serialised: the engine already holds a lock around model calls).
    """

    def __init__(self, model: torch.nn.Module, backend: str | Callable = "inductor", mode: str | None = None,
                 on_fallback: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.backend = backend
        self.mode = mode
        self.on_fallback = on_fallback
        self.failed: str | None = None
        self._fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._batch: int | None = None  # batch size of the compiled graph (partial batches are padded)
        self._shapes: set[tuple[int, ...]] = set()
        self._lock = threading.Lock()

    @property
    def compiled_shapes(self) -> set[tuple[int, ...]]:
        """Input shapes a compiled graph has run with (empty before the first call or after a fallback)."""
        return set(self._shapes)

    def _fall_back(self, exc: BaseException) -> None:
        # dynamo wraps the real reason (e.g. "no C++ compiler") in BackendCompilerFailed: report the root.
        root = exc
        while getattr(root, "inner_exception", None) is not None or root.__cause__ is not None:
            root = getattr(root, "inner_exception", None) or root.__cause__
        lines = [line.strip() for line in str(root).splitlines() if line.strip()]
        reason = f"{type(root).__name__}: {lines[0][:300]}" if lines else type(root).__name__
        self.failed = f"torch.compile failed ({reason}); the model runs eagerly"
        self._fn = None
        self._shapes.clear()
        warnings.warn(self.failed, RuntimeWarning, stacklevel=3)
        if self.on_fallback is not None:
            self.on_fallback(self.failed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from .devices import is_out_of_memory

        with self._lock:
            if self.failed is not None:
                return self.model(x)
            n = x.shape[0]
            self._batch = max(self._batch or 0, n)
            pad = self._batch - n
            if pad > 0:  # a partial last batch: pad with zeros to reuse the compiled graph
                channels_last = x.is_contiguous(memory_format=torch.channels_last)
                x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
            try:
                if self._fn is None:
                    self._fn = torch.compile(self.model, backend=self.backend, mode=self.mode, dynamic=False)
                y = self._fn(x)
                self._shapes.add(tuple(x.shape))
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise
                self._fall_back(exc)
                return self.model(x[:n])
            return y[:n] if pad > 0 else y


def compiled_forward(engine: Any, x: torch.Tensor) -> torch.Tensor:
    """The engine's model call: compiled when its settings (or the device default) ask for it.

    ``engine``: a :class:`~.engine.Deblurrer`. The :class:`CompiledForward` is kept on the engine
    (one per engine, hence per model and settings). Shapes: (B, C, h, w) -> (B, C, h, w).
    """
    if not compile_wanted(getattr(engine.requested, "compile", None), engine.device):
        return engine.model(x)
    runner = engine.__dict__.get("_compiled_forward")
    if runner is None:
        runner = CompiledForward(engine.model, on_fallback=engine.events.append)
        engine._compiled_forward = runner
    return runner(x)


def warm_up(engine: Any, height: int, width: int) -> float:
    """Compile (if enabled) and run the model once on zeros of the tile shape a (height, width)
    plane will use; returns the seconds it took. Later planes of that size reuse the graph.

    Also worth calling without compile: the first eager call of a process pays for one-time
    allocations and kernel selection.
    """
    import time

    import numpy as np

    from .tiling import plan_tiles

    tile, overlap, batch = engine.current_tile
    grid = plan_tiles(height, width, tile, overlap, engine.size_multiple)
    n = min(batch, len(grid))
    zeros = np.zeros((n, engine.in_channels, grid.tile_h, grid.tile_w), dtype=np.float32)
    t0 = time.perf_counter()
    engine._forward_tiles(zeros)
    return time.perf_counter() - t0
