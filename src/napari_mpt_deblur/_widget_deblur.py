"""napari widget: deblur an image layer (2D, z-stack, time series) with a chosen model.

The work runs in a ``thread_worker``; tile progress reaches the progress bar through a Qt signal
and Cancel stops the engine between tiles. In-memory layers are restored into a new in-memory
layer; dask/zarr-backed (lazy) layers, and any layer when "save to zarr" is on, are streamed
plane by plane into a zarr store that the new layer then reads lazily, so memory does not grow
with stack depth and the viewer never computes planes on its own thread.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, LineEdit, ProgressBar, PushButton, SpinBox
from qtpy.QtCore import QObject, Signal

from ._widget_common import (
    axes_for_layer,
    geometry_kwargs,
    is_lazy,
    layer_data,
    model_choices,
    model_events,
    notify_error,
    notify_info,
    remove_at_exit,
    rgb_display_kwargs,
    scale_rgb_thumbnail,
    status_line,
)

if TYPE_CHECKING:
    import napari

    from .inference.settings import InferenceSettings


class _ProgressRelay(QObject):
    """Carries (done, total) tile counts from the worker thread to the GUI thread (queued)."""

    progressed = Signal(int, int)


@dataclass
class DeblurRequest:
    """Everything the worker needs, gathered on the GUI thread."""

    layer_name: str
    data: Any
    axes: str
    model: str
    #: Checked against the model's size multiple on the GUI thread (``None`` fields: device defaults).
    settings: InferenceSettings
    zarr_path: Path | None
    geometry: dict[str, Any] = field(default_factory=dict)
    colormap: str | None = None


def _path_or_none(file_edit: FileEdit) -> Path | None:
    """The path typed or picked in ``file_edit``, None when empty (its ``value`` would be ``.``)."""
    text = file_edit.line_edit.value.strip()
    return Path(text).expanduser() if text else None


class _PreloadRelay(QObject):
    """Tells the GUI thread that the background preload finished (torch imported, model loaded)."""

    done = Signal()


def preload(model: str, torch_ready: threading.Event, tile_shape: tuple[int, int] = (512, 512), done=None,
            clicked: threading.Event | None = None) -> None:
    """Background work at widget creation, so the first click pays for none of it: import torch
    and the engine, tune the allocator, load ``model`` into the process-wide cache and run one
    tile of ``tile_shape`` through it (first-call allocations and kernel selection), unless
    ``clicked`` is already set (then the real run would only compete with the warm-up).
    Errors are ignored here: the click reports them with context.
    """
    try:
        from .inference.devices import tune_cpu_allocator

        tune_cpu_allocator()
        torch_ready.set()
        from .inference.compiled import warm_up
        from .inference.engine import Deblurrer, InferenceSettings

        # One pass: the flips and shifts share the tile's shape, so one pass warms up what they use.
        engine = Deblurrer(model, InferenceSettings(orientations=1, shifts=1))
        if clicked is None or not clicked.is_set():
            warm_up(engine, *tile_shape)
    except Exception:  # noqa: BLE001 - a preload must never raise into a thread
        pass
    finally:
        torch_ready.set()
        if done is not None:
            try:
                done()
            except RuntimeError:  # the widget was closed meanwhile
                pass


def device_choices(probe: bool = True) -> list[str]:
    """Devices to offer. ``probe=False``: ``auto`` and ``cpu`` only, without importing torch (the
    Deblur widget's first paint; its preload refreshes the list once torch is imported)."""
    if not probe:
        return ["auto", "cpu"]
    from .inference.devices import device_choices as library_device_choices  # imports torch

    return library_device_choices()


def run_deblur(request: DeblurRequest, cancel: threading.Event, progress=None) -> tuple[Any, dict[str, Any]]:
    """Worker body (no Qt): restore ``request.data``; return (output data, metadata)."""
    from .inference.drivers import Deblurrer
    from .io.images import read_image

    engine = Deblurrer(request.model, request.settings)
    if request.zarr_path is None:
        out = engine.deblur_array(request.data, request.axes, progress=progress, cancel=cancel)
        meta = engine.metadata()
        meta["axes"] = request.axes
        return out, meta
    engine.write_zarr(request.data, request.zarr_path, request.axes, progress=progress, cancel=cancel)
    source = read_image(request.zarr_path)
    meta = source.run_record.to_metadata()  # the layer carries the record the store carries
    meta["zarr_path"] = str(request.zarr_path)
    return source.data, meta


class DeblurWidget(Container):
    """Deblur: image layer + model + device + tiling -> a new, restored layer."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        from magicgui.widgets import create_widget
        from napari.layers import Image

        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.image = create_widget(annotation=Image, label="image")
        self.model = ComboBox(label="model", choices=lambda _w: model_choices() or ["(no models installed)"])
        # A bioimage.io package exported by mpt-deblur (.zip, or rdf.yaml of an unpacked one) loads too.
        self.model_file = FileEdit(label="or model file", mode="r",
                                   filter="*.json *.safetensors *.zip *.yaml", value="")
        self.model.changed.connect(self._on_model_changed)
        self.model_file.changed.connect(self._on_model_changed)
        self._torch_ready = threading.Event()
        self._clicked = threading.Event()  # set by run(): the preload then skips its warm-up pass
        self.device = ComboBox(label="device", choices=lambda _w: device_choices(probe=self._torch_ready.is_set()),
                               value="auto")
        self.tile = SpinBox(label="tile px (0 = auto)", min=0, max=8192, step=64, value=0)
        self.overlap = SpinBox(label="overlap px (-1 = auto)", min=-1, max=2048, step=8, value=-1)
        self.axes = LineEdit(label="axes (empty = from layer)", value="")
        self.output_dtype = ComboBox(label="output dtype", choices=["float32", "input"], value="float32")
        # Averaging flipped restorations removes a model's grid pattern (inference.orientations).
        # 0 stands for "the model's default" (InferenceSettings.orientations=None): a None choice
        # would read as "nothing selected" to the combo box.
        self.orientations = ComboBox(label="orientations", value=0, choices=[
            ("model default", 0), ("1 (fastest)", 1), ("4 flips (4x time)", 4), ("8 (8x time)", 8)])
        # Averaging one-pixel-shifted restorations removes a period-2 pattern flips leave (0 as above).
        self.shifts = ComboBox(label="pixel shifts", value=0, choices=[
            ("model default", 0), ("1 (fastest)", 1), ("2 (2x time)", 2)])
        # InferenceSettings.precision: bf16 is honoured on GPUs and on CPUs with AMX / AVX-512 BF16
        # (elsewhere the run warns and uses fp32); "auto" is exact fp32 on every CPU.
        self.precision = ComboBox(label="precision", value="auto", choices=[
            ("auto", "auto"), ("fp32 (exact)", "fp32"), ("bf16 (faster on GPUs, AMX CPUs)", "bf16")])
        self.save_zarr = CheckBox(text="save to zarr (big stacks)", value=False)
        self.zarr_path = FileEdit(label="zarr path", mode="w", value="")
        self.run_button = PushButton(text="Deblur")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="tiles", min=0, max=1, value=0)
        self.status = Label(value="")
        self.extend([
            self.image, self.model, self.model_file, self.device, self.tile, self.overlap, self.axes,
            self.output_dtype, self.orientations, self.shifts, self.precision, self.save_zarr, self.zarr_path, self.run_button,
            self.cancel_button, self.progress, self.status,
        ])
        status_line(self.status)
        self._relay = _ProgressRelay()
        self._relay.progressed.connect(self._on_progress)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        model_events.changed.connect(self._refresh_models)
        self._cancel_event = threading.Event()
        self.worker = None
        #: The layer the last successful run added (for scripts and tests).
        self.last_layer = None
        self._on_model_changed()
        self._start_preload()

    def _model_size_multiple(self, strict: bool = False) -> tuple[int, str] | None:
        """(size multiple, "model 'name' (arch/preset)") of the chosen model, from its JSON record
        (no weights loaded). When no model is chosen or its record cannot be read: None, or with
        ``strict`` the error saying why."""
        from .models.registry import read_record, resolve_model_path

        try:
            record = read_record(resolve_model_path(self._model_spec()))
        except Exception:  # noqa: BLE001 - a bad model is reported when the user clicks Deblur
            if strict:
                raise
            return None
        arch = record.architecture
        return arch.size_multiple, f"model {record.name!r} ({arch.arch}/{arch.preset})"

    def _on_model_changed(self, *_: Any) -> None:
        """The tile SpinBox steps by the chosen model's size multiple (the tiles it accepts). Only
        once the preload has imported torch (the registry needs it): the first paint stays fast."""
        if not self._torch_ready.is_set():
            return
        found = self._model_size_multiple()
        if found is not None:
            self.tile.step = found[0]

    def _start_preload(self) -> None:
        """Import torch, load the selected model and warm it up on a background thread (see :func:`preload`)."""
        self._preload_relay = _PreloadRelay()
        self._preload_relay.done.connect(self._on_preloaded)
        name = self.model.value
        if not name or name.startswith("("):
            self._torch_ready.set()
            return
        layer = self.image.value
        shape = tuple(layer_data(layer).shape[-2:]) if layer is not None and not layer.rgb else (512, 512)
        # Not a daemon: a process exiting mid-forward would abort in torch's C++ teardown, so
        # exit waits for the (one-tile) preload instead.
        # The thread holds the relay itself (not only its bound signal): a widget closed and
        # collected before a slow warm-up ends (seconds for the default MPT) must not take the
        # relay's Qt object with it, or the thread's emit touches freed memory (a segfault seen in CI).
        relay = self._preload_relay
        self.preload_thread = threading.Thread(
            target=preload, args=(name, self._torch_ready, shape, lambda: relay.done.emit(), self._clicked),
            name="mpt-deblur-preload", daemon=False)
        self.preload_thread.start()

    def _on_preloaded(self) -> None:
        try:
            self.device.reset_choices()  # now with the GPUs torch found
            self._on_model_changed()  # the tile step of the chosen model
        except RuntimeError:  # the widget's Qt side is gone
            pass

    def _refresh_models(self) -> None:
        """List newly saved models; a widget whose Qt side is gone (viewer closed) unsubscribes."""
        try:
            self.model.reset_choices()
        except RuntimeError:  # "wrapped C/C++ object ... has been deleted"
            model_events.changed.disconnect(self._refresh_models)

    # ---- request ---------------------------------------------------------------------------

    def _model_spec(self) -> str:
        chosen_file = _path_or_none(self.model_file)
        if chosen_file is not None:
            return str(chosen_file)
        name = self.model.value
        if not name or name.startswith("("):
            raise ValueError("no model selected: install a model or choose a model file")
        return name

    def build_request(self) -> DeblurRequest:
        layer = self.image.value
        if layer is None:
            raise ValueError("choose an image layer first")
        data = layer_data(layer)
        axes = self.axes.value.strip().upper() or axes_for_layer(layer)
        zarr_path = _path_or_none(self.zarr_path) if self.save_zarr.value else None
        if self.save_zarr.value and zarr_path is None:
            raise ValueError("'save to zarr' is on: choose where to write the zarr store")
        if zarr_path is not None and zarr_path.exists():
            raise ValueError(f"{zarr_path} already exists; choose a new path (nothing is overwritten)")
        model = self._model_spec()
        found = self._model_size_multiple(strict=True)
        from .inference.settings import InferenceSettings

        # Built and checked here, on the GUI thread, so a tile the model cannot take is refused
        # before any worker starts; 0 and -1 in the SpinBoxes are "auto" (None).
        settings = InferenceSettings.for_model(
            *found, device=self.device.value, output_dtype=self.output_dtype.value,
            orientations=self.orientations.value or None, shifts=self.shifts.value or None,
            precision=self.precision.value,
            tile=int(self.tile.value) if self.tile.value > 0 else None,
            overlap=int(self.overlap.value) if self.overlap.value >= 0 else None,
        )
        if zarr_path is None and is_lazy(data):
            # Lazy in, lazy out: stream into a temporary store instead of loading the stack.
            tmp = tempfile.mkdtemp(prefix="mpt-deblur-")
            remove_at_exit(tmp)
            zarr_path = Path(tmp) / f"{layer.name}-deblurred.zarr"
        colormap = getattr(getattr(layer, "colormap", None), "name", None)
        return DeblurRequest(layer_name=layer.name, data=data, axes=axes, model=model,
                             settings=settings, zarr_path=zarr_path, geometry=geometry_kwargs(layer),
                             colormap=colormap)

    # ---- run / cancel ----------------------------------------------------------------------

    def run(self):
        """Start deblurring in a worker thread; returns the worker (or None if the input is bad)."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            notify_info("a deblur run is already in progress")
            return None
        try:
            request = self.build_request()
        except Exception as exc:  # bad input: say so, change nothing
            notify_error(exc, "Deblur")
            self.status.value = f"error: {exc}"
            return None
        self._cancel_event = threading.Event()
        self._clicked.set()
        self.progress.value = 0
        self.status.value = f"deblurring {request.layer_name} ({request.axes}) with {Path(request.model).name}..."
        # Passing "errored" here stops napari from re-raising worker errors into the event loop.
        worker = create_worker(run_deblur, request, self._cancel_event, self._relay.progressed.emit,
                               _start_thread=False, _connect={"errored": self._on_error})
        worker.returned.connect(lambda result: self._on_returned(request, result))
        worker.finished.connect(self._on_finished)
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.worker = worker
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running worker to stop after the current tile batch."""
        self._cancel_event.set()
        self.status.value = "cancelling after the current tiles..."

    # ---- callbacks (GUI thread) ------------------------------------------------------------

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.max = max(total, 1)
        self.progress.value = min(done, total)

    def _on_returned(self, request: DeblurRequest, result: tuple[Any, dict[str, Any]]) -> None:
        data, meta = result
        meta = {"mpt_deblur": meta, "source_layer": request.layer_name}
        kwargs = dict(request.geometry)
        if request.colormap:
            kwargs["colormap"] = request.colormap
        model_name = meta["mpt_deblur"]["model"]["name"]
        rgb = request.axes.endswith("C") and data.shape[-1] in (3, 4)
        self.last_layer = self._viewer.add_image(
            data, name=f"{request.layer_name} deblurred ({model_name})", metadata=meta,
            rgb=rgb, **kwargs, **(rgb_display_kwargs(data) if rgb else {}),
        )
        scale_rgb_thumbnail(self.last_layer)
        untrained = "" if meta["mpt_deblur"]["model"]["trained"] else " (UNTRAINED model)"
        # Say when tiles were restored in several orientations or shifts: it explains a slower run.
        used = meta["mpt_deblur"]["settings"]
        passes = [f"{n} {what}" for n, what in ((used.get("orientations", 1), "orientations"),
                                                (used.get("shifts", 1), "pixel shifts")) if n > 1]
        averaged = f", {' x '.join(passes)} averaged" if passes else ""
        self.status.value = f"done: {self.last_layer.name}{untrained}{averaged}"

    def _on_error(self, exc: BaseException) -> None:
        from .inference.progress import Cancelled

        if isinstance(exc, Cancelled):
            self.status.value = f"{exc}; input layer unchanged"
            notify_info(f"Deblur {exc}; the input layer is unchanged")
            return
        self.status.value = f"error: {exc}"
        notify_error(exc, "Deblur")

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
