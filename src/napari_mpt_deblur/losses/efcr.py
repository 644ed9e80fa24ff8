"""Extended Frequency Contrastive Regularization (EFCR, EFCRex) with real gradients (docs/training.md).

Notation (per sample i, all distances are mean absolute differences):

* basic CR: ``L+ = |f_l(O) - f_l(GT)| + |f_h(O) - f_h(GT)|``, ``L- = |f_h(O) - f_h(I_in)|``;
* extended CR: ``B_in`` = ``I_in`` Gaussian-blurred with a random kernel size in {3, 5, 7},
  ``B_out = net(B_in)``, ``L_ext = |f_h(B_out) - f_h(B_in)| / |f_h(I_in) - f_h(B_in)|``;
* EFCR objective: ``L = L1(O, GT) + beta * mean_i(L+_i / (L-_i + min(L_ext_i, cap)))``; the cap
  (:attr:`EFCRConfig.extended_cap`, default 1) is ours: the paper's unbounded ``L_ext`` rewards
  any extra high-frequency change, which a fine-tune on unlabeled images turns into a checkerboard.
* EFCRex, labeled extra pairs (I_in', GT'): the ratio is built from the extra batch only, on the
  high bands: ``L+' = |f_h(O') - f_h(GT')|``, ``L-' = |f_h(O') - f_h(I_in')|``, ``L_ext'`` from
  the reblurred extra inputs; the pixel loss stays on the main batch.
* EFCRex, unlabeled extra images U: ``L+`` and ``L-`` from the labeled batch, ``L_ext'`` from U
  (``B_in' = reblur(U)``, ``B_out' = net(B_in')``), sample i of one batch paired with sample i of
  the other. This is the napari fine-tune.
* Nyquist-coefficient loss (ours, ``EFCRConfig.nyquist_weight``, on in the fine-tuner): the L1
  distance between the period-2 Fourier coefficients of each 32 x 32 block of an output and of its
  reference, summed over the outputs that carry gradients (main batch vs GT; extra labeled batch
  vs its GT; reblurred inputs vs the images before the reblur), which stops a fine-tune from
  growing a pattern locked to the pixel grid.

Unlike the authors' public code, which computes the CR term under ``torch.no_grad()`` (so it
never trains anything), every term here carries gradients. The network runs ONCE per step on the
concatenation of all inputs that need it (main, extra, reblurred), so the extended pass costs a
bigger batch rather than a second call, and DistributedDataParallel sees one forward per
backward. ``extended_grad=False`` runs the reblurred inputs in a separate no-grad pass instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .haar import high, low_high
from .multiscale import PixelLoss, multiscale_pixel_loss


#: ``nyquist_weight`` for training that starts from trained weights (the napari fine-tune and the
#: calibration; issue 13). Warm-started runs grew a period-2 pattern locked to the network's pixel
#: grid (its sign stays when the input moves by one pixel), mostly in the noisy background, where
#: pooling and nearest upsampling followed by a convolution and a nonlinearity make the output
#: depend on the grid's parity. The contrastive term rewarded it (hence ``extended_cap`` and
#: ``below_nyquist``) and nothing resisted it (the pixel L1's gradient follows the signs of
#: residuals a hundred times larger). Nyquist energy ratio of the demo image (input 1.07) after
#: 200 default fine-tune steps from the shipped H2T: 13.8 without this loss, 5.0 with beta 1e-6
#: (so not only the contrastive term), 2.64 at weight 1, 0.94 at 10; after a 12-minute
#: calibration without it, 4.45 (docs/training.md section 6, docs/calibrate.md). Training from
#: scratch keeps the paper's objective (0) unless a config sets it.
WARM_START_NYQUIST_WEIGHT = 10.0


class EFCRConfig(BaseModel):
    """Settings of the contrastive regulariser."""

    model_config = ConfigDict(extra="forbid")

    #: The pixel term: ``l1`` (the paper's) or ``mse`` (ours: the mean squared error, which is what
    #: PSNR scores; docs/training.md, section 3).
    pixel_loss: PixelLoss = "l1"
    #: Weight of the contrastive ratio (paper: 1e-5). 0 disables EFCR (plain L1 training).
    beta: float = Field(1e-5, ge=0.0)
    #: Include the extended CR (reblur + second pass) in the denominator.
    extended: bool = True
    #: Let gradients flow through the extended pass B_out = net(B_in) (costs a bigger batch).
    extended_grad: bool = True
    #: Odd Gaussian kernel sizes the reblur picks from, uniformly, per sample.
    reblur_kernel_sizes: tuple[int, ...] = (3, 5, 7)
    #: Keeps the ratios finite for inputs with no high-frequency content at all.
    eps: float = Field(1e-6, gt=0.0)
    #: ``L_ext`` is clipped at this value before it enters the denominator (None: the paper's
    #: unbounded term). 1 is what an exact restorer scores: it changes the reblurred input's high
    #: band by as much as the reblur did. Above that the term only rewards changing the high band
    #: MORE, and with unlabeled images (no ground truth to pull back) the cheapest way is a
    #: period-2 pattern: a fine-tune at beta 0.1 grew a checkerboard of 13.5% of the range in 200
    #: steps with the unbounded term (issue 13; docs/training.md).
    extended_cap: float | None = Field(1.0, gt=0.0)
    #: Measure the contrastive distances on images low-passed by [1, 2, 1] / 4 along each axis,
    #: whose response is zero at the Nyquist frequency: a period-2 pattern then changes no
    #: contrastive distance, so the term cannot reward one (only the pixel loss sees it).
    below_nyquist: bool = False
    #: Weight of the Nyquist-coefficient loss (ours, not the paper's; 0: off): :func:`nyquist_l1`
    #: between each output that carries gradients and its reference (ground truth; for the
    #: reblurred inputs, the images before the reblur), summed over those outputs, so the logged
    #: ``nyquist`` is a sum of one to three terms depending on the mode. Pooling and nearest
    #: upsampling followed by a convolution and a nonlinearity let a network add a faint period-2
    #: pattern locked to its own pixel grid, mostly in noisy background; the pixel L1 barely sees
    #: it (its gradient follows the signs of much larger residuals), these coefficients do: a
    #: 200-step fine-tune grew one (issue 13; docs/training.md).
    nyquist_weight: float = Field(0.0, ge=0.0)

    @field_validator("reblur_kernel_sizes")
    @classmethod
    def _odd(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(k < 3 or k % 2 == 0 for k in value):
            raise ValueError(f"reblur_kernel_sizes must be odd sizes >= 3, got {value}")
        return value


def reblur_sigma(kernel_size: int) -> float:
    """Gaussian sigma for a kernel size, as OpenCV chooses it for ``sigma=0`` (0.8 / 1.1 / 1.4 px)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1.0) + 0.8


