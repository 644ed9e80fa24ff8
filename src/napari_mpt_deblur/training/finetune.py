"""Fine-tune a model on the user's own unlabeled images with EFCRex (the napari fine-tune widget).

Each step takes a LABELED batch of synthetic defocus pairs (physical PSF + camera noise) made from
sharp images (default: the bundled real in-focus BBBC006 image), or of patches of real
(blurred, sharp) examples given as ``paired``, and an UNLABELED batch of patches
from the user's blurry images. The loss is the pixel L1 on the labeled batch plus
``beta * mean_i(L+_i / (L-_i + L_ext'_i))``: ``L+`` / ``L-`` from the labeled batch, ``L_ext'``
from the unlabeled one (docs/training.md), so the unlabeled images steer the network through the
extended contrastive term. Everything stays in memory; :meth:`FineTuner.save` writes the result
through the model registry with its provenance.

``FineTuner(...).steps()`` yields a :class:`~napari_mpt_deblur.training.trainer.StepRecord` per
step (live loss plot); ``stop()`` ends after the current step and keeps the weights so far.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..data import datasets as D
from ..data.normalisation import NormalisationConfig
from ..data.optics import RGB_WAVELENGTHS_UM
from ..data.synthesis import DefocusRange
from ..inference.settings import Precision
from ..losses.efcr import WARM_START_NYQUIST_WEIGHT, EFCRConfig
from .config import ArraysSource, OptimConfig, TrainConfig
from .trainer import StepRecord, Trainer, TrainerJob

#: Default weight of the contrastive term when fine-tuning (docs/training.md: with the paper's
#: 1e-5 the unlabeled images have almost no influence on the weights).
FINETUNE_BETA = 0.1


@dataclass
class FinetuneResult:
    model: nn.Module
    steps_done: int
    stopped: bool
    history: list[dict[str, Any]] = field(default_factory=list)


def _resolve_model(model: Any, device: str) -> tuple[nn.Module, str, NormalisationConfig, dict[str, int | None]]:
    """(a copy of the network, its name, its normalisation, its inference ensemble defaults:
    ``ModelRecord.ensemble_defaults``)."""
    from ..models.registry import LoadedModel, load_model

    if isinstance(model, (str, os.PathLike)):
        model = load_model(model, "cpu")
    if isinstance(model, LoadedModel):
        return copy.deepcopy(model.model), model.record.name, model.record.normalisation, model.record.ensemble_defaults()
    if isinstance(model, nn.Module):
        return copy.deepcopy(model), getattr(model, "name", type(model).__name__), NormalisationConfig(), {}
    raise TypeError(f"model must be a model name/path, a LoadedModel or an nn.Module, got {type(model).__name__}")


#: Linear learning-rate warm-up of a fine-tune, in steps (issue 13). Without it AdamW's first
#: steps move every weight by about the full learning rate whatever its gradient (its moment
#: estimates are still empty), which unbalanced the four phases of the first H2T weights' stride-2
#: transposed convolutions within 7 steps. Runs shorter than this never reach the full learning
#: rate: a gentle fine-tune, by design.
FINETUNE_WARMUP_STEPS = 50


def finetune_warmup(steps: int) -> int:
    """Default warm-up for a fine-tune of ``steps`` steps (:data:`FINETUNE_WARMUP_STEPS`)."""
    return FINETUNE_WARMUP_STEPS


def _check_settings(*, steps: int, lr: float, batch: int, patch: int, beta: float) -> None:
    """One clear line per bad setting (the CLI shows it as is; names match its flags)."""
    import math

    for flag, value in (("steps", steps), ("batch", batch), ("patch", patch)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"--{flag} must be a whole number of at least 1, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and 0 < lr <= 1):
        raise ValueError(f"--lr (learning rate) must be a number above 0 and at most 1 (default 5e-5), got {lr!r}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"--beta must be a number above 0 (the unlabeled images act only through it; "
                         f"default {FINETUNE_BETA}), got {beta!r}")


def _check_patch(patch: int, shapes: Sequence[tuple[int, ...]], asked: int) -> None:
    """Refuse a patch of more than twice the area of the largest unlabeled image: it would be
    mostly mirrored padding and cost that much more compute for nothing (issue 13: patch 1000 on a
    520 x 696 image ran 135 s for 2 steps). A patch larger than the smallest image only warns (the
    default 128 on a small crop is fine)."""
    largest = max(int(np.prod(s[-2:])) for s in shapes)
    smallest = min(min(s[-2:]) for s in shapes)
    if patch * patch > 2 * largest:
        sizes = ", ".join("x".join(map(str, s[-2:])) for s in shapes[:3]) + ("..." if len(shapes) > 3 else "")
        raise ValueError(f"--patch {asked} px is larger than the unlabeled images ({sizes}); "
                         f"use a patch of at most {smallest} px (default 128)")
    if patch > smallest:
        import warnings

        warnings.warn(f"patch {patch} px is larger than the smallest unlabeled image ({smallest} px): its patches are "
                      "padded by mirroring", UserWarning, stacklevel=3)


class FineTuner(TrainerJob):
    """An in-memory EFCRex fine-tuning run on a COPY of ``model`` (the original is untouched)."""

    def __init__(
        self,
        model: Any,
        unlabeled_images: Sequence[np.ndarray],
        sharp_images: Sequence[np.ndarray] | None = None,
        *,
        paired: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
        steps: int = 500,
        lr: float = 5e-5,
        batch: int = 4,
        patch: int = 128,
        beta: float = FINETUNE_BETA,
        defocus: DefocusRange | None = None,
        device: str = "auto",
        precision: Precision = "auto",
        seed: int = 0,
        warmup_steps: int | None = None,
    ) -> None:
        if not unlabeled_images:
            raise ValueError("fine-tuning needs at least one unlabeled image")
        _check_settings(steps=steps, lr=lr, batch=batch, patch=patch, beta=beta)
        net, self.base_name, self.normalisation, self.ensemble_defaults = _resolve_model(model, device)
        channels = getattr(getattr(net, "config", None), "in_channels", 1)
        if channels != 1 and paired is None and sharp_images is None:
            # The bundled sharp image is grey (and the colour sample's sharp original is a test image).
            raise ValueError(f"{self.base_name} is a {channels}-channel (colour) model: its fine-tune needs sharp "
                             "colour images (or paired blurred/sharp examples) for the supervised term; no sharp "
                             "colour image ships for that")
        if channels != 1 and defocus is None:
            if channels != len(RGB_WAVELENGTHS_UM):
                raise ValueError(f"{self.base_name} has {channels} channels: give a defocus range with "
                                 "channel_wavelengths_um (one wavelength per channel)")
            defocus = DefocusRange(channel_wavelengths_um=RGB_WAVELENGTHS_UM)
        multiple = getattr(getattr(net, "config", None), "size_multiple", 1)
        asked_patch, patch = patch, int(np.ceil(patch / multiple) * multiple)
        if paired is not None and sharp_images is not None:
            raise ValueError("give either paired (blurred, sharp) examples or sharp images for synthetic pairs, not both")
        unlabeled = [D.as_channels(im, channels, f"unlabeled image {i}") for i, im in enumerate(unlabeled_images)]
        _check_patch(patch, [im.shape[-2:] for im in unlabeled], asked_patch)
        patch_cfg = D.PatchConfig(size=patch, normalisation=self.normalisation)
        if paired is not None:
            if not paired:
                raise ValueError("paired: no (blurred, sharp) examples given")
            pairs = []
            for i, (b, s_) in enumerate(paired):
                b2 = D.as_channels(b, channels, f"paired blurred image {i}")
                s2 = D.as_channels(s_, channels, f"paired sharp image {i}")
                if b2.shape != s2.shape:
                    raise ValueError(f"paired example {i}: blurred {b2.shape} and sharp {s2.shape} differ in shape")
                gt, inp = D.reference_units(s2, b2, self.normalisation)
                pairs.append(D.Pair(inp=inp, gt=gt, name=f"pair {i}"))
            labeled = D.PairedPatches(pairs, patch_cfg, seed=seed)
            labeled_desc, labeled_count = f"{len(pairs)} given (blurred, sharp) pairs", len(pairs)
        else:
            if sharp_images is None:
                from ..data.samples import in_focus_bbbc006

                sharp_images, sharp_desc = [in_focus_bbbc006()], "bundled in-focus BBBC006 image (a04_s1_w1)"
            else:
                sharp_desc = f"{len(sharp_images)} sharp images given"
            labeled = D.SyntheticPatches(list(sharp_images), patch_cfg, defocus or DefocusRange(), seed=seed)
            labeled_desc, labeled_count = f"synthetic pairs from {sharp_desc}", len(sharp_images)
        self.config = TrainConfig(
            name=f"{self.base_name}_finetuned",
            seed=seed,
            data=[ArraysSource(description=labeled_desc, count=labeled_count)],
            unlabeled=[ArraysSource(description="unlabeled images (e.g. napari layers)", count=len(unlabeled))],
            patch=patch_cfg,
            batch_size=batch,
            steps=steps,
            efcr=EFCRConfig(beta=beta, below_nyquist=True, nyquist_weight=WARM_START_NYQUIST_WEIGHT),
            optim=OptimConfig(lr=lr, lr_min=min(lr, 1e-6),
                              warmup_steps=finetune_warmup(steps) if warmup_steps is None else warmup_steps),
            precision=precision,
            device=device,
            progress=False,
        )
        self.trainer = Trainer(
            self.config,
            model=net,
            train_data=labeled,
            extra_data=D.UnlabeledPatches(unlabeled, patch_cfg, seed=seed + 1, channels=channels),
            extra_labeled=False,
            val_pairs=[],
            write_files=False,
        )
        self.unlabeled_shapes = [tuple(im.shape) for im in unlabeled]

    def run(self, callback: Callable[[StepRecord], Any] | None = None,
            should_stop: Callable[[], bool] | None = None) -> FinetuneResult:
        self.trainer.drive(callback, should_stop)
        self.model.eval()
        return FinetuneResult(self.model, self.trainer.step, self.trainer.stopped, self.trainer.history)

    def save(self, path: str | os.PathLike, name: str | None = None, description: str = "") -> Path:
        """Save the fine-tuned model (safetensors + JSON) with its provenance; never overwrites.

        ``path`` is a model NAME (saved in the user model folder) or a file path; see
        :func:`~napari_mpt_deblur.models.registry.model_save_target` (shipped names are refused).
        """
        from ..models.registry import model_paths, model_save_target, save_model

        weights, _ = model_paths(model_save_target(path))
        training = self.trainer._training_record()
        training.update(
            finetuned_from=self.base_name, method="EFCRex (unlabeled)",
            unlabeled_images=self.unlabeled_shapes,
            last_losses=self.trainer.history[-1] if self.trainer.history else None,
        )
        return save_model(self.model, weights, name=name or Path(weights).stem,
                          description=description or f"{self.base_name} fine-tuned with EFCRex for {self.trainer.step} steps",
                          normalisation=self.normalisation, training=training, trained=True,
                          **self.ensemble_defaults)


def finetune(
    model: Any,
    unlabeled_images: Sequence[np.ndarray],
    sharp_images: Sequence[np.ndarray] | None = None,
    *,
    callback: Callable[[StepRecord], Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
    **settings: Any,
) -> FinetuneResult:
    """Fine-tune a copy of ``model`` with EFCRex on ``unlabeled_images``: ``settings`` are the
    keyword settings of :class:`FineTuner` (``steps``, ``lr``, ``batch``, ``patch``, ``beta``,
    ``paired``, ``device``, ``seed``...), declared there only.

    ``callback(record)`` runs after every step (return False to stop); ``should_stop()`` is polled
    after every step too (e.g. a Stop button's flag). The returned model is in eval mode.
    """
    return FineTuner(model, unlabeled_images, sharp_images, **settings).run(callback, should_stop)
