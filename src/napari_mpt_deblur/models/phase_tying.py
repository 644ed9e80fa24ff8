"""Turn a model with phase-split upsampling into the same model with resize-convolution upsampling.

A stride-2 transposed convolution (H2T U-Net ``upsample="transposed"``) or a sub-pixel
convolution (MPT ``upsample="pixel_shuffle"``) computes each of the four pixels of a 2x2 output
block with its own weights. :func:`tie_upsampling_phases` replaces every such layer by a
resize-convolution (:class:`~napari_mpt_deblur.models.layers.ResizeConvUpsample`) whose weight is
the MEAN of the four phases' weights, all other weights copied: the network computes what the old
one computes after averaging its phases, and can no longer produce a period-2 (checkerboard)
pattern. Retraining briefly from there recovers what the averaging costs (docs/models.md).

Weight layouts (PyTorch's):

* ``ConvTranspose2d(C_in, C_out, 2, stride=2)``: weight (C_in, C_out, 2, 2), output pixel
  (2y + i, 2x + j) uses ``weight[:, :, i, j]`` -> 1x1 conv weight (C_out, C_in, 1, 1) = mean over
  (i, j), transposed; the bias is kept.
* ``Conv2d(C, 2C, 3)`` + ``PixelShuffle(2)``: output channel c at phase k = 2i + j comes from conv
  channel 4c + k -> 3x3 conv weight (C/2, C, 3, 3) = mean over k.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import H2TUNetConfig, MPTConfig

#: The upsampler each architecture had before resize-convolution.
_PHASE_SPLIT = {"h2t_unet": "transposed", "mpt": "pixel_shuffle"}


def _tied_weight(arch: str, weight: torch.Tensor) -> torch.Tensor:
    if arch == "h2t_unet":  # (C_in, C_out, 2, 2) -> (C_out, C_in, 1, 1)
        return weight.mean(dim=(2, 3)).t().contiguous()[:, :, None, None]
    out = weight.shape[0] // 4  # (4 C_out, C_in, 3, 3) -> (C_out, C_in, 3, 3)
    return weight.reshape(out, 4, *weight.shape[1:]).mean(dim=1)


def tied_state_dict(arch: str, state: dict[str, torch.Tensor], old_ups: list[str], new_ups: list[str]) -> dict[str, torch.Tensor]:
    """``state`` with the upsamplers' weights (``old_ups``: module paths of the phase-split layers'
    weight tensors, ``new_ups``: the resize-convolutions' conv weights, same order) phase-averaged."""
    out = dict(state)
    for old, new in zip(old_ups, new_ups):
        out.pop(old)
        out[new] = _tied_weight(arch, state[old])
        old_bias, new_bias = old[: -len("weight")] + "bias", new[: -len("weight")] + "bias"
        if old_bias in state:
            out[new_bias] = out.pop(old_bias)
    return out


def _upsampler_weights(model: nn.Module) -> list[str]:
    """State-dict keys of the weight of each upsampler's conv, in order."""
    ups = model.unet.ups if hasattr(model, "unet") else model.ups
    prefix = "unet.ups" if hasattr(model, "unet") else "ups"
    keys = []
    for i, up in enumerate(ups):
        name = f"{prefix}.{i}.weight" if isinstance(up, nn.ConvTranspose2d) else f"{prefix}.{i}.0.weight"
        keys.append(name)
    return keys


def tie_upsampling_phases(model: nn.Module) -> nn.Module:
    """A new network with ``upsample="resize_conv"`` and the phase-averaged weights of ``model``
    (an MPT or H2T U-Net built with the phase-split upsampler; left unchanged), in eval mode.

    Raises ``ValueError`` for a model that already upsamples by resize-convolution.
    """
    from .registry import build_model

    config: MPTConfig | H2TUNetConfig = model.config
    if config.upsample != _PHASE_SPLIT[config.arch]:
        raise ValueError(f"the model already upsamples with {config.upsample!r}; nothing to tie")
    tied = build_model(config.model_copy(update={"upsample": "resize_conv"})).eval()
    state = tied_state_dict(config.arch, model.state_dict(), _upsampler_weights(model), _upsampler_weights(tied))
    tied.load_state_dict(state, strict=True)
    return tied


def phase_imbalance(model: nn.Module) -> list[float]:
    """Per phase-split upsampler: ||W - mean over the four phases|| / ||mean||, the size of what
    the phases disagree on relative to what they share (0 for tied phases; the first shipped
    h2t-unet-fluo: 1.4-1.7)."""
    arch = model.config.arch
    state = model.state_dict()
    sizes = []
    for key in _upsampler_weights(model):
        w = state[key].float()
        if arch == "h2t_unet":
            phases = w.flatten(0, 1).permute(1, 2, 0).reshape(4, -1)  # (4, C_in * C_out)
        else:
            phases = w.reshape(w.shape[0] // 4, 4, -1).transpose(0, 1).reshape(4, -1)
        mean = phases.mean(dim=0, keepdim=True)
        sizes.append(float((phases - mean).norm() / (mean.expand_as(phases).norm() + 1e-12)))
    return sizes
