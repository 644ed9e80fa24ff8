"""Training data (docs/training.md): paired folders, BBBC006-style plane folders, z-stacks with an
automatically found focal plane, synthetic defocus pairs from sharp images, and unlabeled images.

Conventions shared by every dataset here:

* Images are 2D, single channel (RGB is averaged to grey); uint8, uint16 and float all work.
  The exception: synthetic pairs for a multi-channel (RGB) model, whose ``DefocusRange`` names a
  wavelength per channel; their images are (C, H, W) and are normalised jointly (one percentile
  range for all channels, as inference normalises an RGB plane), which keeps the colour balance.
* A pair is brought to REFERENCE units first: the sharp image's 0.1 / 99.9 percentiles map to
  0 / 1 and the blurred image gets the same affine map (for synthetic pairs the sharp image is
  normalised and then blurred, so they already share units). Validation PSNR/SSIM are measured in
  these units, like the benchmark (docs/benchmarks.md).
* The network input is normalised the way inference will normalise it: by the BLURRED image's own
  percentiles (``normalisation``, whole image, not the patch), and the target gets the same map, so
  training teaches exactly the mapping inference asks for.
* Samples are a pure function of ``(seed, index)``: ``dataset[i]`` always returns the same patch,
  whatever the worker or process. The trainer walks an infinite index stream, so resuming at step
  N only needs N (no data-loader state) and DistributedDataParallel ranks read disjoint indices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..io.paths import IMAGE_SUFFIXES, ImageReadError, list_images  # noqa: F401  (re-exported: one home, io.paths)
from .normalisation import NormalisationConfig, normalise, percentile_range
# Images and pairs from files live in .loaders; re-exported here for existing imports.
from .loaders import (  # noqa: F401
    Pair,
    as_2d,
    as_channels,
    best_focus_plane,
    focus_scores,
    load_folder_pairs,
    load_images,
    load_plane_pairs,
    load_zstack_pairs,
    plane_folders,
    read_image_2d,
    reference_units,
)
from .psf import defocus_psf
from .synthesis import DEPTH_LEVELS, DefocusRange, add_camera_noise, blur, synthesize_depth
# Fixed validation pairs live in .validation_pairs; re-exported here for existing imports.
from .validation_pairs import crop_pairs, synthetic_validation_pairs  # noqa: F401

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
    """``img[..., y:y+side, x:x+side]``, reflect-padded where the image is smaller than ``side``."""
    crop = img[..., y : y + side, x : x + side]
    if crop.shape[-2:] != (side, side):
        pads = [(0, 0)] * (crop.ndim - 2) + [(0, side - crop.shape[-2]), (0, side - crop.shape[-1])]
        crop = np.pad(crop, pads, mode="symmetric")
    return crop


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    """The last two axes resized to ``side`` x ``side`` (bilinear, antialiased when shrinking)."""
    if img.shape[-2:] == (side, side):
        return img
    from skimage.transform import resize

    return resize(img, (*img.shape[:-2], side, side), order=1, anti_aliasing=img.shape[-2] > side, preserve_range=True)


def _dihedral(arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random flip/rotation of the last two axes of every array."""
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(-2, -1))
        out.append(np.ascontiguousarray(a[..., ::-1] if flip else a))
    return out


