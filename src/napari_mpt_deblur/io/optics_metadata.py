"""The microscope's optics as an image file's metadata states them (for ``mpt-deblur calibrate``).

:func:`read_optics_metadata` reads one file; :func:`optics_from_files` merges several and refuses
files that disagree. Both return ``{field: FoundValue}`` keyed by the field names of
:class:`napari_mpt_deblur.data.optics.Acquisition` -- ``na``, ``immersion_index``, ``wavelength_um``,
``pixel_um`` -- with each value in that field's units (um for lengths, refractive index for the
immersion) and a ``source`` saying which file and which metadata entry it came from, so the CLI can
report where every value it did not get on the command line came from.

What is read (a field is absent when the file does not state it; nothing is guessed):

* OME-TIFF (OME-XML in the first ImageDescription), of the first ``Image``:
  ``Pixels@PhysicalSizeX`` (+ ``PhysicalSizeXUnit``, default um) -> ``pixel_um`` (X is used when
  X and Y differ by more than 1 %, and the source says so); the objective referenced by the image's
  ``ObjectiveSettings@ID`` (else the first objective of its instrument): ``Objective@LensNA`` ->
  ``na``, ``ObjectiveSettings@RefractiveIndex`` -> ``immersion_index``, or failing that
  ``Objective@Immersion`` (Oil, Water, Glycerol, Air... via ``IMMERSION_INDEX``; Multi/Other are
  skipped); the first ``Channel@EmissionWavelength`` (+ unit, default nm) -> ``wavelength_um``.
* ImageJ TIFF: ``unit`` (micron, um, nm, mm...) of the ImageJ description and the first page's
  XResolution (pixels per unit) -> ``pixel_um`` (fills fields an OME block did not state).
* OME-Zarr 0.4 / 0.5 (attributes at the top level or under ``"ome"``): the ``x`` axis of
  ``multiscales[0]`` with a length ``unit`` and the first dataset's ``scale`` for that axis
  (times a multiscales-level ``scale``) -> ``pixel_um``. OME-Zarr states no NA or wavelength.

A plain TIFF's XResolution with ResolutionUnit inch or centimetre is NOT used: it is a print or
scanner resolution (often the 72 dpi default), not the pixel size in the sample plane.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.optics import IMMERSION_INDEX
from .images import TIFF_SUFFIXES, _ome_attrs, is_zarr_path, open_checked_tiff

#: Two files "disagree" on a field when their values differ by more than this fraction.
AGREEMENT_TOLERANCE = 0.01

#: Micrometres per unit, for OME (UnitsLength symbols), ImageJ (``unit=``) and OME-Zarr (UDUNITS
#: names) length units. Units not listed (pixel, reference frame, inch...) are not used.
_UM_PER_UNIT = {
    "m": 1e6, "meter": 1e6, "cm": 1e4, "centimeter": 1e4, "mm": 1e3, "millimeter": 1e3,
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "\\u00b5m": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "pm": 1e-6, "picometer": 1e-6, "å": 1e-4, "angstrom": 1e-4,
}

#: OME ``Immersion`` names that are not in IMMERSION_INDEX but name one of its media.
_IMMERSION_ALIASES = {"waterdipping": "water"}

FIELDS = ("na", "immersion_index", "wavelength_um", "pixel_um")


@dataclass(frozen=True)
class FoundValue:
    """One optics value read from a file: ``value`` in the units of the Acquisition field (um for
    lengths, refractive index for the immersion) and ``source``, e.g.
    ``"OME-TIFF metadata of cells.ome.tif (Objective LensNA)"``."""

    value: float
    source: str


def read_optics_metadata(path: str | os.PathLike) -> dict[str, FoundValue]:
    """Optics found in a file's metadata, keyed by the field names of
    :class:`~napari_mpt_deblur.data.optics.Acquisition`: ``na``, ``immersion_index``,
    ``wavelength_um``, ``pixel_um``. Keys are absent when the file does not say.

    Returns ``{}`` for a readable image without metadata. A missing file raises FileNotFoundError,
    an unsupported or unreadable one ValueError (``ImageReadError`` for a corrupt TIFF), as
    :func:`napari_mpt_deblur.io.images.read_image` does.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.suffix.lower() in TIFF_SUFFIXES:
        return _tiff_optics(path)
    if is_zarr_path(path):
        return _zarr_optics(path)
    raise ValueError(f"unsupported input {path}: expected a .tif/.tiff file or a zarr store")


