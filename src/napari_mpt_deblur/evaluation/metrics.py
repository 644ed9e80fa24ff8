"""Full-reference image quality metrics (docs/benchmarks.md): PSNR and SSIM in float64.

Both compare images in the same units (normally [0, 1] after percentile normalisation) with a
fixed ``data_range``; nothing is clipped, so an output that overshoots is charged for it.
LPIPS is optional: only when the ``lpips`` package and its backbone weights are already on disk
(:func:`lpips_status`); no-reference sharpness measures are in ``evaluation.sharpness``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np


def _pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if p.shape != r.shape:
        raise ValueError(f"pred and ref shapes differ: {p.shape} vs {r.shape}")
    if p.size == 0:
        raise ValueError("cannot compare empty images")
    return p, r


def psnr(pred: np.ndarray, ref: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range^2 / MSE)``; inf for identical images."""
    p, r = _pair(pred, ref)
    mse = float(np.mean((p - r) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def ssim(pred: np.ndarray, ref: np.ndarray, data_range: float = 1.0, channel_axis: int | None = None) -> float:
    """Structural similarity (scikit-image, 7x7 uniform window, float64) of 2D (or nD) images;
    with ``channel_axis`` (e.g. 0 for (C, H, W)) the mean of the per-channel SSIMs."""
    from skimage.metrics import structural_similarity

    p, r = _pair(pred, ref)
    return float(structural_similarity(p, r, data_range=data_range, channel_axis=channel_axis))


# --------------------------------------------------------------------------------------------
# LPIPS (optional): only with the `lpips` package AND its backbone weights already on disk.

#: torchvision backbone checkpoints that LPIPS needs, by network (file names in torch hub's cache).
LPIPS_BACKBONES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here (missing package or weights); the message says what is missing."""


def lpips_status(net: str = "alex") -> tuple[bool, str]:
    """``(available, reason)`` for LPIPS with backbone ``net``, checked without downloading anything.

    LPIPS needs the ``lpips`` package (which ships its small linear layers) and torchvision's
    ImageNet backbone weights in torch hub's cache (``torch.hub.get_dir()/checkpoints``). This
    package never downloads weights, so when they are absent LPIPS is "not available".
    """
    import importlib.util

    if net not in LPIPS_BACKBONES:
        return False, f"LPIPS network must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}"
    missing = [p for p in ("lpips", "torchvision") if importlib.util.find_spec(p) is None]
    if missing:
        return False, f"LPIPS not available: the package(s) {', '.join(missing)} are not installed (pip install lpips)"
    import torch

    ckpt = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONES[net]
    if not ckpt.is_file():
        return False, (f"LPIPS not available: the {net} backbone weights {ckpt} are not present locally "
                       "(napari-mpt-deblur does not download weights; put the file there to enable LPIPS)")
    return True, "available"


@lru_cache(maxsize=3)
def _lpips_model(net: str):
    import lpips as lpips_pkg

    return lpips_pkg.LPIPS(net=net, verbose=False).eval()


def lpips(pred: np.ndarray, ref: np.ndarray, net: str = "alex", data_range: float = 1.0) -> float:
    """LPIPS distance (lower is more similar) of two 2D grey images in [0, data_range].

    The grey image is repeated to 3 channels and scaled to [-1, 1] as LPIPS expects. Raises
    :class:`MetricUnavailable` when the package or its weights are not available locally.
    """
    ok, reason = lpips_status(net)
    if not ok:
        raise MetricUnavailable(reason)
    import torch

    p, r = _pair(pred, ref)
    if p.ndim != 2:
        raise ValueError(f"lpips expects 2D grey images, got shape {p.shape}")

    def to_tensor(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy((2.0 * a / data_range - 1.0).astype(np.float32))
        return t[None, None].expand(1, 3, *a.shape)

    with torch.inference_mode():
        return float(_lpips_model(net)(to_tensor(p), to_tensor(r)).item())
