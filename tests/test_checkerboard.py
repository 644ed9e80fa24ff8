"""Checkerboard (period-2) texture: the Nyquist energy ratio and the fine-tuner (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mpt_deblur.data.samples import defocused_bbbc006
from napari_mpt_deblur.evaluation.spectral import nyquist_energy_ratio


def test_ratio_separates_a_checkerboard_from_camera_noise():
    rng = np.random.default_rng(0)
    image = defocused_bbbc006().astype(np.float64)
    # The real demo image: its Nyquist bins hold no more than its other high frequencies.
    assert nyquist_energy_ratio(image) < 5
    # A checkerboard of 0.5% of the image's range on top of it is found at once.
    span = np.percentile(image, 99.9) - np.percentile(image, 0.1)
    yy, xx = np.indices(image.shape)
    board = image + 0.005 * span * (-1.0) ** (yy + xx)
    assert nyquist_energy_ratio(board) > 100 * nyquist_energy_ratio(image)
    # Period 2 along one axis only counts too; white noise scores about 1.
    stripes = image + 0.005 * span * (-1.0) ** xx
    assert nyquist_energy_ratio(stripes) > 100 * nyquist_energy_ratio(image)
    # White noise scores about 1, steadily (the Welch average): a "within 2x of the input's"
    # acceptance cannot pass or fail by chance.
    scores = [nyquist_energy_ratio(rng.normal(size=(520, 696))) for _ in range(5)]
    assert all(0.8 < s < 1.5 for s in scores), scores
    with pytest.raises(ValueError, match="2D image of at least 8 x 8"):
        nyquist_energy_ratio(np.zeros((4, 4)))


def _restored_ratio(net, record, image, **settings) -> float:
    """Nyquist energy ratio of ``image`` restored on the CPU by ``net`` (with ``record``'s
    normalisation), engine settings as given."""
    from napari_mpt_deblur.inference.engine import Deblurrer, InferenceSettings
    from napari_mpt_deblur.models.registry import LoadedModel

    engine = Deblurrer(LoadedModel(net, record, None), InferenceSettings(device="cpu", **settings))
    return nyquist_energy_ratio(engine.deblur_plane(image))


@pytest.mark.slow
def test_a_short_default_finetune_does_not_grow_a_checkerboard():
    """7 steps at the default learning rate and warm-up, as in the issue. Measured with the first
    (transposed-convolution) weights: without the warm-up the single-periodogram ratio rose 5.0x,
    with it 1.75x. The test fails above 2.5x.

    It guards only the first steps; 200 default steps (10 minutes on one core) are measured by
    benchmarks/bench_checkerboard.py: 13.8 before the fine-tuner's Nyquist-coefficient loss, 0.94
    with it (input 1.07; docs/training.md). tests/test_finetune_cli.py checks that loss is on."""
    import torch

    from napari_mpt_deblur.models.registry import load_model
    from napari_mpt_deblur.training.finetune import FineTuner

    torch.manual_seed(0)
    image = defocused_bbbc006()
    crop = image[132:388, 220:476]
    base = load_model("h2t-unet-fluo")
    start = _restored_ratio(base.model, base.record, crop)
    result = FineTuner("h2t-unet-fluo", [image], steps=7, batch=1, device="cpu").run()
    after = _restored_ratio(result.model, base.record, crop)
    assert after < 2.5 * start, f"Nyquist energy ratio {start:.0f} -> {after:.0f} after 7 default fine-tune steps"


@pytest.mark.slow
def test_a_long_default_finetune_does_not_grow_a_grid_locked_pattern():
    """200 default fine-tune steps at a reduced scale (batch 1, patch 64: a minute on one core).
    Measured at this scale from the shipped H2T on the demo image (input 1.07): 14.0 without the
    fine-tuner's Nyquist-coefficient loss, 4.1 with it; the full-scale run (batch 4, patch 128,
    benchmarks/bench_checkerboard.py) gives 0.94 with it. The test fails above 7: it catches the
    loss being switched off (not a small change of its weight), which the 7-step test above cannot."""
    import torch

    from napari_mpt_deblur.models.registry import load_model
    from napari_mpt_deblur.training.finetune import FineTuner

    torch.manual_seed(0)
    image = defocused_bbbc006()
    base = load_model("h2t-unet-fluo")
    result = FineTuner(base, [image], steps=200, batch=1, patch=64, device="cpu").run()
    after = _restored_ratio(result.model, base.record, image, tile=1024)
    assert after < 7, f"Nyquist energy ratio {after:.2f} after 200 default fine-tune steps (input {nyquist_energy_ratio(image):.2f})"


#: The shipped MPT's single pass still has its faint sub-pixel pattern (7.3 against the input's
#: 1.07), which is why its record asks the engine to average 4 flips by default (1.31, the default
#: case below). Its tied weights lose 0.73 dB on validation; training on with the Nyquist-coefficient
#: loss removes the pattern (1.60) but validates at 34.38 dB against the shipped 34.62
#: (docs/models.md, History). Strict: the test fails as soon as a clean MPT ships, and then its
#: record's ``orientations`` should go back to one pass and this mark go.
_MPT_ONE_PASS = pytest.mark.xfail(strict=True, reason="one pass of the shipped mpt-small-fluo adds its faint period-2 pattern")


@pytest.mark.parametrize(("name", "asked", "resolved"), [
    ("h2t-unet-fluo", (None, None), (1, 1)),
    pytest.param("mpt-small-fluo", (None, None), (4, 1), marks=pytest.mark.slow),
    pytest.param("mpt-small-fluo", (1, None), (1, 1), marks=[pytest.mark.slow, _MPT_ONE_PASS]),
    # mpt-tiny-fluo's single pass carries a period-2 pattern modulated along its window grid that
    # flips do not cancel (demo: 7.2 in one pass, 13.1 with 4 flips); averaging it with the image
    # moved by one pixel does (1.8), so its record asks for 2 shifts (docs/inference.md).
    ("mpt-tiny-fluo", (None, None), (1, 2)),
    pytest.param("mpt-tiny-fluo", (None, 1), (1, 1), marks=pytest.mark.xfail(
        strict=True, reason="one unshifted pass of mpt-tiny-fluo adds its period-2 pattern")),
    # The default model, mpt-tiny-fluo's descendant, has the same pattern (demo: 21.0 in one pass,
    # 1.41 with its 2 shifts).
    ("mpt-tiny-fluo-wide", (None, None), (1, 2)),
    pytest.param("mpt-tiny-fluo-wide", (None, 1), (1, 1), marks=pytest.mark.xfail(
        strict=True, reason="one unshifted pass of mpt-tiny-fluo-wide adds its period-2 pattern")),
])
def test_shipped_models_add_no_checkerboard(name, asked, resolved):
    """Issue 13's acceptance: on the demo image (one whole-image pass) each shipped model, run with
    the default settings, keeps its Nyquist energy ratio within 2x of the input's. The first
    shipped weights, with phase-split upsamplers, scored 114 (H2T) and 7.3 (MPT) against the
    input's 1.07. The MPT's pattern is locked to its tile grid, so averaging the four flips of each
    tile cancels it (1.31, inference.orientations): its record makes that its default.
    ``asked``/``resolved``: (orientations, shifts) requested (None: the model's default) and used."""
    from napari_mpt_deblur.inference.engine import Deblurrer, InferenceSettings

    image = defocused_bbbc006()
    orientations, shifts = asked
    engine = Deblurrer(name, InferenceSettings(device="cpu", tile=1024, orientations=orientations, shifts=shifts))
    assert (engine.settings.orientations, engine.settings.shifts) == resolved
    if engine.record.architecture.arch == "h2t_unet":  # the MPT may keep the paper's upsampler if trained clean
        assert engine.record.architecture.upsample == "resize_conv"
    restored = nyquist_energy_ratio(engine.deblur_plane(image))
    assert restored <= 2 * nyquist_energy_ratio(image), f"{name}, (orientations, shifts) {resolved}: Nyquist energy ratio {restored:.2f}"
