"""Training data (SPEC section 5): paired folders, BBBC006-style plane folders, z-stacks with an
automatically found focal plane, synthetic defocus pairs from sharp images, and unlabeled images.

Conventions shared by every dataset here:

* Images are 2D, single channel (RGB is averaged to grey); uint8, uint16 and float all work.
* A pair is brought to REFERENCE units first: the sharp image's 0.1 / 99.9 percentiles map to
  0 / 1 and the blurred image gets the same affine map (for synthetic pairs the sharp image is
  normalised and then blurred, so they already share units). Validation PSNR/SSIM are measured in
  these units, like the benchmark (SPEC section 8).
* The network input is normalised the way inference will normalise it: by the BLURRED image's own
  percentiles (``normalisation``, whole image, not the patch), and the target gets the same map, so
  training teaches exactly the mapping inference asks for.
* Samples are a pure function of ``(seed, index)``: ``dataset[i]`` always returns the same patch,
  whatever the worker or process. The trainer walks an infinite index stream, so resuming at step
  N only needs N (no data-loader state) and DistributedDataParallel ranks read disjoint indices.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..io.images import ImageReadError, read_array
from .normalisation import NormalisationConfig, normalise, percentile_range
from .psf import defocus_psf
from .synthesis import DEPTH_LEVELS, DefocusRange, add_camera_noise, blur, synthesize_depth

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy")


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


def read_image_2d(path: str | os.PathLike) -> np.ndarray:
    return as_2d(read_array(path), str(path))


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files in ``folder`` (sorted by name); an error names the folder if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise ImageReadError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


# --------------------------------------------------------------------------------------------
# Focus


def focus_scores(stack: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Focus measure of every plane of a (Z, Y, X) stack: variance of the Laplacian of Gaussian.

    The Gaussian pre-filter (``sigma`` px) matters: the raw Laplacian's variance is dominated by
    pixel noise and picked the wrong plane on a real widefield stack (SPEC section 5). Planes are
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
# Patches and augmentation


class PatchConfig(BaseModel):
    """How training patches are cut and augmented."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(256, ge=8, description="patch side in pixels (a multiple of the model's size factor is fastest)")
    flips: bool = Field(True, description="random flips and 90-degree rotations (the 8 symmetries of the square)")
    scale: tuple[float, float] = Field((0.75, 1.25), description="random scaling range (1, 1 = off)")
    normalisation: NormalisationConfig = Field(default_factory=NormalisationConfig)


def _rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), int(stream)])


def _crop_box(shape: tuple[int, int], side: int, rng: np.random.Generator) -> tuple[int, int]:
    y = int(rng.integers(0, max(shape[0] - side, 0) + 1))
    x = int(rng.integers(0, max(shape[1] - side, 0) + 1))
    return y, x


def _crop_reflect(img: np.ndarray, y: int, x: int, side: int) -> np.ndarray:
    """``img[y:y+side, x:x+side]``, reflect-padded where the image is smaller than ``side``."""
    crop = img[y : y + side, x : x + side]
    if crop.shape != (side, side):
        crop = np.pad(crop, ((0, side - crop.shape[0]), (0, side - crop.shape[1])), mode="symmetric")
    return crop


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    if img.shape == (side, side):
        return img
    from skimage.transform import resize

    return resize(img, (side, side), order=1, anti_aliasing=img.shape[0] > side, preserve_range=True)


def _dihedral(arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in arrays:
        a = np.rot90(a, k)
        out.append(np.ascontiguousarray(a[:, ::-1] if flip else a))
    return out


def reference_units(sharp: np.ndarray, blurred: np.ndarray | None = None,
                    norm: NormalisationConfig | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Map ``sharp``'s percentiles to [0, 1] and apply the same map to ``blurred`` (float32)."""
    norm = norm or NormalisationConfig()
    lo, hi = percentile_range(sharp, norm.low, norm.high)
    return normalise(sharp, lo, hi), None if blurred is None else normalise(blurred, lo, hi)


def input_normalise(inp: np.ndarray, gt: np.ndarray | None, norm: NormalisationConfig) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float]]:
    """Normalise ``inp`` by its own percentiles (as inference does) and ``gt`` by the same map."""
    lo, hi = percentile_range(inp, norm.low, norm.high)
    return normalise(inp, lo, hi), None if gt is None else normalise(gt, lo, hi), (lo, hi)


