"""Collect what run_all.sh measured into $OUT/summary.json, summary.md and benchmarks.json.

    python scripts/gpu/summarize.py SCRATCH OUT [--dry-run 0|1]

Reads SCRATCH/steps.jsonl (one line per step: name, exit code, seconds), env.json, pytest.xml,
bench_models.json, bench_inference.json, bench_training.json, run/val.csv and
compare/summary.csv, whichever exist. ``ok`` is true when every step that ran exited 0 and the
GPU tests did not fail.
"""

from __future__ import annotations

import argparse
import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _csv(path: Path) -> list[dict]:
    try:
        with path.open(encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except OSError:
        return []


def _pytest(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["cases"] = []
    for case in suite.iter("testcase"):
        state = "passed"
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                state = f"{tag}: {(el.get('message') or '')[:200]}"
        counts["cases"].append({"name": case.get("name"), "state": state, "seconds": float(case.get("time", 0))})
    return counts


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("scratch", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dry-run", default="0")
    args = ap.parse_args()
    s, out = args.scratch, args.out
    steps = [json.loads(line) for line in (s / "steps.jsonl").read_text().splitlines()] if (s / "steps.jsonl").exists() else []
    env = _json(s / "env.json") or {}
    tests = _pytest(s / "pytest.xml")
    models = _json(s / "bench_models.json")
    inference = _json(s / "bench_inference.json")
    training = _json(s / "bench_training.json")
    val = _csv(s / "run" / "val.csv")
    compare = _csv(s / "compare" / "summary.csv")
    (out / "benchmarks.json").write_text(json.dumps({"models": models, "inference": inference, "training": training},
                                                    indent=1, default=str))

    ran = [st for st in steps if st.get("rc") is not None]
    ok = bool(ran) and all(st["rc"] == 0 for st in ran) and (tests is None or tests["failures"] + tests["errors"] == 0)
    summary = {
        "ok": ok,
        "dry_run": args.dry_run == "1",
        "env": env,
        "steps": steps,
        "tests": tests,
        "inference_limits": (inference or {}).get("limits"),
        "inference_rows": [{k: r.get(k) for k in ("preset", "what", "mpix_per_s", "seconds", "tile", "batch",
                                                  "speedup", "max_rel_diff", "gpu_peak_mb", "error")}
                           for r in (inference or {}).get("rows", [])],
        "models": models,
        "training_throughput": (training or {}).get("rows") if isinstance(training, dict) else training,
        "train_validation": val,
        "train_best": max(val, key=lambda r: float(r["psnr"])) if val else None,
        "train_first": val[0] if val else None,
        "compare_test_split": compare,
        "files": sorted(p.name for p in out.iterdir()) + ["summary.json", "summary.md"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    md = [f"# GPU run summary{' (DRY RUN on CPU)' if summary['dry_run'] else ''}", ""]
    md.append(f"ok: **{ok}**; " + ", ".join(f"{k}: {v}" for k, v in env.items()))
    md += ["", "| step | exit | seconds | limit |", "| --- | --- | --- | --- |"]
    md += [f"| {st['step']} | {st.get('rc')} | {st.get('seconds')} | {st.get('limit', '-')} |" for st in steps]
    if tests:
        md += ["", f"pytest -m gpu: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                   f"{tests['skipped']} skipped"]
        md += [f"- {c['name']}: {c['state']} ({c['seconds']:.1f} s)" for c in tests["cases"]]
    if summary["inference_rows"]:
        md += ["", "| preset | measurement | Mpx/s | s | tile | batch | speed-up | max rel diff |",
               "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in summary["inference_rows"]:
            md.append(f"| {r['preset']} | {r['what']} | {_fmt(r['mpix_per_s'])} | {_fmt(r['seconds'], '.2f')} | "
                      f"{r['tile']} | {r['batch']} | {_fmt(r['speedup'], '.2f')} | {_fmt(r['max_rel_diff'], '.1e')} |")
    if summary["inference_limits"]:
        md += ["", "| preset | FLOPs/px | peak GFLOP/s (how) | limit Mpx/s | best Mpx/s | ratio |",
               "| --- | --- | --- | --- | --- | --- |"]
        for m in summary["inference_limits"]:
            md.append(f"| {m['preset']} | {m['flops_per_px']:.0f} | {_fmt(m.get('peak_flops', 0) / 1e9, '.0f')} "
                      f"({m.get('peak_how', '-')}) | {_fmt(m.get('limit_mpix_per_s'))} | "
                      f"{_fmt(m.get('best_mpix_per_s'))} | {_fmt(m.get('ratio'), '.3f')} |")
    if isinstance(models, list) and models:
        md += ["", "| model | size | median s | Mpx/s |", "| --- | --- | --- | --- |"]
        md += [f"| {r['arch']} {r['preset']} | {r['size']} | {r['median_s']:.4f} | {r['size'] ** 2 / 1e6 / r['median_s']:.2f} |"
               for r in models]
    thr = summary["training_throughput"]
    if isinstance(thr, list) and thr:
        md += ["", "| training | patch x batch | s/step | patches/s | GPU peak GiB |", "| --- | --- | --- | --- | --- |"]
        md += [f"| {r.get('arch')} {r.get('preset')} {r.get('mode')} | {r.get('patch')} x {r.get('batch')} | "
               f"{_fmt(r.get('s_per_step'))} | {_fmt(r.get('patches_per_s'), '.1f')} | {_fmt(r.get('gpu_peak_gib'), '.2f')} |"
               for r in thr]
    if val:
        b, f = summary["train_best"], summary["train_first"]
        md += ["", f"Training (warm-started from mpt-small-fluo): {len(val)} validations; first at step {f['step']}: "
                   f"{float(f['psnr']):.2f} dB; best at step {b['step']}: {float(b['psnr']):.2f} dB "
                   f"(input {float(b['input_psnr']):.2f} dB)."]
    if compare:
        cols = [c for c in compare[0] if c in ("method", "defocus_um", "psnr", "ssim", "psnr_mean", "ssim_mean")] or list(compare[0])[:6]
        md += ["", "Test split (U2OS, synthetic defocus):", "", "| " + " | ".join(cols) + " |",
               "| " + " | ".join("---" for _ in cols) + " |"]
        md += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in compare]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
