"""benchmarks/bench_mpt_revision.py: our MPT at a git revision, loaded beside today's for a
before/after timing; the two must compute the same function when the code is the same."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _git_head_has_mpt() -> bool:
    out = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", "HEAD:src/napari_mpt_deblur/models/mpt.py"],
                         capture_output=True)
    return out.returncode == 0


@pytest.mark.skipif(not _git_head_has_mpt(), reason="needs a git checkout (the benchmark reads git history)")
def test_revision_benchmark_times_both_and_reports_their_difference():
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_mpt_revision.py", "--rev", "HEAD", "--presets", "tiny",
         "--sizes", "64x128", "--repeats", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith("| tiny | 64x128 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 7 and cells[5].endswith("x")
    # HEAD's mpt.py and the working tree's compute the same function (equal, or within the
    # rounding of a speed change not yet committed).
    assert float(cells[6]) <= 1e-5


def test_revision_benchmark_names_a_revision_git_does_not_know():
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_mpt_revision.py", "--rev", "no-such-revision-xyz", "--presets", "tiny"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "git show no-such-revision-xyz:src/napari_mpt_deblur/models/mpt.py failed" in out.stderr
