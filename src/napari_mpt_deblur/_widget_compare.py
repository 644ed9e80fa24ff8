"""napari widget: StarDist nuclei before vs after deblurring, layer against layer.

Runs the library's :func:`~napari_mpt_deblur.evaluation.compare.compare_stardist` in a worker
thread (StarDist itself runs in the separate StarDist process: TensorFlow and napari's OpenGL
canvas crash each other in one process, see :mod:`~napari_mpt_deblur.evaluation.stardist_process`);
adds a labels layer per image, and shows counts and (with ground-truth labels) precision,
recall, F1 and AP at IoU 0.5 / 0.7 / 0.9 and mean AP in a table and a small plot; the table can
be exported as CSV. Without StarDist/TensorFlow the widget says what to install and stays inert;
the other widgets are unaffected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton, Table

from ._widget_common import geometry_kwargs, keep_labels_readable, layer_data, notify_error, notify_info, status_line

if TYPE_CHECKING:
    import napari

REGISTERED = ("2D_versatile_fluo", "2D_paper_dsb2018")
TABLE_COLUMNS = ("image", "objects", "ap@0.5", "ap@0.7", "ap@0.9", "mean_ap", "precision@0.5", "recall@0.5", "f1@0.5")


def stardist_choices() -> list[str]:
    from .evaluation.stardist_runner import shipped_models

    return [*shipped_models(), *(f"{name} (registered, needs internet)" for name in REGISTERED)]


def _spec_from_choice(choice: str) -> str:
    return choice.split(" (registered", 1)[0]


class CompareWidget(Container):
    """StarDist compare: before / after (/ sharp) image layers, optional ground-truth labels."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        from magicgui.widgets import create_widget
        from napari.layers import Image, Labels

        from .evaluation.stardist_runner import is_available, missing_packages

        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.before = create_widget(annotation=Image, label="before (blurred)")
        self.after = create_widget(annotation=Image, label="after (deblurred)")
        self.sharp = create_widget(annotation=Optional[Image], label="sharp (optional)")
        self.ground_truth = create_widget(annotation=Optional[Labels], label="ground truth (optional)")
        self.stardist_model = ComboBox(label="StarDist model", choices=stardist_choices())
        self.model_folder = FileEdit(label="or model folder", mode="d", value="")
        self.run_button = PushButton(text="Run StarDist")
        self.status = Label(value="")
        self.table = Table(value=[], columns=list(TABLE_COLUMNS))
        self.csv_path = FileEdit(label="CSV file", mode="w", filter="*.csv", value="")
        self.export_button = PushButton(text="Export CSV", enabled=False)
        self.extend([self.before, self.after, self.sharp, self.ground_truth, self.stardist_model, self.model_folder,
                     self.run_button, self.status, self.table, self.csv_path, self.export_button])
        self._figure, self._canvas = self._make_plot()
        status_line(self.status)
        keep_labels_readable(self)
        self.run_button.changed.connect(self.run)
        self.export_button.changed.connect(self.export_csv)
        self.worker = None
        self.result = None
        self.rows: list[dict[str, Any]] = []
        if not is_available():
            self.run_button.enabled = False
            self.status.value = (f"StarDist is not installed (missing: {', '.join(missing_packages())}); "
                                 "install with: pip install 'napari-mpt-deblur[stardist]'")

    def _make_plot(self):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(4, 2.4), dpi=90, tight_layout=True)
        canvas = FigureCanvasQTAgg(figure)
        canvas.setMinimumHeight(180)
        self.native.layout().addWidget(canvas)
        return figure, canvas

    # ---- run -------------------------------------------------------------------------------

    def _model_spec(self) -> str | None:
        folder = self.model_folder.line_edit.value.strip()
        if folder:
            return folder
        choice = self.stardist_model.value
        return _spec_from_choice(choice) if choice else None

    def build_inputs(self) -> tuple[dict[str, Any], dict[str, Any], Any]:
        """(images by key, source layers by key, ground truth or None), checked on the GUI thread."""
        layers = {"before": self.before.value, "after": self.after.value, "sharp": self.sharp.value}
        if layers["before"] is None or layers["after"] is None:
            raise ValueError("choose a 'before' and an 'after' image layer")
        layers = {k: v for k, v in layers.items() if v is not None}
        images = {k: layer_data(v) for k, v in layers.items()}
        shapes = {k: tuple(v.shape) for k, v in images.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"the images must have the same shape, got {shapes}")
        gt = self.ground_truth.value
        gt_data = None
        if gt is not None:
            gt_data = layer_data(gt)
            if tuple(gt_data.shape) != next(iter(shapes.values())):
                raise ValueError(f"ground truth {gt.name!r} has shape {tuple(gt_data.shape)}, "
                                 f"the images {next(iter(shapes.values()))}")
        return images, layers, gt_data

    def run(self):
        """Start StarDist in a worker; returns the worker (None when the input is bad)."""
        import numpy as np
        from napari.qt.threading import create_worker

        from .evaluation.compare import compare_stardist

        if self.worker is not None:
            notify_info("StarDist is already running")
            return None
        try:
            images, layers, gt = self.build_inputs()
        except Exception as exc:
            self.status.value = f"error: {exc}"
            notify_error(exc, "StarDist compare")
            return None
        names = {k: layers[k].name for k in images}
        spec = self._model_spec()

        def work():
            arrays = {k: np.asarray(v) for k, v in images.items()}
            # StarDist itself runs in the StarDist worker process: TensorFlow must not share a
            # process with napari's OpenGL canvas (see evaluation.stardist_process).
            return compare_stardist(arrays, None if gt is None else np.asarray(gt), spec)

        self.status.value = f"running StarDist on {', '.join(names.values())}..."
        self.run_button.enabled = False
        worker = create_worker(work, _start_thread=False, _connect={"errored": self._on_error})
        worker.returned.connect(lambda result: self._on_returned(result, layers, names))
        worker.finished.connect(self._on_finished)
        self.worker = worker
        worker.start()
        return worker

    # ---- results ---------------------------------------------------------------------------

    def _on_returned(self, result, layers: dict[str, Any], names: dict[str, str]) -> None:
        self.result = result
        self.rows = [{**row, "layer": names[row["image"]]} for row in result.rows]
        for key, labels in result.labels.items():
            source = layers[key]
            self._viewer.add_labels(labels, name=f"{source.name} StarDist",
                                    metadata={"stardist_model": result.model, "source_layer": source.name},
                                    **geometry_kwargs(source))
        self.table.value = {
            "data": [[_fmt(row.get(c, "")) for c in TABLE_COLUMNS] for row in self.rows],
            "index": [row["layer"] for row in self.rows],
            "columns": list(TABLE_COLUMNS),
        }
        self._plot()
        self.export_button.enabled = True
        counts = ", ".join(f"{r['image']}: {r['objects']}" for r in self.rows)
        # Counts first: the model's description can hold a long folder path (full text: tooltip).
        self.status.value = f"done; nuclei {counts} (StarDist: {result.model})"

    def _plot(self) -> None:
        self._figure.clear()
        ax = self._figure.add_subplot(111)
        if self.rows and "ap@0.5" in self.rows[0]:
            ious = (0.5, 0.7, 0.9)
            for row in self.rows:
                ax.plot(ious, [row[f"ap@{t:g}"] for t in ious], marker="o", label=f"{row['image']} (mean {row['mean_ap']:.3f})")
            ax.set_xlabel("IoU threshold")
            ax.set_ylabel("AP")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
        else:
            ax.bar([r["image"] for r in self.rows], [r["objects"] for r in self.rows], color="tab:blue")
            ax.set_ylabel("nuclei found")
        self._canvas.draw_idle()

    def export_csv(self) -> None:
        from .evaluation.compare import rows_to_csv

        path = self.csv_path.line_edit.value.strip()
        if not path:
            self.status.value = "choose a CSV file to export to"
            return
        try:
            rows_to_csv(path, self.rows)
        except Exception as exc:
            notify_error(exc, "Export CSV")
            return
        self.status.value = f"wrote {path}"

    def _on_error(self, exc: BaseException) -> None:
        self.status.value = f"error: {exc}"
        notify_error(exc, "StarDist compare")

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.enabled = True


def _fmt(value: Any) -> Any:
    if isinstance(value, float) and value != value:  # NaN: 0/0, e.g. AP with no nuclei anywhere
        return "undefined"
    return round(value, 4) if isinstance(value, float) else value
