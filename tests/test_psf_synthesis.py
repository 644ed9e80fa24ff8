"""Defocus PSF, blur, camera noise and depth synthesis (issue 3), plus PSNR / SSIM."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from pydantic import ValidationError

from napari_mpt_deblur.data.psf import (
    PSFParams,
    auto_size,
    defocus_psf,
    encircled_energy_diameter_px,
    geometric_blur_radius_um,
)
from napari_mpt_deblur.data.synthesis import add_camera_noise, blur, synthesize_defocus, synthesize_depth
from napari_mpt_deblur.evaluation.metrics import psnr, ssim

MODELS = ["pupil", "scalar", "vectorial"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("defocus", [0.0, 4.0, -6.0])
def test_psf_sums_to_one_and_is_symmetric(model, defocus):
    k = defocus_psf(PSFParams(model=model, defocus_um=defocus, size=65))
    assert k.shape == (65, 65) and k.dtype == np.float64
    assert abs(k.sum() - 1.0) < 1e-12
    assert k.min() >= -1e-12
    scale = k.max()
    # Mirror and transpose symmetry of an aberration-free, index-matched system.
    assert np.abs(k - k[::-1, :]).max() < 1e-6 * scale
    assert np.abs(k - k[:, ::-1]).max() < 1e-6 * scale
    assert np.abs(k - k.T).max() < 1e-6 * scale
    assert np.unravel_index(np.argmax(k), k.shape) == (32, 32) or defocus != 0.0


@pytest.mark.parametrize("model", MODELS)
def test_psf_width_grows_with_defocus(model):
    widths, peaks = [], []
    for dz in (0.0, 2.0, 4.0, 8.0, 12.0):
        k = defocus_psf(PSFParams(model=model, defocus_um=dz, size=97))
        widths.append(encircled_energy_diameter_px(k, 0.8))
        peaks.append(k.max())
    assert all(b > a for a, b in itertools.pairwise(widths)), widths
    assert all(b < a for a, b in itertools.pairwise(peaks)), peaks
    # The 80%-energy disc follows the geometric defocus disc (2 dz tan(theta) / pixel) when large.
    geo = 2 * geometric_blur_radius_um(PSFParams(defocus_um=12.0)) / 0.645
    assert 0.7 * geo < widths[-1] < 1.3 * geo
    # Sign of the defocus does not matter without aberrations.
    plus = defocus_psf(PSFParams(model=model, defocus_um=5.0, size=65))
    minus = defocus_psf(PSFParams(model=model, defocus_um=-5.0, size=65))
    assert np.abs(plus - minus).max() < 1e-6 * plus.max()


@pytest.mark.parametrize("model", ["pupil", "scalar"])
def test_in_focus_first_dark_ring_at_airy_radius(model):
    """First minimum of the in-focus PSF at 0.61 lambda / NA, within one (fine) pixel."""
    params = PSFParams(model=model, na=0.5, wavelength_um=0.5, pixel_um=0.02, defocus_um=0.0, size=129)
    k = defocus_psf(params)
    profile = k[64, 64:]
    first_min = next(i for i in range(1, len(profile) - 1) if profile[i] <= profile[i - 1] and profile[i] < profile[i + 1])
    expected_px = 0.61 * 0.5 / 0.5 / 0.02  # 30.5 px
    assert abs(first_min - expected_px) <= 1.0, (first_min, expected_px)
    assert profile[first_min] < 0.01 * profile[0]


@pytest.mark.parametrize("defocus", [0.0, 2.0, 4.0, 8.0, 12.0])
def test_own_pupil_model_agrees_with_psfmodels(defocus):
    ours = defocus_psf(PSFParams(model="pupil", defocus_um=defocus, size=129))
    gibson_lanni = defocus_psf(PSFParams(model="scalar", defocus_um=defocus, size=129))
    l1 = np.abs(ours - gibson_lanni).sum()  # total variation distance x 2; kernels sum to 1
    assert l1 < (0.08 if defocus == 0 else 0.03), l1


def test_auto_size_holds_999_of_energy():
    params = PSFParams(model="scalar", defocus_um=4.0)
    side = auto_size(params)
    assert side % 2 == 1 and side == defocus_psf(params).shape[0]
    big = defocus_psf(params.model_copy(update={"size": 1025}))
    c, h = 512, side // 2
    assert big[c - h : c + h + 1, c - h : c + h + 1].sum() >= 0.999
    # It grows with the defocus (geometric disc added to the diffraction tail).
    assert auto_size(params.model_copy(update={"defocus_um": 40.0})) > side


def test_psf_params_errors_name_the_field():
    with pytest.raises(ValidationError, match="na"):
        PSFParams(na=1.2, immersion_index=1.0)
    with pytest.raises(ValidationError, match="size"):
        PSFParams(size=64)
    with pytest.raises(ValidationError, match="model"):
        PSFParams(model="gaussian")
    with pytest.raises(ValidationError, match="pixel"):
        PSFParams(pixel=0.1)  # misspelt field: extra fields are forbidden


def test_blur_preserves_flux_and_reproduces_the_kernel():
    k = defocus_psf(PSFParams(defocus_um=6.0, size=41))
    img = np.zeros((128, 160))
    img[64, 80] = 1.0
    out = blur(img, k)
    assert out.shape == img.shape and out.dtype == np.float64
    np.testing.assert_allclose(out[64 - 20 : 64 + 21, 80 - 20 : 80 + 21], k, atol=1e-12)
    rng = np.random.default_rng(0)
    obj = np.zeros((128, 128))
    obj[40:90, 30:100] = rng.random((50, 70))
    assert abs(blur(obj, k).sum() - obj.sum()) < 1e-9 * obj.sum()
    # Reflect padding: a constant image stays constant, also at the borders.
    const = np.full((50, 70), 0.25, dtype=np.float32)
    out = blur(const, k)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 0.25, atol=1e-6)
    # Mean of a random full-frame image is kept closely (reflection keeps the border statistics).
    full = rng.random((200, 220))
    assert abs(blur(full, k).mean() - full.mean()) < 2e-3
    with pytest.raises(ValueError, match="odd"):
        blur(full, np.ones((4, 4)) / 16)


def test_camera_noise_is_poisson_gaussian():
    rng = np.random.default_rng(1)
    peak, read = 1000.0, 3.0
    for level in (0.05, 0.3, 0.9):
        clean = np.full((256, 256), level)
        noisy = add_camera_noise(clean, peak, read, rng)
        assert noisy.dtype == np.float32 and noisy.shape == clean.shape
        expected_var = level / peak + (read / peak) ** 2
        assert abs(noisy.mean() - level) < 4 * math.sqrt(expected_var / clean.size)
        assert abs(noisy.var() / expected_var - 1) < 0.03
    # Read noise alone at zero signal; no noise at all without read noise and with a huge peak.
    dark = add_camera_noise(np.zeros((256, 256)), peak, read, rng)
    assert abs(dark.std() - read / peak) < 0.03 * read / peak
    a = add_camera_noise(np.full((64, 64), 0.5), 1000, 3, rng=7)
    b = add_camera_noise(np.full((64, 64), 0.5), 1000, 3, rng=7)
    np.testing.assert_array_equal(a, b)


def test_synthesize_defocus_matches_blur_plus_noise_and_lowers_psnr():
    rng = np.random.default_rng(2)
    sharp = np.zeros((96, 96))
    sharp[rng.integers(10, 86, 30), rng.integers(10, 86, 30)] = 1.0
    params = PSFParams(defocus_um=4.0, model="pupil", size=65)
    clean = synthesize_defocus(sharp, params, peak_photons=None)
    np.testing.assert_allclose(clean, blur(sharp, defocus_psf(params)), atol=1e-6)
    noisy = synthesize_defocus(sharp, params, rng=3)
    expected = add_camera_noise(blur(sharp, defocus_psf(params)), 1000.0, 3.0, rng=3)
    np.testing.assert_array_equal(noisy, expected)
    smooth = blur(rng.random((96, 96)), defocus_psf(PSFParams(defocus_um=1.0, size=9)))
    near = synthesize_defocus(smooth, params, peak_photons=None)
    far = synthesize_defocus(smooth, params.model_copy(update={"defocus_um": 10.0}), peak_photons=None)
    assert psnr(far, smooth) < psnr(near, smooth) < 60.0


def test_depth_synthesis_blurs_each_region_by_its_own_defocus():
    rng = np.random.default_rng(4)
    sharp = (rng.random((96, 128)) > 0.9).astype(np.float64)
    labels = np.zeros((96, 128), dtype=np.uint16)
    labels[:, :64] = 1
    labels[:, 64:] = 2
    params = PSFParams(model="pupil", size=65)
    out, depth = synthesize_depth(sharp, labels, params, {1: 0.0, 2: 10.0}, feather_px=2.0, peak_photons=None)
    assert out.shape == sharp.shape and out.dtype == np.float32
    assert set(np.unique(depth)) == {0.0, 10.0}
    left_sharp = blur(sharp, defocus_psf(params))
    right_blur = blur(sharp, defocus_psf(params.model_copy(update={"defocus_um": 10.0})))
    # Far from the border between regions each side equals its own blur.
    np.testing.assert_allclose(out[:, :40], left_sharp[:, :40], atol=1e-5)
    np.testing.assert_allclose(out[:, 90:], right_blur[:, 90:], atol=1e-5)
    # The composite is smooth across the border: no jump larger than the two blurs differ.
    assert np.abs(np.diff(out[:, 60:68], axis=1)).max() <= np.abs(left_sharp - right_blur).max() + 1e-6
    # All regions at one defocus = the plain synthesis.
    same, _ = synthesize_depth(sharp, labels, params.model_copy(update={"defocus_um": 3.0}), {1: 3.0, 2: 3.0},
                               peak_photons=None)
    np.testing.assert_allclose(same, synthesize_defocus(sharp, params.model_copy(update={"defocus_um": 3.0}),
                                                        peak_photons=None), atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        synthesize_depth(sharp, labels[:10], params, {1: 0.0})


def test_psnr_and_ssim_values():
    ref = np.zeros((32, 32))
    assert psnr(ref + 0.1, ref) == pytest.approx(20.0)
    assert psnr(ref, ref) == math.inf
    assert psnr(ref + 0.2, ref, data_range=2.0) == pytest.approx(20.0)
    rng = np.random.default_rng(5)
    img = rng.random((64, 64))
    assert ssim(img, img) == pytest.approx(1.0)
    noisy = img + rng.normal(0, 0.1, img.shape)
    assert 0.0 < ssim(noisy, img) < 0.95
    # Overshoot is not clipped away.
    assert psnr(img + 1.5, img) < psnr(np.clip(img + 1.5, 0, 1), img)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(img, img[:10])
