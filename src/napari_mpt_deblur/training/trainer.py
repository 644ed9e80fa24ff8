"""The training loop: EFCR / EFCRex objective, AdamW + cosine schedule, mixed precision, gradient
clipping, validation, atomic non-pickle checkpoints with exact resume, DistributedDataParallel.

Use it three ways:

* ``train(config)`` (what ``mpt-deblur train`` calls), also under ``torchrun --nproc_per_node N``;
* ``Trainer(config).steps()``: a generator of :class:`StepRecord` for a GUI (live losses);
  ``trainer.stop()`` ends it cleanly after the current step, keeping the weights so far;
* :func:`napari_mpt_deblur.training.finetune.finetune` for EFCRex on the user's open images.

Determinism: samples are a pure function of (seed, global sample index), the reblur kernel of a
sample too, and the learning rate a function of the step, so the state at step N is the weights,
the AdamW moments and the RNG states: resuming from a checkpoint reproduces the uninterrupted run
exactly (bit for bit on the CPU).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..data import datasets as D
from ..data.normalisation import NormalisationConfig, denormalise, normalise, percentile_range
from ..evaluation.metrics import psnr, ssim
from ..io.atomic import write_text_atomic
from ..losses.efcr import EFCRObjective
from . import checkpoint as C
from .config import (
    ArraysSource,
    PairedFolderSource,
    PairedValidation,
    PlaneFolderSource,
    SyntheticSource,
    SyntheticValidation,
    TrainConfig,
    UnlabeledSource,
    ZStackSource,
    config_json,
)

#: Time-budgeted runs measure this many steps before laying the schedule over the budget.
CALIBRATION_STEPS = 5
LOG_COLUMNS = ("step", "lr", "loss", "pixel", "cr", "l_pos", "l_neg", "l_ext", "grad_norm", "seconds", "patches_per_s")
VAL_COLUMNS = ("step", "psnr", "ssim", "input_psnr", "input_ssim", "seconds")


# --------------------------------------------------------------------------------------------
# Distributed setup


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def dist_from_env() -> DistInfo:
    """Rank and world size as ``torchrun`` sets them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(rank=int(os.environ.get("RANK", "0")), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(info: DistInfo, device: torch.device) -> None:
    import torch.distributed as dist

    if info.active and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world)


# --------------------------------------------------------------------------------------------
# Data from the config


class MixedDataset:
    """Several datasets drawn from uniformly at random, per sample index (deterministic)."""

    def __init__(self, datasets: Sequence[Any], seed: int) -> None:
        self.datasets = list(datasets)
        self.seed = seed

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, index: int) -> dict:
        if len(self.datasets) == 1:
            return self.datasets[0][index]
        k = int(np.random.default_rng([self.seed, index, 3]).integers(len(self.datasets)))
        return self.datasets[k][index]


def _names(value, folder):
    """A named split (see ``data.splits.split_names``) as file stems of ``folder``, or the list given."""
    if not isinstance(value, str):
        return value
    from ..data.splits import split_names

    return split_names(value, [p.stem for p in D.list_images(folder)])


def _in_memory_error(src) -> ValueError:
    return ValueError(f"data source of kind 'arrays' ({src.description or 'in-memory images'}) cannot be loaded "
                      "from a config; pass the data to Trainer(train_data=..., extra_data=...)")


def load_source_pairs(src) -> list[D.Pair]:
    if isinstance(src, PairedFolderSource):
        return D.load_folder_pairs(src.blurred, src.sharp, src.match, src.exclude)
    if isinstance(src, PlaneFolderSource):
        return D.load_plane_pairs(src.root, src.in_focus, src.planes, src.match, src.exclude)
    if isinstance(src, ZStackSource):
        return D.load_zstack_pairs(src.path, src.focus_plane, src.max_distance)[0]
    if isinstance(src, ArraysSource):
        raise _in_memory_error(src)
    raise TypeError(f"not a paired source: {type(src).__name__}")


