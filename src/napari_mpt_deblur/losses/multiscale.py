"""Multi-scale L1 loss of the head-to-tail U-Net (docs/models.md, H2T paper eq. 6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def multiscale_l1(outputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Mean over scales of the mean absolute error between each output and the target
    average-pooled to that output's size.

    ``outputs``: K tensors (B, C, H / 2**(K-1-k), W / 2**(K-1-k)), coarsest first, as returned by
    ``HeadToTailUNet.forward_scales``; ``target``: (B, C, H, W). Returns a scalar.
    """
    if not outputs:
        raise ValueError("multiscale_l1 needs at least one output")
    h, w = target.shape[-2:]
    losses = []
    for out in outputs:
        factor_h, factor_w = h // out.shape[-2], w // out.shape[-1]
        if factor_h != factor_w or factor_h * out.shape[-2] != h or factor_w * out.shape[-1] != w:
            raise ValueError(f"output of size {tuple(out.shape[-2:])} is not the target {h}x{w} divided by a power of 2")
        ref = F.avg_pool2d(target, factor_h) if factor_h > 1 else target
        losses.append(F.l1_loss(out.float(), ref.float()))
    return torch.stack(losses).mean()
