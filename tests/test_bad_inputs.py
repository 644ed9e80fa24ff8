"""The bad-input table (issue 13): every way a user can get an input wrong, one row each.

Each row gives the input (a real ``mpt-deblur`` command line run in-process through
``cli.main``, or a library call), the expected exit code or exception type, a fragment of the
message the user sees (a regular expression), fragments that must NOT appear (tifffile or
pydantic jargon, hidden temporary files, wrong flag names) and, for every row, a check that
nothing in the working folder (input files, user model folder, outputs) was written, changed or
removed. Rows tagged ``issue13`` are the 14 kinds of case the issue reproduced; the others were
already handled and are kept here so they stay handled.

Rows run in a fresh folder (the current directory during the row) holding ``in.tif`` (64 x 64
float32), a user model folder (``MPT_DEBLUR_MODELS_DIR``) with a tiny untrained model ``micro``,
and whatever the row's ``setup`` adds.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

MICRO = {"preset": "micro", "dim": 8, "heads": (1, 2), "scales": ((0.5, 1.0), (1.0, 1.0)), "window_size": 4}


@dataclass
class Ctx:
    ws: Path  # the working folder (cwd during the row)
    models: Path  # the user model folder
    monkeypatch: pytest.MonkeyPatch


@dataclass
class Case:
    id: str
    #: a list of CLI arguments, or a callable(ctx) for a library call
    run: list[str] | Callable[[Ctx], Any]
    #: exit code (CLI), exception type (library), or "ok" (library call whose result ``check`` tests)
    expect: int | type[BaseException] | str
    message: str = ""
    absent: tuple[str, ...] = ()
    setup: Callable[[Ctx], None] | None = None
    check: Callable[[Any, Ctx], None] | None = None
    issue13: bool = False
    marks: tuple = field(default_factory=tuple)


# ---- setups --------------------------------------------------------------------------------


def _tif(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data, photometric="minisblack")


def _truncated_tif(ctx: Ctx) -> None:
    _tif(ctx.ws / "full.tif", np.random.default_rng(0).random((2, 128, 128), dtype=np.float32))
    data = (ctx.ws / "full.tif").read_bytes()
    (ctx.ws / "full.tif").unlink()
    (ctx.ws / "cut.tif").write_bytes(data[: len(data) // 3])


def _copy_model(ctx: Ctx, dest_stem: Path, truncate: bool = False, bad_json: bool = False) -> None:
    src = ctx.models / "micro"
    for suffix in (".safetensors", ".json"):
        shutil.copy(src.with_name(src.name + suffix), dest_stem.with_name(dest_stem.name + suffix))
    weights = dest_stem.with_name(dest_stem.name + ".safetensors")
    if truncate:
        weights.write_bytes(weights.read_bytes()[:200])
    if bad_json:
        dest_stem.with_name(dest_stem.name + ".json").write_text("{not json")


def _unlabeled(ctx: Ctx) -> None:
    from napari_mpt_deblur.data.samples import defocused_bbbc006

    _tif(ctx.ws / "blurry" / "z00.tif", defocused_bbbc006())  # a real 520 x 696 image


def _incomplete_zarr(ctx: Ctx) -> None:
    from napari_mpt_deblur.io.images import ZarrOutput

    ZarrOutput.create(ctx.ws / "half.zarr", shape=(2, 32, 32), dtype="float32", axes="ZYX", chunks=(1, 32, 32),
                      metadata={}, planes_total=2)


def _two_array_zarr(ctx: Ctx) -> None:
    import zarr

    group = zarr.open_group(str(ctx.ws / "two.zarr"), mode="w")
    group.create_array("a", shape=(32, 32), dtype="float32")
    group.create_array("b", shape=(32, 32), dtype="float32")


def _unguarded_script(ctx: Ctx) -> None:
    script = ctx.ws / "script.py"
    script.write_text("from napari_mpt_deblur.evaluation.compare import compare_stardist\nprint('no guard')\n")
    ctx.monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__file__=str(script)))


def _guarded_script(ctx: Ctx) -> None:
    script = ctx.ws / "script.py"
    script.write_text("def main():\n    pass\n\n\nif __name__ == '__main__':\n    main()\n")
    ctx.monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__file__=str(script)))


def _touch(name: str) -> Callable[[Ctx], None]:
    return lambda ctx: (ctx.ws / name).write_bytes(b"x")


def _setup_all(*setups: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        for s in setups:
            s(ctx)

    return run


# ---- library calls -------------------------------------------------------------------------


def _engine(ctx: Ctx):
    from napari_mpt_deblur.inference.engine import Deblurrer, InferenceSettings

    return Deblurrer("micro", InferenceSettings(device="cpu"))


def _settings(**fields: Any):
    from napari_mpt_deblur.inference.settings import InferenceSettings

    return InferenceSettings(**fields)


def _tuner(ctx: Ctx):
    from napari_mpt_deblur.training.finetune import FineTuner

    rng = np.random.default_rng(0)
    tuner = FineTuner("micro", [rng.random((64, 64), dtype=np.float32)], [rng.random((64, 64), dtype=np.float32)],
                      steps=1, batch=1, patch=32, device="cpu")
    return tuner  # the name is checked before anything is written, trained or not


def _registry():
    from napari_mpt_deblur.models import registry

    return registry


def _check_nan_ap(result, ctx):
    assert math.isnan(result.at(0.5).ap) and math.isnan(result.mean_ap)


def _check_undefined_table(result, ctx):
    assert "undefined" in result and "nan" not in result.lower().replace("undefined", "")


def _check_units(result, ctx):
    units = {u for _data, kwargs, _kind in result for u in kwargs.get("units", ("pixel",))}
    assert units == {"um"}, units
    scales = [kwargs["scale"][-1] for _data, kwargs, _kind in result]
    assert all(s == pytest.approx(0.645) for s in scales), scales


def _all_samples(ctx):
    from napari_mpt_deblur import _sample_data as S

    return [*S.defocused_bbbc006(), *S.in_focus_bbbc006(), *S.u2os_nuclei_with_labels(), *S.synthetic_defocus_stack()]


def _resolve_from_subfolder(ctx: Ctx):
    sub = ctx.ws / "elsewhere"
    sub.mkdir()
    ctx.monkeypatch.chdir(sub)
    return _registry().resolve_model_path("micro")


def _resolve_shadowed(ctx: Ctx):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = _registry().resolve_model_path("h2t-unet-fluo")
    return path, [str(w.message) for w in caught]


def _check_shadowed(result, ctx):
    path, messages = result
    assert path.parent == _registry().SHIPPED_DIR
    assert any("is ignored" in m for m in messages), messages


def _guard_check(ctx: Ctx):
    from napari_mpt_deblur.evaluation.stardist_process import _check_main_guard

    return _check_main_guard()


P = ["predict", "in.tif", "out.tif", "--model", "micro", "--device", "cpu", "--quiet"]
FT = ["finetune", "--model", "micro", "--unlabeled", "blurry", "--steps", "1", "--batch", "1", "--patch", "32",
      "--device", "cpu"]
NO_TIFF_JARGON = ("<tifffile", "holds no image series", "repeats Q")

CASES = [
    # ---- predict: input files ----
    Case("predict-missing-input", ["predict", "nope.tif", "out.tif", "--model", "micro"], 1, "input not found: nope.tif"),
    Case("predict-unsupported-input", ["predict", "in.png", "out.tif", "--model", "micro"], 1, "unsupported input",
         setup=_touch("in.png")),
    Case("predict-garbage-tiff", ["predict", "junk.tif", "out.tif", "--model", "micro"], 1, "truncated or corrupt",
         NO_TIFF_JARGON, setup=_touch("junk.tif")),
    Case("predict-truncated-tiff", ["predict", "cut.tif", "out.tif", "--model", "micro"], 1,
         r"cut\.tif: the TIFF file is truncated or corrupt", NO_TIFF_JARGON, setup=_truncated_tif, issue13=True),
    Case("predict-nan-input", P, 1, "NaN or Inf",
         setup=lambda c: _tif(c.ws / "in.tif", np.full((64, 64), np.nan, np.float32))),
    Case("predict-4d-without-axes", ["predict", "s4.tif", "out.tif", "--model", "micro"], 1,
         r"4-D image .*pass them, e\.g\. --axes TZYX", NO_TIFF_JARGON,
         setup=lambda c: _tif(c.ws / "s4.tif", np.zeros((2, 5, 32, 32), np.float32)), issue13=True),
    Case("predict-5d-without-axes", ["predict", "s5.tif", "out.tif", "--model", "micro"], 1, r"5-D image .*--axes",
         NO_TIFF_JARGON, setup=lambda c: _tif(c.ws / "s5.tif", np.zeros((2, 2, 5, 32, 32), np.float32)), issue13=True),
    Case("predict-incomplete-zarr", ["predict", "half.zarr", "out.tif", "--model", "micro"], 1,
         "incomplete mpt-deblur output", setup=_incomplete_zarr),
    Case("predict-zarr-two-arrays", ["predict", "two.zarr", "out.tif", "--model", "micro"], 1,
         "pass the array's own path", setup=_two_array_zarr),
    # ---- predict: axes ----
    Case("predict-axes-wrong-length", [*P, "--axes", "ZYX"], 1, "has 3 letters but .* has 2 dimensions"),
    Case("predict-axes-repeated", ["predict", "z.tif", "out.tif", "--model", "micro", "--axes", "ZZX"], 1,
         "repeats Z", setup=lambda c: _tif(c.ws / "z.tif", np.zeros((3, 32, 32), np.float32))),
    Case("predict-axes-without-y", ["predict", "z.tif", "out.tif", "--model", "micro", "--axes", "ZTX"], 1,
         "has no Y axis", setup=lambda c: _tif(c.ws / "z.tif", np.zeros((3, 32, 32), np.float32))),
    Case("predict-axes-not-letters", [*P, "--axes", "Y1"], 1, "invalid axes"),
    # ---- predict: outputs ----
    Case("predict-output-exists", P, 1, "already exists; choose another path or pass overwrite",
         setup=_touch("out.tif")),
    Case("predict-output-is-input", ["predict", "in.tif", "in.tif", "--model", "micro", "--overwrite"], 1,
         "is the input file"),
    Case("predict-output-suffix", ["predict", "in.tif", "out.png", "--model", "micro"], 1, "unsupported output"),
    Case("predict-output-unwritable", ["predict", "in.tif", "/proc/x.tif", "--model", "micro", "--device", "cpu",
                                       "--quiet"], 1, "cannot write /proc/x.tif", (".x.tif.",), issue13=True,
         marks=(pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc (Linux)"),)),
    Case("predict-output-parent-is-file", ["predict", "in.tif", "afile/out.tif", "--model", "micro"], 1,
         "cannot write afile/out.tif: afile is a file, not a folder", ("Errno",), setup=_touch("afile"), issue13=True),
    # ---- predict: settings ----
    Case("predict-batch-0", [*P, "--batch", "0"], 1, "--batch: ", ("batch_size", "batch-size"), issue13=True),
    Case("predict-tile-too-small", [*P, "--tile", "3"], 1, "--tile: "),
    Case("predict-negative-overlap", [*P, "--overlap", "-1"], 1, "--overlap: "),
    Case("predict-bad-precision", [*P, "--precision", "fp8"], 2, "invalid choice: 'fp8'"),
    Case("predict-missing-model-flag", ["predict", "in.tif", "out.tif"], 2, "--model"),
    Case("predict-orientations-3", [*P, "--orientations", "3"], 2, r"invalid choice: 3 \(choose from 1, 4, 8\)"),
    # ---- models ----
    Case("model-unknown-name", [*P[:3], "--model", "no-such", "--device", "cpu"], 1,
         "unknown model 'no-such'.*known models:.*micro"),
    Case("model-path-missing", [*P[:3], "--model", "./missing.safetensors"], 1, "model file not found"),
    Case("model-truncated-weights", [*P[:3], "--model", "./broken.safetensors", "--device", "cpu"], 1,
         "checksum does not match", setup=lambda c: _copy_model(c, c.ws / "broken", truncate=True)),
    Case("model-corrupt-record", [*P[:3], "--model", "./bad.json", "--device", "cpu"], 1, "not valid JSON",
         setup=lambda c: _copy_model(c, c.ws / "bad", bad_json=True)),
    Case("model-name-ambiguous-with-file-here", P, 1, "'micro' is ambiguous: it is the user model .* and also the file",
         setup=lambda c: _copy_model(c, c.ws / "micro"), issue13=True),
    Case("model-name-found-from-any-folder", _resolve_from_subfolder, "ok", issue13=True,
         check=lambda r, c: r == c.models / "micro.json" or pytest.fail(str(r))),
    Case("info-marks-shadowed-user-model", ["info", "--arch", "h2t_unet", "--preset", "tiny", "--channels", "1",
                                            "--size", "32"], 0, r"h2t-unet-fluo +user .*SHADOWED",
         setup=lambda c: _copy_model(c, c.models / "h2t-unet-fluo"), issue13=True),
    Case("lookup-warns-about-shadowed-user-model", _resolve_shadowed, "ok",
         setup=lambda c: _copy_model(c, c.models / "h2t-unet-fluo"), check=_check_shadowed, issue13=True),
    # ---- model names (fine-tune widget's save-as goes through sanitise_model_name) ----
    Case("name-path-escape", lambda c: _registry().sanitise_model_name("../../escape-name"),
         ValueError, "path separator", issue13=True),
    Case("name-empty", lambda c: _registry().sanitise_model_name("   "), ValueError, "the model name is empty"),
    Case("name-hidden", lambda c: _registry().sanitise_model_name(".hidden"), ValueError, "may not start with '.'"),
    Case("name-control-character", lambda c: _registry().sanitise_model_name("a\x00b"), ValueError, "not allowed"),
    Case("name-shipped", lambda c: _registry().model_save_target("h2t-unet-fluo"), ValueError,
         "is the name of a shipped model", issue13=True),
    Case("finetuner-save-under-shipped-name", lambda c: _tuner(c).save("mpt-small-fluo"), ValueError,
         "is the name of a shipped model", issue13=True),
    # ---- finetune ----
    Case("finetune-out-shipped-name", [*FT, "--out", "h2t-unet-fluo"], 1, "--out: 'h2t-unet-fluo' is the name of a "
         "shipped model", setup=_unlabeled, issue13=True),
    Case("finetune-out-shipped-name-other-case", [*FT, "--out", "H2T-UNet-Fluo"], 1, "is the name of a shipped model",
         setup=_unlabeled, issue13=True),
    Case("finetune-out-exists", [*FT, "--out", "micro"], 1, r"micro\.safetensors already exists", setup=_unlabeled),
    Case("finetune-out-hidden-name", [*FT, "--out", ".hidden"], 1, "may not start with '.'", setup=_unlabeled),
    Case("finetune-out-parent-is-file", [*FT, "--out", "afile/m.safetensors"], 1, "afile is a file, not a folder",
         setup=_setup_all(_unlabeled, _touch("afile"))),
    Case("finetune-lr-negative", [*FT, "--lr", "-1", "--out", "m"], 1,
         r"^mpt-deblur finetune: error: --lr \(learning rate\) must be a number above 0[^\n]*\n$",
         ("pydantic", "http", "Input should"), setup=_unlabeled, issue13=True),
    Case("finetune-steps-0", [*FT, "--steps", "0", "--out", "m"], 1, "--steps must be a whole number",
         setup=_unlabeled),
    Case("finetune-beta-negative", [*FT, "--beta", "-1", "--out", "m"], 1, "--beta must be", setup=_unlabeled),
    Case("finetune-beta-zero", [*FT, "--beta", "0", "--out", "m"], 1, "--beta must be a number above 0",
         ("pydantic", "http"), setup=_unlabeled),
    Case("finetune-patch-larger-than-images", [*FT, "--patch", "1000", "--out", "m"], 1,
         r"--patch 1000 px is larger than the unlabeled images \(520x696\); use a patch of at most 520",
         setup=_unlabeled, issue13=True),
    Case("finetune-missing-unlabeled", [*FT, "--out", "m"], 1, "image folder not found"),
    Case("finetune-empty-unlabeled", [*FT, "--out", "m"], 1, "no images", setup=lambda c: (c.ws / "blurry").mkdir()),
    Case("finetune-unknown-model", ["finetune", "--model", "nope", "--unlabeled", "blurry", "--out", "m",
                                    "--device", "cpu"], 1, "unknown model 'nope'", setup=_unlabeled),
    # ---- train / export ----
    Case("train-missing-config", ["train", "--config", "nope.yaml"], 1, "training config not found"),
    Case("train-config-typo", ["train", "--config", "c.yaml"], 1, "stepz",
         setup=lambda c: (c.ws / "c.yaml").write_text("stepz: 10\n")),
    Case("train-config-not-a-mapping", ["train", "--config", "c.yaml"], 1, "expected a mapping",
         setup=lambda c: (c.ws / "c.yaml").write_text("- a\n- b\n")),
    Case("train-trainable-typo", ["train", "--config", "c.yaml"], 1,
         "model.trainable 'upsamplers' names no parameter of the network", absent=("run",),
         setup=lambda c: (c.ws / "c.yaml").write_text(
             "out_dir: run\nsteps: 1\ndevice: cpu\nmodel: {init: micro, trainable: [upsamplers]}\n"
             "data: [{kind: synthetic, sharp: ., names: [in]}]\npatch: {size: 32}\n")),
    Case("export-without-checkpoints", ["export", "run", "m"], 1, "no 'best' checkpoint",
         setup=lambda c: (c.ws / "run").mkdir()),
    # ---- evaluate / compare ----
    Case("evaluate-missing-pred", ["evaluate", "--pred", "nope.tif"], 1, "does not exist"),
    Case("evaluate-shape-mismatch", ["evaluate", "--pred", "in.tif", "--ref", "small.tif"], 1,
         r"has shape \(64, 64\) but its reference", setup=lambda c: _tif(c.ws / "small.tif", np.zeros((32, 32), "f4"))),
    Case("evaluate-out-exists", ["evaluate", "--pred", "in.tif", "--out", "r.csv"], 1, "already exists",
         setup=_touch("r.csv")),
    Case("compare-different-shapes", ["compare", "--before", "in.tif", "--after", "small.tif"], 1,
         r"must have the same shape to be compared: before \(64, 64\), after \(32, 32\)",
         setup=lambda c: _tif(c.ws / "small.tif", np.zeros((32, 32), "f4")), issue13=True),
    Case("compare-labels-shape", ["compare", "--before", "in.tif", "--after", "in.tif", "--labels", "lab.tif"], 1,
         "ground-truth labels have", setup=lambda c: _tif(c.ws / "lab.tif", np.zeros((32, 32), "u2"))),
    Case("compare-missing-before", ["compare", "--before", "nope.tif", "--after", "in.tif"], 1,
         "image file not found: nope.tif"),
    Case("compare-out-exists", ["compare", "--before", "in.tif", "--after", "in.tif", "--out", "r.csv"], 1,
         "already exists", setup=_touch("r.csv")),
    Case("ap-undefined-without-objects", lambda c: __import__(
        "napari_mpt_deblur.evaluation.matching", fromlist=["x"]).match_labels(np.zeros((32, 32), "u2"),
                                                                              np.zeros((32, 32), "u2")),
         "ok", check=_check_nan_ap, issue13=True),
    Case("ap-undefined-shown-as-such", lambda c: __import__(
        "napari_mpt_deblur.evaluation.compare", fromlist=["x"]).format_table(
            [{"image": "after", "objects": 0, "ap@0.5": float("nan")}], ["image", "objects", "ap@0.5"]),
         "ok", check=_check_undefined_table, issue13=True),
    # ---- library: axes ----
    Case("deblur-plane-refuses-zstack", lambda c: _engine(c).deblur_plane(np.zeros((3, 201, 101), np.float32)),
         ValueError, r"deblur_plane got shape \(3, 201, 101\).*101 channels.*deblur\(data, axes='ZYX'\)",
         issue13=True),
    Case("settings-orientations-2", lambda c: _settings(orientations=2), ValueError, "orientations\n  Input should be 1, 4 or 8"),
    Case("deblur-plane-4d", lambda c: _engine(c).deblur_plane(np.zeros((2, 2, 32, 32), np.float32)), ValueError,
         "deblur_plane takes a 2D"),
    Case("deblur-bool-dtype", lambda c: _engine(c).deblur_plane(np.zeros((32, 32), bool)), ValueError,
         "unsupported image dtype bool"),
    Case("deblur-4d-without-axes", lambda c: _engine(c).deblur(np.zeros((2, 2, 32, 32), np.float32)), ValueError,
         r"cannot guess the axes of a 4-D image.*axes='TZYX'"),
    Case("deblur-1d", lambda c: _engine(c).deblur(np.zeros(32, np.float32)), ValueError, "at least 2 dimensions"),
    # ---- napari samples / scripting ----
    Case("samples-share-units", _all_samples, "ok", check=_check_units, issue13=True),
    Case("script-without-main-guard", _guard_check, RuntimeError, r'if __name__ == "__main__":',
         setup=_unguarded_script, issue13=True),
    Case("script-with-main-guard-is-fine", _guard_check, "ok", setup=_guarded_script,
         check=lambda r, c: r is None or pytest.fail(str(r))),
]


# ---- the runner ----------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the hash of its content (folders as entries too)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


@pytest.fixture(scope="module")
def micro_files(tmp_path_factory) -> Path:
    import torch

    from napari_mpt_deblur.models.config import MPTConfig
    from napari_mpt_deblur.models.registry import build_model, save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("micro") / "micro"
    save_model(build_model(MPTConfig(**MICRO)), path, name="micro", trained=False)
    return path


@pytest.fixture
def ctx(tmp_path, monkeypatch, micro_files) -> Ctx:
    root = tmp_path / "root"
    ws = root / "work"
    models = root / "home" / "models"
    models.mkdir(parents=True)
    ws.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(micro_files.with_name("micro" + suffix), models / ("micro" + suffix))
    _tif(ws / "in.tif", np.random.default_rng(1).random((64, 64), dtype=np.float32))
    monkeypatch.setenv("MPT_DEBLUR_MODELS_DIR", str(models))
    monkeypatch.chdir(ws)
    return Ctx(ws=ws, models=models, monkeypatch=monkeypatch)


def test_the_table_covers_the_issue():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 42
    assert sum(c.issue13 for c in CASES) >= 14


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, ctx: Ctx, capsys):
    from napari_mpt_deblur.cli import main

    if case.setup is not None:
        case.setup(ctx)
    root = ctx.ws.parent  # the working folder, the user model folder and their neighbours
    before = _snapshot(root)
    capsys.readouterr()
    if isinstance(case.run, list):
        try:
            code = main(case.run)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
        captured = capsys.readouterr()
        text = captured.err + captured.out
        assert code == case.expect, f"exit code {code}, expected {case.expect}; output:\n{text}"
        message = captured.err if code else text
    elif case.expect == "ok":
        result = case.run(ctx)
        if case.check is not None:
            case.check(result, ctx)
        message = ""
    else:
        with pytest.raises(case.expect) as info:
            case.run(ctx)
        message = str(info.value)
    if case.message:
        assert re.search(case.message, message, re.S), f"{case.message!r} not found in:\n{message}"
    for fragment in case.absent:
        assert fragment not in message, f"{fragment!r} should not be in:\n{message}"
    ctx.monkeypatch.chdir(ctx.ws)
    after = _snapshot(root)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    # A library row may create the folder it was asked to look from; nothing else may appear.
    added = [a for a in added if a != "work/elsewhere"]
    assert not (added or removed or changed), f"files touched: added {added}, removed {removed}, changed {changed}"


def test_finetune_out_name_is_saved_where_every_folder_finds_it(ctx: Ctx, capsys):
    """The good path of issue 13's first case: ``--out NAME`` goes to the user model folder (not the
    current one), and ``--model NAME`` then means that model wherever the command runs."""
    from napari_mpt_deblur.cli import main
    from napari_mpt_deblur.models.registry import resolve_model_path

    _tif(ctx.ws / "blurry" / "b.tif", np.random.default_rng(2).random((64, 64), dtype=np.float32))
    assert main([*FT, "--out", "my-model"]) == 0, capsys.readouterr().err
    assert not list(ctx.ws.glob("my-model*"))
    assert (ctx.models / "my-model.json").is_file() and (ctx.models / "my-model.safetensors").is_file()
    elsewhere = ctx.ws / "elsewhere"
    elsewhere.mkdir()
    ctx.monkeypatch.chdir(elsewhere)
    assert resolve_model_path("my-model") == ctx.models / "my-model.json"
    # An explicit file path stays a path.
    ctx.monkeypatch.chdir(ctx.ws)
    assert main([*FT, "--out", str(ctx.ws / "here.safetensors")]) == 0
    assert (ctx.ws / "here.json").is_file() and not (ctx.models / "here.json").exists()
