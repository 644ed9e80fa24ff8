"""EFCRex fine-tuning API and the train / finetune subcommands (issue 3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from napari_mpt_deblur.cli import main
from napari_mpt_deblur.data.psf import PSFParams
from napari_mpt_deblur.data.samples import defocused_bbbc006, in_focus_bbbc006
from napari_mpt_deblur.data.synthesis import synthesize_defocus
from napari_mpt_deblur.losses.efcr import WARM_START_NYQUIST_WEIGHT
from napari_mpt_deblur.models.registry import load_model
from napari_mpt_deblur.training.finetune import FineTuner, finetune

#: The same tiny MPT as conftest.MICRO_MPT (the micro_model_path fixture), as a config.
MICRO = {"preset": "micro", "dim": 8, "heads": (1, 2), "scales": ((0.5, 1.0), (1.0, 1.0)), "window_size": 4}




def test_finetune_uses_unlabeled_images_and_leaves_the_original_alone(micro_model_path):
    loaded = load_model(micro_model_path)
    # Near the identity, as a trained restorer is: its L_ext' stays below the cap of 1, where the
    # unlabeled images act (the random micro net changes the reblurred images' high band by more
    # than the reblur did, and a capped L_ext' has no gradient).
    with torch.no_grad():
        loaded.model.head.weight.mul_(1e-3)
    original = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    blurry = defocused_bbbc006()[:200, :200]
    sharp = [in_focus_bbbc006()[:200, :240]]
    records = []
    result = finetune(loaded, [blurry], sharp, steps=3, batch=2, patch=32, device="cpu",
                      callback=records.append)
    assert result.steps_done == 3 and not result.stopped and not result.model.training
    assert all("l_ext" in r.losses and np.isfinite(r.losses["l_ext"]) for r in records)
    # The fine-tune's guard against a pattern locked to the pixel grid (issue 13) is on and logged.
    assert all(r.losses["nyquist"] > 0 for r in records)
    assert any(not torch.equal(v, original[k]) for k, v in result.model.state_dict().items())
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, original[k])
    # Other unlabeled images give other weights (same seed, same labeled batches).
    other = finetune(loaded, [defocused_bbbc006()[300:500, 400:600]], sharp, steps=3, batch=2, patch=32, device="cpu")
    diff = max(float((other.model.state_dict()[k] - v).abs().max()) for k, v in result.model.state_dict().items())
    assert diff > 0


def test_finetuner_stops_cleanly_and_saves_with_provenance(micro_model_path, tmp_path):
    tuner = FineTuner(micro_model_path, [defocused_bbbc006()[:128, :128]], [in_focus_bbbc006()[:128, :128]],
                      steps=100, batch=1, patch=32, device="cpu")
    flag = {"stop": False}
    result = tuner.run(callback=lambda r: flag.update(stop=r.step >= 2), should_stop=lambda: flag["stop"])
    assert result.steps_done == 2 and result.stopped
    path = tuner.save(tmp_path / "tuned")
    rec = load_model(path).record
    assert rec.training["finetuned_from"] == "micro" and rec.training["steps"] == 2
    assert rec.training["unlabeled_images"] == [[128, 128]]
    efcr = tuner.config.efcr
    assert efcr.nyquist_weight == WARM_START_NYQUIST_WEIGHT > 0 and efcr.below_nyquist and efcr.extended_cap == 1.0
    with pytest.raises(FileExistsError):
        tuner.save(tmp_path / "tuned")


def test_cli_train_and_finetune(tmp_path, micro_model_path, capsys):
    sharp = tmp_path / "sharp"
    sharp.mkdir()
    img = in_focus_bbbc006()
    tifffile.imwrite(sharp / "a.tif", img[:160, :200])
    tifffile.imwrite(sharp / "b.tif", img[300:460, 400:600])
    cfg = {
        "name": "cli", "out_dir": "run", "steps": 2, "batch_size": 1, "progress": False,
        "model": {"architecture": {"arch": "mpt", **{k: v for k, v in MICRO.items() if k != "preset"}}},
        "data": [{"kind": "synthetic", "sharp": "sharp", "defocus": {"max_kernel": 33}}],
        "patch": {"size": 32},
        "validation": {"data": {"kind": "synthetic", "sharp": "sharp", "max_images": 1, "defocus_um": [6.0]},
                       "every": 2, "crop": 64},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp_path / "cfg.json")]) == 0
    out = capsys.readouterr().out
    assert "finished after 2 steps" in out and "best validation PSNR" in out
    assert load_model(tmp_path / "run/model").record.training["steps"] == 2
    # Existing run without --resume: a clear error, exit 1; --resume with more steps continues.
    assert main(["train", "--config", str(tmp_path / "cfg.json")]) == 1
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--resume", "--steps", "3"]) == 0
    assert load_model(tmp_path / "run/model").record.training["steps"] == 3
    # A bad field is named.
    cfg["batch_size"] = 0
    (tmp_path / "bad.json").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp_path / "bad.json")]) == 1
    assert "batch_size" in capsys.readouterr().err

    unl = tmp_path / "unlabeled"
    unl.mkdir()
    blurred = synthesize_defocus(img[:128, :128] / img.max(), PSFParams(defocus_um=8.0, size=33), rng=0)
    tifffile.imwrite(unl / "u.tif", blurred)
    args = ["finetune", "--model", str(micro_model_path), "--unlabeled", str(unl), "--sharp", str(sharp),
            "--steps", "2", "--batch", "1", "--patch", "32", "--out", str(tmp_path / "ft"), "--device", "cpu"]
    assert main(args) == 0
    assert load_model(tmp_path / "ft").record.training["method"] == "EFCRex (unlabeled)"
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err
    (unl / "broken.tif").write_bytes(b"not an image")
    args[-3] = str(tmp_path / "ft2")
    assert main(args) == 1
    assert "broken.tif" in capsys.readouterr().err


def test_finetune_with_real_paired_examples(micro_model_path):
    sharp = in_focus_bbbc006()[:96, :96]
    blurred = synthesize_defocus(sharp / sharp.max(), PSFParams(defocus_um=6.0, size=33), rng=1) * sharp.max()
    tuner = FineTuner(micro_model_path, [defocused_bbbc006()[:96, :96]], paired=[(blurred, sharp)],
                      steps=2, batch=1, patch=32, device="cpu")
    assert "given (blurred, sharp) pairs" in tuner.config.data[0].description
    assert tuner.run().steps_done == 2
    with pytest.raises(ValueError, match="differ in shape"):
        FineTuner(micro_model_path, [blurred], paired=[(blurred, sharp[:50])], steps=1, device="cpu")
    with pytest.raises(ValueError, match="not both"):
        FineTuner(micro_model_path, [blurred], [sharp], paired=[(blurred, sharp)], steps=1, device="cpu")
