"""Helpers shared by the napari widgets: layer geometry, axes, model choices, notifications,
the training-loss plot.

Only wiring lives here; every computation is a library call.
"""

from __future__ import annotations

import atexit
import os
import shutil
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


_REMOVE_AT_EXIT: list[str | os.PathLike] = []


def remove_at_exit(folder: str | os.PathLike) -> None:
    """Delete ``folder`` when napari exits: the widgets' temporary stores and unsaved calibration
    checkpoints (MBs each) must not pile up in the temp or user cache folder."""
    _REMOVE_AT_EXIT.append(folder)


@atexit.register
def _remove_folders() -> None:
    for folder in _REMOVE_AT_EXIT:
        shutil.rmtree(folder, ignore_errors=True)


def model_choices() -> list[str]:
    """Installed model names, shipped ones first: the names of :func:`models.registry.list_models`,
    found without importing torch (the registry imports it, ~3-20 s on a small machine) so that a
    widget appears at once; tests check both lists agree."""
    import os
    from pathlib import Path

    from .models import RECOMMENDED_MODEL

    def records(folder: Path) -> list[str]:
        if not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob("*.json") if p.with_suffix(".safetensors").is_file())

    shipped = sorted(records(Path(__file__).parent / "models" / "weights"), key=lambda n: n != RECOMMENDED_MODEL)
    user_dir = os.environ.get("MPT_DEBLUR_MODELS_DIR")
    if not user_dir:
        from platformdirs import user_data_dir

        user_dir = str(Path(user_data_dir("napari-mpt-deblur")) / "models")
    seen: list[str] = []
    for name in shipped + records(Path(user_dir)):
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


def status_line(label) -> None:
    """Make a magicgui ``Label`` a status line that wraps, never widens its dock, and never grows
    past three lines.

    A long status (a StarDist model path, an error) used to set the dock's minimum width and
    push buttons, table and plot off-screen (issue 13). The label ignores its text's width for
    layout, wraps at spaces, and shows the full text as its tooltip.
    """
    from qtpy.QtWidgets import QSizePolicy

    native = label.native
    native.setWordWrap(True)
    native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    native.setMinimumWidth(1)
    # At most three lines: a longer message would push the buttons and plot below it off the
    # dock; the full text is in the tooltip.
    native.setMaximumHeight(3 * native.fontMetrics().lineSpacing() + 4)
    # magicgui sets a Label's text through QLabel.setText (a Label emits no "changed"): keep the
    # tooltip in step there.
    set_text = native.setText

    def set_text_and_tooltip(text: str) -> None:
        set_text(text)
        native.setToolTip(text)

    native.setText = set_text_and_tooltip


def keep_labels_readable(container) -> None:
    """Re-size a container's row labels to their real text width whenever its style or font
    changes (magicgui measures them with the application font before napari's stylesheet makes
    them larger, which cut "unlabeled (blurry) layers")."""
    from qtpy.QtCore import QEvent, QObject
    from qtpy.QtWidgets import QLabel

    names = {w.label for w in container if getattr(w, "label", "")}

    def fit() -> None:
        labels = [lab for lab in container.native.findChildren(QLabel) if lab.text() in names]
        if labels:
            widest = max(lab.sizeHint().width() for lab in labels)
            for lab in labels:
                lab.setMinimumWidth(widest)

    class _Fitter(QObject):
        def eventFilter(self, obj, event):  # noqa: N802 (Qt's name)
            if event.type() in (QEvent.Type.Show, QEvent.Type.StyleChange, QEvent.Type.FontChange,
                                QEvent.Type.Polish):
                fit()
            return False

    fitter = _Fitter(container.native)
    container.native.installEventFilter(fitter)
    fit()


def image_layer_names(viewer) -> list[str]:
    """The names of the viewer's image layers, in layer-list order (a layer-choice list's choices)."""
    from napari.layers import Image

    return [layer.name for layer in viewer.layers if isinstance(layer, Image)]


def start_training_worker(widget, function, *args, on_yielded) -> Any:
    """Run a training generator ``function(*args)`` (a record per step) in a napari worker for the
    fine-tune or calibrate dock, and return the started worker.

    Records go to ``on_yielded``, an error to ``widget._on_error`` and the end to
    ``widget._on_finished``, all on the GUI thread; while it runs ``widget.worker`` is the worker,
    Start and Save are greyed out and Stop is enabled.
    """
    from napari.qt.threading import create_worker

    # Passing "errored" here stops napari from re-raising worker errors into the event loop.
    worker = create_worker(function, *args, _start_thread=False, _connect={"errored": widget._on_error})
    worker.yielded.connect(on_yielded)
    worker.finished.connect(widget._on_finished)
    widget.start_button.enabled = False
    widget.stop_button.enabled = True
    widget.save_button.enabled = False
    widget.worker = worker
    worker.start()
    return worker


def save_trained_model(widget, save) -> Any:
    """Save a training dock's model: call ``save()`` (which writes it and returns its path). On an
    error the dock's status and a notification say why and None is returned (nothing else
    changes); on success every model list refreshes (:data:`model_events`) and the path is returned."""
    try:
        path = save()
    except Exception as exc:
        widget.status.value = f"error: {exc}"
        notify_error(exc, "Save model")
        return None
    model_events.changed.emit()
    return path


