"""Calibration to one microscope (issue 17): optics model, optics resolution, held-back validation,
a short real calibration run through the library and the CLI, and the saved model's record."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile

from napari_mpt_deblur.cli import main
from napari_mpt_deblur.data.optics import Acquisition, parse_immersion
from napari_mpt_deblur.data.samples import in_focus_bbbc006
from napari_mpt_deblur.losses.efcr import WARM_START_NYQUIST_WEIGHT
from napari_mpt_deblur.models.registry import ModelNameError, read_record, resolve_model_path
from napari_mpt_deblur.training import calibrate as cal
from napari_mpt_deblur.training.network import gain_standard_errors, significant_gain

SPEC_OPTICS = Acquisition(na=0.45, wavelength_um=0.461, pixel_um=0.645)


def small_settings(model, **kw) -> cal.CalibrationSettings:
    base = dict(model=str(model), optics=SPEC_OPTICS, time_budget_minutes=0.2, patch=32, batch_size=2,
                validation_crop=64, validate_every=3, use_bundled=False, device="cpu", warmup_steps=0)
    return cal.CalibrationSettings(**{**base, **kw})


def sharp_crops() -> cal.SharpSet:
    image = in_focus_bbbc006()
    out = cal.SharpSet()
    out.add(image[:160, :200], "a")
    out.add(image[200:360, 300:500], "b")
    return out


# ---------------------------------------------------------------------------------- optics


def test_acquisition_ranges_and_draws_match_the_microscope():
    low, high = SPEC_OPTICS.visible_defocus_um()
    # Half the depth of field (0.461 / 0.45^2 / 2) to a 12 px blur radius (12 * 0.645 / tan(asin 0.45)).
    assert (low, high) == (pytest.approx(1.138, abs=1e-3), pytest.approx(15.36, abs=1e-2))
    assert SPEC_OPTICS.blur_radius_px(high) == pytest.approx(12.0, abs=1e-2)
    assert SPEC_OPTICS.label() == "NA 0.45 air, 461 nm, 0.645 um/px"
    assert SPEC_OPTICS.slug() == "NA0.45-air-461nm-0.645um"
    draws = SPEC_OPTICS.defocus_range()
    rng = np.random.default_rng(0)
    signs = set()
    for _ in range(200):
        params, peak, read = draws.sample(rng)
        assert (params.na, params.wavelength_um, params.pixel_um, params.immersion_index) == (0.45, 0.461, 0.645, 1.0)
        assert low <= abs(params.defocus_um) <= high
        assert 200 <= peak <= 5000 and 1 <= read <= 5
        signs.add(np.sign(params.defocus_um))
    assert signs == {-1.0, 1.0}
    oil = Acquisition(na=1.4, immersion_index=1.518, wavelength_um=0.52, pixel_um=0.108)
    assert oil.slug() == "NA1.4-oil-520nm-0.108um"
    with pytest.raises(ValueError, match="an oil objective needs immersion 1.518"):
        Acquisition(na=1.4, wavelength_um=0.52, pixel_um=0.108)


def test_the_default_range_follows_a_start_model_trained_on_far_defocus():
    """Calibrating mpt-tiny-fluo-wide (trained on blur radii to 26 px) to the default range of
    12 px would quietly un-train its far-defocus skill: the range widens to the model's own."""
    wide, tiny = (read_record(resolve_model_path(name)) for name in ("mpt-tiny-fluo-wide", "mpt-tiny-fluo"))
    assert (wide.trained_blur_radius_px(), tiny.trained_blur_radius_px()) == (26.0, 12.0)
    base = cal.CalibrationSettings(model="mpt-tiny-fluo-wide", optics=SPEC_OPTICS)
    widened = base.for_start_model(wide)
    assert widened.max_blur_radius_px == 26.0
    low, high = widened.training_defocus_um()
    assert low == pytest.approx(1.138, abs=1e-3) and SPEC_OPTICS.blur_radius_px(high) == pytest.approx(26.0, abs=1e-2)
    assert max(widened.validation_defocus_um()) > 15.36  # validated where the model was trained too
    assert base.for_start_model(tiny) is base  # 12 px: the default range already covers it
    given = cal.CalibrationSettings(model="mpt-tiny-fluo-wide", optics=SPEC_OPTICS, defocus_um=(1.0, 8.0))
    assert given.for_start_model(wide).training_defocus_um() == (1.0, 8.0)  # the user's range wins
    assert cal.CalibrationSettings(model="x", optics=SPEC_OPTICS, max_blur_radius_px=6.0).for_start_model(wide) \
        .max_blur_radius_px == 6.0


