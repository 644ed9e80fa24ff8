"""Paths: which suffixes are images, listing an image folder, and checking an output path.

One home for each: training data sources, fine-tuning, evaluation (``mpt-deblur evaluate``) and
the benchmark list folders with :func:`list_images`, so every front end sees the same files; the
engine, CLI and widgets check outputs with :func:`check_output` before any work starts.
"""

from __future__ import annotations

import os
from pathlib import Path

#: TIFF suffixes (the format the engine writes, and reads lazily).
TIFF_SUFFIXES = (".tif", ".tiff")
#: Every suffix :func:`~napari_mpt_deblur.io.images.read_array` reads as a whole image.
IMAGE_SUFFIXES = (*TIFF_SUFFIXES, ".png", ".jpg", ".jpeg", ".bmp", ".npy")


class ImageReadError(ValueError):
    """An image file could not be read or is not a usable image (the message names it)."""


def list_images(folder: str | os.PathLike, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """Files in ``folder`` whose suffix (any case) is one of ``suffixes``, sorted by name; hidden
    files (``.name``) are skipped. :class:`ImageReadError` naming the folder when it is missing or
    holds no such file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes
                   and not p.name.startswith("."))
    if not files:
        raise ImageReadError(f"no images ({', '.join(suffixes)}) in {folder}")
    return files


def output_format(path: str | os.PathLike) -> str:
    """``"tiff"`` or ``"zarr"`` from an output path's suffix; ValueError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix == ".zarr":
        return "zarr"
    raise ValueError(f"unsupported output {path}: use a .tif/.tiff file or a .zarr store")


def check_output(out: str | os.PathLike, *, overwrite: bool, input_path: str | os.PathLike | None = None) -> None:
    """Refuse to write over an existing output (unless ``overwrite``) or over the input itself."""
    out = Path(out)
    if input_path is not None and out.resolve() == Path(input_path).resolve():
        raise ValueError(f"output {out} is the input file; choose another output path")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; choose another path or pass overwrite (--overwrite)")
    check_writable(out)


def check_writable(out: str | os.PathLike) -> None:
    """Fail early, naming ``out``, when it cannot be created: a parent is a file, or the nearest
    existing folder is not writable (the write itself would fail only after all the work)."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"cannot write {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {out}: no permission to create files in {parent}")
