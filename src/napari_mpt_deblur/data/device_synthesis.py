"""Synthetic defocus for a whole batch at once, in torch, on the device that trains.

The data workers (:class:`~napari_mpt_deblur.data.datasets.SyntheticPatches`) only cut and
augment sharp crops and draw the optics; this module turns a batch of those into training pairs:

1. **Blur**: each sharp context window ``(P + K - 1)^2`` (the patch plus the kernel's support,
   with real image content around the patch, reflect-padded only past the image border) is
   convolved with its PSF from the :class:`~napari_mpt_deblur.data.psf_bank.PSFBank` by FFT; the
   valid ``P x P`` centre is exactly the blurred patch (the same numbers as
   :func:`~napari_mpt_deblur.data.synthesis.blur` on the same crop, see the tests). Samples with
   per-object depth blur with up to 4 kernels and composite them with feathered masks.
2. **Camera noise**: Poisson shot noise plus Gaussian read noise, per sample, from a generator
   seeded by the sample (so a sample is the same whatever the batch or worker).
3. **Normalisation** the way inference normalises a whole image: by the 0.1 / 99.9 percentiles of
   the blurred, noisy image around the patch. Percentiles need a wide view (a background-only patch
   must stay dark), so they are taken on a coarse copy of a wide window (``context`` px, default
   768, at ``coarse_factor`` px per coarse pixel) blurred by the PSF pooled to that grid, with
   per-pixel noise of the same statistics; ``tests/test_device_synthesis.py`` bounds its
   difference to the exact full-resolution percentiles.

Everything here is shape-stable and batched, so on a GPU a batch of 8 pairs at 256 px costs a few
milliseconds, and on one CPU core about 10 to 20 ms per pair (``benchmarks/bench_training.py --data``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .synthesis import DEPTH_LEVELS


def fft_blur_valid(windows: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each window with its kernels by FFT and keep the valid part.

    ``windows``: (B, 1, H, W) with ``kernels`` (B, L, K, K) (one window, L kernels), or
    (B, C, H, W) with (B, C, K, K) (each channel its own kernel) -> (B, L or C, H - K + 1,
    W - K + 1), i.e. ``scipy.signal.fftconvolve(window, kernel, mode="valid")`` for every pair.
    Computed in float32 (float64 windows stay float64).
    """
    b, _, h, w = windows.shape
    k = kernels.shape[-1]
    if h < k or w < k:
        raise ValueError(f"window {h}x{w} is smaller than the kernel {k}x{k}")
    spectrum = torch.fft.rfft2(windows, s=(h, w))
    kspec = torch.fft.rfft2(kernels.to(windows.dtype), s=(h, w))
    full = torch.fft.irfft2(spectrum * kspec, s=(h, w))
    # The circular result at (i, j) is the linear one for i >= K - 1: nothing wrapped around.
    return full[..., k - 1 :, k - 1 :]


#: Largest skewness error allowed for Gaussian shot noise. The camera's noise is shot plus read
#: noise; its skewness is ``lam / (lam + s^2)^1.5`` for ``lam`` photons and read noise ``s``, and a
#: Gaussian with the same mean and variance has none. Where that skewness is below this bound (the
#: value of pure Poisson noise at 10 photons) the Gaussian is used, elsewhere exact Poisson: exact
#: sampling costs ~180 ns per pixel on a CPU core, a Gaussian ~25 ns.
MAX_SKEWNESS_ERROR = 10 ** -0.5


