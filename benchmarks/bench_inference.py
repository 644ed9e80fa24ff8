"""Inference engine speed and memory: megapixels/s, tiling overhead, peak RSS vs stack depth.

Every measurement runs in its own subprocess (clean peak RSS, no warm caches from the previous
one). Models are seeded, untrained networks of each preset: speed and memory do not depend on
the weights. Inputs are the bundled real BBBC006 image (520 x 696 uint16) mirrored to size; stacks
are zarr stores on disk, streamed by ``Deblurrer.write_zarr`` into another zarr store, so the
peak RSS of a stack run shows whether memory grows with depth.

Measurements per preset:

* ``plane tiled``: one S x S plane (default 2048) with the engine's tiles (default for the device,
  or ``--tile/--overlap``); ``plane whole``: the same plane as a single tile; their time ratio is
  the tiling overhead.
* ``stack``: a (D, S, S) zarr stack (default 16 x 1024 x 1024) streamed to zarr.
* ``depth N``: (N, s, s) stacks (default N = 4, 16, 64, s = 256) streamed to zarr: peak RSS.
* ``baseline``: the model loaded and warmed up, no image (RSS floor of the process).
* ``small before`` / ``small after`` (part ``small``): N planes of 520 x 696 (default 64, the
  BBBC006 field size) streamed zarr -> zarr, first by the per-plane path (``pipeline=False``,
  one tile per forward pass: the engine before batching), then by the batched path (tiles of
  several planes per forward pass, planes read ahead on a thread; ``pipeline=True``, the GPU
  default). The ``after`` row gives the speed-up and the largest difference between the two
  outputs, relative to each plane's range. Every other row uses the engine's defaults for the
  device (on the CPU the per-plane path).
* ``limit`` (part ``limit``): the physical limit of the device for each preset: FLOPs per pixel
  (``models.complexity.count_flops`` on one tile of the size the engine uses) times the device's
  peak FLOP/s, measured here with a large matrix product (fp32 on CPU; on CUDA in the engine's
  precision, bf16 by default). The ratio column is the best measured Mpx/s over that limit.

Usage (CPU, as run for docs/inference.md and docs/performance.md)::

    nice python benchmarks/bench_inference.py --presets tiny
    nice python benchmarks/bench_inference.py --presets paper --plane 1024 --stack 4x512 --depth-plane 128
    python benchmarks/bench_inference.py --presets tiny,small --parts small,stack,limit --threads 1 \
        --stack 16x2048 --small-planes 64

Add ``--device cuda`` on a GPU machine. ``--markdown`` prints a Markdown table; ``--json FILE``
also writes every row. ``--image`` replaces the bundled (LZW-compressed) BBBC006 source image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------------------
# Worker side (one measurement per process)


def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _source_image() -> np.ndarray:
    """The bundled real BBBC006 defocused field, or the 2D TIFF named by ``MPT_BENCH_IMAGE``."""
    path = os.environ.get("MPT_BENCH_IMAGE")
    if path:
        import tifffile

        return tifffile.imread(path)
    from napari_mpt_deblur.data.samples import defocused_bbbc006

    return defocused_bbbc006()


def _mirrored(size_y: int, size_x: int) -> np.ndarray:
    """The real BBBC006 image mirrored (symmetric padding) to (size_y, size_x), uint16."""
    img = _source_image()
    reps_y, reps_x = -(-size_y // img.shape[0]), -(-size_x // img.shape[1])
    tiled = np.pad(img, ((0, (reps_y - 1) * img.shape[0]), (0, (reps_x - 1) * img.shape[1])), mode="symmetric")
    return np.ascontiguousarray(tiled[:size_y, :size_x])


def run_worker(spec: dict) -> dict:
    import torch

    from napari_mpt_deblur.inference.devices import tune_cpu_allocator
    from napari_mpt_deblur.inference.engine import Deblurrer, InferenceSettings
    from napari_mpt_deblur.io.images import read_image

    tune_cpu_allocator()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec["kind"] == "peak":
        return _peak_flops(spec["device"], spec.get("precision", "auto"))
    t_load = time.perf_counter()
    engine = Deblurrer(spec["model"], InferenceSettings(
        device=spec["device"], tile=spec.get("tile"), overlap=spec.get("overlap"), batch_size=spec.get("batch"),
        channels_last=spec.get("channels_last", True), pipeline=spec.get("pipeline"),
        plane_batch=spec.get("plane_batch")))
    load_s = time.perf_counter() - t_load
    m = engine.size_multiple
    warm = _mirrored(2 * m, 2 * m)
    engine.deblur_plane(warm)  # first-call overheads (allocator, kernels) out of the timing
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = {"load_s": load_s, "device": str(engine.device), "threads": torch.get_num_threads(),
              "precision": engine.settings.precision}
    kind = spec["kind"]
    t0 = time.perf_counter()
    c0 = _cpu_seconds()
    if kind == "baseline":
        pixels, tiles = 0, 0
    elif kind == "plane":
        size = spec["size"]
        img = _mirrored(size, size)
        tiles = engine.tiles_per_plane(size, size)
        t0, c0 = time.perf_counter(), _cpu_seconds()
        engine.deblur_plane(img)
        pixels = size * size
    else:  # stack streamed zarr -> zarr
        src = read_image(spec["store"])
        depth, h, w = src.shape
        tiles = depth * engine.tiles_per_plane(h, w)
        with tempfile.TemporaryDirectory(dir=spec.get("tmp")) as tmp:
            out = Path(spec["keep"]) if spec.get("keep") else Path(tmp) / "out.zarr"
            t0, c0 = time.perf_counter(), _cpu_seconds()
            engine.write_zarr(src, out)
        pixels = depth * h * w
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    seconds = time.perf_counter() - t0
    cpu_s = _cpu_seconds() - c0
    tile, overlap, batch = engine.current_tile
    result.update(seconds=seconds, cpu_s=cpu_s, megapixels=pixels / 1e6, mpix_per_s=(pixels / 1e6 / seconds) if pixels else None,
                  tiles=tiles, tile=tile, overlap=overlap, batch=batch, peak_rss_mb=_peak_rss_mb(),
                  fallbacks=engine.events)
    return result


def _peak_flops(device: str, precision: str) -> dict:
    """Peak FLOP/s of ``device``, measured: a large matrix product, best of a few (after a warm-up).

    CPU: fp32 2048^3 with the process's torch threads. CUDA: 8192^3 in bf16 (the engine's default
    precision; fp16 or fp32/TF32 when the engine runs in those).
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(precision, torch.bfloat16)
        n, reps = 8192, 10
    else:
        dtype, n, reps = torch.float32, 2048, 2
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(3 if dev.type == "cuda" else 2):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t0) / reps)
    return {"peak_flops": 2 * n**3 / best, "peak_how": f"{str(dtype).replace('torch.', '')} {n}^3 matmul on {dev}",
            "threads": torch.get_num_threads()}