def _gaussian_1d(kernel_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-0.5 * (x / reblur_sigma(kernel_size)) ** 2)
    return (g / g.sum()).to(dtype=dtype, device=device)


def gaussian_blur(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W), reflect-padded, per channel."""
    c = x.shape[1]
    g = _gaussian_1d(kernel_size, x.dtype, x.device)
    p = kernel_size // 2
    # Full precision even under autocast: L_ext divides by the (small) change this blur makes.
    # (the meta device, used to count activation memory, has no autocast)
    off = nullcontext() if x.device.type == "meta" else torch.autocast(device_type=x.device.type, enabled=False)
    with off:
        y = F.pad(x, (p, p, p, p), mode="reflect")
        y = F.conv2d(y, g.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
        return F.conv2d(y, g.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


def random_reblur(
    x: torch.Tensor,
    kernel_sizes: Sequence[int] = (3, 5, 7),
    generator: torch.Generator | None = None,
    sizes: Sequence[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``B_in``: each sample of (B, C, H, W) blurred with its own random kernel size.

    The sizes are drawn on the CPU from ``generator`` (reproducible, independent of the device)
    unless given as ``sizes`` (one per sample; the trainer derives them from the samples' indices
    so they do not depend on how a batch is split across processes); returns
    ``(blurred, sizes)`` with ``sizes`` a (B,) int64 CPU tensor.
    """
    if sizes is None:
        choice = torch.randint(len(kernel_sizes), (x.shape[0],), generator=generator)
        sizes = torch.tensor(kernel_sizes, dtype=torch.int64)[choice]
    else:
        sizes = torch.as_tensor(sizes, dtype=torch.int64).flatten().cpu()
        if sizes.numel() != x.shape[0] or any(k < 3 or k % 2 == 0 for k in sizes.tolist()):
            raise ValueError(f"sizes must be {x.shape[0]} odd kernel sizes >= 3, got {sizes.tolist()}")
    out = torch.empty_like(x)
    for k in sorted(set(sizes.tolist())):
        idx = (sizes == k).nonzero().flatten().to(x.device)
        out[idx] = gaussian_blur(x[idx], int(k)).to(x.dtype)
    return out, sizes


