"""Checkpoints without pickle: safetensors for every tensor, JSON for everything else.

Layout of a run folder's ``checkpoints/``::

    step_00000500/model.safetensors      weights (registry format: loadable with load_model)
    step_00000500/model.json             ModelRecord with training provenance and weights SHA-256
    step_00000500/optimizer.safetensors  AdamW moments and step counts, RNG states; with a weight
                                         average, the trained weights (raw.<name>; model.* holds the average)
    step_00000500/state.json             step, optimizer hyper-parameters, scaler, metrics, config, SHA-256s
    last.json, best.json                 pointers: {"step": ..., "folder": "step_00000500", ...}

Each file is written atomically and the pointer last, after the folder is complete, so a crash at
any moment leaves ``last.json`` naming a complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io.atomic import write_bytes_atomic, write_text_atomic

STATE_FORMAT = 1
#: Prefix of the trained weights in ``optimizer.safetensors`` when the model file holds their
#: moving average (``optim.ema_decay``).
RAW_PREFIX = "raw."


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit this run (message names the file)."""


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<param>.<key>``) and JSON data."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("state."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda_{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda_"))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Checkpoint:
    folder: Path
    step: int
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def write_checkpoint(
    ckpt_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    model_record: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``step_<step>/`` completely (idempotent for the same step); return the folder.

    ``extra_tensors`` (e.g. ``raw.<name>``: the trained weights when ``model`` is their moving
    average) are stored beside the optimizer state."""
    from safetensors.torch import save

    from ..models.registry import save_model

    folder = ckpt_dir / f"step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder / "model", **model_record)
    tensors, meta = optimizer_to_flat(optimizer)
    tensors.update(rng_tensors())
    for key, value in (extra_tensors or {}).items():
        tensors[key] = value.detach().cpu().contiguous()
    data = save(tensors, metadata={"format": "pt", "napari_mpt_deblur_checkpoint": str(STATE_FORMAT)})
    write_bytes_atomic(folder / "optimizer.safetensors", data)
    full_state = dict(state)
    full_state.update(format=STATE_FORMAT, step=step, optimizer=meta, optimizer_sha256=_sha(data))
    write_text_atomic(folder / "state.json", json.dumps(full_state, indent=2, default=str) + "\n")
    return folder


def point(ckpt_dir: Path, kind: str, folder: Path, step: int, extra: dict[str, Any] | None = None) -> None:
    record = {"step": step, "folder": folder.name, **(extra or {})}
    write_text_atomic(ckpt_dir / f"{kind}.json", json.dumps(record, indent=2) + "\n")


def pointer(ckpt_dir: Path, kind: str) -> dict[str, Any] | None:
    path = ckpt_dir / f"{kind}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def prune(ckpt_dir: Path) -> None:
    """Delete checkpoint folders that neither ``last`` nor ``best`` points to."""
    keep = {p["folder"] for p in (pointer(ckpt_dir, "last"), pointer(ckpt_dir, "best")) if p}
    for d in ckpt_dir.glob("step_*"):
        if d.is_dir() and d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


def read_checkpoint(ckpt_dir: Path, kind: str = "last") -> Checkpoint:
    """Read and verify the checkpoint that ``<kind>.json`` points to."""
    from safetensors.torch import load

    ptr = pointer(ckpt_dir, kind)
    if ptr is None:
        raise CheckpointError(f"no checkpoint to resume from: {ckpt_dir / (kind + '.json')} does not exist")
    folder = ckpt_dir / ptr["folder"]
    state_path = folder / "state.json"
    opt_path = folder / "optimizer.safetensors"
    for p in (state_path, opt_path, folder / "model.json", folder / "model.safetensors"):
        if not p.is_file():
            raise CheckpointError(f"checkpoint incomplete: {p} is missing")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{state_path}: not valid JSON ({exc})") from exc
    data = opt_path.read_bytes()
    if _sha(data) != state.get("optimizer_sha256"):
        raise CheckpointError(f"{opt_path}: checksum does not match {state_path.name}; the checkpoint is corrupt")
    if state.get("format", 0) > STATE_FORMAT:
        raise CheckpointError(f"{state_path}: checkpoint format {state['format']} is newer than this package")
    return Checkpoint(folder=folder, step=int(state["step"]), state=state, tensors=load(data))


def export_checkpoint(
    run_or_checkpoints: str | os.PathLike,
    out: str | os.PathLike,
    *,
    which: str = "best",
    name: str | None = None,
    description: str | None = None,
    dtype: str = "float32",
    replace: bool = False,
) -> Path:
    """Write the ``best`` or ``last`` checkpoint of a training run as a standalone model file.

    ``run_or_checkpoints`` is a run folder (holding ``checkpoints/``) or its ``checkpoints``
    folder. The model keeps its training provenance (config, steps, validation); ``dtype``
    ``float16`` halves the file (outputs then differ from fp32 by fp16 rounding of the weights).
    Returns the JSON path; nothing is written over an existing file unless ``replace`` (the
    trainer's own ``out_dir/model`` at the end of a time-budgeted run).
    """
    from ..models.registry import load_model, model_paths, save_model

    folder = Path(run_or_checkpoints)
    ckpt_dir = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    if which not in ("best", "last"):
        raise CheckpointError(f"which must be 'best' or 'last', got {which!r}")
    ptr = pointer(ckpt_dir, which)
    if ptr is None:
        raise CheckpointError(f"no '{which}' checkpoint in {ckpt_dir} ({which}.json is missing)")
    for existing in model_paths(out):
        if existing.exists() and not replace:
            raise CheckpointError(f"{existing} already exists; choose another output (nothing is overwritten)")
    loaded = load_model(ckpt_dir / ptr["folder"] / "model.json", "cpu")
    record = loaded.record
    training = dict(record.training or {})
    training["exported_from"] = {"checkpoint": which, "step": int(ptr["step"])}
    return save_model(
        loaded.model, out, name=name or record.name,
        description=description or record.description,
        normalisation=record.normalisation, training=training, trained=True, dtype=dtype, optics=record.optics,
    )
