"""Orientation averaging (inference.orientations): flips cancel a grid-locked pattern, the engine's
average equals flipping the image by hand, and every front end passes the setting through."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from pydantic import ValidationError

from napari_mpt_deblur.cli import main
from napari_mpt_deblur.data.samples import defocused_bbbc006
from napari_mpt_deblur.evaluation.spectral import nyquist_energy_ratio
from napari_mpt_deblur.inference import Deblurrer, InferenceSettings
from napari_mpt_deblur.inference.orientations import average_orientations
from napari_mpt_deblur.io.images import read_image
from napari_mpt_deblur.models.config import preset_config
from napari_mpt_deblur.models.registry import LoadedModel, ModelRecord, build_model, save_model


class GridPattern(torch.nn.Module):
    """Returns its input plus a period-2 pattern locked to the tile's own pixel grid, in all three
    Nyquist directions (what a sub-pixel upsampler with drifted phases adds)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        yy = torch.arange(x.shape[-2], dtype=x.dtype)[:, None]
        xx = torch.arange(x.shape[-1], dtype=x.dtype)[None, :]
        sign = lambda k: 1 - 2 * (k % 2)  # noqa: E731 - (-1)**k
        return x + 0.08 * sign(yy) + 0.05 * sign(xx) + 0.03 * sign(yy + xx)


def _engine(net: torch.nn.Module, **settings) -> Deblurrer:
    arch = preset_config("h2t_unet", "tiny", 1)
    return Deblurrer(LoadedModel(net, ModelRecord(name="under-test", architecture=arch), None),
                     InferenceSettings(device="cpu", **settings))


@pytest.fixture(scope="module")
def random_h2t() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(preset_config("h2t_unet", "tiny", 1))


def test_four_flips_cancel_a_grid_locked_pattern_exactly():
    x = torch.rand(2, 1, 48, 64)
    net = GridPattern()
    plain = average_orientations(net, x, 1)
    assert (plain - x).abs().max() > 0.15  # the pattern is there without averaging
    for count in (4, 8):
        torch.testing.assert_close(average_orientations(net, x, count), x, atol=1e-6, rtol=0)
    # An odd side (a whole image smaller than the tile) is extended to even first: flipping an
    # odd side would keep every pixel's parity and cancel nothing.
    odd = torch.rand(1, 1, 47, 63)
    torch.testing.assert_close(average_orientations(net, odd, 4), odd, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"orientations must be one of \(1, 4, 8\), got 2"):
        average_orientations(net, x, 2)


def test_engine_removes_the_pattern_over_overlapping_and_odd_sized_tiles():
    """Several overlapping tiles, the last ones shifted back inside the plane (a 200 x 300 plane in
    64 px tiles), and a whole-image tile with odd sides (61 x 93): every tile's pattern cancels, so
    the engine returns the input; without averaging the Nyquist ratio of the result is hundreds of
    times the input's."""
    image = defocused_bbbc006()[100:300, 200:500].astype(np.float32)
    plain = _engine(GridPattern(), tile=64, overlap=16).deblur_plane(image)
    averaged = _engine(GridPattern(), tile=64, overlap=16, orientations=4).deblur_plane(image)
    assert nyquist_energy_ratio(plain) > 100 * nyquist_energy_ratio(image)
    np.testing.assert_allclose(averaged, image, atol=1e-3 * float(np.ptp(image)))
    odd = image[:61, :93]
    plain_odd = _engine(GridPattern(), tile=128).deblur_plane(odd)
    assert np.abs(plain_odd - odd).max() > 0.05 * float(np.ptp(odd))
    averaged_odd = _engine(GridPattern(), tile=128, orientations=4).deblur_plane(odd)
    np.testing.assert_allclose(averaged_odd, odd, atol=1e-3 * float(np.ptp(odd)))


def test_engine_average_equals_flipping_the_image_by_hand(random_h2t):
    """One whole tile: the engine's 4- and 8-orientation averages equal restoring the flipped (and
    transposed) images one by one and averaging them (the normalisation ignores orientation)."""
    rng = np.random.default_rng(1)
    image = rng.normal(100, 20, size=(64, 96)).astype(np.float32)
    single = _engine(random_h2t, tile=128)
    by_hand = [np.flip(single.deblur_plane(np.ascontiguousarray(np.flip(image, axes))), axes)
               for axes in [(), (1,), (0,), (0, 1)]]
    by_hand_t = [np.flip(single.deblur_plane(np.ascontiguousarray(np.flip(image.T, axes))), axes).T
                 for axes in [(), (1,), (0,), (0, 1)]]
    four = _engine(random_h2t, tile=128, orientations=4).deblur_plane(image)
    eight = _engine(random_h2t, tile=128, orientations=8).deblur_plane(image)
    assert eight.shape == image.shape
    np.testing.assert_allclose(four, np.mean(by_hand, axis=0), atol=1e-3)
    np.testing.assert_allclose(eight, np.mean(by_hand + by_hand_t, axis=0), atol=1e-3)
    # The random network is not flip-equivariant: the average really differs from one pass.
    assert np.abs(four - by_hand[0]).max() > 0.05


