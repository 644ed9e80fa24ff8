"""Model loading for inference: each model file is read once per process and device.

An engine rebuilt on a dask.distributed worker (:func:`~napari_mpt_deblur.inference.drivers.engine_for`)
and every widget run reuse the model loaded here; :func:`model_load_count` lets tests and
:func:`~napari_mpt_deblur.inference.distributed.worker_model_loads` check that.
"""

from __future__ import annotations

import os
import threading

import torch

from ..models.registry import LoadedModel, load_model, resolve_model_path

_MODELS: dict[tuple, LoadedModel] = {}
_MODELS_LOCK = threading.Lock()
_MODEL_LOADS = 0


def model_load_count() -> int:
    """How many times this process has read model weights from disk (for tests and workers)."""
    return _MODEL_LOADS


def load_model_once(name_or_path: str | os.PathLike, device: torch.device, channels_last: bool = True) -> LoadedModel:
    """:func:`~napari_mpt_deblur.models.registry.load_model`, cached per process.

    The key includes the file's modification time and size, so a model file saved again is
    reloaded. Raises ``ModelFileError`` (a ``ValueError``) for unknown or broken models.
    """
    global _MODEL_LOADS
    path = resolve_model_path(name_or_path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(device), channels_last)
    with _MODELS_LOCK:
        loaded = _MODELS.get(key)
        if loaded is None:
            loaded = load_model(path, device=device)
            if channels_last:
                loaded.model.to(memory_format=torch.channels_last)
            _MODELS[key] = loaded
            _MODEL_LOADS += 1
        return loaded
