"""Guards on the package's shape (docs/architecture.md): layering, import cycles, module sizes.

These tests read the source with :mod:`ast` and import nothing from the package, so they run in
well under a second and say exactly which line breaks a rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "napari_mpt_deblur"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE

#: GUI toolkits the library must never import (top-level package names).
GUI_PACKAGES = {"napari", "qtpy", "magicgui", "superqt", "vispy", "PyQt5", "PyQt6", "PySide2", "PySide6"}

#: The napari layer: the modules napari.yaml points at (widgets and sample-data loaders). They
#: may import napari and Qt; everything else is the library.
NAPARI_LAYER_PREFIXES = ("_widget",)
NAPARI_LAYER_MODULES = {"_sample_data"}

#: Modules over the size limit today, with the most lines each may have. The list must only
#: shrink: a module that drops under the limit must leave it (the test says so), and none may grow
#: past its cap.
SIZE_LIMIT = 500
SIZE_ALLOW: dict[str, int] = {}  # empty: every module is within the limit; keep it so

#: Import cycles that exist today when function-level imports count too; each must go, and the
#: test fails when one listed here no longer exists (so the list only shrinks).
CYCLE_ALLOW: set[frozenset[str]] = set()


#: The layers of docs/architecture.md: a module may import modules of its own layer or below, at
#: any level (function-level imports too). Exact names win over ``prefix.*`` patterns; every
#: module must be placed (a new module needs a layer, here and in the docs).
LAYERS: dict[int, list[str]] = {
    # 0 foundation: schemas and pure helpers (no network code, no file formats beyond atomic writes)
    0: ["", "_version", "data", "evaluation", "inference", "io", "models", "training", "losses", "losses.*",
        "io.atomic", "io.cache", "io.axes", "io.paths", "io.run_record",
        "inference.settings", "inference.devices", "inference.progress", "inference.tiling",
        "data.normalisation", "data.psf", "data.psf_bank", "data.splits", "data.synthesis", "data.device_synthesis",
        "data.optics", "data.sources", "evaluation.metrics", "evaluation.matching", "evaluation.spectral", "evaluation.classical",
        "evaluation.sharpness", "evaluation.stardist_process", "models.config", "models.layers"],
    # 1 formats and models: image files, model files and networks, datasets, StarDist
    1: ["io.images", "io.bioimageio_package", "data.samples", "data.loaders", "data.datasets", "data.validation_pairs",
        "data.builders",
        "models.mpt", "models.h2t_unet", "models.record", "models.registry", "models.complexity", "models.phase_tying",
        "evaluation.stardist_runner"],
    # 2 the inference engine
    2: ["inference.*"],
    # 3 applications of the engine and the models: training, evaluation apps, model/metadata importers, demo
    3: ["training.*", "evaluation.compare", "evaluation.benchmark", "evaluation.benchmark_methods",
        "evaluation.benchmark_report", "io.bioimageio", "io.bioimageio_tensors",
        "io.bioimageio_arch", "io.optics_metadata", "demo"],
    # 4 front ends
    4: ["cli", "_cli*", "_widget*", "_sample_data"],
}

#: (importer, imported) pairs allowed to go up a layer; each must still exist (the list only shrinks).
LAYER_EXCEPTIONS: set[tuple[str, str]] = set()


def _layer(name: str) -> int | None:
    for layer, names in LAYERS.items():
        if name in names:
            return layer
    for layer, names in LAYERS.items():
        for pattern in names:
            if pattern.endswith("*") and name.startswith(pattern[:-1]) and name != pattern[:-2]:
                return layer
    return None


def _modules() -> dict[str, Path]:
    """Dotted module name relative to the package ('' for the package itself) -> file."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_napari_layer(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return "." not in name and (leaf.startswith(NAPARI_LAYER_PREFIXES) or leaf in NAPARI_LAYER_MODULES)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:`` (never executed, so they do not count)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                skip.update(id(n) for n in ast.walk(node))
    return skip


