"""Colour (RGB) models: per-channel defocus synthesis, the widened warm start, training on colour
pairs and the colour benchmark, on real stained-tissue images (dsb2018_extra/histology_rgb)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_mpt_deblur.data import datasets as D
from napari_mpt_deblur.data.optics import BENCHMARK_OPTICS, RGB_WAVELENGTHS_UM
from napari_mpt_deblur.data.psf import defocus_psf
from napari_mpt_deblur.data.synthesis import DefocusRange, blur, synthesize_defocus
from napari_mpt_deblur.evaluation.metrics import psnr

TISSUE = "15039b3acccc"  # a dsb_rgb_test image: fine for tests, never for training


@pytest.fixture(scope="module")
def tissue(shared_data) -> np.ndarray:
    """A real stained tissue section, (256, 320, 3) uint8."""
    return tifffile.imread(shared_data / "dsb2018_extra/histology_rgb/images" / f"{TISSUE}.tif")


@pytest.fixture(scope="module")
def tissue_dir(tissue, tmp_path_factory) -> Path:
    """Four 128 x 160 crops of the tissue image as RGB TIFF files."""
    folder = tmp_path_factory.mktemp("tissue")
    for i, (y, x) in enumerate([(0, 0), (0, 160), (128, 0), (128, 160)]):
        tifffile.imwrite(folder / f"t{i}.tif", tissue[y : y + 128, x : x + 160], photometric="rgb")
    return folder


def test_each_channel_is_blurred_at_its_own_wavelength(tissue):
    sharp = D.reference_units(D.as_channels(tissue, 3))[0]
    params = BENCHMARK_OPTICS.psf_params(8.0)
    out = synthesize_defocus(sharp, params, peak_photons=None, channel_wavelengths_um=RGB_WAVELENGTHS_UM)
    assert out.shape == sharp.shape == (3, 256, 320)
    for c, w in enumerate(RGB_WAVELENGTHS_UM):
        one = blur(sharp[c].astype(np.float64), defocus_psf(params.model_copy(update={"wavelength_um": w})))
        np.testing.assert_allclose(out[c], one, atol=1e-6)
    # the PSFs differ: a grey image seen in three colours comes out different in each
    grey = np.repeat(sharp.mean(axis=0, keepdims=True), 3, axis=0)
    seen = synthesize_defocus(grey, BENCHMARK_OPTICS.psf_params(2.0), peak_photons=None,
                               channel_wavelengths_um=RGB_WAVELENGTHS_UM)
    scores = [psnr(seen[c], grey[c]) for c in range(3)]
    assert scores[2] > scores[1] > scores[0]  # blue (shortest wavelength) sharpest, red blurriest
    with pytest.raises(ValueError, match=r"expected a \(3, H, W\) image"):
        synthesize_defocus(sharp[0], params, channel_wavelengths_um=RGB_WAVELENGTHS_UM)


def test_colour_training_pairs_match_the_grey_pipeline_channel_by_channel(tissue):
    """Three equal channels at equal wavelengths give, channel by channel, the grey pipeline's pair
    (same draws, same crop, same kernel); three real colour channels give (3, P, P) pairs."""
    grey = tissue.mean(axis=-1)
    patch = D.PatchConfig(size=48)
    common = {"max_kernel": 33, "peak_photons": None, "wavelength_um": (0.53, 0.53)}
    ds_grey = D.SyntheticPatches([grey], patch, DefocusRange(**common), seed=3)
    ds_rgb = D.SyntheticPatches([np.stack([grey] * 3, axis=-1)], patch,
                                DefocusRange(**common, channel_wavelengths_um=(0.53, 0.53, 0.53)), seed=3)
    for i in range(3):
        a, b = ds_grey.pair(i), ds_rgb.pair(i)
        assert a["inp"].shape == (1, 48, 48) and b["inp"].shape == (3, 48, 48)
        for c in range(3):
            # one normalisation range for all channels: the percentiles of three equal copies
            # differ from one copy's by the interpolation position only
            np.testing.assert_allclose(b["gt"][c], a["gt"][0], atol=2e-3)
            np.testing.assert_allclose(b["inp"][c], a["inp"][0], atol=2e-3)

    # a kernel per channel, each at its own wavelength: blue (shortest) sharpest, red blurriest
    ds_rgbw = D.SyntheticPatches([np.stack([grey] * 3, axis=-1)], patch,
                                 DefocusRange(max_kernel=33, peak_photons=None, channel_wavelengths_um=RGB_WAVELENGTHS_UM),
                                 seed=3)
    near = 0
    for i in range(10):
        rng = D._rng(3, i)
        rng.integers(1)  # the image choice
        draw = ds_rgbw.defocus.draw(rng)
        grid = ds_rgbw.grids[draw.objective]
        assert list(ds_rgbw[i]["kernel"]) == [grid.node(w / draw.pixel_um, draw.radius_px) for w in RGB_WAVELENGTHS_UM]
        pair = ds_rgbw.pair(i)
        err = [float((pair["inp"][c] - pair["gt"][c]).abs().mean()) for c in range(3)]
        if draw.radius_px < 4:  # farther from focus the geometric blur, the same for every colour, dominates
            near += 1
            assert err[2] < err[1] < err[0], (draw.radius_px, err)
    assert near >= 5

    ds = D.SyntheticPatches([tissue], patch, DefocusRange(max_kernel=33, channel_wavelengths_um=RGB_WAVELENGTHS_UM),
                            seed=0)
    item = ds[0]
    assert item["kernel"].shape == (3,) and item["sharp"].shape[0] == 3
    pair = ds.pair(0)
    assert pair["inp"].shape == pair["gt"].shape == (3, 48, 48)
    assert not torch.equal(pair["gt"][0], pair["gt"][2])  # real colour: the channels differ
    with pytest.raises(ValueError, match="per-object depth .* single-channel"):
        D.SyntheticPatches([tissue], patch, DefocusRange(channel_wavelengths_um=RGB_WAVELENGTHS_UM),
                           labels=[np.zeros(tissue.shape[:2], int)], per_object_prob=0.5)
    with pytest.raises(ValueError, match="expected a 3-channel image"):
        D.SyntheticPatches([grey], patch, DefocusRange(channel_wavelengths_um=RGB_WAVELENGTHS_UM))


def test_a_widened_grey_model_restores_each_channel_of_a_grey_colour_image_as_before():
    from napari_mpt_deblur.models.config import preset_config
    from napari_mpt_deblur.models.registry import build_model
    from napari_mpt_deblur.training.network import widen_channels

    torch.manual_seed(0)
    for arch, preset in (("h2t_unet", "tiny"), ("mpt", "tiny")):
        grey = build_model(preset_config(arch, preset)).eval()
        wide = widen_channels(grey, 3).eval()
        assert wide.config.in_channels == wide.config.out_channels == 3
        x = torch.rand(1, 1, 32, 32)
        with torch.no_grad():
            expected = grey(x)
            got = wide(x.repeat(1, 3, 1, 1))
        for c in range(3):
            torch.testing.assert_close(got[:, c : c + 1], expected, atol=1e-5, rtol=1e-4)



def test_an_rgb_model_trains_validates_and_saves_with_three_channels(tissue_dir, tmp_path):
    from napari_mpt_deblur.models.registry import load_model
    from napari_mpt_deblur.training.config import parse_config
    from napari_mpt_deblur.training.trainer import Trainer

    colour = {"channel_wavelengths_um": list(RGB_WAVELENGTHS_UM)}
    cfg = {
        "name": "rgb", "out_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "progress": False,
        "model": {"arch": "h2t_unet", "preset": "tiny", "in_channels": 3},
        "data": [{"kind": "synthetic", "sharp": str(tissue_dir), "names": ["t0", "t1", "t2"],
                  "defocus": {"max_kernel": 33, **colour}}],
        "patch": {"size": 32},
        "validation": {"data": {"kind": "synthetic", "sharp": str(tissue_dir), "names": ["t3"], "defocus_um": [4.0],
                                **colour}, "every": 2, "crop": 64},
    }
    trainer = Trainer(parse_config(cfg))
    trainer.run()
    best = json.loads((tmp_path / "run/checkpoints/best.json").read_text())
    assert np.isfinite(best["psnr"]) and 0 < best["ssim"] <= 1
    model = load_model(tmp_path / "run/model.json")
    assert model.record.architecture.in_channels == model.record.architecture.out_channels == 3

    # grey data for a colour network (and the reverse) is refused, naming both counts
    grey = {**cfg, "out_dir": str(tmp_path / "grey"), "data": [{**cfg["data"][0], "defocus": {"max_kernel": 33}}]}
    with pytest.raises(ValueError, match=r"1 channel\(s\) per sample but the network takes 3"):
        Trainer(parse_config(grey))
    one = {**cfg, "out_dir": str(tmp_path / "one"), "model": {"arch": "h2t_unet", "preset": "tiny"}}
    with pytest.raises(ValueError, match=r"3 channel\(s\) per sample but the network takes 1 .*in_channels"):
        Trainer(parse_config(one))
    # every source of a mix is checked, and the validation pairs too, before the first step
    mixed = {**cfg, "out_dir": str(tmp_path / "mixed"), "data": [*cfg["data"], grey["data"][0]]}
    with pytest.raises(ValueError, match=r"training data has 1 channel\(s\)"):
        Trainer(parse_config(mixed))
    grey_val = {**cfg, "out_dir": str(tmp_path / "val"),
                "validation": {**cfg["validation"], "data": {**cfg["validation"]["data"], "channel_wavelengths_um": None}}}
    with pytest.raises(ValueError, match=r"validation pairs have 1 channel\(s\) .*validation.data.channel_wavelengths_um"):
        Trainer(parse_config(grey_val))


def test_colour_benchmark_restores_each_channel_with_its_own_psf(tissue_dir, tmp_path, capsys):
    from napari_mpt_deblur.cli import main
    from napari_mpt_deblur.evaluation.benchmark import BenchmarkConfig, run_benchmark

    cfg = BenchmarkConfig(sharp_dir=tissue_dir, names=["t0", "t1"], defocus_um=[4.0],
                          channel_wavelengths_um=RGB_WAVELENGTHS_UM, methods=["input", "rl10", "wiener:0.01"],
                          stardist=False)
    result = run_benchmark(cfg, tmp_path / "bench", log=lambda s: None)
    rows = {r["method"]: r for r in result.summary if r["defocus_um"] == 4.0}
    assert rows["rl10"]["psnr"] > rows["input"]["psnr"] + 0.3
    assert rows["wiener:0.01"]["psnr"] > rows["input"]["psnr"] + 0.3
    assert all(0 < r["ssim"] <= 1 for r in rows.values())
    assert next(r for r in result.per_image if r["method"] == "sharp")["megapixels"] == pytest.approx(128 * 160 / 1e6)
    assert "colour images, each channel blurred at its own wavelength (0.61, 0.53, 0.46 um)" in \
        (tmp_path / "bench/summary.md").read_text()

    # the oracle restores each channel with that channel's PSF
    from napari_mpt_deblur.evaluation.benchmark import channel_psfs, make_restorer, parse_method
    from napari_mpt_deblur.evaluation.classical import richardson_lucy

    psfs = channel_psfs(cfg, 4.0)
    assert len(psfs) == 3 and psfs[0].sum() == pytest.approx(1.0)
    assert psfs[0].shape != psfs[2].shape or not np.allclose(psfs[0], psfs[2])  # red's PSF is not blue's
    blurred = np.random.default_rng(0).random((3, 40, 48)).astype(np.float32)
    got = make_restorer(parse_method("rl5"), psfs, None, {})(blurred)
    for c in range(3):
        np.testing.assert_allclose(got[c], richardson_lucy(blurred[c], psfs[c], 5), atol=1e-6)

    with pytest.raises(ValueError, match="colour benchmark needs stardist off"):
        BenchmarkConfig(sharp_dir=tissue_dir, channel_wavelengths_um=RGB_WAVELENGTHS_UM)
    assert main(["benchmark", "--sharp", str(tissue_dir), "--rgb", "--methods", "input",
                 "--out", str(tmp_path / "cli")]) == 1
    assert "--rgb needs --no-stardist" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()
    # a grey benchmark of colour files says how to run it
    assert main(["benchmark", "--sharp", str(tissue_dir), "--no-stardist", "--methods", "input",
                 "--out", str(tmp_path / "grey")]) == 1
    assert "needs 2D grey images, got shape (128, 160, 3) (colour images: --rgb)" in capsys.readouterr().err
    assert main(["benchmark", "--sharp", str(tissue_dir), "--rgb", "--no-stardist", "--methods", "input,wiener:0.01",
                 "--names", "t1,t2", "--defocus", "4", "--out", str(tmp_path / "cli")]) == 0
    assert "wiener:0.01" in (tmp_path / "cli/summary.md").read_text()


def test_a_colour_model_fine_tunes_on_colour_images(tissue, tmp_path):
    """EFCRex fine-tuning of a colour model: unlabeled colour images (H x W x 3, as napari holds
    them) plus sharp colour images for synthetic pairs blurred per channel; it refuses to guess the
    sharp images (the only bundled colour image is a test image)."""
    from napari_mpt_deblur.models.config import preset_config
    from napari_mpt_deblur.models.registry import build_model, load_model, save_model
    from napari_mpt_deblur.training.finetune import FineTuner

    torch.manual_seed(0)
    path = save_model(build_model(preset_config("h2t_unet", "tiny", 3)), tmp_path / "rgb-tiny", trained=False)
    blurry = synthesize_defocus(np.moveaxis(tissue, -1, 0).astype(np.float64) / 255, BENCHMARK_OPTICS.psf_params(6.0),
                                rng=0, channel_wavelengths_um=RGB_WAVELENGTHS_UM)
    unlabeled = [np.moveaxis(blurry, 0, -1)[:128, :160]]
    with pytest.raises(ValueError, match="3-channel .colour. model: its fine-tune needs sharp colour images"):
        FineTuner(path, unlabeled, steps=1, device="cpu")
    tuner = FineTuner(path, unlabeled, [tissue[128:, 160:]], steps=2, batch=2, patch=64, device="cpu")
    assert tuner.trainer.extra_data[0]["inp"].shape == (3, 64, 64)
    assert tuner.trainer.train_data[0]["kernel"].shape == (3,)  # a PSF per channel
    before = {k: v.clone() for k, v in tuner.model.state_dict().items()}
    result = tuner.run()
    assert result.steps_done == 2 and any(not torch.equal(v, before[k]) for k, v in result.model.state_dict().items())
    saved = load_model(tuner.save(tmp_path / "rgb-tuned"))
    assert saved.record.architecture.in_channels == 3

    # the command line reads colour files in colour for a colour model
    from napari_mpt_deblur.cli import main

    (tmp_path / "blurry").mkdir()
    (tmp_path / "sharp").mkdir()
    tifffile.imwrite(tmp_path / "blurry/b.tif", np.clip(unlabeled[0] * 255, 0, 255).astype(np.uint8), photometric="rgb")
    tifffile.imwrite(tmp_path / "sharp/s.tif", tissue[128:, 160:], photometric="rgb")
    assert main(["finetune", "--model", str(path.with_suffix(".json")), "--unlabeled", str(tmp_path / "blurry"),
                 "--sharp", str(tmp_path / "sharp"), "--steps", "1", "--batch", "2", "--patch", "64", "--device", "cpu",
                 "--out", str(tmp_path / "cli-tuned")]) == 0
    assert load_model(tmp_path / "cli-tuned.json").record.architecture.in_channels == 3
