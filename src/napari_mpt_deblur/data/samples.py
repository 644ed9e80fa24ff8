"""Real images bundled with the package (provenance: ``sample_data/PROVENANCE.md``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"

DEFOCUSED_BBBC006 = SAMPLE_DIR / "bbbc006_defocused_z00_h01_s2_w1.tif"
IN_FOCUS_BBBC006 = SAMPLE_DIR / "bbbc006_in_focus_a04_s1_w1.tif"
U2OS_NUCLEI = SAMPLE_DIR / "u2os_nuclei_4d2cff9a0c8d.tif"
U2OS_NUCLEI_LABELS = SAMPLE_DIR / "u2os_nuclei_4d2cff9a0c8d_labels.tif"
TISSUE_RGB = SAMPLE_DIR / "histology_rgb_2dd3356f2dcf.tif"


def _read(path: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(path)


def defocused_bbbc006() -> np.ndarray:
    """Real BBBC006 w1 (Hoechst) plane z_00, ~32 um below focus: (520, 696) uint16, LZW TIFF."""
    return _read(DEFOCUSED_BBBC006)


def in_focus_bbbc006() -> np.ndarray:
    """Real in-focus BBBC006 w1 image (another field of view): (520, 696) uint16."""
    return _read(IN_FOCUS_BBBC006)


def u2os_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """In-focus U2OS nuclei (BBBC038) and its instance labels: (520, 696) uint8 and uint16."""
    return _read(U2OS_NUCLEI), _read(U2OS_NUCLEI_LABELS)


#: Focal positions (um) of the synthetic stack's planes; 0 is in focus.
SYNTHETIC_STACK_DEFOCUS_UM = (-12.0, -8.0, -4.0, 0.0, 4.0, 8.0, 12.0)


def synthetic_defocus_stack(defocus_um: tuple[float, ...] = SYNTHETIC_STACK_DEFOCUS_UM, seed: int = 0) -> np.ndarray:
    """A widefield focus series of the bundled U2OS image: (Z, 520, 696) float32 in [0, ~1].

    Each plane is the real in-focus image (scaled by its 0.1/99.9 percentiles) blurred with the
    scalar PSF of a 20x/0.45 NA air objective at that defocus (emission 0.461 um, 0.645 um
    pixels, docs/benchmarks.md) plus Poisson-Gaussian camera noise (peak 1000 photons, read noise 3),
    seeded, so the stack is the same every time. Plane spacing: 4 um.
    """
    from .normalisation import normalise, percentile_range
    from .optics import BENCHMARK_OPTICS
    from .synthesis import synthesize_defocus

    image, _ = u2os_nuclei()
    sharp = normalise(image, *percentile_range(image))
    rng = np.random.default_rng(seed)
    planes = [synthesize_defocus(sharp, BENCHMARK_OPTICS.psf_params(dz), rng=rng) for dz in defocus_um]
    return np.stack(planes).astype(np.float32)


def tissue_rgb() -> np.ndarray:
    """In-focus stained tissue section (BBBC038 histology, held-out test split): (256, 320, 3) uint8."""
    return _read(TISSUE_RGB)


#: Defocus (um) of the colour sample: 6 um at the benchmark's 20x/0.45 optics is a blur radius of
#: 4.7 px, clearly soft but well within what the colour model was trained on.
TISSUE_RGB_DEFOCUS_UM = 6.0


def defocused_tissue_rgb(defocus_um: float = TISSUE_RGB_DEFOCUS_UM, seed: int = 0) -> np.ndarray:
    """The bundled tissue section out of focus: (256, 320, 3) uint8, RGB.

    Brightfield seen through a 20x/0.45 NA air objective with 0.645 um pixels: each channel blurred
    by the scalar PSF at its own wavelength (red 0.61, green 0.53, blue 0.46 um;
    ``data.optics.RGB_WAVELENGTHS_UM``, incoherent imaging assumed), Poisson-Gaussian noise at 1000
    photons peak, seeded, on the image's own 0.1/99.9-percentile scale, then back to 8 bits.
    """
    from .normalisation import normalise, percentile_range
    from .optics import BENCHMARK_OPTICS, RGB_WAVELENGTHS_UM
    from .synthesis import synthesize_defocus

    image = np.moveaxis(tissue_rgb(), -1, 0).astype(np.float32)
    lo, hi = percentile_range(image)
    blurred = synthesize_defocus(normalise(image, lo, hi), BENCHMARK_OPTICS.psf_params(defocus_um),
                                  rng=np.random.default_rng(seed), channel_wavelengths_um=RGB_WAVELENGTHS_UM)
    values = blurred * (hi - lo) + lo
    return np.moveaxis(np.clip(np.rint(values), 0, 255).astype(np.uint8), 0, -1)
