"""Multi-Pyramid Transformer (Zhang et al., CVPR 2024), as specified in docs/models.md.

Differences from the authors' public code, on purpose:

* cross-scale window pairing is spatially aligned: the query window at grid position (i, j)
  attends to the key/value window at (floor(i*s), floor(j*s)) of the pooled map, the window that
  covers it (the public code pairs windows by raster index);
* the FEFN residual is on the CSWA stream ``x1``, as in the paper's equation;
* any H x W input is accepted: reflect-padded to :attr:`MPTConfig.size_multiple`, cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import MPTConfig
from .layers import ChannelLayerNorm, ResizeConvUpsample, crop_to, reflect_pad_to_multiple, run_block

#: How ISCA and CSWA compute attention. ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention`
#: (fused kernels on CPU and CUDA; the attention matrix of a whole group is never written out).
#: ``"reference"``: explicit matmul + softmax + matmul, the formulation of the paper, kept to
#: test the fused path against and for FLOP counting (FlopCounterMode does not count the fused
#: CPU kernel). Both use the same parameters, so weights load unchanged either way. With
#: ``"sdpa"``, ISCA on CPU still uses matmul unless ``IntraScaleChannelAttention.fused_on_cpu``.
ATTENTION_BACKENDS = ("sdpa", "reference")
_attention_backend = "sdpa"

#: The floor on a vector norm before dividing by it, :func:`torch.nn.functional.normalize`'s default.
_NORM_EPS = 1e-12


def get_attention_backend() -> str:
    return _attention_backend


def set_attention_backend(name: str) -> None:
    """Switch every MPT in this process to ``"sdpa"`` or ``"reference"`` attention."""
    global _attention_backend
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: use one of {ATTENTION_BACKENDS}")
    _attention_backend = name


@contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use ``name`` attention inside the block (process-wide: not for concurrent threads)."""
    previous = _attention_backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def _add_residual(branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x + branch``, added into ``branch`` when the dtypes agree: no new map is allocated.

    Only for a ``branch`` fresh from a projection, convolution or upsampling, whose output
    autograd does not keep. Under autocast a half-precision branch gets a new float32 sum, as
    ``x + branch`` would, so the residual stream stays float32.
    """
    return branch.add_(x) if branch.dtype == torch.promote_types(branch.dtype, x.dtype) else x + branch


def _depthwise3x3(channels: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)


class IntraScaleChannelAttention(nn.Module):
    """ISCA: multi-head attention across channels (C/h x C/h map per head), global over space.

    q, k, v come from a 1x1 conv followed by a 3x3 depthwise conv; q and k are L2-normalised over
    the spatial axis; the logits are scaled by a learnable per-head temperature.
    Parameters: 4C^2 + 27C + h. Shape: (B, C, H, W) -> (B, C, H, W).
    """

    #: SDPA on CPU for ISCA: off, because the fused CPU kernel is built for short head dimensions
    #: and ISCA's "head dimension" is the whole H*W map; profiled 18% slower than the matmul path
    #: on the `small` preset (docs/performance.md). Tests switch it on to check the two agree.
    fused_on_cpu = False

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        # One fused 1x1 (C -> 3C) and depthwise conv: identical to separate q and kv convs.
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.qkv_dw = _depthwise3x3(3 * channels)
        self.proj = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv_dw(self.qkv(x))
        if _attention_backend == "sdpa" and x.device.type == "cpu" and not self.fused_on_cpu:
            return self.proj(self._pixel_major_attention(qkv))
        q, k, v = qkv.chunk(3, dim=1)
        shape = (b, self.heads, c // self.heads, h * w)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        if _attention_backend == "reference":
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * self.temperature
            out = attn.softmax(dim=-1) @ v
        else:
            # (t q) k^T = t (q k^T): the temperature goes into q, and scale=1.0 replaces SDPA's 1/sqrt(d).
            dt = v.dtype
            q = F.normalize(q, dim=-1) * self.temperature.to(q.dtype)
            out = F.scaled_dot_product_attention(q.to(dt), F.normalize(k, dim=-1).to(dt), v, scale=1.0)
        return self.proj(out.reshape(b, c, h, w))

    def _pixel_major_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """The CPU path: the reference's attention computed on (H*W, d) matrices per head.

        The network's activations are channels-last on the CPU (its LayerNorms leave them so), so
        q, k and v are strided views of ``qkv``, nothing is copied, and no map is divided: the
        cosine similarity is (q^T k) / (|q| |k|^T) on the small d x d map, and the output v A^T
        comes out channels-last for the projection. The norms are square roots of sums of
        squares: ``vector_norm`` over the strided pixel axis is several times slower.
        Shape: qkv (B, 3C, H, W) -> (B, C, H, W).
        """
        b, c3, h, w = qkv.shape
        heads, d = self.heads, c3 // 3 // self.heads
        q, k, v = qkv.permute(0, 2, 3, 1).reshape(b, h * w, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        acc = torch.promote_types(q.dtype, torch.float32)  # sums of squares in at least fp32 under autocast
        q_norm = (q * q).sum(-2, dtype=acc).sqrt().clamp_min(_NORM_EPS)  # (B, heads, d)
        k_norm = (k * k).sum(-2, dtype=acc).sqrt().clamp_min(_NORM_EPS)
        attn = (q.transpose(-2, -1) @ k) * (self.temperature / (q_norm.unsqueeze(-1) * k_norm.unsqueeze(-2)))
        out = v @ attn.softmax(dim=-1).transpose(-2, -1)  # (B, heads, H*W, d)
        return out.transpose(1, 2).reshape(b, h, w, c3 // 3).permute(0, 3, 1, 2)


class ScalePooling(nn.Module):
    """CSWA downsampling module: p = AvgPool(kernel=stride=1/s)(x); return p + W p.

    Parameters: C^2. Shape: (B, C, H, W) -> (B, C, H*s, W*s).
    """

    def __init__(self, channels: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.proj = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = F.avg_pool2d(x, self.factor)
        return p + self.proj(p)


def _region_labels(length: int, window: int) -> torch.Tensor:
    """Swin's region labels along one axis of a cyclically shifted map.

    After shifting by ``window // 2``, the last window holds two regions that were far apart
    before the shift; they get labels 1 and 2, everything else 0.
    """
    labels = torch.zeros(length, dtype=torch.long)
    labels[length - window : length - window // 2] = 1
    labels[length - window // 2 :] = 2
    return labels


class CrossScaleWindowAttention(nn.Module):
    """CSWA: M x M query windows attend to the M x M window of the 1/s-pooled map that covers them.

    With ``factor = 1/s``, the query map (H, W) is split into groups of ``factor*M x factor*M``
    pixels; each group holds ``factor**2`` query windows and pairs with the one key/value window
    of the pooled (H/factor, W/factor) map at the same place. Every query thus sees an
    ``M/s x M/s`` region at the cost of plain window attention.

    Cosine attention with a learnable per-head temperature (log-parameterised, clamped at 100 as
    in Swin V2) plus a relative position bias from a ((2M-1)^2, h) table indexed by the offset, on
    the pooled grid, between the key and the pooled pixel that holds the query (for s = 1 this is
    exactly Swin's bias).

    ``shifted``: the query map is rolled by M/(2s) and the pooled map by M/2, the same physical
    distance, so pairs stay aligned; regions that the roll wrapped together are masked as in Swin.

    Parameters: 4C^2 + 27C + h + (2M-1)^2 h, plus C^2 when s < 1.
    Shape: (B, C, H, W) -> (B, C, H, W), with H and W multiples of M/s.
    """

    def __init__(self, channels: int, heads: int, scale: float, window_size: int = 8, shifted: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.window = window_size
        self.factor = round(1 / scale)
        if abs(self.factor * scale - 1) > 1e-6:
            raise ValueError(f"CSWA scale must be 1/n for an integer n, got {scale}")
        self.shifted = shifted
        self.downsample = ScalePooling(channels, self.factor) if self.factor > 1 else nn.Identity()
        self.q = nn.Conv2d(channels, channels, 1, bias=False)
        self.q_dw = _depthwise3x3(channels)
        self.kv = nn.Conv2d(channels, 2 * channels, 1, bias=False)
        self.kv_dw = _depthwise3x3(2 * channels)
        self.logit_scale = nn.Parameter(torch.full((heads, 1, 1), math.log(10.0)))
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.proj = nn.Linear(channels, channels, bias=False)
        self.register_buffer("relative_position_index", self._relative_position_index(), persistent=False)

    @property
    def group_size(self) -> int:
        """Side of the full-resolution region that one key/value window covers (M/s)."""
        return self.window * self.factor

    def _relative_position_index(self) -> torch.Tensor:
        m, g = self.window, self.group_size
        q_pos = torch.arange(g) // self.factor  # pooled-grid row/col of each query pixel in a group
        k_pos = torch.arange(m)
        rel = q_pos[:, None] - k_pos[None, :] + (m - 1)  # (g, m), values in [0, 2m-2]
        index = rel[:, None, :, None] * (2 * m - 1) + rel[None, :, None, :]  # (g, g, m, m)
        return index.reshape(g * g, m * m)

    def _shift_mask(self, n_h: int, n_w: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive masks (0 or -inf) for rows and columns of groups, broadcast over the groups.

        Returns row_mask (n_h, g, m) and col_mask (n_w, g, m): entry [i, a, c] is -inf when query
        row a of group row i and key row c came from different regions before the roll.
        """
        m, g = self.window, self.group_size

        def axis_mask(n: int) -> torch.Tensor:
            q_lab = _region_labels(n * g, g).view(n, g)
            k_lab = _region_labels(n * m, m).view(n, m)
            differ = q_lab[:, :, None] != k_lab[:, None, :]
            mask = torch.zeros(differ.shape, dtype=dtype, device=device)
            return mask.masked_fill_(differ.to(device), float("-inf"))

        return axis_mask(n_h), axis_mask(n_w)

    def _shifted_masks(self, n_h: int, n_w: int, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The additive masks of the groups that the roll wrapped together: only the last group
        row and the last group column hold pixels from two regions (see :func:`_region_labels`).

        bias: (heads, g*g, m*m). Returns the mask of the last row without its last group,
        (1, heads, g*g, m*m), and the masks of the last column's groups, row by row,
        (n_h, heads, g*g, m*m); both include the bias.
        """
        m, g, heads = self.window, self.group_size, self.heads
        row_mask, col_mask = self._shift_mask(n_h, n_w, bias.device, bias.dtype)
        pairs = bias.view(1, heads, g, g, m, m)
        last_row = pairs + row_mask[-1].view(1, 1, g, 1, m, 1)
        last_col = pairs + col_mask[-1].view(1, 1, 1, g, 1, m) + row_mask.view(n_h, 1, g, 1, m, 1)
        return last_row.view(1, heads, g * g, m * m), last_col.view(n_h, heads, g * g, m * m)

    def _fused_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor) -> torch.Tensor:
        """softmax(scale * cos(q, k) + bias [+ shift mask]) v through SDPA, as the reference path.

        q: (B, C, H, W); k, v: (B, C, H/factor, W/factor), rolled if shifted; scale: (heads, 1, 1);
        bias: (heads, g*g, m*m). Returns (B, H, W, C).

        Shifted windows: the -inf shift mask concerns the last group row and column only, so
        those groups go through SDPA apart, each with its own mask, and every other group with
        the bias alone, broadcast; a mask for every group (64 MB per layer for the ``paper``
        preset's first level at 512 x 512) is never built.
        """
        b, c, h, w = q.shape
        m, g = self.window, self.group_size
        n_h, n_w = h // g, w // g
        bias = bias.to(v.dtype).unsqueeze(0)  # (1, heads, g*g, m*m): 4-D, which the fused CPU kernel needs
        out = q.new_empty(b, h, w, c)
        if not self.shifted:
            self._attend_region(out, q, k, v, scale, bias)
            return out
        last_row, last_col = self._shifted_masks(n_h, n_w, bias[0])
        # Rows and columns of groups: [:-1, :-1] bias only, [-1, :-1] one mask, [:, -1] one per row.
        qh, qw, kh, kw = h - g, w - g, (n_h - 1) * m, (n_w - 1) * m
        if n_h > 1 and n_w > 1:
            self._attend_region(out[:, :qh, :qw], q[..., :qh, :qw], k[..., :kh, :kw], v[..., :kh, :kw], scale, bias)
        if n_w > 1:
            self._attend_region(out[:, qh:, :qw], q[..., qh:, :qw], k[..., kh:, :kw], v[..., kh:, :kw], scale, last_row)
        # The groups are ordered row, image, column, so each row's mask repeats for every image.
        self._attend_region(out[:, :, qw:], q[..., qw:], k[..., kw:], v[..., kw:], scale,
                            last_col.repeat_interleave(b, dim=0))
        return out

    def _attend_region(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: torch.Tensor, mask: torch.Tensor) -> None:
        """SDPA over the groups of one region of the maps (shapes as :meth:`_fused_attention`),
        written into ``out``, the region's (B, H', W', C) view of the output."""
        m, g, heads = self.window, self.group_size, self.heads
        dt = v.dtype
        rows, cols = q.shape[2] // g, q.shape[3] // g
        q = _to_groups(q, heads, g)
        # Cosine attention: the temperature and 1 / |q| in one factor; scale=1.0 replaces SDPA's 1/sqrt(d).
        q = (q * (scale / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(_NORM_EPS))).to(dt)
        k = F.normalize(_to_groups(k, heads, m), dim=-1).to(dt)
        attended = F.scaled_dot_product_attention(q, k, _to_groups(v, heads, m), attn_mask=mask, scale=1.0)
        _from_groups(attended, out, rows, cols, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m, g = self.window, self.group_size
        if h % g or w % g:
            raise ValueError(f"CSWA with window {m} and scale 1/{self.factor} needs H, W multiples of {g}, got {h}x{w}")
        q = self.q_dw(self.q(x))
        k, v = self.kv_dw(self.kv(self.downsample(x))).chunk(2, dim=1)
        if self.shifted:
            q = torch.roll(q, shifts=(-(g // 2), -(g // 2)), dims=(2, 3))
            k = torch.roll(k, shifts=(-(m // 2), -(m // 2)), dims=(2, 3))
            v = torch.roll(v, shifts=(-(m // 2), -(m // 2)), dims=(2, 3))
        scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)  # (heads, g*g, m*m)
        if _attention_backend == "sdpa":
            out = self._fused_attention(q, k, v, scale, bias)
        else:
            out = self._reference_attention(q, k, v, scale, bias)
        out = self.proj(out).permute(0, 3, 1, 2)
        if self.shifted:
            out = torch.roll(out, shifts=(g // 2, g // 2), dims=(2, 3))
        return out

    def _reference_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                             bias: torch.Tensor) -> torch.Tensor:
        """The paper's formulation, explicit matmul + softmax + matmul; shapes as :meth:`_fused_attention`."""
        b, c, h, w = q.shape
        m, g, heads = self.window, self.group_size, self.heads
        n_h, n_w = h // g, w // g
        q = F.normalize(_to_groups(q, heads, g), dim=-1)
        k = F.normalize(_to_groups(k, heads, m), dim=-1)
        attn = (q * scale) @ k.transpose(-2, -1)  # (n_h*B*n_w, heads, g*g, m*m)
        attn = attn + bias.to(attn.dtype)
        if self.shifted:
            row_mask, col_mask = self._shift_mask(n_h, n_w, attn.device, attn.dtype)
            attn = attn.view(n_h, b, n_w, heads, g, g, m, m)
            attn = attn + row_mask.view(n_h, 1, 1, 1, g, 1, m, 1) + col_mask.view(1, 1, n_w, 1, 1, g, 1, m)
            attn = attn.view(n_h * b * n_w, heads, g * g, m * m)
        out = q.new_empty(b, h, w, c)
        _from_groups(attn.softmax(dim=-1) @ _to_groups(v, heads, m), out, n_h, n_w, g)
        return out


def _to_groups(t: torch.Tensor, heads: int, side: int) -> torch.Tensor:
    """(B, heads*d, R*side, S*side) -> (R*B*S, heads, side*side, d): the side x side windows as
    attention groups, ordered by window row, image, window column (so a row of windows is one slice)."""
    b, c, h, w = t.shape
    rows, cols = h // side, w // side
    t = t.reshape(b, heads, c // heads, rows, side, cols, side).permute(3, 0, 5, 1, 4, 6, 2)
    return t.reshape(rows * b * cols, heads, side * side, c // heads)


def _from_groups(groups: torch.Tensor, out: torch.Tensor, rows: int, cols: int, side: int) -> None:
    """Write (R*B*S, heads, side*side, d) groups, ordered as :func:`_to_groups`, into ``out``,
    a (B, R*side, S*side, heads*d) tensor or view."""
    b = out.shape[0]
    heads, d = groups.shape[1], groups.shape[3]
    windows = groups.view(rows, b, cols, heads, side, side, d).permute(1, 0, 4, 2, 5, 3, 6)
    out.unflatten(1, (rows, side)).unflatten(3, (cols, side)).unflatten(5, (heads, d)).copy_(windows)


class FeatureEnhancingFFN(nn.Module):
    """FEFN: out = W_p(GELU(x2') * x1') + x1.

    x1 (spatial stream, from CSWA): x1' = Linear(LN_b(x1)) to F = int(expansion * C).
    x2 (channel stream, from ISCA): x2' = DW3x3(Conv1x1(LN_a(x2))) to F.
    Parameters: 4C (two norms) + 3CF + 9F. Shapes: (B, C, H, W) x 2 -> (B, C, H, W).
    """

    def __init__(self, channels: int, expansion: float) -> None:
        super().__init__()
        hidden = int(expansion * channels)
        self.norm_spatial = ChannelLayerNorm(channels)
        self.norm_channel = ChannelLayerNorm(channels)
        self.spatial_in = nn.Conv2d(channels, hidden, 1, bias=False)
        self.channel_in = nn.Conv2d(channels, hidden, 1, bias=False)
        self.channel_dw = _depthwise3x3(hidden)
        self.out = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        gate = self.channel_dw(self.channel_in(self.norm_channel(x2)))
        spatial = self.spatial_in(self.norm_spatial(x1))
        if torch.is_grad_enabled():
            hidden = F.gelu(gate) * spatial
        else:
            # Without autograd, GELU and the product overwrite the gate: these F-channel maps are
            # the largest of the network, so two fewer of them are allocated and written.
            hidden = torch.ops.aten.gelu_(gate).mul_(spatial)
        return _add_residual(self.out(hidden), x1)


class PyramidSubBlock(nn.Module):
    """One sub-block: n = LN(x); a = x + ISCA(n); b = x + CSWA(n); return FEFN(x1=b, x2=a).

    Shape: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, heads: int, scale: float, window_size: int, shifted: bool, expansion: float) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(channels)
        self.channel_attention = IntraScaleChannelAttention(channels, heads)
        self.spatial_attention = CrossScaleWindowAttention(channels, heads, scale, window_size, shifted)
        self.ffn = FeatureEnhancingFFN(channels, expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm(x)
        a = _add_residual(self.channel_attention(n), x)
        b = _add_residual(self.spatial_attention(n), x)
        return self.ffn(b, a)


class PyramidBlock(nn.Sequential):
    """Sub-blocks from coarse to fine scale; the 2nd, 4th, ... use shifted windows."""

    def __init__(self, channels: int, heads: int, scales: tuple[float, ...], cfg: MPTConfig) -> None:
        super().__init__(
            *(
                PyramidSubBlock(channels, heads, s, cfg.window_size, cfg.shift_every_second and j % 2 == 1, cfg.ffn_expansion)
                for j, s in enumerate(scales)
            )
        )


class Downsample(nn.Sequential):
    """3x3 conv C -> C/2 then PixelUnshuffle(2). Shape: (B, C, H, W) -> (B, 2C, H/2, W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))


class Upsample(nn.Sequential):
    """The paper's upsampler: 3x3 conv C -> 2C then PixelShuffle(2), four independently trained
    output phases. Shape: (B, C, H, W) -> (B, C/2, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, channels * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))


def _mpt_upsampler(kind: str, channels: int) -> nn.Module:
    """(B, C, H, W) -> (B, C/2, 2H, 2W): ``"resize_conv"`` (3x3 conv C -> C/2 then nearest x2,
    phases tied) or ``"pixel_shuffle"`` (:class:`Upsample`)."""
    if kind == "resize_conv":
        return ResizeConvUpsample(channels, channels // 2, kernel_size=3, bias=False)
    if kind == "pixel_shuffle":
        return Upsample(channels)
    raise ValueError(f"unknown upsample {kind!r}; expected 'resize_conv' or 'pixel_shuffle'")


class MultiPyramidTransformer(nn.Module):
    """MPT: U-shaped stack of pyramid blocks with additive skips and a global residual.

    Shape: (B, in_channels, H, W) -> (B, out_channels, H, W) for any H, W >= 1. Intensities are
    expected roughly in [0, 1] (see :mod:`napari_mpt_deblur.data.normalisation`).
    """

    def __init__(self, config: MPTConfig) -> None:
        super().__init__()
        self.config = config
        levels = config.levels
        ch = config.level_channels
        self.embed = nn.Conv2d(config.in_channels, config.dim, 3, padding=1, bias=False)
        self.encoders = nn.ModuleList(
            PyramidBlock(ch(i), config.heads[i], config.scales[i], config) for i in range(levels - 1)
        )
        self.downs = nn.ModuleList(Downsample(ch(i)) for i in range(levels - 1))
        self.bottleneck = PyramidBlock(ch(levels - 1), config.heads[-1], config.scales[-1], config)
        # ups[i] takes level i+1 to level i; decoders[i] runs at level i.
        self.ups = nn.ModuleList(_mpt_upsampler(config.upsample, ch(i + 1)) for i in range(levels - 1))
        self.decoders = nn.ModuleList(
            PyramidBlock(ch(i), config.heads[i], config.scales[i], config) for i in range(levels - 1)
        )
        self.head = nn.Conv2d(config.dim, config.out_channels, 3, padding=1, bias=False)
        #: Recompute each pyramid block in the backward pass (training memory; see run_block).
        self.gradient_checkpointing = False

    @property
    def size_multiple(self) -> int:
        return self.config.size_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"MPT expects (B, {self.config.in_channels}, H, W) input, got shape {tuple(x.shape)}"
            )
        padded, size = reflect_pad_to_multiple(x, self.size_multiple)
        feat = self.embed(padded)
        skips = []
        ckpt = self.gradient_checkpointing
        for encoder, down in zip(self.encoders, self.downs):
            feat = run_block(encoder, feat, checkpoint=ckpt)
            skips.append(feat)
            feat = down(feat)
        feat = run_block(self.bottleneck, feat, checkpoint=ckpt)
        for i in reversed(range(len(self.decoders))):
            feat = run_block(self.decoders[i], _add_residual(self.ups[i](feat), skips[i]), checkpoint=ckpt)
        out = self.head(feat)
        if self.config.global_residual and self.config.in_channels == self.config.out_channels:
            out = out + padded
        return crop_to(out, size)
