"""The network being trained: building it from the config, its multi-scale wrapper, the learning-rate
schedule, the autocast dtype, the patch-size check, and validation scores through the inference
engine's plane restorer. Used by :class:`napari_mpt_deblur.training.trainer.Trainer` (which
re-exports these names) and by :mod:`napari_mpt_deblur.training.memory`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import datasets as D
from ..data.normalisation import NormalisationConfig
from ..data.validation_pairs import pair_defocus_um
from ..evaluation.metrics import psnr, ssim
from .config import TrainConfig


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
        provenance = {"init": str(loaded.path), "init_name": loaded.record.name}
        have = loaded.record.architecture.in_channels
        if choice.in_channels is None or choice.in_channels == have:
            return loaded.model.train(), provenance
        if have != 1:
            raise ValueError(f"model.in_channels {choice.in_channels}: the warm start {loaded.record.name!r} has "
                             f"{have} channels; only a 1-channel model can be widened")
        return widen_channels(loaded.model, choice.in_channels).train(), {**provenance, "widened_from_channels": 1}
    arch = choice.architecture or preset_config(choice.arch, choice.preset, choice.in_channels or 1)
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


def widen_channels(net: nn.Module, channels: int) -> nn.Module:
    """A ``channels``-in, ``channels``-out copy of a trained 1-channel network that starts out as
    the grey network applied to the channels' mean, written into every channel (a network with a
    global residual, the MPT, adds that correction to each channel's own input instead): every
    weight that reads the image (input-channel axis 1 -> C) is repeated and divided by C, every
    weight that writes it (output-channel axis 1 -> C) is repeated. Any other shape change is an
    error."""
    from ..models.registry import build_model

    arch = net.config.model_copy(update={"in_channels": channels, "out_channels": channels})
    wide = build_model(arch)
    old, new = net.state_dict(), wide.state_dict()
    for name, target in new.items():
        value = old[name]
        if value.shape != target.shape:
            diff = [i for i, (a, b) in enumerate(zip(value.shape, target.shape)) if a != b]
            if value.ndim != target.ndim or len(diff) != 1 or value.shape[diff[0]] != 1 or diff[0] > 1:
                raise ValueError(f"cannot widen {name} from {tuple(value.shape)} to {tuple(target.shape)}")
            reps = [1] * value.ndim
            reps[diff[0]] = channels
            value = value.repeat(*reps) / (channels if diff[0] == 1 else 1)
        new[name] = value
    wide.load_state_dict(new)
    return wide


def sample_channels(dataset) -> int | None:
    """Channels of a dataset's samples (its first sample's ``inp`` or sharp window, or a validation
    :class:`~napari_mpt_deblur.data.loaders.Pair`'s input); None for samples of another kind (a
    benchmark's stand-in)."""
    item = dataset[0] if len(dataset) else None
    if isinstance(item, D.Pair):
        return 1 if item.inp.ndim == 2 else int(item.inp.shape[0])
    if not isinstance(item, dict):
        return None
    value = item.get("inp", item.get("sharp"))
    return None if value is None else int(value.shape[0])


_CHANNEL_HINTS = {
    "training data": "a colour model needs defocus.channel_wavelengths_um on its synthetic sources",
    "extra data": "the extra (unlabeled or paired) images must be colour images too",
    "validation pairs": "set validation.data.channel_wavelengths_um",
}


def check_channels(net: nn.Module, dataset, what: str = "training data") -> None:
    """Refuse data whose channel count is not the network's input channels, naming both; every
    source of a mixed dataset is checked (``dataset.datasets``), so a mismatch never waits for the
    batch that happens to mix them."""
    want = getattr(getattr(net, "config", None), "in_channels", 1)
    for part in getattr(dataset, "datasets", [dataset]):
        have = sample_channels(part)
        if have is not None and have != want:
            hint = (_CHANNEL_HINTS.get(what, "") if want > 1 else
                    "multi-channel data needs model.in_channels set to its channel count")
            verb = "have" if what.endswith("pairs") else "has"
            raise ValueError(f"{what} {verb} {have} channel(s) per sample but the network takes {want}"
                             + (f" ({hint})" if hint else ""))


#: Scale of the MPT's output conv at a "zero" init (see build_network).
HEAD_INIT_SCALE = 1e-3


