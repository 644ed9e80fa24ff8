"""Deblur widget in a real napari viewer under Xvfb: layers, geometry, metadata, cancel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mpt_deblur.models.config import preset_config
from napari_mpt_deblur.models.registry import build_model, save_model

pytestmark = pytest.mark.napari

PLUGIN = "napari-mpt-deblur"


@pytest.fixture
def tiny_model_file(tmp_path):
    torch.manual_seed(0)
    return save_model(build_model(preset_config("mpt", "tiny", 1)), tmp_path / "models" / "tiny-test")


@pytest.fixture
def deblur_widget(make_napari_viewer_proxy, tiny_model_file):
    viewer = make_napari_viewer_proxy()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Deblur")
    widget.model_file.value = str(tiny_model_file)
    return viewer, widget



def test_deblur_2d_sample_keeps_geometry_and_records_settings(qtbot, wait_for_worker, deblur_widget):
    from napari_mpt_deblur.data.samples import defocused_bbbc006

    viewer, widget = deblur_widget
    image = defocused_bbbc006()[:200, :260]
    layer = viewer.add_image(image, name="blurry", scale=(0.645, 0.645), translate=(10.0, 20.0),
                             axis_labels=("y", "x"), units=("um", "um"))
    before = layer.data.copy()
    widget.image.value = layer
    widget.output_dtype.value = "input"
    widget.orientations.value = 4  # the flip average (inference.orientations) goes through to the run
    widget.precision.value = "bf16"  # honoured on a CPU with bf16 hardware, fp32 (with a warning) elsewhere
    assert widget.run() is not None  # a worker started
    wait_for_worker(widget)
    out = viewer.layers["blurry deblurred (tiny-test)"]
    assert widget.last_layer.name == out.name
    assert out.data.shape == image.shape and out.data.dtype == image.dtype
    assert tuple(out.scale) == (0.645, 0.645) and tuple(out.translate) == (10.0, 20.0)
    assert tuple(out.axis_labels) == ("y", "x")
    assert [str(u) for u in out.units] == ["micrometer", "micrometer"]
    meta = out.metadata["mpt_deblur"]
    assert meta["model"]["name"] == "tiny-test" and meta["axes"] == "YX"
    assert meta["settings"]["output_dtype"] == "input" and meta["settings"]["orientations"] == 4
    from napari_mpt_deblur.inference.devices import cpu_has_native_bf16

    assert meta["settings"]["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert widget.status.value.endswith(", 4 orientations averaged")
    assert out.metadata["source_layer"] == "blurry"
    np.testing.assert_array_equal(layer.data, before)
    assert widget.progress.value == widget.progress.max > 0


def test_model_default_orientations_come_from_the_models_record(qtbot, wait_for_worker, deblur_widget, tiny_model_file):
    from napari_mpt_deblur.models.registry import load_model

    viewer, widget = deblur_widget
    four = save_model(load_model(tiny_model_file).model, tiny_model_file.parent / "tiny-four", orientations=4)
    widget.model_file.value = str(four)
    widget.image.value = viewer.add_image(np.random.default_rng(5).random((64, 96)).astype(np.float32), name="img")
    assert widget.orientations.value == 0  # "model default"
    assert widget.run() is not None
    wait_for_worker(widget)
    settings = widget.last_layer.metadata["mpt_deblur"]["settings"]
    assert (settings["orientations"], settings["orientations_from"]) == (4, "model")
    assert widget.status.value.endswith(", 4 orientations averaged")


def test_cancel_stops_a_stack_midway_and_leaves_input_unchanged(qtbot, wait_for_worker, deblur_widget):
    viewer, widget = deblur_widget
    rng = np.random.default_rng(0)
    stack = rng.random((6, 192, 192)).astype(np.float32)
    layer = viewer.add_image(stack.copy(), name="stack")
    widget.image.value = layer
    widget.tile.value = 64
    widget.overlap.value = 16
    seen = []

    def on_progress(done, total):
        seen.append((done, total))
        if done >= 3:
            widget.cancel()

    widget._relay.progressed.connect(on_progress)
    n_layers = len(viewer.layers)
    assert widget.run() is not None  # a worker started
    wait_for_worker(widget)
    total = seen[-1][1]
    assert 3 <= seen[-1][0] < total, seen[-1]
    assert len(viewer.layers) == n_layers  # no partial layer is added
    assert "cancelled" in widget.status.value and "input layer unchanged" in widget.status.value
    np.testing.assert_array_equal(layer.data, stack)


def test_lazy_layer_stays_lazy_via_zarr(qtbot, wait_for_worker, deblur_widget, tmp_path):
    import dask.array as da

    viewer, widget = deblur_widget
    stack = da.from_array(np.random.default_rng(1).random((3, 96, 128)).astype(np.float32), chunks=(1, 96, 128))
    layer = viewer.add_image(stack, name="lazy", scale=(2.0, 0.5, 0.5))
    widget.image.value = layer
    assert widget.run() is not None  # a worker started
    wait_for_worker(widget)
    out = widget.last_layer
    assert out is not None and not isinstance(out.data, np.ndarray)
    assert out.data.shape == stack.shape
    assert tuple(out.scale) == (2.0, 0.5, 0.5)
    assert out.metadata["mpt_deblur"]["axes"] == "ZYX"
    assert out.metadata["mpt_deblur"]["zarr_path"].endswith(".zarr")
    # The layer and the store carry the same typed run record (model SHA-256, resolved settings).
    from napari_mpt_deblur.io.images import read_image
    from napari_mpt_deblur.io.run_record import RunRecord

    on_layer = RunRecord.from_metadata(out.metadata["mpt_deblur"])
    in_store = read_image(out.metadata["mpt_deblur"]["zarr_path"]).run_record
    assert len(on_layer.model.weights_sha256) == 64
    assert in_store.model.weights_sha256 == on_layer.model.weights_sha256
    assert in_store.settings == on_layer.settings and in_store.settings.tile == on_layer.settings.tile
    assert in_store.complete is True and in_store.input.shape == [3, 96, 128]
    # The widget's "model default" orientations: the tiny model's record names none, so one pass.
    assert widget.orientations.value == 0
    assert (on_layer.settings.orientations, on_layer.settings.orientations_from) == (1, "default")


def test_bad_input_is_reported_not_raised(qtbot, wait_for_worker, deblur_widget, tmp_path):
    viewer, widget = deblur_widget
    widget.image.value = viewer.add_image(np.zeros((64, 64), np.float32), name="img")
    widget.model_file.line_edit.value = str(tmp_path / "missing.json")
    assert widget.run() is None  # refused on the GUI thread: the model record is read there
    assert widget.worker is None
    assert widget.status.value.startswith("error: model file not found")
    assert str(tmp_path / "missing.json") in widget.status.value
    widget.save_zarr.value = True
    widget.zarr_path.line_edit.value = ""  # an empty box (FileEdit.value = "" would mean the cwd)
    assert widget.run() is None
    assert "choose where to write" in widget.status.value


def test_a_tile_the_model_cannot_take_is_refused_before_any_worker_starts(qtbot, make_napari_viewer_proxy, tmp_path):
    """The settings are built and checked on the GUI thread against the chosen model's size
    multiple (128 for the MPT "small" preset), which also sets the tile SpinBox's step."""
    torch.manual_seed(0)
    path = save_model(build_model(preset_config("mpt", "small", 1)), tmp_path / "models" / "small-test")
    viewer = make_napari_viewer_proxy()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Deblur")
    widget.model_file.value = str(path)
    qtbot.waitUntil(lambda: widget.tile.step == 128, timeout=120_000)  # once the preload imported torch
    widget.image.value = viewer.add_image(np.ones((256, 256), np.float32), name="img")
    widget.tile.value = 192
    assert widget.tile.value == 192
    assert widget.run() is None
    assert widget.worker is None
    assert "tile 192 is not a multiple of 128, the size multiple of model 'small-test' (mpt/small)" in widget.status.value
    assert "use 128 or 256" in widget.status.value
    widget.tile.value = 256
    request = widget.build_request()
    assert (request.settings.tile, request.settings.overlap, request.settings.device) == (256, None, "auto")
    widget.tile.value = 0  # "0 = auto" in the SpinBox is None in the settings
    assert widget.build_request().settings.tile is None
    widget.preload_thread.join(timeout=120)  # no warm-up forward pass outlives the viewer


