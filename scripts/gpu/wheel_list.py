"""Print the runtime packages the GPU machine lacks, as NAME==VERSION (the versions installed here).

Walks the requirements of the installed ``napari-mpt-deblur`` (no extras) through the
installed distributions' metadata, drops what the device image already has
(``device_packages.txt``) and the napari-widget-only packages, and prints the rest in
dependency order. Run with the project's venv: ``.venv/bin/python scripts/gpu/wheel_list.py``.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Needed by the napari widgets only (never imported by the library, the CLI or the benchmarks).
GUI_ONLY = {"magicgui", "qtpy", "superqt", "psygnal", "docstring-parser", "napari"}
#: The device has its own (CUDA) build; never carry these.
NEVER = {"torch", "triton", "numpy"}
#: Left behind on purpose: imagecodecs' wheel alone is 26 MB of the 64 MiB a device call may carry.
#: It only decodes LZW TIFFs; prepare.sh re-encodes the LZW images the run needs as deflate TIFFs.
SKIP = {"imagecodecs"}
#: The device: CPython 3.12 on x86-64 Linux (for requirement markers).
DEVICE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages() -> set[str]:
    lines = (HERE / "device_packages.txt").read_text().splitlines()
    return {norm(line.strip()) for line in lines if line.strip() and not line.startswith("#")}


def requirement_names(dist: metadata.Distribution) -> list[str]:
    from packaging.requirements import Requirement

    names = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(DEVICE_ENV):
            continue  # extras, other platforms, older Pythons
        names.append(norm(req.name))
    return names


def missing(root: str = "napari-mpt-deblur") -> list[tuple[str, str]]:
    have = device_packages()
    seen: dict[str, str] = {}
    order: list[str] = []

    def visit(name: str) -> None:
        if name in seen or name in have or name in GUI_ONLY or name in NEVER or name in SKIP:
            return
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            # Conditional requirement not installed here (other Python / platform): not needed.
            return
        seen[name] = dist.version
        for dep in requirement_names(dist):
            visit(dep)
        order.append(name)

    for dep in requirement_names(metadata.distribution(root)):
        visit(dep)
    return [(name, seen[name]) for name in order]


if __name__ == "__main__":
    for name, version in missing(*(sys.argv[1:2] or [])):
        print(f"{name}=={version}")
