"""napari widget: fine-tune a model with EFCRex on the blurry images open in the viewer.

Each step takes a labeled batch (synthetic defocus pairs from sharp images, or the blurred/sharp
layer pair when one is given) and an unlabeled batch from the chosen layers (the extended
contrastive term, docs/training.md). Training runs in a generator ``thread_worker`` that yields a
record per step; the loss plot updates live, Stop ends the run after the current step and keeps
the weights so far, Save writes a safetensors + JSON model that the Deblur widget then lists.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, LineEdit, PushButton, Select, SpinBox

from ._widget_common import (LossPlot, image_layer_names, keep_labels_readable, layer_data, model_choices,
                             notify_error, notify_info, save_trained_model, start_training_worker, status_line)

if TYPE_CHECKING:
    import napari

#: Starting points that are not installed models: a fresh network of a preset.
NEW_MODELS = {
    "new MPT (tiny)": ("mpt", "tiny"),
    "new MPT (small)": ("mpt", "small"),
    "new H2T U-Net (tiny)": ("h2t_unet", "tiny"),
}


def starting_points() -> list[str]:
    return [*model_choices(), *NEW_MODELS]


def _as_planes(data: Any, name: str) -> list:
    """A layer's data as a list of 2D planes (a z-stack or time series gives one per plane)."""
    import numpy as np

    arr = np.asarray(data)
    if arr.ndim == 2:
        return [arr]
    if arr.ndim < 2:
        raise ValueError(f"layer {name!r} is not an image (shape {arr.shape})")
    return list(arr.reshape(-1, *arr.shape[-2:]))


