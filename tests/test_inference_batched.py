"""Batched, overlapped inference (several planes' tiles per forward pass, read-ahead thread) and
one GPU per dask worker.

The batched path (``pipeline=True``, the default on GPUs; asked for explicitly here) must give what the plain per-plane path
(``pipeline=False, batch_size=1``: one tile per forward pass, the engine before batching) gives,
within 1e-5 of each plane's normalised range; out-of-memory back-off is exercised by injecting
``torch.OutOfMemoryError`` on the CPU. GPU pinning of workers is tested with fake GPU lists: the
workers are real processes, only the GPUs are ids.
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np
import pytest
import torch

from napari_mpt_deblur.data.normalisation import percentile_range
from napari_mpt_deblur.inference import Cancelled, Deblurrer
from napari_mpt_deblur.models.config import preset_config
from napari_mpt_deblur.models.registry import build_model, save_model


def _save(tmp_dir, name, arch, preset):
    torch.manual_seed(0)
    save_model(build_model(preset_config(arch, preset, 1)), tmp_dir / name, trained=False)
    return str(tmp_dir / f"{name}.json")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {"mpt": _save(d, "mpt-tiny", "mpt", "tiny"), "h2t": _save(d, "h2t-tiny", "h2t_unet", "tiny")}


@pytest.fixture(scope="module")
def small_planes():
    """12 real BBBC006 crops of 200 x 264 (uint16), each shifted: small planes of 4 tiles of 128 px."""
    from napari_mpt_deblur.data.samples import defocused_bbbc006

    img = defocused_bbbc006()
    return np.stack([img[5 * i : 5 * i + 200, 9 * i : 9 * i + 264] for i in range(12)])


def _assert_same_per_plane(a, b, planes, tol=1e-5):
    for z in range(len(planes)):
        lo, hi = percentile_range(planes[z], 0.1, 99.9)  # the models' normalisation percentiles
        err = np.abs(a[z].astype(np.float64) - b[z]).max() / (hi - lo)
        assert err <= tol, f"plane {z}: max difference {err:.2e} of the normalised range"


@pytest.mark.parametrize("arch", [pytest.param("mpt", marks=pytest.mark.slow), "h2t"])  # MPT: ~40 s here
def test_batched_planes_equal_the_per_plane_path(models, small_planes, arch):
    planes = small_planes[:5] if arch == "mpt" else small_planes  # MPT: fewer planes (CPU time)
    reference = Deblurrer(models[arch], tile=128, overlap=16, batch_size=1, pipeline=False)
    assert reference.tiles_per_plane(200, 264) == 6
    before = reference.deblur_array(planes, "ZYX")
    # 16 tiles per batch: two planes (12 tiles) share a forward pass; also fixed planes per group.
    for plane_batch in ((None,) if arch == "mpt" else (None, 1, 5)):
        engine = Deblurrer(models[arch], pipeline=True, tile=128, overlap=16, batch_size=16, plane_batch=plane_batch)
        seen = []
        after = engine.deblur_array(planes, "ZYX", progress=lambda d, t: seen.append((d, t)))
        _assert_same_per_plane(after, before, planes)
        assert seen[-1] == (6 * len(planes),) * 2 and all(b[0] > a[0] for a, b in zip(seen, seen[1:]))
    # A single plane, a float input, and integer output units go through the same path.
    one = Deblurrer(models[arch], pipeline=True, tile=128, overlap=16, batch_size=4, output_dtype="input")
    single = one.deblur_plane(small_planes[3])
    assert single.dtype == np.uint16
    np.testing.assert_allclose(
        single, Deblurrer(models[arch], tile=128, overlap=16, output_dtype="input", pipeline=False
                          ).deblur_plane(small_planes[3]), atol=1)


def test_forward_passes_hold_tiles_of_several_planes(models, small_planes):
    engine = Deblurrer(models["h2t"], pipeline=True, tile=128, overlap=16, batch_size=16)
    shapes = []
    inner = engine.model

    class Spy(torch.nn.Module):
        def forward(self, x):
            shapes.append(tuple(x.shape))
            return inner(x)

    engine.model = Spy()
    engine.deblur_array(small_planes, "ZYX")
    assert shapes[0][:2] == (12, 1)  # 2 planes x 6 tiles in one batch (16 would split a plane)
    assert sum(s[0] for s in shapes) == 12 * 6 and len(shapes) == 6


def test_constant_and_mixed_shape_planes_in_one_stack(models, small_planes):
    data = small_planes[:4].copy()
    data[1] = 7  # constant plane: returned as is, no NaN
    engine = Deblurrer(models["h2t"], pipeline=True, tile=128, overlap=16, batch_size=16)
    out = engine.deblur_array(data, "ZYX")
    np.testing.assert_array_equal(out[1], 7.0)
    ref = Deblurrer(models["h2t"], tile=128, overlap=16, pipeline=False).deblur_array(data, "ZYX")
    _assert_same_per_plane(out, ref, data)
    # A bad plane fails with its own message after the planes before it.
    nan = small_planes[:3].astype(np.float32)
    nan[2, 5, 5] = np.nan
    with pytest.raises(ValueError, match=r"plane Z=2 contains 1 NaN"):
        engine.deblur_array(nan, "ZYX")


def test_out_of_memory_in_the_batched_path_halves_batch_then_tile(models, small_planes, fake_oom_model):
    planes = small_planes[:6]
    reference = Deblurrer(models["h2t"], tile=64, overlap=16, batch_size=1, pipeline=False).deblur_array(planes, "ZYX")
    engine = Deblurrer(models["h2t"], pipeline=True, tile=128, overlap=16, batch_size=16)
    engine.model = fake = fake_oom_model(engine.model, max_pixels=2 * 64 * 64)
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = engine.deblur_array(planes, "ZYX", progress=lambda d, t: seen.append((d, t)))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    # 2 planes x 6 tiles per group: 12 -> 6 -> 3 -> 1 tiles per batch, then 64 px tiles.
    for expected in ("with 12 tiles of", "per batch; retrying with 6", "retrying with 3", "retrying with 1",
                     "tiles; retrying with tile 64"):
        assert any(expected in m for m in messages), (expected, messages)
    assert engine.current_tile == (64, 16, 1)
    assert engine.metadata()["fallbacks"] == engine.events
    assert max(s[0] * s[2] * s[3] for s in fake.shapes[-5:]) <= 2 * 64 * 64
    _assert_same_per_plane(out, reference, planes)
    assert seen[-1][0] == seen[-1][1], "progress must end at its re-planned total"
    fake.max_pixels = 0
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="out of memory on cpu even with one"):
        engine.deblur_array(planes[:2, :64, :64], "ZYX")


def test_cancel_in_the_batched_path_stops_between_batches(models, small_planes):
    engine = Deblurrer(models["h2t"], pipeline=True, tile=128, overlap=16, batch_size=4, plane_batch=1)
    event = threading.Event()

    def progress(done, total):
        if done >= 8:  # set after the first batch of the second plane (6 tiles a plane: batches of 4 and 2)
            event.set()

    with pytest.raises(Cancelled) as info:
        engine.deblur_array(small_planes, "ZYX", progress=progress, cancel=event)
    assert info.value.tiles_done == 10 and info.value.planes_done == 1 and info.value.planes_total == 12
    alive = [t.name for t in threading.enumerate() if t.name.startswith("mpt-deblur-")]
    assert not alive, f"pipeline threads left running: {alive}"


def test_an_abandoned_generator_stops_its_threads(models, small_planes):
    engine = Deblurrer(models["h2t"], pipeline=True, tile=128, overlap=16, batch_size=4)
    prep = engine.prepare(small_planes, "ZYX")
    planes = engine.iter_planes(prep, None)
    index, first = next(planes)
    assert index == (0,) and first.shape == (200, 264)
    planes.close()
    alive = [t.name for t in threading.enumerate() if t.name.startswith("mpt-deblur-")]
    assert not alive, f"pipeline threads left running: {alive}"


# --------------------------------------------------------------------------------------------
# One GPU per dask worker (fake GPU ids; the workers are real processes)


def test_visible_gpus_reads_cuda_visible_devices(monkeypatch):
    from napari_mpt_deblur.inference.distributed import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,-1,5")
    assert visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_assign_gpus_spreads_workers_of_each_host():
    from napari_mpt_deblur.inference.distributed import assign_gpus

    workers = {"tcp://a:3": ("a", 2), "tcp://a:1": ("a", 2), "tcp://a:2": ("a", 2), "tcp://b:1": ("b", 1),
               "tcp://c:1": ("c", 0)}
    assert assign_gpus(workers) == {"tcp://a:1": 0, "tcp://a:2": 1, "tcp://a:3": 0, "tcp://b:1": 0, "tcp://c:1": -1}


def _worker_env():
    from napari_mpt_deblur.inference.devices import _DEFAULT_CUDA_INDEX

    return os.environ.get("CUDA_VISIBLE_DEVICES"), _DEFAULT_CUDA_INDEX


@pytest.mark.slow
def test_two_fake_gpus_give_two_workers_each_pinned_to_its_gpu(monkeypatch):
    from napari_mpt_deblur.inference.distributed import cluster_client, pin_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # "auto" reads this list: two GPUs
    with cluster_client("local", torch_threads=1) as client:
        seen = client.run(_worker_env)
        names = {info["name"]: addr for addr, info in client.scheduler_info()["workers"].items()}
        assert sorted(names) == ["gpu-0", "gpu-1"]
        assert seen[names["gpu-0"]][0] == "0" and seen[names["gpu-1"]][0] == "1"
        # Each worker sees one GPU; spreading them again gives each index 0 of its own list.
        assert set(pin_gpus(client).values()) == {0}
    with pytest.raises(ValueError, match="one worker per GPU"):
        with cluster_client("local", gpus=["0", "1"], n_workers=3):
            pass


def test_the_pipeline_is_a_gpu_default_and_off_on_cpu():
    """On 2 CPU cores the reader/blender threads cost 10% wall time (docs/performance.md), so the
    CPU default is the per-plane path; GPUs overlap reading with computing. An explicit choice wins."""
    from napari_mpt_deblur.inference.settings import InferenceSettings, resolve_settings

    def resolved(device: str, **kw) -> bool:
        return resolve_settings(InferenceSettings(precision="fp32", **kw), torch.device(device), 16).pipeline

    assert resolved("cpu") is False and resolved("cuda") is True
    assert resolved("cpu", pipeline=True) is True and resolved("cuda", pipeline=False) is False
