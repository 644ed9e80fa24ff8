"""bioimage.io packages: export, bioimageio.core's own test (offline), and the way back into our tools.

The shipped models are exported and tested by bioimageio.core exactly as the model zoo's CI would
(test tensors reproduced, inference at several sizes and batch sizes), with no network: the machine
running the suite has none.
"""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
import tifffile
import torch
import yaml

pytest.importorskip("bioimageio.core")

from napari_mpt_deblur.cli import main  # noqa: E402
from napari_mpt_deblur.data.samples import defocused_bbbc006  # noqa: E402
from napari_mpt_deblur.inference.engine import Deblurrer, InferenceSettings  # noqa: E402
from napari_mpt_deblur.io.bioimageio import (  # noqa: E402
    BioimageioError,
    export_bioimageio,
    import_bioimageio,
    run_bioimageio_test,
)
from napari_mpt_deblur.models.config import preset_config  # noqa: E402
from napari_mpt_deblur.models.registry import ModelFileError, build_model, load_model, save_model  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # Imported packages unpack into a per-test cache, never the user's.
    monkeypatch.setenv("MPT_DEBLUR_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def h2t_package(tmp_path_factory):
    """The shipped H2T U-Net exported through the CLI (both weight formats), once for the module."""
    out = tmp_path_factory.mktemp("bioimageio") / "h2t-unet-fluo.zip"
    assert main(["export", "h2t-unet-fluo", "--format", "bioimageio", "--out", str(out)]) == 0
    return out


def _rdf(package) -> dict:
    with zipfile.ZipFile(package) as zf:
        return yaml.safe_load(zf.read("rdf.yaml"))


def _assert_passed(summary) -> None:
    assert summary.status == "passed", summary.format()


@pytest.mark.slow
# torch 2.13 deprecates torch.jit in favour of torch.export, but torchscript is the format
# deepImageJ/Fiji load, so the package keeps it; bioimageio.core's torch.jit.load warns here.
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_shipped_h2t_package_passes_bioimageio_core_test_offline(h2t_package):
    rdf = _rdf(h2t_package)
    assert rdf["format_version"].startswith("0.5.")
    assert set(rdf["weights"]) == {"pytorch_state_dict", "torchscript"}
    arch = rdf["weights"]["pytorch_state_dict"]["architecture"]
    assert arch["callable"] == "build_deblur_network" and len(arch["sha256"]) == 64
    (inp,), (outp,) = rdf["inputs"], rdf["outputs"]
    y_axis = next(a for a in inp["axes"] if a.get("id") == "y")
    assert y_axis["size"] == {"min": 64, "step": 64}  # H2T paper preset: 2**(3 + 3)
    assert next(a for a in outp["axes"] if a.get("id") == "x")["halo"] == 16
    scale_range = next(p for p in inp["preprocessing"] if p["id"] == "scale_range")["kwargs"]
    assert (scale_range["min_percentile"], scale_range["max_percentile"]) == (0.1, 99.9)
    cites = " ".join(c["text"] for c in rdf["cite"])
    assert "Multi-Pyramid Transformer" in cites and "Head-to-Tail" in cites and "BBBC006" in cites
    assert rdf["license"] == "BSD-3-Clause"
    with zipfile.ZipFile(h2t_package) as zf:
        readme = zf.read("README.md").decode()
        assert "4500 steps" in readme and "normalised units" in readme
        cover = zf.read(rdf["covers"][0]["source"])
        assert cover[:8] == b"\x89PNG\r\n\x1a\n"
    # bioimageio.core reproduces the test output from the test input with every weight format.
    _assert_passed(run_bioimageio_test(h2t_package))


@pytest.mark.slow
def test_round_trip_predict_from_package_equals_original(h2t_package, tmp_path):
    image = defocused_bbbc006()[100:420, 50:450]  # not a multiple of 64: padding and cropping included
    src = tmp_path / "blurry.tif"
    tifffile.imwrite(src, image)
    out_pkg, out_orig = tmp_path / "from_package.tif", tmp_path / "from_original.tif"
    assert main(["predict", str(src), str(out_pkg), "--model", str(h2t_package), "--quiet"]) == 0
    assert main(["predict", str(src), str(out_orig), "--model", "h2t-unet-fluo", "--quiet"]) == 0
    a, b = tifffile.imread(out_pkg), tifffile.imread(out_orig)
    assert a.shape == image.shape and float(np.abs(a - b).max()) <= 1e-4 * float(np.abs(b).max())

    # Our engine on the package's test input gives its test output (in normalised units), which
    # bioimageio.core reproduces with every weight format (previous test): the same numbers both ways.
    with zipfile.ZipFile(h2t_package) as zf:
        zf.extractall(tmp_path / "pkg")
    x = np.load(tmp_path / "pkg" / "test_input.npy")
    theirs = np.load(tmp_path / "pkg" / "test_output.npy")[0, 0]
    engine = Deblurrer(str(h2t_package), InferenceSettings(device="cpu", tile=256, overlap=0))
    ours = engine.deblur_plane(x[0, 0])
    lo, hi = np.percentile(x[0, 0], [0.1, 99.9])
    np.testing.assert_allclose((ours - lo) / (hi - lo), theirs, atol=1e-4)


@pytest.mark.slow
def test_shipped_mpt_package_passes_bioimageio_core_test_offline(tmp_path):
    out = tmp_path / "mpt-small-fluo"  # a folder this time
    result = export_bioimageio("mpt-small-fluo", out, torchscript=False)
    assert (out / "rdf.yaml").is_file() and result.weight_formats == ["pytorch_state_dict"]
    assert result.architecture_max_diff == 0.0
    rdf = yaml.safe_load((out / "rdf.yaml").read_text())
    assert next(a for a in rdf["inputs"][0]["axes"] if a.get("id") == "x")["size"] == {"min": 128, "step": 128}
    _assert_passed(run_bioimageio_test(out))
    # The folder form loads as a model too, with the shipped weights bit for bit.
    loaded, shipped = load_model(out), load_model("mpt-small-fluo")
    assert loaded.record.orientations == shipped.record.orientations == 4  # the record travels with it
    assert "in 4 orientations" in (out / "README.md").read_text()
    for key, value in shipped.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_colour_model_package_normalises_all_channels_together_and_passes_the_core_test(tmp_path):
    from napari_mpt_deblur.models import RGB_MODEL

    out = tmp_path / "rgb"
    export_bioimageio(RGB_MODEL, out, torchscript=False)
    rdf = yaml.safe_load((out / "rdf.yaml").read_text())
    (inp,) = rdf["inputs"]
    assert next(a for a in inp["axes"] if a["type"] == "channel")["channel_names"] == ["channel0", "channel1", "channel2"]
    # one range for all three channels, as training and our engine normalise a colour image
    scale_range = next(p for p in inp["preprocessing"] if p["id"] == "scale_range")["kwargs"]
    assert scale_range["axes"] == ["channel", "y", "x"]
    x = np.load(out / "test_input.npy")
    assert x.shape[:2] == (1, 3) and not np.array_equal(x[0, 0], x[0, 2])  # the real colour sample
    assert tifffile.imread(out / "sample_input.tif").shape == x.shape[1:]
    assert "stained tissue sections" in (out / "README.md").read_text()
    _assert_passed(run_bioimageio_test(out))
    # our engine on the test input (channels last, as napari holds RGB) gives the test output
    engine = Deblurrer(str(out), InferenceSettings(device="cpu", tile=x.shape[-1], overlap=0, orientations=1))
    ours = np.moveaxis(engine.deblur_plane(np.moveaxis(x[0], 0, -1)), -1, 0)
    lo, hi = np.percentile(x[0], [0.1, 99.9])
    np.testing.assert_allclose((ours - lo) / (hi - lo), np.load(out / "test_output.npy")[0], atol=1e-4)


@pytest.fixture
def tiny_package(tmp_path):
    torch.manual_seed(0)
    model_file = save_model(build_model(preset_config("mpt", "tiny", 1)), tmp_path / "tiny-test", trained=False)
    out = tmp_path / "tiny.zip"
    export_bioimageio(model_file, out, torchscript=False, test_side=128)  # small test tensors: fast
    return model_file, out


def test_export_refuses_existing_output_and_import_checks_attachments(tiny_package, tmp_path):
    model_file, package = tiny_package
    with pytest.raises(BioimageioError, match="already exists"):
        export_bioimageio(model_file, package)
    assert main(["export", str(model_file), "--format", "bioimageio", "--out", str(package)]) == 1
    precious = tmp_path / "my-data"
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    with pytest.raises(BioimageioError, match="not a bioimage.io package; refusing"):
        export_bioimageio(model_file, precious, overwrite=True)
    assert (precious / "keep.txt").read_text() == "x"
    record = import_bioimageio(package)
    assert record.name == "tiny-test.json" and record.with_suffix(".safetensors").is_file()
    assert json.loads(record.read_text())["trained"] is False

    # A tampered weights attachment is refused, naming the file.
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(package) as zf:
        zf.extractall(folder)
    data = bytearray((folder / "tiny-test.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "tiny-test.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="tiny-test.safetensors does not match its SHA-256"):
        load_model(folder)

    # A bioimage.io model from another tool is refused with the reason, not unpickled.
    foreign = tmp_path / "foreign"
    shutil.copytree(folder, foreign)
    rdf = yaml.safe_load((foreign / "rdf.yaml").read_text())
    del rdf["config"]["napari_mpt_deblur"]
    (foreign / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    with pytest.raises(ModelFileError, match="not exported by napari-mpt-deblur"):
        load_model(foreign / "rdf.yaml")


@pytest.mark.slow
@pytest.mark.napari
def test_deblur_widget_accepts_a_package(make_napari_viewer_proxy, qtbot, wait_for_worker, tiny_package):
    model_file, package = tiny_package
    viewer = make_napari_viewer_proxy()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "Deblur")
    image = defocused_bbbc006()[:128, :192]
    widget.image.value = viewer.add_image(image, name="blurry")
    widget.model_file.value = str(package)
    assert widget.run() is not None
    wait_for_worker(widget)
    out = viewer.layers["blurry deblurred (tiny-test)"].data
    expected = Deblurrer(str(model_file), InferenceSettings(device="cpu")).deblur_plane(image)
    np.testing.assert_allclose(out, expected, atol=1e-4 * float(np.abs(expected).max()))


def test_package_readme_tells_a_single_pass_consumer_how_to_average():
    """The README of a package says how to reproduce the averaging the record asks for; a model
    that asks for none gets no such paragraph."""
    from napari_mpt_deblur.io.bioimageio import _averaging_note

    tiny, small, unet = (load_model(name).record for name in ("mpt-tiny-fluo", "mpt-small-fluo", "h2t-unet-fluo"))
    assert "moved by one pixel" in _averaging_note(tiny) and "orientations" not in _averaging_note(tiny)
    assert "in 4 orientations" in _averaging_note(small) and "one pixel" not in _averaging_note(small)
    assert _averaging_note(unet) == ""
