"""Build models from typed configs; save and load them as safetensors + JSON; find shipped ones.

A model file is a pair ``<stem>.safetensors`` (weights only: data, never code) and
``<stem>.json`` (a :class:`ModelRecord`: architecture, normalisation, package version, training
provenance, SHA-256 of the weights). Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from .._version import __version__
from ..data.normalisation import NormalisationConfig
from ..io.atomic import write_bytes_atomic, write_text_atomic
from . import RECOMMENDED_MODEL
from .config import ArchConfig, H2TUNetConfig, MPTConfig

FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).parent / "weights"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelFileError(ValueError):
    """A model file is missing, corrupt, or does not match its configuration."""


class ModelRecord(BaseModel):
    """Everything about a saved model except its weights (the ``.json`` beside them)."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str
    description: str = ""
    architecture: ArchConfig
    normalisation: NormalisationConfig = Field(default_factory=NormalisationConfig)
    package_version: str = __version__
    weights_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    weights_sha256: str = ""
    trained: bool = True
    #: Provenance: data, settings, steps, hardware, wall time, validation metrics.
    training: dict[str, Any] = Field(default_factory=dict)


@dataclass
class LoadedModel:
    model: nn.Module
    record: ModelRecord
    path: Path | None


def build_model(config: MPTConfig | H2TUNetConfig) -> nn.Module:
    """Instantiate the network for ``config`` (weights randomly initialised)."""
    if isinstance(config, MPTConfig):
        from .mpt import MultiPyramidTransformer

        return MultiPyramidTransformer(config)
    if isinstance(config, H2TUNetConfig):
        from .h2t_unet import HeadToTailUNet

        return HeadToTailUNet(config)
    raise TypeError(f"not an architecture config: {type(config).__name__}")


def model_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, record) paths for a model given by its ``.safetensors``, ``.json`` or stem."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def _state_bytes(model: nn.Module, dtype: str) -> bytes:
    from safetensors.torch import save

    target = _DTYPES[dtype]
    tensors = {
        k: v.detach().to("cpu", target if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    return save(tensors, metadata={"format": "pt", "napari_mpt_deblur": str(FORMAT_VERSION)})


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    description: str = "",
    normalisation: NormalisationConfig | None = None,
    training: dict[str, Any] | None = None,
    trained: bool = True,
    dtype: Literal["float32", "float16", "bfloat16"] = "float32",
) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically; return the JSON path.

    The weights are written first and the record, which holds their SHA-256, last, so an
    interrupted save never leaves a record that vouches for other weights.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, (MPTConfig, H2TUNetConfig)):
        raise TypeError("save_model needs a model built by build_model (it carries its config)")
    weights_path, record_path = model_paths(path)
    data = _state_bytes(model, dtype)
    record = ModelRecord(
        name=name or weights_path.stem,
        description=description,
        architecture=config,
        normalisation=normalisation or NormalisationConfig(),
        weights_dtype=dtype,
        weights_sha256=hashlib.sha256(data).hexdigest(),
        trained=trained,
        training=training or {},
    )
    write_bytes_atomic(weights_path, data)
    write_text_atomic(record_path, record.model_dump_json(indent=2) + "\n")
    return record_path


def read_record(path: str | os.PathLike) -> ModelRecord:
    """Read and validate the JSON record of a model; errors name the file and the field."""
    _, record_path = model_paths(path)
    if not record_path.is_file():
        raise ModelFileError(f"model record not found: {record_path}")
    try:
        raw = json.loads(record_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{record_path}: not valid JSON ({exc})") from exc
    if isinstance(raw, dict) and raw.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ModelFileError(
            f"{record_path}: format version {raw['format_version']} is newer than this package "
            f"understands ({FORMAT_VERSION}); upgrade napari-mpt-deblur"
        )
    try:
        return ModelRecord.model_validate(raw)
    except ValidationError as exc:
        raise ModelFileError(f"{record_path}: invalid model record:\n{exc}") from exc


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model by shipped/user name or path; validate checksum, keys and shapes.

    The model is returned in eval mode, in float32, on ``device``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = resolve_model_path(name_or_path)
    record = read_record(path)
    weights_path, _ = model_paths(path)
    if not weights_path.is_file():
        raise ModelFileError(f"model weights not found: {weights_path}")
    data = weights_path.read_bytes()
    if record.weights_sha256 and hashlib.sha256(data).hexdigest() != record.weights_sha256:
        raise ModelFileError(
            f"{weights_path}: checksum does not match {model_paths(path)[1].name}; "
            "the file is corrupt, truncated, or belongs to another model"
        )
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{weights_path}: not a readable safetensors file ({exc})") from exc
    model = build_model(record.architecture)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in tensors and tensors[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:3])})")
        raise ModelFileError(
            f"{weights_path}: weights do not match the architecture in its record: " + "; ".join(parts)
        )
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    model.eval().to(device)
    return LoadedModel(model=model, record=record, path=model_paths(path)[1])


def user_models_dir() -> Path:
    """Where fine-tuned models are saved and found by name (``MPT_DEBLUR_MODELS_DIR`` overrides)."""
    override = os.environ.get("MPT_DEBLUR_MODELS_DIR")
    if override:
        return Path(override)
    from platformdirs import user_data_dir

    return Path(user_data_dir("napari-mpt-deblur")) / "models"


def _records_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if p.with_suffix(".safetensors").is_file())


def list_models() -> list[tuple[str, Path, str]]:
    """Known models as (name, record path, origin), origin being ``"shipped"`` or ``"user"``.

    Shipped models come first, :data:`RECOMMENDED_MODEL` first of all; a user model with a
    shipped model's name is listed but the shipped one wins name lookups.
    """
    found = [(p.stem, p, "shipped") for p in _records_in(SHIPPED_DIR)]
    found.sort(key=lambda item: item[0] != RECOMMENDED_MODEL)
    found += [(p.stem, p, "user") for p in _records_in(user_models_dir())]
    return found


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A model record path from a path (``.json``, ``.safetensors`` or stem) or a model name."""
    candidate = Path(name_or_path)
    _, record = model_paths(candidate)
    if record.is_file():
        return record
    text = str(name_or_path)
    if os.sep not in text and "/" not in text:
        for name, path, _ in list_models():
            if name == text:
                return path
    names = [n for n, _, _ in list_models()]
    raise ModelFileError(
        f"unknown model {text!r}: no such file ({record}) and no model of that name; "
        f"known models: {', '.join(names) if names else 'none installed'}"
    )
