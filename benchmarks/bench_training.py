"""Training throughput (patches per second) of every architecture preset, with and without EFCR's
extended pass, on the CPU and on a GPU when one is available.

One optimisation step = the trainer's own step (`Trainer._train_step`: EFCR objective, backward,
gradient clipping, AdamW) on a fixed batch of random patches, so the numbers measure the model
and the loss, not the data pipeline (the data pipeline is timed separately: synthetic defocus
pairs per second, one process). Median of N timed steps after warm-up steps.

Modes:
  l1        beta = 0: plain L1 (or the H2T multi-scale L1), one forward of B patches
  efcr      beta > 0, extended CR with gradient (default): one forward of 2B patches
  efcr-nograd  extended pass under no_grad: forward of B with grad + forward of B without

    python benchmarks/bench_training.py                          # tiny + small, CPU (+ GPU if any)
    python benchmarks/bench_training.py --presets tiny --patch 64 --batch 4 --steps 3
    python benchmarks/bench_training.py --device cuda --presets tiny,small,paper --patch 256 --batch 8
    python benchmarks/bench_training.py --data                   # data pipeline before/after, data share
    python benchmarks/bench_training.py --data --device cuda     # the same on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def _trainer(arch: str, preset: str, mode: str, patch: int, batch: int, device: str, precision: str):
    from napari_mpt_deblur.training.config import ArraysSource, TrainConfig
    from napari_mpt_deblur.training.trainer import Trainer

    efcr = {"l1": {"beta": 0.0}, "efcr": {"beta": 1e-5}, "efcr-nograd": {"beta": 1e-5, "extended_grad": False}}[mode]
    cfg = TrainConfig.model_validate({
        "data": [ArraysSource(description="random patches")], "model": {"arch": arch, "preset": preset},
        "batch_size": batch, "steps": 10**6, "efcr": efcr, "patch": {"size": patch}, "device": device,
        "precision": precision, "progress": False,
    })
    return Trainer(cfg, train_data=[None], val_pairs=[], write_files=False)


def time_steps(arch: str, preset: str, mode: str, patch: int, batch: int, device: str, precision: str,
               warmup: int, steps: int) -> dict:
    trainer = _trainer(arch, preset, mode, patch, batch, device, precision)
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(batch, 1, patch, patch, generator=g)
    pairs = {"inp": (gt + 0.05 * torch.randn(batch, 1, patch, patch, generator=g)).clamp(0, 1), "gt": gt}
    batch_data = {"size": batch, "ready": {"pos": torch.arange(batch), **pairs}, "synth": {}}
    idx = list(range(batch))
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        trainer._train_step(idx, batch_data, None)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    params = sum(p.numel() for p in trainer.net.parameters())
    peak = torch.cuda.max_memory_allocated() / 2**30 if trainer.device.type == "cuda" else None
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return {"arch": arch, "preset": preset, "mode": mode, "device": str(trainer.device), "patch": patch,
            "batch": batch, "params": params, "s_per_step": med, "patches_per_s": batch / med,
            "precision": str(trainer.amp).replace("torch.", "") if trainer.amp else "fp32", "gpu_peak_gib": peak}


def _dataset(patch: int):
    from napari_mpt_deblur.data.datasets import PatchConfig, SyntheticPatches
    from napari_mpt_deblur.data.samples import in_focus_bbbc006

    return SyntheticPatches([in_focus_bbbc006()], PatchConfig(size=patch), seed=0)


def time_data(patch: int, n: int) -> float:
    """Synthetic defocus pairs per second, today's device pipeline (one process)."""
    return time_pipelines(patch, n, "cpu", batch=8)["after"]


