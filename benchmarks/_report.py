"""Table cells that several benchmarks print the same way."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def spread(values: Sequence[float], digits: int = 2) -> str:
    """``median [min-max]`` of repeated measurements, the cell of every alternating benchmark."""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def per_megapixel(seconds: Sequence[float], shape: Sequence[int]) -> list[float]:
    """Seconds per megapixel of runs over one plane of ``shape`` (..., H, W)."""
    megapixels = shape[-2] * shape[-1] / 1e6
    return [t / megapixels for t in seconds]
