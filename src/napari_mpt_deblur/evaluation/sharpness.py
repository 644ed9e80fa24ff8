"""No-reference sharpness measures for images without ground truth (docs/benchmarks.md).

All take a 2D array, scale it to [0, 1] by its own 0.1/99.9 percentiles first (so the numbers
do not depend on the camera's gain or dtype) and return a float where larger means sharper.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..data.normalisation import normalise, percentile_range


def _unit(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"sharpness measures need a 2D image, got shape {arr.shape}")
    return normalise(arr, *percentile_range(arr)).astype(np.float64)


def normalized_laplacian_variance(image: np.ndarray, sigma: float = 1.0) -> float:
    """Variance of the Laplacian of Gaussian (sigma in pixels) divided by the mean intensity.

    The Gaussian pre-filter keeps camera noise from dominating (docs/training.md).
    """
    x = _unit(image)
    lap = ndimage.gaussian_laplace(x, sigma=sigma, mode="reflect")
    mean = float(x.mean())
    return float(lap.var() / mean) if mean > 0 else 0.0


def brenner(image: np.ndarray) -> float:
    """Brenner gradient: mean squared difference between pixels two apart (both axes)."""
    x = _unit(image)
    return float(((x[:, 2:] - x[:, :-2]) ** 2).mean() + ((x[2:, :] - x[:-2, :]) ** 2).mean())


def vollath_f4(image: np.ndarray) -> float:
    """Vollath's F4 autocorrelation measure, averaged over pixels and both axes."""
    x = _unit(image)
    f_cols = (x[:, :-1] * x[:, 1:]).mean() - (x[:, :-2] * x[:, 2:]).mean()
    f_rows = (x[:-1, :] * x[1:, :]).mean() - (x[:-2, :] * x[2:, :]).mean()
    return float(f_cols + f_rows)


SHARPNESS_MEASURES = {
    "nvl": normalized_laplacian_variance,
    "brenner": brenner,
    "vollath_f4": vollath_f4,
}


def sharpness(image: np.ndarray) -> dict[str, float]:
    """All no-reference measures of one 2D image, by name."""
    return {name: fn(image) for name, fn in SHARPNESS_MEASURES.items()}