def time_pipelines(patch: int, n: int, device: str, batch: int = 8) -> dict:
    """Pairs per second of the previous all-numpy pipeline ("before": a fresh psfmodels PSF,
    skimage resize, scipy FFT blur and numpy noise per sample) and of the batched device pipeline
    ("after": worker-side crops + ``materialise`` on ``device``), one process, alternating
    batches so both see the same machine load. The PSF nodes the timed samples draw are filled
    first (the steady state of a run, or of any run after the first: the bank is cached on disk)."""
    import torch

    from napari_mpt_deblur.data.datasets import collate, materialise
    from napari_mpt_deblur.data.psf_bank import PSFBank

    ds = _dataset(patch)
    dev = torch.device(device)
    bank = PSFBank.by_key(ds.bank_key)
    rounds = max(1, n // batch)
    indices = [list(range(1000 + r * batch, 1000 + (r + 1) * batch)) for r in range(rounds)]
    bank.ensure([int(ds[i]["levels"][j]) for idx in indices for i in idx for j in range(4)])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    materialise(collate([ds[i] for i in indices[0]]), dev)  # warm-up (device copy of the bank)
    before = after = 0.0
    for idx in indices:
        t0 = time.perf_counter()
        for i in idx:
            ds.reference_item(i)
        before += time.perf_counter() - t0
        sync()
        t0 = time.perf_counter()
        out = materialise(collate([ds[i] for i in idx]), dev)
        sync()
        after += time.perf_counter() - t0
        assert out["inp"].shape == (len(idx), 1, patch, patch)
    count = rounds * batch
    return {"patch": patch, "device": str(dev), "pairs": count, "before": count / before, "after": count / after}


def data_share(arch: str, preset: str, patch: int, batch: int, steps: int, device: str) -> dict:
    """One full training step (EFCR, extended pass) with its data made by the real pipeline:
    seconds of data (crops + device synthesis) and of the model's step, and the data's share."""
    import torch

    from napari_mpt_deblur.data.datasets import collate, materialise
    from napari_mpt_deblur.data.psf_bank import PSFBank

    trainer = _trainer(arch, preset, "efcr", patch, batch, device, "auto")
    ds = _dataset(patch)
    bank = PSFBank.by_key(ds.bank_key)
    dev = trainer.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    data_t, step_t = [], []
    for s in range(steps + 1):
        idx = list(range(5000 + s * batch, 5000 + (s + 1) * batch))
        bank.ensure([int(ds[i]["levels"][j]) for i in idx for j in range(4)])
        sync()
        t0 = time.perf_counter()
        pairs = materialise(collate([ds[i] for i in idx]), dev)
        sync()
        t1 = time.perf_counter()
        trainer._train_step(idx, {"size": batch, "ready": {"pos": torch.arange(batch), **pairs}, "synth": {}}, None)
        sync()
        t2 = time.perf_counter()
        if s:  # the first step pays one-off warm-ups
            data_t.append(t1 - t0)
            step_t.append(t2 - t1)
    data, step = statistics.median(data_t), statistics.median(step_t)
    return {"arch": arch, "preset": preset, "patch": patch, "batch": batch, "device": str(dev),
            "data_s": data, "step_s": step, "share": data / (data + step)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="mpt,h2t_unet")
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--modes", default="l1,efcr,efcr-nograd")
    ap.add_argument("--device", default=None, help="cpu, cuda (default: cpu, plus cuda when available)")
    ap.add_argument("--patch", type=int, default=None,
                    help="patch side (default: 64 on CPU, 256 on GPU; raised to the net's size multiple)")
    ap.add_argument("--batch", type=int, default=None, help="batch (default: 4 on CPU, 8 on GPU)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--data-samples", type=int, default=20, help="synthetic pairs to time (0 = skip)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--data", action="store_true",
                    help="data-only mode: synthetic pairs/s before (numpy) vs after (batched device pipeline) at "
                         "128 and 256 px, and the data's share of a full h2t_unet/paper step at 128 px")
    args = ap.parse_args()
    if args.data:
        return data_main(args)

    from napari_mpt_deblur.inference.devices import tune_cpu_allocator

    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [args.device] if args.device else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for device in devices:
        gpu = device.startswith("cuda")
        patch = args.patch or (256 if gpu else 64)
        batch = args.batch or (8 if gpu else 4)
        for arch in args.archs.split(","):
            for preset in args.presets.split(","):
                from napari_mpt_deblur.models.config import preset_config

                # A patch smaller than the net's size multiple would be padded up to it: time that size.
                side = max(patch, preset_config(arch, preset).size_multiple)
                for mode in args.modes.split(","):
                    rows.append(time_steps(arch, preset, mode, side, batch, device, args.precision,
                                           args.warmup, args.steps))
                    if not args.json:
                        r = rows[-1]
                        print(f"  measured {arch}/{preset} {mode} on {device}: {r['patches_per_s']:.2f} patches/s", flush=True)
    data_rate = time_data(args.patch or 64, args.data_samples) if args.data_samples else None
    if args.json:
        print(json.dumps({"rows": rows, "data_pairs_per_s": data_rate}, indent=2))
        return
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    header = f"{'arch':<9} {'preset':<6} {'mode':<12} {'device':<7} {'prec':<5} {'patch':>5} {'batch':>5} {'params':>10} {'s/step':>8} {'patches/s':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['arch']:<9} {r['preset']:<6} {r['mode']:<12} {r['device']:<7} {r['precision']:<5} {r['patch']:>5} "
              f"{r['batch']:>5} {r['params']:>10,} {r['s_per_step']:>8.3f} {r['patches_per_s']:>10.2f}")
    if data_rate is not None:
        print(f"\nsynthetic defocus pairs (physical PSF + noise, {args.patch or 64} px patches, one process): "
              f"{data_rate:.1f} pairs/s")


def data_main(args) -> None:
    from napari_mpt_deblur.inference.devices import tune_cpu_allocator

    tune_cpu_allocator()
    torch.set_num_threads(args.threads or 1)
    device = args.device or "cpu"
    n = args.data_samples if args.data_samples else 24
    rows = [time_pipelines(p, n, device) for p in (128, 256)]
    share = data_share("h2t_unet", "paper", 128, args.batch or 4, args.steps, device)
    if args.json:
        print(json.dumps({"pairs": rows, "step": share}, indent=2))
        return
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU thread(s), device {device}")
    print(f"{'patch':>5} {'device':<7} {'pairs':>5} {'before pairs/s':>15} {'after pairs/s':>14} {'speed-up':>9}")
    for r in rows:
        print(f"{r['patch']:>5} {r['device']:<7} {r['pairs']:>5} {r['before']:>15.2f} {r['after']:>14.2f} "
              f"{r['after'] / r['before']:>8.1f}x")
    print(f"\nfull step {share['arch']}/{share['preset']} at {share['patch']} px, batch {share['batch']}, EFCR "
          f"(extended pass) on {share['device']}: data {share['data_s'] * 1000:.0f} ms + step "
          f"{share['step_s'] * 1000:.0f} ms -> data is {100 * share['share']:.1f}% of the step")


if __name__ == "__main__":
    main()
