"""Atomic file writes: write to a temporary file beside the target, then rename over it.

A crash or a full disk mid-write leaves the previous file (or nothing) in place, never a
truncated file that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _current_umask() -> int:
    # os.umask can only be read by setting it; do it once, at import, before any threads write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Mode of new files: what open() would give (0o666 minus the umask). mkstemp alone gives 0o600,
#: which would make every output readable by its owner only.
_FILE_MODE = 0o666 & ~_current_umask()


def _renamed(exc: OSError, target: Path) -> OSError:
    """The same kind of error, its message naming ``target`` (one line, errno kept as attribute)."""
    new = type(exc)(f"cannot write {target}: {exc.strerror or exc}")
    new.errno = exc.errno
    return new


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is fsynced and renamed onto it.

    The temporary file is hidden (leading dot) and keeps the target's suffix (or ``suffix``), so
    libraries that pick a format from the file name still see the right one.
    """
    target = Path(target)
    for parent in (target.parent, *target.parent.parents):
        if parent.exists():
            if not parent.is_dir():  # mkdir would say only "[Errno 17] File exists"
                raise NotADirectoryError(f"cannot write {target}: {parent} is a file, not a folder")
            break
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix if suffix is None else suffix,
                                   dir=target.parent)
    except OSError as exc:
        # Name the file the user asked for, not the hidden temporary one beside it.
        raise _renamed(exc, target) from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _FILE_MODE)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except OSError as exc:
        if exc.filename is not None and Path(exc.filename) == tmp_path:
            raise _renamed(exc, target) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def write_with(target: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``target`` atomically."""
    with atomic_path(target) as tmp:
        writer(tmp)
