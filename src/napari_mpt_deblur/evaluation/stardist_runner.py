"""StarDist2D nuclei segmentation for the before/after comparison (docs/stardist.md).

This is the only module of the package that imports TensorFlow (through ``stardist``), and only
inside functions: importing it is cheap. By default TensorFlow runs in a separate StarDist worker
process (:mod:`.stardist_process`), never in the caller's: TensorFlow and an OpenGL canvas
(napari) crash each other in one process, and a separate process also keeps TensorFlow's threads
and memory away from PyTorch. ``MPT_DEBLUR_STARDIST_IN_PROCESS=1`` (or ``in_process=True``) runs
it in the caller's process instead. TensorFlow is kept on the CPU unless ``use_gpu=True`` (its
GPUs are hidden before first use), so it never competes with PyTorch for GPU memory.

Models come from (see :func:`resolve_model`):

* the project's shipped model (default, ``None`` / ``"shipped"``), trained on real U2OS nuclei by
  ``scripts/train_stardist.py`` and stored in ``evaluation/stardist_models/<name>/``; works offline;
* a local StarDist model folder (``config.json`` + ``weights_best.h5`` / ``weights_last.h5``,
  optionally ``thresholds.json``), e.g. one you trained yourself;
* a registered StarDist name (``2D_versatile_fluo`` ...): downloaded by StarDist on first use, so it
  needs the internet once; offline it fails with :class:`StarDistModelError` naming the problem.

Images are normalised per plane as StarDist's models expect: csbdeep ``normalize(img, 1, 99.8)``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

SHIPPED_MODELS_DIR = Path(__file__).resolve().parent / "stardist_models"
#: The shipped model used when no model is named.
DEFAULT_MODEL = "u2os_nuclei_2d"
#: Images with more pixels than this per plane go through ``predict_instances_big`` (blockwise).
BIG_IMAGE_PIXELS = 4096 * 4096
_REQUIRED_PACKAGES = ("stardist", "tensorflow", "csbdeep")


class StarDistUnavailable(ImportError):
    """stardist / tensorflow are not installed (an optional extra of this package)."""


class StarDistModelError(RuntimeError):
    """A StarDist model could not be found, downloaded or loaded; the message says which and why."""


def missing_packages() -> list[str]:
    """The packages StarDist needs that are not installed (empty when all are there); imports nothing."""
    return [p for p in _REQUIRED_PACKAGES if importlib.util.find_spec(p) is None]


def is_available() -> bool:
    """True when stardist, tensorflow and csbdeep are installed (checked without importing them)."""
    return not missing_packages()


def require_stardist() -> None:
    missing = missing_packages()
    if missing:
        raise StarDistUnavailable(
            f"StarDist segmentation needs the optional packages {', '.join(missing)}, which are not installed. "
            "Install them with: pip install 'napari-mpt-deblur[stardist]'"
        )


_TF_LOCK = threading.RLock()
_TF_CONFIGURED: dict[str, bool] = {}


def configure_tensorflow(use_gpu: bool = False) -> None:
    """Import TensorFlow quietly and hide its GPUs unless ``use_gpu`` (once per process).

    Hiding GPUs only works before TensorFlow has initialised its devices; if something else
    already did, TensorFlow keeps what it has and a warning says so.
    """
    require_stardist()
    with _TF_LOCK:
        if "done" in _TF_CONFIGURED:
            return
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        if not use_gpu:
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError as exc:  # devices already initialised by another user of TF
                import warnings

                warnings.warn(f"could not hide TensorFlow's GPUs (already initialised): {exc}", stacklevel=2)
        _TF_CONFIGURED["done"] = True
        _TF_CONFIGURED["gpu"] = use_gpu


@dataclass(frozen=True)
class ModelSource:
    """Where a StarDist model comes from: the shipped one, a local folder, or a registered name."""

    kind: Literal["shipped", "folder", "registered"]
    name: str
    path: Path | None = None

    def describe(self) -> str:
        if self.kind == "registered":
            return f"registered StarDist model '{self.name}'"
        return f"{'shipped' if self.kind == 'shipped' else 'local'} StarDist model '{self.name}' ({self.path})"


def shipped_models() -> list[str]:
    """Names of the StarDist models shipped inside the package."""
    if not SHIPPED_MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_MODELS_DIR.iterdir() if (p / "config.json").is_file())


def _check_model_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise StarDistModelError(f"{folder} is not a StarDist model folder: it has no config.json")
    if not any((folder / w).is_file() for w in ("weights_best.h5", "weights_last.h5")):
        raise StarDistModelError(f"StarDist model folder {folder} has no weights_best.h5 or weights_last.h5")


def resolve_model(spec: str | os.PathLike | None = None) -> ModelSource:
    """Decide where ``spec`` points, without importing TensorFlow or touching the network.

    ``None``, ``""``, ``"shipped"`` or ``"default"`` -> the default shipped model; the name of a
    shipped model -> that model; an existing folder -> a local model (it must hold
    ``config.json`` and weights); something that looks like a path but does not exist -> error;
    any other string -> a registered StarDist name (checked when loading).
    """
    if spec is None or str(spec).strip() in ("", "shipped", "default"):
        spec = DEFAULT_MODEL
    text = str(spec)
    if text in shipped_models():
        folder = SHIPPED_MODELS_DIR / text
        _check_model_folder(folder)
        return ModelSource("shipped", text, folder)
    path = Path(text).expanduser()
    if path.is_dir():
        _check_model_folder(path)
        return ModelSource("folder", path.name, path.resolve())
    if path.exists():
        raise StarDistModelError(f"StarDist model {path} is a file; give the model's folder (with config.json)")
    if isinstance(spec, os.PathLike) or os.sep in text or text.startswith((".", "~")):
        raise StarDistModelError(f"StarDist model folder {path} does not exist")
    if text == DEFAULT_MODEL:
        raise StarDistModelError(
            f"the shipped StarDist model '{DEFAULT_MODEL}' is missing from {SHIPPED_MODELS_DIR}; "
            "reinstall the package or retrain it with scripts/train_stardist.py"
        )
    return ModelSource("registered", text, None)


@dataclass(frozen=True)
class StarDistModel:
    """A StarDist2D model ready to segment, and where it came from.

    The TensorFlow model itself lives in the StarDist worker process (see
    :mod:`.stardist_process`: TensorFlow must not share a process with an OpenGL canvas), or in
    this process when ``in_process`` is true; this handle is what callers pass around.
    """

    source: ModelSource
    thresholds: dict[str, float]
    use_gpu: bool = False
    in_process: bool = False


def _load_registered(name: str):
    from csbdeep.models.pretrained import get_registered_models
    from stardist.models import StarDist2D

    names, aliases = get_registered_models(StarDist2D)
    known = {n: n for n in names}
    for n, al in aliases.items():
        for a in al:
            known[a] = n
    if name not in known:
        raise StarDistModelError(
            f"'{name}' is neither a shipped StarDist model ({', '.join(shipped_models()) or 'none'}), "
            f"an existing model folder, nor a registered StarDist2D model ({', '.join(names)})"
        )
    try:
        model = StarDist2D.from_pretrained(name)
    except Exception as exc:  # keras' get_file raises a bare Exception on a failed download
        raise StarDistModelError(
            f"could not get the registered StarDist model '{name}': StarDist downloads it from the internet on "
            f"first use and that failed (offline?): {exc}. Use the shipped model (the default, "
            f"'{DEFAULT_MODEL}') or a local model folder instead."
        ) from exc
    if model is None:
        raise StarDistModelError(f"StarDist could not provide the registered model '{name}'")
    return model


#: TensorFlow models loaded in THIS process (the StarDist worker, or the caller in in-process mode).
_TF_MODELS: dict[tuple[str, str, bool], Any] = {}
#: Handles already returned by :func:`load_stardist` in this process.
_HANDLES: dict[tuple[str, str, bool, bool], StarDistModel] = {}


def _source_key(source: ModelSource, use_gpu: bool) -> tuple[str, str, bool]:
    return source.kind, str(source.path) if source.path else source.name, use_gpu


def _tf_model(source: ModelSource, use_gpu: bool):
    """The StarDist2D model of ``source`` in this process, loaded on first use (imports TensorFlow)."""
    key = _source_key(source, use_gpu)
    with _TF_LOCK:
        if key in _TF_MODELS:
            return _TF_MODELS[key]
        configure_tensorflow(use_gpu)
        from stardist.models import StarDist2D

        if source.kind == "registered":
            model = _load_registered(source.name)
        else:
            assert source.path is not None
            try:
                # StarDist prints what it loads; keep the CLI / widget output clean.
                with contextlib.redirect_stdout(io.StringIO()):
                    model = StarDist2D(None, name=source.path.name, basedir=str(source.path.parent))
            except Exception as exc:
                raise StarDistModelError(f"could not load {source.describe()}: {exc}") from exc
        if int(getattr(model.config, "n_dim", 2)) != 2:
            raise StarDistModelError(f"{source.describe()} is not a 2D StarDist model")
        _TF_MODELS[key] = model
        return model


def _thresholds_here(source: ModelSource, use_gpu: bool) -> dict[str, float]:
    t = _tf_model(source, use_gpu).thresholds
    return {"prob": float(t.prob), "nms": float(t.nms)}


def _segment_here(source: ModelSource, use_gpu: bool, img: np.ndarray, prob_thresh: float | None,
                  nms_thresh: float | None, n_tiles: tuple[int, int] | None, normalise: bool) -> np.ndarray:
    model = _tf_model(source, use_gpu)
    x = normalise_for_stardist(img) if normalise else img.astype(np.float32, copy=False)
    kwargs = {"prob_thresh": prob_thresh, "nms_thresh": nms_thresh}
    with contextlib.redirect_stdout(io.StringIO()):
        if x.size > BIG_IMAGE_PIXELS:
            labels, _ = model.predict_instances_big(
                x, axes="YX", block_size=2048, min_overlap=128, context=128, show_progress=False, **kwargs
            )
        else:
            labels, _ = model.predict_instances(x, n_tiles=n_tiles, show_tile_progress=False, verbose=False, **kwargs)
    return np.asarray(labels, dtype=np.int32)


def in_process_default() -> bool:
    """Whether StarDist runs in the caller's process by default (``MPT_DEBLUR_STARDIST_IN_PROCESS=1``).

    Off by default: only safe where no OpenGL canvas (napari, vispy) ever shares the process.
    """
    return os.environ.get("MPT_DEBLUR_STARDIST_IN_PROCESS", "") == "1"


def _call(model_in_process: bool, fn: Callable[..., Any], *args: Any) -> Any:
    if model_in_process:
        return fn(*args)
    from .stardist_process import run_isolated

    require_stardist()  # before spawning: the worker would only fail on import
    return run_isolated(fn, *args)


def load_stardist(spec: str | os.PathLike | None = None, use_gpu: bool = False,
                  in_process: bool | None = None) -> StarDistModel:
    """Load (once per process; later calls return the same handle) the StarDist2D model ``spec``
    points to, in the StarDist worker process unless ``in_process`` (default:
    :func:`in_process_default`).

    Raises :class:`StarDistUnavailable` when stardist/tensorflow are missing and
    :class:`StarDistModelError` when the model cannot be found, downloaded or loaded.
    """
    source = resolve_model(spec)
    here = in_process_default() if in_process is None else in_process
    if here:
        require_stardist()
    key = (*_source_key(source, use_gpu), here)
    if key in _HANDLES:
        return _HANDLES[key]
    handle = StarDistModel(source, _call(here, _thresholds_here, source, use_gpu), use_gpu, here)
    _HANDLES[key] = handle
    return handle


def normalise_for_stardist(plane: np.ndarray, pmin: float = 1.0, pmax: float = 99.8) -> np.ndarray:
    """csbdeep ``normalize(plane, pmin, pmax)`` as float32: what StarDist's models were trained on."""
    from csbdeep.utils import normalize

    return normalize(np.asarray(plane, dtype=np.float32), pmin, pmax, axis=(0, 1)).astype(np.float32)


