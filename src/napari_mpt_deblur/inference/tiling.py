"""Y/X tiling with overlap and smooth blending (docs/inference.md).

A plane larger than the tile is cut into overlapping tiles; each tile is restored on its own and
the results are blended with a weight that tapers over the overlap:
``out = sum_k(w_k * f(tile_k)) / sum_k(w_k)``.

* Tile sides are multiples of the model's size multiple, so the network never pads a tile. Along
  an axis that is not longer than the tile, the whole axis is one tile (the network pads it once,
  as for whole-image inference).
* ``tile`` is the *largest* tile side: along each axis the side is the multiple that restores the
  fewest pixels (696 px with 512 px tiles -> two 384 px tiles, not two 512 px tiles overlapping
  by 328 px); see :func:`balanced_tile`.
* The last tile is shifted back inside the image rather than padded.
* The weight of a tile is a separable raised-cosine ramp over ``overlap`` pixels on each side that
  has a neighbouring tile, and 1 on sides at the image border. It is strictly positive everywhere,
  so every pixel is covered; on a regular grid the ramps of two neighbours sum to exactly 1.

Because MPT's channel attention (ISCA) is global over its input, a tiled result is not identical
to a whole-image one; the difference (the seam error) is measured in ``tests/test_inference.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .progress import Cancelled


def balanced_tile(length: int, max_tile: int, overlap: int, multiple: int) -> int:
    """The tile side actually used along an axis of ``length`` pixels.

    ``length`` itself when it fits in ``max_tile`` (one tile, run whole). Otherwise the multiple of
    ``multiple`` (at most ``max_tile``) that restores the fewest pixels along the axis,
    ``n_tiles * tile``; among sides within 2 % of that minimum the largest wins (fewer tiles, more
    context per tile). E.g. 696 px, max 512, multiple 128 -> two 384 px tiles (768 px), not two
    512 px tiles (1024 px); 2048 px, max 512, multiple 128 -> six of 384 (2304 px), not five of
    512 (2560 px).
    """
    if length <= max_tile:
        return length
    costs = {}
    for tile in range(max_tile - max_tile % multiple, overlap, -multiple):
        costs[tile] = math.ceil((length - overlap) / (tile - overlap)) * tile
    if not costs:
        raise ValueError(f"no tile side that is a multiple of {multiple}, at most {max_tile} and above the overlap {overlap}")
    best = min(costs.values())
    return max(t for t, c in costs.items() if c <= 1.02 * best)


def axis_starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Start offsets of the tiles along one axis; the last one is shifted back to end at ``length``."""
    if tile >= length:
        return (0,)
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    n = math.ceil((length - tile) / stride) + 1
    return tuple(min(i * stride, length - tile) for i in range(n))


