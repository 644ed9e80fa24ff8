"""The npe2 manifest: it validates, and every sample loads through napari."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.napari


def test_manifest_validates():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-mpt-deblur")
    assert {w.display_name for w in manifest.contributions.widgets} == {
        "Deblur", "Fine-tune with EFCRex", "Calibrate to my microscope", "StarDist compare"}
    assert len(manifest.contributions.sample_data) == 5


def test_samples_load_through_the_manifest(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    for key in ("defocused_bbbc006", "in_focus_bbbc006", "u2os_nuclei", "synthetic_defocus_stack",
                "defocused_tissue_rgb"):
        viewer.open_sample("napari-mpt-deblur", key)
    names = [layer.name for layer in viewer.layers]
    assert names == ["defocused BBBC006 z00", "in-focus BBBC006", "U2OS nuclei", "U2OS nuclei labels",
                     "synthetic defocus z-stack (U2OS)", "stained tissue (RGB), 6 um defocus"]
    assert viewer.layers["defocused BBBC006 z00"].data.dtype == np.uint16
    assert viewer.layers["U2OS nuclei labels"].data.max() == 119
    stack = viewer.layers["synthetic defocus z-stack (U2OS)"]
    assert stack.data.shape == (7, 520, 696) and tuple(stack.scale) == (4.0, 0.645, 0.645)
    # The optics it was made with, for the Calibrate widget to fill in.
    assert stack.metadata["optics"] == {"na": 0.45, "immersion_index": 1.0, "wavelength_um": 0.461, "pixel_um": 0.645}
    # Every sample is in micrometres at its pixel size: no "Inconsistent units" between samples.
    for layer in viewer.layers:
        assert [str(u) for u in layer.units][-2:] == ["micrometer", "micrometer"], (layer.name, layer.units)
        assert tuple(layer.scale)[-2:] == (0.645, 0.645), layer.name
    # The colour sample: an RGB layer, blurrier than the bundled in-focus section in every channel.
    from scipy.ndimage import gaussian_filter

    from napari_mpt_deblur.data.samples import tissue_rgb
    from napari_mpt_deblur.evaluation.sharpness import brenner

    tissue = viewer.layers["stained tissue (RGB), 6 um defocus"]
    assert tissue.rgb and tissue.data.shape == (256, 320, 3) and tissue.data.dtype == np.uint8
    sharp = tissue_rgb()

    def detail(plane: np.ndarray) -> float:  # band-pass energy: nuclear texture, not pixel noise
        plane = plane.astype(np.float64)
        return float(np.mean((gaussian_filter(plane, 1.5) - gaussian_filter(plane, 4.0)) ** 2))

    for c in range(3):
        assert detail(tissue.data[..., c]) < 0.6 * detail(sharp[..., c])
    assert abs(float(tissue.data.mean()) - float(sharp.mean())) < 3  # same colours, only blurred
    # Plane 3 is in focus: it is the sharpest of the stack.

    scores = [brenner(p) for p in stack.data]
    assert int(np.argmax(scores)) == 3


def test_importing_the_package_is_light():
    import subprocess
    import sys

    code = ("import sys, napari_mpt_deblur, napari_mpt_deblur._sample_data; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'napari') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_manifest_puts_the_widgets_in_napari_layer_menus():
    import subprocess
    import sys
    from pathlib import Path

    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-mpt-deblur")
    menus = {key: [item.command for item in items] for key, items in manifest.contributions.menus.items()}
    assert menus == {
        "napari/layers/filter": ["napari-mpt-deblur.deblur_widget", "napari-mpt-deblur.finetune_widget",
                                 "napari-mpt-deblur.calibrate_widget"],
        "napari/layers/segment": ["napari-mpt-deblur.compare_widget"],
    }
    # The `npe2 validate` command line, from the same environment as the tests.
    npe2 = Path(sys.executable).parent / "npe2"
    result = subprocess.run([str(npe2), "validate", "napari-mpt-deblur"], capture_output=True, text=True)
    assert result.returncode == 0 and "valid" in result.stdout, result.stdout + result.stderr


def test_layers_filter_menu_opens_the_deblur_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    bar = viewer.window._qt_window.menuBar()
    layers = next(a for a in bar.actions() if a.text().replace("&", "") == "Layers").menu()
    filters = next(a for a in layers.actions() if a.text().replace("&", "") in ("Filter", "Filters")).menu()
    entries = {a.text(): a for a in filters.actions()}
    assert {"Deblur (MPT Deblur)", "Fine-tune with EFCRex (MPT Deblur)"} <= set(entries)
    entries["Deblur (MPT Deblur)"].trigger()
    assert "Deblur (MPT Deblur)" in viewer.window.dock_widgets
    segment = next(a for a in layers.actions() if a.text().replace("&", "") == "Segment").menu()
    assert "StarDist compare (MPT Deblur)" in [a.text() for a in segment.actions()]


def test_library_and_cli_work_without_any_qt():
    """magicgui and qtpy live in the `napari` extra: the library and the CLI must not need them."""
    import subprocess
    import sys

    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('qtpy', 'magicgui', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'superqt'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from napari_mpt_deblur.cli import main
import napari_mpt_deblur.inference.engine, napari_mpt_deblur.io.bioimageio, napari_mpt_deblur.models.registry
from napari_mpt_deblur.models.registry import load_model
load_model('h2t-unet-fluo')
sys.exit(main(['info', '--arch', 'h2t_unet', '--preset', 'tiny', '--channels', '1', '--size', '64']))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "h2t-unet-fluo" in result.stdout
