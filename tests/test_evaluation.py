"""Evaluation without TensorFlow: matching (vs stardist.matching), classical baselines, metrics, method parsing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile

from napari_mpt_deblur.data.normalisation import normalise, percentile_range
from napari_mpt_deblur.data.psf import PSFParams, defocus_psf
from napari_mpt_deblur.data.synthesis import blur, synthesize_defocus
from napari_mpt_deblur.evaluation.classical import WIENER_BALANCES, richardson_lucy, tune_wiener_balance, wiener
from napari_mpt_deblur.evaluation.matching import (
    IOU_CURVE,
    count_objects,
    gap_recovered,
    match_dataset,
    match_labels,
    pool_counts,
)
from napari_mpt_deblur.evaluation.metrics import MetricUnavailable, lpips, lpips_status, psnr

# ----------------------------------------------------------------------------------------------
# Matching


def _known_pair() -> tuple[np.ndarray, np.ndarray]:
    """Ground truth: three 10x10 squares (ids 3, 7, 9: not sequential on purpose).

    Prediction: an exact copy of square 3, square 7 shifted down by 2 px (IoU = 80 / 120 = 2/3),
    nothing for square 9, and one false positive far away.
    """
    gt = np.zeros((64, 64), np.uint16)
    gt[5:15, 5:15] = 3
    gt[5:15, 30:40] = 7
    gt[40:50, 5:15] = 9
    pred = np.zeros((64, 64), np.int32)
    pred[5:15, 5:15] = 1
    pred[7:17, 30:40] = 2
    pred[50:60, 50:60] = 5
    return gt, pred


def test_matching_known_pair_hand_computed_and_equal_to_stardist():
    from stardist.matching import matching

    gt, pred = _known_pair()
    report = match_labels(gt, pred)
    # IoU 0.5: exact + shifted match -> TP 2, FP 1, FN 1; AP = 2 / (2 + 1 + 1) = 0.5
    s5 = report.at(0.5)
    assert (s5.tp, s5.fp, s5.fn) == (2, 1, 1)
    assert s5.ap == pytest.approx(0.5) and s5.precision == pytest.approx(2 / 3) and s5.recall == pytest.approx(2 / 3)
    assert s5.mean_matched_iou == pytest.approx((1 + 2 / 3) / 2)
    # IoU 0.7 and 0.9: only the exact copy -> TP 1, FP 2, FN 2; AP = 1 / 5
    for t in (0.7, 0.9):
        s = report.at(t)
        assert (s.tp, s.fp, s.fn) == (1, 2, 2)
        assert s.ap == pytest.approx(0.2)
    assert report.mean_ap == pytest.approx((0.5 + 0.2 + 0.2) / 3)
    for t in (0.5, 0.7, 0.9):
        ref = matching(gt, pred, thresh=t)
        ours = report.at(t)
        for field in ("tp", "fp", "fn", "precision", "recall", "f1"):
            assert getattr(ours, field) == pytest.approx(getattr(ref, field)), field
        assert ours.ap == pytest.approx(ref.accuracy)


def _perturbed(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible 'prediction' from real labels: drop some objects, shift, erode/dilate, add fakes."""
    from scipy import ndimage

    out = np.zeros_like(labels, dtype=np.int32)
    ids = [i for i in np.unique(labels) if i]
    for new_id, i in enumerate(ids, start=1):
        if rng.random() < 0.15:
            continue  # missed object
        mask = labels == i
        op = rng.integers(3)
        if op == 1:
            mask = ndimage.binary_erosion(mask, iterations=int(rng.integers(1, 4)))
        elif op == 2:
            mask = ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 3)))
        mask = np.roll(mask, tuple(rng.integers(-3, 4, size=2)), axis=(0, 1))
        out[mask & (out == 0)] = new_id + 1000
    for k in range(5):  # false positives
        y, x = rng.integers(0, labels.shape[0] - 12), rng.integers(0, labels.shape[1] - 12)
        out[y : y + 10, x : x + 10] = 5000 + k
    return out


def test_matching_equals_stardist_on_real_labels(shared_data):
    from stardist.matching import matching, matching_dataset

    rng = np.random.default_rng(0)
    gts = [tifffile.imread(shared_data / "u2os_nuclei" / "labels" / f"{n}.tif") for n in ("150b0ffa318c", "2c83c86dd4e5")]
    preds = [_perturbed(g, rng) for g in gts]
    for gt, pred in zip(gts, preds):
        report = match_labels(gt, pred, IOU_CURVE)
        for t in IOU_CURVE:
            ref = matching(gt, pred, thresh=t)
            ours = report.at(t)
            assert (ours.tp, ours.fp, ours.fn) == (ref.tp, ref.fp, ref.fn)
            assert ours.ap == pytest.approx(ref.accuracy) and ours.f1 == pytest.approx(ref.f1)
            assert ours.mean_matched_iou == pytest.approx(ref.mean_matched_score)
    pooled = match_dataset(gts, preds)
    assert pool_counts([match_labels(g, p) for g, p in zip(gts, preds)]) == pooled
    for t in (0.5, 0.7, 0.9):
        ref = matching_dataset(gts, preds, thresh=t, by_image=False, show_progress=False)
        s = pooled.at(t)
        assert (s.tp, s.fp, s.fn) == (ref.tp, ref.fp, ref.fn)
        assert s.ap == pytest.approx(ref.accuracy) and s.precision == pytest.approx(ref.precision)
    assert 0 < pooled.at(0.9).ap < pooled.at(0.7).ap < pooled.at(0.5).ap < 1


