"""Our MPT now against our MPT at another git revision: before/after of a speed change, one run.

One process (fresh, allocator tuned), both networks built from the same preset with the same
weights, the same input, ``torch.inference_mode``; one warm-up each, then rounds of one pass per
network in alternating order. Reports per preset and size the median seconds, the paired ratio
now/before (median [min-max]) and the largest output difference (the two must compute the same
function). Comparisons with the authors' code: bench_fair_vs_authors.py (``--ours-at REV`` there).

    python benchmarks/bench_mpt_revision.py --rev 5fc2308                       # tiny, small, paper; 512²; 1 thread
    python benchmarks/bench_mpt_revision.py --rev HEAD~1 --presets tiny --sizes 576x384 --threads 2 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

from _child import run_child
from _report import spread
from _revision import LOAD_AT_REVISION, mpt_source_at

CHILD = LOAD_AT_REVISION + r"""
import json, sys, time
args = json.loads(sys.argv[1])
from napari_mpt_deblur.inference.devices import tune_cpu_allocator
tune_cpu_allocator()
import torch
torch.set_num_threads(args["threads"])
from napari_mpt_deblur.models.config import preset_config
from napari_mpt_deblur.models.mpt import MultiPyramidTransformer
before_mod = mpt_at_revision(args["source"])
rows = []
for preset in args["presets"]:
    for h, w in args["sizes"]:
        torch.manual_seed(0)
        config = preset_config("mpt", preset, args["channels"])
        now = MultiPyramidTransformer(config).eval()
        with torch.no_grad():  # trained-like attention parameters, so the two paths are really compared
            for name, p in now.named_parameters():
                if name.endswith(("logit_scale", "temperature")):
                    p.copy_(torch.rand_like(p) * 4.0)
                elif name.endswith("relative_position_bias_table"):
                    p.normal_(0, 1.0)
        before = before_mod.MultiPyramidTransformer(config).eval()
        before.load_state_dict(now.state_dict())
        x = torch.rand(1, args["channels"], h, w)
        times = {"before": [], "now": []}
        with torch.inference_mode():
            diff = (now(x) - before(x)).abs().max().item()  # also the warm-up
            for r in range(args["repeats"]):
                for name, model in ((("now", now), ("before", before)) if r % 2 else (("before", before), ("now", now))):
                    t0 = time.perf_counter()
                    model(x)
                    times[name].append(time.perf_counter() - t0)
        rows.append({"preset": preset, "size": f"{h}x{w}", "times": times, "max_diff": diff})
print(json.dumps(rows))
"""


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", required=True, help="git revision whose models/mpt.py is 'before'")
    p.add_argument("--presets", nargs="+", default=["tiny", "small", "paper"])
    p.add_argument("--sizes", nargs="+", type=parse_size, default=[(512, 512)], help="HxW or N (square)")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed passes per network (after 1 warm-up each)")
    args = p.parse_args(argv)
    spec = {"source": mpt_source_at(args.rev), "presets": args.presets, "sizes": args.sizes,
            "channels": args.channels, "threads": args.threads, "repeats": args.repeats}
    try:
        rows = run_child(CHILD, json.dumps(spec), env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    finally:
        os.unlink(spec["source"])
    print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} thread(s), {args.channels} channel(s), "
          f"batch 1, {args.repeats} alternating passes each after 1 warm-up; before = models/mpt.py at {args.rev}")
    print()
    print("| preset | size | before s [min-max] | now s [min-max] | now/before, paired: median [min-max] | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratios = [n / b for n, b in zip(r["times"]["now"], r["times"]["before"])]
        print(f"| {r['preset']} | {r['size']} | {spread(r['times']['before'])} | {spread(r['times']['now'])} | "
              f"{spread(ratios, 3)} | {1 / statistics.median(ratios):.2f}x | {r['max_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
