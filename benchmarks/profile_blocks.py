"""Where the time of an MPT forward pass goes, per block type, for both attention paths.

Forward pre/post hooks time every CSWA, ISCA, FEFN, channel LayerNorm and up/down-sampling
module (CPU ops are synchronous, so wall time between the hooks is the module's time). FEFN is
reported without its two LayerNorms, which count under "norms"; "rest" is everything else
(embedding and head convs, padding, residual and skip additions). One process, a fixed number
of threads, the glibc allocator tuned, the two attention paths alternating, median per block
type over the timed passes (one warm-up per path).

    python benchmarks/profile_blocks.py                                  # paper and small, 512², 1 channel
    python benchmarks/profile_blocks.py --preset small --size 256 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import defaultdict

CATEGORIES = ("CSWA", "ISCA", "FEFN", "norms", "up/down", "rest")


def attach(model, totals: dict[str, float]):
    from napari_mpt_deblur.models.layers import ChannelLayerNorm
    from napari_mpt_deblur.models.mpt import (
        CrossScaleWindowAttention,
        Downsample,
        FeatureEnhancingFFN,
        IntraScaleChannelAttention,
        Upsample,
    )

    kinds = {CrossScaleWindowAttention: "CSWA", IntraScaleChannelAttention: "ISCA", FeatureEnhancingFFN: "FEFN",
             ChannelLayerNorm: "norms", Downsample: "up/down", Upsample: "up/down"}
    starts: dict[int, float] = {}
    handles = []

    def pre(module, _inputs):
        starts[id(module)] = time.perf_counter()

    def make_post(kind):
        def post(module, _inputs, _output):
            totals[kind] += time.perf_counter() - starts.pop(id(module))
        return post

    for module in model.modules():
        kind = kinds.get(type(module))
        if kind is not None:
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(make_post(kind)))
    return handles


def profile(preset: str, size: int, channels: int, repeats: int, paths: list[str]) -> dict[str, dict[str, float]]:
    import torch

    from napari_mpt_deblur.models import mpt
    from napari_mpt_deblur.models.config import preset_config
    from napari_mpt_deblur.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(preset_config("mpt", preset, channels)).eval().to(memory_format=torch.channels_last)
    x = torch.rand(1, channels, size, size).contiguous(memory_format=torch.channels_last)
    samples: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
    with torch.inference_mode():
        for p in paths:  # warm-up each path
            with mpt.attention_backend(p):
                model(x)
        for r in range(repeats):
            order = paths if r % 2 == 0 else list(reversed(paths))
            for p in order:
                totals: dict[str, float] = defaultdict(float)
                # FEFN's own norms are timed twice (inside FEFN and as norms): subtract them from FEFN.
                fefn_norm = defaultdict(float)
                handles = attach(model, totals)
                for ffn in (m for m in model.modules() if type(m).__name__ == "FeatureEnhancingFFN"):
                    for norm in (ffn.norm_spatial, ffn.norm_channel):
                        handles.append(norm.register_forward_pre_hook(
                            lambda mod, _i, _s=fefn_norm: _s.__setitem__(id(mod), time.perf_counter())))
                        handles.append(norm.register_forward_hook(
                            lambda mod, _i, _o, _s=fefn_norm: _s.__setitem__("sum", _s["sum"] + time.perf_counter() - _s[id(mod)])))
                with mpt.attention_backend(p):
                    t0 = time.perf_counter()
                    model(x)
                    total = time.perf_counter() - t0
                for h in handles:
                    h.remove()
                totals["FEFN"] -= fefn_norm["sum"]
                totals["rest"] = total - sum(totals[k] for k in CATEGORIES if k != "rest")
                totals["total"] = total
                samples[p].append(dict(totals))
    return {p: {k: statistics.median(s[k] for s in samples[p]) for k in (*CATEGORIES, "total")} for p in paths}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["paper", "small"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    from napari_mpt_deblur.inference.devices import tune_cpu_allocator

    tune_cpu_allocator()
    import torch

    torch.set_num_threads(args.threads)
    paths = ["reference", "sdpa"]
    print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"{args.size}² x {args.channels} channel(s), batch 1, allocator tuned, channels_last, "
          f"median of {args.repeats} alternating passes per path after 1 warm-up")
    print()
    print("| preset | block type | reference (matmul) s | share | SDPA s | share | SDPA / reference |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.preset:
        res = profile(preset, args.size, args.channels, args.repeats, paths)
        ref, new = res["reference"], res["sdpa"]
        for k in (*CATEGORIES, "total"):
            print(f"| {preset} | {k} | {ref[k]:.3f} | {ref[k] / ref['total']:.0%} | {new[k]:.3f} | "
                  f"{new[k] / new['total']:.0%} | {new[k] / ref[k]:.2f} |")


if __name__ == "__main__":
    main()
