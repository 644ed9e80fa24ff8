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
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import datasets as D
# Dataset building from the config's sources lives in data.builders; re-exported here.
from ..data.builders import (  # noqa: F401
    MixedDataset,
    build_paired_dataset,
    build_unlabeled_dataset,
    build_validation_pairs,
    load_source_pairs,
)
from ..io.atomic import write_text_atomic
from ..losses.efcr import EFCRObjective
from . import checkpoint as C
from .config import TrainConfig, config_json
from .ema import WeightAverage
# Pieces of the trainer that live in their own modules; re-exported here for existing imports.
from .network import (  # noqa: F401
    HEAD_INIT_SCALE, ScalesModule, autocast_dtype, build_network, check_channels, check_patch_size, evaluate_pairs,
    freeze_all_but, lr_at, psnr_by_defocus, significant_gain,
)
from .parallel import DistInfo, _StepBatches, dist_from_env, init_distributed, resolve_workers  # noqa: F401
from .run_files import LOG_COLUMNS, VAL_COLUMNS, VAL_DEFOCUS_COLUMNS, RunFiles  # noqa: F401

#: Time-budgeted runs measure this many steps before laying the schedule over the budget.
CALIBRATION_STEPS = 5


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


class Trainer(RunFiles):
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
        self.train_data = train_data if train_data is not None else build_paired_dataset(config.data, config.patch, self.seed)
        if extra_data is not None:
            self.extra_data = extra_data
            self.extra_labeled = bool(extra_labeled)
        elif config.unlabeled:
            self.extra_data, self.extra_labeled = build_unlabeled_dataset(config.unlabeled, config.patch, self.seed + 1), False
        elif config.extra_pairs:
            self.extra_data, self.extra_labeled = build_paired_dataset(config.extra_pairs, config.patch, self.seed + 2), True
        else:
            self.extra_data, self.extra_labeled = None, False
        self.val_pairs = list(val_pairs) if val_pairs is not None else (
            build_validation_pairs(config.validation.data, config.validation.crop, config.seed)
            if self.dist.main and config.validation is not None else [])

        if model is not None:
            self.net, self.provenance = model, {"init": "given"}
        else:
            self.net, self.provenance = build_network(config)
        check_patch_size(config.patch.size, self.net)
        check_channels(self.net, self.train_data)
        if self.extra_data is not None:
            check_channels(self.net, self.extra_data, "extra data")
        if self.val_pairs:
            check_channels(self.net, self.val_pairs, "validation pairs")
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
        self.trained_params = freeze_all_but(self.net, config.model.trainable)
        self.optimizer = torch.optim.AdamW(self.trained_params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.amp = autocast_dtype(config.precision, dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp == torch.float16)
        #: The weights' moving average (``optim.ema_decay``), or None: what is validated and saved.
        self.ema = WeightAverage(self.net, o.ema_decay) if o.ema_decay is not None else None

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
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trained_params, self.config.optim.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.net)
        return totals, grad_norm

    # ---------------------------------------------------------------- the loop

    @property
    def eval_net(self) -> nn.Module:
        """The weights a run validates, checkpoints and exports: the moving average when
        ``optim.ema_decay`` is set, else the trained network itself."""
        return self.ema.model if self.ema is not None else self.net

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

    def drive(self, callback: Callable[[StepRecord], Any] | None = None,
              should_stop: Callable[[], bool] | None = None) -> None:
        """Run :meth:`steps` to the end; after every step ``callback(record)`` (returning False
        stops the run) and ``should_stop()`` (e.g. a Stop button's flag) are asked."""
        for record in self.steps():
            if (callback is not None and callback(record) is False) or (should_stop is not None and should_stop()):
                self.stop()

    def run(self, callback: Callable[[StepRecord], Any] | None = None) -> TrainResult:
        """Run to the end (or until stopped); ``callback(record)`` after every step. Saves the
        final model (``out_dir/model``) through the model registry."""
        self.drive(callback)
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
        metrics = evaluate_pairs(self.eval_net, self.val_pairs, self.device, self.amp, self.config.patch.normalisation,
                                 per_pair=True)
        metrics["seconds"] = time.perf_counter() - t0
        metrics["step"] = self.step
        self.last_validation = metrics
        if self.write_files:
            self._append_csv("val.csv", VAL_COLUMNS, metrics)
            for row in psnr_by_defocus(self.val_pairs, metrics):
                self._append_csv("val_by_defocus.csv", VAL_DEFOCUS_COLUMNS, {"step": self.step, **row})
        self._barrier()
        return metrics

    def _is_best(self, metrics: dict[str, float]) -> bool:
        if self.best is None:
            return True
        se = self.config.validation.min_gain_se if self.config.validation is not None else 0.0
        return significant_gain(metrics, self.best, se)

    def _barrier(self) -> None:
        if self.dist.active:
            import torch.distributed as dist

            dist.barrier()


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


class TrainerJob:
    """The face shared by the jobs built on one :class:`Trainer` (fine-tuning, calibration):
    the network being trained, its step records (a live view) and Stop."""

    trainer: Trainer

    @property
    def model(self) -> nn.Module:
        return self.trainer.eval_net

    def steps(self) -> Iterator[StepRecord]:
        return self.trainer.steps()

    def stop(self) -> None:
        """End after the current step; the weights so far are kept."""
        self.trainer.stop()


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
