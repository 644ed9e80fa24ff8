"""Progress reporting and cancellation shared by the tiler, the engine and the writers.

Progress is counted in tiles (the unit of work between two cancel checks). A cancel request is
honoured between tiles: the current batch of tiles finishes, then :class:`Cancelled` is raised.
Both hooks may be called from dask worker threads, so the counter is thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

#: ``progress(done, total)``: tiles finished so far and tiles planned, both counted over the whole call.
ProgressCallback = Callable[[int, int], None]


class _EventLike(Protocol):
    def is_set(self) -> bool: ...


#: A cancel request: a ``threading.Event`` (or anything with ``is_set()``) or a function returning True to stop.
CancelRequest = _EventLike | Callable[[], bool] | None


class Cancelled(Exception):
    """The run was cancelled between two tiles; nothing after that point was computed.

    Attributes say what was done: ``tiles_done`` of ``tiles_total`` tiles, ``planes_done`` of
    ``planes_total`` complete planes (for stack writers), and ``output``, the path of an output
    store left marked incomplete (or None when nothing was written).
    """

    def __init__(
        self,
        message: str = "cancelled",
        *,
        tiles_done: int = 0,
        tiles_total: int = 0,
        planes_done: int | None = None,
        planes_total: int | None = None,
        output: str | None = None,
    ) -> None:
        super().__init__(message)
        self.tiles_done = tiles_done
        self.tiles_total = tiles_total
        self.planes_done = planes_done
        self.planes_total = planes_total
        self.output = output

    def with_planes(self, planes_done: int, planes_total: int, output: str | None = None) -> Cancelled:
        """A copy of this exception that also reports complete planes (and the output left behind)."""
        where = f"; incomplete output left at {output}" if output else ""
        return Cancelled(
            f"cancelled after {planes_done} of {planes_total} planes "
            f"({self.tiles_done} of {self.tiles_total} tiles){where}",
            tiles_done=self.tiles_done,
            tiles_total=self.tiles_total,
            planes_done=planes_done,
            planes_total=planes_total,
            output=output,
        )


def stop_check(cancel: CancelRequest) -> Callable[[], bool]:
    """Turn an Event, a callable or None into a function that says whether to stop now."""
    if cancel is None:
        return lambda: False
    is_set = getattr(cancel, "is_set", None)
    if callable(is_set):
        return lambda: bool(is_set())
    if callable(cancel):
        return lambda: bool(cancel())
    raise TypeError(f"cancel must be a threading.Event, a callable or None, not {type(cancel).__name__}")


class TileProgress:
    """Thread-safe tile counter that forwards ``(done, total)`` to a user callback.

    ``total`` can change while running (an out-of-memory fallback re-plans a plane with smaller
    tiles); :meth:`replan` adjusts it so that ``done`` still ends equal to ``total``.
    """

    def __init__(self, total: int, callback: ProgressCallback | None = None) -> None:
        self._lock = threading.Lock()
        self.done = 0
        self.total = int(total)
        self._callback = callback

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            done, total = self.done, self.total
        if self._callback is not None:
            self._callback(done, total)

    def replan(self, removed: int, added: int) -> None:
        """``removed`` planned tiles are replaced by ``added`` ones (done ones are not undone)."""
        with self._lock:
            self.total += added - removed

    def cancelled(self, message: str = "cancelled") -> Cancelled:
        with self._lock:
            return Cancelled(f"{message} after {self.done} of {self.total} tiles", tiles_done=self.done,
                             tiles_total=self.total)
