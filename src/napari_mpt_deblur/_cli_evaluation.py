"""``mpt-deblur evaluate``, ``benchmark`` and ``compare``: the evaluation subcommands (declared
here, registered by :mod:`napari_mpt_deblur.cli`; the work is done by ``evaluation`` modules
imported inside each handler)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._cli_common import (EXIT_OK, CommandError, _float_list, _refuse_existing, _str_list, add_optics_flags, names_arg,
                          optics_flags)


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
                     "defocus), wiener:BALANCE, mpt:MODEL, h2t:MODEL, model:MODEL; a model method ending in @1, @4 "
                     "or @8 averages that many orientations per tile (mpt:mpt-small-fluo@1: one pass), and s1 or "
                     "s2 after it that many one-pixel shifts (mpt:mpt-tiny-fluo@1s1: one pass); without them, "
                     "the model's defaults, as predict uses them."),
    )
    p.add_argument("--sharp", type=Path, required=True, help="folder of sharp images (TIFF)")
    p.add_argument("--labels", type=Path, default=None,
                   help="folder of ground-truth labels (same names); without it StarDist on the sharp image is the reference")
    p.add_argument("--names-from", choices=["test", "val", "train"], default=None,
                   help="use only the images of this split of the shared U2OS set (data.splits)")
    p.add_argument("--names", default=None, metavar="SPLIT_OR_STEMS",
                   help="use only these file stems (comma-separated) or this split of --sharp (data.splits, e.g. "
                        "dsb_fluo_test: the held-out 10%% of dsb2018_extra/fluorescence)")
    p.add_argument("--max-images", type=int, default=None, help="use at most this many images")
    p.add_argument("--defocus", type=_float_list, default=[2.0, 4.0, 8.0, 12.0], help="defocus values in um")
    from .data.optics import BENCHMARK_OPTICS

    add_optics_flags(p, BENCHMARK_OPTICS.model_dump())
    p.add_argument("--psf-model", choices=["scalar", "vectorial", "gibson_lanni", "pupil"], default="scalar")
    p.add_argument("--rgb", action="store_true",
                   help="colour (RGB) images: each channel blurred at its own wavelength (0.61, 0.53, 0.46 um), "
                        "RL/Wiener per channel; needs --no-stardist")
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
    from .data.optics import RGB_WAVELENGTHS_UM, Acquisition
    from .evaluation.benchmark import BenchmarkConfig, run_benchmark
    from .evaluation.stardist_runner import StarDistModelError, StarDistUnavailable

    names = tune_names = None
    if args.rgb and not args.no_stardist:
        raise CommandError("--rgb needs --no-stardist: the shipped StarDist model segments grey fluorescence nuclei, "
                           "not stained colour images")
    if args.names is not None and args.names_from is not None:
        raise CommandError("--names and --names-from both choose the images: give one")
    if args.names is not None:
        from .data.splits import split_names
        from .io.paths import TIFF_SUFFIXES, list_images

        names = names_arg(args.names)
        if isinstance(names, str):  # a split of the --sharp folder
            split = names
            stems = [p.stem for p in list_images(args.sharp, TIFF_SUFFIXES)] if args.sharp.is_dir() else []
            names = split_names(split, stems)
            if split.endswith("_test") and args.wiener_tune is None:
                # Tune Wiener on images of the same folder that are not benchmarked: U2OS's StarDist
                # validation split, or the first images of a held-out split's training part.
                from .data import splits

                tune_names = (list(splits.U2OS_STARDIST_VAL) if split == "u2os_test" else
                              split_names(split[: -len("_test")] + "_train", stems)[: args.wiener_tune_images])
    elif args.names_from is not None:
        from .data import splits

        names = list({"test": splits.U2OS_TEST, "val": splits.U2OS_STARDIST_VAL, "train": splits.U2OS_TRAIN}[args.names_from])
        if args.names_from == "test" and args.wiener_tune is None:
            # Tune Wiener on images that are not benchmarked: the U2OS StarDist-validation split.
            tune_names = list(splits.U2OS_STARDIST_VAL)
    cfg = BenchmarkConfig(
        sharp_dir=args.sharp, labels_dir=args.labels, names=names, max_images=args.max_images, defocus_um=args.defocus,
        optics=Acquisition(**optics_flags(args)),
        psf_model=args.psf_model, channel_wavelengths_um=RGB_WAVELENGTHS_UM if args.rgb else None,
        peak_photons=args.peak_photons if args.peak_photons > 0 else None,
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