@lru_cache(maxsize=64)
def _ramp(overlap: int) -> np.ndarray:
    """Raised-cosine ramp of ``overlap`` samples, strictly inside (0, 1); ``r + r[::-1] == 1``."""
    i = np.arange(overlap, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(np.pi * (i + 0.5) / overlap)


def taper(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """1D blending weight of one tile: ramps up/down over ``overlap`` pixels where a neighbour is.

    Shape: (length,) float64, values in (0, 1]. When the two ramps overlap (tile shorter than
    twice the overlap) the smaller of the two values is kept.
    """
    w = np.ones(length, dtype=np.float64)
    o = min(overlap, length)
    if o <= 0:
        return w
    r = _ramp(o)
    if ramp_start:
        w[:o] = np.minimum(w[:o], r)
    if ramp_end:
        w[length - o :] = np.minimum(w[length - o :], r[::-1])
    return w


@dataclass(frozen=True)
class TileGrid:
    """Tiles of one (H, W) plane: all of shape (tile_h, tile_w), starts ``ys`` x ``xs``."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Tile starts (y, x), row by row."""
        for y in self.ys:
            for x in self.xs:
                yield y, x

    def weight(self, y: int, x: int) -> np.ndarray:
        """Blending weight of the tile starting at (y, x): (tile_h, tile_w) float32, > 0."""
        wy = taper(self.tile_h, self.overlap, y > 0, y + self.tile_h < self.height)
        wx = taper(self.tile_w, self.overlap, x > 0, x + self.tile_w < self.width)
        return np.outer(wy, wx).astype(np.float32)

    def weight_sum(self) -> np.ndarray:
        """Sum of all tile weights over the plane, (H, W) float64 (used by tests and docs)."""
        total = np.zeros((self.height, self.width), dtype=np.float64)
        for y, x in self:
            total[y : y + self.tile_h, x : x + self.tile_w] += self.weight(y, x)
        return total


def plan_tiles(height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> TileGrid:
    """Plan the tiles of an (H, W) plane for a maximum tile side ``tile`` (a multiple of ``multiple``)."""
    if height < 1 or width < 1:
        raise ValueError(f"cannot tile an empty plane of shape ({height}, {width})")
    if tile < 1 or tile % multiple:
        raise ValueError(f"tile {tile} must be a positive multiple of {multiple}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be >= 0 and smaller than the tile {tile}")
    th = balanced_tile(height, tile, overlap, multiple)
    tw = balanced_tile(width, tile, overlap, multiple)
    return TileGrid(height, width, th, tw, overlap, axis_starts(height, th, overlap), axis_starts(width, tw, overlap))


#: Restores a batch of tiles: (B, C, h, w) float32 -> (B, C_out, h, w) float32.
TileFunction = Callable[[np.ndarray], np.ndarray]


def tile_and_blend(
    image: np.ndarray,
    fn: TileFunction,
    grid: TileGrid,
    batch_size: int = 1,
    on_tiles_done: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Apply ``fn`` tile by tile and blend: ``sum(w * fn(tile)) / sum(w)``.

    ``image``: (C, H, W) float32 matching ``grid``. Returns (C_out, H, W) float32. ``fn`` gets
    batches of up to ``batch_size`` tiles. ``should_stop`` is checked before every batch; when it
    returns True, :class:`Cancelled` is raised (``tiles_done`` counts the tiles of this plane).
    ``on_tiles_done(n)`` is called after each batch with the number of tiles it held.
    """
    if image.ndim != 3 or image.shape[1:] != (grid.height, grid.width):
        raise ValueError(f"image of shape {image.shape} does not match a ({grid.height}, {grid.width}) tile grid")
    starts = list(grid)
    th, tw = grid.tile_h, grid.tile_w
    acc: np.ndarray | None = None
    wsum = np.zeros((grid.height, grid.width), dtype=np.float32)
    for first in range(0, len(starts), max(1, batch_size)):
        if should_stop is not None and should_stop():
            raise Cancelled(f"cancelled after {first} of {len(starts)} tiles", tiles_done=first, tiles_total=len(starts))
        chunk = starts[first : first + max(1, batch_size)]
        batch = np.stack([image[:, y : y + th, x : x + tw] for y, x in chunk])
        out = np.asarray(fn(batch))
        if out.ndim != 4 or out.shape[0] != len(chunk) or out.shape[2:] != (th, tw):
            raise ValueError(f"tile function returned shape {out.shape} for a batch of shape {batch.shape}")
        if acc is None:
            acc = np.zeros((out.shape[1], grid.height, grid.width), dtype=np.float32)
        for (y, x), tile_out in zip(chunk, out):
            w = grid.weight(y, x)
            acc[:, y : y + th, x : x + tw] += tile_out * w
            wsum[y : y + th, x : x + tw] += w
        if on_tiles_done is not None:
            on_tiles_done(len(chunk))
    assert acc is not None
    acc /= wsum
    return acc


def cut_tiles(image: np.ndarray, grid: TileGrid, out: np.ndarray | None = None) -> np.ndarray:
    """The tiles of a (C, H, W) plane in grid order: (len(grid), C, tile_h, tile_w), written into ``out`` if given."""
    th, tw = grid.tile_h, grid.tile_w
    if out is None:
        out = np.empty((len(grid), image.shape[0], th, tw), dtype=image.dtype)
    for k, (y, x) in enumerate(grid):
        out[k] = image[:, y : y + th, x : x + tw]
    return out


def blend_tiles(outputs: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Blend restored tiles (len(grid), C, tile_h, tile_w), in grid order, into a (C, H, W) float32 plane.

    The same arithmetic, in the same order, as :func:`tile_and_blend`: equal tile outputs give
    bit-identical planes (the batched engine path relies on it).
    """
    if outputs.ndim != 4 or outputs.shape[0] != len(grid) or outputs.shape[2:] != (grid.tile_h, grid.tile_w):
        raise ValueError(f"{outputs.shape} tile outputs do not match a grid of {len(grid)} "
                         f"{grid.tile_h}x{grid.tile_w} tiles")
    th, tw = grid.tile_h, grid.tile_w
    acc = np.zeros((outputs.shape[1], grid.height, grid.width), dtype=np.float32)
    wsum = np.zeros((grid.height, grid.width), dtype=np.float32)
    for (y, x), tile_out in zip(grid, outputs):
        w = grid.weight(y, x)
        acc[:, y : y + th, x : x + tw] += tile_out * w
        wsum[y : y + th, x : x + tw] += w
    acc /= wsum
    return acc
