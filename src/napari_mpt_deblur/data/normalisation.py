"""Per-image percentile normalisation to [0, 1] and its inverse (docs/training.md).

The networks are trained on images scaled so that the ``low`` and ``high`` percentiles map to 0
and 1. Inference applies the same scaling and inverts it on the output, so intensities come back
in the input's units and, on request, its dtype.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class NormalisationConfig(BaseModel):
    """How images are scaled before they enter a model; saved with every model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["percentile"] = "percentile"
    low: float = Field(0.1, ge=0, le=100)
    high: float = Field(99.9, ge=0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> "NormalisationConfig":
        if self.low >= self.high:
            raise ValueError(f"normalisation: low percentile {self.low} must be below high {self.high}")
        return self


def percentile_range(image: np.ndarray, low: float = 0.1, high: float = 99.9) -> tuple[float, float]:
    """The (low, high) percentiles of ``image`` as floats; ``hi > lo`` always.

    A constant image has no spread: the range is widened to ``(lo, lo + 1)`` so that
    normalisation maps it to a constant 0 and the inverse maps it back exactly.
    """
    arr = np.asarray(image)
    if arr.size == 0:
        raise ValueError("cannot normalise an empty image")
    lo, hi = np.percentile(arr, [low, high])
    lo, hi = float(lo), float(hi)
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("image contains NaN or Inf values")
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def normalise(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Scale so that ``lo`` -> 0 and ``hi`` -> 1, as float32 (no clipping)."""
    out = np.asarray(image, dtype=np.float32) - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return out


def denormalise(x: np.ndarray, lo: float, hi: float, dtype: np.dtype | type | None = None) -> np.ndarray:
    """Inverse of :func:`normalise`; with an integer ``dtype`` the result is rounded and clipped
    to that dtype's range, with a float ``dtype`` (or None, meaning float32) it is cast."""
    out = np.asarray(x, dtype=np.float32) * np.float32(hi - lo) + np.float32(lo)
    target = np.dtype(np.float32 if dtype is None else dtype)
    if np.issubdtype(target, np.integer):
        info = np.iinfo(target)
        return np.clip(np.rint(out), info.min, info.max).astype(target)
    return out.astype(target, copy=False)

