"""Run a benchmark's measuring code in a fresh Python process and read back its result.

Every benchmark that must not share a process with what it compares (allocator settings, imports,
a viewer's start-up) runs ``python -c CHILD ARGS...``; the child prints its result as JSON on its
last line of output.
"""

from __future__ import annotations

import json
import subprocess
import sys


def run_child(child_source: str, *args: str, env: dict[str, str] | None = None, what: str = "benchmark child"):
    """The JSON the child printed last; exits with the child's stderr tail if it failed."""
    out = subprocess.run([sys.executable, "-c", child_source, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