def _to_tensor(a: np.ndarray):
    """(H, W) -> (1, H, W) float32 tensor; (C, H, W) stays (C, H, W)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return t[None] if t.ndim == 2 else t


class _Base:
    """Common index-stream behaviour: ``len`` is the number of sources (images or pairs)."""

    seed: int

    def __len__(self) -> int:  # the number of distinct sources, not of patches
        raise NotImplementedError


class PairedPatches(_Base):
    """Random augmented patches from in-memory pairs (any of the paired sources).

    ``dataset[i]`` -> ``{"inp": (1, P, P), "gt": (1, P, P)}`` float32 tensors (``(C, P, P)`` for
    (C, H, W) colour pairs), both normalised by the full input image's percentile range (computed
    once per image, over all channels).
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
        y, x = _crop_box(pair.inp.shape[-2:], side, rng)
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
        self.defocus = defocus or DefocusRange()
        channels = self.defocus.channels
        if channels > 1 and labels is not None and per_object_prob > 0:
            raise ValueError("per-object depth (labels with per_object_prob > 0) is for single-channel images; "
                             f"these have {channels} channels (defocus.channel_wavelengths_um)")
        # Multi-channel images are (C, H, W), normalised jointly; single-channel ones stay (H, W).
        self.images = [reference_units(as_channels(s, channels, f"sharp image {i}"), norm=patch.normalisation)[0]
                       for i, s in enumerate(sharp)]
        self.names = list(names) if names is not None else [f"image {i}" for i in range(len(self.images))]
        self.labels = None if labels is None else [np.asarray(lab) for lab in labels]
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.labels)} label images for {len(self.images)} sharp images")
        self.patch = patch
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
        """Bank node of a single-channel draw (optionally at another blur radius, px)."""
        grid = self.grids[draw.objective]
        return grid.node(draw.wavelength_um / draw.pixel_um, draw.radius_px if radius_px is None else radius_px)

    def _channel_nodes(self, draw) -> np.ndarray:
        """Bank node of each channel of a draw, (C,) int64: same blur radius, own wavelength."""
        grid = self.grids[draw.objective]
        wavelengths = self.defocus.channel_wavelengths(draw)
        return np.asarray([grid.node(w / draw.pixel_um, draw.radius_px) for w in wavelengths], dtype=np.int64)

    def __getitem__(self, index: int) -> dict:
        rng = _rng(self.seed, index)
        k = int(rng.integers(len(self.images)))
        img = self.images[k]
        draw = self.defocus.draw(rng)
        p, ks = self.patch.size, self.kernel_size
        side = p + ks - 1
        s = float(rng.uniform(*self.patch.scale))
        # Patch position in source pixels; the context adds the kernel's half support around it.
        y = float(rng.uniform(0, max(img.shape[-2] - p / s, 0)))
        x = float(rng.uniform(0, max(img.shape[-1] - p / s, 0)))
        half_src = (ks // 2) / s
        box = (y - half_src, x - half_src, side / s)
        sharp = _window(img, *box, out=side)
        norm = self._norm_window(img, y + p / (2 * s), x + p / (2 * s), s, self.pooled[k])
        kernel = self._channel_nodes(draw)
        # Per-object depth (grey only) blurs with up to 4 levels; otherwise they repeat the kernel
        # (no node drawn at a colour image's unused draw wavelength).
        levels = np.full(DEPTH_LEVELS, kernel[0], dtype=np.int64)
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
            "kernel": kernel,
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
        for c, length in ((cy / q, small_img.shape[-2]), (cx / q, small_img.shape[-1])):
            extent = min(length, max(1, round(self.context / (s * q))))
            starts.append(int(min(max(round(c - extent / 2), 0), length - extent)))
            shape.append(extent)
        crop = small_img[..., starts[0] : starts[0] + shape[0], starts[1] : starts[1] + shape[1]]
        out_shape = tuple(min(n, max(1, round(e * s * q / self.coarse))) for e in shape)
        small = _resize_linear(crop, out_shape)
        if small.shape[-2:] != (n, n):
            pads = [(0, 0)] * (small.ndim - 2) + [(0, n - small.shape[-2]), (0, n - small.shape[-1])]
            small = np.pad(small, pads, mode="symmetric")
        return small

    def pair(self, index: int, device: str = "cpu") -> dict:
        """``{"inp", "gt"}`` (C, P, P) for one sample (C = 1 for grey), synthesised on ``device``."""
        import torch

        batch = collate([self[index]])
        out = materialise(batch, torch.device(device))
        return {"inp": out["inp"][0].cpu(), "gt": out["gt"][0].cpu()}

    def reference_item(self, index: int) -> dict:
        """The previous all-numpy pipeline for one sample (a fresh PSF per sample, FFT blur of a
        ``context`` window, noise, window percentiles): the "before" of the data benchmark."""
        from skimage.transform import resize

        if self.defocus.channels > 1:
            raise NotImplementedError("the reference (all-numpy) pipeline is single-channel")
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
    """The square ``img[..., y0 : y0 + side_src, x0 : x0 + side_src]`` (source pixels, may reach
    past the border, where it is mirrored) resampled to ``out x out``: bilinear with antialiasing,
    or nearest for label images. ``img``: (H, W) or (C, H, W)."""
    side = max(1, round(side_src))
    yi, xi = round(y0), round(x0)
    h, w = img.shape[-2:]
    crop = img[..., max(yi, 0) : max(min(yi + side, h), 0), max(xi, 0) : max(min(xi + side, w), 0)]
    pads = ((max(-yi, 0), max(yi + side - h, 0)), (max(-xi, 0), max(xi + side - w, 0)))
    if any(any(pad) for pad in pads):
        crop = np.pad(crop, [(0, 0)] * (crop.ndim - 2) + list(pads), mode="symmetric")
    if side == out:
        return crop
    if nearest:
        idx = np.minimum(((np.arange(out) + 0.5) * side / out).astype(np.int64), side - 1)
        return crop[..., idx[:, None], idx[None, :]]
    return _resize_linear(crop, (out, out))


def _block_mean(img: np.ndarray, q: int) -> np.ndarray:
    """Means of q x q blocks of the last two axes (the last partial blocks dropped), float32."""
    if q == 1:
        return np.asarray(img, dtype=np.float32)
    h, w = img.shape[-2] // q * q, img.shape[-1] // q * q
    if h == 0 or w == 0:
        return np.asarray(img, dtype=np.float32)
    lead = img.shape[:-2]
    return img[..., :h, :w].reshape(*lead, h // q, q, w // q, q).mean(axis=(-3, -1), dtype=np.float32)


def _resize_linear(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes, antialiased when shrinking by more than 1.5x:
    (h, w) -> ``shape`` or (C, h, w) -> (C, *shape), float32."""
    if tuple(img.shape[-2:]) == tuple(shape):
        return np.asarray(img, dtype=np.float32)
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    t = t.reshape(1, -1, *t.shape[-2:])
    # Antialiasing only for real shrinking: the training scales (0.75-1.25) alias negligibly.
    shrink = shape[0] * 1.5 < img.shape[-2] or shape[1] * 1.5 < img.shape[-1]
    out = F.interpolate(t, size=shape, mode="bilinear", antialias=shrink, align_corners=False)[0]
    return out.reshape(*img.shape[:-2], *shape).numpy()


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
    """A collated batch as ``{"inp", "gt"?}`` tensors (B, C, P, P) on ``device``, synthetic samples
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
    """Patches of unlabeled (blurry) images for EFCRex: ``{"inp": (C, P, P)}`` (C = ``channels``,
    1: RGB averaged to grey), each normalised by its whole image's percentile range (all channels
    together). Random flips/rotations; no scaling (the real blur's size in pixels is what the model
    must adapt to)."""

    def __init__(self, images: Sequence[np.ndarray], patch: PatchConfig, seed: int = 0, channels: int = 1) -> None:
        if not images:
            raise ValueError("no unlabeled images")
        self.images = [as_channels(im, channels, f"unlabeled image {i}") for i, im in enumerate(images)]
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
        y, x = _crop_box(img.shape[-2:], p, rng)
        patch = _crop_reflect(img, y, x, p)
        if self.patch.flips:
            (patch,) = _dihedral([patch], rng)
        lo, hi = self._ranges[k]
        return {"inp": _to_tensor(normalise(patch, lo, hi))}