def _flops_per_pixel(preset: str, tile: int) -> float:
    """Forward-pass FLOPs per pixel of one tile x tile input (matrix products, as count_flops counts)."""
    from napari_mpt_deblur.models.complexity import count_flops
    from napari_mpt_deblur.models.config import preset_config
    from napari_mpt_deblur.models.registry import build_model

    model = build_model(preset_config("mpt", preset, 1)).eval()
    return count_flops(model, (1, 1, tile, tile)) / tile**2


def _compare_stores(a: str, b: str) -> float:
    """Largest |a - b| over the stacks, relative to each plane's range in ``a``."""
    from napari_mpt_deblur.io.images import read_image

    za, zb = read_image(a).data, read_image(b).data
    worst = 0.0
    for z in range(za.shape[0]):
        pa, pb = np.asarray(za[z], dtype=np.float64), np.asarray(zb[z], dtype=np.float64)
        worst = max(worst, float(np.abs(pa - pb).max() / max(pa.max() - pa.min(), 1e-12)))
    return worst


# --------------------------------------------------------------------------------------------
# Parent side


def _make_model(tmp: Path, preset: str) -> str:
    import torch

    from napari_mpt_deblur.models.config import preset_config
    from napari_mpt_deblur.models.registry import build_model, save_model

    torch.manual_seed(0)
    model = build_model(preset_config("mpt", preset, 1))
    save_model(model, tmp / f"bench-mpt-{preset}", trained=False)
    return str(tmp / f"bench-mpt-{preset}.json")


def _make_store(tmp: Path, depth: int, size: int, width: int | None = None) -> str:
    import zarr

    width = size if width is None else width
    path = tmp / f"stack_{depth}x{size}x{width}.zarr"
    if not path.exists():
        arr = zarr.create_array(str(path), shape=(depth, size, width), chunks=(1, size, width), dtype=np.uint16)
        plane = _mirrored(size + depth, width + depth)
        for z in range(depth):  # every plane different: shifted crops of the mirrored image
            arr[z] = plane[z : z + size, depth - z : depth - z + width]
    return str(path)