def optics_from_files(paths: Sequence[str | os.PathLike]) -> dict[str, FoundValue]:
    """Optics stated by several files, merged: for each field the first file (in ``paths`` order)
    that states it wins. Every file is read, and if two files state a field with values that differ
    by more than 1 % a ValueError names both files and both values (their images were taken with
    different optics, and one calibration cannot fit both). Errors of unreadable files propagate
    (see :func:`read_optics_metadata`)."""
    found: dict[str, FoundValue] = {}
    first_path: dict[str, str] = {}
    for p in paths:
        for key, item in read_optics_metadata(p).items():
            if key not in found:
                found[key], first_path[key] = item, os.fspath(p)
                continue
            a, b = found[key].value, item.value
            if abs(a - b) > AGREEMENT_TOLERANCE * max(abs(a), abs(b)):
                raise ValueError(
                    f"the files disagree on {key}: {first_path[key]} says {a:g} ({found[key].source}) but "
                    f"{os.fspath(p)} says {b:g} ({item.source}); calibrate for one microscope at a time, or give "
                    f"the value on the command line"
                )
    return {k: found[k] for k in FIELDS if k in found}


# --------------------------------------------------------------------------------------------
# TIFF


def _tiff_optics(path: Path) -> dict[str, FoundValue]:
    # The same opening and checks as io.images.read_image, so a bad file fails with the same error.
    with open_checked_tiff(path) as tif:
        ome_xml = tif.ome_metadata if tif.is_ome else None
        ij = tif.imagej_metadata if tif.is_imagej else None
        page = tif.pages.first
        xres = page.tags.valueof("XResolution")
        yres = page.tags.valueof("YResolution")
    found: dict[str, FoundValue] = {}
    if ome_xml:
        found.update(_ome_xml_optics(ome_xml, f"OME-TIFF metadata of {path.name}"))
    if ij and "pixel_um" not in found:
        pixel = _imagej_pixel(ij, xres, yres, f"ImageJ metadata of {path.name}")
        if pixel is not None:
            found["pixel_um"] = pixel
    return found


def _local(tag: str) -> str:
    """Element name without its ``{namespace}`` (OME schemas change namespace every release)."""
    return tag.rsplit("}", 1)[-1]


def _children(elem: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in elem if _local(c.tag) == name]


def _attr(elem: ET.Element | None, name: str) -> str | None:
    if elem is None:
        return None
    for key, value in elem.attrib.items():
        if _local(key) == name:
            return value
    return None