def build_paired_dataset(sources: Sequence[Any], config: TrainConfig, seed: int) -> MixedDataset:
    parts = []
    for src in sources:
        if isinstance(src, SyntheticSource):
            images, names = D.load_images(src.sharp, _names(src.names, src.sharp), src.exclude)
            labels = None
            if src.labels is not None:
                labels, _ = D.load_images(src.labels, names)
                labels = [np.asarray(l).astype(np.int64) for l in labels]
            parts.append(D.SyntheticPatches(images, config.patch, src.defocus, seed=seed, labels=labels,
                                            per_object_prob=src.per_object_prob, names=names))
        else:
            parts.append(D.PairedPatches(load_source_pairs(src), config.patch, seed=seed))
    return MixedDataset(parts, seed)


def build_unlabeled_dataset(sources: Sequence[UnlabeledSource], config: TrainConfig, seed: int) -> D.UnlabeledPatches:
    images: list[np.ndarray] = []
    for src in sources:
        if isinstance(src, ArraysSource):
            raise _in_memory_error(src)
        images += D.load_images(src.folder, src.names, src.exclude)[0]
    return D.UnlabeledPatches(images, config.patch, seed=seed)


def build_validation_pairs(config: TrainConfig) -> list[D.Pair]:
    val = config.validation
    if val is None:
        return []
    data = val.data
    if isinstance(data, SyntheticValidation):
        images, names = D.load_images(data.sharp, _names(data.names, data.sharp))
        if data.max_images is not None:
            images, names = images[: data.max_images], names[: data.max_images]
        return D.synthetic_validation_pairs(
            images, names, data.defocus_um, data.psf_model, data.na, data.wavelength_um, data.pixel_um,
            data.peak_photons, data.read_sigma_photons, crop=val.crop, seed=config.seed,
        )
    assert isinstance(data, PairedValidation)
    pairs = load_source_pairs(data.source) if not isinstance(data.source, SyntheticSource) else []
    if data.max_images is not None:
        pairs = pairs[: data.max_images]
    return D.crop_pairs(pairs, val.crop)


# --------------------------------------------------------------------------------------------
# Model helpers


class ScalesModule(nn.Module):
    """Wraps a network so that ``forward`` returns its list of outputs (coarsest first, full scale
    last): the H2T U-Net's ``forward_scales`` for its multi-scale loss, ``[net(x)]`` otherwise.
    DistributedDataParallel wraps this module, so every call goes through its ``forward``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.multiscale = hasattr(net, "forward_scales") and getattr(net.config, "num_scales", 1) > 1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.forward_scales(x) if self.multiscale else [self.net(x)]


def build_network(config: TrainConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The network to train and where its weights came from."""
    from ..models.config import preset_config
    from ..models.registry import build_model, load_model

    choice = config.model
    if choice.init is not None:
        loaded = load_model(choice.init, "cpu")
        return loaded.model.train(), {"init": str(loaded.path), "init_name": loaded.record.name}
    arch = choice.architecture or preset_config(choice.arch, choice.preset, choice.in_channels)
    torch.manual_seed(config.seed)
    net = build_model(arch)
    head = getattr(net, "head", None)
    zero = bool(choice.zero_init_head and getattr(arch, "global_residual", False) and isinstance(head, nn.Conv2d))
    if zero:
        # Not exactly zero: an exact identity makes EFCR's L- and L_ext exactly 0, and the first
        # step's contrastive ratio then divides by eps (a loss ~20x the real one). A head 1000x
        # smaller than its default init keeps the untrained net within ~1e-3 of the identity.
        with torch.no_grad():
            head.weight.mul_(HEAD_INIT_SCALE)
    return net, {"init": "random", "init_seed": config.seed, "zero_init_head": zero,
                 "head_init_scale": HEAD_INIT_SCALE if zero else None}


#: Scale of the MPT's output conv at a "zero" init (see build_network).
HEAD_INIT_SCALE = 1e-3


def lr_at(step: int, config: TrainConfig, total_steps: int | None = None) -> float:
    """Linear warm-up, then cosine from ``lr`` to ``lr_min`` over the remaining steps (step 0-based).

    ``total_steps`` replaces ``config.steps`` (a time-budgeted run's planned steps)."""
    o = config.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    total = config.steps if total_steps is None else total_steps
    span = max(total - o.warmup_steps - 1, 1)  # the last step runs at lr_min
    t = min(max(step - o.warmup_steps, 0) / span, 1.0)
    return o.lr_min + 0.5 * (o.lr - o.lr_min) * (1.0 + math.cos(math.pi * t))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None for fp32. ``auto``: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@torch.no_grad()