def test_optics_from_arguments_metadata_and_defaults(tmp_path):
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, np.zeros((16, 16), np.uint16), metadata={
        "axes": "YX", "PhysicalSizeX": 0.325, "PhysicalSizeY": 0.325,
        "Channel": {"EmissionWavelength": 520, "EmissionWavelengthUnit": "nm"}})
    optics, sources = cal.resolve_optics({"na": 0.75, "pixel_um": 0.3, "wavelength_um": None, "immersion_index": None},
                                         [path])
    assert optics == Acquisition(na=0.75, wavelength_um=0.52, pixel_um=0.3)
    assert sources["na"] == sources["pixel_um"] == "given"  # given values win over the file's 0.325
    assert "cells.ome.tif" in sources["wavelength_um"] and "EmissionWavelength" in sources["wavelength_um"]
    assert sources["immersion_index"].startswith("assumed: air")
    with pytest.raises(ValueError, match=r"--na, --immersion, --wavelength, --pixel: not given on the command line$"):
        cal.resolve_optics({"na": None, "wavelength_um": None, "pixel_um": None, "immersion_index": None})
    with pytest.raises(ValueError, match="--na, --immersion: not given on the command line or in the metadata"):
        cal.resolve_optics({"na": None, "wavelength_um": None, "pixel_um": None, "immersion_index": None}, [path])
    with pytest.raises(ValueError, match="micrometres"):
        cal.resolve_optics({"na": 0.45, "wavelength_um": 461, "pixel_um": 0.645, "immersion_index": None})
    assert parse_immersion("Oil") == 1.518 and parse_immersion("1.33") == 1.33
    with pytest.raises(ValueError, match="refractive index"):
        parse_immersion("honey")


# ---------------------------------------------------------------------------------- data


def test_validation_is_held_back_from_training():
    few = sharp_crops()
    train, val = cal.split_validation(few, count=4, seed=0)
    # Two images: the right quarter of each is validation, the rest trains; no pixel in both.
    assert [im.shape for im in train.images] == [(160, 150), (160, 150)]
    assert [im.shape for im in val.images] == [(160, 50), (160, 50)]
    assert val.names == ["a[x>=150]", "b[x>=150]"]
    many = cal.SharpSet([np.full((8, 8), i, np.float32) for i in range(20)], [f"im{i}" for i in range(20)])
    train, val = cal.split_validation(many, count=4, seed=0)
    assert len(val.names) == 2 and len(train.names) == 18  # one in eight, whole images
    assert not set(val.names) & set(train.names)
    stack = np.stack([np.zeros((64, 64)), in_focus_bbbc006()[:64, :64].astype(float), np.ones((64, 64))])
    best = cal.SharpSet()
    best.add(stack, "stack")
    assert best.names == ["stack[z=1]"] and "best-focus plane 1" in best.notes[0]
    with pytest.raises(ValueError, match="sharp image tiny is 20 x 30 px; calibration needs sharp images of at least 64"):
        best.add(np.ones((20, 30)), "tiny")
    with pytest.raises(ValueError, match="needs sharp images"):
        cal.split_validation(cal.SharpSet(), 4, 0)


