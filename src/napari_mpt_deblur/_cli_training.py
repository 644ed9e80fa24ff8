"""The training subcommands of ``mpt-deblur``: ``train`` (a config), ``finetune`` (EFCRex on the
user's blurry images) and ``calibrate`` (to one microscope). Library code is imported inside each
handler, so ``--help`` stays instant."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._cli_common import EXIT_OK, CommandError, add_optics_flags, names_arg, optics_flags, settings_choices


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


def _add_precision(p: argparse.ArgumentParser) -> None:
    # The inference settings' precision values: the training configs accept the same four.
    p.add_argument("--precision", choices=settings_choices("precision"), default="auto",
                   help="autocast precision of the training steps (auto: bf16 on CUDA GPUs that have it, fp32 "
                        "elsewhere; bf16 on a CPU with AMX runs a U-Net step about 1.8x faster, docs/training.md)")


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model with EFCRex on unlabeled images",
                       description="Fine-tune MODEL on unlabeled images (EFCRex), labeled batches from a synthetic paired set.")
    p.add_argument("--model", required=True, help="starting model name or path")
    p.add_argument("--unlabeled", type=Path, required=True, help="folder of unlabeled (blurry) images")
    p.add_argument("--sharp", type=Path, default=None,
                   help="folder of sharp images for synthetic labeled pairs (default: the bundled in-focus BBBC006 "
                        "image; a colour model needs colour ones, blurred per channel at 0.61 / 0.53 / 0.46 um)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--patch", type=int, default=128, help="patch side in pixels (rounded up to the model's size factor)")
    p.add_argument("--beta", type=float, default=None, help="weight of the EFCRex term (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True,
                   help="model name (saved in the user model folder, then usable as --model NAME anywhere) "
                        "or a file path (stem or .safetensors); shipped model names are refused")
    _add_precision(p)
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .data.datasets import load_images
    from .inference.devices import tune_cpu_allocator
    from .models.record import read_record
    from .models.registry import ModelNameError, model_save_target, resolve_model_path
    from .training.finetune import FINETUNE_BETA, FineTuner

    tune_cpu_allocator()
    try:  # a bare name goes to the user model folder; checked before any training (issue 13)
        model_save_target(args.out)
    except (ModelNameError, FileExistsError) as exc:
        raise CommandError(f"--out: {exc}") from None
    # A colour model reads its images in colour (a grey one averages RGB files to grey).
    channels = read_record(resolve_model_path(args.model)).architecture.in_channels
    unlabeled, _ = load_images(args.unlabeled, channels=channels)
    sharp = load_images(args.sharp, channels=channels)[0] if args.sharp is not None else None
    tuner = FineTuner(args.model, unlabeled, sharp, steps=args.steps, lr=args.lr, batch=args.batch, patch=args.patch,
                      beta=FINETUNE_BETA if args.beta is None else args.beta, device=args.device, seed=args.seed,
                      precision=args.precision)
    with tqdm(total=args.steps, desc="finetune", unit="step") as bar:
        for rec in tuner.steps():
            bar.set_postfix(loss=f"{rec.losses['loss']:.4g}", l_ext=f"{rec.losses.get('l_ext', float('nan')):.3g}")
            bar.update(1)
    path = tuner.save(args.out)  # the same rule as the check above (model_save_target)
    print(f"fine-tuned {tuner.trainer.step} steps on {len(unlabeled)} unlabeled images; model: {path}")
    return EXIT_OK


def _pair(text: str, flag: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise CommandError(f"{flag} {text!r}: give MIN,MAX, e.g. {flag} 2,12") from None
    return abs(low), abs(high)


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="specialise a model to your microscope (objective, immersion, emission, pixel size)",
        description=("Fine-tune MODEL on synthetic defocus pairs made with exactly your optics from sharp images "
                     "(yours with --sharp, plus a bundled set of real nuclei images), with EFCRex on your blurry "
                     "images if given (--unlabeled), validating on held-back sharp images; stops inside the time "
                     "budget and saves the best validated model. Optics not given are read from OME-TIFF, "
                     "OME-Zarr or ImageJ metadata of the --sharp / --unlabeled files. See docs/calibrate.md."))
    p.add_argument("--model", default=None, help="starting model name or path (default: the recommended model)")
    add_optics_flags(p)
    p.add_argument("--defocus", default=None,
                   help="MIN,MAX defocus in um to train for, both signs (default: what the optics make visible)")
    p.add_argument("--photons", default="200,5000", help="MIN,MAX peak photon counts of the synthetic camera noise")
    p.add_argument("--sharp", nargs="+", type=Path, default=[], metavar="FOLDER_OR_FILE",
                   help="your in-focus images (a z-stack gives its best-focus plane)")
    p.add_argument("--names", default=None,
                   help="only these file stems (comma-separated) or split (e.g. u2os_train_and_val) of --sharp folders")
    p.add_argument("--no-bundled", action="store_true", help="do not add the bundled sharp nuclei images")
    p.add_argument("--unlabeled", nargs="+", type=Path, default=[], metavar="FOLDER_OR_FILE",
                   help="your blurry images (EFCRex; every plane of a z-stack counts)")
    p.add_argument("--time-budget", type=float, required=True, metavar="MINUTES")
    p.add_argument("--out", default=None,
                   help="model name (user model folder) or file path; default <model>-cal-<optics>")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="checkpoints and logs (default: the user cache folder); --resume continues there")
    p.add_argument("--resume", action="store_true", help="continue an interrupted calibration in --work-dir")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--validate-every", type=int, default=100, metavar="STEPS")
    p.add_argument("--held-back", type=int, default=None, metavar="N",
                   help="sharp images held back for validation (default 4, at most one in eight; more: a steadier "
                        "score, fewer to train on)")
    p.add_argument("--min-gain-se", type=float, default=None, metavar="N",
                   help="a checkpoint must beat the best so far (first: the starting model) by N standard errors "
                        "of its per-pair validation differences (default 0: any gain)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--device", default="auto")
    _add_precision(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from .inference.devices import tune_cpu_allocator
    from .io.cache import cache_dir
    from .models import RECOMMENDED_MODEL
    from .models.registry import ModelNameError, model_save_target
    from .data.optics import OPTICS_FLAGS, calibrated_model_name
    from .training import calibrate as cal

    optics, sources = cal.resolve_optics(optics_flags(args), [*args.sharp, *args.unlabeled])
    model = args.model or RECOMMENDED_MODEL
    out = args.out or calibrated_model_name(model, optics)
    try:  # checked before any training
        model_save_target(out)
    except (ModelNameError, FileExistsError) as exc:
        raise CommandError(f"--out: {exc}") from None
    settings = cal.CalibrationSettings(
        model=model, optics=optics, defocus_um=None if args.defocus is None else _pair(args.defocus, "--defocus"),
        peak_photons=_pair(args.photons, "--photons"), time_budget_minutes=args.time_budget, lr=args.lr,
        batch_size=args.batch, patch=args.patch, use_bundled=not args.no_bundled, validate_every=args.validate_every,
        seed=args.seed, device=args.device, precision=args.precision, cpu_threads=args.threads,
        **({} if args.min_gain_se is None else {"min_gain_se": args.min_gain_se}),
        **({} if args.held_back is None else {"validation_images": args.held_back}))
    print(f"optics: {optics.label()}")
    for key, flag in OPTICS_FLAGS.items():
        print(f"  {flag[2:]:<10} {getattr(optics, key):g}  ({sources[key]})")
    names = None if args.names is None else names_arg(args.names)
    sharp = cal.read_sharp(args.sharp, names) if args.sharp else None
    unlabeled = cal.read_unlabeled(args.unlabeled)
    tune_cpu_allocator()
    work = args.work_dir or cache_dir("calibrate") / Path(str(out)).name
    calibrator = cal.Calibrator(settings, sharp, unlabeled, work_dir=work, resume=args.resume, optics_sources=sources)
    resolved = calibrator.settings  # the default range follows the starting model's training range
    low, high = resolved.training_defocus_um()
    print(f"defocus: {low:g} to {high:g} um, both signs (blur radius {optics.blur_radius_px(low):.1f} to "
          f"{optics.blur_radius_px(high):.1f} px); validation at {resolved.validation_defocus_um()} um")
    for note in calibrator.sharp_notes:
        print(f"  {note}")
    print(f"sharp images: {len(calibrator.train_names)} for training, {len(calibrator.val_names)} held back; "
          f"unlabeled: {calibrator.unlabeled_count}; work folder: {work}")
    start = calibrator.start_validation
    if start:
        print(f"start: validation PSNR {start['psnr']:.2f} dB (input {start['input_psnr']:.2f} dB)")

    def report(rec) -> None:
        if rec.validation:
            print(f"step {rec.step}/{rec.total_steps}: loss {rec.losses['loss']:.4g}, "
                  f"validation PSNR {rec.validation['psnr']:.2f} dB", flush=True)

    result = calibrator.run(report)
    path = calibrator.save(out)
    best = result.best
    print(f"calibrated {result.steps_done} steps in {calibrator.trainer.budget_used / 60:.1f} min; "
          f"{calibrator.verdict()}; model: {path}")
    if best and best["step"] == 0:
        margin = calibrator.settings.min_gain_se
        by = f" by more than {margin:g} standard errors of its per-pair differences" if margin > 0 else ""
        print(f"warning: no step beat the starting model ({best['psnr']:.2f} dB on validation){by}: the saved "
              "model has its weights; try a longer --time-budget or a lower --lr", file=sys.stderr)
    return EXIT_OK
