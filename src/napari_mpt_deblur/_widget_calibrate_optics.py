"""What the "Calibrate to my microscope" widget reads about the optics, without Qt.

The optics fields' names and "where it came from" texts, the look-up of what a napari layer says
about its optics (the file it was opened from, ``layer.metadata["optics"]``, its scale), and a
pydantic validation error as one line naming the widget's fields. Used by
:mod:`._widget_calibrate`; kept apart so that the dock module holds only the wiring.
"""

from __future__ import annotations

from pathlib import Path

#: The optics fields, by their :class:`~napari_mpt_deblur.data.optics.Acquisition` names, as the
#: widget names them in messages.
FIELD_NAMES = {"na": "NA", "immersion_index": "immersion", "wavelength_um": "emission wavelength",
               "pixel_um": "pixel size"}
NOT_KNOWN = "not known: please enter"
IMMERSION_UNKNOWN = f"{NOT_KNOWN} (air shown)"
#: As the CLI does: a dry objective when nothing states the immersion and the NA allows it.
AIR_ASSUMED = "assumed: air (NA below 1, no immersion stated)"
#: The immersion choice whose refractive index is typed in.
OTHER = "other"


def _layer_pixel_um(layer) -> tuple[float, str] | None:
    """The layer's x pixel size in um and how it was found, when its units are a length (napari's
    default unit, ``pixel``, says nothing about the sample)."""
    units = getattr(layer, "units", None)
    if not units:
        return None
    scale = float(layer.scale[-1])
    try:
        import pint

        unit = units[-1]
        if isinstance(unit, str):
            unit = pint.get_application_registry().Unit(unit)
        if unit.dimensionality != pint.get_application_registry().Unit("um").dimensionality:
            return None
        pixel = float(pint.Quantity(scale, unit).to("micrometer").magnitude)
    except Exception:  # noqa: BLE001 - an unknown unit object: not a pixel size we can use
        return None
    if not pixel > 0:
        return None
    note = f"{scale:g} {unit:~}" if str(unit) != "micrometer" else f"{scale:g} um"
    if len(layer.scale) >= 2 and abs(float(layer.scale[-2]) - scale) > 0.01 * scale:
        note += f"; y is {float(layer.scale[-2]):g}, x used"
    return pixel, f"scale of layer {layer.name!r} ({note})"


def optics_from_layer(layer) -> dict[str, tuple[float, str]]:
    """What ``layer`` says about the optics: ``{field: (value, where it came from)}``, fields named
    as in :class:`~napari_mpt_deblur.data.optics.Acquisition` (lengths in um).

    Looked up, later ones winning: the metadata of the file the layer was opened from (OME-TIFF,
    OME-Zarr, ImageJ TIFF; :func:`~napari_mpt_deblur.io.optics_metadata.read_optics_metadata`),
    ``layer.metadata["optics"]`` (a dict with those field names, as this plugin's samples carry),
    and the layer's scale when its units are a length (what napari shows is what the user set).
    """
    found: dict[str, tuple[float, str]] = {}
    path = getattr(getattr(layer, "source", None), "path", None)
    if path and Path(path).exists():
        try:
            from .io.optics_metadata import read_optics_metadata

            found.update({k: (v.value, v.source) for k, v in read_optics_metadata(path).items()})
        except Exception:  # noqa: BLE001 - unreadable metadata: the other sources (or the user) fill in
            pass
    stated = (getattr(layer, "metadata", None) or {}).get("optics")
    if isinstance(stated, dict):
        for key in FIELD_NAMES:
            value = stated.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                found[key] = (float(value), f"metadata of layer {layer.name!r}")
    pixel = _layer_pixel_um(layer)
    if pixel is not None:
        found["pixel_um"] = pixel
    return found


def _clean_error(exc: Exception) -> str:
    """A pydantic validation error as one readable line naming the widget's fields."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    parts = []
    for err in exc.errors():
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        loc = [str(p) for p in err.get("loc", ()) if str(p) not in ("optics",)]
        field = FIELD_NAMES.get(loc[-1], loc[-1].replace("_", " ")) if loc else ""
        parts.append(f"{field}: {msg}" if field else msg)
    return "; ".join(parts)
