"""What a training run writes to its folder: the step and validation logs (``log.csv``,
``log.jsonl``, ``val.csv``, ``val_by_defocus.csv``), checkpoints with exact resume, the training record, the final model.

:class:`RunFiles` is a mixin of :class:`napari_mpt_deblur.training.trainer.Trainer`: its methods
read the trainer's state (step, network, optimiser, scaler, config, ``out_dir``, ``ckpt_dir``).
"""

from __future__ import annotations

import csv
import io
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import TypeAdapter

from .._version import __version__
from ..io.atomic import write_text_atomic
from . import checkpoint as C
from .config import TrainConfig, config_json

if TYPE_CHECKING:  # annotation only: the trainer imports this module
    from .trainer import StepRecord

LOG_COLUMNS = ("step", "lr", "loss", "pixel", "cr", "l_pos", "l_neg", "l_ext", "nyquist", "grad_norm", "seconds", "patches_per_s")
VAL_COLUMNS = ("step", "psnr", "ssim", "input_psnr", "input_ssim", "seconds")
#: ``val_by_defocus.csv``: the same validation split by defocus (synthetic validation only).
VAL_DEFOCUS_COLUMNS = ("step", "defocus_um", "pairs", "psnr", "input_psnr")
LOG_FILES = {"log.csv": LOG_COLUMNS, "val.csv": VAL_COLUMNS, "val_by_defocus.csv": VAL_DEFOCUS_COLUMNS}


def _with_defaults(key: str, value: Any) -> Any:
    """A setting read from an older checkpoint, with the fields added since filled in with their
    defaults (JSON form), so that e.g. an ``efcr`` saved before ``nyquist_weight`` existed
    compares equal to today's same objective. Unreadable values are returned as they are."""
    field = TrainConfig.model_fields.get(key)
    if field is None or value is None:
        return value
    try:
        adapter = TypeAdapter(field.annotation)
        return json.loads(adapter.dump_json(adapter.validate_python(value)))
    except (TypeError, ValueError):  # pydantic's ValidationError is a ValueError
        return value


def _same_channels(model: Any, channels: int) -> Any:
    """A ``model`` setting with ``in_channels`` written as None where it names the network's own
    channel count: checkpoints from before ``in_channels`` could be None (unset) saved 1."""
    if isinstance(model, dict) and model.get("in_channels") == channels:
        return {**model, "in_channels": None}
    return model


