"""The npe2 manifest: it validates, and every sample loads through napari."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.napari


def test_manifest_validates():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-mpt-deblur")
    assert {w.display_name for w in manifest.contributions.widgets} == {
        "Deblur", "Fine-tune with EFCRex", "StarDist compare"}
    assert len(manifest.contributions.sample_data) == 4


def test_samples_load_through_the_manifest(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    for key in ("defocused_bbbc006", "in_focus_bbbc006", "u2os_nuclei", "synthetic_defocus_stack"):
        viewer.open_sample("napari-mpt-deblur", key)
    names = [layer.name for layer in viewer.layers]
    assert names == ["defocused BBBC006 z00", "in-focus BBBC006", "U2OS nuclei", "U2OS nuclei labels",
                     "synthetic defocus z-stack (U2OS)"]
    assert viewer.layers["defocused BBBC006 z00"].data.dtype == np.uint16
    assert viewer.layers["U2OS nuclei labels"].data.max() == 119
    stack = viewer.layers["synthetic defocus z-stack (U2OS)"]
    assert stack.data.shape == (7, 520, 696) and tuple(stack.scale) == (4.0, 0.645, 0.645)
    # Plane 3 is in focus: it is the sharpest of the stack.
    from napari_mpt_deblur.evaluation.sharpness import brenner

    scores = [brenner(p) for p in stack.data]
    assert int(np.argmax(scores)) == 3


def test_importing_the_package_is_light():
    import subprocess
    import sys

    code = ("import sys, napari_mpt_deblur, napari_mpt_deblur._sample_data; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'napari') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