def test_the_rgb_sample_opens_and_the_colour_model_deblurs_it(qtbot, wait_for_worker, make_napari_viewer_proxy):
    from napari_mpt_deblur.data.samples import tissue_rgb
    from napari_mpt_deblur.evaluation.metrics import psnr
    from napari_mpt_deblur.models import RGB_MODEL

    viewer = make_napari_viewer_proxy()
    viewer.open_sample(PLUGIN, "defocused_tissue_rgb")
    layer = viewer.layers["stained tissue (RGB), 6 um defocus"]
    before = layer.data.copy()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Deblur")
    widget.model.value = RGB_MODEL
    widget.image.value = layer
    widget.output_dtype.value = "input"
    assert widget.run() is not None
    wait_for_worker(widget)
    out = viewer.layers[f"{layer.name} deblurred ({RGB_MODEL})"]
    assert out.rgb and out.data.shape == (256, 320, 3) and out.data.dtype == np.uint8
    assert out.metadata["mpt_deblur"]["axes"] == "YXC"
    np.testing.assert_array_equal(layer.data, before)
    sharp = tissue_rgb().astype(np.float64) / 255
    gain = psnr(np.asarray(out.data) / 255, sharp) - psnr(layer.data / 255, sharp)
    assert gain > 1.0, gain  # the colour model restores the blurred section (measured: see docs/models.md)
