"""An exponential moving average (EMA) of the weights being trained.

Why: on a short CPU schedule the validation of the raw weights jumps by +-0.1-0.2 dB from one
check to the next (the last steps' gradient noise), and the best check is partly luck. The
average over the last ~1/(1 - decay) steps keeps what the steps agree on. Restoration networks
(Restormer, NAFNet, SwinIR) are commonly evaluated with such averaged weights.

The average starts at the weights the run starts from (a warm start's weights, not zeros), and
its decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the first steps
of a run are not frozen at the start weights for thousands of steps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay used for update number ``updates`` (0-based): ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightAverage:
    """An averaged copy of ``net`` (``self.model``, eval mode, no gradients).

    ``update(net)`` after every optimiser step: parameters move towards the trained ones by
    ``1 - ema_decay_at(decay, n)``; buffers (e.g. norm statistics) are copied as they are.
    The average lives on the network's device in the parameters' own dtype (float32 under
    autocast, which casts activations, not the stored weights).
    """

    def __init__(self, net: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(net).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        weight = 1.0 - ema_decay_at(self.decay, self.updates)
        ours = list(self.model.parameters())
        theirs = [p.detach() for p in net.parameters()]
        if len(ours) != len(theirs):
            raise ValueError("the averaged model and the trained network have different parameters")
        torch._foreach_lerp_(ours, theirs, weight)
        for mine, other in zip(self.model.buffers(), net.buffers()):
            mine.copy_(other)
        self.updates += 1