def evaluate_pairs(model: nn.Module, pairs: Sequence[D.Pair], device: torch.device,
                   amp: torch.dtype | None = None, norm: NormalisationConfig | None = None) -> dict[str, float]:
    """Mean PSNR / SSIM (data range 1, reference units) of the model and of the input itself.

    Each input is normalised by its own percentiles, run through the model and mapped back, the
    same way inference does it.
    """
    norm = norm or NormalisationConfig()
    was_training = model.training
    model.eval()
    out_p, out_s, in_p, in_s = [], [], [], []
    for pair in pairs:
        lo, hi = percentile_range(pair.inp, norm.low, norm.high)
        x = torch.from_numpy(normalise(pair.inp, lo, hi))[None, None].to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            y = model(x)
        pred = denormalise(y.float().cpu().numpy()[0, 0], lo, hi)
        out_p.append(psnr(pred, pair.gt))
        out_s.append(ssim(pred, pair.gt))
        in_p.append(psnr(pair.inp, pair.gt))
        in_s.append(ssim(pair.inp, pair.gt))
    model.train(was_training)
    return {"psnr": float(np.mean(out_p)), "ssim": float(np.mean(out_s)),
            "input_psnr": float(np.mean(in_p)), "input_ssim": float(np.mean(in_s))}


# --------------------------------------------------------------------------------------------
# The trainer


@dataclass
class StepRecord:
    """What one optimisation step did (yielded by :meth:`Trainer.steps`)."""

    step: int  # steps completed so far (1 after the first step)
    total_steps: int
    lr: float
    losses: dict[str, float]
    grad_norm: float | None
    seconds: float
    patches_per_s: float
    validation: dict[str, float] | None = None
    checkpoint: str | None = None


