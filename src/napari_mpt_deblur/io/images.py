"""Read and write images for the inference engine: TIFF (incl. LZW) and zarr / OME-Zarr.

* :func:`read_image` opens a file lazily (pages or chunks are read when a plane is needed) and
  reports its axes: given by the caller, read from the file (tifffile's series axes, OME-Zarr
  ``multiscales`` axes, this package's own ``mpt_deblur`` attributes), or guessed for 2D/3D arrays.
* :func:`write_tiff_pages` writes a TIFF from an iterator of planes, atomically, with the axes and
  a JSON metadata dict in the ImageDescription (tifffile "shaped" metadata).
* :class:`ZarrOutput` creates a zarr store marked incomplete, takes planes, and marks it complete
  (and writes OME-Zarr multiscales metadata) only at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .axes import guess_axes, normalise_axes
from .atomic import write_with
from .paths import TIFF_SUFFIXES, ImageReadError, check_output, check_writable, output_format  # noqa: F401 (re-exported)

ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")
#: Attribute key of this package's provenance/status record in zarr outputs.
STATUS_KEY = "mpt_deblur"


@dataclass
class ImageSource:
    """A lazily opened image: ``data`` (dask array), ``axes`` and where they came from."""

    data: Any
    axes: str
    axes_from: str  # "given", "file" or "guessed"
    path: Path | None = None
    scale: tuple[float, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def run_record(self) -> Any:
        """The :class:`~napari_mpt_deblur.io.run_record.RunRecord` of an mpt-deblur output, else None."""
        from .run_record import RunRecord

        return RunRecord.from_metadata(self.metadata.get(STATUS_KEY))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)


def is_zarr_path(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.suffix.lower() == ".zarr" or (path.is_dir() and any((path / m).exists() for m in ZARR_MARKERS))


def _remove_existing(out: Path) -> None:
    """Delete an output we were told to overwrite; refuse directories that are not zarr stores."""
    if not out.exists():
        return
    if out.is_dir():
        if not any((out / m).exists() for m in ZARR_MARKERS):
            raise ValueError(f"refusing to overwrite {out}: it is a directory but not a zarr store")
        shutil.rmtree(out)
    else:
        out.unlink()


# --------------------------------------------------------------------------------------------
# Reading


def read_array(path: str | os.PathLike) -> np.ndarray:
    """Read a whole image file into memory (TIFF incl. LZW, ``.npy``, PNG/JPEG...), any
    dimensionality; :class:`ImageReadError` naming the file when it is missing or unreadable.

    For big stacks that should stay lazy, use :func:`read_image` instead.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            with _quiet_tifffile() as logged:
                try:
                    with tifffile.TiffFile(path) as tif:
                        _check_tiff_complete(tif, path, logged)
                        arr = tif.asarray()
                except ImageReadError:
                    raise
                except Exception as exc:
                    raise _corrupt(path, exc, logged) from exc
        elif suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            from skimage.io import imread

            arr = imread(path)
    except ImageReadError:
        raise
    except Exception as exc:  # every reader has its own exception types; name the file for all
        raise ImageReadError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    arr = np.asarray(arr)
    if arr.dtype.kind not in "uif" or arr.size == 0:
        raise ImageReadError(f"{path}: not a numeric image (dtype {arr.dtype}, shape {arr.shape})")
    return arr


