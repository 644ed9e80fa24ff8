"""StarDist compare widget in a real napari viewer: labels layers, table, plot, CSV."""

from __future__ import annotations

import csv

import numpy as np
import pytest

pytestmark = pytest.mark.napari
stardist_matching = pytest.importorskip("stardist.matching")


@pytest.fixture
def nuclei_pair():
    """The bundled U2OS sample (sharp) and a realistic defocused version of it (4 um, 20x/0.45)."""
    from napari_mpt_deblur.data.normalisation import normalise, percentile_range
    from napari_mpt_deblur.data.psf import PSFParams
    from napari_mpt_deblur.data.samples import u2os_nuclei
    from napari_mpt_deblur.data.synthesis import synthesize_defocus

    image, labels = u2os_nuclei()
    image, labels = image[:256, :320], labels[:256, :320]
    sharp = normalise(image, *percentile_range(image))
    blurred = synthesize_defocus(sharp, PSFParams(defocus_um=6.0), rng=np.random.default_rng(0))
    return blurred.astype(np.float32), sharp.astype(np.float32), labels


def test_compare_reports_ap_equal_to_stardist_matching(qtbot, wait_for_worker, make_napari_viewer_proxy, nuclei_pair, tmp_path):
    blurred, sharp, gt = nuclei_pair
    viewer = make_napari_viewer_proxy()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "StarDist compare")
    before = viewer.add_image(blurred, name="blurred", scale=(0.645, 0.645))
    after = viewer.add_image(sharp, name="sharp", scale=(0.645, 0.645))
    truth = viewer.add_labels(gt, name="truth", scale=(0.645, 0.645))
    widget.reset_choices()
    widget.before.value, widget.after.value, widget.ground_truth.value = before, after, truth
    worker = widget.run()
    assert worker is not None
    wait_for_worker(widget, 240_000)
    assert widget.status.value.startswith("done"), widget.status.value
    predicted = {name: viewer.layers[f"{name} StarDist"].data for name in ("blurred", "sharp")}
    for name, row in zip(("blurred", "sharp"), widget.rows):
        assert row["layer"] == name
        assert row["objects"] == len(np.unique(predicted[name])) - 1
        for t in (0.5, 0.7, 0.9):
            direct = stardist_matching.matching(gt, predicted[name], thresh=t)
            assert row[f"ap@{t:g}"] == pytest.approx(direct.accuracy, abs=1e-9)
            assert row[f"f1@{t:g}"] == pytest.approx(direct.f1, abs=1e-9)
        assert row["mean_ap"] == pytest.approx(np.mean([row[f"ap@{t:g}"] for t in (0.5, 0.7, 0.9)]))
    assert tuple(viewer.layers["sharp StarDist"].scale) == (0.645, 0.645)
    # Deblurring's upper bound (the sharp image) finds nuclei better than the blurred one.
    assert widget.rows[1]["mean_ap"] > widget.rows[0]["mean_ap"]
    from napari_mpt_deblur._widget_compare import TABLE_COLUMNS

    assert widget.table.shape == (2, len(TABLE_COLUMNS))
    assert widget.table.data[1, TABLE_COLUMNS.index("mean_ap")] == round(widget.rows[1]["mean_ap"], 4)

    out = tmp_path / "compare.csv"
    widget.csv_path.line_edit.value = str(out)
    widget.export_csv()
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image"] for r in rows] == ["before", "after"]
    assert float(rows[1]["mean_ap"]) == pytest.approx(widget.rows[1]["mean_ap"])


def test_compare_rejects_mismatched_shapes(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "StarDist compare")
    a = viewer.add_image(np.zeros((64, 64), np.float32), name="a")
    b = viewer.add_image(np.zeros((64, 80), np.float32), name="b")
    widget.reset_choices()
    widget.before.value, widget.after.value = a, b
    assert widget.run() is None
    assert "same shape" in widget.status.value
