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
    batch_data = {"inp": (gt + 0.05 * torch.randn(batch, 1, patch, patch, generator=g)).clamp(0, 1), "gt": gt}
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


def time_data(patch: int, n: int) -> float:
    """Synthetic defocus pairs per second (one process) from the bundled in-focus image."""
    from napari_mpt_deblur.data.datasets import PatchConfig, SyntheticPatches
    from napari_mpt_deblur.data.samples import in_focus_bbbc006

    ds = SyntheticPatches([in_focus_bbbc006()], PatchConfig(size=patch), seed=0)
    ds[0]
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        ds[i]
    return n / (time.perf_counter() - t0)


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
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()
