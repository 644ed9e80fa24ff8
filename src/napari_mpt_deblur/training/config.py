"""Typed training configuration (YAML or JSON in; saved with every checkpoint).

Every model is ``extra="forbid"``: a misspelt field is an error that names it, with the file.
Relative paths in a config file are resolved against the file's folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..data.datasets import PatchConfig
# The data sources live in data.sources (so data/ never imports training/); re-exported here.
from ..data.sources import (  # noqa: F401
    ArraysSource,
    ArraysValidation,
    PairedFolderSource,
    PairedSource,
    PairedValidation,
    PlaneFolderSource,
    SplitName,
    SyntheticSource,
    SyntheticValidation,
    UnlabeledSource,
    ZStackSource,
)
from ..inference.settings import Precision
from ..losses.efcr import EFCRConfig
from ..models.config import ArchConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ValidationConfig(_Strict):
    data: Annotated[SyntheticValidation | PairedValidation | ArraysValidation, Field(discriminator="kind")]
    every: int = Field(250, ge=1, description="validate every N steps (and at the end)")
    crop: int | None = Field(256, ge=16, description="centre crop of each validation image (None = whole)")
    #: A validation becomes the new "best" only if its mean PSNR beats the best's by more than this
    #: many standard errors of the per-pair PSNR differences (``network.significant_gain``);
    #: 0: any higher mean.
    min_gain_se: float = Field(0.0, ge=0.0)


# --------------------------------------------------------------------------------------------
# Model, optimiser, run


class ModelChoice(_Strict):
    arch: Literal["mpt", "h2t_unet"] = "mpt"
    preset: Literal["paper", "small", "tiny"] = "tiny"
    #: A full architecture config instead of a preset (fields of MPTConfig / H2TUNetConfig).
    architecture: ArchConfig | None = None
    #: Start from this model (name or path) instead of random weights; its architecture is used.
    init: str | None = None
    #: Image channels (3 for RGB). None: 1 for a new network, the warm start's own for ``init``.
    #: A warm start from a 1-channel model with ``in_channels`` > 1 is widened
    #: (``training.network.widen_channels``: its first layer reads the channels' mean, its last
    #: writes every channel; an MPT's global residual then keeps each channel's own values).
    in_channels: int | None = Field(None, ge=1, le=16)
    #: Train only the parameters whose names start with one of these module paths (e.g. ``ups``,
    #: ``decoders.0``, ``head``); the rest are frozen (no gradient, no optimiser state, no weight
    #: decay). None trains everything. Meant for a warm start (``init``) that should change one
    #: part of a trained network and keep the rest.
    trainable: list[str] | None = Field(None, min_length=1)
    #: Random init only: scale the MPT's output conv down 1000x so the untrained net
    #: (input + head(...)) is within ~1e-3 of the identity; training then improves on the input from
    #: the first step instead of first unlearning the random head's noise. (Not exactly zero:
    #: that makes EFCR's denominator exactly 0 at the first step.)
    zero_init_head: bool = True


class OptimConfig(_Strict):
    """AdamW with an optional linear warm-up, then a cosine learning-rate schedule from ``lr`` to
    ``lr_min`` at the last step (docs/training.md, "Optimiser")."""

    lr: float = Field(1e-4, gt=0)
    lr_min: float = Field(1e-6, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(0, ge=0)
    #: Clip the global gradient norm to this (None = off).
    grad_clip: float | None = Field(1.0, gt=0)
    #: Keep an exponential moving average of the weights with this decay (e.g. 0.999: about the
    #: last 1,000 steps) and validate, checkpoint and export the average (training.ema); None = off.
    ema_decay: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min {self.lr_min} must not exceed lr {self.lr}")
        return self


class TrainConfig(_Strict):
    """Everything a training run needs. ``mpt-deblur train --config FILE`` reads this."""

    name: str = "mpt_deblur_run"
    out_dir: Path = Path("runs/mpt_deblur_run")
    seed: int = 0
    model: ModelChoice = Field(default_factory=ModelChoice)
    data: list[PairedSource] = Field(min_length=1)
    #: EFCRex extra data: unlabeled images, or labeled extra pairs (not both).
    unlabeled: list[UnlabeledSource | ArraysSource] | None = None
    extra_pairs: list[PairedSource] | None = None
    patch: PatchConfig = Field(default_factory=PatchConfig)
    batch_size: int = Field(8, ge=1, description="per process (per GPU under torchrun)")
    steps: int = Field(300_000, ge=1)
    efcr: EFCRConfig = Field(default_factory=EFCRConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    precision: Precision = "auto"
    device: str = "auto"
    validation: ValidationConfig | None = None
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(1, ge=1)
    num_workers: int | Literal["auto"] = Field(
        "auto", description="data-loading worker processes per training process; auto: all cores but one on a GPU, "
                            "none on a CPU (the synthesis runs on the training device either way)")
    #: Split each step's batch into this many micro-batches whose gradients are summed: the same
    #: samples and (up to float rounding) the same update, 1/N of the activation memory.
    grad_accum: int = Field(1, ge=1)
    #: Recompute each pyramid block's (MPT) / U-Net level's (H2T) activations in the backward pass
    #: instead of keeping them: less memory for about a third more compute.
    checkpointing: bool = False
    #: Train for this many minutes instead of ``steps``: the warm-up/cosine schedule is laid over
    #: the steps that fit (measured at the start), the run validates and checkpoints before the
    #: budget ends and ``out_dir/model`` is the best validated weights.
    time_budget_minutes: float | None = Field(None, gt=0)
    progress: bool = True
    cpu_threads: int | None = Field(None, ge=1, description="torch CPU threads (None = torch's default)")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.unlabeled and self.extra_pairs:
            raise ValueError("unlabeled and extra_pairs: EFCRex takes one kind of extra data per run, not both")
        if (self.unlabeled or self.extra_pairs) and self.efcr.beta <= 0:
            raise ValueError("efcr.beta must be > 0 when extra data (unlabeled / extra_pairs) is given")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum {self.grad_accum} must divide batch_size {self.batch_size} "
                             "(each step's batch is split into that many equal micro-batches)")
        if self.unlabeled and not self.efcr.extended:
            raise ValueError("efcr.extended must be true with unlabeled data (L_ext' is its only term)")
        return self

    def resolve_paths(self, base: Path) -> TrainConfig:
        """A copy with every relative path made absolute against ``base``."""
        def fix(obj: Any) -> Any:
            if isinstance(obj, Path):
                return obj if obj.is_absolute() else (base / obj).resolve()
            if isinstance(obj, BaseModel):
                return obj.model_copy(update={k: fix(getattr(obj, k)) for k in type(obj).model_fields})
            if isinstance(obj, list):
                return [fix(v) for v in obj]
            return obj
        return fix(self)


class ConfigError(ValueError):
    """A training config file is unreadable or invalid (the message names the file and field)."""


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid training config:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def parse_config(raw: Any, source: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from exc


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a YAML (``.yaml`` / ``.yml``) or JSON config; relative paths are taken from its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as exc:
        raise ConfigError(f"{path}: cannot parse ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(raw).__name__}")
    return parse_config(raw, str(path)).resolve_paths(path.resolve().parent)


def config_json(config: TrainConfig) -> str:
    return config.model_dump_json(indent=2)