class RunFiles:
    """Logs, checkpoints and the final model of a :class:`~napari_mpt_deblur.training.trainer.Trainer`."""

    # ---------------------------------------------------------------- logs

    def _log(self, record: StepRecord) -> None:
        row = {"step": record.step, "lr": record.lr, **record.losses, "grad_norm": record.grad_norm,
               "seconds": record.seconds, "patches_per_s": record.patches_per_s}
        self.history.append(row)
        if self.write_files and record.step % self.config.log_every == 0:
            self._append_csv("log.csv", LOG_COLUMNS, row)
            with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def _append_csv(self, name: str, columns: Sequence[str], row: dict[str, Any]) -> None:
        path = self.out_dir / name
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})

    def _truncate_logs(self, step: int) -> None:
        """After a resume, drop log rows of steps that the checkpoint does not contain."""
        for name, cols in LOG_FILES.items():
            path = self.out_dir / name
            if path.exists():
                rows = list(csv.DictReader(path.open(encoding="utf-8")))
                buf = io.StringIO()
                w = csv.DictWriter(buf, fieldnames=list(cols), extrasaction="ignore")
                w.writeheader()
                w.writerows(r for r in rows if int(float(r["step"])) <= step)
                write_text_atomic(path, buf.getvalue())
        path = self.out_dir / "log.jsonl"
        if path.exists():
            keep = [l for l in path.read_text(encoding="utf-8").splitlines() if l and json.loads(l)["step"] <= step]
            write_text_atomic(path, "".join(l + "\n" for l in keep))

    # ---------------------------------------------------------------- checkpoints

    def _training_record(self) -> dict[str, Any]:
        return {
            "package_version": __version__,
            "steps": self.step,
            "total_steps": self.total_steps,
            "time_budget_minutes": self.config.time_budget_minutes,
            "wall_seconds": round(self.wall_seconds, 1),
            "device": str(self.device),
            "world_size": self.dist.world,
            "host": platform.node(),
            "torch": torch.__version__,
            "precision": str(self.amp).replace("torch.", "") if self.amp else "fp32",
            "validation": self.last_validation,
            "best": self.best,
            "weights_from": self.provenance,
            "config": json.loads(config_json(self.config)),
        }

    def save_checkpoint(self, validation: dict[str, float] | None) -> str | None:
        if not self.write_files:
            return None
        # The best is updated before the record is built, so a checkpoint that is a new best says so
        # in its own record (the exported model's ``training.best`` is then its own validation).
        is_best = validation is not None and self._is_best(validation)
        if is_best:
            self.best = {"step": self.step, **validation}
        record = {
            "name": f"{self.config.name}_step{self.step}",
            "description": f"checkpoint of training run {self.config.name} at step {self.step}",
            "normalisation": self.config.patch.normalisation,
            "training": self._training_record(),
        }
        state = {
            "config": json.loads(config_json(self.config)),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "best": self.best,
            "last_validation": self.last_validation,
            "wall_seconds": self.wall_seconds,
            "world_size": self.dist.world,
            "planned_steps": self.planned_steps,
            "budget_used_seconds": self.budget_used,
            "ema_updates": self.ema.updates if self.ema is not None else None,
        }
        raw = None
        if self.ema is not None:  # the file's model is the average; the trained weights resume the run
            raw = {f"{C.RAW_PREFIX}{k}": v for k, v in self.net.state_dict().items()}
        folder = C.write_checkpoint(self.ckpt_dir, self.step, self.eval_net, self.optimizer, state, record, raw)
        if is_best:
            C.point(self.ckpt_dir, "best", folder, self.step, {"psnr": validation["psnr"], "ssim": validation["ssim"]})
        C.point(self.ckpt_dir, "last", folder, self.step)
        C.prune(self.ckpt_dir)
        return str(folder)

    def _resume(self) -> None:
        ckpt = C.read_checkpoint(self.ckpt_dir, "last")
        saved = ckpt.state.get("config", {})
        ours = json.loads(config_json(self.config))
        channels = getattr(getattr(self.net, "config", None), "in_channels", 1)
        for key in ("model", "batch_size", "seed", "patch", "efcr"):
            if _same_channels(_with_defaults(key, saved.get(key)), channels) != _same_channels(ours.get(key), channels):
                raise C.CheckpointError(
                    f"{ckpt.folder / 'state.json'}: cannot resume with a different '{key}' setting "
                    f"(checkpoint: {json.dumps(saved.get(key))}, config: {json.dumps(ours.get(key))})"
                )
        if saved.get("world_size", 1) != self.dist.world:
            raise C.CheckpointError(
                f"{ckpt.folder}: saved with {saved.get('world_size')} processes, resuming with {self.dist.world}; "
                "the sample stream would change"
            )
        from ..models.registry import load_model

        loaded = load_model(ckpt.folder / "model", "cpu")
        raw = {k[len(C.RAW_PREFIX):]: v for k, v in ckpt.tensors.items() if k.startswith(C.RAW_PREFIX)}
        # With a weight average the model file holds the average and raw.* the trained weights.
        self.net.load_state_dict(raw or loaded.model.state_dict())
        if self.ema is not None:
            self.ema.model.load_state_dict(loaded.model.state_dict())
            self.ema.updates = int(ckpt.state.get("ema_updates") or 0)
        self.optimizer.load_state_dict(C.optimizer_from_flat(ckpt.tensors, ckpt.state["optimizer"]))
        if ckpt.state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt.state["scaler"])
        C.restore_rng(ckpt.tensors)
        self.step = ckpt.step
        self.best = ckpt.state.get("best")
        self.last_validation = ckpt.state.get("last_validation")
        self.wall_seconds = float(ckpt.state.get("wall_seconds", 0.0))
        self.planned_steps = ckpt.state.get("planned_steps")
        if saved.get("time_budget_minutes") != ours.get("time_budget_minutes"):
            # Another budget: the schedule is laid again over the steps that fit (measured anew).
            self.planned_steps = None
        self.budget_used = float(ckpt.state.get("budget_used_seconds", 0.0))
        if self.write_files:
            self._truncate_logs(self.step)

    def save_final_model(self, path: Path) -> Path:
        from ..models.registry import save_model

        return save_model(
            self.eval_net, path, name=self.config.name,
            description=f"trained with napari-mpt-deblur for {self.step} steps (EFCR beta {self.config.efcr.beta:g})",
            normalisation=self.config.patch.normalisation, training=self._training_record(), trained=True,
        )
