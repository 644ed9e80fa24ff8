"""Typed architecture configurations that travel with every saved model.

The configs are pydantic models so that a JSON file written next to the weights can be validated
field by field when it is loaded again (a misspelt or missing field gives an error naming it).
"""

from __future__ import annotations

from fractions import Fraction
from math import lcm
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Scales a CSWA sub-block may use: the K/V map is the query map average-pooled by 1/s.
ALLOWED_SCALES = (1.0, 0.5, 0.25, 0.125, 0.0625)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MPTConfig(_Strict):
    """Multi-Pyramid Transformer (docs/models.md).

    ``scales[i]`` lists the CSWA scale of every sub-block of the pyramid block at level ``i + 1``
    (encoder and decoder of a level share the list); its length is that block's number of
    sub-blocks. ``heads[i]`` is the number of attention heads at level ``i + 1``; channels at level
    ``i + 1`` are ``dim * 2**i``.
    """

    arch: Literal["mpt"] = "mpt"
    preset: str = "custom"
    in_channels: int = Field(1, ge=1, le=16)
    out_channels: int = Field(1, ge=1, le=16)
    dim: int = Field(40, ge=4)
    heads: tuple[int, ...] = (1, 2, 4, 8)
    scales: tuple[tuple[float, ...], ...] = (
        (1 / 8, 1 / 8, 1 / 4, 1 / 4, 1.0, 1.0),
        (1 / 4, 1 / 4, 1 / 2, 1 / 2, 1.0, 1.0),
        (1 / 2, 1 / 2, 1 / 2, 1 / 2, 1.0, 1.0),
        (1 / 2, 1 / 2, 1 / 2, 1 / 2, 1.0, 1.0),
    )
    window_size: int = Field(8, ge=2)
    ffn_expansion: float = Field(2.6, gt=0)
    shift_every_second: bool = True
    global_residual: bool = True
    #: How the decoder doubles the resolution: ``"pixel_shuffle"`` (the paper's and the authors'
    #: 3x3 conv C -> 2C + PixelShuffle; also what a record without this key means) or
    #: ``"resize_conv"`` (3x3 conv C -> C/2 + nearest x2, no checkerboard; presets "small" and "tiny"). See
    #: :data:`UPSAMPLE_NOTE`.
    upsample: Literal["pixel_shuffle", "resize_conv"] = "pixel_shuffle"

    @field_validator("scales")
    @classmethod
    def _check_scales(cls, value: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
        for level, level_scales in enumerate(value, start=1):
            if not level_scales:
                raise ValueError(f"scales: level {level} has no sub-blocks")
            for s in level_scales:
                if not any(abs(s - a) < 1e-9 for a in ALLOWED_SCALES):
                    raise ValueError(f"scales: level {level} has scale {s}; allowed: {ALLOWED_SCALES}")
        return value

    @model_validator(mode="after")
    def _check_levels(self) -> "MPTConfig":
        if len(self.heads) != len(self.scales):
            raise ValueError(
                f"heads has {len(self.heads)} levels but scales has {len(self.scales)}"
            )
        for level, h in enumerate(self.heads):
            channels = self.dim * 2**level
            if channels % h:
                raise ValueError(f"heads: level {level + 1} has {channels} channels, not divisible by {h} heads")
        return self

    @property
    def levels(self) -> int:
        return len(self.scales)

    def level_channels(self, level: int) -> int:
        """Channels of pyramid block ``level`` (0-based)."""
        return self.dim * 2**level

    @property
    def size_multiple(self) -> int:
        """H and W of the network input must be multiples of this (the model pads to it).

        A level-``l`` map (0-based) is the input downsampled by ``2**l``; a CSWA sub-block of scale
        ``s`` pools it by ``1/s`` and splits the result into ``window_size`` windows, and its shifted
        variant moves the query map by ``window_size / (2 s)``, so each level needs its map size to be
        a multiple of ``window_size / s``.
        """
        multiple = 1
        for level, level_scales in enumerate(self.scales):
            for s in level_scales:
                inv = Fraction(s).limit_denominator(64) ** -1
                multiple = lcm(multiple, int(2**level * self.window_size * inv))
        return multiple


class H2TUNetConfig(_Strict):
    """Head-to-tail multi-scale U-Net (docs/models.md).

    ``num_scales`` (K) U-Nets run on the blurred input at scales ``1/2**(K-1) ... 1``; the encoder of
    each finer U-Net is fused with the decoder of the next coarser one (``fusion``).
    """

    arch: Literal["h2t_unet"] = "h2t_unet"
    preset: str = "custom"
    in_channels: int = Field(1, ge=1, le=16)
    out_channels: int = Field(1, ge=1, le=16)
    num_scales: int = Field(4, ge=1, le=4)
    fusion: Literal["sum", "concat"] = "sum"
    base_channels: int = Field(32, ge=4)
    depth: int = Field(3, ge=1, le=5)
    #: How the decoder doubles the resolution: ``"transposed"`` (ConvTranspose2d k=2 s=2; what a
    #: record without this key means) or ``"resize_conv"`` (1x1 conv + nearest x2, no
    #: checkerboard; every preset). See the note above the presets.
    upsample: Literal["transposed", "resize_conv"] = "transposed"

    @property
    def size_multiple(self) -> int:
        return 2 ** (self.num_scales - 1 + self.depth - 1)


ArchConfig = Annotated[Union[MPTConfig, H2TUNetConfig], Field(discriminator="arch")]

# Upsampling (issue 13): every preset but the MPT's "paper" one upsamples by resize-convolution,
# while the configs' ``upsample`` defaults keep the older upsamplers. A stride-2 transposed
# convolution or a sub-pixel convolution has four output phases with their own weights; trained apart they leave a period-2
# (checkerboard) pattern (the first shipped h2t-unet-fluo: a Nyquist energy ratio of thousands on
# the demo image). A resize-convolution ties the phases. The defaults stay the old upsamplers
# because a model record written before the field existed has no ``upsample`` key and was
# trained with them. The MPT "paper" preset stays the published network; its resize-convolution
# variant is ``preset_config("mpt", "paper", upsample="resize_conv")``.

#: Architecture presets: same structure, fewer channels/sub-blocks for CPU use and tests.
MPT_PRESETS: dict[str, dict] = {
    # The paper's network as published (19,799,356 parameters at 3 channels, as the authors' code),
    # sub-pixel upsampling included; train with ``upsample: resize_conv`` to avoid its checkerboard.
    "paper": {},
    # Half the width, four sub-blocks per pyramid block (scales keep the coarse-to-fine order).
    "small": {
        "upsample": "resize_conv",
        "dim": 24,
        "heads": (1, 2, 4, 8),
        "scales": (
            (1 / 8, 1 / 4, 1.0, 1.0),
            (1 / 4, 1 / 2, 1.0, 1.0),
            (1 / 2, 1 / 2, 1.0, 1.0),
            (1 / 2, 1 / 2, 1.0, 1.0),
        ),
    },
    # Two sub-blocks per block: one cross-scale, one shifted full-scale; a plain-window bottleneck
    # halves the size multiple (64) so small images pad less.
    "tiny": {
        "upsample": "resize_conv",
        "dim": 16,
        "heads": (1, 2, 4, 4),
        "scales": ((1 / 4, 1.0), (1 / 2, 1.0), (1 / 2, 1.0), (1.0, 1.0)),
    },
}

H2T_PRESETS: dict[str, dict] = {
    "paper": {"num_scales": 4, "fusion": "sum", "base_channels": 32, "depth": 4, "upsample": "resize_conv"},
    "small": {"num_scales": 3, "fusion": "sum", "base_channels": 24, "depth": 3, "upsample": "resize_conv"},
    "tiny": {"num_scales": 2, "fusion": "sum", "base_channels": 12, "depth": 3, "upsample": "resize_conv"},
}

ARCHITECTURES = ("mpt", "h2t_unet")
PRESETS = ("paper", "small", "tiny")


def preset_config(arch: str, preset: str, in_channels: int = 1, out_channels: int | None = None, **overrides):
    """Build the config of a named preset; ``overrides`` replace preset fields (e.g. ``upsample``).

    Raises ``ValueError`` naming the known choices for an unknown ``arch`` or ``preset``.
    """
    table = {"mpt": (MPTConfig, MPT_PRESETS), "h2t_unet": (H2TUNetConfig, H2T_PRESETS)}
    if arch not in table:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(table)}")
    cls, presets = table[arch]
    if preset not in presets:
        raise ValueError(f"unknown {arch} preset {preset!r}; choose one of {sorted(presets)}")
    out = in_channels if out_channels is None else out_channels
    return cls(preset=preset, in_channels=in_channels, out_channels=out, **{**presets[preset], **overrides})
