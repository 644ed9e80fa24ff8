"""The ``mpt-deblur`` command line: one entry point, a subcommand per job.

Every subcommand's options are declared here so that ``--help`` is instant; the work is done by
library functions imported inside each handler (torch and TensorFlow load only when needed).

Exit codes: 0 success, 1 error (a readable message on stderr), 2 usage error, 3 not implemented
in this version, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_IMPLEMENTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class CommandError(Exception):
    """An error whose message is meant for the user as is (no traceback)."""


class NotImplementedCommand(CommandError):
    pass


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


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
    from .models.registry import list_models, read_record

    torch.set_num_threads(max(1, torch.get_num_threads()))
    archs = ARCHITECTURES if args.arch == "all" else (args.arch,)
    presets = PRESETS if args.preset == "all" else (args.preset,)
    channels = (1, 3) if args.channels is None else (args.channels,)
    rows = [describe(a, p, c, args.size).as_dict() for a in archs for p in presets for c in channels]
    models = []
    for name, path, origin in list_models():
        rec = read_record(path)
        models.append({"name": name, "origin": origin, "path": str(path), "arch": rec.architecture.arch,
                       "preset": rec.architecture.preset, "trained": rec.trained})
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
    p.add_argument("--model", default=None, help="model name or path (default: the shipped MPT)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--no-stardist", action="store_true", help="skip the StarDist before/after step")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.out, model=args.model, device=args.device, stardist=not args.no_stardist, log=print)
    return EXIT_OK if result is not None else EXIT_ERROR


# --------------------------------------------------------------------------------------------
# Subcommands whose engines arrive with later issues: declared now so --help documents them.


def _not_yet(issue: int) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        raise NotImplementedCommand(f"'{args.command}' is not implemented in this version yet (tracked in issue {issue})")

    return handler


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
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    p.add_argument("--dtype", choices=["float32", "input"], default="float32", help="output dtype")
    p.add_argument("--scheduler", default=None, help="dask.distributed scheduler address, or 'local' for a LocalCluster")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(handler=_not_yet(4))


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML/JSON config (EFCR, resumable)",
                       description="Train a model; run under torchrun for multi-GPU with the same command.")
    p.add_argument("--config", type=Path, required=True, help="training config (YAML or JSON)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: from the config)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run folder")
    p.set_defaults(handler=_not_yet(3))


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model with EFCRex on unlabeled images",
                       description="Fine-tune MODEL on unlabeled images (EFCRex), labeled batches from a synthetic paired set.")
    p.add_argument("--model", required=True, help="starting model name or path")
    p.add_argument("--unlabeled", type=Path, required=True, help="folder of unlabeled (blurry) images")
    p.add_argument("--sharp", type=Path, default=None, help="folder of sharp images for synthetic labeled pairs")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", type=Path, required=True, help="where to save the fine-tuned model (stem or .safetensors)")
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=_not_yet(3))


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="PSNR/SSIM/sharpness of restored images against references")
    p.add_argument("--pred", type=Path, required=True, help="folder of restored images")
    p.add_argument("--ref", type=Path, default=None, help="folder of sharp references (same names)")
    p.add_argument("--out", type=Path, default=None, help="CSV to write")
    p.set_defaults(handler=_not_yet(6))


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="synthetic-defocus benchmark: PSNR, SSIM, StarDist AP, speed")
    p.add_argument("--sharp", type=Path, required=True, help="folder of sharp images")
    p.add_argument("--labels", type=Path, default=None, help="folder of ground-truth labels (same names)")
    p.add_argument("--defocus", type=_float_list, default=[2.0, 4.0, 8.0, 12.0], help="defocus values in um")
    p.add_argument("--na", type=float, default=0.45)
    p.add_argument("--wavelength", type=float, default=0.461, help="emission wavelength in um")
    p.add_argument("--pixel", type=float, default=0.645, help="pixel size in um")
    p.add_argument("--methods", type=_str_list, default=["input", "rl", "wiener"], help="comma-separated methods")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(handler=_not_yet(6))


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="StarDist nuclei before/after deblurring, with matching against labels")
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    p.add_argument("--labels", type=Path, default=None, help="ground-truth label image")
    p.add_argument("--stardist-model", default=None, help="registered name, local folder, or shipped (default)")
    p.add_argument("--out", type=Path, default=None, help="CSV to write")
    p.set_defaults(handler=_not_yet(6))


_COMMANDS = (_add_predict, _add_train, _add_finetune, _add_evaluate, _add_benchmark, _add_compare, _add_info, _add_demo)


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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or EXIT_OK)
    except KeyboardInterrupt:
        print("mpt-deblur: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NotImplementedCommand as exc:
        print(f"mpt-deblur: {exc}", file=sys.stderr)
        return EXIT_NOT_IMPLEMENTED
    except (CommandError, ValueError, FileNotFoundError, PermissionError, OSError) as exc:
        print(f"mpt-deblur {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
