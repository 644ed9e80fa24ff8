"""Engine I/O: zarr streaming and cancel marking, TIFF (incl. LZW) via the CLI, dask.distributed.

Real files only: zarr stores and TIFFs are written to tmp dirs and read back; the LZW TIFF is
written by tifffile with ``compression="lzw"`` and the real BBBC006 LZW file is used as published.
Models are seeded, untrained tiny networks (equality checks do not need trained weights).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import tifffile
import torch
import zarr

from napari_mpt_deblur.cli import main
from napari_mpt_deblur.inference import Cancelled, Deblurrer
from napari_mpt_deblur.io.images import read_image
from napari_mpt_deblur.models.config import preset_config
from napari_mpt_deblur.models.registry import LoadedModel, ModelRecord, build_model, save_model



@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(preset_config("h2t_unet", "tiny", 1))
    d = tmp_path_factory.mktemp("models")
    save_model(model, d / "h2t-tiny", trained=False)
    return str(d / "h2t-tiny.json")


@pytest.fixture(scope="module")
def engine(model_path):
    return Deblurrer(model_path, tile=64, overlap=16)


@pytest.fixture(scope="module")
def stack():
    from napari_mpt_deblur.data.samples import defocused_bbbc006

    img = defocused_bbbc006()
    return np.stack([img[20 * z : 20 * z + 96, 30 * z : 30 * z + 128] for z in range(4)])  # (4, 96, 128) uint16


@pytest.fixture()
def zarr_input(tmp_path, stack):
    path = tmp_path / "input.zarr"
    arr = zarr.create_array(str(path), shape=stack.shape, chunks=(2, 48, 128), dtype=stack.dtype)
    arr[:] = stack
    return path


def _status(path):
    return dict(zarr.open_group(str(path), mode="r").attrs)["mpt_deblur"]


def test_zarr_streaming_round_trip_with_ome_metadata(engine, zarr_input, stack, tmp_path):
    src = read_image(zarr_input)
    assert src.axes == "ZYX" and src.axes_from == "guessed"
    out = tmp_path / "out.zarr"
    progress = []
    engine.write_zarr(src, out, progress=lambda d, t: progress.append((d, t)))
    expected = engine.deblur_array(stack, "ZYX")
    group = zarr.open_group(str(out), mode="r")
    status = dict(group.attrs)["mpt_deblur"]
    assert status["complete"] is True and status["state"] == "complete"
    assert status["planes_done"] == status["planes_total"] == 4
    assert status["ome"] == "written" and status["settings"]["tile"] == 64
    assert status["input"]["path"] == str(zarr_input) and status["model"]["name"] == "h2t-tiny"
    multiscales = dict(group.attrs)["ome"]["multiscales"][0]
    assert [a["name"] for a in multiscales["axes"]] == ["z", "y", "x"]
    assert group["0"].chunks == (1, 96, 128) and group["0"].dtype == np.float32
    np.testing.assert_allclose(group["0"][:], expected, rtol=1e-6, atol=1e-3)
    assert progress[-1][0] == progress[-1][1] == 4 * engine.tiles_per_plane(96, 128)
    # The OME-Zarr output reads back as an input with its axes from the file.
    again = read_image(out)
    assert again.axes == "ZYX" and again.axes_from == "file"
    np.testing.assert_array_equal(again.data.compute(), group["0"][:])


def test_cancel_mid_stack_leaves_an_incomplete_store_and_the_input_untouched(engine, zarr_input, stack, tmp_path):
    out = tmp_path / "cancelled.zarr"
    event = threading.Event()
    per_plane = engine.tiles_per_plane(96, 128)

    def progress(done, total):
        if done >= 2 * per_plane + 1:  # one tile into the third plane
            event.set()

    with pytest.raises(Cancelled) as info:
        engine.write_zarr(read_image(zarr_input), out, progress=progress, cancel=event)
    assert info.value.planes_done == 2 and info.value.planes_total == 4
    assert info.value.output == str(out) and "incomplete output left at" in str(info.value)
    status = _status(out)
    assert status["complete"] is False and status["state"] == "cancelled" and status["planes_done"] == 2
    group = zarr.open_group(str(out), mode="r")
    assert "multiscales" not in dict(group.attrs).get("ome", {}), "an incomplete store must not look like OME-Zarr"
    data = group["0"][:]
    assert np.isnan(data[2:]).all() and np.isfinite(data[:2]).all()
    np.testing.assert_allclose(data[:2], engine.deblur_array(stack[:2], "ZYX"), rtol=1e-6, atol=1e-3)
    with pytest.raises(ValueError, match="incomplete mpt-deblur output \\(2 of 4 planes written; the write was cancelled\\)"):
        read_image(out)
    np.testing.assert_array_equal(zarr.open_array(str(zarr_input), mode="r")[:], stack)


def test_outputs_are_never_overwritten_unless_asked(engine, stack, tmp_path):
    out = tmp_path / "o.zarr"
    engine.write_zarr(stack[:1], out, axes="ZYX")
    with pytest.raises(FileExistsError, match="already exists"):
        engine.write_zarr(stack[:2], out, axes="ZYX")
    assert zarr.open_group(str(out), mode="r")["0"].shape == (1, 96, 128)
    engine.write_zarr(stack[:2], out, axes="ZYX", overwrite=True)
    assert zarr.open_group(str(out), mode="r")["0"].shape == (2, 96, 128) and _status(out)["complete"]
    folder = tmp_path / "not_a_store.zarr"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a zarr store"):
        engine.write_zarr(stack[:1], folder, axes="ZYX", overwrite=True)
    assert (folder / "precious.txt").read_text() == "keep me"


def test_tiff_stream_round_trip_and_cancel_leaves_no_file(engine, stack, tmp_path):
    out = tmp_path / "out.tif"
    engine.write_tiff(stack, out, axes="ZYX")
    src = read_image(out)
    assert src.axes == "ZYX" and src.axes_from == "file" and src.shape == stack.shape
    np.testing.assert_allclose(src.data.compute(), engine.deblur_array(stack, "ZYX"), rtol=1e-6, atol=1e-3)
    meta = src.metadata["mpt_deblur"]
    assert meta["model"]["name"] == "h2t-tiny" and meta["settings"]["overlap"] == 16 and meta["axes"] == "ZYX"
    with tifffile.TiffFile(out) as tif:
        assert json.loads(tif.pages[0].description)["mpt_deblur"]["model"]["trained"] is False
    target = tmp_path / "cancelled.tif"
    with pytest.raises(Cancelled) as info:
        engine.write_tiff(stack, target, axes="ZYX", cancel=lambda: True)
    assert info.value.planes_done == 0
    assert not target.exists() and not list(tmp_path.glob(".cancelled.tif*")), "no partial TIFF may remain"


def test_cli_lzw_tiff_in_tiff_out(engine, model_path, stack, tmp_path, capsys):
    src = tmp_path / "stack_lzw.tif"
    tifffile.imwrite(src, stack, compression="lzw", photometric="minisblack", metadata={"axes": "ZYX"})
    with tifffile.TiffFile(src) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.LZW
    out = tmp_path / "restored.tif"
    args = ["predict", str(src), str(out), "--model", model_path, "--tile", "64", "--overlap", "16", "--quiet"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    restored = tifffile.imread(out)
    assert restored.shape == stack.shape and restored.dtype == np.float32
    np.testing.assert_allclose(restored, engine.deblur_array(stack, "ZYX"), rtol=1e-6, atol=1e-3)
    before = out.stat().st_mtime_ns
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err and out.stat().st_mtime_ns == before
    assert main(args + ["--overwrite", "--dtype", "input"]) == 0
    assert tifffile.imread(out).dtype == np.uint16


def test_cli_real_bbbc006_lzw_file_to_zarr(model_path, shared_data, tmp_path, capsys):
    real = min((shared_data / "bbbc006_w1" / "defocused_z00").glob("*.tif"))
    with tifffile.TiffFile(real) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.LZW
    out = tmp_path / "real.zarr"
    assert main(["predict", str(real), str(out), "--model", model_path, "--tile", "256", "--quiet", "--dtype", "input"]) == 0
    arr = zarr.open_group(str(out), mode="r")["0"]
    assert arr.shape == (520, 696) and arr.dtype == np.uint16 and _status(out)["complete"]


def test_cli_errors_are_readable(model_path, stack, tmp_path, capsys):
    src = tmp_path / "plane.tif"
    tifffile.imwrite(src, stack[0])
    cases = [
        (["predict", str(src), str(tmp_path / "a.tif"), "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["predict", str(tmp_path / "missing.tif"), str(tmp_path / "b.tif"), "--model", model_path], "input not found"),
        (["predict", str(src), str(tmp_path / "c.tif"), "--model", model_path, "--axes", "ZYX"],
         "--axes ZYX has 3 letters but"),
        (["predict", str(src), str(tmp_path / "d.png"), "--model", model_path], "unsupported output"),
        (["predict", str(src), str(tmp_path / "e.tif"), "--model", model_path, "--tile", "100"],
         "tile 100 is not a multiple of 8"),
        (["predict", str(src), str(src), "--model", model_path, "--overwrite"], "is the input file"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        assert message in capsys.readouterr().err


def test_dask_distributed_local_cluster_equals_local(engine, model_path, zarr_input, stack, tmp_path):
    from napari_mpt_deblur.inference.distributed import cluster_client

    local = engine.deblur_array(stack, "ZYX")
    with cluster_client("local", processes=False, threads_per_worker=1) as client:
        out = tmp_path / "cluster.zarr"
        progress = []
        engine.write_zarr(read_image(zarr_input), out, client=client, progress=lambda d, t: progress.append(d))
        np.testing.assert_allclose(zarr.open_group(str(out), mode="r")["0"][:], local, rtol=1e-6, atol=1e-3)
        assert _status(out)["complete"] and len(progress) == 4
        tiff = tmp_path / "cluster.tif"
        engine.write_tiff(stack, tiff, axes="ZYX", client=client)
        np.testing.assert_allclose(tifffile.imread(tiff), local, rtol=1e-6, atol=1e-3)
        lazy = engine.deblur(stack, "ZYX")  # computed by the cluster (the client is the default scheduler)
        np.testing.assert_allclose(client.compute(lazy).result(), local, rtol=1e-6, atol=1e-3)
        in_memory = Deblurrer(LoadedModel(build_model(preset_config("h2t_unet", "tiny", 1)),
                                          ModelRecord(name="scratch", architecture=preset_config("h2t_unet", "tiny", 1)),
                                          None), tile=64)
        with pytest.raises(TypeError, match="exists only in memory"):
            in_memory.deblur_array(stack, "ZYX", client=client)


def test_worker_processes_load_the_model_once(model_path, stack):
    from napari_mpt_deblur.inference.distributed import cluster_client, worker_model_loads

    engine = Deblurrer(model_path, tile=64, overlap=16)
    local = engine.deblur_array(stack, "ZYX")
    with cluster_client("local", n_workers=1, threads_per_worker=2, processes=True, torch_threads=1) as client:
        remote = engine.deblur_array(stack, "ZYX", client=client)
        loads = worker_model_loads(client)
    np.testing.assert_allclose(remote, local, rtol=1e-5, atol=1e-2)
    assert list(loads.values()) == [1], f"each worker must read the model once for 4 planes: {loads}"


def test_run_record_round_trips_through_tiff_and_zarr(model_path, stack, tmp_path):
    """read_image gives back the typed run record that the engine stores on a napari layer
    (``Deblurrer.metadata()``, the Deblur widget's in-memory path), for TIFF and zarr outputs."""
    from napari_mpt_deblur.io.run_record import RunRecord

    engine = Deblurrer(model_path, tile=64, overlap=16, output_dtype="input")
    layer_record = RunRecord.from_metadata(engine.metadata())
    sha = layer_record.model.weights_sha256
    assert len(sha) == 64 and sha == json.loads(open(model_path).read())["weights_sha256"]
    for out in (tmp_path / "out.tif", tmp_path / "out.zarr"):
        if out.suffix == ".tif":
            engine.write_tiff(stack, out, axes="ZYX")
        else:
            engine.write_zarr(stack, out, axes="ZYX")
        record = read_image(out).run_record
        assert isinstance(record, RunRecord), out
        assert record.model.weights_sha256 == sha
        assert record.settings == layer_record.settings
        assert record.settings.tile == 64 and record.settings.overlap == 16
        assert record.settings.output_dtype == "input"
        assert record.settings_in_use == record.settings  # no out-of-memory fallback on this run
        assert record.complete is True
        assert record.seconds is not None and record.seconds > 0
        assert record.input.shape == [4, 96, 128] and record.input.dtype == "uint16"
        assert record.axes == "ZYX" and record.output_dtype == "uint16"
        assert record.versions["napari-mpt-deblur"] == layer_record.version
    assert read_image(tmp_path / "out.tif", axes="ZYX").run_record is not None
    assert read_image(_write_plain_tiff(tmp_path / "plain.tif", stack)).run_record is None


def _write_plain_tiff(path, data):
    tifffile.imwrite(path, data, photometric="minisblack")
    return path
