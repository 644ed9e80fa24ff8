"""scripts/gpu: the one-shot GPU run must not rot between GPU sessions.

``run_all.sh --dry-run`` runs every step of the GPU run (GPU tests, the three benchmarks, a
time-budgeted training warm-started from the shipped model, fp16 export, comparison, summary)
on the CPU with tiny sizes; ``wheel_list.py`` decides what prepare.sh carries to the device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLANNED = {"log.txt", "summary.json", "summary.md", "benchmarks.json", "val.csv", "mpt-small-fluo-gpu.json",
           "mpt-small-fluo-gpu.safetensors"}


def test_wheel_list_carries_our_missing_runtime_packages_and_nothing_the_device_has():
    sys.path.insert(0, str(REPO / "scripts" / "gpu"))
    try:
        import wheel_list
    finally:
        sys.path.pop(0)
    names = {name for name, _ in wheel_list.missing()}
    assert {"pydantic", "pydantic-core", "dask", "distributed", "zarr", "pywavelets", "psfmodels"} <= names
    device = wheel_list.device_packages()
    assert {"torch", "numpy", "scipy", "tifffile", "safetensors"} <= device
    assert not names & device, "a package the device has would be carried"
    assert not names & {"magicgui", "qtpy", "napari", "torch", "numpy", "imagecodecs"}


@pytest.mark.slow
def test_run_all_dry_run_passes_on_the_cpu_and_writes_only_the_planned_files(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "scripts/gpu/run_all.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=420)
    seconds = time.perf_counter() - t0
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else proc.stderr
    assert proc.returncode == 0, log[-4000:]
    files = {p.name for p in out.iterdir()}
    assert files == PLANNED, files ^ PLANNED
    assert all((out / f).stat().st_size < 16 * 2**20 for f in files), "a returned file must be under 16 MiB"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["dry_run"]
    ran = {s["step"]: s["rc"] for s in summary["steps"]}
    assert ran == {"env": 0, "pytest": 0, "models": 0, "inference": 0, "training": 0, "train": 0, "export": 0,
                   "compare": 0}, ran
    assert summary["tests"]["skipped"] == summary["tests"]["tests"] == 5  # no CUDA here: skipped, not failed
    assert summary["inference_limits"][0]["ratio"] > 0
    assert summary["train_best"] is not None and float(summary["train_best"]["psnr"]) > 0
    from napari_mpt_deblur.models.registry import load_model

    model = load_model(out / "mpt-small-fluo-gpu.json")
    assert model.record.name == "mpt-small-fluo-gpu"
    assert "fp16" in (out / "mpt-small-fluo-gpu.json").read_text().lower() or \
        "float16" in (out / "mpt-small-fluo-gpu.json").read_text().lower()
    assert seconds < 300, f"the dry run took {seconds:.0f} s (budget: 5 minutes)"
