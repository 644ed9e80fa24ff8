"""Trainer (issue 3): exact resume, checkpoints without pickle, config errors, stop, DDP, datasets."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_mpt_deblur.data import datasets as D
from napari_mpt_deblur.data.psf import PSFParams
from napari_mpt_deblur.data.samples import in_focus_bbbc006
from napari_mpt_deblur.data.synthesis import DefocusRange, synthesize_defocus
from napari_mpt_deblur.models.registry import load_model
from napari_mpt_deblur.training.checkpoint import CheckpointError, export_checkpoint
from napari_mpt_deblur.training.config import ConfigError, load_config, parse_config
from napari_mpt_deblur.training.trainer import Trainer, lr_at, train

MICRO_MPT = {"arch": "mpt", "dim": 8, "heads": [1, 2], "scales": [[0.5, 1.0], [1.0, 1.0]], "window_size": 4}




@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory) -> Path:
    """Four real sharp crops (bundled in-focus BBBC006, uint16) as TIFF files."""
    folder = tmp_path_factory.mktemp("sharp")
    img = in_focus_bbbc006()
    for i, (y, x) in enumerate([(0, 0), (0, 300), (250, 0), (250, 300)]):
        tifffile.imwrite(folder / f"img{i}.tif", img[y : y + 200, x : x + 240])
    return folder


def _config(sharp_dir: Path, out: Path, **over) -> dict:
    cfg = {
        "name": "t", "out_dir": str(out), "steps": 6, "batch_size": 2, "checkpoint_every": 100, "progress": False,
        "model": {"architecture": MICRO_MPT},
        "data": [{"kind": "synthetic", "sharp": str(sharp_dir), "defocus": {"max_kernel": 33}}],
        "patch": {"size": 32},
    }
    cfg.update(over)
    return cfg


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.net.state_dict().items()}


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(sharp_dir, tmp_path):
    full = Trainer(parse_config(_config(sharp_dir, tmp_path / "full")))
    full.run()
    reference = _state(full)
    ref_opt = full.optimizer.state_dict()["state"]

    first = Trainer(parse_config(_config(sharp_dir, tmp_path / "split")))
    for record in first.steps():
        if record.step == 3:
            first.stop()
    assert first.step == 3
    assert json.loads((tmp_path / "split/checkpoints/last.json").read_text())["step"] == 3
    # The checkpoint holds no pickle: every tensor file is safetensors.
    folder = tmp_path / "split/checkpoints/step_00000003"
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors", "optimizer.safetensors", "state.json"]

    second = Trainer(parse_config(_config(sharp_dir, tmp_path / "split")), resume=True)
    assert second.step == 3
    second.run()
    resumed = _state(second)
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k
    for pid, st in ref_opt.items():
        for key, value in st.items():
            assert torch.equal(second.optimizer.state_dict()["state"][pid][key], value)
    # Losses logged per step are identical, and the log has each step once.
    a = (tmp_path / "full/log.csv").read_text().splitlines()
    b = (tmp_path / "split/log.csv").read_text().splitlines()
    assert len(a) == 7 and [r.split(",")[:3] for r in a] == [r.split(",")[:3] for r in b]
    # The final model goes through the registry with provenance and loads back.
    loaded = load_model(tmp_path / "split/model")
    assert loaded.record.training["steps"] == 6 and loaded.record.trained
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, reference[k])


def test_weight_average_is_validated_saved_and_resumed_exactly(sharp_dir, tmp_path):
    """optim.ema_decay: the average follows min(decay, (1+n)/(10+n)) from the start weights; the
    model file, the exported model and the validation are the average; the trained weights travel
    beside it (raw.*), so a resumed run matches the uninterrupted one bit for bit, average included."""
    from safetensors.torch import load_file

    from napari_mpt_deblur.training.ema import WeightAverage, ema_decay_at

    # The update rule on a one-parameter network, by hand.
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    avg = WeightAverage(lin, 0.9)
    expected = 0.0
    for n, w in enumerate([1.0, 2.0, 3.0]):
        with torch.no_grad():
            lin.weight.fill_(w)
        avg.update(lin)
        d = ema_decay_at(0.9, n)
        expected = d * expected + (1 - d) * w
        assert float(avg.model.weight) == pytest.approx(expected, rel=1e-6)
    assert ema_decay_at(0.9, 0) == pytest.approx(0.1) and ema_decay_at(0.9, 1000) == 0.9
    assert not avg.model.weight.requires_grad
    with pytest.raises(ValueError, match=r"ema decay must lie in \(0, 1\)"):
        WeightAverage(lin, 1.0)

    val = {"kind": "synthetic", "sharp": str(sharp_dir), "defocus_um": [3.0], "max_images": 2}
    over = dict(optim={"ema_decay": 0.9}, validation={"data": val, "every": 3, "crop": 64})
    full = Trainer(parse_config(_config(sharp_dir, tmp_path / "full", **over)))
    start = _state(full)
    full.run()
    raw, average = _state(full), {k: v.detach().clone() for k, v in full.ema.model.state_dict().items()}
    assert full.ema.updates == 6
    moved = [k for k in raw if not torch.equal(raw[k], start[k])]
    assert moved and any(not torch.equal(average[k], raw[k]) for k in moved)  # the average lags the weights
    # The final model and the last checkpoint's model file are the average; raw.* the weights.
    final = load_model(tmp_path / "full/model")
    for k, v in final.model.state_dict().items():
        assert torch.equal(v, average[k]), k
    saved = load_file(tmp_path / "full/checkpoints/step_00000006/optimizer.safetensors")
    for k, v in raw.items():
        assert torch.equal(saved["raw." + k], v), k
    # The validation scored the average.
    from napari_mpt_deblur.training.network import evaluate_pairs

    again = evaluate_pairs(full.ema.model, full.val_pairs, full.device, full.amp, full.config.patch.normalisation)
    assert full.last_validation["psnr"] == pytest.approx(again["psnr"], abs=1e-9)

    first = Trainer(parse_config(_config(sharp_dir, tmp_path / "split", **over)))
    for record in first.steps():
        if record.step == 4:
            first.stop()
    second = Trainer(parse_config(_config(sharp_dir, tmp_path / "split", **over)), resume=True)
    assert second.step == 4 and second.ema.updates == 4
    second.run()
    for k in raw:
        assert torch.equal(_state(second)[k], raw[k]), k
        assert torch.equal(second.ema.model.state_dict()[k], average[k]), k


def test_refuses_to_overwrite_a_run_and_detects_corrupt_checkpoints(sharp_dir, tmp_path):
    cfg = parse_config(_config(sharp_dir, tmp_path / "run", steps=2))
    Trainer(cfg).run()
    with pytest.raises(CheckpointError, match="already holds a training run"):
        Trainer(cfg)
    opt = tmp_path / "run/checkpoints/step_00000002/optimizer.safetensors"
    data = bytearray(opt.read_bytes())
    data[-1] ^= 0xFF
    opt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors: checksum"):
        Trainer(cfg, resume=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(parse_config(_config(sharp_dir, tmp_path / "empty")), resume=True)
    changed = parse_config(_config(sharp_dir, tmp_path / "run", steps=2, batch_size=3))
    opt.write_bytes(bytes(data[:-1] + bytes([data[-1] ^ 0xFF])))
    with pytest.raises(CheckpointError, match="batch_size"):
        Trainer(changed, resume=True)


def test_resume_reads_a_checkpoint_written_before_new_loss_settings_existed(sharp_dir, tmp_path):
    """A checkpoint whose saved ``efcr`` lacks fields added later (here ``nyquist_weight``,
    ``below_nyquist``, ``extended_cap``) resumes when they are at their defaults, and one that saved
    ``model.in_channels: 1`` (today's default is None, unset) resumes a grey network; a real change
    of the objective is still refused."""
    cfg = parse_config(_config(sharp_dir, tmp_path / "run", steps=4))
    first = Trainer(cfg)
    for record in first.steps():
        if record.step == 2:
            first.stop()
    state_path = tmp_path / "run/checkpoints/step_00000002/state.json"
    state = json.loads(state_path.read_text())
    for key in ("nyquist_weight", "below_nyquist", "extended_cap"):
        del state["config"]["efcr"][key]
    state["config"]["model"]["in_channels"] = 1  # saved before in_channels could be None (unset)
    state_path.write_text(json.dumps(state))
    changed = parse_config(_config(sharp_dir, tmp_path / "run", steps=4, efcr={"nyquist_weight": 1.0}))
    with pytest.raises(CheckpointError, match="different 'efcr' setting"):
        Trainer(changed, resume=True)
    second = Trainer(cfg, resume=True)
    assert second.step == 2
    second.run()
    assert second.step == 4
    header = (tmp_path / "run/log.csv").read_text().splitlines()[0].split(",")
    assert "nyquist" in header and len((tmp_path / "run/log.csv").read_text().splitlines()) == 5


def test_stop_keeps_weights_and_generator_reports_losses(sharp_dir, tmp_path):
    cfg = _config(sharp_dir, tmp_path / "run", steps=50)
    cfg["validation"] = {"data": {"kind": "synthetic", "sharp": str(sharp_dir), "max_images": 2, "defocus_um": [6.0, 2.0]},
                         "every": 2, "crop": 64}
    trainer = Trainer(parse_config(cfg))
    initial = _state(trainer)
    seen = []
    result = trainer.run(callback=lambda r: seen.append(r) or (r.step < 2))
    assert result.steps_done == 2 and not result.completed
    assert [r.step for r in seen] == [1, 2]
    assert {"loss", "pixel", "cr", "l_pos", "l_neg", "l_ext"} <= set(seen[0].losses)
    assert seen[1].validation is not None and seen[1].validation["input_psnr"] > 20
    assert any(not torch.equal(v, initial[k]) for k, v in _state(trainer).items())
    loaded = load_model(result.model_path)
    assert loaded.record.training["steps"] == 2 and loaded.record.training["total_steps"] == 50
    best = json.loads((tmp_path / "run/checkpoints/best.json").read_text())
    assert best["step"] == 2 and "psnr" in best
    # The validation split by defocus, in the order given: each row averages its two images, and
    # the two rows average to the overall figure of val.csv (equal group sizes).
    val = seen[1].validation
    rows = list(csv.DictReader((tmp_path / "run/val_by_defocus.csv").open()))
    assert [(r["step"], float(r["defocus_um"]), r["pairs"]) for r in rows] == [("2", 6.0, "2"), ("2", 2.0, "2")]
    assert float(rows[0]["psnr"]) == pytest.approx(np.mean(val["psnr_pairs"][0::2]))
    assert float(rows[1]["input_psnr"]) == pytest.approx(np.mean(val["input_psnr_pairs"][1::2]))
    assert float(rows[1]["input_psnr"]) > float(rows[0]["input_psnr"])  # 2 um blurs less than 6 um
    assert np.mean([float(r["psnr"]) for r in rows]) == pytest.approx(val["psnr"])


def test_export_writes_the_checkpoint_as_a_model_with_provenance(sharp_dir, tmp_path):
    from napari_mpt_deblur.cli import main

    trainer = Trainer(parse_config(_config(sharp_dir, tmp_path / "run", steps=3)))
    trainer.run()
    x = torch.rand(1, 1, 40, 44)
    with torch.no_grad():
        expected = trainer.net.eval()(x)

    path = export_checkpoint(tmp_path / "run", tmp_path / "m32", which="last", name="my-model")
    loaded = load_model(path)
    assert loaded.record.name == "my-model" and loaded.record.trained
    assert loaded.record.training["exported_from"] == {"checkpoint": "last", "step": 3}
    assert loaded.record.training["steps"] == 3 and loaded.record.training["config"]["name"] == "t"
    with torch.no_grad():
        assert torch.equal(loaded.model(x), expected)

    # fp16 storage through the CLI: half the bytes, outputs within fp16 rounding of the weights
    assert main(["export", str(tmp_path / "run" / "checkpoints"), str(tmp_path / "m16"), "--which", "last",
                 "--dtype", "float16"]) == 0
    half = load_model(tmp_path / "m16.json")
    assert half.record.weights_dtype == "float16"
    size16, size32 = (tmp_path / "m16.safetensors").stat().st_size, (tmp_path / "m32.safetensors").stat().st_size
    assert size16 < 0.6 * size32
    with torch.no_grad():
        assert torch.allclose(half.model(x), expected, atol=2e-3)

    before = (tmp_path / "m32.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        export_checkpoint(tmp_path / "run", tmp_path / "m32", which="last")
    assert (tmp_path / "m32.safetensors").read_bytes() == before
    with pytest.raises(CheckpointError, match="no 'best' checkpoint"):
        export_checkpoint(tmp_path / "run", tmp_path / "other")  # no validation ran, so no best
    assert main(["export", str(tmp_path / "nothing-here"), str(tmp_path / "x")]) == 1


def test_h2t_unet_with_unlabeled_efcrex_trains(sharp_dir, tmp_path):
    unl = tmp_path / "unlabeled"
    unl.mkdir()
    for i, name in enumerate(sorted(os.listdir(sharp_dir))[:2]):
        img = tifffile.imread(sharp_dir / name).astype(np.float32)
        blurred = synthesize_defocus(img / img.max(), PSFParams(defocus_um=6.0, size=33), rng=i)
        tifffile.imwrite(unl / f"u{i}.tif", blurred)
    cfg = _config(sharp_dir, tmp_path / "run", steps=2, model={"arch": "h2t_unet", "preset": "tiny"},
                  unlabeled=[{"folder": str(unl)}], efcr={"beta": 0.1})
    trainer = Trainer(parse_config(cfg))
    assert trainer.scales.multiscale
    result = trainer.run()
    assert result.completed and np.isfinite(result.history[-1]["l_ext"])


def test_lr_schedule_is_cosine_from_lr_to_lr_min(sharp_dir, tmp_path):
    cfg = parse_config(_config(sharp_dir, tmp_path, steps=101))
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(50, cfg) == pytest.approx((1e-4 + 1e-6) / 2)
    assert lr_at(100, cfg) == pytest.approx(1e-6)
    warm = parse_config(_config(sharp_dir, tmp_path, steps=101, optim={"warmup_steps": 10}))
    assert lr_at(0, warm) == pytest.approx(1e-5) and lr_at(9, warm) == pytest.approx(1e-4)


def test_bad_configs_name_the_field_and_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  - kind: synthetic\n    sharp: imgs\nbath_size: 4\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml[\s\S]*bath_size"):
        load_config(path)
    path.write_text("data:\n  - kind: synthetic\n    sharp: imgs\nefcr:\n  beta: -1\n")
    with pytest.raises(ConfigError, match=r"efcr\.beta"):
        load_config(path)
    path.write_text("data:\n  - kind: telepathy\n    sharp: imgs\n")
    with pytest.raises(ConfigError, match=r"data\.0"):
        load_config(path)
    path.write_text("steps: [\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("data:\n  - kind: synthetic\n    sharp: imgs\nmodel:\n  preset: huge\n")
    with pytest.raises(ConfigError, match=r"model\.preset"):
        load_config(path)
    # Relative paths are taken from the config file's folder.
    path.write_text("data:\n  - kind: synthetic\n    sharp: imgs\n")
    assert load_config(path).data[0].sharp == (tmp_path / "imgs").resolve()


def test_unreadable_images_fail_naming_the_file(sharp_dir, tmp_path):
    bad = tmp_path / "sharp"
    bad.mkdir()
    tifffile.imwrite(bad / "good.tif", np.zeros((64, 64), np.uint8))
    (bad / "broken.tif").write_bytes(b"II*\x00 this is not a tiff")
    with pytest.raises(D.ImageReadError, match="broken.tif"):
        Trainer(parse_config(_config(bad, tmp_path / "run")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.ImageReadError, match="no images .* in .*empty"):
        D.list_images(tmp_path / "empty")
    with pytest.raises(D.ImageReadError, match="image folder not found: .*nowhere"):
        D.list_images(tmp_path / "nowhere")
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((3, 32, 32), np.uint16))
    with pytest.raises(D.ImageReadError, match="stack.tif.*z-stack"):
        D.read_image_2d(stack)


# ---------------------------------------------------------------------------------------------
# Datasets


def test_bit_depths_give_the_same_patches(tmp_path):
    rng = np.random.default_rng(0)
    base = (rng.random((80, 90)) * 200).astype(np.uint8)
    patch = D.PatchConfig(size=32)
    out = []
    for arr in (base, base.astype(np.uint16) * 257, base.astype(np.float32) / 255):
        pairs = [D.Pair(*D.reference_units(arr, arr)[::-1], name="x")]
        out.append(D.PairedPatches(pairs, patch, seed=1)[5])
    for o in out[1:]:
        assert torch.allclose(o["inp"], out[0]["inp"], atol=1e-4)
    assert out[0]["inp"].shape == (1, 32, 32) and out[0]["inp"].dtype == torch.float32


def test_paired_plane_and_zstack_sources(tmp_path):
    img = in_focus_bbbc006()[:128, :160]
    gt01 = D.reference_units(img)[0]
    root = tmp_path / "bbbc"
    for z in (0, 8, 16):
        (root / f"BBBC006_v1_images_z_{z:02d}").mkdir(parents=True)
        dz = abs(z - 16) * 1.0
        blurred = synthesize_defocus(gt01, PSFParams(defocus_um=dz, size=33), peak_photons=None) if dz else gt01
        tifffile.imwrite(root / f"BBBC006_v1_images_z_{z:02d}" / "a01_s1_w1.tif", (blurred * 3000 + 100).astype(np.uint16))
    pairs = D.load_plane_pairs(root, in_focus=16)
    assert [p.name for p in pairs] == ["z00/a01_s1_w1", "z08/a01_s1_w1"]
    assert np.percentile(pairs[0].gt, 99.9) == pytest.approx(1.0, abs=1e-3)
    ds = D.PairedPatches(pairs, D.PatchConfig(size=48), seed=0)
    a, b = ds[7], ds[7]
    assert torch.equal(a["inp"], b["inp"]) and a["gt"].shape == (1, 48, 48)
    with pytest.raises(D.ImageReadError, match="z_05"):
        D.load_plane_pairs(root, in_focus=5)
    # Paired folders match by name and complain when nothing matches.
    fp = D.load_folder_pairs(root / "BBBC006_v1_images_z_00", root / "BBBC006_v1_images_z_16")
    assert len(fp) == 1 and fp[0].name == "a01_s1_w1"
    other = tmp_path / "other"
    other.mkdir()
    tifffile.imwrite(other / "zzz.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(D.ImageReadError, match="no matching names"):
        D.load_folder_pairs(other, root / "BBBC006_v1_images_z_16")
    # A z-stack: the focus measure finds the in-focus plane among noisy defocused ones.
    planes = [synthesize_defocus(gt01, PSFParams(defocus_um=abs(z - 4) * 2.0, size=65), rng=z) for z in range(9)]
    stack_path = tmp_path / "stack.tif"
    tifffile.imwrite(stack_path, (np.stack(planes) * 1000).astype(np.float32))
    zpairs, best = D.load_zstack_pairs(stack_path)
    assert best == 4 and len(zpairs) == 8
    assert len(D.load_zstack_pairs(stack_path, max_distance=2)[0]) == 4


def test_synthetic_patches_are_deterministic_blurred_and_normalised():
    img = in_focus_bbbc006()
    ds = D.SyntheticPatches([img], D.PatchConfig(size=64), DefocusRange(peak_photons=None), seed=3)
    a, b, c = ds.pair(0), ds.pair(0), ds.pair(1)
    assert torch.equal(a["inp"], b["inp"]) and not torch.equal(a["inp"], c["inp"])
    # Normalised by the whole (context) image's percentiles, as inference does, not the patch's:
    # background patches stay dark instead of being stretched to [0, 1].
    maxima = [float(ds.pair(i)["inp"].max()) for i in range(12)]
    assert min(maxima) < 0.5 < max(maxima)
    # Same image as uint16 and as float in [0, 1]: the same sample.
    as_float = D.SyntheticPatches([img.astype(np.float32) / 65535], D.PatchConfig(size=64),
                                  DefocusRange(peak_photons=None), seed=3)
    assert torch.allclose(as_float.pair(0)["inp"], a["inp"], atol=1e-4)
    # Blur: the input has less high-frequency energy than the target on average.
    hf = lambda t: float(np.abs(np.diff(t.numpy(), axis=-1)).mean())
    assert np.mean([hf(ds.pair(i)["inp"]) < hf(ds.pair(i)["gt"]) for i in range(8)]) >= 0.75
    un = D.UnlabeledPatches([img], D.PatchConfig(size=40), seed=0)
    assert un[2]["inp"].shape == (1, 40, 40) and set(un[2]) == {"inp"}


# ---------------------------------------------------------------------------------------------
# DistributedDataParallel on CPU (gloo): 2 processes x batch 1 == 1 process x batch 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(parse_config(cfg))


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_whole_batch(sharp_dir, tmp_path):
    import torch.multiprocessing as mp

    ddp_cfg = _config(sharp_dir, tmp_path / "ddp", steps=3, batch_size=1, device="cpu")
    mp.spawn(_ddp_worker, args=(2, _free_port(), ddp_cfg), nprocs=2, join=True)
    single = Trainer(parse_config(_config(sharp_dir, tmp_path / "single", steps=3, batch_size=2, device="cpu")))
    single.run()
    ddp_model = load_model(tmp_path / "ddp/model")
    assert ddp_model.record.training["world_size"] == 2
    for k, v in single.net.state_dict().items():
        torch.testing.assert_close(ddp_model.model.state_dict()[k], v, rtol=1e-4, atol=1e-6)


def test_worker_processes_give_the_same_run_and_bf16_autocast_runs(sharp_dir, tmp_path):
    a = Trainer(parse_config(_config(sharp_dir, tmp_path / "a", steps=3)))
    a.run()
    b = Trainer(parse_config(_config(sharp_dir, tmp_path / "b", steps=3, num_workers=1)))
    b.run()
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, b.net.state_dict()[k]), k
    bf = Trainer(parse_config(_config(sharp_dir, tmp_path / "c", steps=1, precision="bf16")))
    assert bf.amp == torch.bfloat16
    result = bf.run()
    assert np.isfinite(result.history[0]["loss"])
    assert load_model(tmp_path / "c/model").record.training["precision"] == "bfloat16"


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "examples").rglob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_example_config_loads_and_names_existing_data(path):
    """The configs the docs point at (shipped recipes, experiments, GPU runs) parse, and every
    folder or file they read exists beside the repository (../shared)."""
    cfg = load_config(path)
    sources = [*cfg.data, *(cfg.unlabeled or []), *(cfg.extra_pairs or [])]
    if cfg.validation is not None:
        sources.append(cfg.validation.data)
    for src in sources:
        for field in ("sharp", "folder", "blurred", "root", "path", "labels"):
            value = getattr(src, field, None)
            if value is not None:
                assert Path(value).exists(), f"{path.name}: {field} {value} does not exist"
