"""The README's first command: the demo writes a deblurred TIFF, a PNG and a table."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile

from napari_mpt_deblur.cli import EXIT_OK, main
from napari_mpt_deblur.data.samples import defocused_bbbc006
from napari_mpt_deblur.demo import DEFAULT_DEMO_MODEL


def test_demo_writes_tiff_png_and_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == EXIT_OK
    log = capsys.readouterr().out
    restored = tifffile.imread(out / "deblurred.tif")
    original = defocused_bbbc006()
    assert restored.shape == original.shape and restored.dtype == original.dtype
    png = (out / "side_by_side.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image"].split(" ")[0] for r in rows] == ["input", "deblurred"]
    for r in rows:
        assert float(r["nvl"]) > 0 and float(r["brenner"]) > 0
    pytest.importorskip("stardist")
    counts = [int(r["nuclei"]) for r in rows]
    # A real field of nuclei ~32 um out of focus: StarDist finds dozens already; the shipped
    # model must let it separate clearly more (measured: 29 before, 67 after).
    assert "UNTRAINED" not in log and f"model: {DEFAULT_DEMO_MODEL}" in log
    assert counts[0] > 20, counts
    assert counts[1] > 1.3 * counts[0], counts
    assert f"StarDist nuclei: {counts[0]} before, {counts[1]} after" in log
    md = (out / "summary.md").read_text()
    assert "| StarDist nuclei |" in md and "UNTRAINED" not in md


def test_demo_without_a_trained_model_says_so_loudly(tmp_path, capsys, monkeypatch):
    import napari_mpt_deblur.demo as demo

    monkeypatch.setattr(demo, "DEFAULT_DEMO_MODEL", "no-such-shipped-model")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-stardist"]) == EXIT_OK
    assert "UNTRAINED random weights" in capsys.readouterr().out
    assert "UNTRAINED WEIGHTS" in (tmp_path / "demo" / "summary.md").read_text()


def test_demo_refuses_unknown_model(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--model", "no-such-model"]) == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_demo_side_by_side_draws_outlines():
    from napari_mpt_deblur.demo import _side_by_side_png

    img = np.zeros((40, 50), np.float32)
    img[10:20, 10:20] = 1
    labels = np.zeros((40, 50), np.int32)
    labels[10:20, 10:20] = 1
    plain = _side_by_side_png(img, img, ("a", "b"), None)
    drawn = _side_by_side_png(img, img, ("a", "b"), None, (labels, labels))
    assert plain != drawn
