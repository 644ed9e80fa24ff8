"""The deblurring models shipped inside the package: files, provenance, and that they deblur."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mpt_deblur.data.normalisation import normalise, percentile_range
from napari_mpt_deblur.data.psf import PSFParams
from napari_mpt_deblur.data.samples import u2os_nuclei
from napari_mpt_deblur.data.synthesis import synthesize_defocus
from napari_mpt_deblur.demo import DEFAULT_DEMO_MODEL
from napari_mpt_deblur.evaluation.metrics import psnr, ssim
from napari_mpt_deblur.models.registry import SHIPPED_DIR, list_models, load_model

SHIPPED = {"mpt-small-fluo": ("mpt", "small"), "mpt-tiny-fluo": ("mpt", "tiny"), "mpt-tiny-fluo-wide": ("mpt", "tiny"),
           "h2t-unet-fluo": ("h2t_unet", "paper")}


def test_shipped_model_files_are_small_fp16_and_say_how_they_were_trained():
    listed = [name for name, _path, origin in list_models() if origin == "shipped"]
    assert DEFAULT_DEMO_MODEL in SHIPPED
    assert set(SHIPPED) <= set(listed)
    assert listed[0] == DEFAULT_DEMO_MODEL  # offered first in the widgets' model lists
    for name, (arch, preset) in SHIPPED.items():
        weights = SHIPPED_DIR / f"{name}.safetensors"
        assert weights.stat().st_size < 20 * 2**20
        record = load_model(name).record
        assert record.trained and record.name == name and record.weights_dtype == "float16"
        assert (record.architecture.arch, record.architecture.preset) == (arch, preset)
        assert record.architecture.in_channels == 1 == record.architecture.out_channels
        # The MPT's one pass has a grid pattern, so its record asks for 4 orientations (test_checkerboard.py).
        assert record.orientations == (4 if name == "mpt-small-fluo" else None)
        training = record.training
        assert training["steps"] > 0 and training["wall_seconds"] > 0 and training["device"]
        # The benchmark's test images must not be among the training data.
        assert training["config"]["data"][0]["names"] == "u2os_train"


@pytest.mark.slow  # mpt-small-fluo: ~30 s on 2 CPU cores
@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_model_deblurs_a_held_out_image(name):
    """8 um of defocus at the benchmark's 20x/0.45 NA settings on the bundled held-out U2OS image."""
    from napari_mpt_deblur.inference.engine import Deblurrer, InferenceSettings

    image, _labels = u2os_nuclei()
    sharp = normalise(image, *percentile_range(image, 0.1, 99.9)).astype(np.float32)
    blurred = synthesize_defocus(sharp, PSFParams(na=0.45, wavelength_um=0.461, pixel_um=0.645, defocus_um=8.0),
                                 peak_photons=1000, read_sigma_photons=3, rng=np.random.default_rng(0))
    # One pass: this checks the weights; the MPT's default of 4 orientations (4x the time) is
    # tested in test_checkerboard.py and test_orientations.py.
    restored = Deblurrer(name, InferenceSettings(orientations=1)).deblur_plane(blurred)
    assert restored.shape == sharp.shape and np.isfinite(restored).all()
    gain_psnr = psnr(restored, sharp) - psnr(blurred, sharp)
    gain_ssim = ssim(restored, sharp) - ssim(blurred, sharp)
    assert gain_psnr > 1.0, gain_psnr  # measured: see docs/models.md
    assert gain_ssim > 0.01, gain_ssim