def test_settings_accept_only_1_4_8_and_the_run_record_keeps_the_count(tmp_path, random_h2t):
    with pytest.raises(ValidationError, match="orientations"):
        InferenceSettings(orientations=3)
    save_model(random_h2t, tmp_path / "h2t-tiny", trained=False)
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, np.random.default_rng(2).integers(0, 4000, size=(2, 64, 80), dtype=np.uint16))
    out = tmp_path / "out.tif"
    assert main(["predict", str(src), str(out), "--model", str(tmp_path / "h2t-tiny.json"), "--axes", "ZYX",
                 "--orientations", "4", "--quiet"]) == 0
    record = read_image(out, axes="ZYX").run_record
    assert record.settings.orientations == 4 and record.complete
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(src), str(tmp_path / "never.tif"), "--model", "x", "--orientations", "3"])
    assert exc.value.code == 2 and not (tmp_path / "never.tif").exists()


def test_a_models_record_sets_the_default_and_the_user_overrides_it(tmp_path, random_h2t, capsys):
    """``ModelRecord.orientations`` (the shipped MPT's 4) is used when the user does not choose,
    said on the console and kept in the run record; an explicit choice wins; a fine-tune of the
    model keeps its base's default."""
    from napari_mpt_deblur.models.record import read_record
    from napari_mpt_deblur.training.finetune import FineTuner

    model = save_model(random_h2t, tmp_path / "h2t-four", trained=False, orientations=4)
    assert read_record(model).orientations == 4
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, np.random.default_rng(3).integers(0, 4000, size=(64, 80), dtype=np.uint16))
    runs = {}
    for name, flags in {"default": [], "one": ["--orientations", "1"]}.items():
        out = tmp_path / f"{name}.tif"
        assert main(["predict", str(src), str(out), "--model", str(model), "--quiet", *flags]) == 0
        runs[name] = (read_image(out).run_record.settings, capsys.readouterr().err)
    (default, default_log), (one, one_log) = runs["default"], runs["one"]
    assert (default.orientations, default.orientations_from) == (4, "model")
    assert "4 orientations averaged (the model's default; orientations 1 for one pass)" in default_log
    assert (one.orientations, one.orientations_from) == (1, "settings") and "orientations averaged" not in one_log
    assert InferenceSettings().orientations is None

    tuned = FineTuner(str(model), [np.random.default_rng(4).random((64, 64), dtype=np.float32)], steps=1, batch=1,
                      patch=32, device="cpu")
    tuned.run()
    assert read_record(tuned.save(tmp_path / "tuned")).orientations == 4


def test_run_records_written_before_the_source_field_still_load(tmp_path, random_h2t):
    from napari_mpt_deblur.evaluation.benchmark import ModelRestorer
    from napari_mpt_deblur.inference.settings import ResolvedSettings

    old = dict(tile=512, overlap=32, batch_size=1, device="cpu", precision="fp32", output_dtype="float32",
               normalisation_scope="plane", intensity_range=None, channels_last=True, size_multiple=16)
    assert ResolvedSettings.model_validate(old).orientations_from == "default"
    assert ResolvedSettings.model_validate({**old, "orientations": 4}).orientations_from == "settings"
    # A plain benchmark method runs the model as predict does: with its record's default.
    model = save_model(random_h2t, tmp_path / "h2t-four", trained=False, orientations=4)
    assert ModelRestorer(str(model), "cpu").engine.settings.orientations == 4
    assert ModelRestorer(str(model), "cpu", orientations=1).engine.settings.orientations == 1


def test_benchmark_methods_take_an_orientation_count():
    from napari_mpt_deblur.evaluation.benchmark import parse_method

    spec = parse_method("mpt:mpt-small-fluo@4")
    assert (spec.model, spec.arch, spec.orientations, spec.key) == ("mpt-small-fluo", "mpt", 4, "mpt:mpt-small-fluo@4")
    assert parse_method("h2t:h2t-unet-fluo").orientations is None  # the model's default, as predict
    assert parse_method("mpt:mpt-small-fluo@1").orientations == 1
    with pytest.raises(ValueError, match=r"@3 is not an orientation count; use @1 \(one pass\), @4"):
        parse_method("h2t:h2t-unet-fluo@3")
