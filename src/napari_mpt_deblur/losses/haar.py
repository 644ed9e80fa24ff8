"""One-level orthonormal 2D Haar wavelet transform in torch (differentiable), per channel.

Conventions match ``pywt.dwt2(x, 'haar')`` exactly: for each 2x2 block ``[[a, b], [c, d]]``

* ``LL = (a + b + c + d) / 2`` (pywt ``cA``),
* ``LH = (a + b - c - d) / 2`` (pywt ``cH``, horizontal detail: changes along rows),
* ``HL = (a - b + c - d) / 2`` (pywt ``cV``, vertical detail: changes along columns),
* ``HH = (a - b - c + d) / 2`` (pywt ``cD``).

The transform is orthonormal (energy preserving) and :func:`haar_idwt2` inverts it exactly. An
odd height or width is extended by repeating the last row/column first, which is what pywt's
default ``'symmetric'`` mode does for the two-tap Haar filter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def haar_dwt2(x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(..., H, W) -> ``(LL, (LH, HL, HH))``, each (..., ceil(H/2), ceil(W/2))."""
    if x.ndim < 2:
        raise ValueError(f"haar_dwt2 needs at least 2 dimensions, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        lead = x.shape[:-2]
        flat = x.reshape(-1, 1, h, w)
        flat = F.pad(flat, (0, w % 2, 0, h % 2), mode="replicate")
        x = flat.reshape(*lead, h + h % 2, w + w % 2)
    a = x[..., 0::2, 0::2]
    b = x[..., 0::2, 1::2]
    c = x[..., 1::2, 0::2]
    d = x[..., 1::2, 1::2]
    ll = (a + b + c + d) * 0.5
    lh = (a + b - c - d) * 0.5
    hl = (a - b + c - d) * 0.5
    hh = (a - b - c + d) * 0.5
    return ll, (lh, hl, hh)


def haar_idwt2(ll: torch.Tensor, details: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`haar_dwt2` for even-sized originals: (..., h, w) bands -> (..., 2h, 2w)."""
    lh, hl, hh = details
    a = (ll + lh + hl + hh) * 0.5
    b = (ll + lh - hl - hh) * 0.5
    c = (ll - lh + hl - hh) * 0.5
    d = (ll - lh - hl + hh) * 0.5
    top = torch.stack((a, b), dim=-1).flatten(-2)  # (..., h, 2w): a b a b ...
    bottom = torch.stack((c, d), dim=-1).flatten(-2)
    return torch.stack((top, bottom), dim=-2).flatten(-3, -2)  # rows interleaved


def low_high(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EFCR's band operators for (B, C, H, W) images: ``f_l = LL`` (B, C, h, w) and
    ``f_h = concat(LH, HL, HH)`` along channels (B, 3C, h, w)."""
    ll, (lh, hl, hh) = haar_dwt2(x)
    return ll, torch.cat((lh, hl, hh), dim=1)


def high(x: torch.Tensor) -> torch.Tensor:
    """``f_h`` only: (B, C, H, W) -> (B, 3C, ceil(H/2), ceil(W/2))."""
    return low_high(x)[1]