class FinetuneWidget(Container):
    """Fine-tune with EFCRex: unlabeled layers (+ optional blurred/sharp pair) -> a new model."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        from magicgui.widgets import create_widget
        from napari.layers import Image

        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.unlabeled = Select(label="unlabeled (blurry) layers", choices=self._image_layer_names)
        self.paired_blurred = create_widget(annotation=Optional[Image], label="paired: blurred (optional)")
        self.paired_sharp = create_widget(annotation=Optional[Image], label="paired: sharp (optional)")
        self.start_model = ComboBox(label="start from", choices=lambda _w: starting_points())
        self.steps = SpinBox(label="steps", min=1, max=100_000, value=200)
        self.lr = FloatSpinBox(label="learning rate", min=1e-7, max=1e-2, step=1e-5, value=5e-5)
        self.lr.native.setDecimals(7)
        self.batch = SpinBox(label="batch", min=1, max=64, value=4)
        self.patch = SpinBox(label="patch px", min=64, max=512, step=64, value=128)
        self.device = ComboBox(label="device", choices=_device_choices(), value="auto")
        self.start_button = PushButton(text="Start")
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.status = Label(value="")
        self.model_name = LineEdit(label="save as (name)", value="my-finetuned-model")
        self.save_path = FileEdit(label="or file", mode="w", filter="*.safetensors", value="")
        self.save_button = PushButton(text="Save model", enabled=False)
        self.extend([self.unlabeled, self.paired_blurred, self.paired_sharp, self.start_model, self.steps, self.lr,
                     self.batch, self.patch, self.device, self.start_button, self.stop_button, self.status,
                     self.model_name, self.save_path, self.save_button])
        self._plot = LossPlot(self, napari_viewer, "the training loss is plotted here\nonce fine-tuning starts",
                              height=2.2, min_height=160)
        self._figure, self._line, self._placeholder = self._plot.figure, self._plot.line, self._plot.placeholder
        status_line(self.status)
        keep_labels_readable(self)
        self.start_button.changed.connect(self.start)
        self.stop_button.changed.connect(self.stop)
        self.save_button.changed.connect(self.save)
        self.tuner = None
        self.worker = None
        self.losses: list[float] = []
        self.saved_path: Path | None = None

    def _image_layer_names(self, _widget=None) -> list[str]:
        return image_layer_names(self._viewer)

    # ---- start / stop ----------------------------------------------------------------------

    def _starting_model(self):
        choice = self.start_model.value
        if choice in NEW_MODELS:
            import torch

            from .models.config import preset_config
            from .models.registry import build_model

            torch.manual_seed(0)
            return build_model(preset_config(*NEW_MODELS[choice], in_channels=1))
        if not choice:
            raise ValueError("choose a model to start from")
        return choice

    def build_tuner(self):
        """Collect the inputs on the GUI thread and build the (in-memory) fine-tuning run."""
        from .training.finetune import FineTuner

        names = list(self.unlabeled.value)
        if not names:
            raise ValueError("choose at least one unlabeled image layer")
        unlabeled = [p for n in names for p in _as_planes(layer_data(self._viewer.layers[n]), n)]
        blurred, sharp = self.paired_blurred.value, self.paired_sharp.value
        if (blurred is None) != (sharp is None):
            raise ValueError("a paired example needs both a blurred and a sharp layer")
        paired = None
        if blurred is not None:
            pb, ps = _as_planes(layer_data(blurred), blurred.name), _as_planes(layer_data(sharp), sharp.name)
            if len(pb) != len(ps) or pb[0].shape != ps[0].shape:
                raise ValueError(f"paired layers {blurred.name!r} and {sharp.name!r} must have the same shape")
            paired = list(zip(pb, ps))
        return FineTuner(self._starting_model(), unlabeled, paired=paired, steps=int(self.steps.value),
                         lr=float(self.lr.value), batch=int(self.batch.value), patch=int(self.patch.value),
                         device=self.device.value)

    def start(self):
        """Start fine-tuning in a worker; returns the worker (None when the input is bad)."""
        if self.worker is not None:
            notify_info("fine-tuning is already running")
            return None
        try:
            self.tuner = self.build_tuner()
        except Exception as exc:
            self.status.value = f"error: {exc}"
            notify_error(exc, "Fine-tune")
            return None
        tuner = self.tuner
        self.losses = []
        self.saved_path = None

        def work():
            for record in tuner.steps():
                yield record
            tuner.model.eval()

        self.status.value = f"fine-tuning {tuner.base_name} for {self.steps.value} steps..."
        return start_training_worker(self, work, on_yielded=self._on_step)

    def stop(self) -> None:
        """End the run after the current step; the weights so far are kept for Save."""
        if self.tuner is not None:
            self.tuner.stop()
            self.status.value = "stopping after the current step..."

    # ---- callbacks (GUI thread) ------------------------------------------------------------

    def _on_step(self, record) -> None:
        self.losses.append(float(record.losses["loss"]))
        self._plot.show(self.losses)
        self.status.value = f"step {record.step}/{record.total_steps}: loss {self.losses[-1]:.4g}"

    def _on_error(self, exc: BaseException) -> None:
        self.status.value = f"error: {exc}"
        notify_error(exc, "Fine-tune")

    def _on_finished(self) -> None:
        self.worker = None
        self.start_button.enabled = True
        self.stop_button.enabled = False
        if self.tuner is not None and self.tuner.trainer.step > 0:
            self.save_button.enabled = True
            how = "stopped" if self.tuner.trainer.stopped else "finished"
            self.status.value = f"{how} after {self.tuner.trainer.step} steps; save the model to use it"

    # ---- save ------------------------------------------------------------------------------

    def save(self) -> Path | None:
        """Save the fine-tuned weights; the Deblur widget's model list picks the model up."""
        from .models.registry import sanitise_model_name

        if self.tuner is None or self.tuner.trainer.step == 0:
            self.status.value = "nothing to save yet: run a fine-tune first"
            return None
        typed = self.save_path.line_edit.value.strip()
        name = self.model_name.value.strip()
        if not typed and not name:
            self.status.value = "give the model a name or a file"
            return None
        # A typed name is only ever a NAME in the user model folder (never a path: no "../"),
        # a chosen file is a path; the registry refuses shipped names for both.
        saved = save_trained_model(
            self, lambda: self.tuner.save(Path(typed).absolute() if typed else sanitise_model_name(name)))
        if saved is None:
            return None
        self.saved_path = saved
        self.status.value = f"saved {self.saved_path}"
        return self.saved_path


def _device_choices() -> list[str]:
    from ._widget_deblur import device_choices

    return device_choices()