def _run(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1], "wall_s": time.perf_counter() - t0}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--presets", default="tiny,paper", help="comma-separated MPT presets")
    p.add_argument("--device", default="cpu")
    p.add_argument("--plane", type=int, default=2048, help="plane side for the plane measurements")
    p.add_argument("--stack", default="16x1024", help="DEPTHxSIZE of the stack measurement")
    p.add_argument("--depths", default="4,16,64", help="stack depths for the peak-RSS measurement")
    p.add_argument("--depth-plane", type=int, default=256, help="plane side of the depth stacks")
    p.add_argument("--tile", type=int, default=None, help="tile (default: the engine's default for the device)")
    p.add_argument("--overlap", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--parts", default="planes,stack,depths",
                   help="which measurements: planes, stack, depths, small (before/after batching), limit")
    p.add_argument("--small-planes", type=int, default=64, help="planes in the 'small' measurement")
    p.add_argument("--small-size", default="520x696", help="HxW of the 'small' planes (the BBBC006 field size)")
    p.add_argument("--image", default=None, help="2D TIFF to mirror into the inputs (default: bundled BBBC006)")
    p.add_argument("--json", default=None, help="also write all rows to this JSON file")
    p.add_argument("--limit-tile", type=int, default=None,
                   help="tile side for the FLOPs-per-pixel count (default: the engine's tile, at most 512)")
    p.add_argument("--no-whole", action="store_true", help="skip the whole-plane run (memory-hungry on big planes)")
    p.add_argument("--channels-last-off", action="store_true", help="also time the tiled plane without channels_last")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per measurement")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    if args.image:
        os.environ["MPT_BENCH_IMAGE"] = str(Path(args.image).resolve())  # read by the worker processes
    depth, size = (int(v) for v in args.stack.lower().split("x"))
    limits = []
    depths = [int(v) for v in args.depths.split(",") if v.strip()]
    rows = []
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp_name:
        tmp = Path(tmp_name)
        for preset in [s.strip() for s in args.presets.split(",") if s.strip()]:
            model = _make_model(tmp, preset)
            base = {"model": model, "device": args.device, "threads": args.threads, "tmp": str(tmp),
                    "tile": args.tile, "overlap": args.overlap, "batch": args.batch}
            from napari_mpt_deblur.models.config import preset_config

            multiple = preset_config("mpt", preset, 1).size_multiple
            parts = {v.strip() for v in args.parts.split(",")}
            plan = [("baseline", {**base, "kind": "baseline"})]
            if "planes" in parts:
                plan.append((f"plane {args.plane}^2 tiled", {**base, "kind": "plane", "size": args.plane}))
                if args.channels_last_off:
                    plan.append((f"plane {args.plane}^2 tiled NCHW",
                                 {**base, "kind": "plane", "size": args.plane, "channels_last": False}))
                if not args.no_whole:
                    whole_tile = -(-args.plane // multiple) * multiple
                    plan.append((f"plane {args.plane}^2 whole", {**base, "kind": "plane", "size": args.plane,
                                                                  "tile": whole_tile, "overlap": 0}))
            if "stack" in parts:
                plan.append((f"stack {depth}x{size}x{size}",
                             {**base, "kind": "stack", "store": _make_store(tmp, depth, size)}))
            for d in (depths if "depths" in parts else []):
                plan.append((f"depth {d}x{args.depth_plane}x{args.depth_plane}",
                             {**base, "kind": "stack", "store": _make_store(tmp, d, args.depth_plane)}))
            if "small" in parts:
                sh, sw = (int(v) for v in args.small_size.lower().split("x"))
                store = _make_store(tmp, args.small_planes, sh, sw)
                n = args.small_planes
                plan.append((f"small {n}x{sh}x{sw} before", {**base, "kind": "stack", "store": store, "pipeline": False,
                                                          "batch": 1, "keep": str(tmp / f"{preset}_before.zarr")}))
                plan.append((f"small {n}x{sh}x{sw} after", {**base, "kind": "stack", "store": store, "pipeline": True,
                                                         "keep": str(tmp / f"{preset}_after.zarr")}))
            for label, spec in plan:
                print(f"[{time.strftime('%H:%M:%S')}] {preset}: {label} ...", file=sys.stderr, flush=True)
                res = _run(spec, args.timeout)
                rows.append({"preset": preset, "what": label, **res})
                print(f"    {json.dumps(res)}", file=sys.stderr, flush=True)
            if "small" in parts:
                before, after = rows[-2], rows[-1]
                if "seconds" in before and "seconds" in after:
                    after["speedup"] = before["seconds"] / after["seconds"]
                    after["max_rel_diff"] = _compare_stores(str(tmp / f"{preset}_before.zarr"),
                                                            str(tmp / f"{preset}_after.zarr"))
            if "limit" in parts:
                measured = [r for r in rows if r["preset"] == preset and r.get("mpix_per_s")]
                best = max(measured, key=lambda r: r["mpix_per_s"], default=None)
                tile = best["tile"] if best else 256
                prec = best.get("precision", "fp32") if best else "fp32"
                peak = _run({**base, "kind": "peak", "precision": prec}, args.timeout)
                # FLOPs of one tile of the size the engine used (at most 512: the counter runs a forward pass).
                side = min(tile, args.limit_tile or 512)
                fpp = _flops_per_pixel(preset, -(-side // multiple) * multiple)
                lim = {"preset": preset, "flops_per_px": fpp, "tile": tile, **peak}
                if "peak_flops" in peak:
                    lim["limit_mpix_per_s"] = peak["peak_flops"] / fpp / 1e6
                    if best:
                        lim.update(best=best["what"], best_mpix_per_s=best["mpix_per_s"],
                                   ratio=best["mpix_per_s"] / lim["limit_mpix_per_s"])
                limits.append(lim)
            if args.json:  # after every preset: a run stopped by a time limit keeps what it measured
                Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "rows": rows, "limits": limits},
                                                      indent=1, default=str))
    load1 = os.getloadavg()

    for preset in {r["preset"] for r in rows}:
        tiled = next((r for r in rows if r["preset"] == preset and r["what"] == f"plane {args.plane}^2 tiled"), None)
        whole = next((r for r in rows if r["preset"] == preset and r["what"] == f"plane {args.plane}^2 whole"), None)
        if tiled and whole and "seconds" in tiled and "seconds" in whole:
            tiled["overhead"] = tiled["seconds"] / whole["seconds"]
            tiled["overhead_cpu"] = tiled["cpu_s"] / whole["cpu_s"]

    header = ["preset", "measurement", "tile/overlap/batch", "tiles", "seconds", "CPU s", "MP/s",
              "tiled/whole (wall, CPU)", "speed-up, max diff", "peak RSS MB"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["preset"], r["what"], "-", "-", "-", "-", "-", "-", "-", f"ERROR: {r['error']}"])
            continue
        lines.append([
            r["preset"], r["what"], f"{r['tile']}/{r['overlap']}/{r['batch']}", str(r["tiles"]),
            _fmt(r["seconds"], ".1f") if r["what"] != "baseline" else "-",
            _fmt(r.get("cpu_s"), ".1f") if r["what"] != "baseline" else "-",
            _fmt(r["mpix_per_s"]),
            f"{r['overhead']:.2f}, {r['overhead_cpu']:.2f}" if "overhead" in r else "-",
            f"{r['speedup']:.2f}x, {r['max_rel_diff']:.1e}" if "speedup" in r else "-",
            _fmt(r["peak_rss_mb"], ".0f"),
        ])
    machine = (f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores, device {args.device}, "
               f"torch threads {rows[0].get('threads', '?') if rows else '?'}")
    print(f"# bench_inference: {' '.join(sys.argv[1:])}")
    print(f"# machine: {machine}; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end; "
          f"total {time.perf_counter() - t_start:.0f} s")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("| " + " | ".join("---" for _ in header) + " |")
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for line in lines:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
    if limits:
        print()
        lim_header = ["preset", "FLOPs/px", "device peak", "measured how", "limit MP/s", "best measured MP/s",
                      "ratio"]
        lim_lines = [[m["preset"], f"{m['flops_per_px'] / 1e3:.1f} k", _fmt(m.get("peak_flops", 0) / 1e9, ".1f") + " GFLOP/s",
                      m.get("peak_how", m.get("error", "-")), _fmt(m.get("limit_mpix_per_s")),
                      f"{_fmt(m.get('best_mpix_per_s'))} ({m.get('best', '-')})", _fmt(m.get("ratio"), ".2f")]
                     for m in limits]
        print("| " + " | ".join(lim_header) + " |")
        print("| " + " | ".join("---" for _ in lim_header) + " |")
        for line in lim_lines:
            print("| " + " | ".join(line) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "machine": machine, "rows": rows,
                                               "limits": limits}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
