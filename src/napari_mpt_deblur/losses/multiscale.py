"""Pixel losses: L1 (the papers') or MSE, of the MPT's one output or averaged over the scales of
the head-to-tail U-Net (docs/models.md, H2T paper eq. 6)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F


#: Pixel losses the objective offers: the paper's L1, or the mean squared error (what PSNR measures).
PixelLoss = Literal["l1", "mse"]


def pixel_distance(out: torch.Tensor, ref: torch.Tensor, kind: PixelLoss = "l1") -> torch.Tensor:
    """Mean absolute (``l1``) or squared (``mse``) difference, computed in float32; a scalar."""
    if kind == "l1":
        return F.l1_loss(out.float(), ref.float())
    if kind == "mse":
        return F.mse_loss(out.float(), ref.float())
    raise ValueError(f"pixel loss must be one of {get_args(PixelLoss)}, got {kind!r}")


def multiscale_pixel_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor, kind: PixelLoss = "l1") -> torch.Tensor:
    """Mean over scales of the mean absolute error (``kind`` "mse": squared error) between each
    output and the target average-pooled to that output's size. One output (the MPT): the plain
    pixel loss of that output.

    ``outputs``: K tensors (B, C, H / 2**(K-1-k), W / 2**(K-1-k)), coarsest first, as returned by
    ``HeadToTailUNet.forward_scales``; ``target``: (B, C, H, W). Returns a scalar.
    """
    if not outputs:
        raise ValueError("multiscale_pixel_loss needs at least one output")
    h, w = target.shape[-2:]
    losses = []
    for out in outputs:
        factor_h, factor_w = h // out.shape[-2], w // out.shape[-1]
        if factor_h != factor_w or factor_h * out.shape[-2] != h or factor_w * out.shape[-1] != w:
            raise ValueError(f"output of size {tuple(out.shape[-2:])} is not the target {h}x{w} divided by a power of 2")
        ref = F.avg_pool2d(target, factor_h) if factor_h > 1 else target
        losses.append(pixel_distance(out, ref, kind))
    return torch.stack(losses).mean()
