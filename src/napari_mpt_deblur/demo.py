"""The README's first command: deblur the bundled real defocused image and show the result.

Writes into ``out_dir``: ``deblurred.tif`` (input dtype, settings in the TIFF description),
``side_by_side.png`` and ``summary.md`` / ``summary.csv``. Every file is written atomically.
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

DEFAULT_DEMO_MODEL = "mpt-small-fluo"


@dataclass
class DemoResult:
    out_dir: Path
    model_name: str
    trained: bool
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)


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


def _side_by_side_png(before: np.ndarray, after: np.ndarray, title_after: str, banner: str | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .data.normalisation import percentile_range

    lo, hi = percentile_range(before, 0.1, 99.9)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=100)
    for ax, img, title in zip(axes, (before, after), ("input: real defocused BBBC006 (z_00)", title_after)):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    if banner:
        fig.suptitle(banner, color="red", fontsize=13, fontweight="bold")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def run_demo(
    out_dir: str | Path = "demo_output",
    model: str | None = None,
    device: str = "auto",
    stardist: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    import tifffile

    from .data.samples import DEFOCUSED_BBBC006, defocused_bbbc006
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

    settings = {**engine.metadata(), "source": DEFOCUSED_BBBC006.name}
    files = {
        "tiff": out_dir / "deblurred.tif",
        "png": out_dir / "side_by_side.png",
        "markdown": out_dir / "summary.md",
        "csv": out_dir / "summary.csv",
    }
    write_with(files["tiff"], lambda p: tifffile.imwrite(p, restored, description=json.dumps(settings), compression="zlib"))
    banner = None if record.trained else "UNTRAINED WEIGHTS: no trained model installed; this is not a deblurring result"
    png = _side_by_side_png(image, restored, f"deblurred: {record.name}", banner)
    write_with(files["png"], lambda p: p.write_bytes(png))

    s_in, s_out = sharpness(image), sharpness(restored)
    table = [{"image": "input", **s_in, "seconds": ""}, {"image": f"deblurred ({record.name})", **s_out, "seconds": f"{seconds:.2f}"}]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    write_text_atomic(files["csv"], buf.getvalue())
    md = ["| image | NVL (LoG var / mean) | Brenner | Vollath F4 | seconds |", "| --- | --- | --- | --- | --- |"]
    md += [f"| {r['image']} | {r['nvl']:.4g} | {r['brenner']:.4g} | {r['vollath_f4']:.4g} | {r['seconds']} |" for r in table]
    note = "" if record.trained else "\n**UNTRAINED WEIGHTS**: no trained model is installed; these numbers do not show deblurring.\n"
    write_text_atomic(files["markdown"], "# napari-mpt-deblur demo\n" + note + "\n" + "\n".join(md) + "\n")
    for kind, path in files.items():
        log(f"wrote {path}")
    return DemoResult(out_dir=out_dir, model_name=record.name, trained=record.trained, seconds=seconds, files=files, table=table)
