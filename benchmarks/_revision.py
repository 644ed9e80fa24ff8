"""Our MPT module as it was at another git revision, to time before and after in one process.

:func:`mpt_source_at` (parent process) writes ``src/napari_mpt_deblur/models/mpt.py`` of a git
revision to a temporary file; :data:`LOAD_AT_REVISION` (child process source) imports that file
as ``napari_mpt_deblur.models._mpt_at_revision``, so its relative imports (``.config``,
``.layers``) resolve to today's package. Only revisions whose ``mpt.py`` builds from today's
config and layers and loads today's state dict work: parameter names have not changed since
issue 16.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MPT_PATH = "src/napari_mpt_deblur/models/mpt.py"

#: Child-process source: defines ``mpt_at_revision(path)`` -> the imported module.
LOAD_AT_REVISION = r"""
def mpt_at_revision(path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("napari_mpt_deblur.models._mpt_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
"""


def mpt_source_at(revision: str) -> str:
    """Path of a temporary copy of ``mpt.py`` at ``revision``; exits with git's message if it has none."""
    out = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:{MPT_PATH}"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"git show {revision}:{MPT_PATH} failed: {out.stderr.strip()}")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", revision],
                            capture_output=True, text=True).stdout.strip()
    handle = tempfile.NamedTemporaryFile("w", suffix=f"_mpt_{commit}.py", delete=False)
    with handle:
        handle.write(out.stdout)
    return handle.name