@dataclass
class Pair:
    """A full-size training pair in reference units (float32, H x W)."""

    inp: np.ndarray
    gt: np.ndarray
    name: str


def _to_tensor(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]


class _Base:
    """Common index-stream behaviour: ``len`` is the number of sources (images or pairs)."""

    seed: int

    def __len__(self) -> int:  # the number of distinct sources, not of patches
        raise NotImplementedError


class PairedPatches(_Base):
    """Random augmented patches from in-memory pairs (any of the paired sources).

    ``dataset[i]`` -> ``{"inp": (1, P, P), "gt": (1, P, P)}`` float32 tensors, both normalised by
    the full input image's percentile range (computed once per image).
    """

    def __init__(self, pairs: Sequence[Pair], patch: PatchConfig, seed: int = 0) -> None:
        if not pairs:
            raise ValueError("no training pairs")
        self.pairs = list(pairs)
        self.patch = patch
        self.seed = seed
        self._ranges = [percentile_range(p.inp, patch.normalisation.low, patch.normalisation.high) for p in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        rng = _rng(self.seed, index)
        k = int(rng.integers(len(self.pairs)))
        pair = self.pairs[k]
        lo, hi = self._ranges[k]
        p = self.patch.size
        s = float(rng.uniform(*self.patch.scale))
        side = max(2, round(p / s))
        y, x = _crop_box(pair.inp.shape, side, rng)
        inp = _resize(_crop_reflect(pair.inp, y, x, side), p)
        gt = _resize(_crop_reflect(pair.gt, y, x, side), p)
        if self.patch.flips:
            inp, gt = _dihedral([inp, gt], rng)
        return {"inp": _to_tensor(normalise(inp, lo, hi)), "gt": _to_tensor(normalise(gt, lo, hi))}


class SyntheticPatches(_Base):
    """Synthetic defocus pairs from sharp images (the default training source), made in two halves.

    Here, in the data workers (cheap, per sample): pick an image, draw the optics from ``defocus``
    (:class:`DefocusRange`; the PSF is the nearest node of its
    :class:`~napari_mpt_deblur.data.psf_bank.PSFBank`, no PSF is computed per sample), a random
    scale, patch position and flip/rotation; cut the sharp CONTEXT of the patch (patch plus the
    kernel's support, real image content, reflect-padded only past the image border) and a coarse
    copy of a wide window (``context`` px) for the normalisation; with ``labels`` and
    ``per_object_prob`` > 0 some samples give every labeled object one of three depths
    (mask-based depth synthesis). ``dataset[i]`` returns these as a dict with a ``"bank"`` key.

    On the training device, for the whole batch (:mod:`~napari_mpt_deblur.data.device_synthesis`,
    called through :func:`materialise`): blur by FFT, Poisson-Gaussian noise, and normalisation
    of input and target by the percentiles of the blurred noisy wide window (what inference does
    with the whole image: a background patch stays dark instead of being stretched to [0, 1]).
    :meth:`pair` does both halves for one sample (tests, notebooks); :meth:`reference_item` is the
    previous all-numpy pipeline (a fresh PSF per sample), kept as the reference that
    ``benchmarks/bench_training.py --data`` compares against.
    """

    def __init__(self, sharp: Sequence[np.ndarray], patch: PatchConfig, defocus: DefocusRange | None = None,
                 seed: int = 0, labels: Sequence[np.ndarray] | None = None, per_object_prob: float = 0.0,
                 names: Sequence[str] | None = None, context: int = 768) -> None:
        from .device_synthesis import coarse_factor
        from .psf_bank import PSFBank

        if not sharp:
            raise ValueError("no sharp images for synthetic pairs")
        self.images = [reference_units(as_2d(s, f"sharp image {i}"), norm=patch.normalisation)[0]
                       for i, s in enumerate(sharp)]
        self.names = list(names) if names is not None else [f"image {i}" for i in range(len(self.images))]
        self.labels = None if labels is None else [np.asarray(lab) for lab in labels]
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.labels)} label images for {len(self.images)} sharp images")
        self.patch = patch
        self.defocus = defocus or DefocusRange()
        self.seed = seed
        self.per_object_prob = per_object_prob
        self.context = max(context, patch.size)
        bank = PSFBank.for_range(self.defocus)
        self.bank_key = bank.key
        self.grids = bank.grids  # node lookup only: the kernels stay in the training process
        self.kernel_size = self.defocus.max_kernel
        self.coarse = coarse_factor(self.context)
        self.coarse_side = math.ceil(self.context / self.coarse)
        # Block-mean copies for the wide normalisation window: its crop is then already close to
        # the coarse grid (the smallest training scale still needs no upsampling).
        self.pool = max(1, 2 ** int(math.log2(max(1.0, self.coarse * min(self.patch.scale)))))
        self.pooled = [_block_mean(im, self.pool) for im in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def _node(self, draw, radius_px: float | None = None) -> int:
        grid = self.grids[draw.objective]
        return grid.node(draw.wavelength_um / draw.pixel_um, draw.radius_px if radius_px is None else radius_px)

    def __getitem__(self, index: int) -> dict:
        rng = _rng(self.seed, index)
        k = int(rng.integers(len(self.images)))
        img = self.images[k]
        draw = self.defocus.draw(rng)
        p, ks = self.patch.size, self.kernel_size
        side = p + ks - 1
        s = float(rng.uniform(*self.patch.scale))
        # Patch position in source pixels; the context adds the kernel's half support around it.
        y = float(rng.uniform(0, max(img.shape[0] - p / s, 0)))
        x = float(rng.uniform(0, max(img.shape[1] - p / s, 0)))
        half_src = (ks // 2) / s
        box = (y - half_src, x - half_src, side / s)
        sharp = _window(img, *box, out=side)
        norm = self._norm_window(img, y + p / (2 * s), x + p / (2 * s), s, self.pooled[k])
        levels = np.full(DEPTH_LEVELS, self._node(draw), dtype=np.int64)
        level_map = np.zeros((side, side), dtype=np.int8)
        per_object = self.labels is not None and rng.random() < self.per_object_prob
        if per_object:
            lab = _window(self.labels[k], *box, out=side, nearest=True)
            ids = np.unique(lab)
            ids = ids[ids != 0]
            depths = 1.5 * draw.radius_px * rng.random(DEPTH_LEVELS - 1)
            levels[1:] = [self._node(draw, float(r)) for r in depths]
            lut = np.zeros(int(lab.max()) + 1, dtype=np.int8)
            lut[ids] = 1 + rng.integers(DEPTH_LEVELS - 1, size=ids.size)
            level_map = lut[lab]
        if self.patch.flips:
            sharp, level_map = _dihedral([sharp, level_map], rng)
        return {
            "bank": self.bank_key,
            "sharp": _to_tensor(sharp),
            "norm": _to_tensor(norm),
            "kernel": np.int64(levels[0]),
            "levels": levels,
            "level_map": np.ascontiguousarray(level_map, dtype=np.int8),
            "per_object": np.bool_(per_object),
            "peak": np.float32(draw.peak_photons or 0.0),
            "read": np.float32(draw.read_sigma_photons),
            "seed": np.int64(rng.integers(2**62)),
            "coarse": np.int64(self.coarse),
        }

    def _norm_window(self, img: np.ndarray, cy: float, cx: float, s: float, pooled: np.ndarray | None = None,
                     ) -> np.ndarray:
        """The wide window around the patch centre (source pixels ``cy, cx``), at ``coarse``
        training pixels per pixel, (coarse_side, coarse_side); where the image is smaller the window
        is mirrored (which keeps its intensity distribution). ``pooled``: ``img`` block-averaged by
        ``self.pool`` (computed if not given)."""
        q = self.pool
        small_img = _block_mean(img, q) if pooled is None else pooled
        n = self.coarse_side
        shape = []
        starts = []
        for c, length in ((cy / q, small_img.shape[0]), (cx / q, small_img.shape[1])):
            extent = min(length, max(1, round(self.context / (s * q))))
            starts.append(int(min(max(round(c - extent / 2), 0), length - extent)))
            shape.append(extent)
        crop = small_img[starts[0] : starts[0] + shape[0], starts[1] : starts[1] + shape[1]]
        out_shape = tuple(min(n, max(1, round(e * s * q / self.coarse))) for e in shape)
        small = _resize_linear(crop, out_shape)
        if small.shape != (n, n):
            small = np.pad(small, ((0, n - small.shape[0]), (0, n - small.shape[1])), mode="symmetric")
        return small

    def pair(self, index: int, device: str = "cpu") -> dict:
        """``{"inp", "gt"}`` (1, P, P) for one sample, synthesised on ``device``."""
        import torch

        batch = collate([self[index]])
        out = materialise(batch, torch.device(device))
        return {"inp": out["inp"][0].cpu(), "gt": out["gt"][0].cpu()}

    def reference_item(self, index: int) -> dict:
        """The previous all-numpy pipeline for one sample (a fresh PSF per sample, FFT blur of a
        ``context`` window, noise, window percentiles): the "before" of the data benchmark."""
        from skimage.transform import resize

        rng = _rng(self.seed, index)
        k = int(rng.integers(len(self.images)))
        img = self.images[k]
        params, peak, read = self.defocus.sample(rng)
        p = self.patch.size
        s = float(rng.uniform(*self.patch.scale))
        side_y = min(img.shape[0], max(2, round(self.context / s)))
        side_x = min(img.shape[1], max(2, round(self.context / s)))
        y0 = int(rng.integers(0, img.shape[0] - side_y + 1))
        x0 = int(rng.integers(0, img.shape[1] - side_x + 1))
        window = img[y0 : y0 + side_y, x0 : x0 + side_x].astype(np.float64)
        out_shape = (max(p, round(side_y * s)), max(p, round(side_x * s)))
        if window.shape != out_shape:
            window = resize(window, out_shape, order=1, anti_aliasing=s < 1, preserve_range=True)
        if self.labels is not None and rng.random() < self.per_object_prob:
            lab = self.labels[k][y0 : y0 + side_y, x0 : x0 + side_x]
            if lab.shape != out_shape:
                lab = resize(lab, out_shape, order=0, preserve_range=True, anti_aliasing=False)
            lab = lab.astype(np.int64)
            ids = [int(i) for i in np.unique(lab) if i != 0]
            levels = 1.5 * params.defocus_um * rng.random(3)
            per_label = {i: float(levels[rng.integers(3)]) for i in ids}
            blurred, _ = synthesize_depth(window, lab, params, per_label, peak_photons=None)
        else:
            blurred = blur(window, defocus_psf(params))
        if peak is not None:
            blurred = add_camera_noise(blurred, peak, read, rng)
        lo, hi = percentile_range(blurred, self.patch.normalisation.low, self.patch.normalisation.high)
        y, x = _crop_box(blurred.shape, p, rng)
        inp, gt = blurred[y : y + p, x : x + p], window[y : y + p, x : x + p]
        if self.patch.flips:
            inp, gt = _dihedral([inp, gt], rng)
        return {"inp": _to_tensor(normalise(inp, lo, hi)), "gt": _to_tensor(normalise(gt, lo, hi))}


def _window(img: np.ndarray, y0: float, x0: float, side_src: float, out: int, nearest: bool = False) -> np.ndarray:
    """The square ``img[y0 : y0 + side_src, x0 : x0 + side_src]`` (source pixels, may reach past
    the border, where it is mirrored) resampled to ``out x out``: bilinear with antialiasing, or
    nearest for label images."""
    side = max(1, round(side_src))
    yi, xi = round(y0), round(x0)
    h, w = img.shape
    crop = img[max(yi, 0) : max(min(yi + side, h), 0), max(xi, 0) : max(min(xi + side, w), 0)]
    pads = ((max(-yi, 0), max(yi + side - h, 0)), (max(-xi, 0), max(xi + side - w, 0)))
    if any(any(pad) for pad in pads):
        crop = np.pad(crop, pads, mode="symmetric")
    if side == out:
        return crop
    if nearest:
        idx = np.minimum(((np.arange(out) + 0.5) * side / out).astype(np.int64), side - 1)
        return crop[np.ix_(idx, idx)]
    return _resize_linear(crop, (out, out))


def _block_mean(img: np.ndarray, q: int) -> np.ndarray:
    """Means of q x q blocks (the last partial blocks dropped), float32."""
    if q == 1:
        return np.asarray(img, dtype=np.float32)
    h, w = img.shape[0] // q * q, img.shape[1] // q * q
    if h == 0 or w == 0:
        return np.asarray(img, dtype=np.float32)
    return img[:h, :w].reshape(h // q, q, w // q, q).mean(axis=(1, 3), dtype=np.float32)


def _resize_linear(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize, antialiased when shrinking by more than 1.5x, (h, w) -> ``shape``, float32."""
    if tuple(img.shape) == tuple(shape):
        return np.asarray(img, dtype=np.float32)
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    # Antialiasing only for real shrinking: the training scales (0.75-1.25) alias negligibly.
    shrink = shape[0] * 1.5 < img.shape[0] or shape[1] * 1.5 < img.shape[1]
    return F.interpolate(t, size=shape, mode="bilinear", antialias=shrink, align_corners=False)[0, 0].numpy()


def collate(items: Sequence[dict]) -> dict:
    """Stack dataset items into one batch: ready pairs (``inp``/``gt``) as tensors, synthetic
    samples grouped by PSF bank for :func:`materialise`; positions keep the sample order."""
    import torch

    out: dict = {"size": len(items), "ready": None, "synth": {}}
    ready = [i for i, it in enumerate(items) if "bank" not in it]
    if ready:
        keys = list(items[ready[0]])
        out["ready"] = {"pos": torch.tensor(ready), **{k: torch.stack([items[i][k] for i in ready]) for k in keys}}
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if "bank" in it:
            groups.setdefault(it["bank"], []).append(i)
    for key, pos in groups.items():
        fields = [f for f in items[pos[0]] if f != "bank"]
        out["synth"][key] = {"pos": torch.tensor(pos),
                             **{f: torch.stack([torch.as_tensor(items[i][f]) for i in pos]) for f in fields}}
    return out


def materialise(batch: dict, device, norm: NormalisationConfig | None = None) -> dict:
    """A collated batch as ``{"inp", "gt"?}`` tensors (B, 1, P, P) on ``device``, synthetic samples
    made there (:class:`~napari_mpt_deblur.data.device_synthesis.BatchSynthesizer`)."""
    import torch

    from .device_synthesis import BatchSynthesizer
    from .psf_bank import PSFBank

    norm = norm or NormalisationConfig()
    parts: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
    if batch["ready"] is not None:
        ready = batch["ready"]
        parts.append((ready["pos"], {k: v.to(device, non_blocking=True) for k, v in ready.items() if k != "pos"}))
    for key, group in batch["synth"].items():
        synth = BatchSynthesizer(PSFBank.by_key(key), norm.low, norm.high)
        inp, gt = synth({k: v for k, v in group.items() if k != "pos"}, device)
        parts.append((group["pos"], {"inp": inp, "gt": gt}))
    if len(parts) == 1:
        return parts[0][1]
    n = batch["size"]
    out = {}
    for key in parts[0][1]:
        first = parts[0][1][key]
        out[key] = torch.empty((n, *first.shape[1:]), dtype=first.dtype, device=first.device)
        for pos, values in parts:
            out[key][pos.to(first.device)] = values[key]
    return out


class UnlabeledPatches(_Base):
    """Patches of unlabeled (blurry) images for EFCRex: ``{"inp": (1, P, P)}``, each normalised by
    its whole image's percentile range. Random flips/rotations; no scaling (the real blur's size
    in pixels is what the model must adapt to)."""

    def __init__(self, images: Sequence[np.ndarray], patch: PatchConfig, seed: int = 0) -> None:
        if not images:
            raise ValueError("no unlabeled images")
        self.images = [as_2d(im, f"unlabeled image {i}") for i, im in enumerate(images)]
        self.patch = patch
        self.seed = seed
        self._ranges = [percentile_range(im, patch.normalisation.low, patch.normalisation.high) for im in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        rng = _rng(self.seed, index, stream=1)
        k = int(rng.integers(len(self.images)))
        img = self.images[k]
        p = self.patch.size
        y, x = _crop_box(img.shape, p, rng)
        patch = _crop_reflect(img, y, x, p)
        if self.patch.flips:
            (patch,) = _dihedral([patch], rng)
        lo, hi = self._ranges[k]
        return {"inp": _to_tensor(normalise(patch, lo, hi))}


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
                exclude: Sequence[str] = ()) -> tuple[list[np.ndarray], list[str]]:
    """Read 2D images from a folder (optionally only the given name stems) or a list of files."""
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
    return [read_image_2d(f) for f in files], [f.stem for f in files]


def synthetic_validation_pairs(sharp: Sequence[np.ndarray], names: Sequence[str], defocus_um: Sequence[float],
                               psf_model: str = "scalar", na: float = 0.45, wavelength_um: float = 0.461,
                               pixel_um: float = 0.645, peak_photons: float | None = 1000.0,
                               read_sigma_photons: float = 3.0, crop: int | None = 256, seed: int = 0) -> list[Pair]:
    """Fixed validation pairs with the benchmark's settings (SPEC section 8) at each defocus.

    Each sharp image is normalised to [0, 1] by its own percentiles, blurred with the full
    (automatically sized) PSF, made noisy with a seed per image and defocus (so every run
    validates on identical inputs) and then centre-cropped to ``crop`` if given.
    """
    from .psf import PSFParams
    from .synthesis import synthesize_defocus

    pairs = []
    for i, (img, name) in enumerate(zip(sharp, names)):
        gt = reference_units(as_2d(img, name))[0]
        for j, dz in enumerate(defocus_um):
            params = PSFParams(model=psf_model, na=na, wavelength_um=wavelength_um, pixel_um=pixel_um, defocus_um=dz)
            inp = synthesize_defocus(gt, params, peak_photons, read_sigma_photons, rng=np.random.default_rng([seed, i, j]))
            pairs.append(Pair(inp=inp, gt=gt, name=f"{name}@{dz:g}um"))
    # Blur the whole image, then crop: the crop's borders see real neighbours, not reflections.
    return crop_pairs(pairs, crop)


def crop_pairs(pairs: Sequence[Pair], crop: int | None) -> list[Pair]:
    """Centre crops of validation pairs (None: unchanged)."""
    if crop is None:
        return list(pairs)
    out = []
    for p in pairs:
        h, w = p.inp.shape
        y0, x0 = max((h - crop) // 2, 0), max((w - crop) // 2, 0)
        out.append(Pair(inp=p.inp[y0 : y0 + crop, x0 : x0 + crop], gt=p.gt[y0 : y0 + crop, x0 : x0 + crop], name=p.name))
    return out


def ceil_to(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)
