"""Our MPT against the authors' public MPT, timed fairly: one process, same settings, alternating.

The authors' code is not part of this repository. Give a checkout of their public repository
(github.com/PieceZhang/MPT-CataBlur, the code of Zhang et al., CVPR 2024; its ``models/MPT.py``
is what is timed) with ``--authors-path``; without it the benchmark says so and exits 0. Their
file needs ``einops`` (``pip install einops``, or put a folder holding it on ``--authors-deps``);
its unused ``ptflops`` import is satisfied with an empty stand-in.

What is equal for both models, in every measurement:

* one Python process per allocator setting, both models built in it (same torch, same threads);
* the glibc allocator tuning (:func:`napari_mpt_deblur.inference.devices.tune_cpu_allocator`) is
  applied for both or for neither; ``--allocator both`` (default) reports each;
* the same input tensor, batch 1, ``torch.inference_mode``, the same memory format
  (``--channels-last`` puts both models and the input in channels_last) and the same precision
  (``--precision bf16`` runs both under CPU bf16 autocast);
* one warm-up pass each, then rounds of one run per contestant, the order rotated every round,
  so that load from other processes on a shared machine hits all alike. Each round gives a
  ratio ours/theirs; the table reports the median of those paired ratios and their range.
  ``--attention both`` (default) times our two attention paths as separate contestants: the
  explicit-matmul reference (the code before the fused path existed) and SDPA.
  ``--ours-at REV`` adds our MPT as it was at git revision REV (its SDPA path, the same weights)
  as one more contestant, so a change is timed before and after in the same run.

Their model is built with ``input_res`` equal to the benchmark size, so its shifted-window masks
are precomputed as in their training setup (otherwise they are rebuilt on every call).
Their code needs H and W that are multiples of 128 for the ``paper`` preset (use 256, 512, ...).

    python benchmarks/bench_fair_vs_authors.py --authors-path /path/to/MPT-CataBlur
    python benchmarks/bench_fair_vs_authors.py --authors-path ... --sizes 256 --repeats 5 --allocator untuned
    python benchmarks/bench_fair_vs_authors.py --authors-path ... --attention sdpa --ours-at HEAD~1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

from _child import run_child
from _report import spread
from _revision import LOAD_AT_REVISION, mpt_source_at

CHILD = LOAD_AT_REVISION + r"""
import contextlib, importlib.util, json, os, statistics, sys, time, types
args = json.loads(sys.argv[1])
if args["allocator"] == "tuned":
    from napari_mpt_deblur.inference.devices import tune_cpu_allocator
    if not tune_cpu_allocator():
        raise SystemExit("tune_cpu_allocator() could not be applied on this system")
if args["deps"]:
    sys.path.insert(0, args["deps"])
import torch
torch.set_num_threads(args["threads"])
try:
    import einops  # noqa: F401  (the authors' file imports it at module level)
except ImportError:
    raise SystemExit("the authors' models/MPT.py needs einops: pip install einops (or pass --authors-deps DIR)")
try:
    import ptflops  # noqa: F401
except ImportError:  # imported by their file but only used in its __main__ block
    stub = types.ModuleType("ptflops")
    stub.get_model_complexity_info = None
    sys.modules["ptflops"] = stub
spec = importlib.util.spec_from_file_location("authors_mpt", os.path.join(args["authors_path"], "models", "MPT.py"))
theirs_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(theirs_mod)
from napari_mpt_deblur.models import mpt as ours_mod
from napari_mpt_deblur.models.config import preset_config
from napari_mpt_deblur.models.registry import build_model
paths = args["attention"]  # our attention paths to time, e.g. ["reference", "sdpa"]

def timed(model, x, path=None):
    if path is not None:
        ours_mod.set_attention_backend(path)
    t0 = time.perf_counter()
    model(x)
    return time.perf_counter() - t0

rows = []
for size in args["sizes"]:
    torch.manual_seed(0)
    ours = build_model(preset_config("mpt", "paper", args["channels"])).eval()
    theirs = theirs_mod.MPT(inp_channels=args["channels"], out_channels=args["channels"], input_res=size).eval()
    x = torch.rand(1, args["channels"], size, size)
    if args["channels_last"]:
        ours = ours.to(memory_format=torch.channels_last)
        theirs = theirs.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    contestants = ["theirs"] + paths
    run = {"theirs": lambda: timed(lambda v: theirs(v)["result"], x)}
    for path in paths:
        run[path] = (lambda path=path: timed(ours, x, path))
    if args["ours_at"]:
        before = mpt_at_revision(args["ours_at"]["source"]).MultiPyramidTransformer(ours.config).eval()
        before.load_state_dict(ours.state_dict())
        if args["channels_last"]:
            before = before.to(memory_format=torch.channels_last)
        label = "sdpa at " + args["ours_at"]["revision"]
        contestants.append(label)
        run[label] = lambda: timed(before, x)
    times = {c: [] for c in contestants}
    # The same autocast for both: fp32 (none) or CPU bf16 autocast (AMX / AVX-512 BF16 hardware).
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args["precision"] == "bf16" else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        assert theirs(x)["result"].shape == x.shape  # warm-up, shapes
        for path in paths:
            ours_mod.set_attention_backend(path)
            assert ours(x).shape == x.shape
        if args["ours_at"]:
            assert before(x).shape == x.shape
        for r in range(args["repeats"]):
            # rotate the order every round, so no contestant always runs first or last
            k = r % len(contestants)
            for c in contestants[k:] + contestants[:k]:
                times[c].append(run[c]())
    rows.append({"size": size, "times": times,
                 "params_ours": sum(p.numel() for p in ours.parameters()),
                 "params_theirs": sum(p.numel() for p in theirs.parameters())})
    del ours, theirs
