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
    p.add_argument("--normalisation", choices=["plane", "stack"], default="plane",
                   help="percentile range per 2D plane (default) or one range for the whole stack")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model for the tile shape (default: per device, see docs/performance.md); "
                        "falls back to eager with a warning if compiling fails")
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
                                     normalisation_scope=args.normalisation, compile=args.compile)
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
          f"precision {engine.settings.precision}", file=sys.stderr)

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


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML/JSON config (EFCR, resumable)",
                       description="Train a model; run under torchrun for multi-GPU with the same command "
                                   "(torchrun --nproc_per_node N -m napari_mpt_deblur.cli train --config ...). "
                                   "See docs/training.md for the config reference.")
    p.add_argument("--config", type=Path, required=True, help="training config (YAML or JSON)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: from the config)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run folder")
    p.add_argument("--steps", type=int, default=None, help="override the config's total steps")
    p.add_argument("--device", default=None, help="override the config's device (auto, cpu, cuda, cuda:N, mps)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="train for this long instead of a number of steps: the schedule is laid over the steps that "
                        "fit, and the run validates, checkpoints and exports its best model before the time is up")
    p.add_argument("--init-from", default=None, metavar="MODEL",
                   help="start from this model's weights (a shipped or user model name, or a path) with a fresh "
                        "optimiser; its architecture is used")
    p.add_argument("--batch-size", type=int, default=None, help="override the config's batch size (per process)")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="split each batch into N micro-batches (same update, 1/N of the activation memory)")
    p.add_argument("--checkpointing", action="store_true",
                   help="recompute activations per block in the backward pass (less memory, ~1/3 more compute)")
    p.add_argument("--num-workers", default=None, help="data-loading workers: a number or auto")
    p.add_argument("--estimate-memory", action="store_true",
                   help="print the measured activation memory per sample of this config at its patch size "
                        "(with and without --checkpointing) and exit without training")
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .inference.devices import tune_cpu_allocator
    from .training.checkpoint import CheckpointError
    from .training.config import ConfigError, load_config, parse_config
    from .training.trainer import train

    tune_cpu_allocator()
    try:
        config = load_config(args.config)
        update = {k: v for k, v in (("out_dir", args.out), ("steps", args.steps), ("device", args.device),
                                    ("time_budget_minutes", args.time_budget), ("batch_size", args.batch_size),
                                    ("grad_accum", args.grad_accum), ("num_workers", args.num_workers))
                  if v is not None}
        if args.checkpointing:
            update["checkpointing"] = True
        raw = config.model_dump()
        if args.init_from is not None:
            raw["model"] = {**raw["model"], "init": args.init_from}
        if update or args.init_from is not None:
            config = parse_config({**raw, **update}, str(args.config))
        if args.estimate_memory:
            from .training.memory import format_estimates, estimate_config

            print(format_estimates(estimate_config(config)))
            return EXIT_OK
        result = train(config, resume=args.resume)
    except (ConfigError, CheckpointError) as exc:
        raise CommandError(str(exc)) from exc
    if result.model_path is not None:
        state = "finished" if result.completed else "stopped"
        print(f"{state} after {result.steps_done} steps; model: {result.model_path}")
        if result.best:
            print(f"best validation PSNR {result.best['psnr']:.2f} dB at step {result.best['step']} "
                  f"(input {result.best['input_psnr']:.2f} dB)")
    return EXIT_OK


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model with EFCRex on unlabeled images",
                       description="Fine-tune MODEL on unlabeled images (EFCRex), labeled batches from a synthetic paired set.")
    p.add_argument("--model", required=True, help="starting model name or path")
    p.add_argument("--unlabeled", type=Path, required=True, help="folder of unlabeled (blurry) images")
    p.add_argument("--sharp", type=Path, default=None,
                   help="folder of sharp images for synthetic labeled pairs (default: the bundled in-focus BBBC006 image)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--patch", type=int, default=128, help="patch side in pixels (rounded up to the model's size factor)")
    p.add_argument("--beta", type=float, default=None, help="weight of the EFCRex term (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True,
                   help="model name (saved in the user model folder, then usable as --model NAME anywhere) "
                        "or a file path (stem or .safetensors); shipped model names are refused")
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .data.datasets import load_images
    from .inference.devices import tune_cpu_allocator
    from .models.registry import ModelNameError, model_save_target
    from .training.finetune import FINETUNE_BETA, FineTuner

    tune_cpu_allocator()
    try:  # a bare name goes to the user model folder; checked before any training (issue 13)
        model_save_target(args.out)
    except (ModelNameError, FileExistsError) as exc:
        raise CommandError(f"--out: {exc}") from None
    unlabeled, _ = load_images(args.unlabeled)
    sharp = load_images(args.sharp)[0] if args.sharp is not None else None
    tuner = FineTuner(args.model, unlabeled, sharp, steps=args.steps, lr=args.lr, batch=args.batch, patch=args.patch,
                      beta=FINETUNE_BETA if args.beta is None else args.beta, device=args.device, seed=args.seed)
    with tqdm(total=args.steps, desc="finetune", unit="step") as bar:
        for rec in tuner.steps():
            bar.set_postfix(loss=f"{rec.losses['loss']:.4g}", l_ext=f"{rec.losses.get('l_ext', float('nan')):.3g}")
            bar.update(1)
    path = tuner.save(args.out)  # the same rule as the check above (model_save_target)
    print(f"fine-tuned {tuner.trainer.step} steps on {len(unlabeled)} unlabeled images; model: {path}")
    return EXIT_OK


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="PSNR/SSIM/sharpness of restored images against references",
        description=("PSNR and SSIM (data range 1, both images scaled by the reference's 0.1/99.9 percentiles) "
                     "of restored images against same-named references, and no-reference sharpness "
                     "(normalised LoG variance, Brenner, Vollath F4) of each restored image."),
    )
    p.add_argument("--pred", type=Path, required=True, help="restored image (TIFF) or folder of them")
    p.add_argument("--ref", type=Path, default=None, help="sharp reference image or folder (same names)")
    p.add_argument("--lpips", action="store_true", help="also LPIPS (only if the lpips package and weights are local)")
    p.add_argument("--out", type=Path, default=None, help="CSV to write")
    p.add_argument("--overwrite", action="store_true", help="replace the CSV if it exists")
    p.set_defaults(handler=_run_evaluate)