def _positive(text: str | None) -> float | None:
    """``float(text)`` when it is a finite positive number, else None (absent or nonsense)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _length_um(value_text: str | None, unit: str | None, default_unit: str) -> tuple[float, str] | None:
    """(value in um, "value unit" as the file wrote it), or None for no value or an unknown unit."""
    value = _positive(value_text)
    unit = (unit or default_unit).strip()
    factor = _UM_PER_UNIT.get(unit.lower())
    if value is None or factor is None:
        return None
    return value * factor, f"{value_text} {unit}"


def _ome_xml_optics(xml: str, origin: str) -> dict[str, FoundValue]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}  # unparsable OME-XML states nothing we can trust
    images = _children(root, "Image")
    if not images:
        return {}
    image = images[0]
    found: dict[str, FoundValue] = {}

    pixels = next(iter(_children(image, "Pixels")), None)
    if pixels is not None:
        x = _length_um(_attr(pixels, "PhysicalSizeX"), _attr(pixels, "PhysicalSizeXUnit"), "µm")
        y = _length_um(_attr(pixels, "PhysicalSizeY"), _attr(pixels, "PhysicalSizeYUnit"), "µm")
        if x is not None:
            note = f"Pixels PhysicalSizeX {x[1]}"
            if y is not None and abs(x[0] - y[0]) > AGREEMENT_TOLERANCE * max(x[0], y[0]):
                note += f"; PhysicalSizeY {y[1]} differs, X used"
            found["pixel_um"] = FoundValue(x[0], f"{origin} ({note})")
        for channel in _children(pixels, "Channel"):
            em = _length_um(_attr(channel, "EmissionWavelength"), _attr(channel, "EmissionWavelengthUnit"), "nm")
            if em is not None:
                found["wavelength_um"] = FoundValue(em[0], f"{origin} (Channel EmissionWavelength {em[1]})")
                break

    settings = next(iter(_children(image, "ObjectiveSettings")), None)
    objective = _ome_objective(root, image, _attr(settings, "ID"))
    na = _positive(_attr(objective, "LensNA"))
    if na is not None:
        found["na"] = FoundValue(na, f"{origin} (Objective LensNA)")
    index = _positive(_attr(settings, "RefractiveIndex"))
    if index is not None:
        found["immersion_index"] = FoundValue(index, f"{origin} (ObjectiveSettings RefractiveIndex)")
    else:
        name = (_attr(objective, "Immersion") or "").strip()
        medium = _IMMERSION_ALIASES.get(name.lower(), name.lower())
        if medium in IMMERSION_INDEX:
            found["immersion_index"] = FoundValue(IMMERSION_INDEX[medium], f"{origin} (Objective Immersion {name})")
    return found


def _ome_objective(root: ET.Element, image: ET.Element, objective_id: str | None) -> ET.Element | None:
    """The objective the image was taken with: the one its ObjectiveSettings reference, else the
    first objective of the instrument it references (else of the first instrument)."""
    instruments = _children(root, "Instrument")
    objectives = [o for inst in instruments for o in _children(inst, "Objective")]
    if objective_id is not None:
        for objective in objectives:
            if _attr(objective, "ID") == objective_id:
                return objective
    ref = _attr(next(iter(_children(image, "InstrumentRef")), None), "ID")
    for inst in instruments:
        if ref is None or _attr(inst, "ID") == ref:
            own = _children(inst, "Objective")
            if own:
                return own[0]
    return objectives[0] if objectives else None


def _rational(value: Any) -> float | None:
    """A TIFF RATIONAL tag value ``(numerator, denominator)`` as a float (None if unusable)."""
    try:
        num, den = value
        result = float(num) / float(den)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return result if math.isfinite(result) and result > 0 else None


def _imagej_pixel(ij: dict[str, Any], xres: Any, yres: Any, origin: str) -> FoundValue | None:
    """Pixel size from an ImageJ TIFF: XResolution is pixels per ``unit`` of the ImageJ description."""
    unit = str(ij.get("unit", "")).strip()
    factor = _UM_PER_UNIT.get(unit.lower())
    x_per_unit = _rational(xres)
    if factor is None or x_per_unit is None:
        return None  # no unit ("pixel") or no resolution: the file does not say
    pixel = factor / x_per_unit
    note = f"XResolution {x_per_unit:g} pixels per {unit}"
    y_per_unit = _rational(yres)
    if y_per_unit is not None and abs(x_per_unit - y_per_unit) > AGREEMENT_TOLERANCE * max(x_per_unit, y_per_unit):
        note += f"; YResolution {y_per_unit:g} differs, X used"
    return FoundValue(pixel, f"{origin} ({note})")


# --------------------------------------------------------------------------------------------
# OME-Zarr


def _zarr_optics(path: Path) -> dict[str, FoundValue]:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # the same message as io.images._read_zarr
        raise ValueError(f"{path}: not a readable zarr store ({exc})") from exc
    if not isinstance(node, zarr.Group):
        return {}  # a bare array has no OME-Zarr multiscales
    attrs = _ome_attrs(dict(node.attrs))
    version = attrs.get("version") or ""
    multiscales = attrs.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        return {}
    ms = multiscales[0]
    version = version or ms.get("version") or "0.4"
    axes = ms.get("axes") or []
    x_index = next((i for i, a in enumerate(axes) if isinstance(a, dict) and a.get("name") == "x"), None)
    if x_index is None:
        return {}  # NGFF <= 0.3 axes are bare names without units
    unit = str(axes[x_index].get("unit") or "")
    factor = _UM_PER_UNIT.get(unit.lower())
    datasets = ms.get("datasets") or []
    if factor is None or not datasets or not isinstance(datasets[0], dict):
        return {}
    scale = _scale_at(datasets[0].get("coordinateTransformations"), x_index, len(axes))
    if scale is None:
        return {}
    outer = _scale_at(ms.get("coordinateTransformations"), x_index, len(axes))
    note = f"multiscales x scale {scale:g} {unit}"
    if outer is not None:
        scale *= outer
        note += f" x {outer:g}"
    pixel = scale * factor
    if not (math.isfinite(pixel) and pixel > 0):
        return {}
    return {"pixel_um": FoundValue(pixel, f"OME-Zarr {version} metadata of {path.name} ({note})")}


def _scale_at(transforms: Any, index: int, ndim: int) -> float | None:
    """Entry ``index`` of the ``scale`` transformation in an OME-Zarr transformation list (None if absent)."""
    for t in transforms or []:
        if isinstance(t, dict) and t.get("type") == "scale":
            values = t.get("scale")
            if isinstance(values, list) and len(values) == ndim:
                try:
                    return float(values[index])
                except (TypeError, ValueError):
                    return None
    return None
