"""Head-to-tail cross-scale fusion U-Net (Wang and Han, ICIP 2022), docs/models.md.

K U-Nets run on the blurred image at scales 1/2**(K-1) ... 1. The encoder features of each finer
U-Net are fused, level by level, with the decoder features of the next coarser one (upsampled
x2), by summation or by concatenation followed by a 1x1 conv. There is no cascade residual:
each scale's output is the U-Net's own prediction, not the blurred input plus a correction.

The paper's parameter counts (1.94 M for one U-Net, 2.57 M for K = 4) imply that the U-Nets
share most of their weights across scales; the exact split is not published, so we share the
whole U-Net (and the concat fusion convs) across scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import H2TUNetConfig
from .layers import ResizeConvUpsample, crop_to, reflect_pad_to_multiple, run_block


class DoubleConv(nn.Sequential):
    """(3x3 conv + LeakyReLU) x 2. Shape: (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.LeakyReLU(0.1, inplace=True),
        )


def _unet_upsampler(kind: str, in_channels: int, out_channels: int) -> nn.Module:
    """x2 upsampling C_in -> C_out: ``"resize_conv"`` (phases tied, no checkerboard) or the first
    models' ``"transposed"`` (ConvTranspose2d k=2 s=2)."""
    if kind == "resize_conv":
        return ResizeConvUpsample(in_channels, out_channels)
    if kind == "transposed":
        return nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
    raise ValueError(f"unknown upsample {kind!r}; expected 'resize_conv' or 'transposed'")


class FusionUNet(nn.Module):
    """A U-Net whose encoder can take the decoder features of a coarser U-Net.

    Level ``i`` has ``base * 2**i`` channels at 1/2**i of the input size. ``forward`` returns the
    image and the decoder features of every level (finest first), which the next finer U-Net
    fuses into its encoder.
    """

    def __init__(self, in_channels: int, out_channels: int, base: int, depth: int, fusion: str,
                 upsample: str = "transposed") -> None:
        super().__init__()
        widths = [base * 2**i for i in range(depth)]
        self.fusion = fusion
        self.encoders = nn.ModuleList(
            DoubleConv(in_channels if i == 0 else widths[i - 1], widths[i]) for i in range(depth)
        )
        self.ups = nn.ModuleList(_unet_upsampler(upsample, widths[i + 1], widths[i]) for i in range(depth - 1))
        self.decoders = nn.ModuleList(DoubleConv(2 * widths[i], widths[i]) for i in range(depth - 1))
        self.fuse = (
            nn.ModuleList(nn.Conv2d(2 * w, w, 1) for w in widths) if fusion == "concat" else None
        )
        self.head = nn.Conv2d(widths[0], out_channels, 3, padding=1)
        #: Recompute each level's double conv in the backward pass (training memory).
        self.gradient_checkpointing = False

    def _fuse(self, level: int, enc: torch.Tensor, coarse: list[torch.Tensor] | None) -> torch.Tensor:
        if coarse is None:
            return enc
        # Coarser U-Net's level features sit at half this U-Net's resolution.
        dec = F.interpolate(coarse[level], scale_factor=2, mode="bilinear", align_corners=False)
        if self.fuse is None:
            return enc + dec
        return self.fuse[level](torch.cat([enc, dec], dim=1))

    def forward(self, x: torch.Tensor, coarse: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (B, C_in, H, W); coarse: decoder features of the coarser U-Net (H/2 ... sizes)."""
        skips = []
        feat = x
        for i, encoder in enumerate(self.encoders):
            if i:
                feat = F.max_pool2d(feat, 2)
            feat = self._fuse(i, run_block(encoder, feat, checkpoint=self.gradient_checkpointing), coarse)
            skips.append(feat)
        decoded = [feat]  # deepest level: the bottleneck output
        for i in reversed(range(len(self.decoders))):
            feat = run_block(self.decoders[i], torch.cat([self.ups[i](feat), skips[i]], dim=1),
                             checkpoint=self.gradient_checkpointing)
            decoded.append(feat)
        decoded.reverse()
        return self.head(feat), decoded


class HeadToTailUNet(nn.Module):
    """Multi-scale U-Net with head-to-tail fusion.

    ``forward``: (B, C_in, H, W) -> (B, C_out, H, W), the full-scale output, any H, W.
    ``forward_scales``: list of K outputs, coarsest first, the k-th of size H/2**(K-1-k) on the
    padded grid, for the multi-scale loss (:func:`napari_mpt_deblur.losses.multiscale_pixel_loss`).
    """

    def __init__(self, config: H2TUNetConfig) -> None:
        super().__init__()
        self.config = config
        self.unet = FusionUNet(config.in_channels, config.out_channels, config.base_channels, config.depth, config.fusion,
                               config.upsample)

    @property
    def size_multiple(self) -> int:
        return self.config.size_multiple

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"H2T U-Net expects (B, {self.config.in_channels}, H, W) input, got shape {tuple(x.shape)}"
            )

    def _run_scales(self, padded: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        coarse = None
        for k in reversed(range(self.config.num_scales)):
            inp = F.avg_pool2d(padded, 2**k) if k else padded
            out, coarse = self.unet(inp, coarse)
            outputs.append(out)
        return outputs

    def forward_scales(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs at every scale, coarsest first. H, W must be multiples of :attr:`size_multiple`."""
        self._check(x)
        if x.shape[-2] % self.size_multiple or x.shape[-1] % self.size_multiple:
            raise ValueError(
                f"forward_scales needs H, W multiples of {self.size_multiple}, got {tuple(x.shape[-2:])}"
            )
        return self._run_scales(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        padded, size = reflect_pad_to_multiple(x, self.size_multiple)
        return crop_to(self._run_scales(padded)[-1], size)
