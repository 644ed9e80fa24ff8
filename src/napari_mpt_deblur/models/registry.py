"""Build models from typed configs; save and load them as safetensors + JSON; find shipped ones.

A model file is a pair ``<stem>.safetensors`` (weights only: data, never code) and
``<stem>.json`` (a :class:`ModelRecord`: architecture, normalisation, package version, training
provenance, SHA-256 of the weights). Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..data.normalisation import NormalisationConfig
from ..data.optics import Acquisition
from ..io.atomic import write_bytes_atomic, write_text_atomic
from . import RECOMMENDED_MODEL
from .config import H2TUNetConfig, MPTConfig
# The record and its reader live in .record (torch-free); re-exported here for existing imports.
from .record import FORMAT_VERSION, ModelFileError, ModelRecord, model_paths, read_record  # noqa: F401

SHIPPED_DIR = Path(__file__).parent / "weights"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    optics: Acquisition | None = None,
    orientations: int | None = None,
    shifts: int | None = None,
) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically; return the JSON path.

    ``orientations``, ``shifts``: the model's inference defaults (``ModelRecord.orientations``,
    ``ModelRecord.shifts``); a model derived from another (fine-tune, calibration) passes its
    base's on (``ModelRecord.ensemble_defaults``). A model from a training
    run (``train``, ``export``) names none until its own pattern has been measured
    (``benchmarks/bench_checkerboard.py``): new presets upsample by resize-convolution.

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
        optics=optics,
        orientations=orientations,
        shifts=shifts,
    )
    write_bytes_atomic(weights_path, data)
    write_text_atomic(record_path, record.model_dump_json(indent=2) + "\n")
    return record_path


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


class ModelNameError(ValueError):
    """A user-given model name cannot be used (unsafe, empty, or taken by a shipped model)."""


#: What a model name may contain: it becomes a file name in the user model folder, so no path
#: separators, no leading dot (hidden files, ``..``), no control characters.
_NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+ -]{0,99}")


def sanitise_model_name(name: str) -> str:
    """Check a user-given model name and return it stripped (and without a ``.json`` /
    ``.safetensors`` suffix); :class:`ModelNameError` saying why when it cannot be a name.

    A name is 1-100 characters: letters, digits, ``.``, ``_``, ``+``, ``-`` and spaces, starting
    with a letter or digit. It can never hold a path separator or ``..``, so a name always stays
    inside the user model folder (the fine-tune widget's "save as" goes through this).
    """
    if not isinstance(name, str):
        raise ModelNameError(f"a model name must be text, not {type(name).__name__}")
    text = name.strip()
    for suffix in (".safetensors", ".json"):
        if text.lower().endswith(suffix):
            text = text[: -len(suffix)].rstrip()
    if not text:
        raise ModelNameError("the model name is empty; type a name such as 'my-model'")
    if "/" in text or "\\" in text or os.sep in text or (os.altsep and os.altsep in text):
        raise ModelNameError(
            f"model name {name!r} contains a path separator; a name is saved in the user model folder "
            f"({user_models_dir()}); to save elsewhere choose a file instead"
        )
    if ".." in text or text.startswith("."):
        raise ModelNameError(f"model name {name!r} may not start with '.' or contain '..'")
    if not _NAME_OK.fullmatch(text):
        raise ModelNameError(
            f"model name {name!r} is not allowed: use 1-100 letters, digits, '.', '_', '+', '-' or spaces, "
            "starting with a letter or digit"
        )
    return text


def shipped_names() -> list[str]:
    """Names of the models shipped with the package (reserved: no user model may take them)."""
    return [p.stem for p in _records_in(SHIPPED_DIR)]


def _check_not_shipped(name: str, where: Path) -> None:
    for shipped in shipped_names():
        if name.casefold() == shipped.casefold():
            raise ModelNameError(
                f"{name!r} is the name of a shipped model; a model saved as {where} under that name could never "
                "be chosen by name (the shipped one always wins). Choose another name, e.g. "
                f"'{shipped}-finetuned'"
            )


def model_save_target(name_or_path: str | os.PathLike) -> Path:
    """Where to save a new model given by NAME or by PATH; the one rule for every writer
    (``finetune --out``, the fine-tune widget's Save).

    * A bare name (no path separator, no ``.json``/``.safetensors`` suffix) is a model NAME: it is
      checked by :func:`sanitise_model_name` and saved in :func:`user_models_dir`, where every
      command finds it by that name from any folder.
    * Anything else is a PATH (stem, ``.json`` or ``.safetensors``), used as given.

    Either way the stem may not be a shipped model's name (case-insensitive: it would be shadowed
    for ever) and nothing may exist there yet. Returns the stem path (no suffix). Raises
    :class:`ModelNameError` or :class:`FileExistsError`.
    """
    text = os.fspath(name_or_path)
    if _is_bare_name(text):
        stem = user_models_dir() / sanitise_model_name(text)
    else:
        weights, _ = model_paths(Path(text).expanduser())
        stem = weights.with_suffix("")
        if not stem.name or stem.name.startswith("."):
            raise ModelNameError(f"{text!r} does not name a model file (a file name such as my-model.safetensors)")
        if stem.parent.exists() and not stem.parent.is_dir():
            raise ModelNameError(f"cannot save {stem}: {stem.parent} is a file, not a folder")
    _check_not_shipped(stem.name, stem)
    for existing in model_paths(stem):
        if existing.exists():
            raise FileExistsError(f"model {existing} already exists; choose another name (nothing is overwritten)")
    if _is_bare_name(text):
        for known, path, origin in list_models():
            if origin == "user" and known.casefold() == stem.name.casefold():
                raise ModelNameError(f"a user model {known!r} ({path}) differs from {stem.name!r} only in letter case; "
                                     "choose a clearly different name")
    return stem


def _is_bare_name(text: str) -> bool:
    return ("/" not in text and "\\" not in text and os.sep not in text and not text.startswith("~")
            and Path(text).suffix.lower() not in (".json", ".safetensors"))


def shadowed_models() -> list[tuple[str, Path]]:
    """User models that no name lookup can reach because a shipped model has their name
    (case-insensitive), e.g. copied into the user folder by hand: (name, record path)."""
    reserved = {n.casefold() for n in shipped_names()}
    return [(n, p) for n, p, origin in list_models() if origin == "user" and n.casefold() in reserved]


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A model record path from a PATH (``.json``, ``.safetensors`` or stem), a model NAME, or a
    bioimage.io package written by ``mpt-deblur export --format bioimageio`` (``.zip``, folder or
    ``rdf.yaml``; unpacked into a cache folder, see :func:`napari_mpt_deblur.io.bioimageio_package.import_bioimageio`).

    Precedence, the same for ``--model``, the widgets and :func:`load_model`:

    1. Text that looks like a path (it has a path separator, starts with ``~``, or ends in
       ``.json`` / ``.safetensors``) is only ever a path: the file must exist.
    2. A bare name is looked up among the shipped models, then the user model folder
       (:func:`user_models_dir`). Shipped names are reserved (no user model can be saved under
       one), so a name means the same weights on every machine; a user model with a shipped
       name (put there by hand) is ignored with a warning.
    3. A bare name that is no model name but a model stem in the current folder is used as that
       path. When it is BOTH a model name and a file here, the lookup is ambiguous and refused:
       the answer would depend on the folder the command runs in.
    """
    text = os.fspath(name_or_path)
    candidate = Path(text).expanduser()
    if candidate.suffix.lower() in (".zip", ".yaml") or candidate.is_dir():
        # A bioimage.io package (zip, folder or rdf.yaml) written by our exporter: its attached
        # model files are checked and unpacked into a cache folder (nothing unpickled; io.bioimageio_package).
        from ..io.bioimageio_package import BioimageioError, import_bioimageio, is_bioimageio_package

        if is_bioimageio_package(candidate):
            try:
                return import_bioimageio(candidate)
            except BioimageioError as exc:
                raise ModelFileError(str(exc)) from exc
    _, record = model_paths(candidate)
    if not _is_bare_name(text):
        if record.is_file():
            return record
        raise ModelFileError(f"model file not found: {record}")
    by_name = None
    for name, path, origin in list_models():
        if name == text and by_name is None:
            by_name = (path, origin)
    if by_name is not None:
        shadowed = [p for n, p in shadowed_models() if n.casefold() == text.casefold()]
        if by_name[1] == "shipped" and shadowed:
            warnings.warn(f"model name {text!r} means the shipped model; the user model {shadowed[0]} of the same "
                          "name is ignored (rename it to use it)", UserWarning, stacklevel=2)
        if record.is_file() and record.resolve() != by_name[0].resolve():
            raise ModelNameError(
                f"{text!r} is ambiguous: it is the {by_name[1]} model {by_name[0]} and also the file {record.resolve()} "
                f"in the current folder; pass ./{text}.safetensors for the file, or rename one of them"
            )
        return by_name[0]
    if record.is_file():
        return record
    names = [n for n, _, _ in list_models()]
    raise ModelFileError(
        f"unknown model {text!r}: no model of that name and no such file ({record}); "
        f"known models: {', '.join(names) if names else 'none installed'}"
    )