@dataclass
class TrainResult:
    steps_done: int
    completed: bool
    model_path: Path | None
    best: dict[str, Any] | None
    last_validation: dict[str, float] | None
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """One training run. Files go to ``config.out_dir`` unless ``write_files=False`` (in-memory
    fine-tuning); ``resume=True`` continues from ``out_dir/checkpoints/last.json``.

    In-memory data may replace the config's sources: ``train_data`` (a dataset of
    ``{"inp", "gt"}``), ``extra_data`` (``{"inp"}`` unlabeled or ``{"inp", "gt"}`` labeled) and
    ``val_pairs``; ``model`` replaces the config's model choice.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        model: nn.Module | None = None,
        train_data: Any | None = None,
        extra_data: Any | None = None,
        extra_labeled: bool | None = None,
        val_pairs: Sequence[D.Pair] | None = None,
        write_files: bool = True,
        dist: DistInfo | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        from ..inference.devices import select_device

        self._clock = time.perf_counter()  # a time budget counts this session's setup (data loading) too
        self.config = config
        self.dist = dist or dist_from_env()
        self.write_files = write_files and self.dist.main
        self._stop = False
        if config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)

        dev = select_device(device if device is not None else config.device)
        if dev.type == "cuda" and self.dist.active:
            dev = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(dev)
        self.device = dev
        init_distributed(self.dist, dev)

        self.seed = config.seed
        self.train_data = train_data if train_data is not None else build_paired_dataset(config.data, config, self.seed)
        if extra_data is not None:
            self.extra_data = extra_data
            self.extra_labeled = bool(extra_labeled)
        elif config.unlabeled:
            self.extra_data, self.extra_labeled = build_unlabeled_dataset(config.unlabeled, config, self.seed + 1), False
        elif config.extra_pairs:
            self.extra_data, self.extra_labeled = build_paired_dataset(config.extra_pairs, config, self.seed + 2), True
        else:
            self.extra_data, self.extra_labeled = None, False
        self.val_pairs = list(val_pairs) if val_pairs is not None else (build_validation_pairs(config) if self.dist.main else [])

        if model is not None:
            self.net, self.provenance = model, {"init": "given"}
        else:
            self.net, self.provenance = build_network(config)
        check_patch_size(config.patch.size, self.net)
        from ..models.layers import set_gradient_checkpointing

        set_gradient_checkpointing(self.net, config.checkpointing)
        self.net.to(dev).train()
        self.banks = _psf_banks(self.train_data, self.extra_data)
        if dev.type == "cuda":  # the GPU should not wait for kernels drawn the first time
            for bank in self.banks:
                bank.prebuild()
        self.scales = ScalesModule(self.net)
        self.forward = self.scales
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(self.scales, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.objective = EFCRObjective(config.efcr)
        if self.dist.active and config.grad_accum > 1:
            self._accumulate = self.forward.no_sync  # sync gradients on the last micro-batch only
        else:
            self._accumulate = contextlib.nullcontext
        o = config.optim
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.amp = autocast_dtype(config.precision, dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp == torch.float16)

        self.step = 0
        #: Time-budgeted runs: the steps the schedule is laid over (None until measured) and the
        #: seconds of the budget used so far (training, validation and checkpoints, all sessions).
        self.planned_steps: int | None = None
        self.budget_used = 0.0
        self.best: dict[str, Any] | None = None
        self.last_validation: dict[str, float] | None = None
        self.wall_seconds = 0.0
        self.history: list[dict[str, Any]] = []
        self.out_dir = Path(config.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        if resume:
            self._resume()
        elif self.write_files and C.pointer(self.ckpt_dir, "last") is not None:
            raise C.CheckpointError(
                f"{self.out_dir} already holds a training run (checkpoints/last.json); "
                "resume it (--resume) or choose another out_dir"
            )
        if self.write_files:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out_dir / "config.json", config_json(config) + "\n")

    # ---------------------------------------------------------------- control

    def stop(self) -> None:
        """Ask the run to end after the current step (the weights so far are kept and saved)."""
        self._stop = True

    @property
    def stopped(self) -> bool:
        return self._stop

    # ---------------------------------------------------------------- data

    def _indices(self, step: int) -> list[int]:
        """Global sample indices of this process's share of the batch at ``step``."""
        b = self.config.batch_size
        start = (step * self.dist.world + self.dist.rank) * b
        return list(range(start, start + b))

    def _reblur_sizes(self, indices: Sequence[int]) -> list[int]:
        ks = self.config.efcr.reblur_kernel_sizes
        return [ks[int(np.random.default_rng([self.seed, i, 7]).integers(len(ks)))] for i in indices]

    def _batches(self, start_step: int) -> Iterator[tuple[list[int], dict, dict | None]]:
        """(indices, batch, extra batch) for each step from ``start_step``, collated on the CPU
        (``datasets.collate``): synthetic samples are finished on the device in :meth:`_train_step`."""
        workers = resolve_workers(self.config.num_workers, self.device)
        if workers == 0:
            source = _StepBatches(self, start_step)
            yield from source
            return
        loader = torch.utils.data.DataLoader(
            _StepBatches(self, start_step), batch_size=None, num_workers=workers, persistent_workers=True,
            prefetch_factor=4, pin_memory=self.device.type == "cuda",
        )
        yield from loader

    def _materialise(self, batch: dict) -> dict[str, torch.Tensor]:
        return D.materialise(batch, self.device, self.config.patch.normalisation)

    # ---------------------------------------------------------------- one step

    def _train_step(self, idx: list[int], batch: dict, extra: dict | None) -> tuple[dict[str, float], float | None]:
        """One optimiser step on a collated batch: synthesise on the device, forward/backward in
        ``grad_accum`` equal micro-batches (gradients summed, each loss weighted 1/N: the same
        update as one pass over the whole batch), clip, step."""
        dev = self.device
        lr = lr_at(self.step, self.config, self.planned_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        main = self._materialise(batch)
        aux = None if extra is None else self._materialise(extra)
        inp, gt = main["inp"], main["gt"]
        extra_inp = None if aux is None else aux["inp"]
        extra_gt = None if (aux is None or not self.extra_labeled) else aux["gt"]
        sizes = self._reblur_sizes(idx)
        parts = self.config.grad_accum
        n = inp.shape[0] // parts
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for j in range(parts):
            sl = slice(j * n, (j + 1) * n)
            sync = contextlib.nullcontext() if j == parts - 1 else self._accumulate()
            with sync:
                with torch.autocast(dev.type, dtype=self.amp, enabled=self.amp is not None):
                    terms = self.objective(self.forward, inp[sl], gt[sl],
                                           None if extra_inp is None else extra_inp[sl],
                                           None if extra_gt is None else extra_gt[sl], reblur_sizes=sizes[sl])
                self.scaler.scale(terms.total / parts).backward()
            for key, value in terms.as_floats().items():
                totals[key] = totals.get(key, 0.0) + value / parts
        grad_norm = None
        if self.config.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.config.optim.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return totals, grad_norm

    # ---------------------------------------------------------------- the loop

    @property
    def total_steps(self) -> int:
        """The steps this run aims for: ``config.steps``, or a time-budgeted run's planned steps."""
        return self.planned_steps if self.planned_steps is not None else self.config.steps

    def steps(self) -> Iterator[StepRecord]:
        """Run until the steps are done, the time budget is spent or :meth:`stop`, yielding a
        record after every step.

        Closing the generator early (``break`` in the caller) also saves the last checkpoint.
        """
        cfg = self.config
        budget = None if cfg.time_budget_minutes is None else 60.0 * cfg.time_budget_minutes
        bar = None
        if cfg.progress and self.dist.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=cfg.name, unit="step", dynamic_ncols=True)
        saved_at = self.step
        batches = self._batches(self.step)
        session_start, used_before = self._clock, self.budget_used
        step_times: list[float] = []
        costs = {"validation": 0.0, "checkpoint": 0.0}
        try:
            while self.step < self.total_steps and not self._stop:
                t0 = time.perf_counter()
                idx, batch, extra = next(batches)
                losses, grad_norm = self._train_step(idx, batch, extra)
                seconds = time.perf_counter() - t0
                step_times.append(seconds)
                self.wall_seconds += seconds
                self.step += 1
                record = StepRecord(
                    step=self.step, total_steps=self.total_steps, lr=lr_at(self.step - 1, cfg, self.planned_steps),
                    losses=losses, grad_norm=grad_norm, seconds=seconds,
                    patches_per_s=cfg.batch_size * self.dist.world / max(seconds, 1e-9),
                )
                if not all(math.isfinite(v) for v in losses.values()):
                    raise FloatingPointError(f"step {self.step}: non-finite loss {losses}; lower the learning rate "
                                             "or enable grad_clip")
                self._log(record)
                calibrate = budget is not None and self.planned_steps is None and self.step >= CALIBRATION_STEPS
                end = self.step >= self.total_steps
                if budget is not None and not calibrate and not end:
                    self.budget_used = used_before + time.perf_counter() - session_start
                    end = self._budget_spent(budget, step_times, costs)
                validate = cfg.validation is not None and (self.step % cfg.validation.every == 0 or end or calibrate)
                if validate:
                    t_val = time.perf_counter()
                    record.validation = self.validate()
                    costs["validation"] = time.perf_counter() - t_val
                if (self.step % cfg.checkpoint_every == 0 or end or calibrate
                        or (record.validation and self._is_best(record.validation))):
                    t_ckpt = time.perf_counter()
                    record.checkpoint = self.save_checkpoint(record.validation)
                    costs["checkpoint"] = time.perf_counter() - t_ckpt
                    saved_at = self.step
                self.budget_used = used_before + time.perf_counter() - session_start
                if calibrate:
                    self._plan(budget, step_times, costs)
                    end = self.step >= self.total_steps
                    if bar is not None:
                        bar.total = self.total_steps
                if bar is not None:
                    post = {"loss": f"{losses['loss']:.4g}"}
                    if self.last_validation:
                        post["val_psnr"] = f"{self.last_validation['psnr']:.2f}"
                    bar.set_postfix(post)
                    bar.update(1)
                yield record
                if end:
                    break
        finally:
            if bar is not None:
                bar.close()
            if self.step > saved_at:
                self.save_checkpoint(None)
            self.budget_used = used_before + time.perf_counter() - session_start
            self._clock = time.perf_counter()
            for bank in self.banks:
                bank.save()

    def _plan(self, budget: float, step_times: list[float], costs: dict[str, float]) -> None:
        """Lay the schedule over the steps that fit in the rest of the budget (measured now)."""
        cfg = self.config
        measured = step_times[1:] or step_times  # the first step pays one-off warm-ups
        per_step = float(np.mean(measured))
        if cfg.validation is not None:
            per_step += costs["validation"] / cfg.validation.every
        per_step += costs["checkpoint"] / cfg.checkpoint_every
        reserve = costs["validation"] + 2 * costs["checkpoint"]  # the final validation, checkpoint, export
        left = budget - self.budget_used - reserve
        more = max(1, int(left / per_step)) if left > 0 else 1
        self.planned_steps = min(cfg.steps, self.step + more)

    def _budget_spent(self, budget: float, step_times: list[float], costs: dict[str, float]) -> bool:
        """True when another step plus the final validation, checkpoint and export would not fit."""
        recent = step_times[-20:]
        next_step = max(float(np.median(recent)), recent[-1])
        reserve = costs["validation"] + 2 * costs["checkpoint"]
        return self.budget_used + next_step + reserve > budget

    def run(self, callback: Callable[[StepRecord], Any] | None = None) -> TrainResult:
        """Run to the end (or until stopped); ``callback(record)`` after every step. Saves the
        final model (``out_dir/model``) through the model registry."""
        for record in self.steps():
            if callback is not None and callback(record) is False:
                self.stop()
        return self.finish()

    def finish(self) -> TrainResult:
        completed = self.step >= self.total_steps
        model_path = None
        if self.write_files and self.step > 0:
            if self.config.time_budget_minutes is not None and self.best is not None:
                model_path = C.export_checkpoint(self.ckpt_dir, self.out_dir / "model", which="best",
                                                 name=self.config.name, replace=True)
            else:
                model_path = self.save_final_model(self.out_dir / "model")
        if self.dist.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
        return TrainResult(self.step, completed, model_path, self.best, self.last_validation, self.history)

    # ---------------------------------------------------------------- validation

    def validate(self) -> dict[str, float] | None:
        if not self.dist.main or not self.val_pairs:
            self._barrier()
            return None
        t0 = time.perf_counter()
        metrics = evaluate_pairs(self.net, self.val_pairs, self.device, self.amp, self.config.patch.normalisation)
        metrics["seconds"] = time.perf_counter() - t0
        metrics["step"] = self.step
        self.last_validation = metrics
        if self.write_files:
            self._append_csv("val.csv", VAL_COLUMNS, metrics)
        self._barrier()
        return metrics

    def _is_best(self, metrics: dict[str, float]) -> bool:
        return self.best is None or metrics["psnr"] > self.best["psnr"]

    def _barrier(self) -> None:
        if self.dist.active:
            import torch.distributed as dist

            dist.barrier()

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
        for name in ("log.csv", "val.csv"):
            path = self.out_dir / name
            if path.exists():
                rows = list(csv.DictReader(path.open(encoding="utf-8")))
                buf = io.StringIO()
                cols = LOG_COLUMNS if name == "log.csv" else VAL_COLUMNS
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
        }
        is_best = validation is not None and self._is_best(validation)
        if is_best:
            self.best = {"step": self.step, **validation}
            state["best"] = self.best
        folder = C.write_checkpoint(self.ckpt_dir, self.step, self.net, self.optimizer, state, record)
        if is_best:
            C.point(self.ckpt_dir, "best", folder, self.step, {"psnr": validation["psnr"], "ssim": validation["ssim"]})
        C.point(self.ckpt_dir, "last", folder, self.step)
        C.prune(self.ckpt_dir)
        return str(folder)

    def _resume(self) -> None:
        ckpt = C.read_checkpoint(self.ckpt_dir, "last")
        saved = ckpt.state.get("config", {})
        ours = json.loads(config_json(self.config))
        for key in ("model", "batch_size", "seed", "patch", "efcr"):
            if saved.get(key) != ours.get(key):
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
        self.net.load_state_dict(loaded.model.state_dict())
        self.optimizer.load_state_dict(C.optimizer_from_flat(ckpt.tensors, ckpt.state["optimizer"]))
        if ckpt.state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt.state["scaler"])
        C.restore_rng(ckpt.tensors)
        self.step = ckpt.step
        self.best = ckpt.state.get("best")
        self.last_validation = ckpt.state.get("last_validation")
        self.wall_seconds = float(ckpt.state.get("wall_seconds", 0.0))
        self.planned_steps = ckpt.state.get("planned_steps")
        self.budget_used = float(ckpt.state.get("budget_used_seconds", 0.0))
        if self.write_files:
            self._truncate_logs(self.step)

    def save_final_model(self, path: Path) -> Path:
        from ..models.registry import save_model

        return save_model(
            self.net, path, name=self.config.name,
            description=f"trained with napari-mpt-deblur for {self.step} steps (EFCR beta {self.config.efcr.beta:g})",
            normalisation=self.config.patch.normalisation, training=self._training_record(), trained=True,
        )