def camera_noise(clean: torch.Tensor, peak: torch.Tensor, read: torch.Tensor,
                 generators: list[torch.Generator]) -> torch.Tensor:
    """Poisson-Gaussian noise per sample, in the input's units (1.0 = ``peak`` photons).

    ``clean``: (B, ...) >= 0 expected (negatives count as 0 photons); ``peak``, ``read``: (B,)
    photons; a sample with ``peak <= 0`` is returned unchanged (noise-free). Mean and variance
    are exact everywhere (variance ``x / peak + (read / peak)^2`` at intensity x, as in
    :func:`~napari_mpt_deblur.data.synthesis.add_camera_noise`); the shot noise is drawn from the
    Poisson distribution itself wherever its skewness still shows through the read noise (see
    :data:`MAX_SKEWNESS_ERROR`), from its Gaussian limit elsewhere.
    """
    rows = []
    for i, gen in enumerate(generators):
        p = float(peak[i])
        if p <= 0:
            rows.append(clean[i])
            continue
        r = float(read[i])
        counts = clean[i].clamp_min(0) * p
        noise = torch.randn(counts.shape, generator=gen, device=gen.device, dtype=counts.dtype)
        noisy = counts + counts.sqrt() * noise
        exact = counts > counts.new_tensor(0.0)
        exact &= counts > MAX_SKEWNESS_ERROR * (counts + r * r) ** 1.5
        if bool(exact.any()):
            noisy[exact] = _poisson(counts[exact], gen)
        zero = counts <= 0
        if bool(zero.any()):
            noisy[zero] = 0.0
        if r > 0:
            noisy = noisy + r * torch.randn(counts.shape, generator=gen, device=gen.device, dtype=counts.dtype)
        rows.append(noisy / p)
    return torch.stack(rows)


def _poisson(rates: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if rates.device.type == "mps":  # no Poisson sampler on MPS
        return torch.poisson(rates.cpu(), generator=gen).to(rates.device)
    return torch.poisson(rates, generator=gen)


def generators_for(seeds: torch.Tensor, device: torch.device) -> list[torch.Generator]:
    """One generator per sample seed; MPS samples its noise on the CPU."""
    dev = torch.device("cpu") if device.type == "mps" else device
    return [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds.tolist()]


def pool_kernels(kernels: torch.Tensor, factor: int) -> torch.Tensor:
    """Kernels on a grid ``factor`` times coarser: (..., K, K) -> (..., ceil(K/f), ceil(K/f)), sums kept."""
    if factor == 1:
        return kernels
    k = kernels.shape[-1]
    pad = (-k) % factor
    padded = F.pad(kernels.reshape(-1, 1, k, k), (0, pad, 0, pad))
    pooled = F.avg_pool2d(padded, factor)[:, 0] * factor * factor
    return pooled.reshape(*kernels.shape[:-2], *pooled.shape[-2:])


def gaussian_smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) per channel, reflect-padded, truncated at 4 sigma."""
    if sigma <= 0:
        return x
    radius = int(4 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    y = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def quantile_range(x: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (low, high) percentiles of (B, ...) with linear interpolation, as
    :func:`numpy.percentile`; a flat sample gets ``high = low + 1`` (like ``percentile_range``).

    Only the few order statistics needed are found (``topk``), not a full sort."""
    flat = x.flatten(1)
    n = flat.shape[1]
    lo = _order_statistic(flat, (n - 1) * low / 100.0)
    hi = _order_statistic(flat, (n - 1) * high / 100.0)
    hi = torch.where(hi > lo, hi, lo + 1.0)
    return lo, hi


def _order_statistic(flat: torch.Tensor, position: float) -> torch.Tensor:
    """Linearly interpolated value at fractional sorted ``position`` of each row."""
    n = flat.shape[1]
    below = int(math.floor(position))
    frac = position - below
    upper = min(below + 1, n - 1)
    if below < n // 2:  # the smallest values
        vals = torch.topk(flat, upper + 1, dim=1, largest=False).values  # ascending
        a, b = vals[:, below], vals[:, upper]
    else:
        vals = torch.topk(flat, n - below, dim=1).values  # descending: index n-1-i holds rank i
        a, b = vals[:, n - 1 - below], vals[:, n - 1 - upper]
    return a + (b - a) * frac


