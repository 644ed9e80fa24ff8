"""napari sample-data hooks: wrap :mod:`napari_mpt_deblur.data.samples` as layer data tuples."""

from __future__ import annotations

from .data import samples

_SOURCE = {"source": "see napari_mpt_deblur/sample_data/PROVENANCE.md"}


def defocused_bbbc006():
    return [(samples.defocused_bbbc006(), {"name": "defocused BBBC006 z00", "metadata": dict(_SOURCE)}, "image")]


def in_focus_bbbc006():
    return [(samples.in_focus_bbbc006(), {"name": "in-focus BBBC006", "metadata": dict(_SOURCE)}, "image")]


def u2os_nuclei_with_labels():
    image, labels = samples.u2os_nuclei()
    return [
        (image, {"name": "U2OS nuclei", "metadata": dict(_SOURCE)}, "image"),
        (labels, {"name": "U2OS nuclei labels", "metadata": dict(_SOURCE)}, "labels"),
    ]


def synthetic_defocus_stack():
    stack = samples.synthetic_defocus_stack()
    spacing = samples.SYNTHETIC_STACK_DEFOCUS_UM[1] - samples.SYNTHETIC_STACK_DEFOCUS_UM[0]
    meta = {**_SOURCE, "defocus_um": list(samples.SYNTHETIC_STACK_DEFOCUS_UM),
            "psf": "scalar, 20x/0.45 NA air, 0.461 um emission, 0.645 um pixels; noise: 1000 photons peak, read 3"}
    return [(stack, {"name": "synthetic defocus z-stack (U2OS)", "metadata": meta, "scale": (spacing, 0.645, 0.645),
                     "axis_labels": ("z", "y", "x"), "units": ("um", "um", "um")}, "image")]
