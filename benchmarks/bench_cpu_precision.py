"""bf16 against fp32 inference on a CPU, through the tiled engine, with the quality it costs.

For each model: one process, two engines on the same weights (``precision="fp32"`` / ``"bf16"``),
the same device, tile and threads. Speed: the two engines restore the real BBBC006 demo plane
(520 x 696) alternately; seconds per megapixel, median and range. Quality: both restore
``--images`` U2OS test images blurred at ``--defocus`` um with the benchmark's optics and noise
(``mpt-deblur benchmark`` settings, docs/benchmarks.md); PSNR against the sharp image for each, and
the largest bf16-fp32 difference in the model's normalised units.

bf16 on a CPU is only honoured where the CPU has AMX or AVX-512 BF16
(``inference.devices.cpu_has_native_bf16``); elsewhere the benchmark says so and stops.

    python benchmarks/bench_cpu_precision.py                      # shipped H2T and MPT, 2 threads
    python benchmarks/bench_cpu_precision.py --models h2t-unet-fluo --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics

from _child import run_child
from _report import per_megapixel, spread

CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])
from napari_mpt_deblur.inference.devices import tune_cpu_allocator
tune_cpu_allocator()
import numpy as np, torch
torch.set_num_threads(args["threads"])
from pathlib import Path
from napari_mpt_deblur.data import samples
from napari_mpt_deblur.data.splits import U2OS_TEST
from napari_mpt_deblur.evaluation.benchmark import BenchmarkConfig, degrade, load_image
from napari_mpt_deblur.evaluation.metrics import psnr
from napari_mpt_deblur.inference.engine import Deblurrer, InferenceSettings
base = dict(device="cpu", orientations=1, shifts=1, output_dtype="float32")
engines = {p: Deblurrer(args["model"], InferenceSettings(**base, precision=p)) for p in ("fp32", "bf16")}
plane = samples.defocused_bbbc006()
for engine in engines.values():  # first-call costs (allocations, oneDNN kernel choice) out of the timing
    engine.deblur_plane(plane)
times = {"fp32": [], "bf16": []}
for r in range(args["repeats"]):
    for name in (["fp32", "bf16"] if r % 2 == 0 else ["bf16", "fp32"]):
        t0 = time.perf_counter()
        engines[name].deblur_plane(plane)
        times[name].append(time.perf_counter() - t0)
root = Path(args["u2os"])
cfg = BenchmarkConfig(sharp_dir=root / "images", stardist=False)
scores = {"fp32": [], "bf16": []}
diff = 0.0
for name in U2OS_TEST[: args["images"]]:
    img = load_image(root / "images" / f"{name}.tif", cfg, None)
    blurred = degrade(img, cfg, args["defocus"])
    outs = {p: np.asarray(e.deblur_plane(blurred.astype(np.float32)), dtype=np.float64) for p, e in engines.items()}
    for p, out in outs.items():
        scores[p].append(psnr(out, img.sharp01))
    diff = max(diff, float(np.abs(outs["bf16"] - outs["fp32"]).max()))
rec = engines["fp32"].record.architecture
print(json.dumps({"model": args["model"], "arch": f"{rec.arch}/{rec.preset}", "shape": list(plane.shape),
                  "tile": list(engines["fp32"].current_tile), "times": times,
                  "psnr": {p: float(np.mean(v)) for p, v in scores.items()}, "max_abs_diff": diff}))
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["h2t-unet-fluo", "mpt-small-fluo"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=4, help="demo planes per precision, alternating")
    p.add_argument("--images", type=int, default=3, help="U2OS test images for the quality columns")
    p.add_argument("--defocus", type=float, default=8.0, help="defocus of the quality images, um")
    p.add_argument("--u2os", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "u2os_nuclei"),
                   help="the U2OS nuclei folder (images/ inside)")
    args = p.parse_args(argv)

    from napari_mpt_deblur.inference.devices import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        raise SystemExit("this CPU has neither AMX nor AVX-512 BF16: bf16 inference falls back to fp32 here, "
                         "nothing to compare")
    rows = []
    for model in args.models:
        spec = {"model": model, "threads": args.threads, "repeats": args.repeats, "images": args.images,
                "defocus": args.defocus, "u2os": os.path.abspath(args.u2os)}
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        rows.append(run_child(CHILD, json.dumps(spec), env=env, what=model))
    import torch

    print(f"{platform.processor() or platform.machine()}, CPU, {args.threads} threads, torch {torch.__version__}; "
          f"speed: real BBBC006 520 x 696, {args.repeats} planes per precision, alternating, one orientation; "
          f"quality: {args.images} U2OS test images at {args.defocus:g} um")
    print()
    print("| model | arch | tile, overlap, batch | fp32 s/MP [min-max] | bf16 s/MP [min-max] | speed-up "
          "| PSNR fp32 | PSNR bf16 | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, b = (per_megapixel(r["times"][p], r["shape"]) for p in ("fp32", "bf16"))
        mf, mb = statistics.median(f), statistics.median(b)
        print(f"| {r['model']} | {r['arch']} | {r['tile']} | {spread(f)} "
              f"| {spread(b)} | {mf / mb:.2f}x | {r['psnr']['fp32']:.2f} "
              f"| {r['psnr']['bf16']:.2f} | {r['max_abs_diff']:.1e} |")


if __name__ == "__main__":
    main()
