"""Compiled inference: the option reaches the engine, results match eager, failures fall back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mpt_deblur.cli import build_parser
from napari_mpt_deblur.inference.compiled import COMPILE_DEFAULTS, CompiledForward, compile_wanted, warm_up
from napari_mpt_deblur.inference.engine import Deblurrer, InferenceSettings


def _broken_backend(gm, example_inputs):
    """A torch.compile backend that fails like a missing compiler would (a real callable, no mock)."""
    raise RuntimeError("no C++ compiler found for inductor")


def _plane(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((96, 80)) * 1000).astype(np.uint16)


def test_compile_setting_and_defaults():
    assert InferenceSettings().compile is None
    assert InferenceSettings(compile=True).compile is True
    for device_type, default in COMPILE_DEFAULTS.items():
        assert compile_wanted(None, torch.device(device_type)) is default
    assert compile_wanted(True, torch.device("cpu")) is True
    assert compile_wanted(False, torch.device("cpu")) is False


def test_predict_has_a_compile_flag():
    parser = build_parser()
    base = ["predict", "in.tif", "out.tif", "--model", "h2t-unet-fluo"]
    assert parser.parse_args(base).compile is None
    assert parser.parse_args(base + ["--compile"]).compile is True
    assert parser.parse_args(base + ["--no-compile"]).compile is False


def test_compile_failure_falls_back_to_eager_with_a_warning_and_a_recorded_fallback():
    eager = Deblurrer("h2t-unet-fluo", InferenceSettings(device="cpu", tile=64, overlap=16, compile=False))
    engine = Deblurrer("h2t-unet-fluo", InferenceSettings(device="cpu", tile=64, overlap=16, compile=True))
    engine._compiled_forward = CompiledForward(engine.model, backend=_broken_backend,
                                               on_fallback=engine.events.append)
    plane = _plane()
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no C\\+\\+ compiler.*runs eagerly"):
        out = engine.deblur_plane(plane)
    np.testing.assert_allclose(out, eager.deblur_plane(plane), atol=1e-5)
    assert any("torch.compile failed" in e for e in engine.metadata()["fallbacks"])
    # Later planes go straight to eager, without warning again.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.deblur_plane(_plane(1))


def test_partial_batches_are_padded_to_one_compiled_shape():
    """dynamo's "eager" backend traces and guards like inductor but needs no C++ compiler."""
    model = torch.nn.Conv2d(1, 1, 3, padding=1).eval()
    runner = CompiledForward(model, backend="eager")
    x = torch.rand(3, 1, 16, 16)
    with torch.inference_mode():
        full = runner(x)
        part = runner(x[:2])
        np.testing.assert_allclose(part.numpy(), model(x[:2]).numpy(), atol=1e-6)
        np.testing.assert_allclose(full.numpy(), model(x).numpy(), atol=1e-6)
    assert part.shape == (2, 1, 16, 16)
    assert runner.compiled_shapes == {(3, 1, 16, 16)}


@pytest.mark.slow
def test_inductor_compiled_engine_matches_eager_after_warm_up():
    """Real torch.compile (inductor, C++ on CPU) of the shipped H2T U-Net on 64 px tiles."""
    settings = dict(device="cpu", tile=64, overlap=16)
    eager = Deblurrer("h2t-unet-fluo", InferenceSettings(**settings, compile=False))
    engine = Deblurrer("h2t-unet-fluo", InferenceSettings(**settings, compile=True))
    plane = _plane()
    seconds = warm_up(engine, *plane.shape)
    assert seconds > 0
    runner = engine._compiled_forward
    if runner.failed:  # no working C++ toolchain here: the fallback is what must hold
        pytest.skip(runner.failed)
    shapes = runner.compiled_shapes
    assert len(shapes) == 1
    out = engine.deblur_plane(plane)
    # inductor reorders float sums: agreement to 1e-4 of the plane's range (outputs in input units)
    np.testing.assert_allclose(out, eager.deblur_plane(plane), atol=1e-4 * float(np.ptp(plane)))
    assert runner.compiled_shapes == shapes  # every tile of the plane reused the warmed-up graph
