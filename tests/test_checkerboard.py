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
    assert 0.1 < nyquist_energy_ratio(rng.normal(size=(256, 256))) < 10
    with pytest.raises(ValueError, match="2D image of at least 8 x 8"):
        nyquist_energy_ratio(np.zeros((4, 4)))


@pytest.mark.slow
def test_a_short_default_finetune_does_not_grow_a_checkerboard():
    """7 steps at the default learning rate and warm-up, as in the issue. Measured on this CPU:
    without the warm-up the ratio rose 5.0x (1661 -> 8317) and the period-2 amplitude from
    0.095% to 0.247% of the range; with it, 1.75x (2904, 0.121%). The test fails above 2.5x.

    It guards only the first steps: longer runs at the default beta 0.1 still grow a strong
    checkerboard (7.9% of the range after 50 steps; docs/training.md, "Known problem")."""
    import torch

    from napari_mpt_deblur.inference.engine import Deblurrer, InferenceSettings
    from napari_mpt_deblur.models.registry import LoadedModel, load_model
    from napari_mpt_deblur.training.finetune import FineTuner

    torch.manual_seed(0)
    image = defocused_bbbc006()
    crop = image[132:388, 220:476]
    base = load_model("h2t-unet-fluo")

    def ratio(net) -> float:
        engine = Deblurrer(LoadedModel(net, base.record, None), InferenceSettings(device="cpu"))
        return nyquist_energy_ratio(engine.deblur_plane(crop))

    start = ratio(base.model)
    result = FineTuner("h2t-unet-fluo", [image], steps=7, batch=1, device="cpu").run()
    after = ratio(result.model)
    assert after < 2.5 * start, f"Nyquist energy ratio {start:.0f} -> {after:.0f} after 7 default fine-tune steps"
