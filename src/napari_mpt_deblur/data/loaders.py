"""Images and pairs from files: 2D images, paired folders, BBBC006-style plane folders, z-stacks
with an automatically found focal plane, and the best-focus measure.

A pair (:class:`Pair`) is in REFERENCE units: the sharp image's 0.1 / 99.9 percentiles map to 0 / 1
and the blurred image gets the same affine map (:func:`reference_units`). The patch datasets that
draw from these pairs and images are in :mod:`napari_mpt_deblur.data.datasets` (which re-exports
these names); which source kinds exist and what they read is described in docs/training.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.images import read_array
from ..io.paths import ImageReadError, list_images
from .normalisation import NormalisationConfig, normalise, percentile_range


def as_2d(arr: np.ndarray, name: str = "image") -> np.ndarray:
    """Squeeze singleton axes and average RGB(A) to grey; anything else than 2D is an error."""
    a = np.squeeze(np.asarray(arr))
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a[..., :3].astype(np.float32).mean(axis=-1)
    if a.ndim != 2:
        raise ImageReadError(
            f"{name}: expected a 2D image, got shape {np.shape(arr)}"
            + (" (a z-stack? use a zstack data source)" if a.ndim == 3 else "")
        )
    if not np.all(np.isfinite(a)):
        raise ImageReadError(f"{name}: contains NaN or Inf values")
    return a


def as_channels(arr: np.ndarray, channels: int, name: str = "image") -> np.ndarray:
    """(C, H, W) float32 of a ``channels``-channel image given channels-last (RGB(A), H x W x C)
    or channels-first; an alpha channel is dropped. ``channels == 1``: :func:`as_2d`, (H, W), the
    layout every grey pipeline uses. Anything else is an error that names the shape."""
    if channels == 1:
        return as_2d(arr, name)
    a = np.squeeze(np.asarray(arr))
    if a.ndim == 3 and a.shape[-1] in (channels, channels + 1) and a.shape[0] not in (channels, channels + 1):
        a = np.moveaxis(a[..., :channels], -1, 0)
    elif a.ndim == 3 and a.shape[0] == channels:
        pass
    else:
        raise ImageReadError(f"{name}: expected a {channels}-channel image (H x W x {channels}), "
                             f"got shape {np.shape(arr)}")
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise ImageReadError(f"{name}: contains NaN or Inf values")
    return a


def read_image_2d(path: str | os.PathLike) -> np.ndarray:
    return as_2d(read_array(path), str(path))


def reference_units(sharp: np.ndarray, blurred: np.ndarray | None = None,
                    norm: NormalisationConfig | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Map ``sharp``'s percentiles to [0, 1] and apply the same map to ``blurred`` (float32)."""
    norm = norm or NormalisationConfig()
    lo, hi = percentile_range(sharp, norm.low, norm.high)
    return normalise(sharp, lo, hi), None if blurred is None else normalise(blurred, lo, hi)


@dataclass
class Pair:
    """A full-size training pair in reference units (float32, (H, W), or (C, H, W) for multi-channel)."""

    inp: np.ndarray
    gt: np.ndarray
    name: str


# --------------------------------------------------------------------------------------------
# Focus


