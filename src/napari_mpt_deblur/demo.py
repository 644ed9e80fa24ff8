"""The README's first command: deblur the bundled real defocused image and show the result.

Writes into ``out_dir``: ``deblurred.tif`` (input dtype, settings in the TIFF description),
``side_by_side.png`` (input and result, StarDist outlines drawn) and ``summary.md`` /
``summary.csv`` (StarDist nuclei counts, no-reference sharpness, time). Every file is written
atomically. StarDist is skipped, with a message, when it is not installed.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .io.atomic import write_text_atomic, write_with
from .models import RECOMMENDED_MODEL as DEFAULT_DEMO_MODEL


@dataclass
class DemoResult:
    out_dir: Path
    model_name: str
    trained: bool
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)
    #: StarDist nuclei (before, after); None when StarDist was skipped.
    nuclei: tuple[int, int] | None = None


def _demo_model(name: str | None, device, log: Callable[[str], None]):
    """The requested model, else the shipped default, else untrained weights (said loudly)."""
    import torch

    from .models.config import preset_config
    from .models.registry import LoadedModel, ModelRecord, build_model, list_models, load_model

    if name is not None:
        return load_model(name, device=device)
    shipped = {n: p for n, p, origin in list_models() if origin == "shipped"}
    if DEFAULT_DEMO_MODEL in shipped:
        return load_model(shipped[DEFAULT_DEMO_MODEL], device=device)
    log("WARNING: no trained model is installed; using UNTRAINED random weights (MPT tiny, seed 0).")
    log("         The output shows the pipeline working, not deblurring.")
    torch.manual_seed(0)
    config = preset_config("mpt", "tiny", 1)
    model = build_model(config).eval().to(device)
    record = ModelRecord(name="untrained-mpt-tiny", architecture=config, trained=False)
    return LoadedModel(model=model, record=record, path=None)


def outline_overlay(labels: np.ndarray, rgba: tuple[float, float, float, float] = (1.0, 0.85, 0.0, 1.0)) -> np.ndarray:
    """(H, W, 4) float32 image: the inner outline of every labelled object in ``rgba``, transparent
    elsewhere; drawn with ``imshow`` over an image to show segmentations."""
    from skimage.segmentation import find_boundaries

    edges = find_boundaries(labels, mode="inner")
    overlay = np.zeros((*edges.shape, 4), dtype=np.float32)
    overlay[edges] = rgba
    return overlay


def _side_by_side_png(before: np.ndarray, after: np.ndarray, titles: tuple[str, str], banner: str | None,
                      labels: tuple[np.ndarray, np.ndarray] | None = None) -> bytes:
    """Input and result on the same display range, StarDist outlines drawn when given."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .data.normalisation import percentile_range

    lo, hi = percentile_range(before, 0.1, 99.9)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.9), dpi=100)
    for i, (ax, img, title) in enumerate(zip(axes, (before, after), titles)):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        if labels is not None:
            ax.imshow(outline_overlay(labels[i]), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    if banner:
        fig.suptitle(banner, color="red", fontsize=13, fontweight="bold")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _stardist_labels(images: tuple[np.ndarray, np.ndarray], log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray] | None:
    """StarDist (the shipped U2OS nuclei model) on input and result; None when it is not installed."""
    from .evaluation.stardist_runner import is_available, load_stardist, missing_packages, segment

    if not is_available():
        log(f"StarDist skipped: missing {', '.join(missing_packages())} (pip install 'napari-mpt-deblur[stardist]')")
        return None
    model = load_stardist()
    log(f"StarDist: {model.source.describe()}")
    return segment(images[0], model), segment(images[1], model)


def run_demo(
    out_dir: str | Path = "demo_output",
    model: str | None = None,
    device: str = "auto",
    stardist: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    import tifffile

    from .data.samples import DEFOCUSED_BBBC006, defocused_bbbc006
    from .evaluation.matching import count_objects
    from .evaluation.sharpness import sharpness
    from .inference.devices import select_device, tune_cpu_allocator
    from .inference.engine import Deblurrer, InferenceSettings

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tune_cpu_allocator()
    dev = select_device(device)
    loaded = _demo_model(model, dev, log)
    record = loaded.record
    image = defocused_bbbc006()
    log(f"input: {DEFOCUSED_BBBC006.name} {image.shape} {image.dtype}; model: {record.name} on {dev}")

    # The inference engine (per-image percentile normalisation, inverted back to uint16); one tile
    # covering the whole 520 x 696 image, as the model sees it in training-free use.
    multiple = record.architecture.size_multiple
    whole = -(-max(image.shape) // multiple) * multiple
    engine = Deblurrer(loaded, InferenceSettings(device=str(dev), tile=whole, output_dtype="input"))
    t0 = time.perf_counter()
    restored = engine.deblur_plane(image)
    seconds = time.perf_counter() - t0
    log(f"deblurred in {seconds:.2f} s")

    labels = _stardist_labels((image, restored), log) if stardist else None
    counts = (count_objects(labels[0]), count_objects(labels[1])) if labels is not None else None
    if counts is not None:
        log(f"StarDist nuclei: {counts[0]} before, {counts[1]} after deblurring")

    settings = {**engine.metadata(), "source": DEFOCUSED_BBBC006.name}
    files = {
        "tiff": out_dir / "deblurred.tif",
        "png": out_dir / "side_by_side.png",
        "markdown": out_dir / "summary.md",
        "csv": out_dir / "summary.csv",
    }
    write_with(files["tiff"], lambda p: tifffile.imwrite(p, restored, description=json.dumps(settings), compression="zlib"))
    banner = None if record.trained else "UNTRAINED WEIGHTS: no trained model installed; this is not a deblurring result"
    found = ("", "") if counts is None else (f", StarDist: {counts[0]} nuclei", f", StarDist: {counts[1]} nuclei")
    titles = (f"input: real defocused BBBC006 z_00{found[0]}", f"deblurred: {record.name} ({seconds:.1f} s){found[1]}")
    png = _side_by_side_png(image, restored, titles, banner, labels)
    write_with(files["png"], lambda p: p.write_bytes(png))

    s_in, s_out = sharpness(image), sharpness(restored)
    table = [
        {"image": "input (defocused z_00)", "nuclei": counts[0] if counts else "", **s_in, "seconds": ""},
        {"image": f"deblurred ({record.name})", "nuclei": counts[1] if counts else "", **s_out, "seconds": f"{seconds:.2f}"},
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    write_text_atomic(files["csv"], buf.getvalue())
    md = ["| image | StarDist nuclei | NVL (LoG var / mean) | Brenner | Vollath F4 | seconds |",
          "| --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['image']} | {r['nuclei']} | {r['nvl']:.4g} | {r['brenner']:.4g} | {r['vollath_f4']:.4g} | {r['seconds']} |"
           for r in table]
    note = "" if record.trained else "\n**UNTRAINED WEIGHTS**: no trained model is installed; these numbers do not show deblurring.\n"
    how = ("\nNuclei: the shipped StarDist model (U2OS, see docs/stardist.md). Sharpness: no-reference measures, "
           "larger is sharper (docs/benchmarks.md). There is no ground truth for this real image.\n")
    write_text_atomic(files["markdown"], "# napari-mpt-deblur demo\n" + note + "\n" + "\n".join(md) + "\n" + how)
    for kind, path in files.items():
        log(f"wrote {path}")
    return DemoResult(out_dir=out_dir, model_name=record.name, trained=record.trained, seconds=seconds, files=files,
                      table=table, nuclei=counts)