def test_bundled_sharp_images_are_training_split_and_not_doubled(micro_model_path, tmp_path):
    from napari_mpt_deblur.data.splits import DSB_FLUO_TEST, U2OS_STARDIST_VAL, U2OS_TEST

    bundled = cal.bundled_sharp()
    assert len(bundled.names) == 16
    held_out = set(U2OS_TEST) | set(U2OS_STARDIST_VAL) | set(DSB_FLUO_TEST)
    assert not any(name.split("_", 1)[1] in held_out for name in bundled.names)
    # The user gives one of the bundled images again: it is used once.
    again = cal.SharpSet()
    again.add(bundled.images[0], "mine")
    calibrator = cal.Calibrator(small_settings(micro_model_path, use_bundled=True), again, work_dir=tmp_path / "w")
    assert len(calibrator.train_names) + len(calibrator.val_names) == 16
    assert "mine" in calibrator.train_names + calibrator.val_names
    # A calibration is a warm start: the guard against a grid-locked period-2 pattern is on (issue 13).
    assert calibrator.config.efcr.nyquist_weight == WARM_START_NYQUIST_WEIGHT > 0


# ---------------------------------------------------------------------------------- runs


@pytest.mark.slow  # two time-budgeted runs (12 s, then the resumed one): ~25 s
def test_calibration_runs_in_budget_and_the_record_holds_the_optics(micro_model_path, tmp_path):
    settings = small_settings(micro_model_path)
    calibrator = cal.Calibrator(settings, sharp_crops(), work_dir=tmp_path / "work",
                                optics_sources={"na": "given"})
    assert calibrator.start_validation is not None and calibrator.start_validation["step"] == 0
    result = calibrator.run()
    assert result.steps_done >= 1 and result.best is not None
    # Every validation scores each held-back pair; the verdict states the gain in standard errors.
    assert len(result.best["psnr_pairs"]) == len(calibrator.trainer.val_pairs) == 8
    start, best = calibrator.start_validation, result.best
    verdict = calibrator.verdict()
    assert verdict.startswith(f"best validation PSNR {best['psnr']:.2f} dB at step {best['step']}")
    if best["step"] == 0:
        assert "the starting model: no checkpoint beat it" in verdict
    else:
        assert f"{gain_standard_errors(best, start):.1f} standard errors of its 8 per-pair differences" in verdict
    logged = list(csv.DictReader((tmp_path / "work" / "log.csv").open(encoding="utf-8")))
    assert logged and all(float(row["nyquist"]) >= 0 for row in logged)  # the Nyquist loss ran
    assert calibrator.trainer.budget_used <= 60 * settings.time_budget_minutes * 1.5
    with pytest.raises(ModelNameError):
        calibrator.save("h2t-unet-fluo")  # a shipped name is refused
    path = calibrator.save(tmp_path / "calibrated")
    record = read_record(path)
    assert record.optics == SPEC_OPTICS
    calibration = record.training["calibration"]
    assert calibration["settings"]["optics"] == SPEC_OPTICS.model_dump(mode="json")
    assert calibration["from_model"]["name"] == "micro"
    assert calibration["optics_sources"] == {"na": "given"}
    assert calibration["validation_defocus_um"] == [2.92, 6.47, 10.03, 13.58]
    assert calibration["start_validation"]["psnr"] == pytest.approx(result.start_validation["psnr"])
    assert record.training["exported_from"]["checkpoint"] == "best"
    # Nothing is overwritten.
    with pytest.raises(FileExistsError):
        calibrator.save(tmp_path / "calibrated")
    # An interrupted calibration continues where it stopped, with a longer budget, and keeps its start score.
    longer = calibrator.trainer.budget_used / 60 + 0.25  # minutes: room for more steps however loaded the machine
    resumed = cal.Calibrator(settings.model_copy(update={"time_budget_minutes": longer}), sharp_crops(),
                             work_dir=tmp_path / "work", resume=True)
    assert resumed.trainer.step == result.steps_done
    assert resumed.start_validation["psnr"] == pytest.approx(result.start_validation["psnr"])
    assert resumed.run().steps_done > result.steps_done


