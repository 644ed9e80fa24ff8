"""Compiled (``torch.compile``, inductor) against eager inference through the tiled engine.

For each model: one process, two engines on the same weights (``compile=False`` / ``True``), the
same device, tile and threads. The compiled engine is warmed up first (that time is the compile
cost, reported separately); then the two engines restore the same plane alternately, and the
table gives seconds per megapixel (median and range) and how many planes it takes for the
compile time to pay for itself.

    python benchmarks/bench_compile.py                                   # shipped H2T and MPT, CPU
    python benchmarks/bench_compile.py --models mpt-small-fluo --repeats 5 --device cuda
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
import json, statistics, sys, time, warnings
args = json.loads(sys.argv[1])
from napari_mpt_deblur.inference.devices import tune_cpu_allocator
tune_cpu_allocator()
import numpy as np, torch
torch.set_num_threads(args["threads"])
from napari_mpt_deblur.data import samples
from napari_mpt_deblur.inference.compiled import warm_up
from napari_mpt_deblur.inference.engine import Deblurrer, InferenceSettings
plane = samples.defocused_bbbc006()
base = dict(device=args["device"], orientations=1, shifts=1)  # one forward per tile: what compiling changes
if args["tile"]:
    base["tile"] = args["tile"]
eager = Deblurrer(args["model"], InferenceSettings(**base, compile=False))
comp = Deblurrer(args["model"], InferenceSettings(**base, compile=True))
t_eager_first = warm_up(eager, *plane.shape)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    t_compile = warm_up(comp, *plane.shape)
failed = comp._compiled_forward.failed
times = {"eager": [], "compiled": []}
ref = None
for r in range(args["repeats"]):
    for name in (["eager", "compiled"] if r % 2 == 0 else ["compiled", "eager"]):
        engine = eager if name == "eager" else comp
        t0 = time.perf_counter()
        out = engine.deblur_plane(plane)
        times[name].append(time.perf_counter() - t0)
        if ref is None:
            ref = out
        diff = float(np.abs(out - ref).max())
print(json.dumps({"model": args["model"], "arch": f"{eager.record.architecture.arch}/{eager.record.architecture.preset}",
                  "tile": list(eager.current_tile), "shape": list(plane.shape), "compile_s": t_compile,
                  "eager_first_s": t_eager_first, "failed": failed, "times": times, "max_abs_diff": diff}))
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["h2t-unet-fluo", "mpt-small-fluo"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tile", type=int, default=0, help="tile side (0: the device default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=4, help="planes per engine, alternating")
    args = p.parse_args(argv)
    rows = []
    for model in args.models:
        spec = {"model": model, "device": args.device, "tile": args.tile, "threads": args.threads,
                "repeats": args.repeats}
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        rows.append(run_child(CHILD, json.dumps(spec), env=env, what=model))
    import torch

    print(f"{platform.processor() or platform.machine()}, device {args.device}, {args.threads} threads, torch "
          f"{torch.__version__}; plane: real BBBC006 520 x 696; {args.repeats} planes per engine, alternating")
    print()
    print("| model | arch | tile, overlap, batch | compile + first tile s | eager s/MP [min-max] | compiled s/MP [min-max] "
          "| compiled/eager | planes to repay compile | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mp = r["shape"][0] * r["shape"][1] / 1e6
        e, c = (per_megapixel(r["times"][k], r["shape"]) for k in ("eager", "compiled"))
        me, mc = statistics.median(e), statistics.median(c)
        saved = (me - mc) * mp
        repay = f"{r['compile_s'] / saved:.0f}" if saved > 0 else "never"
        status = f" (FAILED: {r['failed']})" if r["failed"] else ""
        print(f"| {r['model']}{status} | {r['arch']} | {r['tile']} | {r['compile_s']:.1f} | {spread(e)} "
              f"| {spread(c)} | {mc / me:.2f} | {repay} | {r['max_abs_diff']:.1e} |")


if __name__ == "__main__":
    main()
