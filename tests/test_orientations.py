"""Orientation and pixel-shift averaging (inference.orientations): flips cancel a grid-locked
pattern, one-pixel shifts cancel one that flips leave, the engine's average equals flipping the
image by hand, and every front end passes the settings through."""

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
    with pytest.raises(ValueError, match=r"@3 is not a pass count; use @1 \(one pass\), @4"):
        parse_method("h2t:h2t-unet-fluo@3")
    two = parse_method("mpt:mpt-tiny-fluo@1s2")
    assert (two.model, two.orientations, two.shifts) == ("mpt-tiny-fluo", 1, 2)
    assert (parse_method("mpt:mpt-tiny-fluo@s1").orientations, parse_method("mpt:mpt-tiny-fluo@s1").shifts) == (None, 1)
    assert parse_method("mpt:mpt-tiny-fluo@4").shifts is None
    for bad in ("@1s3", "@s", "@4x2"):
        with pytest.raises(ValueError, match=f"{bad} is not a pass count"):
            parse_method(f"mpt:mpt-tiny-fluo{bad}")


class WindowedGridPattern(torch.nn.Module):
    """A period-2 pattern locked to the tile's pixel grid whose strength and sign vary along a
    32-pixel window grid, asymmetrically: what ``mpt-tiny-fluo`` adds (docs/inference.md). A
    flip moves the window grid onto other pixels, so the flips' patterns differ and do not cancel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        yy = torch.arange(x.shape[-2], dtype=x.dtype)[:, None]
        xx = torch.arange(x.shape[-1], dtype=x.dtype)[None, :]
        envelope = 1 + torch.sin(2 * torch.pi * xx / 32 + 0.3) + 0.5 * torch.cos(2 * torch.pi * yy / 32)
        return x + 0.1 * envelope * (1 - 2 * (xx % 2))


def test_one_pixel_shifts_cancel_a_pattern_that_flips_leave():
    x = torch.rand(2, 1, 64, 96)
    net = WindowedGridPattern()
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # a tile's edge rows have no shifted twin
    residual = {(count, shifts): (average_orientations(net, x, count, shifts=shifts) - x)[inner].abs().max().item()
                for count in (1, 4) for shifts in (1, 2)}
    assert residual[(1, 1)] > 0.2 and residual[(4, 1)] > 0.05  # flips alone leave it
    assert residual[(1, 2)] < 0.02 and residual[(4, 2)] < 0.002
    # What the network does not add survives the shift exactly (the replicated edge included).
    identity = lambda t: t.clone()  # noqa: E731
    for count in (1, 4, 8):
        torch.testing.assert_close(average_orientations(identity, x, count, shifts=2), x, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"shifts must be one of \(1, 2\), got 3"):
        average_orientations(net, x, 1, shifts=3)
    with pytest.raises(ValidationError, match="shifts"):
        InferenceSettings(shifts=4)


def test_engine_shift_average_equals_shifting_the_image_by_hand(random_h2t):
    """One whole tile: the engine's 2-shift average equals restoring the image and the image moved
    by one pixel (replicated at the far edge) and averaging them, row and column 0 excepted."""
    rng = np.random.default_rng(5)
    image = rng.normal(100, 20, size=(64, 96)).astype(np.float32)
    fixed = dict(tile=128, normalisation_scope="fixed", intensity_range=(0.0, 200.0))
    single = _engine(random_h2t, **fixed)
    moved = np.pad(image[1:, 1:], ((0, 1), (0, 1)), mode="edge")
    by_hand = (single.deblur_plane(image)[1:, 1:] + single.deblur_plane(moved)[:-1, :-1]) / 2
    two = _engine(random_h2t, shifts=2, **fixed).deblur_plane(image)
    np.testing.assert_allclose(two[1:, 1:], by_hand, atol=1e-3)
    assert np.abs(two - single.deblur_plane(image)).max() > 0.05  # the random net is not shift-equivariant


def test_a_models_shift_default_is_used_logged_overridden_and_inherited(tmp_path, random_h2t, capsys):
    from napari_mpt_deblur.evaluation.benchmark import ModelRestorer
    from napari_mpt_deblur.models.record import read_record
    from napari_mpt_deblur.training.finetune import FineTuner

    model = save_model(random_h2t, tmp_path / "h2t-shift", trained=False, shifts=2)
    assert (read_record(model).shifts, read_record(model).orientations) == (2, None)
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, np.random.default_rng(6).integers(0, 4000, size=(64, 80), dtype=np.uint16))
    runs = {}
    for name, flags in {"default": [], "one": ["--shifts", "1"], "both": ["--orientations", "4", "--shifts", "2"]}.items():
        out = tmp_path / f"{name}.tif"
        assert main(["predict", str(src), str(out), "--model", str(model), "--quiet", *flags]) == 0
        runs[name] = (read_image(out).run_record.settings, capsys.readouterr().err)
    (default, default_log), (one, one_log), (both, both_log) = runs["default"], runs["one"], runs["both"]
    assert (default.shifts, default.shifts_from, default.passes) == (2, "model", 2)
    assert "2 pixel shifts averaged (the model's default; shifts 1 for one pass)" in default_log
    assert (one.shifts, one.shifts_from) == (1, "settings") and "averaged" not in one_log
    assert both.passes == 8 and "4 orientations x 2 pixel shifts averaged\n" in both_log
    assert ModelRestorer(str(model), "cpu").engine.settings.shifts == 2
    assert ModelRestorer(str(model), "cpu", shifts=1).engine.settings.shifts == 1

    tuned = FineTuner(str(model), [np.random.default_rng(7).random((64, 64), dtype=np.float32)], steps=1, batch=1,
                      patch=32, device="cpu")
    tuned.run()
    assert read_record(tuned.save(tmp_path / "tuned")).shifts == 2