def test_a_calibrated_model_keeps_its_bases_orientations_default(micro_model_path, tmp_path):
    from napari_mpt_deblur.models.registry import load_model, save_model

    base = save_model(load_model(micro_model_path).model, tmp_path / "four", trained=False, orientations=4)
    calibrator = cal.Calibrator(small_settings(base), sharp_crops(), work_dir=tmp_path / "work")
    assert read_record(calibrator.save(tmp_path / "calibrated")).orientations == 4  # the start's weights, saved


def test_a_checkpoint_must_beat_the_best_by_more_than_the_validations_noise():
    rng = np.random.default_rng(0)
    old = {"psnr": 32.0, "psnr_pairs": list(32.0 + rng.normal(0, 1, 16))}

    def shifted(pairs_shift):
        pairs = np.asarray(old["psnr_pairs"]) + pairs_shift
        return {"psnr": float(np.mean(pairs)) - np.mean(old["psnr_pairs"]) + old["psnr"], "psnr_pairs": list(pairs)}

    spread = rng.normal(0, 0.26, 16)  # the 0.26 dB per-pair spread measured in a real calibration
    noisy = shifted(spread - spread.mean() + 0.03)  # +0.03 dB on average: 0.5 standard errors
    clear = shifted(spread - spread.mean() + 0.30)  # +0.30 dB: about 4.6 standard errors
    assert noisy["psnr"] == pytest.approx(32.03) and clear["psnr"] == pytest.approx(32.30)
    assert 0.2 < gain_standard_errors(noisy, old) < 1.0 and gain_standard_errors(clear, old) > 3
    assert not significant_gain(noisy, old, 2.0)
    assert significant_gain(clear, old, 2.0)
    assert significant_gain(noisy, old, 0.0)  # 0: any higher mean counts
    assert not significant_gain(shifted(np.full(16, -0.01)), old, 0.0)  # a loss never counts
    assert significant_gain({"psnr": 32.03}, old, 2.0)  # no per-pair scores (an older run): any gain
    assert significant_gain({"psnr": 32.03, "psnr_pairs": [32.0] * 15}, old, 2.0)  # other pairs: any gain


