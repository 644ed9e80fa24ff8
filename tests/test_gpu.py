"""GPU checks (``pytest -m gpu``): run by scripts/gpu/run_all.sh on a CUDA machine, skipped without one.

This module imports only the library, torch and numpy (no napari, Qt or TensorFlow), so it also
runs on the bare GPU image with the carried wheels. Every test needs CUDA and is skipped cleanly
(one line each, reason "no CUDA GPU") elsewhere, which is what CI sees.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from napari_mpt_deblur.models.config import preset_config
from napari_mpt_deblur.models.registry import build_model, save_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gpu_models")
    save_model(build_model(preset_config("mpt", "tiny", 1)), d / "mpt-tiny", trained=False)
    return str(d / "mpt-tiny.json")


@pytest.fixture(scope="module")
def plane():
    from napari_mpt_deblur.data.samples import u2os_nuclei  # deflate TIFF: no imagecodecs needed

    img = np.asarray(u2os_nuclei()[0])
    assert img.shape == (520, 696)
    return img.astype(np.float32)


def _psnr_gap(a, b):
    """max |a - b| relative to the range of b."""
    return float(np.abs(a - b).max() / (b.max() - b.min()))


def test_cuda_forward_matches_cpu_forward_within_bf16_tolerance(model_path, plane):
    from napari_mpt_deblur.inference import Deblurrer

    cpu = Deblurrer(model_path, device="cpu", tile=256, overlap=32, pipeline=False).deblur_plane(plane)
    fp32 = Deblurrer(model_path, device="cuda", tile=256, overlap=32, precision="fp32").deblur_plane(plane)
    bf16 = Deblurrer(model_path, device="cuda", tile=256, overlap=32, precision="bf16").deblur_plane(plane)
    assert _psnr_gap(fp32, cpu) < 1e-3  # TF32 matmuls may be on: ~1e-4 of the range
    assert _psnr_gap(bf16, cpu) < 3e-2  # bf16 has 8 bits of mantissa
    assert np.corrcoef(bf16.ravel(), cpu.ravel())[0, 1] > 0.999


def test_tiled_equals_whole_on_cuda_within_the_seam_error(model_path, plane):
    from napari_mpt_deblur.inference import Deblurrer

    whole = Deblurrer(model_path, device="cuda", tile=768, overlap=0, precision="fp32").deblur_plane(plane)
    tiled = Deblurrer(model_path, device="cuda", tile=256, overlap=64, precision="fp32").deblur_plane(plane)
    # Same bounds as the CPU suite's MPT seam-error test (global channel attention sees each tile's
    # own statistics; measured on the CPU for this untrained model: mean 0.019, max 0.20 of the range).
    lo, hi = np.percentile(plane, [0.1, 99.9])
    err = np.abs(tiled - whole) / (hi - lo)
    assert err.mean() < 0.07 and np.percentile(err, 99) < 0.3
    assert np.corrcoef(tiled.ravel(), whole.ravel())[0, 1] > 0.95
    # ... and the seams are the CPU's: the tiled CUDA result equals the tiled CPU result.
    cpu = Deblurrer(model_path, device="cpu", tile=256, overlap=64, pipeline=False).deblur_plane(plane)
    assert _psnr_gap(tiled, cpu) < 1e-3


def test_batched_stack_on_cuda_equals_per_plane_and_sizes_its_batch(model_path, plane):
    from napari_mpt_deblur.inference import Deblurrer

    stack = np.stack([np.roll(plane, 13 * i, axis=1) for i in range(8)])
    ref = Deblurrer(model_path, device="cuda", tile=256, overlap=32, precision="fp32", batch_size=1,
                    pipeline=False).deblur_array(stack, "ZYX")
    engine = Deblurrer(model_path, device="cuda", tile=256, overlap=32, precision="fp32")
    out = engine.deblur_array(stack, "ZYX")
    assert engine.settings.batch_auto and engine.current_tile[2] > 1
    assert any("sized from" in e for e in engine.events)
    assert _psnr_gap(out, ref) < 1e-3


def test_out_of_memory_back_off_on_cuda(model_path, plane, fake_oom_model):
    from napari_mpt_deblur.inference import Deblurrer

    engine = Deblurrer(model_path, device="cuda", tile=512, overlap=32, batch_size=8, precision="fp32")
    engine.model = fake_oom_model(engine.model, max_pixels=256 * 256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = engine.deblur_array(np.stack([plane, plane[::-1]]), "ZYX")
    assert engine.current_tile[0] <= 256 and engine.events
    ref = Deblurrer(model_path, device="cuda", tile=engine.current_tile[0], overlap=engine.current_tile[1],
                    precision="fp32", pipeline=False).deblur_array(np.stack([plane, plane[::-1]]), "ZYX")
    assert _psnr_gap(out, ref) < 1e-3
    # A real allocation failure is recognised too.
    try:
        torch.empty(1 << 50, dtype=torch.uint8, device="cuda")
    except Exception as exc:  # noqa: BLE001 - the point is what type it has
        from napari_mpt_deblur.inference.engine import is_out_of_memory

        assert is_out_of_memory(exc)
    torch.cuda.empty_cache()


def test_bf16_training_steps_on_cuda(tmp_path):
    import tifffile

    from napari_mpt_deblur.data.samples import in_focus_bbbc006
    from napari_mpt_deblur.training.config import parse_config
    from napari_mpt_deblur.training.trainer import Trainer

    sharp = tmp_path / "sharp"
    sharp.mkdir()
    img = in_focus_bbbc006()  # deflate TIFF: readable without imagecodecs
    for i, (y, x) in enumerate([(0, 0), (0, 300), (250, 0), (250, 300)]):
        tifffile.imwrite(sharp / f"img{i}.tif", img[y : y + 200, x : x + 240])
    cfg = parse_config({
        "name": "gpu-step", "out_dir": str(tmp_path / "run"), "steps": 3, "batch_size": 4, "progress": False,
        "checkpoint_every": 100, "model": {"arch": "mpt", "preset": "tiny"}, "device": "cuda", "precision": "bf16",
        "data": [{"kind": "synthetic", "sharp": str(sharp), "defocus": {"max_kernel": 33}}], "patch": {"size": 64},
    })
    trainer = Trainer(cfg)
    assert trainer.device.type == "cuda"
    before = {k: v.detach().clone() for k, v in trainer.net.state_dict().items()}
    seen = []
    result = trainer.run(callback=lambda r: seen.append(r))
    assert result.steps_done == 3 and len(seen) == 3
    assert all(np.isfinite(r.losses["loss"]) for r in seen)
    after = trainer.net.state_dict()
    assert sum(not torch.equal(v, after[k]) for k, v in before.items()) > 0.5 * len(before)