def _refuse_existing(path: Path | None, overwrite: bool) -> None:
    if path is not None and path.exists() and not overwrite:
        raise CommandError(f"{path} already exists; choose another path or pass --overwrite")


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.compare import evaluate_images, rows_to_csv
    from .evaluation.metrics import MetricUnavailable

    _refuse_existing(args.out, args.overwrite)
    try:
        rows = evaluate_images(args.pred, args.ref, use_lpips=args.lpips)
    except MetricUnavailable as exc:
        raise CommandError(str(exc)) from exc
    if args.out is not None:
        rows_to_csv(args.out, rows)
        print(f"wrote {args.out}")
    return EXIT_OK


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark", help="synthetic-defocus benchmark: PSNR, SSIM, StarDist AP, speed",
        description=("Blur sharp images with a realistic widefield defocus PSF plus Poisson-Gaussian noise (seeded), "
                     "restore them with each method and write summary.md / summary.csv / per_image.csv / "
                     "config.json and figures (benchmark.png, ap_vs_iou.png) into --out. Methods: input, rlN "
                     "(Richardson-Lucy, N iterations, true PSF; rl = rl30), wiener (true PSF, balance tuned per "
                     "defocus), wiener:BALANCE, mpt:MODEL, h2t:MODEL, model:MODEL."),
    )
    p.add_argument("--sharp", type=Path, required=True, help="folder of sharp images (TIFF)")
    p.add_argument("--labels", type=Path, default=None,
                   help="folder of ground-truth labels (same names); without it StarDist on the sharp image is the reference")
    p.add_argument("--names-from", choices=["test", "val", "train"], default=None,
                   help="use only the images of this split of the shared U2OS set (data.splits)")
    p.add_argument("--max-images", type=int, default=None, help="use at most this many images")
    p.add_argument("--defocus", type=_float_list, default=[2.0, 4.0, 8.0, 12.0], help="defocus values in um")
    p.add_argument("--na", type=float, default=0.45)
    p.add_argument("--wavelength", type=float, default=0.461, help="emission wavelength in um")
    p.add_argument("--pixel", type=float, default=0.645, help="pixel size in the sample plane, um")
    p.add_argument("--immersion", type=float, default=1.0, help="immersion refractive index")
    p.add_argument("--psf-model", choices=["scalar", "vectorial", "gibson_lanni", "pupil"], default="scalar")
    p.add_argument("--peak-photons", type=float, default=1000.0, help="photons at intensity 1 (0: no noise)")
    p.add_argument("--read-noise", type=float, default=3.0, help="Gaussian read noise sigma, photons")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", type=_str_list, default=["input", "rl10", "rl30", "wiener"], help="comma-separated methods")
    p.add_argument("--wiener-tune", type=Path, default=None,
                   help=("folder of sharp images to tune the Wiener balance on (default: with --names-from test, "
                         "the U2OS StarDist-validation images in --sharp; otherwise the first benchmark images)"))
    p.add_argument("--wiener-tune-images", type=int, default=3, help="how many tuning images")
    p.add_argument("--stardist-model", default=None, help="registered name, local folder, or shipped (default)")
    p.add_argument("--no-stardist", action="store_true", help="skip StarDist (no AP columns)")
    p.add_argument("--device", default="auto", help="device for deblurring models: auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--tile", type=int, default=None,
                   help="largest tile side for models (default: the inference engine's default for the device)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.set_defaults(handler=_run_benchmark)


def _run_benchmark(args: argparse.Namespace) -> int:
    from .evaluation.benchmark import BenchmarkConfig, run_benchmark
    from .evaluation.stardist_runner import StarDistModelError, StarDistUnavailable

    names = tune_names = None
    if args.names_from is not None:
        from .data import splits

        names = list({"test": splits.U2OS_TEST, "val": splits.U2OS_STARDIST_VAL, "train": splits.U2OS_TRAIN}[args.names_from])
        if args.names_from == "test" and args.wiener_tune is None:
            # Tune Wiener on images that are not benchmarked: the U2OS StarDist-validation split.
            tune_names = list(splits.U2OS_STARDIST_VAL)
    cfg = BenchmarkConfig(
        sharp_dir=args.sharp, labels_dir=args.labels, names=names, max_images=args.max_images, defocus_um=args.defocus,
        na=args.na, wavelength_um=args.wavelength, pixel_um=args.pixel, immersion_index=args.immersion,
        psf_model=args.psf_model, peak_photons=args.peak_photons if args.peak_photons > 0 else None,
        read_sigma_photons=args.read_noise, seed=args.seed, methods=args.methods, wiener_tune_dir=args.wiener_tune,
        wiener_tune_names=tune_names, wiener_tune_images=args.wiener_tune_images, stardist=not args.no_stardist,
        stardist_model=args.stardist_model, device=args.device, tile=args.tile,
    )
    try:
        run_benchmark(cfg, args.out, overwrite=args.overwrite, log=print)
    except (StarDistUnavailable, StarDistModelError) as exc:
        raise CommandError(f"{exc} (or pass --no-stardist)") from exc
    return EXIT_OK


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="StarDist nuclei before/after deblurring, with matching against labels",
        description=("Segment BEFORE and AFTER (2D images or stacks, segmented per plane) with StarDist and report "
                     "object counts and, with --labels, precision/recall/F1/AP at IoU 0.5, 0.7, 0.9 and mean AP "
                     "(AP = TP/(TP+FP+FN), mean AP = mean over the three IoUs: the MPT paper's Table 6)."),
    )
    p.add_argument("--before", type=Path, required=True, help="blurred image (TIFF)")
    p.add_argument("--after", type=Path, required=True, help="deblurred image (TIFF)")
    p.add_argument("--sharp", type=Path, default=None, help="optional in-focus image of the same field")
    p.add_argument("--labels", type=Path, default=None, help="ground-truth label image")
    p.add_argument("--stardist-model", default=None, help="registered name, local folder, or shipped (default)")
    p.add_argument("--save-labels", type=Path, default=None, help="folder to write the StarDist label TIFFs into")
    p.add_argument("--out", type=Path, default=None, help="CSV to write")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(handler=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from .evaluation.compare import compare_stardist, format_table, rows_to_csv
    from .io.images import read_array
    from .evaluation.stardist_runner import StarDistModelError, StarDistUnavailable

    _refuse_existing(args.out, args.overwrite)
    label_paths = {}
    if args.save_labels is not None:
        for key in ("before", "after", "sharp"):
            label_paths[key] = args.save_labels / f"stardist_{key}.tif"
            _refuse_existing(label_paths[key] if (key != "sharp" or args.sharp) else None, args.overwrite)
    images = {"before": read_array(args.before), "after": read_array(args.after)}
    if args.sharp is not None:
        images["sharp"] = read_array(args.sharp)
    gt = read_array(args.labels) if args.labels is not None else None
    try:
        result = compare_stardist(images, gt, args.stardist_model)
    except (StarDistUnavailable, StarDistModelError) as exc:
        raise CommandError(str(exc)) from exc
    print(f"StarDist: {result.model}")
    cols = ["image", "objects"] + (["ap@0.5", "ap@0.7", "ap@0.9", "mean_ap", "precision@0.5", "recall@0.5", "f1@0.5"]
                                   if gt is not None else [])
    print(format_table(result.rows, cols))
    if args.out is not None:
        rows_to_csv(args.out, result.rows)
        print(f"wrote {args.out}")
    if args.save_labels is not None:
        import tifffile

        from .io.atomic import write_with

        for key, lab in result.labels.items():
            write_with(label_paths[key], lambda p, lab=lab: tifffile.imwrite(p, lab, compression="zlib"))
            print(f"wrote {label_paths[key]}")
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


_COMMANDS = (_add_predict, _add_train, _add_finetune, _add_export, _add_evaluate, _add_benchmark, _add_compare,
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
    except NotImplementedCommand as exc:
        print(f"mpt-deblur: {exc}", file=sys.stderr)
        return EXIT_NOT_IMPLEMENTED
    except (CommandError, ValueError, FileNotFoundError, PermissionError, OSError) as exc:
        print(f"mpt-deblur {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