def read_image(path: str | os.PathLike, axes: str | None = None, model_channels: int = 1,
               allow_incomplete: bool = False) -> ImageSource:
    """Open a TIFF or zarr image lazily. Raises FileNotFoundError / ValueError with the path in the message."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.suffix.lower() in TIFF_SUFFIXES:
        src = _read_tiff(path)
    elif is_zarr_path(path):
        src = _read_zarr(path, allow_incomplete)
    else:
        raise ValueError(f"unsupported input {path}: expected a .tif/.tiff file or a zarr store")
    if axes is not None:
        axes = normalise_axes(axes)
        if len(axes) != src.data.ndim:
            raise ValueError(
                f"--axes {axes} has {len(axes)} letters but {path} has {src.data.ndim} dimensions "
                f"(shape {tuple(src.data.shape)}; axes in the file: {src.axes or 'none'})"
            )
        src.axes, src.axes_from = axes, "given"
    elif not src.axes:
        try:
            src.axes, src.axes_from = guess_axes(tuple(src.data.shape), model_channels), "guessed"
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    if src.scale is not None and len(src.scale) != src.data.ndim:
        src.scale = None
    return src


_TIFF_HANDLES: dict[str, Any] = {}
_TIFF_LOCK = threading.Lock()


class TiffPlanes:
    """Array-like view of a TIFF series that reads only the pages a slice needs (picklable).

    The first ``len(shape) - page_ndim`` axes enumerate pages; the rest are inside a page.
    """

    def __init__(self, path: str, series: int, shape: tuple[int, ...], dtype: np.dtype, page_ndim: int) -> None:
        self.path = str(path)
        self.series = series
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.page_ndim = page_ndim
        n_lead = self.ndim - page_ndim
        self.chunks = (1,) * n_lead + self.shape[n_lead:]

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def _handle(self):
        import tifffile

        tif = _TIFF_HANDLES.get(self.path)
        if tif is None or tif.filehandle.closed:
            tif = tifffile.TiffFile(self.path)
            _TIFF_HANDLES[self.path] = tif
        return tif

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        n_lead = self.ndim - self.page_ndim
        lead_shape = self.shape[:n_lead]
        ranges, squeeze = [], []
        for k, s in zip(key[:n_lead], lead_shape):
            if isinstance(k, slice):
                ranges.append(range(*k.indices(s)))
                squeeze.append(False)
            else:
                ranges.append(range(int(k), int(k) + 1))
                squeeze.append(True)
        counts = [len(r) for r in ranges]
        grids = np.meshgrid(*[np.asarray(r) for r in ranges], indexing="ij") if ranges else []
        flat = np.ravel_multi_index([g.ravel() for g in grids], lead_shape) if ranges else np.array([0])
        with _TIFF_LOCK:
            tif = self._handle()
            pages = [np.asarray(tif.asarray(key=int(i), series=self.series))[key[n_lead:]] for i in flat]
        inner = pages[0].shape if pages else ()
        out = np.stack(pages).reshape(tuple(counts) + inner) if pages else np.empty(tuple(counts), self.dtype)
        drop = tuple(i for i, sq in enumerate(squeeze) if sq)
        return out.squeeze(axis=drop) if drop else out


class _ListHandler(logging.Handler):
    def __init__(self, records: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[list[str]]:
    """Collect tifffile's log warnings (e.g. "invalid page offset" for a truncated file) instead
    of letting them print a stray line; our own error message says what they mean."""
    logger = logging.getLogger("tifffile")
    records: list[str] = []
    handler = _ListHandler(records)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _corrupt(path: Path, exc: BaseException | None, logged: list[str]) -> ImageReadError:
    detail = "; ".join(dict.fromkeys([*(m.split("> ", 1)[-1] for m in logged), *([str(exc)] if exc else [])]))
    return ImageReadError(f"{path}: the TIFF file is truncated or corrupt ({detail or 'no image in it'}); "
                          "copy or export it again")


def _check_tiff_complete(tif: Any, path: Path, logged: list[str]) -> None:
    """ImageReadError "truncated or corrupt" when the file has no image, lost pages, or image data
    that would run past its end (checked on the first and last page, without reading pixels)."""
    if not tif.series or logged:
        raise _corrupt(path, None, logged)
    size = path.stat().st_size
    pages = tif.series[0].pages
    for page in (pages[0], pages[len(pages) - 1]) if len(pages) else ():
        if page is None:
            raise _corrupt(path, None, ["pages are missing"])
        ends = [int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts)]
        if ends and max(ends) > size:
            raise _corrupt(path, None, [f"image data runs to byte {max(ends)} but the file has {size} bytes"])


@contextlib.contextmanager
def open_checked_tiff(path: Path) -> Iterator[Any]:
    """An open ``tifffile.TiffFile`` whose pages were checked to be complete; an unreadable,
    truncated or corrupt file raises :class:`ImageReadError` naming it (tifffile's own log lines
    go into the message instead of the console)."""
    import tifffile

    with _quiet_tifffile() as logged:
        try:
            tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, ValueError, OSError) as exc:
            raise _corrupt(path, exc, logged) from exc
        with tif:
            _check_tiff_complete(tif, path, logged)
            yield tif


def _read_tiff(path: Path) -> ImageSource:
    import dask.array as da
    import tifffile

    with open_checked_tiff(path) as tif:
        series = tif.series[0]
        shape, dtype, axes = tuple(series.shape), np.dtype(series.dtype), series.axes
        if len(set(axes)) != len(axes) or (len(axes) > 3 and "Q" in axes):
            # tifffile's placeholder letters (e.g. "QQYX" for a 4D file without axis names) are
            # no information: leave the axes unknown so the user is asked for --axes.
            axes = ""
        page_shape = tuple(series.keyframe.shape)
        n_pages = len(series.pages)
        meta: dict[str, Any] = {}
        if tif.shaped_metadata:
            meta = dict(tif.shaped_metadata[0])
        compression = str(series.keyframe.compression.name) if hasattr(series.keyframe.compression, "name") else ""
    if 0 in shape:
        raise ValueError(f"{path}: the image is empty (shape {shape})")
    page_ndim = len(page_shape)
    lead = shape[: len(shape) - page_ndim]
    lazy_ok = shape[len(shape) - page_ndim:] == page_shape and math.prod(lead) == n_pages
    if lazy_ok:
        data = da.from_array(TiffPlanes(str(path), 0, shape, dtype, page_ndim), chunks=(1,) * len(lead) + page_shape,
                             asarray=True, name=f"tiff-{path.name}-" + _file_token(path))
    else:  # unusual page layouts: read the series eagerly
        data = da.from_array(tifffile.imread(path, series=0))
    meta["compression"] = compression
    return ImageSource(data=data, axes=axes.upper(), axes_from="file", path=path, metadata=meta)


def _file_token(path: Path) -> str:
    st = path.stat()
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


def _ome_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    return attrs.get("ome", attrs) if isinstance(attrs.get("ome"), dict) else attrs


def _read_zarr(path: Path, allow_incomplete: bool) -> ImageSource:
    import dask.array as da
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for "not a store"
        raise ValueError(f"{path}: not a readable zarr store ({exc})") from exc
    axes, scale = "", None
    meta: dict[str, Any] = {}
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        status = attrs.get(STATUS_KEY)
        if isinstance(status, dict) and status.get("complete") is False and not allow_incomplete:
            raise ValueError(
                f"{path} is an incomplete mpt-deblur output ({status.get('planes_done', '?')} of "
                f"{status.get('planes_total', '?')} planes written; the write was {status.get('state', 'interrupted')}); "
                "delete it or write it again with overwrite"
            )
        ome = _ome_attrs(attrs)
        multiscales = ome.get("multiscales")
        if multiscales:
            ms = multiscales[0]
            ds = ms["datasets"][0]
            arr = node[ds["path"]]
            axes = "".join((a["name"] if isinstance(a, dict) else str(a)) for a in ms.get("axes", [])).upper()
            for t in ds.get("coordinateTransformations", []):
                if t.get("type") == "scale":
                    scale = tuple(float(v) for v in t["scale"])
        elif isinstance(status, dict) and "0" in node:
            arr, axes = node["0"], str(status.get("axes", ""))
        else:
            names = sorted(node.array_keys())
            if len(names) != 1:
                raise ValueError(
                    f"{path}: a zarr group with {len(names)} arrays ({', '.join(names) or 'none'}) and no OME-Zarr "
                    "metadata; pass the array's own path (e.g. store.zarr/0)"
                )
            arr = node[names[0]]
        if isinstance(status, dict):
            meta[STATUS_KEY] = status
    else:
        arr = node
        dims = dict(arr.attrs).get("_ARRAY_DIMENSIONS") or getattr(arr.metadata, "dimension_names", None)
        if dims and all(isinstance(d, str) and len(d) == 1 for d in dims):
            axes = "".join(dims).upper()
    if axes and len(axes) != arr.ndim:
        axes = ""
    if 0 in arr.shape:
        raise ValueError(f"{path}: the image is empty (shape {tuple(arr.shape)})")
    data = da.from_zarr(arr)
    return ImageSource(data=data, axes=axes, axes_from="file" if axes else "guessed", path=path, scale=scale,
                       metadata=meta)


# --------------------------------------------------------------------------------------------
# Writing


def json_safe(obj: Any) -> Any:
    """``obj`` round-tripped through JSON (non-serialisable values become strings)."""
    return json.loads(json.dumps(obj, default=str))


def write_tiff_pages(out: str | os.PathLike, pages: Iterable[np.ndarray], *, shape: tuple[int, ...], dtype: Any,
                     axes: str, metadata: dict[str, Any], rgb: bool = False, compression: str | None = "zlib",
                     final_metadata: Any = None) -> None:
    """Write planes (each (Y, X), or (Y, X, S) for RGB) as TIFF pages, atomically.

    ``metadata`` is stored under ``"mpt_deblur"`` in the JSON ImageDescription next to ``"axes"``;
    read it back with ``tifffile.TiffFile(out).shaped_metadata[0]``. ``final_metadata()``, if
    given, replaces it once every page is written. If ``pages`` raises, the partial file is
    removed and the exception propagates.
    """
    import tifffile

    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    meta = {"axes": axes, STATUS_KEY: json_safe(metadata)}

    def writer(tmp: Path) -> None:
        tifffile.imwrite(tmp, iter(pages), shape=shape, dtype=dtype, photometric="rgb" if rgb else "minisblack",
                         planarconfig="contig" if rgb else None, metadata=meta, compression=compression,
                         bigtiff=nbytes > 2**32 - 2**25)
        if final_metadata is not None:
            from .run_record import rewrite_tiff_record

            rewrite_tiff_record(tmp, STATUS_KEY, json_safe(final_metadata()))

    write_with(out, writer)


class ZarrOutput:
    """A zarr store being written plane by plane; see :meth:`create` and :meth:`finish`.

    Layout: a group at ``path`` with the array ``"0"`` and group attributes
    ``mpt_deblur = {"complete": False, "state": "writing", "planes_done": k, "planes_total": n,
    "axes": ..., model and settings...}``. Float outputs are filled with NaN until written, so an
    unwritten plane of an interrupted store is visibly missing.
    """

    def __init__(self, path: Path, group: Any, array: Any, status: dict[str, Any], scale: tuple[float, ...] | None):
        self.path = path
        self.group = group
        self.array = array
        self.status = status
        self.scale = scale

    @property
    def planes_done(self) -> int:
        return int(self.status["planes_done"])

    @classmethod
    def create(cls, path: str | os.PathLike, *, shape: tuple[int, ...], dtype: Any, axes: str,
               chunks: tuple[int, ...], metadata: dict[str, Any], planes_total: int, overwrite: bool = False,
               scale: tuple[float, ...] | None = None) -> ZarrOutput:
        import zarr

        path = Path(path)
        check_output(path, overwrite=overwrite)
        if overwrite:
            _remove_existing(path)
        dtype = np.dtype(dtype)
        status = {"complete": False, "state": "writing", "planes_done": 0, "planes_total": int(planes_total),
                  "axes": axes, **json_safe(metadata)}
        # The incomplete marker is written with the group, before any data.
        group = zarr.open_group(str(path), mode="w-", attributes={STATUS_KEY: status})
        fill = float("nan") if np.issubdtype(dtype, np.floating) else 0
        array = group.create_array("0", shape=shape, chunks=chunks, dtype=dtype, fill_value=fill)
        return cls(path, group, array, status, scale)

    def _save_status(self) -> None:
        self.group.attrs[STATUS_KEY] = self.status

    def write(self, region: tuple[slice, ...], block: np.ndarray) -> None:
        """Write one restored plane (as a block in the array's axis order) and count it."""
        self.array[region] = block
        self.status["planes_done"] += 1
        self._save_status()

    def mark_stopped(self, state: str) -> None:
        self.status["state"] = state
        self._save_status()

    def finish(self, final_metadata: dict[str, Any] | None = None) -> None:
        """Write OME-Zarr multiscales metadata (when the axes allow it) and flip ``complete`` to True."""
        if final_metadata:
            for key in ("fallbacks", "tile_in_use", "settings_in_use", "seconds"):
                if key in final_metadata:
                    self.status[key] = json_safe(final_metadata[key])
        self.status["ome"] = _write_ome_metadata(self.group, self.status["axes"], self.array.ndim, self.scale)
        self.status.update(complete=True, state="complete")
        self._save_status()


def _write_ome_metadata(group: Any, axes: str, ndim: int, scale: tuple[float, ...] | None) -> str:
    """OME-Zarr multiscales for dataset "0"; returns "written" or why not (e.g. axes OME cannot express)."""
    try:
        from ome_zarr.writer import write_multiscales_metadata
    except ImportError:
        return "not written: ome-zarr is not installed"
    names = [("c" if a in "CS" else a.lower()) for a in axes]
    if any(n not in "tczyx" for n in names):
        return f"not written: axes {axes} are not OME-Zarr axes (t, c, z, y, x)"
    transform = [{"type": "scale", "scale": list(scale) if scale else [1.0] * ndim}]
    try:
        write_multiscales_metadata(group, datasets=[{"path": "0", "coordinateTransformations": transform}], axes=names)
    except (ValueError, TypeError, KeyError) as exc:
        return f"not written: {exc}"
    return "written"