def nyquist_lowpass(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) filtered by [1, 2, 1] / 4 along both axes (reflect-padded): gain 1 at DC,
    0 at the Nyquist frequency (a period-2 pattern is removed entirely), 1/2 at a quarter of it."""
    c = x.shape[1]
    k = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype, device=x.device)
    y = F.pad(x, (1, 1, 1, 1), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, 3).expand(c, 1, 1, 3), groups=c)
    return F.conv2d(y, k.view(1, 1, 3, 1).expand(c, 1, 3, 1), groups=c)


def per_sample_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per sample: (B, ...) x (B, ...) -> (B,)."""
    return (a - b).abs().flatten(1).mean(dim=1)


def basic_cr(out: torch.Tensor, gt: torch.Tensor, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L+, L-)``, each (B,): pull both bands of O to GT, push the high band away from I_in."""
    o_l, o_h = low_high(out)
    g_l, g_h = low_high(gt)
    l_pos = per_sample_l1(o_l, g_l) + per_sample_l1(o_h, g_h)
    l_neg = per_sample_l1(o_h, high(inp))
    return l_pos, l_neg


def high_band_cr(out: torch.Tensor, gt: torch.Tensor, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EFCRex's ``(L+', L-')`` on the high bands only, each (B,)."""
    o_h = high(out)
    return per_sample_l1(o_h, high(gt)), per_sample_l1(o_h, high(inp))