class _StepBatches(torch.utils.data.IterableDataset):
    """Worker-side batch assembly: worker w of W builds the batches of steps w, w + W, ...;
    DataLoader hands them out round-robin, so the order is the step order."""

    def __init__(self, trainer: Trainer, start_step: int) -> None:
        self.train_data = trainer.train_data
        self.extra_data = trainer.extra_data
        # Plain numbers, not the trainer: spawned workers (macOS, Windows) pickle this object.
        self.batch, self.world, self.rank = trainer.config.batch_size, trainer.dist.world, trainer.dist.rank
        self.start = start_step

    def indices(self, step: int) -> list[int]:
        start = (step * self.world + self.rank) * self.batch
        return list(range(start, start + self.batch))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        step = self.start + wid
        while True:
            idx = self.indices(step)
            batch = D.collate([self.train_data[i] for i in idx])
            extra = None if self.extra_data is None else D.collate([self.extra_data[i] for i in idx])
            yield idx, batch, extra
            step += nw


def resolve_workers(setting: int | str, device: torch.device) -> int:
    """Data-loading worker processes: a number as given; ``auto``: on a GPU all cores but one (at
    most 8: the synthesis itself runs on the GPU), none on a CPU or MPS device (the main process
    synthesises there, and on a small machine workers only compete with the model for cores)."""
    if setting != "auto":
        return int(setting)
    if device.type == "cuda":
        return max(0, min(8, (os.cpu_count() or 1) - 1))
    return 0