print(json.dumps(rows))
"""


def run_setting(allocator: str, args: argparse.Namespace) -> list[dict]:
    spec = {"allocator": allocator, "authors_path": str(args.authors_path), "deps": args.authors_deps,
            "threads": args.threads, "sizes": args.sizes, "repeats": args.repeats, "channels": args.channels,
            "channels_last": args.channels_last, "precision": args.precision,
            "attention": ["reference", "sdpa"] if args.attention == "both" else [args.attention],
            "ours_at": args.ours_at and {"revision": args.ours_at, "source": args.ours_at_source}}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.pop("MPT_DEBLUR_NO_MALLOPT", None)
    return run_child(CHILD, json.dumps(spec), env=env, what=f"benchmark child ({allocator} allocator)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors-path", type=Path, default=None,
                   help="checkout of github.com/PieceZhang/MPT-CataBlur (the folder holding models/MPT.py)")
    p.add_argument("--authors-deps", default=None, help="extra folder put on sys.path first (e.g. holding einops)")
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per model and size (after 1 warm-up each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--allocator", choices=["untuned", "tuned", "both"], default="both")
    p.add_argument("--channels-last", action="store_true", help="both models and the input in channels_last")
    p.add_argument("--attention", choices=["both", "sdpa", "reference"], default="both",
                   help="our attention path(s): 'both' times the reference (explicit matmul, the code before "
                        "issue 16) and the fused SDPA path as two contestants in the same rotation")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: both models under CPU bf16 autocast (worth it only on CPUs with AMX / AVX-512 BF16)")
    p.add_argument("--ours-at", metavar="REV", default=None,
                   help="also time our MPT as it was at this git revision (SDPA path, same weights): before/after")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    if args.authors_path is None:
        print("skipped: no --authors-path given. This benchmark times the authors' public MPT "
              "(github.com/PieceZhang/MPT-CataBlur, not vendored here) against ours; clone it and pass "
              "--authors-path /path/to/MPT-CataBlur.")
        return 0
    if not (args.authors_path / "models" / "MPT.py").is_file():
        print(f"error: {args.authors_path}/models/MPT.py not found; --authors-path must be the root of a "
              "checkout of PieceZhang/MPT-CataBlur", file=sys.stderr)
        return 2
    bad = [s for s in args.sizes if s % 128]
    if bad:
        print(f"error: sizes {bad} are not multiples of 128, which the authors' paper preset needs", file=sys.stderr)
        return 2

    settings = ["untuned", "tuned"] if args.allocator == "both" else [args.allocator]
    args.ours_at_source = args.ours_at and mpt_source_at(args.ours_at)
    try:
        results = {a: run_setting(a, args) for a in settings}
    finally:
        if args.ours_at_source:
            os.unlink(args.ours_at_source)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0

    import torch

    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs visible, "
          f"{args.threads} threads, torch {torch.__version__}, MPT paper preset, {args.channels} channels, batch 1, "
          f"{args.repeats} alternating runs per model after 1 warm-up each, channels_last "
          f"{'on' if args.channels_last else 'off'} for both, precision {args.precision} for both, "
          f"our attention: {args.attention}")
    print()
    print("| allocator (both) | size | ours: attention | theirs median s [min-max] | ours median s [min-max] | "
          "ours/theirs, paired per round: median [min-max] | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for alloc, rows in results.items():
        for r in rows:
            theirs = r["times"]["theirs"]
            for path, ours in r["times"].items():
                if path == "theirs":
                    continue
                ratios = [o / t for o, t in zip(ours, theirs)]
                med = statistics.median(ratios)
                print(f"| {alloc} | {r['size']}² | {path} | {spread(theirs)} | {spread(ours)} | {spread(ratios, 3)} "
                      f"| {1 / med:.2f}x |")
    first = next(iter(results.values()))[0]
    print()
    print(f"parameters: ours {first['params_ours']:,}, theirs {first['params_theirs']:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
