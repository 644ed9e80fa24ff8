"""Axes strings: validate them against an array and a model, guess them when not given.

An axes string has one letter per array dimension, e.g. ``"YX"``, ``"ZYX"``, ``"TZCYX"``,
``"YXS"`` (tifffile's letter for RGB samples). ``Y`` and ``X`` are required; ``C`` or ``S`` (at most
one) is the channel axis; every other letter (``T``, ``Z``, ``Q``, ``I``, ...) is a leading axis
that the 2D model simply iterates over.

The channel axis is fed to the network as its input channels when the model has more than one
(an RGB model and 3 channels); with a one-channel model each channel is restored as its own plane.

Internally the engine works on a transposed view in the order ``(leading..., [C], Y, X)``; see
:attr:`AxesLayout.to_internal`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHANNEL_LETTERS = ("C", "S")


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def normalise_axes(axes: str) -> str:
    """Upper-case and strip an axes string; raise ValueError for letters that cannot be axes."""
    if not isinstance(axes, str):
        raise TypeError(f"axes must be a string such as 'ZYX', not {type(axes).__name__}")
    out = axes.strip().upper()
    if not out or not out.isalpha() or not out.isascii():
        raise ValueError(f"invalid axes {axes!r}: use one letter per dimension, e.g. 'YX', 'ZYX', 'TZYX', 'YXC'")
    return out


def guess_axes(shape: tuple[int, ...], model_channels: int = 1) -> str:
    """Axes for an array without axis metadata, or a ValueError asking for them.

    2D -> ``YX``. 3D -> ``YXC`` for an RGB(A)-like last axis (3 or 4, and an image-sized axis
    before it), ``CYX`` when a 3-channel model meets a first axis of 3, else ``ZYX``. 4D and more
    are ambiguous and must be given.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        if model_channels > 1 and shape[-1] == model_channels:
            return "YXC"
        if model_channels > 1 and shape[0] == model_channels:
            return "CYX"
        if shape[-1] in (3, 4) and shape[-2] > 4 and shape[0] > 4:
            return "YXC"
        return "ZYX"
    raise ValueError(
        f"cannot guess the axes of a {len(shape)}-D image of shape {_fmt_shape(shape)} without axis names "
        "(which is time, z or channel?): pass them, e.g. --axes TZYX or --axes ZCYX on the command line "
        "(axes='TZYX' in Python; T time, Z depth, C channel, Y/X the image)"
        if len(shape) > 3
        else f"an image needs at least 2 dimensions (Y, X); got shape {_fmt_shape(shape)}"
    )


@dataclass(frozen=True)
class AxesLayout:
    """How an array with ``axes`` maps onto per-plane model calls.

    ``to_internal`` permutes the array to ``(leading..., [C], Y, X)``; ``to_user`` is its inverse.
    ``channels_in_model`` says whether the channel axis is fed to the model as its channels
    (then it stays in the plane); otherwise it is one of the leading axes.
    """

    axes: str
    shape: tuple[int, ...]
    channel_axis: int | None
    channels_in_model: bool
    to_internal: tuple[int, ...]
    to_user: tuple[int, ...]

    @property
    def internal_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[i] for i in self.to_internal)

    @property
    def plane_ndim(self) -> int:
        """Trailing internal dimensions that make one model input: 3 (C, Y, X) or 2 (Y, X)."""
        return 3 if self.channels_in_model else 2

    @property
    def leading_shape(self) -> tuple[int, ...]:
        return self.internal_shape[: len(self.shape) - self.plane_ndim]

    @property
    def leading_axes(self) -> str:
        return "".join(self.axes[i] for i in self.to_internal[: len(self.shape) - self.plane_ndim])

    @property
    def n_planes(self) -> int:
        n = 1
        for s in self.leading_shape:
            n *= s
        return n

    @property
    def plane_hw(self) -> tuple[int, int]:
        return self.internal_shape[-2], self.internal_shape[-1]

    def user_region(self, leading_index: tuple[int, ...]) -> tuple[slice, ...]:
        """The region of the user-ordered array that holds the plane at ``leading_index``."""
        region = [slice(None)] * len(self.shape)
        for pos, idx in zip(self.to_internal, leading_index):
            region[pos] = slice(idx, idx + 1)
        return tuple(region)

    def describe(self) -> str:
        ch = ""
        if self.channel_axis is not None:
            ch = "; channel axis fed to the model" if self.channels_in_model else "; each channel restored separately"
        return f"axes {self.axes} shape {_fmt_shape(self.shape)}: {self.n_planes} plane(s) of {self.plane_hw}{ch}"