class LossPlot:
    """The live training-loss plot of the fine-tune and calibrate docks: a matplotlib canvas at the
    bottom of ``container`` that follows napari's theme (dark/light/system) instead of matplotlib's
    white box. Before the first step it shows no axes (an empty 0-1 frame means nothing), only
    ``placeholder``, which says what will appear there.

    height: the figure's height in inches (at 90 dpi, 4 in wide); min_height: the canvas's minimum
    height in screen pixels.
    """

    def __init__(self, container, viewer, placeholder: str, height: float, min_height: int) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self._viewer = viewer
        self.figure = Figure(figsize=(4, height), dpi=90, tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(min_height)
        ax = self.figure.add_subplot(111)
        (self.line,) = ax.plot([], [], color="tab:orange")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_axis_off()
        self.placeholder = ax.text(0.5, 0.5, placeholder, ha="center", va="center", transform=ax.transAxes)
        container.native.layout().addWidget(self.canvas)
        self._apply_theme()
        viewer.events.theme.connect(self._on_theme)

    def show(self, losses: list[float]) -> None:
        """Plot ``losses``, one per step from step 1; the axes appear with the first one."""
        self.line.set_data(list(range(1, len(losses) + 1)), losses)
        ax = self.line.axes
        if not ax.axison:
            ax.set_axis_on()
            self.placeholder.set_visible(False)
        ax.relim()
        ax.autoscale_view()
        self.canvas.draw_idle()

    def clear(self) -> None:
        """Remove the curve (a new run starts)."""
        self.line.set_data([], [])
        self.canvas.draw_idle()

    def _apply_theme(self) -> None:
        from napari.utils.theme import get_theme

        theme = get_theme(self._viewer.theme)
        background, text, foreground = (getattr(theme, k).as_hex() for k in ("background", "text", "foreground"))
        ax = self.line.axes
        self.figure.set_facecolor(background)
        ax.set_facecolor(background)
        for spine in ax.spines.values():
            spine.set_color(foreground)
        ax.tick_params(colors=text, which="both")
        ax.xaxis.label.set_color(text)
        ax.yaxis.label.set_color(text)
        self.placeholder.set_color(text)

    def _on_theme(self, _event=None) -> None:
        try:
            self._apply_theme()
            self.canvas.draw_idle()
        except RuntimeError:  # the Qt canvas is gone (viewer closed): stop following
            self._viewer.events.theme.disconnect(self._on_theme)


def rgb_display_kwargs(data: Any) -> dict[str, Any]:
    """``contrast_limits`` for a float RGB(A) output layer: its 0.1 / 99.9 percentiles (on at most
    ~1 M values), so a restoration in the input's units (e.g. 0-255) is not shown saturated."""
    if not np.issubdtype(np.dtype(data.dtype), np.floating):
        return {}
    flat = np.asarray(data[..., :3]).ravel() if isinstance(data, np.ndarray) else None
    if flat is None or flat.size == 0:
        return {}
    flat = flat[:: max(1, flat.size // 1_000_000)]
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return {}
    lo, hi = (float(v) for v in np.percentile(flat, (0.1, 99.9)))
    return {"contrast_limits": (lo, hi if hi > lo else lo + 1.0)}


def scale_rgb_thumbnail(layer) -> None:
    """Draw a float RGB layer's thumbnail through its contrast limits, as the canvas does.

    napari (0.9) builds an RGB thumbnail from the raw values, so any float RGB layer with values
    above 1 gets a white thumbnail whatever its contrast limits (issue 13). This replaces the
    layer's thumbnail update with one that scales by the contrast limits; other layers untouched.
    """
    if not (getattr(layer, "rgb", False) and np.issubdtype(np.dtype(layer.dtype), np.floating)):
        return
    # Plugins get napari's public-only proxies; the thumbnail hook lives on the layer itself.
    layer = getattr(layer, "__wrapped__", layer)
    original = layer._update_thumbnail

    def update(*args, **kwargs):
        try:
            image = np.asarray(layer._slice.thumbnail.raw, dtype=np.float32)
        except Exception:  # napari internals changed: keep napari's own thumbnail
            return original(*args, **kwargs)
        if image.ndim == 4:  # 3D display: max projection, as napari does
            image = image.max(axis=0)
        if image.ndim != 3 or 0 in image.shape:
            return original(*args, **kwargs)
        step = max(1, int(np.ceil(max(image.shape[0], image.shape[1]) / max(layer._thumbnail_shape[:2]))))
        small = image[::step, ::step]
        lo, hi = layer.contrast_limits
        rgb = np.clip((small[..., :3] - lo) / ((hi - lo) or 1.0), 0, 1)
        alpha = small[..., 3:4].clip(0, 1) if small.shape[-1] == 4 else np.ones(rgb.shape[:2] + (1,), np.float32)
        layer.thumbnail = (np.concatenate([rgb, alpha * layer.opacity], axis=2) * 255).astype(np.uint8)

    layer._update_thumbnail = update
    layer.events.contrast_limits.connect(lambda _event: update())
    update()