def check_patch_size(patch: int, net: nn.Module) -> None:
    """Refuse a patch the network would pad (MPT: silently wasted compute) or cannot run (H2T)."""
    multiple = getattr(getattr(net, "config", None), "size_multiple", 1)
    if patch % multiple:
        low = max(multiple, patch // multiple * multiple)
        arch = getattr(net, "config", None)
        name = f"{arch.arch}/{arch.preset}" if arch is not None else type(net).__name__
        raise ValueError(f"patch.size {patch} is not a multiple of {multiple}, the size multiple of {name}; "
                         f"use {low} or {low + multiple}")


def _psf_banks(*datasets: Any) -> list[Any]:
    """The PSF banks the synthetic parts of these datasets draw from (kept in this process)."""
    from ..data.psf_bank import PSFBank

    keys: list[str] = []
    for ds in datasets:
        for part in getattr(ds, "datasets", [ds]):
            key = getattr(part, "bank_key", None)
            if key is not None and key not in keys:
                keys.append(key)
    return [PSFBank.by_key(k) for k in keys]


def train(config: TrainConfig, *, resume: bool = False, out_dir: Path | None = None,
          callback: Callable[[StepRecord], Any] | None = None) -> TrainResult:
    """Train from a config (the ``mpt-deblur train`` entry point; works under ``torchrun``)."""
    if out_dir is not None:
        config = config.model_copy(update={"out_dir": Path(out_dir)})
    trainer = Trainer(config, resume=resume)
    try:
        return trainer.run(callback)
    finally:
        if trainer.dist.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