def test_matching_row_and_errors():
    gt, pred = _known_pair()
    row = match_labels(gt, pred).as_row()
    assert row["ap@0.5"] == pytest.approx(0.5) and row["tp@0.9"] == 1
    assert row["mean_ap"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="differ in shape"):
        match_labels(gt, pred[:-1])
    with pytest.raises(ValueError, match="integer label image"):
        match_labels(gt.astype(np.float32), pred)
    with pytest.raises(ValueError, match="negative labels"):
        match_labels(gt, -pred)
    with pytest.raises(KeyError, match="no matching scores at IoU 0.6"):
        match_labels(gt, pred).at(0.6)
    # An empty prediction: everything missed, AP 0 (no division by zero).
    empty = match_labels(gt, np.zeros_like(pred)).at(0.5)
    assert (empty.tp, empty.fp, empty.fn, empty.ap, empty.precision) == (0, 0, 3, 0.0, 0.0)


def test_count_objects_and_gap():
    gt, pred = _known_pair()
    assert count_objects(gt) == 3 and count_objects(pred) == 3 and count_objects(np.zeros((4, 4), int)) == 0
    assert gap_recovered(0.55, 0.5, 0.6) == pytest.approx(0.5)
    assert gap_recovered(0.45, 0.5, 0.6) == pytest.approx(-0.5)
    assert gap_recovered(0.6244, 0.4942, 0.6244) == pytest.approx(1.0)
    # The paper's Table 6: MPT+EFCRex recovers (0.5909 - 0.4942) / (0.6244 - 0.4942) of the gap.
    assert gap_recovered(0.5909, 0.4942, 0.6244) == pytest.approx(0.7427, abs=1e-4)
    assert math.isnan(gap_recovered(0.7, 0.5, 0.505, min_gap=0.01))


# ----------------------------------------------------------------------------------------------
# Classical baselines


@pytest.fixture(scope="module")
def sharp_crop(shared_data) -> np.ndarray:
    img = tifffile.imread(shared_data / "u2os_nuclei" / "images" / "150b0ffa318c.tif")[100:356, 200:456]
    return normalise(img, *percentile_range(img, 0.1, 99.9)).astype(np.float64)


def test_richardson_lucy_and_wiener_with_true_psf_improve_psnr(sharp_crop):
    params = PSFParams(defocus_um=8.0)
    psf = defocus_psf(params)
    blurred = synthesize_defocus(sharp_crop, params, rng=1)
    before = psnr(blurred, sharp_crop)
    rl = richardson_lucy(blurred, psf, iterations=30)
    assert rl.shape == blurred.shape and rl.dtype == np.float32 and rl.min() >= 0
    assert psnr(rl, sharp_crop) > before + 2.0
    assert psnr(wiener(blurred, psf, balance=0.1), sharp_crop) > before + 2.0
    # RL keeps the flux (the PSF sums to 1): mean intensity within 2%.
    assert rl.mean() == pytest.approx(np.clip(blurred, 0, None).mean(), rel=0.02)


def test_reflect_padding_beats_unpadded_skimage_rl(sharp_crop):
    """SPEC section 8: without padding skimage's RL loses many dB at the borders."""
    from skimage.restoration import richardson_lucy as sk_rl

    params = PSFParams(defocus_um=8.0)
    psf = defocus_psf(params)
    blurred = synthesize_defocus(sharp_crop, params, rng=2)
    ours = psnr(richardson_lucy(blurred, psf, 10), sharp_crop)
    theirs = psnr(sk_rl(np.clip(blurred, 0, None).astype(np.float64), psf, num_iter=10, clip=False), sharp_crop)
    assert ours > theirs + 3.0


def test_noise_free_wiener_nearly_inverts_the_blur(sharp_crop):
    """With the same PSF and padding and no noise, Wiener with a tiny balance inverts the blur (SPEC 8)."""
    params = PSFParams(defocus_um=4.0)
    psf = defocus_psf(params)
    blurred = blur(sharp_crop, psf)
    assert psnr(wiener(blurred, psf, balance=1e-4, regulariser="identity"), sharp_crop) > psnr(blurred, sharp_crop) + 10


