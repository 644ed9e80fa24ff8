"""napari widget: calibrate a model to the user's microscope (``mpt-deblur calibrate`` in a dock).

The user gives the optics (NA, immersion, emission wavelength, pixel size; pre-filled from the
chosen layer's scale, its ``metadata["optics"]`` and the metadata of the file it was opened from,
each field saying where its value came from), sharp layers (in-focus images, or z-stacks whose
best-focus plane is used), optionally a blurry layer (EFCRex), and a time budget. The settings are
checked on the GUI thread (:class:`~napari_mpt_deblur.training.calibrate.CalibrationSettings`), so
a wrong value is reported before anything starts; the run itself
(:class:`~napari_mpt_deblur.training.calibrate.Calibrator`) goes in a generator ``thread_worker``
that yields a record per step: the loss plot and the validation PSNR update live, Stop ends the run
after the current step, Save writes a model named with its optics that the Deblur widget then lists.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, Label, LineEdit, PushButton, Select

# The optics look-up and the field texts live in a module of their own (no Qt); re-exported here.
from ._widget_calibrate_optics import (AIR_ASSUMED, FIELD_NAMES, IMMERSION_UNKNOWN, NOT_KNOWN, OTHER, _clean_error,
                                       _layer_pixel_um, optics_from_layer)  # noqa: F401
from ._widget_common import (LossPlot, image_layer_names, keep_labels_readable, layer_data, model_choices,
                             model_events, notify_error, notify_info, remove_at_exit, save_trained_model,
                             start_training_worker, status_line)
from .data.optics import calibrated_model_name

if TYPE_CHECKING:
    import napari

def _import_calibration() -> None:
    """Import the calibration code (torch) in the background while the user fills in the fields."""
    try:
        importlib.import_module(f"{__package__}.training.calibrate")
    except Exception:  # noqa: BLE001 - Start reports any import error with context
        pass


def _planes(data: Any) -> list:
    """A 2D (or RGB) image as itself, a 3D stack as its planes."""
    import numpy as np

    arr = np.asarray(data)
    return list(arr) if arr.ndim == 3 and arr.shape[-1] not in (3, 4) else [arr]


def run_calibration(settings, sharp_layers: list[tuple[str, Any, bool]], unlabeled: Any | None, work_dir: Path,
                    sources: dict[str, str], stop: threading.Event):
    """Worker body (no Qt): read the layers' data, build the calibration, run it.

    ``sharp_layers``: ``(name, data, z_stack)`` where ``z_stack`` means "use the best-focus plane
    of this 3D layer" (otherwise every plane is a sharp image). Yields ``("started", calibrator)``
    once the starting model is validated, then ``("step", StepRecord)`` after every step.
    """
    from .inference.devices import tune_cpu_allocator
    from .training.calibrate import Calibrator, SharpSet

    tune_cpu_allocator()
    sharp = SharpSet()
    for name, data, z_stack in sharp_layers:
        planes = [data] if z_stack else _planes(data)
        for i, plane in enumerate(planes):
            sharp.add(plane, name if len(planes) == 1 else f"{name}[{i}]")
    blurry = _planes(unlabeled) if unlabeled is not None else []
    calibrator = Calibrator(settings, sharp if sharp.images else None, blurry, work_dir=work_dir,
                            optics_sources=sources)
    yield "started", calibrator
    if stop.is_set():
        calibrator.stop()
    for record in calibrator.steps():
        yield "step", record
        if stop.is_set():
            calibrator.stop()
    calibrator.trainer.finish()


class CalibrateWidget(Container):
    """Calibrate to my microscope: optics + sharp layers (+ a blurry layer) + time budget -> a model
    specialised to those optics, saved under a name holding them."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        from magicgui.widgets import create_widget
        from napari.layers import Image

        from .data.optics import IMMERSION_INDEX

        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.optics_layer = create_widget(annotation=Optional[Image], label="optics from layer")
        self.model = ComboBox(label="start from", choices=lambda _w: model_choices() or ["(no models installed)"])
        # 0 = not known yet (shown as such): an unknown value is never silently a default.
        self.na = FloatSpinBox(label="NA", min=0.0, max=1.7, step=0.05, value=0.0)
        self.na.native.setDecimals(3)
        media = [(f"{k} (n={v:g})", k) for k, v in IMMERSION_INDEX.items()]
        self.immersion = ComboBox(choices=[*media, (f"{OTHER}: n =", OTHER)], value="air")
        self.immersion_index = FloatSpinBox(min=1.0, max=2.0, step=0.01, value=1.0, enabled=False)
        self.immersion_index.native.setDecimals(3)
        self.immersion_row = Container(layout="horizontal", labels=False, label="immersion",
                                       widgets=[self.immersion, self.immersion_index])
        # A double spin box with no decimals: superqt's integer spin box shows no "not known".
        self.wavelength_nm = FloatSpinBox(label="emission (nm)", min=0, max=1999, step=10, value=0)
        self.wavelength_nm.native.setDecimals(0)
        self.pixel_um = FloatSpinBox(label="pixel size (um)", min=0.0, max=20.0, step=0.01, value=0.0)
        self.pixel_um.native.setDecimals(4)
        for spin in (self.na, self.wavelength_nm, self.pixel_um):
            spin.native.setSpecialValueText("not known")
        self.optics_sources = Label(value="")
        self.sharp = Select(label="sharp layers", choices=self._image_layer_names)
        self.z_stacks = CheckBox(text="3D sharp layers are z-stacks: use the best-focus plane", value=True)
        self.bundled = CheckBox(text="include bundled sharp nuclei images", value=True)
        self.unlabeled = create_widget(annotation=Optional[Image], label="blurry layer (optional)")
        self.time_budget = FloatSpinBox(label="time budget (min)", min=0.05, max=7 * 24 * 60, step=5, value=15.0)
        self.start_button = PushButton(text="Start")
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.buttons = Container(layout="horizontal", labels=False, widgets=[self.start_button, self.stop_button])
        self.status = Label(value="")
        self.psnr = Label(value="validation PSNR: -")
        self.model_name = LineEdit(value="")
        self.save_button = PushButton(text="Save model", enabled=False)
        self.save_row = Container(layout="horizontal", labels=False, label="save as (name)",
                                  widgets=[self.model_name, self.save_button])
        for row in (self.immersion_row, self.buttons, self.save_row):
            row.native.layout().setContentsMargins(0, 0, 0, 0)
        self.extend([self.optics_layer, self.model, self.na, self.immersion_row, self.wavelength_nm, self.pixel_um,
                     self.sharp, self.z_stacks, self.bundled, self.unlabeled, self.time_budget,
                     self.buttons, self.status, self.psnr, self.save_row])
        # Where the optics came from: under the fields, across the whole width (as a row of the
        # form it would leave the label column empty and wrap twice as often).
        layout = self.native.layout()
        layout.insertWidget(layout.indexOf(self.sharp.native.parentWidget()), self.optics_sources.native)
        # The list of sharp layers needs no more than a few rows (it scrolls).
        self.sharp.native.setMaximumHeight(3 * self.sharp.native.fontMetrics().lineSpacing() + 12)
        self._plot = LossPlot(self, napari_viewer, "the training loss is plotted here\nonce calibration starts",
                              height=2.0, min_height=150)
        self._figure, self._line, self._placeholder = self._plot.figure, self._plot.line, self._plot.placeholder
        for label in (self.status, self.optics_sources, self.psnr):
            status_line(label)
        # Short enough that buttons and plot stay in a 1280 x 800 window whatever the texts (a
        # long file source wraps and is cut; the tooltip holds it all): one line per field plus
        # one, and two lines of PSNR.
        line = self.optics_sources.native.fontMetrics().lineSpacing()
        self.optics_sources.native.setMaximumHeight(5 * line + 6)
        self.psnr.native.setMaximumHeight(2 * line + 4)
        keep_labels_readable(self)

        #: Where each optics field's value came from (shown under the fields).
        self.sources: dict[str, str] = {k: NOT_KNOWN for k in FIELD_NAMES}
        self.sources["immersion_index"] = IMMERSION_UNKNOWN
        self._filling = False
        self._auto_name = ""
        #: Other :class:`CalibrationSettings` fields (lr, patch, batch_size, validate_every,
        #: cpu_threads, device...) for scripts and tests; the dock shows the everyday ones.
        self.advanced: dict[str, Any] = {}
        self.calibrator = None
        self.worker = None
        self.losses: list[float] = []
        self.saved_path: Path | None = None
        self.work_dir: Path | None = None
        self._stop_event = threading.Event()
        self._error = ""  # the worker's error, if it failed

        for key, widget in (("na", self.na), ("immersion_index", self.immersion),
                            ("immersion_index", self.immersion_index), ("wavelength_um", self.wavelength_nm),
                            ("pixel_um", self.pixel_um)):
            widget.changed.connect(lambda _v, key=key: self._on_edited(key))
        self.model.changed.connect(lambda _v: self._update_default_name())
        self.optics_layer.changed.connect(self.fill_from_layer)
        self.start_button.changed.connect(self.start)
        self.stop_button.changed.connect(self.stop)
        self.save_button.changed.connect(self.save)
        model_events.changed.connect(self._refresh_models)
        # Open on the layer the user is looking at, with its optics filled in.
        active = napari_viewer.layers.selection.active
        images = [layer for layer in napari_viewer.layers if isinstance(layer, Image)]
        if images:
            self.optics_layer.value = active if isinstance(active, Image) else images[-1]
        self.fill_from_layer(self.optics_layer.value)
        # Not a daemon: interpreter exit waits for the import instead of tearing torch down mid-way.
        threading.Thread(target=_import_calibration, name="mpt-deblur-calibrate-import", daemon=False).start()

    def _image_layer_names(self, _widget=None) -> list[str]:
        return image_layer_names(self._viewer)

    def _refresh_models(self) -> None:
        try:
            self.model.reset_choices()
        except RuntimeError:  # the widget's Qt side is gone (viewer closed)
            model_events.changed.disconnect(self._refresh_models)

    # ---- optics fields ---------------------------------------------------------------------

    def fill_from_layer(self, layer=None) -> dict[str, tuple[float, str]]:
        """Fill the optics fields that ``layer`` knows (see :func:`optics_from_layer`); the others
        keep their value and their source. Returns what was found."""
        if layer is None:
            self._show_sources()
            return {}
        found = optics_from_layer(layer)
        self._filling = True
        try:
            if "na" in found:
                self.na.value = found["na"][0]
            if "immersion_index" in found:
                self._set_immersion(found["immersion_index"][0])
            if "wavelength_um" in found:
                self.wavelength_nm.value = int(round(found["wavelength_um"][0] * 1000))
            if "pixel_um" in found:
                self.pixel_um.value = found["pixel_um"][0]
        finally:
            self._filling = False
        for key, (_value, source) in found.items():
            self.sources[key] = source
        if "immersion_index" not in found and 0 < self.na.value < 1 and self.sources["immersion_index"] != "entered":
            self._filling = True
            self.immersion.value = "air"
            self._filling = False
            self.sources["immersion_index"] = AIR_ASSUMED
        self._show_sources()
        self._update_default_name()
        return found

    def _set_immersion(self, index: float) -> None:
        from .data.optics import IMMERSION_INDEX, immersion_name

        name = immersion_name(index)
        self.immersion.value = name if name in IMMERSION_INDEX else OTHER
        self.immersion_index.value = index
        self.immersion_index.enabled = self.immersion.value == OTHER

    def _on_edited(self, key: str) -> None:
        self.immersion_index.enabled = self.immersion.value == OTHER
        if not self._filling:
            self.sources[key] = "entered"
            if key == "na" and self.sources["immersion_index"] in (IMMERSION_UNKNOWN, AIR_ASSUMED):
                self.sources["immersion_index"] = AIR_ASSUMED if 0 < self.na.value < 1 else IMMERSION_UNKNOWN
            self._show_sources()
        self._update_default_name()

    def _show_sources(self) -> None:
        self.optics_sources.value = "\n".join(f"{FIELD_NAMES[k]}: {v}" for k, v in self.sources.items())

    def _immersion_value(self) -> float:
        from .data.optics import IMMERSION_INDEX

        choice = self.immersion.value
        return float(self.immersion_index.value) if choice == OTHER else IMMERSION_INDEX[choice]

    def optics(self):
        """The fields as an :class:`~napari_mpt_deblur.data.optics.Acquisition` (wavelength nm -> um);
        ValueError naming any field not filled in, or a value the optics refuse."""
        from .data.optics import Acquisition

        missing = [FIELD_NAMES[k] for k, w in (("na", self.na), ("wavelength_um", self.wavelength_nm),
                                                ("pixel_um", self.pixel_um)) if not w.value > 0]
        if missing:
            raise ValueError(f"{', '.join(missing)} {NOT_KNOWN}")
        return Acquisition(na=float(self.na.value), immersion_index=self._immersion_value(),
                           wavelength_um=float(self.wavelength_nm.value) / 1000.0, pixel_um=float(self.pixel_um.value))

    def _update_default_name(self) -> None:
        """Keep the save name at ``<model>-cal-<optics>`` until the user types a name of their own."""
        model = self.model.value
        try:
            name = calibrated_model_name(model, self.optics()) if model and not model.startswith("(") else ""
        except Exception:  # noqa: BLE001 - fields not complete yet
            name = ""
        if name and self.model_name.value.strip() in ("", self._auto_name):
            self.model_name.value = name
            self._auto_name = name

    # ---- settings (GUI thread) -------------------------------------------------------------

    def build_settings(self):
        """The run's :class:`~napari_mpt_deblur.training.calibrate.CalibrationSettings`, checked here
        on the GUI thread; ValueError with a readable message otherwise."""
        from pydantic import ValidationError

        from .training.calibrate import CalibrationSettings

        model = self.model.value
        if not model or model.startswith("("):
            raise ValueError("no model to start from: install a model first")
        try:
            return CalibrationSettings(model=model, optics=self.optics(),
                                       time_budget_minutes=float(self.time_budget.value),
                                       use_bundled=bool(self.bundled.value), **self.advanced)
        except ValidationError as exc:
            raise ValueError(_clean_error(exc)) from None

    def _sharp_layers(self) -> list[tuple[str, Any, bool]]:
        out = []
        for name in self.sharp.value:
            layer = self._viewer.layers[name]
            data = layer_data(layer)
            spatial = len(data.shape) - (1 if getattr(layer, "rgb", False) else 0)
            if spatial not in (2, 3):
                raise ValueError(f"sharp layer {name!r} has shape {tuple(data.shape)}: choose 2D images or z-stacks")
            out.append((name, data, spatial == 3 and bool(self.z_stacks.value)))
        if not out and not self.bundled.value:
            raise ValueError("calibration needs sharp images: choose sharp layers or include the bundled images")
        return out

    # ---- start / stop ----------------------------------------------------------------------

    def start(self):
        """Check the settings and start calibrating in a worker; returns the worker (None when the
        input is bad: nothing is started then)."""
        from .io.cache import cache_dir

        if self.worker is not None:
            notify_info("a calibration is already running")
            return None
        try:
            settings = self.build_settings()
            sharp = self._sharp_layers()
            blurry = self.unlabeled.value
            unlabeled = layer_data(blurry) if blurry is not None else None
            if unlabeled is not None and len(unlabeled.shape) - bool(blurry.rgb) not in (2, 3):
                raise ValueError(f"blurry layer {blurry.name!r} has shape {tuple(unlabeled.shape)}: "
                                 "choose a 2D image or a z-stack")
        except Exception as exc:  # bad input: say so, start nothing
            self.status.value = f"error: {exc}"
            notify_error(exc, "Calibrate")
            return None
        sources = {k: ("given in the widget" if v == "entered" else v) for k, v in self.sources.items()}
        if self.work_dir is not None:  # the previous run's checkpoints (saved or not) are replaced
            shutil.rmtree(self.work_dir, ignore_errors=True)
        root = cache_dir("calibrate")
        root.mkdir(parents=True, exist_ok=True)
        self.work_dir = Path(tempfile.mkdtemp(prefix=f"{settings.optics.slug()}-", dir=root))
        remove_at_exit(self.work_dir)
        self._stop_event = threading.Event()
        self._error = ""
        self.calibrator = None
        self.losses = []
        self.saved_path = None
        self._plot.clear()
        self.psnr.value = "validation PSNR: -"
        self.status.value = f"preparing: {settings.optics.label()}; validating the starting model {settings.model}..."
        return start_training_worker(self, run_calibration, settings, sharp, unlabeled, self.work_dir, sources,
                                     self._stop_event, on_yielded=self._on_yielded)

    def stop(self) -> None:
        """End the run after the current step; the best weights so far are kept for Save."""
        self._stop_event.set()
        if self.calibrator is not None:
            self.calibrator.stop()
        self.status.value = "stopping after the current step..."

    # ---- callbacks (GUI thread) ------------------------------------------------------------

    def _on_yielded(self, item) -> None:
        kind, value = item
        if kind == "started":
            self._on_started(value)
        else:
            self._on_step(value)

    def _on_started(self, calibrator) -> None:
        self.calibrator = calibrator
        start = calibrator.start_validation
        if start:
            self.psnr.value = (f"validation PSNR: start {start['psnr']:.2f} dB "
                               f"(blurred input {start['input_psnr']:.2f} dB)")
        if not self._stop_event.is_set():  # else "stopping..." stays up
            low, high = calibrator.settings.training_defocus_um()
            self.status.value = (f"calibrating {calibrator.base_name} for defocus {low:g}-{high:g} um: "
                                 f"{len(calibrator.train_names)} sharp images, {len(calibrator.val_names)} held back "
                                 "for validation; timing the first steps...")

    def _on_step(self, record) -> None:
        self.losses.append(float(record.losses["loss"]))
        self._plot.show(self.losses)
        trainer = self.calibrator.trainer if self.calibrator is not None else None
        of = f"/{record.total_steps}" if trainer is not None and trainer.planned_steps is not None else ""
        budget = self.calibrator.settings.time_budget_minutes if self.calibrator is not None else 0
        used = f", {trainer.budget_used / 60:.1f} of {budget:g} min" if trainer is not None else ""
        self.status.value = f"step {record.step}{of}: loss {self.losses[-1]:.4g}{used}"
        if record.validation and "psnr" in record.validation:
            start = self.calibrator.start_validation if self.calibrator is not None else None
            best = trainer.best if trainer is not None else None
            text = f"validation PSNR: {record.validation['psnr']:.2f} dB at step {record.step}"
            if best:
                text += f" (best {best['psnr']:.2f}"
                text += f", start {start['psnr']:.2f})" if start else ")"
            self.psnr.value = text

    def _on_error(self, exc: BaseException) -> None:
        self._error = f"error: {exc}"
        self.status.value = self._error
        notify_error(exc, "Calibrate")

    def _on_finished(self) -> None:
        self.worker = None
        self.start_button.enabled = True
        self.stop_button.enabled = False
        trainer = self.calibrator.trainer if self.calibrator is not None else None
        if trainer is not None and trainer.step > 0:
            # After an error too: the checkpoints so far are on disk and can be saved.
            self.save_button.enabled = True
            how = "stopped" if trainer.stopped else "finished"
            best = f"; {self.calibrator.verdict()}" if trainer.best else ""
            done = f"after {trainer.step} steps in {trainer.budget_used / 60:.1f} min{best}"
            self.status.value = (f"{self._error} ({done}; the weights so far can be saved)" if self._error
                                 else f"{how} {done}; save the model to use it")
        elif not self._error:
            self.status.value = "stopped before the first step: nothing to save"

    # ---- save ------------------------------------------------------------------------------

    def save(self) -> Path | None:
        """Save the best validated weights under the typed name (user model folder); the Deblur
        widget's model list picks the model up. Returns the record's path (None on error)."""
        from .models.registry import sanitise_model_name

        if self.calibrator is None or self.calibrator.trainer.step == 0 or self.worker is not None:
            self.status.value = "nothing to save yet: run a calibration to its end (or Stop it) first"
            return None
        # A typed name is only ever a NAME in the user model folder (never a path), and the
        # registry refuses shipped names.
        saved = save_trained_model(self, lambda: Path(self.calibrator.save(sanitise_model_name(self.model_name.value))))
        if saved is None:
            return None
        self.saved_path = saved
        self.status.value = f"saved {self.saved_path.stem}: choose it in the Deblur widget"
        return self.saved_path
