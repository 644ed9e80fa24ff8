"""Pieces every ``mpt-deblur`` subcommand module shares: exit codes, the user-facing error, list
parsers for flags (imports nothing heavy: ``--help`` stays instant)."""

from __future__ import annotations

import argparse
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CommandError(Exception):
    """An error whose message is meant for the user as is (no traceback)."""


def settings_choices(field: str) -> list[str]:
    """The values an ``InferenceSettings`` field accepts (flags are generated from the settings,
    not declared twice; the settings module is torch-free, so ``--help`` stays instant)."""
    from typing import get_args

    from .inference.settings import InferenceSettings

    annotation = InferenceSettings.model_fields[field].annotation
    # ``Literal[...] | None`` (None = the default): the flag offers the literal's values.
    literals = [a for a in get_args(annotation) if a is not type(None)] if type(None) in get_args(annotation) else [annotation]
    return [value for lit in literals for value in get_args(lit)]


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _refuse_existing(path: Path | None, overwrite: bool) -> None:
    if path is not None and path.exists() and not overwrite:
        raise CommandError(f"{path} already exists; choose another path or pass --overwrite")


def names_arg(text: str) -> str | list[str]:
    """``--names``: a split name (e.g. ``u2os_train_and_val``) as is, else comma-separated file stems
    (one stem is a list of one, not a split)."""
    from typing import get_args

    from .data.sources import SplitName

    return text if text in get_args(SplitName) else [v.strip() for v in text.split(",") if v.strip()]


#: Example value per optics field for the flags' help (the benchmark's microscope).
_OPTICS_EXAMPLES = {"na": "0.45", "immersion_index": "air", "wavelength_um": "0.461", "pixel_um": "0.645"}


def add_optics_flags(parser: argparse.ArgumentParser, defaults: dict[str, float] | None = None) -> None:
    """``--na --immersion --wavelength --pixel``, generated from the fields of
    :class:`~napari_mpt_deblur.data.optics.Acquisition` (names from ``OPTICS_FLAGS``, help from the
    field descriptions), so every command describes a microscope the same way. ``defaults``: a value
    per field (e.g. the benchmark's microscope), else None (= not given)."""
    from .data.optics import OPTICS_FLAGS, Acquisition

    for key, flag in OPTICS_FLAGS.items():
        default = None if defaults is None else defaults[key]
        kind = str if key == "immersion_index" else float
        extra = "; or a medium: air, water, glycerol, silicone, oil" if key == "immersion_index" else ""
        parser.add_argument(flag, type=kind, default=default, metavar="VALUE",
                            help=f"{Acquisition.model_fields[key].description}{extra} "
                                 f"(e.g. {_OPTICS_EXAMPLES[key]}; default: {default if default is not None else 'not given'})")


def optics_flags(args: argparse.Namespace) -> dict[str, float | None]:
    """The optics flags as Acquisition field values (None where not given); the immersion may be a
    medium name."""
    from .data.optics import parse_immersion

    return {"na": args.na, "wavelength_um": args.wavelength, "pixel_um": args.pixel,
            "immersion_index": None if args.immersion is None else parse_immersion(args.immersion)}
