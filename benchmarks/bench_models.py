"""CPU forward time and peak memory of every architecture preset.

For each preset, input size and channel count: median of N timed forward passes (batch 1,
``torch.inference_mode``) after one warm-up, with a fixed number of threads, and the peak
resident memory of a fresh process that ran them (so numbers include the Python + torch
baseline, as the anchor numbers for the authors' code do).

Comparisons with the authors' public code are made by benchmarks/bench_fair_vs_authors.py only
(one process, same threads and allocator setting for both, alternating runs); numbers from this
script and from other processes or days are not comparable with it.

    python benchmarks/bench_models.py                       # all presets, 256 and 512, C = 1 and 3
    python benchmarks/bench_models.py --arch mpt --preset paper --channels 3
    python benchmarks/bench_models.py --no-mallopt          # glibc allocator left as is
    python benchmarks/bench_models.py --device cuda --sizes 512 1024 --channels 1   # GPU, bf16 autocast

On ``--device cuda`` each pass is synchronised, runs under bf16 autocast (the inference engine's
default there) and the peak GPU memory is reported instead of the resident memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

CHILD = r"""
import json, resource, statistics, sys, time
args = json.loads(sys.argv[1])
if args["mallopt"]:
    from napari_mpt_deblur.inference.devices import tune_cpu_allocator
    tune_cpu_allocator()
import torch
torch.set_num_threads(args["threads"])
from napari_mpt_deblur.models.config import preset_config
from napari_mpt_deblur.models.registry import build_model
torch.manual_seed(0)
import contextlib
dev = torch.device(args.get("device", "cpu"))
model = build_model(preset_config(args["arch"], args["preset"], args["channels"])).eval().to(dev)
if args["channels_last"]:
    model = model.to(memory_format=torch.channels_last)
x = torch.rand(1, args["channels"], args["size"], args["size"], device=dev)
cuda = dev.type == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)
amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
times = []
with torch.inference_mode(), amp:
    model(x)
    sync()
    for _ in range(args["repeats"]):
        t0 = time.perf_counter()
        model(x)
        sync()
        times.append(time.perf_counter() - t0)
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {"median_s": statistics.median(times), "min_s": min(times), "peak_rss_gb": peak_kb / 1024**2}
if cuda:
    out["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1024**3
print(json.dumps(out))
"""


def measure(arch: str, preset: str, channels: int, size: int, threads: int, repeats: int, mallopt: bool,
            channels_last: bool, device: str = "cpu") -> dict:
    spec = dict(arch=arch, preset=preset, channels=channels, size=size, threads=threads, repeats=repeats,
                mallopt=mallopt, channels_last=channels_last, device=device)
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=True)
    return {**spec, **json.loads(out.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["mpt", "h2t_unet"])
    p.add_argument("--preset", nargs="+", default=["paper", "small", "tiny"])
    p.add_argument("--channels", nargs="+", type=int, default=[1, 3])
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-mallopt", action="store_true", help="do not tune the glibc allocator")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast, synchronised timings)")
    args = p.parse_args(argv)

    rows = []
    for arch in args.arch:
        for preset in args.preset:
            for channels in args.channels:
                for size in args.sizes:
                    rows.append(measure(arch, preset, channels, size, args.threads, args.repeats,
                                        not args.no_mallopt, not args.no_channels_last, args.device))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    import torch

    print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"median of {args.repeats} after 1 warm-up, batch 1, mallopt={'off' if args.no_mallopt else 'on'}, "
          f"channels_last={'off' if args.no_channels_last else 'on'}")
    print()
    print("| arch | preset | C | size | median s | min s | s per Mpx | peak RSS GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mpx = r["size"] ** 2 / 1e6
        print(f"| {r['arch']} | {r['preset']} | {r['channels']} | {r['size']} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
              f"{r['median_s'] / mpx:.2f} | {r['peak_rss_gb']:.2f} |")
    by_key = {(r["arch"], r["preset"], r["channels"]): {} for r in rows}
    for r in rows:
        by_key[(r["arch"], r["preset"], r["channels"])][r["size"]] = r["median_s"]
    if len(args.sizes) >= 2:
        a, b = sorted(args.sizes)[:2]
        print()
        print(f"Time ratio {b}/{a} (pixel ratio {(b / a) ** 2:.1f}; linear scaling gives the same number):")
        for key, t in by_key.items():
            if a in t and b in t:
                print(f"  {key[0]}/{key[1]} C={key[2]}: {t[b] / t[a]:.2f}")


if __name__ == "__main__":
    main()