def focus_scores(stack: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Focus measure of every plane of a (Z, Y, X) stack: variance of the Laplacian of Gaussian.

    The Gaussian pre-filter (``sigma`` px) matters: the raw Laplacian's variance is dominated by
    pixel noise and picked the wrong plane on a real widefield stack (docs/training.md). Planes are
    scaled by the stack's common percentile range so the scores compare across planes.
    """
    from scipy.ndimage import gaussian_laplace

    s = np.asarray(stack)
    if s.ndim != 3:
        raise ValueError(f"focus_scores needs a (Z, Y, X) stack, got shape {s.shape}")
    lo, hi = percentile_range(s, 0.1, 99.9)
    return np.array([float(np.var(gaussian_laplace(normalise(p, lo, hi), sigma))) for p in s])


def best_focus_plane(stack: np.ndarray, sigma: float = 1.0) -> int:
    return int(np.argmax(focus_scores(stack, sigma)))


# --------------------------------------------------------------------------------------------
# Sources: folders and files -> in-memory pairs / images


def _match_key(name: str, pattern: str | None) -> str:
    if pattern is None:
        return Path(name).stem
    m = re.search(pattern, name)
    return m.group(1) if m and m.groups() else (m.group(0) if m else "")


def load_folder_pairs(blurred_dir: str | os.PathLike, sharp_dir: str | os.PathLike,
                      match: str | None = None, exclude: Sequence[str] = ()) -> list[Pair]:
    """Pairs from two folders whose files match by name (stem, or the regex ``match``'s group)."""
    blurred = {_match_key(p.name, match): p for p in list_images(blurred_dir)}
    sharp = {_match_key(p.name, match): p for p in list_images(sharp_dir)}
    common = sorted(k for k in blurred.keys() & sharp.keys() if k and not any(e in k for e in exclude))
    if not common:
        raise ImageReadError(
            f"no matching names between {blurred_dir} ({len(blurred)} images) and {sharp_dir} ({len(sharp)} images)"
        )
    pairs = []
    for key in common:
        b, s = read_image_2d(blurred[key]), read_image_2d(sharp[key])
        if b.shape != s.shape:
            raise ImageReadError(f"{blurred[key]} is {b.shape} but {sharp[key]} is {s.shape}")
        g, i = reference_units(s, b)
        pairs.append(Pair(inp=i, gt=g, name=key))
    return pairs


_PLANE_RE = re.compile(r"z_?(\d+)$", re.IGNORECASE)


def plane_folders(root: str | os.PathLike) -> dict[int, Path]:
    """``{plane number: folder}`` for subfolders named like ``z_00`` / ``..._z16`` (BBBC006)."""
    root = Path(root)
    if not root.is_dir():
        raise ImageReadError(f"plane folder root not found: {root}")
    found = {}
    for d in sorted(root.iterdir()):
        m = _PLANE_RE.search(d.name)
        if d.is_dir() and m:
            found[int(m.group(1))] = d
    if not found:
        raise ImageReadError(f"{root}: no plane subfolders named like z_00 ... z_32")
    return found


def load_plane_pairs(root: str | os.PathLike, in_focus: int = 16, planes: Sequence[int] | None = None,
                     match: str | None = None, exclude: Sequence[str] = ()) -> list[Pair]:
    """BBBC006 layout: every chosen plane's images paired with the in-focus plane's (same names)."""
    folders = plane_folders(root)
    if in_focus not in folders:
        raise ImageReadError(f"{root}: in-focus plane z_{in_focus:02d} not found (planes: {sorted(folders)})")
    chosen = [z for z in (planes if planes is not None else sorted(folders)) if z != in_focus]
    missing = [z for z in chosen if z not in folders]
    if missing:
        raise ImageReadError(f"{root}: planes {missing} not found (planes: {sorted(folders)})")
    pairs = []
    for z in chosen:
        for pair in load_folder_pairs(folders[z], folders[in_focus], match, exclude):
            pair.name = f"z{z:02d}/{pair.name}"
            pairs.append(pair)
    return pairs


def load_zstack_pairs(path: str | os.PathLike, focus_plane: int | None = None, max_distance: int | None = None,
                      sigma: float = 1.0) -> tuple[list[Pair], int]:
    """Pairs from one (Z, Y, X) stack file: every plane vs the best-focus plane.

    The focal plane is ``focus_plane`` or found with :func:`best_focus_plane`; planes farther than
    ``max_distance`` from it are skipped. Returns ``(pairs, focal plane index)``.
    """
    stack = np.squeeze(read_array(path))
    if stack.ndim != 3:
        raise ImageReadError(f"{path}: expected a (Z, Y, X) stack, got shape {stack.shape}")
    best = best_focus_plane(stack, sigma) if focus_plane is None else int(focus_plane)
    if not 0 <= best < stack.shape[0]:
        raise ImageReadError(f"{path}: focus_plane {best} outside 0..{stack.shape[0] - 1}")
    pairs = []
    for z in range(stack.shape[0]):
        if z == best or (max_distance is not None and abs(z - best) > max_distance):
            continue
        g, i = reference_units(stack[best], stack[z])
        pairs.append(Pair(inp=i, gt=g, name=f"{Path(path).stem}/z{z}"))
    return pairs, best


def load_images(source: str | os.PathLike | Sequence[str | os.PathLike], names: Sequence[str] | None = None,
                exclude: Sequence[str] = (), channels: int = 1) -> tuple[list[np.ndarray], list[str]]:
    """Read 2D images from a folder (optionally only the given name stems) or a list of files:
    (H, W) grey (RGB averaged), or (C, H, W) float32 with ``channels`` > 1."""
    if isinstance(source, (str, os.PathLike)):
        files = list_images(source)
        if names is not None:
            by_stem = {p.stem: p for p in files}
            unknown = [n for n in names if n not in by_stem]
            if unknown:
                raise ImageReadError(f"{source}: no images named {unknown[:5]}")
            files = [by_stem[n] for n in names]
    else:
        files = [Path(f) for f in source]
    files = [f for f in files if not any(e in f.stem for e in exclude)]
    if not files:
        raise ImageReadError(f"no images left in {source} after excluding {list(exclude)}")
    return [as_channels(read_array(f), channels, str(f)) for f in files], [f.stem for f in files]