def test_min_gain_keeps_the_start_unless_a_checkpoint_clears_it(micro_model_path, tmp_path, capsys):
    """The trainer applies the margin: with an unreachable one, the start stays the best and the
    CLI says why."""
    sharp = tmp_path / "sharp.tif"
    tifffile.imwrite(sharp, in_focus_bbbc006()[:200, :240])
    code = main(["calibrate", "--model", str(micro_model_path), "--na", "0.45", "--wavelength", "0.461",
                 "--pixel", "0.645", "--sharp", str(sharp), "--no-bundled", "--time-budget", "0.1", "--patch", "32",
                 "--batch", "2", "--validate-every", "2", "--min-gain-se", "1e9", "--held-back", "1", "--device", "cpu",
                 "--precision", "bf16", "--out", str(tmp_path / "m"), "--work-dir", str(tmp_path / "work")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = list(csv.DictReader((tmp_path / "work" / "val.csv").open(encoding="utf-8")))
    # Later checkpoints validated higher (the untrained micro model improves at every step), yet
    # none replaced the start.
    assert len(rows) >= 2 and max(float(r["psnr"]) for r in rows[1:]) > float(rows[0]["psnr"])
    assert "at step 0 (the starting model: no checkpoint beat it" in captured.out
    assert "by more than 1e+09 standard errors of its per-pair differences" in captured.err
    training = read_record(tmp_path / "m.json").training
    assert training["exported_from"] == {"checkpoint": "best", "step": 0}
    assert training["calibration"]["settings"]["min_gain_se"] == 1e9
    assert training["calibration"]["settings"]["validation_images"] == 1
    assert training["calibration"]["settings"]["precision"] == "bf16"  # --precision reaches the trainer's settings


def test_cli_reads_optics_from_ome_metadata_and_reports_them(micro_model_path, tmp_path, capsys):
    sharp = tmp_path / "sharp.ome.tif"
    image = in_focus_bbbc006()[:200, :240]
    tifffile.imwrite(sharp, image, metadata={"axes": "YX", "PhysicalSizeX": 0.645, "PhysicalSizeY": 0.645,
                                             "Channel": {"EmissionWavelength": 461}})
    out = tmp_path / "cal_model"
    code = main(["calibrate", "--model", str(micro_model_path), "--na", "0.45", "--sharp", str(sharp),
                 "--no-bundled", "--time-budget", "0.1", "--patch", "32", "--batch", "2", "--validate-every", "3",
                 "--device", "cpu", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "optics: NA 0.45 air, 461 nm, 0.645 um/px" in text
    assert "na         0.45  (given)" in text
    assert "wavelength 0.461  (OME-TIFF metadata of sharp.ome.tif (Channel EmissionWavelength 461 nm))" in text
    assert "pixel      0.645  (OME-TIFF metadata of sharp.ome.tif (Pixels PhysicalSizeX 0.645 µm))" in text
    assert "start: validation PSNR" in text and f"model: {out}.json" in text
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["optics"] == {"na": 0.45, "immersion_index": 1.0, "wavelength_um": 0.461, "pixel_um": 0.645}
    # Missing optics: a clear error before any training, nothing written.
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, image)
    code = main(["calibrate", "--model", str(micro_model_path), "--sharp", str(plain), "--time-budget", "1",
                 "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 1 and not (tmp_path / "never.json").exists()
    assert ("calibration needs the microscope's --na, --immersion, --wavelength, --pixel: not given on the command "
            "line or in the metadata of the given images") in err


def test_one_microscope_model_for_validation_benchmark_and_flags(tmp_path):
    from napari_mpt_deblur.cli import build_parser
    from napari_mpt_deblur.data.optics import BENCHMARK_OPTICS
    from napari_mpt_deblur.evaluation.benchmark import BenchmarkConfig, psf_params
    from napari_mpt_deblur.training.config import SyntheticValidation

    # Older configs wrote the optics flat: they are read into the one microscope model.
    val = SyntheticValidation(sharp=tmp_path, na=0.75, wavelength_um=0.52)
    assert val.optics == Acquisition(na=0.75, wavelength_um=0.52, pixel_um=0.645)
    assert SyntheticValidation(sharp=tmp_path).optics == BENCHMARK_OPTICS
    old_json = {"sharp_dir": str(tmp_path), "na": 1.4, "immersion_index": 1.518, "wavelength_um": 0.52, "pixel_um": 0.1}
    cfg = BenchmarkConfig.model_validate(old_json)
    assert cfg.optics == Acquisition(na=1.4, immersion_index=1.518, wavelength_um=0.52, pixel_um=0.1)
    assert psf_params(cfg, 3.0) == cfg.optics.psf_params(3.0)
    assert BenchmarkConfig.model_validate_json(cfg.model_dump_json()) == cfg  # config.json round trip
    with pytest.raises(ValueError, match="must be below the immersion index"):
        BenchmarkConfig(sharp_dir=tmp_path, optics={"na": 1.4, "wavelength_um": 0.52, "pixel_um": 0.1})
    # Both commands take the same generated flags; the benchmark defaults to its microscope.
    parser = build_parser()
    bench = parser.parse_args(["benchmark", "--sharp", str(tmp_path), "--out", str(tmp_path / "b"), "--immersion", "oil",
                              "--na", "1.3"])
    calib = parser.parse_args(["calibrate", "--time-budget", "1", "--immersion", "oil", "--na", "1.3"])
    from napari_mpt_deblur._cli_common import optics_flags

    assert optics_flags(bench) == {"na": 1.3, "wavelength_um": 0.461, "pixel_um": 0.645, "immersion_index": 1.518}
    assert optics_flags(calib) == {"na": 1.3, "wavelength_um": None, "pixel_um": None, "immersion_index": 1.518}


def test_names_flag_takes_a_split_or_file_stems():
    from napari_mpt_deblur._cli_common import names_arg

    assert names_arg("u2os_train_and_val") == "u2os_train_and_val"
    assert names_arg("07fb37aafa66") == ["07fb37aafa66"]  # one stem is not a split name
    assert names_arg("a, b") == ["a", "b"]

