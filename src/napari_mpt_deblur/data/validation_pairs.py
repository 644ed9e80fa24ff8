"""Fixed validation pairs: synthetic defocus of sharp images at the benchmark's settings, and
centre crops of any pairs (what ``validation.data`` of a training config and a calibration's
held-back crops become)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from .loaders import Pair, as_channels, reference_units
from .optics import Acquisition

#: ``stem@4um``: the name of a synthetic validation pair, which carries its defocus.
_DEFOCUS_SUFFIX = re.compile(r"@(-?\d+(?:\.\d+)?)um$")


def pair_name(stem: str, defocus_um: float) -> str:
    """The name of the synthetic validation pair of image ``stem`` at ``defocus_um``."""
    return f"{stem}@{defocus_um:g}um"


def pair_defocus_um(name: str | None) -> float | None:
    """The defocus (um) in a name made by :func:`pair_name`; None for any other name."""
    found = _DEFOCUS_SUFFIX.search(name or "")
    return None if found is None else float(found.group(1))


def synthetic_validation_pairs(sharp: Sequence[np.ndarray], names: Sequence[str], defocus_um: Sequence[float],
                               optics: Acquisition | None = None, psf_model: str = "scalar",
                               peak_photons: float | None = 1000.0, read_sigma_photons: float = 3.0,
                               crop: int | None = 256, seed: int = 0,
                               channel_wavelengths_um: Sequence[float] | None = None) -> list[Pair]:
    """Fixed validation pairs at each defocus (um) with ``optics`` (default: the benchmark's
    microscope, :data:`~napari_mpt_deblur.data.optics.BENCHMARK_OPTICS`; docs/benchmarks.md).

    Each sharp image is normalised to [0, 1] by its own percentiles, blurred with the full
    (automatically sized) PSF, made noisy with a seed per image and defocus (so every run
    validates on identical inputs) and then centre-cropped to ``crop`` if given.
    ``channel_wavelengths_um``: multi-channel (C, H, W) pairs, each channel blurred at its own
    wavelength (:func:`~napari_mpt_deblur.data.synthesis.synthesize_defocus`).
    """
    from .optics import BENCHMARK_OPTICS
    from .synthesis import synthesize_defocus

    optics = optics or BENCHMARK_OPTICS
    channels = len(channel_wavelengths_um) if channel_wavelengths_um else 1
    pairs = []
    for i, (img, name) in enumerate(zip(sharp, names)):
        gt = reference_units(as_channels(img, channels, name))[0]
        for j, dz in enumerate(defocus_um):
            params = optics.psf_params(dz, model=psf_model)
            rng = np.random.default_rng([seed, i, j])
            inp = synthesize_defocus(gt, params, peak_photons, read_sigma_photons, rng=rng,
                                     channel_wavelengths_um=channel_wavelengths_um)
            pairs.append(Pair(inp=inp, gt=gt, name=pair_name(name, dz)))
    # Blur the whole image, then crop: the crop's borders see real neighbours, not reflections.
    return crop_pairs(pairs, crop)


def crop_pairs(pairs: Sequence[Pair], crop: int | None) -> list[Pair]:
    """Centre crops of validation pairs (None: unchanged)."""
    if crop is None:
        return list(pairs)
    out = []
    for p in pairs:
        h, w = p.inp.shape[-2:]
        y0, x0 = max((h - crop) // 2, 0), max((w - crop) // 2, 0)
        out.append(Pair(inp=p.inp[..., y0 : y0 + crop, x0 : x0 + crop], gt=p.gt[..., y0 : y0 + crop, x0 : x0 + crop],
                        name=p.name))
    return out
