"""Orientation averaging ("self-ensemble"): restore each tile in several orientations, map every
result back and average.

A network that builds its output on a stride-2 grid (sub-pixel upsamplers, pooled pyramids) can
add a faint pattern locked to that grid: the shipped ``mpt-small-fluo`` adds one whose period-2
energy is 7.3x the camera noise level on the demo image (issue 13, docs/models.md). The grid is
anchored at the tile's top-left corner (models pad at the bottom and right only). On an even tile
side, flipping the tile moves every grid pattern by one pixel: a pattern of period 2 changes sign,
and the average of the four flips {none, x, y, x and y} cancels it along both axes exactly,
whatever its phase. The restored image itself is (nearly) flip-equivariant, so it survives the
average, and averaging four slightly different estimates lowers their error too (measured in
docs/inference.md). Tile sides are multiples of the model's size multiple, hence even, except a
whole image smaller than the tile: an odd side is first extended by one replicated row or column,
because flipping an odd side keeps every pixel's parity and would cancel nothing.

``orientations``: 1 (off), 4 (the four flips) or 8 (the four flips of the tile and of its
transpose: the dihedral group of the square). Time grows with the count.

Flips cancel a grid pattern only when it is the same, up to its sign, wherever the flipped grid
lands; ``mpt-tiny-fluo``'s period-2 pattern is modulated along the 64-pixel window grid of its
deepest levels and survives them (Nyquist energy ratio on the demo image: 7.2 in one pass, 13.1
with 4 flips, 7.2 with 8). ``shifts`` 2 restores every orientation a second time moved by one
pixel along both axes (the tile's first row and column dropped, one replicated row and column
added at the far side, so the tile keeps its size) and maps it back: every pixel changes parity
on the stride-2 grid while the window grid stays (almost) where it was, so a period-2 pattern
changes sign and the pair's mean cancels it (1.8 on the demo image, the input's 1.07). The tile's
first row and column have no shifted twin and keep the unshifted value.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .settings import ORIENTATION_COUNTS, SHIFT_COUNTS

#: (transpose, axes to flip) of each orientation, in the order they are averaged.
_ORIENTATIONS: tuple[tuple[bool, tuple[int, ...]], ...] = (
    (False, ()), (False, (-1,)), (False, (-2,)), (False, (-2, -1)),
    (True, ()), (True, (-1,)), (True, (-2,)), (True, (-2, -1)),
)


def _to(x: torch.Tensor, transpose: bool, flips: tuple[int, ...]) -> torch.Tensor:
    if transpose:
        x = x.transpose(-2, -1)
    return torch.flip(x, flips) if flips else x


def _back(y: torch.Tensor, transpose: bool, flips: tuple[int, ...]) -> torch.Tensor:
    if flips:
        y = torch.flip(y, flips)
    return y.transpose(-2, -1) if transpose else y


def _shifted_forward(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     unshifted: torch.Tensor) -> torch.Tensor:
    """``forward`` of ``x`` (B, C, h, w) moved by one pixel up and left, mapped back: (B, C, h, w)
    float32. Row 0 and column 0, which the moved tile no longer holds, are ``unshifted``'s."""
    moved = F.pad(x[..., 1:, 1:], (0, 1, 0, 1), mode="replicate")
    y = forward(moved).float()
    back = unshifted.clone()
    back[..., 1:, 1:] = y[..., :-1, :-1]
    return back


def average_orientations(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, count: int,
                         channels_last: bool = False, shifts: int = 1) -> torch.Tensor:
    """Mean of ``forward`` over ``count`` orientations of ``x`` (each also moved by one pixel
    when ``shifts`` is 2), each mapped back.

    ``x``: (B, C, h, w) on the model's device; ``forward``: (B, C, h', w') -> (B, C, h', w') (with
    ``count`` 8 it is also called on (B, C, w, h)). Returns (B, C, h, w), float32 when
    ``count * shifts`` > 1 (the sum is kept in float32 under reduced-precision autocast).
    ``count`` 1 with ``shifts`` 1 is ``forward(x)``.
    """
    if count not in ORIENTATION_COUNTS:
        raise ValueError(f"orientations must be one of {ORIENTATION_COUNTS}, got {count}")
    if shifts not in SHIFT_COUNTS:
        raise ValueError(f"shifts must be one of {SHIFT_COUNTS}, got {shifts}")
    if count == 1 and shifts == 1:
        return forward(x)
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2), mode="replicate")
    total = None
    for transpose, flips in _ORIENTATIONS[:count]:
        xi = _to(x, transpose, flips)
        if channels_last:
            xi = xi.contiguous(memory_format=torch.channels_last)
        yi = forward(xi).float()
        if shifts == 2:
            yi = yi.clone()  # a compiled forward may hand back a buffer it reuses on the next call
            yi = yi + _shifted_forward(forward, xi, yi)
        yi = _back(yi, transpose, flips)
        # Out of place: a compiled forward may hand back a buffer it reuses on the next call.
        total = yi if total is None else total + yi
    return total.div_(count * shifts)[..., :h, :w]
