"""Small building blocks shared by the architectures."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis at every pixel, with weight and bias (2C parameters).

    Shape: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class ResizeConvUpsample(nn.Sequential):
    """Learned projection, then nearest-neighbour x2 (a "resize-convolution", Odena et al. 2016).

    The four output pixels of every 2x2 block share one weight, so, unlike a stride-2 transposed
    convolution or a sub-pixel convolution (PixelShuffle) whose four phases are trained apart, it
    cannot add a period-2 (checkerboard) pattern: its output has no energy at the Nyquist
    frequencies. The projection runs at the coarse resolution (a quarter of the cost).

    Shape: (B, C_in, H, W) -> (B, C_out, 2H, 2W).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, bias: bool = True) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias),
            nn.Upsample(scale_factor=2, mode="nearest"),
        )


def reflect_pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the last two axes at the bottom/right to the next multiple of ``multiple``.

    Reflection is used so the network sees image-like content at the border. ``F.pad`` only
    reflects by less than the axis length, so a pad larger than a small image is applied in
    several reflections (which amounts to a symmetric tiling of the image).

    Shape: (B, C, H, W) -> (B, C, H', W') with H', W' multiples of ``multiple``; also returns the
    original (H, W) for :func:`crop_to`.
    """
    h, w = x.shape[-2:]
    pad_h = (-h) % multiple
    pad_w = (-w) % multiple
    while pad_h or pad_w:
        cur_h, cur_w = x.shape[-2:]
        step_h = min(pad_h, cur_h - 1)
        step_w = min(pad_w, cur_w - 1)
        if step_h == 0 and step_w == 0:
            # A 1-pixel axis cannot be reflected: repeat its value instead.
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
            break
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        pad_h -= step_h
        pad_w -= step_w
    return x, (h, w)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop the last two axes back to ``size`` (inverse of :func:`reflect_pad_to_multiple`)."""
    return x[..., : size[0], : size[1]]


def run_block(block: nn.Module, *args: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
    """``block(*args)``; with ``checkpoint`` (and gradients on) its activations are recomputed in
    the backward pass instead of being kept (``torch.utils.checkpoint``, non-reentrant)."""
    if checkpoint and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint as recompute

        return recompute(block, *args, use_reentrant=False)
    return block(*args)


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing on or off in every module of ``model`` that supports it
    (those with a ``gradient_checkpointing`` attribute); weights are not affected."""
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = bool(enabled)
