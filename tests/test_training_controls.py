"""Issue 10: memory controls (activation checkpointing, gradient accumulation), time budgets, warm
starts, the first-step EFCR loss, patch-size checks and the memory estimate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_mpt_deblur.cli import main
from napari_mpt_deblur.data.samples import in_focus_bbbc006
from napari_mpt_deblur.losses.efcr import EFCRConfig, EFCRObjective
from napari_mpt_deblur.models.config import MPTConfig, preset_config
from napari_mpt_deblur.models.layers import set_gradient_checkpointing
from napari_mpt_deblur.models.registry import build_model, load_model, save_model
from napari_mpt_deblur.training.config import parse_config
from napari_mpt_deblur.training.memory import measure
from napari_mpt_deblur.training.trainer import CALIBRATION_STEPS, ScalesModule, Trainer, resolve_workers

MICRO_MPT = {"arch": "mpt", "dim": 8, "heads": [1, 2], "scales": [[0.5, 1.0], [1.0, 1.0]], "window_size": 4}
SMALL_DEFOCUS = {"objectives": [{"name": "20x", "na": 0.45, "pixel_um": [0.5, 0.65]}], "max_kernel": 33,
                 "blur_radius_px": [0.5, 6.0]}


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sharp")
    img = in_focus_bbbc006()
    for i, (y, x) in enumerate([(0, 0), (250, 300)]):
        tifffile.imwrite(folder / f"img{i}.tif", img[y : y + 200, x : x + 240])
    return folder


def _config(sharp_dir: Path, out: Path, **over) -> dict:
    cfg = {
        "name": "t", "out_dir": str(out), "steps": 4, "batch_size": 4, "checkpoint_every": 100, "progress": False,
        "model": {"architecture": MICRO_MPT}, "device": "cpu",
        "data": [{"kind": "synthetic", "sharp": str(sharp_dir), "defocus": SMALL_DEFOCUS}],
        "patch": {"size": 32},
    }
    cfg.update(over)
    return cfg


def _grads(net, inp, gt, checkpointing: bool) -> dict[str, torch.Tensor]:
    set_gradient_checkpointing(net, checkpointing)
    net.zero_grad(set_to_none=True)
    EFCRObjective(EFCRConfig(beta=1e-3))(ScalesModule(net), inp, gt, reblur_sizes=[3, 5]).total.backward()
    set_gradient_checkpointing(net, False)
    return {k: p.grad.clone() for k, p in net.named_parameters()}


@pytest.mark.parametrize("config", [MPTConfig(**MICRO_MPT), preset_config("h2t_unet", "tiny")])
def test_activation_checkpointing_gives_the_same_gradients(config):
    torch.manual_seed(0)
    net = build_model(config).train()
    side = max(32, config.size_multiple)
    gt = torch.rand(2, 1, side, side)
    inp = gt + 0.05 * torch.randn_like(gt)
    plain = _grads(net, inp, gt, False)
    recomputed = _grads(net, inp, gt, True)
    for k, g in plain.items():
        # the same arithmetic recomputed: equal to float32 rounding of the summation order
        torch.testing.assert_close(recomputed[k], g, rtol=1e-5, atol=1e-7, msg=k)


def test_gradient_accumulation_gives_the_same_run(sharp_dir, tmp_path):
    whole = Trainer(parse_config(_config(sharp_dir, tmp_path / "whole", steps=2)))
    whole.run()
    split = Trainer(parse_config(_config(sharp_dir, tmp_path / "split", steps=2, grad_accum=2,
                                         checkpointing=True)))
    split.run()
    for k, v in whole.net.state_dict().items():
        # two micro-batches of 2 = one batch of 4: same samples, same update up to float rounding
        torch.testing.assert_close(split.net.state_dict()[k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert split.history[0]["loss"] == pytest.approx(whole.history[0]["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="grad_accum 3 must divide batch_size 4"):
        parse_config(_config(sharp_dir, tmp_path / "x", grad_accum=3))


def test_first_step_loss_has_no_efcr_spike(sharp_dir, tmp_path):
    """With an exactly zero head, L- and L_ext were 0 at step 1 and the logged loss was ~22x the
    real one. Now the contrastive term is a small part of the first loss, and the first step's
    loss is within 2x of the same step of plain L1 training (same samples, same weights)."""
    runs = {}
    for beta in (1e-5, 0.0):
        trainer = Trainer(parse_config(_config(sharp_dir, tmp_path / f"b{beta}", steps=2, efcr={"beta": beta})))
        trainer.run()
        runs[beta] = trainer.history
    first = runs[1e-5][0]
    assert first["loss"] < 2 * runs[0.0][0]["loss"]
    assert first["loss"] - first["pixel"] < 0.05 * first["pixel"]
    assert runs[1e-5][1]["loss"] < 2 * runs[0.0][1]["loss"]


def test_time_budget_stops_in_time_validates_and_exports_the_best(sharp_dir, tmp_path):
    budget_min = 0.25
    cfg = _config(sharp_dir, tmp_path / "budget", steps=100_000, time_budget_minutes=budget_min,
                  validation={"data": {"kind": "paired", "source": {"kind": "zstack", "path": str(tmp_path / "z.tif"),
                                                                    "focus_plane": 0}},
                              "every": 1000, "crop": 64})
    stack = np.stack([in_focus_bbbc006()[:128, :128]] * 2).astype(np.float32)
    stack[1] = stack[1] * 0.5 + 100
    tifffile.imwrite(tmp_path / "z.tif", stack)
    trainer = Trainer(parse_config(cfg))
    t0 = time.perf_counter()
    result = trainer.run()
    elapsed = time.perf_counter() - t0
    # Without the budget the run would take hours (100,000 steps). The margin covers the final
    # validation and export, which come after the budget clock stops, on a loaded CI machine (a 3 s
    # margin measured with the setup included failed once under load); the exact accounting is the
    # budget_used assertion below.
    assert elapsed < budget_min * 60 + 30, elapsed
    if trainer.planned_steps is None:
        # The budget (which counts the setup too) ran out before the schedule was planned: on a
        # loaded machine setup + 4 steps can take 15 s. Then the run ends before the planning step.
        assert result.steps_done < CALIBRATION_STEPS
    else:
        assert result.steps_done <= trainer.planned_steps
    val_steps = [int(r.split(",")[0]) for r in (tmp_path / "budget/val.csv").read_text().splitlines()[1:]]
    assert val_steps[-1] == result.steps_done  # validated at its last step
    exported = load_model(result.model_path)
    best = json.loads((tmp_path / "budget/checkpoints/best.json").read_text())
    assert exported.record.training["exported_from"] == {"checkpoint": "best", "step": best["step"]}
    # The best checkpoint's record names itself as the best (it used to carry the previous best).
    assert exported.record.training["best"]["step"] == best["step"]
    assert exported.record.training["best"]["psnr"] == pytest.approx(best["psnr"])
    assert exported.record.training["time_budget_minutes"] == budget_min
    assert trainer.budget_used <= budget_min * 60


def test_interrupted_time_budget_run_resumes_bit_for_bit(sharp_dir, tmp_path):
    over = {"steps": 7, "time_budget_minutes": 30.0, "batch_size": 2}
    full = Trainer(parse_config(_config(sharp_dir, tmp_path / "full", **over)))
    full.run()
    first = Trainer(parse_config(_config(sharp_dir, tmp_path / "split", **over)))
    for record in first.steps():
        if record.step == 6:  # after the schedule was planned (step 5)
            break
    resumed = Trainer(parse_config(_config(sharp_dir, tmp_path / "split", **over)), resume=True)
    assert resumed.step == 6 and resumed.budget_used > 0 and resumed.planned_steps == 7
    resumed.run()
    assert resumed.step == full.step == full.planned_steps == 7
    for k, v in full.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[k], v), k


def test_warm_start_from_a_model_file(sharp_dir, tmp_path, capsys):
    torch.manual_seed(3)
    start = build_model(MPTConfig(**MICRO_MPT))
    path = save_model(start, tmp_path / "start", name="start")
    cfg = parse_config(_config(sharp_dir, tmp_path / "warm", steps=1, model={"init": str(path)}))
    trainer = Trainer(cfg)
    for k, v in start.state_dict().items():
        assert torch.equal(trainer.net.state_dict()[k], v), k  # weights loaded, nothing else
    assert trainer.optimizer.state_dict()["state"] == {}  # a fresh optimiser
    (tmp_path / "cfg.json").write_text(json.dumps(_config(sharp_dir, tmp_path / "cli", steps=1)))
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--init-from", str(path)]) == 0
    record = load_model(tmp_path / "cli/model").record
    assert record.training["weights_from"]["init"] == str(path)
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "cli2"),
                 "--init-from", "no-such-model"]) == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_trainable_trains_only_the_named_modules(sharp_dir, tmp_path):
    torch.manual_seed(4)
    start = build_model(MPTConfig(**MICRO_MPT))
    path = save_model(start, tmp_path / "start", name="start")
    cfg = parse_config(_config(sharp_dir, tmp_path / "part", steps=2,
                               model={"init": str(path), "trainable": ["ups", "head"]}))
    trainer = Trainer(cfg)
    trainer.run()
    before, after = start.state_dict(), trainer.net.state_dict()
    trained = {k for k in before if k.startswith(("ups.", "head."))}
    assert trained and len(trained) < len(before)
    for k in before:
        assert torch.equal(before[k], after[k]) != (k in trained), k  # the named ones moved, the rest are bit-identical
    assert sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]) == sum(
        start.state_dict()[k].numel() for k in trained)

    typo = parse_config(_config(sharp_dir, tmp_path / "typo", model={"init": str(path), "trainable": ["upsamplers"]}))
    with pytest.raises(ValueError, match="model.trainable 'upsamplers' names no parameter of the network; "
                                         "its top-level modules are .*ups"):
        Trainer(typo)
    assert not (tmp_path / "typo").exists()


def test_patch_must_be_a_multiple_of_the_models_size_multiple(sharp_dir, tmp_path):
    cfg = _config(sharp_dir, tmp_path / "p", model={"arch": "h2t_unet", "preset": "paper"}, patch={"size": 96})
    with pytest.raises(ValueError, match="patch.size 96 is not a multiple of 64, the size multiple of h2t_unet/paper; "
                                         "use 64 or 128"):
        Trainer(parse_config(cfg))
    assert not (tmp_path / "p").exists()


def test_memory_estimate_is_measured_and_checkpointing_lowers_it(tmp_path, capsys):
    net = build_model(MPTConfig(**MICRO_MPT))
    plain = measure(net, 32)
    ckpt = measure(net, 32, checkpointing=True)
    assert plain.kept_per_sample > 0 and ckpt.kept_per_sample < plain.kept_per_sample / 2
    assert ckpt.recompute_per_sample > 0 and ckpt.peak_per_sample < plain.peak_per_sample
    # four times the pixels, about four times the activations
    assert 3.0 < measure(net, 64).kept_per_sample / plain.kept_per_sample < 5.0
    # counting on the meta device (shapes only) gives the same bytes as on the CPU for the reference
    # attention path it counts, and an upper bound for the fused (SDPA) path
    from napari_mpt_deblur.models.mpt import attention_backend

    meta = measure(net, 32, device="meta")
    with attention_backend("reference"):
        assert meta.kept_per_sample == measure(net, 32).kept_per_sample
        assert (measure(net, 32, checkpointing=True, device="meta").peak_per_sample
                == measure(net, 32, checkpointing=True).peak_per_sample)
    assert plain.kept_per_sample <= meta.kept_per_sample
    (tmp_path / "cfg.json").write_text(json.dumps(_config(tmp_path, tmp_path / "m")))
    (tmp_path / "img.tif").write_bytes(b"")
    tifffile.imwrite(tmp_path / "img.tif", in_focus_bbbc006()[:64, :64])
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--estimate-memory"]) == 0
    out = capsys.readouterr().out
    assert "kept MiB/sample" in out and out.count("mpt/custom") == 2
    assert not (tmp_path / "m").exists()  # nothing trained, nothing written


def test_data_workers_default_by_device():
    assert resolve_workers("auto", torch.device("cpu")) == 0
    assert resolve_workers(3, torch.device("cpu")) == 3