def layout_for(axes: str, shape: tuple[int, ...], model_channels: int = 1) -> AxesLayout:
    """Validate ``axes`` against ``shape`` and the model's input channels; errors say what is wrong."""
    axes = normalise_axes(axes)
    shape = tuple(int(s) for s in shape)
    if len(axes) != len(shape):
        raise ValueError(
            f"axes {axes!r} has {len(axes)} letters but the image has {len(shape)} dimensions "
            f"(shape {_fmt_shape(shape)})"
        )
    dupes = sorted({a for a in axes if axes.count(a) > 1})
    if dupes:
        raise ValueError(f"axes {axes!r} repeats {', '.join(dupes)}: each letter may appear once")
    for needed in "YX":
        if needed not in axes:
            raise ValueError(f"axes {axes!r} has no {needed} axis: every image needs Y and X")
    channels = [i for i, a in enumerate(axes) if a in CHANNEL_LETTERS]
    if len(channels) > 1:
        raise ValueError(f"axes {axes!r} has two channel axes (C and S); keep one")
    if 0 in shape:
        raise ValueError(f"the image is empty: shape {_fmt_shape(shape)} (axes {axes})")
    channel_axis = channels[0] if channels else None
    if model_channels > 1:
        if channel_axis is None:
            raise ValueError(
                f"the model expects {model_channels}-channel{' (RGB)' if model_channels == 3 else ''} input "
                f"but the image has no channel axis (axes {axes}, shape {_fmt_shape(shape)}); "
                "use a one-channel (grayscale) model, or give the channel axis as C"
            )
        if shape[channel_axis] != model_channels:
            raise ValueError(
                f"the model expects {model_channels}-channel{' (RGB)' if model_channels == 3 else ''} input "
                f"but axis {axes[channel_axis]} of the image has {shape[channel_axis]} channels "
                f"(axes {axes}, shape {_fmt_shape(shape)})"
            )
    channels_in_model = model_channels > 1
    y, x = axes.index("Y"), axes.index("X")
    plane = ([channel_axis] if channels_in_model else []) + [y, x]
    leading = [i for i in range(len(axes)) if i not in plane]
    to_internal = tuple(leading + plane)
    to_user = tuple(int(i) for i in sorted(range(len(to_internal)), key=lambda k: to_internal[k]))
    return AxesLayout(axes, shape, channel_axis, channels_in_model, to_internal, to_user)


def user_chunks(layout: AxesLayout, max_side: int = 2048) -> tuple[int, ...]:
    """Zarr chunks in the user's axis order: one plane deep, Y/X up to ``max_side``."""
    chunks = []
    for i, a in enumerate(layout.axes):
        if a in "YX":
            chunks.append(min(layout.shape[i], max_side))
        elif i == layout.channel_axis and layout.channels_in_model:
            chunks.append(layout.shape[i])
        else:
            chunks.append(1)
    return tuple(chunks)


def to_user_block(plane: np.ndarray, layout: AxesLayout) -> np.ndarray:
    """A restored (C, H, W) or (H, W) plane as the block it occupies in the user's axis order."""
    block = plane.reshape((1,) * len(layout.leading_shape) + plane.shape)
    return block.transpose(layout.to_user)