def segment_plane(
    model: StarDistModel,
    plane: np.ndarray,
    prob_thresh: float | None = None,
    nms_thresh: float | None = None,
    n_tiles: tuple[int, int] | None = None,
    normalise: bool = True,
) -> np.ndarray:
    """Instance labels (H, W) int32 of one 2D image; big images are segmented block by block."""
    img = np.asarray(plane)
    if img.ndim != 2:
        raise ValueError(f"segment_plane needs a 2D image, got shape {img.shape}")
    return _call(model.in_process, _segment_here, model.source, model.use_gpu, img, prob_thresh, nms_thresh,
                 n_tiles, normalise)


def segment(
    image: np.ndarray,
    model: StarDistModel | str | os.PathLike | None = None,
    prob_thresh: float | None = None,
    nms_thresh: float | None = None,
    n_tiles: tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """StarDist instance labels for ``image`` (..., Y, X): one 2D segmentation per plane.

    Any leading axes (Z, T, ...) are looped over; the result is int32 with the image's shape and
    label ids unique within each plane. ``image`` may be a numpy or dask array (planes are
    computed one at a time). ``progress(done, total)`` is called after each plane; when
    ``should_stop()`` returns True the loop stops and :class:`InterruptedError` is raised.
    """
    if not isinstance(model, StarDistModel):
        model = load_stardist(model)
    shape = tuple(image.shape)
    if len(shape) < 2:
        raise ValueError(f"StarDist needs an image with at least 2 dimensions (Y, X), got shape {shape}")
    lead = shape[:-2]
    n = int(np.prod(lead)) if lead else 1
    out = np.zeros(shape, dtype=np.int32)
    for i, idx in enumerate(np.ndindex(*lead) if lead else [()]):
        if should_stop is not None and should_stop():
            raise InterruptedError(f"StarDist stopped after {i} of {n} planes")
        out[idx] = segment_plane(model, np.asarray(image[idx]), prob_thresh, nms_thresh, n_tiles)
        if progress is not None:
            progress(i + 1, n)
    return out
