"""The ``mpt-deblur`` command line: one entry point, a subcommand per job.

Every subcommand's options are declared here so that ``--help`` is instant; the work is done by
library functions imported inside each handler (torch and TensorFlow load only when needed).

Exit codes: 0 success, 1 error (a readable message on stderr), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

# Shared pieces, the evaluation and the training subcommands live in modules of their own (one file per
# concern, each under 500 lines); their names are re-exported here.
from ._cli_common import (  # noqa: F401
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    _float_list,
    _refuse_existing,
    _str_list,
    settings_choices,
)
from ._cli_evaluation import _add_benchmark, _add_compare, _add_evaluate
from ._cli_training import _add_calibrate, _add_finetune, _add_train


# --------------------------------------------------------------------------------------------
# info


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="parameters, FLOPs and MACs of every architecture and preset",
        description=(
            "For each architecture and preset: parameter count, FLOPs of one forward pass at "
            "1 x C x SIZE x SIZE counted by torch.utils.flop_counter.FlopCounterMode (attention "
            "products included), and multiply-accumulates of conv/linear layers only (the MPT "
            "paper's way of counting). Also lists the installed models."
        ),
    )
    p.add_argument("--arch", choices=["mpt", "h2t_unet", "all"], default="all")
    p.add_argument("--preset", choices=["paper", "small", "tiny", "all"], default="all")
    p.add_argument("--channels", type=int, default=None, help="in = out channels (default: 1 and 3)")
    p.add_argument("--size", type=int, default=256, help="input height = width for the counts")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import torch

    from .models.complexity import describe
    from .models.config import ARCHITECTURES, PRESETS
    from .models.registry import list_models, read_record, shadowed_models

    torch.set_num_threads(max(1, torch.get_num_threads()))
    archs = ARCHITECTURES if args.arch == "all" else (args.arch,)
    presets = PRESETS if args.preset == "all" else (args.preset,)
    channels = (1, 3) if args.channels is None else (args.channels,)
    rows = [describe(a, p, c, args.size).as_dict() for a in archs for p in presets for c in channels]
    models = []
    shadowed = {p for _n, p in shadowed_models()}
    for name, path, origin in list_models():
        rec = read_record(path)
        models.append({"name": name, "origin": origin, "path": str(path), "arch": rec.architecture.arch,
                       "preset": rec.architecture.preset, "trained": rec.trained,
                       "reachable_by_name": path not in shadowed})
    if args.json:
        print(json.dumps({"architectures": rows, "models": models}, indent=2))
        return EXIT_OK
    header = f"{'arch':<9} {'preset':<6} {'C':>2} {'params':>12} {'GFLOPs':>9} {'GMACs conv/linear':>18} {'pad to':>6}"
    print(f"Counts at 1 x C x {args.size} x {args.size} (FLOPs: FlopCounterMode, 2 per MAC, attention included)")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['arch']:<9} {r['preset']:<6} {r['in_channels']:>2} {r['parameters']:>12,} "
            f"{r['flops'] / 1e9:>9.2f} {r['conv_linear_macs'] / 1e9:>18.2f} {r['size_multiple']:>6}"
        )
    print()
    if models:
        print("Installed models:")
        for m in models:
            flag = "" if m["trained"] else "  (UNTRAINED)"
            if not m["reachable_by_name"]:
                flag += "  (SHADOWED by the shipped model of this name: load it by path or rename it)"
            print(f"  {m['name']:<24} {m['origin']:<8} {m['arch']}/{m['preset']}{flag}  {m['path']}")
    else:
        print("Installed models: none (the demo falls back to untrained weights)")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# demo


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="deblur the bundled real defocused BBBC006 image and write TIFF, PNG and a table",
        description=(
            "Deblurs the bundled real defocused BBBC006 image (plane z_00, about 32 um below focus) "
            "with the shipped model and writes the deblurred TIFF, a side-by-side PNG and a table."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder")
    from .models import RECOMMENDED_MODEL

    p.add_argument("--model", default=None, help=f"model name or path (default: the recommended shipped model, "
                                                  f"{RECOMMENDED_MODEL})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--no-stardist", action="store_true", help="skip the StarDist before/after step")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.out, model=args.model, device=args.device, stardist=not args.no_stardist, log=print)
    return EXIT_OK if result is not None else EXIT_ERROR


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="deblur a TIFF or zarr image/stack, tiled and lazy",
                       description="Deblur INPUT (TIFF, incl. LZW, or zarr) into OUTPUT (.tif/.tiff or .zarr).")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--model", required=True, help="model name or path")
    p.add_argument("--axes", default=None, help="axes of the input, e.g. YX, ZYX, TZYX, YXC (default: guessed)")
    p.add_argument("--tile", type=int, default=None, help="tile size in pixels (multiple of the model's size factor)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels")
    p.add_argument("--batch", type=int, default=None, help="tiles per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=settings_choices("precision"), default="auto")
    p.add_argument("--dtype", choices=settings_choices("output_dtype"), default="float32", help="output dtype")
    p.add_argument("--scheduler", default=None, help="dask.distributed scheduler address, or 'local' for a LocalCluster")
    p.add_argument("--normalisation", choices=["plane", "stack"], default="plane",
                   help="percentile range per 2D plane (default) or one range for the whole stack")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model for the tile shape (default: per device, see docs/performance.md); "
                        "falls back to eager with a warning if compiling fails")
    p.add_argument("--orientations", type=int, choices=settings_choices("orientations"), default=None,
                   help="restore every tile in 1, 4 (its flips) or 8 (flips and transposes) orientations and "
                        "average: removes a model's grid pattern and lowers the error, at 4x / 8x the time; "
                        "default: the model's own (4 for mpt-small-fluo, 1 for the others; docs/inference.md)")
    p.add_argument("--shifts", type=int, choices=settings_choices("shifts"), default=None,
                   help="with 2, also restore every orientation moved by one pixel and average: removes a "
                        "period-2 pattern that flips do not, at 2x the time; default: the model's own "
                        "(2 for mpt-tiny-fluo, 1 for the others; docs/inference.md)")
    p.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    import threading
    import time

    from pydantic import ValidationError

    from .inference.devices import tune_cpu_allocator
    from .inference.engine import Deblurrer, InferenceSettings
    from .inference.progress import Cancelled
    from .io.images import check_output, output_format, read_image

    if not args.input.exists():
        raise CommandError(f"input not found: {args.input}")
    kind = output_format(args.output)
    check_output(args.output, overwrite=args.overwrite, input_path=args.input)
    try:
        settings = InferenceSettings(tile=args.tile, overlap=args.overlap, batch_size=args.batch, device=args.device,
                                     precision=args.precision, output_dtype=args.dtype,
                                     normalisation_scope=args.normalisation, compile=args.compile,
                                     orientations=args.orientations, shifts=args.shifts)
    except ValidationError as exc:
        # Name the command-line flag, not the settings field behind it (issue 13: "--batch_size").
        flags = {"batch_size": "batch", "output_dtype": "dtype", "normalisation_scope": "normalisation"}
        raise CommandError("; ".join(f"--{flags.get(str(e['loc'][0]), str(e['loc'][0])) if e['loc'] else 'settings'}: "
                                     f"{e['msg']}" for e in exc.errors())) from None
    tune_cpu_allocator()
    engine = Deblurrer(args.model, settings)
    source = read_image(args.input, axes=args.axes, model_channels=engine.in_channels)
    layout = engine.prepare(source).layout
    tile, overlap, batch = engine.current_tile
    trained = "" if engine.record.trained else " (UNTRAINED weights)"
    print(f"{args.input}: {layout.describe()} [{source.dtype}], axes {source.axes_from}", file=sys.stderr)
    print(f"model {engine.record.name}{trained} on {engine.device}, tile {tile} overlap {overlap} batch {batch}, "
          f"precision {engine.settings.precision}{engine.settings.averaging_note}", file=sys.stderr)

    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=1, unit="tile", desc="deblur", file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    client = None
    if args.scheduler:
        from .inference.distributed import connect

        client = connect(args.scheduler)
        print(f"dask.distributed: {client}", file=sys.stderr)
    cancel = threading.Event()
    write = engine.write_zarr if kind == "zarr" else engine.write_tiff
    t0 = time.perf_counter()
    try:
        write(source, args.output, overwrite=args.overwrite, progress=progress, cancel=cancel, client=client)
    except KeyboardInterrupt:
        cancel.set()
        left = f"; {args.output} is marked incomplete" if kind == "zarr" and args.output.exists() else ""
        print(f"mpt-deblur predict: interrupted{left}", file=sys.stderr)
        raise
    except Cancelled as exc:
        raise CommandError(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
        if client is not None:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None and args.scheduler == "local":
                cluster.close()
    seconds = time.perf_counter() - t0
    mpix = layout.n_planes * layout.plane_hw[0] * layout.plane_hw[1] / 1e6
    for event in engine.events:
        print(f"note: {event}", file=sys.stderr)
    print(f"wrote {args.output} ({kind}, {engine.output_dtype(source.dtype)}) in {seconds:.1f} s "
          f"({mpix / seconds:.3f} megapixels/s)")
    return EXIT_OK


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a training run's checkpoint as a model file, or a model as a bioimage.io package",
        description=("Two formats. model (default): turn a checkpoint of `mpt-deblur train` into a standalone model "
                     "(safetensors + JSON with the training provenance) that predict, the napari widgets and finetune "
                     "load by path, or by name when written into the user model folder: "
                     "`mpt-deblur export RUN OUT`. bioimageio: write MODEL (a model name or model file) as a "
                     "bioimage.io model package (spec 0.5) for deepImageJ, ilastik, QuPath, BiaPy and bioimageio.core: "
                     "`mpt-deblur export MODEL --format bioimageio --out DIR_OR_ZIP` (needs the 'bioimageio' extra). "
                     "See docs/cli.md."),
    )
    p.add_argument("run", type=Path, metavar="SOURCE",
                   help="model: run folder (with checkpoints/) or its checkpoints folder; bioimageio: model name or path")
    p.add_argument("out", type=Path, nargs="?", default=None, metavar="OUT",
                   help="model: output path stem, e.g. ~/.local/share/napari-mpt-deblur/models/my-model")
    p.add_argument("--format", choices=("model", "bioimageio"), default="model", dest="export_format",
                   help="model (safetensors + JSON, default) or bioimageio (a model zoo package)")
    p.add_argument("--out", dest="out_option", type=Path, default=None,
                   help="output (same as the positional OUT); bioimageio: a folder, or a file ending in .zip")
    p.add_argument("--which", choices=("best", "last"), default="best", help="model format: which checkpoint")
    p.add_argument("--name", default=None, help="model format: name recorded in the file (default: the checkpoint's)")
    p.add_argument("--description", default=None, help="model format: description recorded in the file")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="model format: weight storage type (float16 halves the file)")
    p.add_argument("--no-torchscript", action="store_true",
                   help="bioimageio: only pytorch_state_dict weights (default: add torchscript when a trace matches)")
    p.add_argument("--test", action="store_true",
                   help="bioimageio: run bioimageio.core's test on the written package (offline, CPU)")
    p.add_argument("--overwrite", action="store_true", help="bioimageio: replace OUT if it exists")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    if args.out is not None and args.out_option is not None and args.out != args.out_option:
        raise CommandError(f"two outputs given ({args.out} and --out {args.out_option}); give one")
    out = args.out if args.out is not None else args.out_option
    if out is None:
        raise CommandError("no output: give OUT (or --out)")
    if args.export_format == "bioimageio":
        from .io.bioimageio import BioimageioError, export_bioimageio, run_bioimageio_test

        try:
            result = export_bioimageio(args.run, out, torchscript=not args.no_torchscript, overwrite=args.overwrite,
                                       log=lambda m: print(m, file=sys.stderr))
        except BioimageioError as exc:
            raise CommandError(str(exc)) from exc
        print(f"wrote {result.path} (bioimage.io model package; weights: {', '.join(result.weight_formats)})")
        if args.test:
            summary = run_bioimageio_test(result.path)
            print(f"bioimageio.core test: {summary.status}")
            if summary.status not in ("passed", "valid-format"):
                print(summary.format(), file=sys.stderr)
                return EXIT_ERROR
        return EXIT_OK

    from .training.checkpoint import CheckpointError, export_checkpoint

    try:
        path = export_checkpoint(args.run, out, which=args.which, name=args.name,
                                 description=args.description, dtype=args.dtype)
    except CheckpointError as exc:
        raise CommandError(str(exc)) from exc
    print(f"wrote {path} and {path.with_suffix('.safetensors').name}")
    return EXIT_OK


_COMMANDS = (_add_predict, _add_train, _add_finetune, _add_calibrate, _add_export, _add_evaluate, _add_benchmark, _add_compare,
             _add_info, _add_demo)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="mpt-deblur",
        description="Remove defocus blur from microscopy images with the Multi-Pyramid Transformer.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    formatwarning = warnings.formatwarning
    # Our own warnings (e.g. an oversized --patch) are messages for the user: one line, no source line.
    warnings.formatwarning = lambda message, category, *a, **k: (
        f"mpt-deblur {args.command}: warning: {message}\n" if category is UserWarning
        else formatwarning(message, category, *a, **k))
    try:
        return int(args.handler(args) or EXIT_OK)
    except KeyboardInterrupt:
        print("mpt-deblur: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CommandError, ValueError, FileNotFoundError, PermissionError, OSError) as exc:
        print(f"mpt-deblur {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