class BatchSynthesizer:
    """Turns collated synthetic samples into ``(inp, gt)`` pairs on a device.

    ``bank``: the :class:`~napari_mpt_deblur.data.psf_bank.PSFBank` the samples' kernel indices
    point into; ``low`` / ``high``: the normalisation percentiles; ``feather_px``: the mask
    feathering of per-object depth.
    """

    def __init__(self, bank, low: float = 0.1, high: float = 99.9, feather_px: float = 3.0) -> None:
        self.bank = bank
        self.low, self.high = low, high
        self.feather_px = feather_px

    def __call__(self, group: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``group`` (see ``SyntheticPatches``): sharp (B, Ch, S, S), norm (B, Ch, N, N), kernel
        (B, Ch) (a kernel per channel), levels (B, 4), level_map (B, S, S) int8, per_object (B,)
        bool (single-channel only), peak, read (B,), seed (B,), coarse (B,). Returns (inp, gt),
        each (B, Ch, P, P) float32 with P = S - K + 1, both normalised by one range per sample
        (all channels together, as inference normalises a plane)."""
        g = {k: v.to(device, non_blocking=True) for k, v in group.items()}
        nodes = torch.cat([g["kernel"].flatten(), g["levels"].flatten()]).cpu().numpy()
        bank = self.bank.on_device(device, nodes)
        sharp = g["sharp"].float()
        k = bank.shape[-1]
        half = k // 2
        per_object = g["per_object"]
        blurred = fft_blur_valid(sharp, bank[g["kernel"]])
        if bool(per_object.any()):
            idx = per_object.nonzero().flatten()
            blurred[idx] = self._depth_composite(sharp[idx], bank[g["levels"][idx]], g["level_map"][idx], half)
        gens = generators_for(g["seed"], device)
        noisy = camera_noise(blurred, g["peak"].float(), g["read"].float(), gens)
        lo, hi = self._range(g["norm"].float(), bank[g["kernel"]], int(g["coarse"][0]), g["peak"].float(),
                             g["read"].float(), gens)
        p = blurred.shape[-1]
        gt = sharp[..., half : half + p, half : half + p]
        scale = (1.0 / (hi - lo)).view(-1, 1, 1, 1)
        shift = lo.view(-1, 1, 1, 1)
        return (noisy - shift) * scale, (gt - shift) * scale

    def _depth_composite(self, sharp: torch.Tensor, kernels: torch.Tensor, level_map: torch.Tensor,
                         half: int) -> torch.Tensor:
        """Blur with each level's kernel and blend with feathered, normalised level masks."""
        blurs = fft_blur_valid(sharp, kernels)  # (n, L, P, P)
        masks = F.one_hot(level_map.long(), DEPTH_LEVELS).permute(0, 3, 1, 2).float()
        weights = gaussian_smooth(masks, self.feather_px)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
        p = blurs.shape[-1]
        weights = weights[..., half : half + p, half : half + p]
        return (weights * blurs).sum(dim=1, keepdim=True)

    def _range(self, coarse: torch.Tensor, kernels: torch.Tensor, factor: int, peak: torch.Tensor,
               read: torch.Tensor, gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalisation range from the coarse wide window, blurred and noisy like the patch."""
        small = pool_kernels(kernels, factor)
        kc = small.shape[-1]
        # Reflect padding keeps the valid blur the window's size (percentiles ignore the
        # half-pixel shift of an even pooled kernel).
        left, right = (kc - 1) // 2, kc // 2
        n = coarse.shape[-1]
        if max(left, right) >= n:
            padded = F.pad(coarse, (left, right, left, right), mode="replicate")
        else:
            padded = F.pad(coarse, (left, right, left, right), mode="reflect")
        blurred = fft_blur_valid(padded, small)
        noisy = camera_noise(blurred, peak, read, gens)
        return quantile_range(noisy, self.low, self.high)


def coarse_factor(context: int, coarse_side: int = 96) -> int:
    """Fine pixels per coarse pixel for a normalisation window of ``context`` px."""
    return max(1, math.ceil(context / coarse_side))
