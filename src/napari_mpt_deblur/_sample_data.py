"""napari sample-data hooks: wrap :mod:`napari_mpt_deblur.data.samples` as layer data tuples."""

from __future__ import annotations

from .data import samples

_SOURCE = {"source": "see napari_mpt_deblur/sample_data/PROVENANCE.md"}
#: Every sample in micrometres, so opening several never mixes units in one viewer. BBBC006:
#: 20x objective, 0.645 um pixels (docs/benchmarks.md); the 520x696 U2OS images of BBBC038 come from
#: the same kind of acquisition and are treated as 0.645 um pixels throughout this project (the
#: synthetic stack is made at that size); BBBC038 itself publishes no per-image pixel size.
PIXEL_UM = 0.645
_GEOMETRY_2D = {"scale": (PIXEL_UM, PIXEL_UM), "units": ("um", "um"), "axis_labels": ("y", "x")}


def defocused_bbbc006():
    meta = {"name": "defocused BBBC006 z00", "metadata": dict(_SOURCE), **_GEOMETRY_2D}
    return [(samples.defocused_bbbc006(), meta, "image")]


def in_focus_bbbc006():
    return [(samples.in_focus_bbbc006(), {"name": "in-focus BBBC006", "metadata": dict(_SOURCE), **_GEOMETRY_2D},
             "image")]


def u2os_nuclei_with_labels():
    image, labels = samples.u2os_nuclei()
    return [
        (image, {"name": "U2OS nuclei", "metadata": dict(_SOURCE), **_GEOMETRY_2D}, "image"),
        (labels, {"name": "U2OS nuclei labels", "metadata": dict(_SOURCE), **_GEOMETRY_2D}, "labels"),
    ]


def synthetic_defocus_stack():
    stack = samples.synthetic_defocus_stack()
    spacing = samples.SYNTHETIC_STACK_DEFOCUS_UM[1] - samples.SYNTHETIC_STACK_DEFOCUS_UM[0]
    from .data.optics import BENCHMARK_OPTICS

    meta = {**_SOURCE, "defocus_um": list(samples.SYNTHETIC_STACK_DEFOCUS_UM),
            "psf": "scalar, 20x/0.45 NA air, 0.461 um emission, 0.645 um pixels; noise: 1000 photons peak, read 3",
            # Read by the Calibrate widget (field names and units of data.optics.Acquisition).
            "optics": BENCHMARK_OPTICS.model_dump()}  # the optics the stack is made with
    return [(stack, {"name": "synthetic defocus z-stack (U2OS)", "metadata": meta, "scale": (spacing, PIXEL_UM, PIXEL_UM),
                     "axis_labels": ("z", "y", "x"), "units": ("um", "um", "um")}, "image")]


def defocused_tissue_rgb():
    from .data.optics import RGB_WAVELENGTHS_UM
    from .models import RGB_MODEL

    meta = {**_SOURCE, "defocus_um": samples.TISSUE_RGB_DEFOCUS_UM,
            "psf": "scalar, 20x/0.45 NA air, per channel at " + ", ".join(f"{w:g}" for w in RGB_WAVELENGTHS_UM)
                   + " um (R, G, B), 0.645 um pixels; noise: 1000 photons peak, read 3",
            "deblur_with": RGB_MODEL}
    layer = {"name": "stained tissue (RGB), 6 um defocus", "metadata": meta, "rgb": True, **_GEOMETRY_2D}
    return [(samples.defocused_tissue_rgb(), layer, "image")]