def _imports(name: str, path: Path, module_level_only: bool) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of each import in a module; for ``from x import y`` both x and
    x.y are listed (y may be a submodule).

    module_level_only: only statements executed at import time (top level, including the bodies
    of top-level ``if``/``try``), not imports inside functions or methods."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skip = _type_checking_nodes(tree)
    if module_level_only:
        nodes = []
        for stmt in tree.body:
            if isinstance(stmt, (ast.If, ast.Try)):
                nodes.extend(n for n in ast.walk(stmt) if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
            else:
                nodes.append(stmt)
    else:
        nodes = list(ast.walk(tree))
    is_package = path.name == "__init__.py"
    here = [PACKAGE] + (name.split(".") if name else [])
    if not is_package:
        here = here[:-1]
    out: list[tuple[int, str]] = []
    for node in nodes:
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            out.extend((node.lineno, f"{target}.{alias.name}") for alias in node.names)
    return out


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    """Package-internal import graph: module -> modules it imports (names relative to the package)."""
    prefix = PACKAGE + "."
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps = set()
        for _, target in _imports(name, path, module_level_only):
            if target.startswith(prefix) and target[len(prefix):] in MODULES and target[len(prefix):] != name:
                deps.add(target[len(prefix):])
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(frozenset(component))
    return found


def test_modules_found():
    # The guards below are only as good as the module list: make sure it sees the package.
    assert "inference.engine" in MODULES or "inference" in MODULES
    assert "_widget_deblur" in MODULES and _is_napari_layer("_widget_deblur")
    # A widget's Qt-free helpers in a module of their own are still the napari layer (front ends).
    assert "_widget_calibrate_optics" in MODULES and _is_napari_layer("_widget_calibrate_optics")
    assert _layer("_widget_calibrate_optics") == 4
    assert not _is_napari_layer("inference.engine")
    assert len(MODULES) > 40


def test_library_never_imports_gui_toolkits():
    """No library module imports napari, Qt, magicgui, superqt or vispy, at any level (inside
    functions too): the library must run headless on a cluster node without a GUI stack."""
    offences = []
    for name, path in MODULES.items():
        if _is_napari_layer(name):
            continue
        for line, target in _imports(name, path, module_level_only=False):
            if target.split(".")[0] in GUI_PACKAGES:
                offences.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert offences == [], "library modules import GUI toolkits:\n" + "\n".join(sorted(set(offences)))


def test_no_import_cycles_at_module_level():
    """No cycle between the package's modules counting the imports that run at import time (top
    level, including top-level ``if``/``try`` bodies; ``if TYPE_CHECKING:`` blocks excluded).

    Function-level imports are excluded here because Python resolves them only when the function
    runs; they are checked separately (with an allow-list that must shrink) in
    ``test_import_cycles_with_function_level_imports_only_shrink``."""
    cycles = _cycles(_graph(module_level_only=True))
    assert cycles == [], "module-level import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def test_import_cycles_with_function_level_imports_only_shrink():
    """Counting function-level imports too (lazy imports of torch-heavy siblings), cycles are a
    layering smell: the only ones allowed are listed in CYCLE_ALLOW, and each listed one must still
    exist (remove it from the list once fixed)."""
    cycles = set(_cycles(_graph(module_level_only=False)))
    new = cycles - CYCLE_ALLOW
    gone = CYCLE_ALLOW - cycles
    assert not new, "new import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in new)
    assert not gone, "fixed cycles still allow-listed (remove them): " + "; ".join(
        " <-> ".join(sorted(c)) for c in gone
    )


def _sizes() -> list[tuple[int, str]]:
    sizes = []
    for path in ROOT.rglob("*.py"):
        with path.open(encoding="utf-8") as handle:
            sizes.append((sum(1 for _ in handle), path.relative_to(ROOT).as_posix()))
    return sorted(sizes, reverse=True)


def test_module_sizes(capsys: pytest.CaptureFixture[str]):
    """No module over SIZE_LIMIT lines except the allow-listed ones, which may not grow past their
    cap and must leave the list once under the limit. Prints every size, largest first (-s)."""
    sizes = _sizes()
    with capsys.disabled():
        print("\nmodule sizes (lines, largest first):")
        for lines, rel in sizes:
            print(f"{lines:6d}  {rel}")
    too_big = [f"{rel} ({lines} lines)" for lines, rel in sizes if lines > SIZE_LIMIT and rel not in SIZE_ALLOW]
    grew = [f"{rel} ({lines} > cap {SIZE_ALLOW[rel]})" for lines, rel in sizes if rel in SIZE_ALLOW and lines > SIZE_ALLOW[rel]]
    present = {rel: lines for lines, rel in sizes}
    shrunk = [rel for rel in SIZE_ALLOW if present.get(rel, 0) <= SIZE_LIMIT]
    assert not too_big, f"modules over {SIZE_LIMIT} lines: {too_big}"
    assert not grew, f"allow-listed modules grew past their cap: {grew}"
    assert not shrunk, f"now under {SIZE_LIMIT} lines (or gone): remove from SIZE_ALLOW: {shrunk}"


def test_every_module_has_a_layer_and_imports_only_its_layer_or_below():
    """The layering of docs/architecture.md, checked on every import (module- and function-level)."""
    unplaced = [name for name in MODULES if _layer(name) is None]
    assert unplaced == [], f"modules without a layer (add them to LAYERS and docs/architecture.md): {unplaced}"
    upward = set()
    for name, deps in _graph(module_level_only=False).items():
        for dep in deps:
            if _layer(dep) > _layer(name):
                upward.add((name, dep))
    new = sorted(upward - LAYER_EXCEPTIONS)
    assert new == [], "imports that go up a layer: " + "; ".join(
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})" for a, b in new)
    assert LAYER_EXCEPTIONS <= upward, f"fixed exceptions still listed (remove them): {LAYER_EXCEPTIONS - upward}"
