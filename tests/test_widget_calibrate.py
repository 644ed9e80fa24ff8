"""Calibrate widget in a real napari viewer: optics pre-filled from layers and files, bad settings
refused on the GUI thread, a short real calibration saved with its optics and listed by Deblur."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_mpt_deblur.models import RECOMMENDED_MODEL

pytestmark = pytest.mark.napari

WIDGET = "Calibrate to my microscope"


@pytest.fixture
def viewer(make_napari_viewer_proxy, tmp_path, monkeypatch):
    monkeypatch.setenv("MPT_DEBLUR_MODELS_DIR", str(tmp_path / "user-models"))
    return make_napari_viewer_proxy()


def _widget(viewer):
    return viewer.window.add_plugin_dock_widget("napari-mpt-deblur", WIDGET)[1]


def test_optics_prefilled_from_layer_scale_metadata_and_file(viewer, tmp_path):
    from napari_mpt_deblur._widget_calibrate import AIR_ASSUMED, IMMERSION_UNKNOWN, NOT_KNOWN

    layer = viewer.add_image(np.zeros((64, 64), np.float32), name="cells", scale=(0.645, 0.645), units=("um", "um"))
    widget = _widget(viewer)
    assert widget.optics_layer.value.name == layer.name == "cells"  # opens on the layer in view
    assert widget.pixel_um.value == pytest.approx(0.645)
    assert widget.sources["pixel_um"] == "scale of layer 'cells' (0.645 um)"
    # What the layer does not say is left for the user, and said so.
    assert widget.na.value == 0 and widget.wavelength_nm.value == 0
    assert widget.na.native.text() == "not known"
    assert f"NA: {NOT_KNOWN}" in widget.optics_sources.value
    assert f"emission wavelength: {NOT_KNOWN}" in widget.optics_sources.value
    assert widget.sources["immersion_index"] == IMMERSION_UNKNOWN and widget.immersion.value == "air"
    widget.na.value = 0.3  # a dry objective's NA: air is assumed, as the CLI does, and said so
    assert widget.sources["na"] == "entered" and widget.sources["immersion_index"] == AIR_ASSUMED
    widget.na.value = 1.3
    assert widget.sources["immersion_index"] == IMMERSION_UNKNOWN
    assert "pixel size: scale of layer 'cells' (0.645 um)" in widget.optics_sources.value

    # Another length unit is converted; napari's default unit (pixel) says nothing.
    nm = viewer.add_image(np.zeros((64, 64), np.float32), name="in nm", scale=(107.5, 107.5), units=("nm", "nm"))
    widget.optics_layer.value = nm
    assert widget.pixel_um.value == pytest.approx(0.1075)
    assert widget.sources["pixel_um"] == "scale of layer 'in nm' (107.5 nm)"
    plain = viewer.add_image(np.zeros((64, 64), np.float32), name="no units", scale=(2.0, 2.0))
    widget.optics_layer.value = plain
    assert widget.pixel_um.value == pytest.approx(0.1075)  # kept, with its source
    assert widget.sources["pixel_um"] == "scale of layer 'in nm' (107.5 nm)"

    # A layer that states its optics, as the plugin's synthetic z-stack sample does (test_plugin).
    optics = {"na": 0.45, "immersion_index": 1.0, "wavelength_um": 0.461, "pixel_um": 0.645}
    stated = viewer.add_image(np.zeros((3, 64, 64), np.float32), name="stack", metadata={"optics": optics})
    widget.optics_layer.value = stated
    assert (widget.na.value, widget.immersion.value, widget.wavelength_nm.value) == (pytest.approx(0.45), "air", 461)
    assert widget.sources["na"] == widget.sources["pixel_um"] == "metadata of layer 'stack'"
    assert widget.model_name.value == f"{RECOMMENDED_MODEL}-cal-NA0.45-air-461nm-0.645um"

    # An OME-TIFF opened through napari: NA, immersion and emission from the file's OME-XML (the
    # builtin reader gives the layer no scale, so the pixel size comes from the file too).
    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           '<Instrument ID="Instrument:0"><Objective ID="Objective:0:0" LensNA="1.4" Immersion="Oil"/></Instrument>'
           '<Image ID="Image:0" Name="cells"><ObjectiveSettings ID="Objective:0:0"/>'
           '<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint16" SizeX="64" SizeY="64" SizeC="1" SizeZ="1" '
           'SizeT="1" PhysicalSizeX="0.1075" PhysicalSizeY="0.1075">'
           '<Channel ID="Channel:0:0" SamplesPerPixel="1" EmissionWavelength="520"/><TiffData IFD="0" PlaneCount="1"/>'
           "</Pixels></Image></OME>")
    path = tmp_path / "oil.ome.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16), description=xml, metadata=None)
    (opened,) = viewer.open(path, plugin="napari")
    widget.optics_layer.value = opened
    assert (widget.na.value, widget.immersion.value, widget.wavelength_nm.value) == (pytest.approx(1.4), "oil", 520)
    assert widget.pixel_um.value == pytest.approx(0.1075)
    assert widget.sources["immersion_index"] == "OME-TIFF metadata of oil.ome.tif (Objective Immersion Oil)"
    assert widget.optics().slug() == "NA1.4-oil-520nm-0.1075um"
    assert widget.model_name.value == f"{RECOMMENDED_MODEL}-cal-NA1.4-oil-520nm-0.1075um"

    # The loss plot follows napari's theme.
    from napari.utils.theme import get_theme

    viewer.theme = "light"
    assert widget._figure.get_facecolor()[:3] == pytest.approx(
        tuple(c / 255 for c in get_theme("light").background.as_rgb_tuple()[:3]), abs=0.01)

    # A value typed by the user is marked as such, and a name typed by the user is kept.
    widget.model_name.value = "my objective"
    widget.wavelength_nm.value = 525
    assert widget.sources["wavelength_um"] == "entered"
    assert widget.model_name.value == "my objective"


def test_invalid_settings_are_refused_on_the_gui_thread(viewer):
    widget = _widget(viewer)
    widget.na.value, widget.immersion.value = 1.2, "air"
    widget.wavelength_nm.value, widget.pixel_um.value = 461, 0.645
    assert widget.start() is None and widget.worker is None and widget.calibrator is None
    assert widget.status.value == ("error: NA 1.2 must be below the immersion index 1.0 (air); "
                                   "an oil objective needs immersion 1.518")
    assert widget.start_button.enabled and not widget.stop_button.enabled
    widget.wavelength_nm.value = 0
    assert widget.start() is None and widget.status.value == "error: emission wavelength not known: please enter"
    widget.wavelength_nm.value, widget.immersion.value = 461, "oil"
    widget.bundled.value = False
    assert widget.start() is None
    assert widget.status.value == ("error: calibration needs sharp images: choose sharp layers or include the "
                                   "bundled images")
    widget.bundled.value = True
    viewer.add_image(np.zeros((2, 3, 32, 32), np.float32), name="4d")
    widget.sharp.reset_choices()
    widget.sharp.value = ["4d"]
    assert widget.start() is None
    assert widget.status.value == "error: sharp layer '4d' has shape (2, 3, 32, 32): choose 2D images or z-stacks"
    widget.sharp.value = []
    widget.unlabeled.reset_choices()
    widget.unlabeled.value = viewer.layers["4d"]
    assert widget.start() is None
    assert widget.status.value == "error: blurry layer '4d' has shape (2, 3, 32, 32): choose a 2D image or a z-stack"
    widget.unlabeled.value = None
    widget.time_budget.value = 1
    widget.advanced = {"lr": 5.0}  # a field the dock does not show is still checked
    assert widget.start() is None and widget.status.value == "error: lr: Input should be less than or equal to 1"
    assert widget.work_dir is None  # no work folder made, nothing started


def test_a_failing_run_is_reported_and_leaves_nothing_to_save(viewer, wait_for_worker):
    # A 20 x 20 px "sharp image" and no bundled images: too small to hold back a validation crop,
    # which the run finds out in its worker (the GUI thread only checks the settings).
    viewer.add_image(np.random.default_rng(0).random((20, 20), dtype=np.float32), name="tiny")
    widget = _widget(viewer)
    widget.na.value, widget.wavelength_nm.value, widget.pixel_um.value = 0.45, 461, 0.645
    widget.sharp.reset_choices()
    widget.sharp.value = ["tiny"]
    widget.bundled.value = False
    widget.advanced = {"cpu_threads": 1, "patch": 64, "batch_size": 1}
    assert widget.start() is not None
    wait_for_worker(widget, 300_000)
    assert widget.status.value.startswith("error: "), widget.status.value
    assert widget.start_button.enabled and not widget.stop_button.enabled and not widget.save_button.enabled
    assert widget.save() is None


def _real_sharp():
    from napari_mpt_deblur.data.samples import in_focus_bbbc006

    return in_focus_bbbc006()[:192, :192].astype(np.float32)


@pytest.mark.slow
def test_short_calibration_runs_saves_its_optics_and_is_listed_by_deblur(viewer, wait_for_worker):
    from scipy.ndimage import gaussian_filter

    from napari_mpt_deblur.data.optics import Acquisition
    from napari_mpt_deblur.io.cache import cache_dir
    from napari_mpt_deblur.models.registry import read_record
    from napari_mpt_deblur.data.optics import calibrated_model_name

    sharp = _real_sharp()
    viewer.add_image(sharp, name="in focus", scale=(0.645, 0.645), units=("um", "um"))
    # A z-stack whose middle plane is the sharp one: "best plane of this z-stack".
    stack = np.stack([gaussian_filter(sharp, 3), sharp[::-1], gaussian_filter(sharp, 2)])
    viewer.add_image(stack, name="z-stack", scale=(2.0, 0.645, 0.645), units=("um", "um", "um"))
    _dock, deblur = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "Deblur")
    widget = _widget(viewer)
    assert widget.pixel_um.value == pytest.approx(0.645)
    widget.na.value, widget.wavelength_nm.value = 0.45, 461  # air is assumed for NA 0.45
    widget.sharp.reset_choices()
    widget.sharp.value = ["in focus", "z-stack"]
    widget.time_budget.value = 0.15
    # A tiny run on one thread: small patches and validation crops, frequent validation.
    widget.advanced = {"validate_every": 3, "cpu_threads": 1, "patch": 64, "batch_size": 1,
                       "validation_crop": 64, "validation_images": 1, "warmup_steps": 0}
    worker = widget.start()
    assert worker is not None, widget.status.value
    assert widget.work_dir.parent == cache_dir("calibrate")
    wait_for_worker(widget, 300_000)
    calibrator = widget.calibrator
    assert calibrator is not None, widget.status.value
    trainer = calibrator.trainer
    # The budget (setup included) ends the run: a few steps on an idle machine (13 measured here),
    # fewer when other work holds the cores; the last step is always validated.
    assert trainer.step >= 1 and not trainer.stopped
    assert trainer.last_validation["step"] == trainer.step
    assert len(widget.losses) == trainer.step and all(np.isfinite(widget.losses))
    assert widget._line.get_xdata()[-1] == trainer.step
    assert "z-stack: z-stack of 3 planes, best-focus plane 1 used as sharp image" in calibrator.sharp_notes
    assert {"in focus", "z-stack[z=1]"} <= set(calibrator.train_names + calibrator.val_names)
    # The live PSNR label shows the last validation, the best and the start.
    best, start = trainer.best, calibrator.start_validation
    assert widget.psnr.value.startswith(f"validation PSNR: {trainer.last_validation['psnr']:.2f} dB at step ")
    assert f"(best {best['psnr']:.2f}, start {start['psnr']:.2f})" in widget.psnr.value
    assert widget.save_button.enabled and widget.status.value.startswith(f"finished after {trainer.step} steps")

    optics = Acquisition(na=0.45, immersion_index=1.0, wavelength_um=0.461, pixel_um=0.645)
    assert widget.model_name.value == calibrated_model_name(RECOMMENDED_MODEL, optics)
    assert widget.model_name.value == f"{RECOMMENDED_MODEL}-cal-NA0.45-air-461nm-0.645um"
    path = widget.save()
    assert path is not None, widget.status.value
    record = read_record(path)
    assert record.optics == optics == widget.optics()
    calibration = record.training["calibration"]
    assert calibration["optics_sources"]["pixel_um"] == "scale of layer 'z-stack' (0.645 um)"  # the active layer
    assert calibration["optics_sources"]["na"] == "given in the widget"
    assert calibration["optics_sources"]["immersion_index"] == "assumed: air (NA below 1, no immersion stated)"
    assert calibration["settings"]["time_budget_minutes"] == 0.15
    assert f"{RECOMMENDED_MODEL}-cal-NA0.45-air-461nm-0.645um" in deblur.model.choices
    assert f"{RECOMMENDED_MODEL}-cal-NA0.45-air-461nm-0.645um" in widget.model.choices
    # Saving again under the same name never overwrites.
    assert widget.save() is None and "already exists" in widget.status.value

    # A new run replaces the last one's work folder; Stop while the starting model is still
    # being validated ends the run before its first step, with nothing to save.
    first_work_dir = widget.work_dir
    assert widget.start() is not None
    assert not first_work_dir.exists() and widget.work_dir.is_dir()
    widget.stop()
    wait_for_worker(widget, 300_000)
    assert widget.calibrator.trainer.step == 0 and widget.losses == []
    assert widget.status.value == "stopped before the first step: nothing to save"
    assert not widget.save_button.enabled and widget.save() is None