def freeze_all_but(net: nn.Module, prefixes: Sequence[str] | None) -> list[nn.Parameter]:
    """The parameters of ``net`` to train: those whose names are one of ``prefixes`` or start with
    one followed by a dot (a module path: ``"decoders.0"`` matches ``decoders.0.x`` but not
    ``decoders.01``); every other parameter gets ``requires_grad = False``. None: all of them.

    Raises ``ValueError`` naming the prefix that matches nothing, and the network's top-level
    modules, so that a typo does not silently freeze the whole network."""
    named = list(net.named_parameters())
    if prefixes is None:
        return [p for _, p in named]

    def matches(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    for prefix in prefixes:
        if not any(matches(name, prefix) for name, _ in named):
            tops = sorted({name.split(".")[0] for name, _ in named})
            raise ValueError(f"model.trainable {prefix!r} names no parameter of the network; "
                             f"its top-level modules are {', '.join(tops)} (a module path such as "
                             f"'{tops[0]}' or '{tops[0]}.0')")
    trained = []
    for name, param in named:
        keep = any(matches(name, prefix) for prefix in prefixes)
        param.requires_grad_(keep)
        if keep:
            trained.append(param)
    return trained


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
    """The training autocast dtype, None for fp32: the one precision rule of
    :func:`~napari_mpt_deblur.inference.devices.resolve_precision` (``auto``: bf16 on GPUs that
    support it, fp16 on older GPUs, fp32 on CPU; an explicit fp16/bf16 is honoured on CPU)."""
    from ..inference.devices import autocast_dtype_for, resolve_precision

    return autocast_dtype_for(resolve_precision(precision, device, training=True))


@torch.no_grad()
def evaluate_pairs(model: nn.Module, pairs: Sequence[D.Pair], device: torch.device,
                   amp: torch.dtype | None = None, norm: NormalisationConfig | None = None,
                   per_pair: bool = False) -> dict[str, Any]:
    """Mean PSNR / SSIM (data range 1, reference units) of the model and of the input itself.

    Each input is restored by the inference engine's plane restorer
    (:class:`~napari_mpt_deblur.inference.restorer.PlaneRestorer`: normalised by its own
    percentiles, tiled, run with out-of-memory back-off, mapped back), so a validation score
    measures what inference does. ``amp`` (the training autocast dtype) is used on GPUs; CPU
    validation runs in fp32, as CPU inference does. ``per_pair``: also ``"psnr_pairs"``, the
    model's PSNR on each pair in order (what :func:`gain_standard_errors` compares).
    """
    from ..inference.restorer import PlaneRestorer

    norm = norm or NormalisationConfig()
    was_training = model.training
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, "fp32") if device.type != "cpu" else "fp32"
    out_p, out_s, in_p, in_s = [], [], [], []
    try:
        restorer = PlaneRestorer.for_network(model, norm, device, precision)
        for pair in pairs:
            grey = pair.inp.ndim == 2  # else (C, H, W): one multi-channel plane
            plane = np.asarray(pair.inp, dtype=np.float32)
            pred = restorer.restore_plane(plane[None] if grey else plane, np.dtype(np.float32), label=pair.name)
            pred = pred[0] if grey else pred
            channel_axis = None if grey else 0
            out_p.append(psnr(pred, pair.gt))
            out_s.append(ssim(pred, pair.gt, channel_axis=channel_axis))
            in_p.append(psnr(pair.inp, pair.gt))
            in_s.append(ssim(pair.inp, pair.gt, channel_axis=channel_axis))
    finally:
        model.train(was_training)
    scores: dict[str, Any] = {"psnr": float(np.mean(out_p)), "ssim": float(np.mean(out_s)),
                              "input_psnr": float(np.mean(in_p)), "input_ssim": float(np.mean(in_s))}
    if per_pair:
        scores["psnr_pairs"] = [float(v) for v in out_p]
        scores["input_psnr_pairs"] = [float(v) for v in in_p]
    return scores


def psnr_by_defocus(pairs: Sequence[D.Pair], scores: dict[str, Any]) -> list[dict[str, float]]:
    """Model and input PSNR (dB) averaged per defocus over synthetic validation pairs, one row
    ``{"defocus_um", "pairs", "psnr", "input_psnr"}`` per defocus in the order first met.

    A single mean hides where a run gains and where it pays (a wider defocus range can lift 24 um
    and cost 12 um); these rows show it. Empty when the pairs carry no defocus in their names
    (paired folders, z-stacks) or ``scores`` has no per-pair values (``evaluate_pairs(per_pair=True)``).
    """
    model, given = scores.get("psnr_pairs"), scores.get("input_psnr_pairs")
    if model is None or given is None or len(model) != len(pairs):
        return []
    groups: dict[float, list[int]] = {}
    for i, pair in enumerate(pairs):
        defocus = pair_defocus_um(pair.name)
        if defocus is None:
            return []
        groups.setdefault(defocus, []).append(i)
    return [{"defocus_um": dz, "pairs": len(idx), "psnr": float(np.mean([model[i] for i in idx])),
             "input_psnr": float(np.mean([given[i] for i in idx]))} for dz, idx in groups.items()]


def gain_standard_errors(new: dict[str, Any], old: dict[str, Any]) -> float | None:
    """Mean per-pair PSNR gain of validation ``new`` over ``old`` (the same pairs, in the same
    order) in standard errors of the per-pair differences: how far the gain stands above the
    validation's own noise. None without per-pair scores on both sides or with fewer than two
    pairs; +-inf when every pair moved by the same amount."""
    a, b = new.get("psnr_pairs"), old.get("psnr_pairs")
    if a is None or b is None or len(a) != len(b) or len(a) < 2:
        return None
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(diff.std(ddof=1)) / math.sqrt(diff.size)
    mean = float(diff.mean())
    if se == 0.0:
        return math.copysign(math.inf, mean) if mean else 0.0
    return mean / se


def significant_gain(new: dict[str, Any], old: dict[str, Any], standard_errors: float) -> bool:
    """Whether validation ``new`` beats ``old``: a higher mean PSNR and, when ``standard_errors``
    > 0 and both have per-pair scores, a gain of more than that many standard errors
    (:func:`gain_standard_errors`)."""
    if new["psnr"] <= old["psnr"]:
        return False
    z = gain_standard_errors(new, old) if standard_errors > 0 else None
    return z is None or z > standard_errors


def check_patch_size(patch: int, net: nn.Module) -> None:
    """Refuse a patch the network would pad (MPT: silently wasted compute) or cannot run (H2T)."""
    multiple = getattr(getattr(net, "config", None), "size_multiple", 1)
    if patch % multiple:
        low = max(multiple, patch // multiple * multiple)
        arch = getattr(net, "config", None)
        name = f"{arch.arch}/{arch.preset}" if arch is not None else type(net).__name__
        raise ValueError(f"patch.size {patch} is not a multiple of {multiple}, the size multiple of {name}; "
                         f"use {low} or {low + multiple}")