def extended_cr(b_out: torch.Tensor, b_in: torch.Tensor, inp: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``L_ext`` (B,): how far the net moves the reblurred input's high band, relative to how far
    the reblur moved it from the input's."""
    h_b_in = high(b_in)
    return per_sample_l1(high(b_out), h_b_in) / (per_sample_l1(high(inp), h_b_in) + eps)


#: Side of the blocks whose Nyquist coefficients :func:`nyquist_l1` compares, in pixels: a
#: period-2 pattern whose sign follows the content (e.g. from unbalanced sub-pixel phases) is
#: coherent over a few tens of pixels, and would cancel in one mean over a whole patch.
NYQUIST_BLOCK = 32


def nyquist_coefficients(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, nY, nX, 3): the Fourier coefficients of each ``block`` x ``block``
    block at the three Nyquist points, (1/2, 0), (0, 1/2) and (1/2, 1/2) cycles/pixel, divided by
    the block's area: its means of ``x`` times the sign patterns (-1)^y, (-1)^x and (-1)^(x+y). A
    period-2 pattern of amplitude ``a`` adds ``a`` to its coefficient. Along an axis the blocks
    tile the largest multiple of ``block`` (the rest is left out); an axis shorter than ``block``,
    or ``block`` None, is one block of its largest even length (an odd length would let the mean
    brightness leak into the coefficients)."""
    b, c, h, w = x.shape
    if block is not None and block % 2:
        raise ValueError(f"the Nyquist block side must be even, got {block}")
    bh = block if block is not None and h >= block else h // 2 * 2
    bw = block if block is not None and w >= block else w // 2 * 2
    if bh == 0 or bw == 0:
        raise ValueError(f"nyquist_coefficients needs at least 2 x 2 pixels, got {h} x {w}")
    ny, nx = h // bh, w // bw
    blocks = x[..., : ny * bh, : nx * bw].reshape(b, c, ny, bh, nx, bw)
    sy = (1.0 - 2.0 * (torch.arange(bh, device=x.device) % 2).to(x.dtype)).view(bh, 1)
    sx = 1.0 - 2.0 * (torch.arange(bw, device=x.device) % 2).to(x.dtype)
    rows = (blocks * sx).mean(dim=-1)  # (B, C, nY, bh, nX): each block row against (-1)^x
    return torch.stack([(blocks.mean(dim=-1) * sy).mean(dim=-2), rows.mean(dim=-2), (rows * sy).mean(dim=-2)], dim=-1)


def nyquist_l1(out: torch.Tensor, ref: torch.Tensor, block: int | None = NYQUIST_BLOCK) -> torch.Tensor:
    """Mean |difference| of the blockwise Nyquist coefficients (:func:`nyquist_coefficients`) of
    ``out`` and ``ref``, (B, C, H, W) each: a scalar, computed in float32 (under autocast too)."""
    return (nyquist_coefficients(out.float(), block) - nyquist_coefficients(ref.float(), block)).abs().mean()


def contrastive_ratio(l_pos: torch.Tensor, l_neg: torch.Tensor, l_ext: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """``mean_i(L+_i / (L-_i + L_ext_i))`` (L_ext omitted when None): a scalar."""
    denom = l_neg if l_ext is None else l_neg + l_ext
    return (l_pos / (denom + eps)).mean()


@dataclass
class LossTerms:
    """One step's losses: ``total`` (scalar, what is backpropagated) and its parts."""

    total: torch.Tensor
    pixel: torch.Tensor
    cr: torch.Tensor | None = None
    l_pos: torch.Tensor | None = None
    l_neg: torch.Tensor | None = None
    l_ext: torch.Tensor | None = None
    nyquist: torch.Tensor | None = None

    def as_floats(self) -> dict[str, float]:
        out = {"loss": float(self.total.detach()), "pixel": float(self.pixel.detach())}
        for name in ("cr", "l_pos", "l_neg", "l_ext", "nyquist"):
            value = getattr(self, name)
            if value is not None:
                out[name] = float(value.detach().float().mean())
        return out


#: A network call returning outputs at one or more scales, coarsest first, full scale last.
ScalesFn = Callable[[torch.Tensor], list[torch.Tensor]]


def single_scale(net: Callable[[torch.Tensor], torch.Tensor]) -> ScalesFn:
    return lambda x: [net(x)]


class EFCRObjective:
    """The training objective: pixel loss on the main batch plus ``beta`` times the contrastive
    ratio of EFCR (no extra data), EFCRex-labeled (``extra_gt`` given) or EFCRex-unlabeled
    (``extra_inp`` without ``extra_gt``).

    ``forward_scales(x)`` runs the network and returns a list of outputs, full scale last (one
    element for MPT; the H2T U-Net's ``forward_scales`` for its multi-scale pixel loss).
    """

    def __init__(self, config: EFCRConfig | None = None) -> None:
        self.config = config or EFCRConfig()

    def __call__(
        self,
        forward_scales: ScalesFn,
        inp: torch.Tensor,
        gt: torch.Tensor,
        extra_inp: torch.Tensor | None = None,
        extra_gt: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        reblur_sizes: Sequence[int] | torch.Tensor | None = None,
    ) -> LossTerms:
        """``inp``, ``gt``: (B, C, H, W); ``extra_inp`` (and ``extra_gt``): (B, C, H', W').
        ``reblur_sizes``: the reblur kernel size of each sample (default: drawn from ``generator``)."""
        cfg = self.config
        n = inp.shape[0]
        use_cr = cfg.beta > 0
        if extra_gt is not None and extra_inp is None:
            raise ValueError("EFCRex: extra_gt given without extra_inp")
        if extra_inp is not None and not use_cr:
            raise ValueError("EFCRex needs beta > 0: with beta = 0 the extra batch would not be used")
        if extra_inp is not None and extra_gt is None and not cfg.extended:
            raise ValueError("EFCRex with unlabeled images needs the extended CR (extended: true)")
        if extra_gt is not None and extra_gt.shape != extra_inp.shape:
            raise ValueError(f"extra_inp {tuple(extra_inp.shape)} and extra_gt {tuple(extra_gt.shape)} differ")
        if extra_inp is not None and extra_inp.shape[0] != n:
            raise ValueError(f"EFCRex pairs sample i of each batch: main batch {n}, extra batch {extra_inp.shape[0]}")

        # The samples whose contrastive terms are used: the main batch for EFCR and unlabeled
        # EFCRex's L+/L-, the extra batch for labeled EFCRex.
        cr_inp = extra_inp if extra_inp is not None else inp
        b_in = random_reblur(cr_inp, cfg.reblur_kernel_sizes, generator, reblur_sizes)[0] if use_cr and cfg.extended else None

        parts = [inp]
        if extra_gt is not None:
            parts.append(extra_inp)
        if b_in is not None and cfg.extended_grad:
            parts.append(b_in)
        if all(p.shape == inp.shape for p in parts):
            scales = forward_scales(torch.cat(parts) if len(parts) > 1 else inp)
            chunks = list(scales[-1].split(n))
            main_scales = [s[:n] for s in scales]
        else:  # extra patches of another size: one call per part
            main_scales = forward_scales(inp)
            chunks = [main_scales[-1]] + [forward_scales(p)[-1] for p in parts[1:]]
        full = main_scales[-1]
        pixel = multiscale_pixel_loss(main_scales, gt, cfg.pixel_loss)
        nyq = nyquist_l1(full, gt) if cfg.nyquist_weight > 0 else None
        if not use_cr:
            return LossTerms(total=pixel if nyq is None else pixel + cfg.nyquist_weight * nyq, pixel=pixel, nyquist=nyq)

        out = chunks.pop(0).float()
        extra_out = chunks.pop(0).float() if extra_gt is not None else None
        if b_in is None:
            b_out = None
        elif cfg.extended_grad:
            b_out = chunks.pop(0).float()
        else:
            with torch.no_grad():
                b_out = forward_scales(b_in)[-1].float()

        band = nyquist_lowpass if cfg.below_nyquist else (lambda x: x)
        if extra_gt is not None:
            l_pos, l_neg = high_band_cr(band(extra_out), band(extra_gt.float()), band(extra_inp.float()))
        else:
            l_pos, l_neg = basic_cr(band(out), band(gt.float()), band(inp.float()))
        l_ext = None if b_out is None else extended_cr(band(b_out), band(b_in.float()), band(cr_inp.float()), cfg.eps)
        capped = l_ext if l_ext is None or cfg.extended_cap is None else l_ext.clamp(max=cfg.extended_cap)
        cr = contrastive_ratio(l_pos, l_neg, capped, cfg.eps)
        total = pixel + cfg.beta * cr
        if nyq is not None:  # the outputs of the other parts, against their references
            for o, ref in ((extra_out, extra_gt), (b_out if cfg.extended_grad else None, cr_inp)):
                if o is not None:
                    nyq = nyq + nyquist_l1(o, ref)
            total = total + cfg.nyquist_weight * nyq
        return LossTerms(total=total, pixel=pixel, cr=cr, l_pos=l_pos, l_neg=l_neg, l_ext=l_ext, nyquist=nyq)
