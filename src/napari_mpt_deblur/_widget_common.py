"""Helpers shared by the napari widgets: layer geometry, axes, model choices, notifications.

Only wiring lives here; every computation is a library call.
"""

from __future__ import annotations

import traceback
from typing import Any

import numpy as np
from psygnal import Signal

#: Axis names napari uses by default (``axis -1`` / ``0``) carry no meaning; letters do.
_AXIS_LETTERS = {"t": "T", "time": "T", "z": "Z", "y": "Y", "x": "X", "c": "C", "channel": "C", "s": "S"}


class _ModelEvents:
    """Emitted when a model is saved (e.g. by the fine-tune widget) so model lists refresh."""

    changed = Signal()


model_events = _ModelEvents()


def layer_data(layer) -> Any:
    """The full-resolution data of an image layer (level 0 of a multiscale layer), never copied."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def is_lazy(data: Any) -> bool:
    """True for dask/zarr/other array-likes that are not numpy (they stay lazy end to end)."""
    return not isinstance(data, np.ndarray)


def axes_for_layer(layer) -> str:
    """The axes string (e.g. ``"ZYX"``) of an image layer, from its axis labels when they are
    meaningful letters, otherwise from its dimensionality (2D -> YX, RGB -> YXC, 3D -> ZYX,
    4D -> TZYX, 5D -> TCZYX... a guess the user can override in the widget)."""
    data = layer_data(layer)
    ndim = len(data.shape)
    labels = [str(a).strip().lower() for a in (getattr(layer, "axis_labels", None) or ())]
    letters = [_AXIS_LETTERS.get(a) for a in labels]
    rgb = bool(getattr(layer, "rgb", False))
    spatial_ndim = ndim - 1 if rgb else ndim
    if len(letters) == spatial_ndim and all(letters) and len(set(letters)) == len(letters):
        axes = "".join(letters)
    else:
        guesses = {1: "X", 2: "YX", 3: "ZYX", 4: "TZYX", 5: "TCZYX"}
        if spatial_ndim not in guesses:
            raise ValueError(f"layer {layer.name!r} has {ndim} dimensions; set the axes explicitly")
        axes = guesses[spatial_ndim]
    return axes + ("C" if rgb else "")


def geometry_kwargs(layer) -> dict[str, Any]:
    """scale, translate, axis labels and units of ``layer``, to give an output layer the same
    place in the world as its input."""
    kwargs: dict[str, Any] = {
        "scale": tuple(layer.scale),
        "translate": tuple(layer.translate),
    }
    for name in ("axis_labels", "units"):
        value = getattr(layer, name, None)
        if value is not None:
            kwargs[name] = tuple(value)
    return kwargs


def model_choices() -> list[str]:
    """Installed model names, shipped ones first (see :func:`models.registry.list_models`)."""
    from .models.registry import list_models

    seen: list[str] = []
    for name, _path, _origin in list_models():
        if name not in seen:
            seen.append(name)
    return seen


def notify_error(exc: BaseException, context: str) -> None:
    """Show ``exc`` as a napari error notification (never raise into the event loop)."""
    from napari.utils.notifications import show_error

    message = f"{context}: {exc}" if str(exc) else f"{context}: {type(exc).__name__}"
    show_error(message)
    # Keep the traceback for bug reports, without a dialog.
    traceback.print_exception(type(exc), exc, exc.__traceback__)


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)
