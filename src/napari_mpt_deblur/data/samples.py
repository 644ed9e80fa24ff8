"""Real images bundled with the package (provenance: ``sample_data/PROVENANCE.md``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"

DEFOCUSED_BBBC006 = SAMPLE_DIR / "bbbc006_defocused_z00_h01_s2_w1.tif"
IN_FOCUS_BBBC006 = SAMPLE_DIR / "bbbc006_in_focus_a04_s1_w1.tif"
U2OS_NUCLEI = SAMPLE_DIR / "u2os_nuclei_4d2cff9a0c8d.tif"
U2OS_NUCLEI_LABELS = SAMPLE_DIR / "u2os_nuclei_4d2cff9a0c8d_labels.tif"


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