def test_classical_per_plane_and_errors(sharp_crop):
    psf = defocus_psf(PSFParams(defocus_um=2.0, size=31))
    y = blur(sharp_crop[:64, :64], psf)
    stack = np.stack([y, y[::-1]])
    out = richardson_lucy(stack, psf, 5)
    assert out.shape == stack.shape
    np.testing.assert_allclose(out[1], richardson_lucy(y[::-1], psf, 5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(wiener(stack, psf)[0], wiener(y, psf), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="odd sides"):
        richardson_lucy(y, np.ones((4, 4)))
    with pytest.raises(ValueError, match="non-negative"):
        wiener(y, -psf)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        richardson_lucy(y, psf, 0)
    with pytest.raises(ValueError, match="balance must be positive"):
        wiener(y, psf, balance=0)


def test_tune_wiener_balance_picks_the_best_candidate(sharp_crop):
    params = PSFParams(defocus_um=8.0)
    psf = defocus_psf(params)
    sharp = [sharp_crop[:128, :128], sharp_crop[128:, 128:]]
    blurred = [synthesize_defocus(s, params, rng=i) for i, s in enumerate(sharp)]
    best, scores = tune_wiener_balance(blurred, sharp, psf)
    assert set(scores) == set(WIENER_BALANCES) and scores[best] == max(scores.values())
    # Noisy data: the best balance is neither the smallest (noise explodes) nor the largest candidate.
    assert WIENER_BALANCES[0] < best < WIENER_BALANCES[-1]
    assert scores[best] > np.mean([psnr(b, s) for b, s in zip(blurred, sharp)])


# ----------------------------------------------------------------------------------------------
# Metrics and method parsing


def test_lpips_is_only_used_when_local():
    ok, reason = lpips_status()
    x = np.random.default_rng(0).random((32, 32))
    if not ok:
        assert reason.startswith("LPIPS not available")
        with pytest.raises(MetricUnavailable, match="LPIPS not available"):
            lpips(x, x)
    else:  # the lpips package and its backbone weights are on this machine
        assert lpips(x, x) == pytest.approx(0.0, abs=1e-6)
    assert lpips_status("resnet")[0] is False


def test_parse_methods():
    from napari_mpt_deblur.evaluation.benchmark import parse_method, parse_methods

    specs = parse_methods(["rl", "rl10", "wiener", "wiener:0.05", "mpt:mpt-small-fluo", "h2t:a/b.safetensors"])
    assert [s.key for s in specs] == ["input", "rl30", "rl10", "wiener", "wiener:0.05", "mpt:mpt-small-fluo",
                                      "h2t:a/b.safetensors"]
    assert specs[1].iterations == 30 and specs[2].iterations == 10 and specs[4].balance == 0.05
    assert specs[5].model == "mpt-small-fluo" and specs[5].arch == "mpt" and specs[6].arch == "h2t_unet"
    for bad, msg in (("rl0", "at least 1"), ("wiener:x", "number"), ("wiener:-1", "positive"), ("unet", "unknown method")):
        with pytest.raises(ValueError, match=msg):
            parse_method(bad)
    with pytest.raises(ValueError, match="listed twice: rl10"):
        parse_methods(["rl10", "rl10"])


def test_benchmark_names_take_file_stems_or_a_split_of_the_folder(tmp_path, capsys):
    """``--names`` picks images of --sharp by stem or by a named split (the DSB held-out test set);
    with ``--names-from`` as well it is refused before anything is written."""
    import csv

    from napari_mpt_deblur.cli import main
    from napari_mpt_deblur.data.splits import DSB_FLUO_TEST

    sharp = tmp_path / "sharp"
    sharp.mkdir()
    rng = np.random.default_rng(0)
    stems = ["a", "b", DSB_FLUO_TEST[0]]
    for stem in stems:
        tifffile.imwrite(sharp / f"{stem}.tif", rng.integers(0, 4000, size=(48, 56), dtype=np.uint16))
    common = ["benchmark", "--sharp", str(sharp), "--defocus", "4", "--methods", "input", "--no-stardist"]
    for names, expected in (("a,b", {"a", "b"}), ("dsb_fluo_test", {DSB_FLUO_TEST[0]})):
        out = tmp_path / names.replace(",", "_")
        assert main([*common, "--names", names, "--out", str(out)]) == 0, capsys.readouterr().err
        assert {r["image"] for r in csv.DictReader((out / "per_image.csv").open())} == expected
    assert main([*common, "--names", "a", "--names-from", "test", "--out", str(tmp_path / "never")]) == 1
    assert "--names and --names-from both choose the images: give one" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    # A held-out split's Wiener balance is tuned on images of the folder's training part, never on
    # the benchmarked ones.
    out = tmp_path / "tuned"
    assert main([*common[:-2], "input,wiener", "--no-stardist", "--names", "dsb_fluo_test", "--wiener-tune-images", "2",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    assert "Wiener balance (tuned per defocus on 2 images of" in (out / "summary.md").read_text()
    assert "(a, b)" in (out / "summary.md").read_text()
