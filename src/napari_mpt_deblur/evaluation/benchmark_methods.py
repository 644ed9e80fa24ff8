"""The benchmark's restoration methods (docs/benchmarks.md): parsing the method names of
``--methods`` and turning each into a restorer of a [0, 1]-like float image.

* ``input``: the blurred image itself;
* ``rlN`` (``rl`` = ``rl30``): Richardson-Lucy with N iterations and the TRUE PSF (an oracle);
* ``wiener`` / ``wiener:B``: Wiener filter with the true PSF, tuned or fixed balance;
* ``mpt:NAME`` / ``h2t:NAME`` / ``model:NAME`` (optionally ``@1``/``@4``/``@8``): a saved model run
  through the inference engine.

Colour images get RL and Wiener per channel, each with its own PSF.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..inference.settings import ORIENTATION_COUNTS, SHIFT_COUNTS

@dataclass(frozen=True)
class MethodSpec:
    """One restoration method of the benchmark. ``key`` is its label in the tables."""

    key: str
    kind: Literal["input", "rl", "wiener", "model"]
    iterations: int = 0
    balance: float | None = None
    model: str | None = None
    arch: str | None = None
    #: Orientations averaged per tile (``mpt:M@4``; :mod:`~napari_mpt_deblur.inference.orientations`);
    #: None (a plain ``mpt:M``): the model's own default, as ``mpt-deblur predict`` uses it.
    orientations: int | None = None
    #: Pixel shifts averaged per orientation (``mpt:M@1s2``); None: the model's default.
    shifts: int | None = None


_MODEL_PREFIXES = {"mpt": "mpt", "h2t": "h2t_unet", "h2t_unet": "h2t_unet", "model": None}


def parse_method(text: str) -> MethodSpec:
    """Parse a method name: ``input``, ``rl``, ``rlN``, ``wiener``, ``wiener:B``, ``mpt:M``, ``h2t:M``,
    ``model:M``; a model method may end in ``@1``, ``@4`` or ``@8``: that many orientations averaged
    per tile (without it: the model's default, ``ModelRecord.orientations``)."""
    t = text.strip()
    if t == "input":
        return MethodSpec("input", "input")
    if t == "rl":
        return MethodSpec("rl30", "rl", iterations=30)
    if m := re.fullmatch(r"rl(\d+)", t):
        n = int(m.group(1))
        if n < 1:
            raise ValueError(f"method {t!r}: Richardson-Lucy needs at least 1 iteration")
        return MethodSpec(t, "rl", iterations=n)
    if t == "wiener":
        return MethodSpec("wiener", "wiener")
    if t.startswith("wiener:"):
        try:
            b = float(t.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"method {t!r}: expected wiener:BALANCE with a number") from None
        if not b > 0:
            raise ValueError(f"method {t!r}: the Wiener balance must be positive")
        return MethodSpec(t, "wiener", balance=b)
    prefix, sep, name = t.partition(":")
    if sep and prefix in _MODEL_PREFIXES and name:
        orientations = shifts = None
        if m := re.fullmatch(r"(.+)@(\w+)", name):
            name, passes = m.groups()
            counts = re.fullmatch(r"(\d*)(?:s(\d+))?", passes)
            if (counts is None or not any(counts.groups())
                    or (counts[1] and int(counts[1]) not in ORIENTATION_COUNTS)
                    or (counts[2] and int(counts[2]) not in SHIFT_COUNTS)):
                raise ValueError(f"method {t!r}: @{passes} is not a pass count; use @1 (one pass), @4 (flips), "
                                 "@8 (flips and transposes), optionally followed by s1 or s2 (pixel shifts), "
                                 "or @s2 alone")
            orientations = int(counts[1]) if counts[1] else None
            shifts = int(counts[2]) if counts[2] else None
        return MethodSpec(t, "model", model=name, arch=_MODEL_PREFIXES[prefix], orientations=orientations,
                          shifts=shifts)
    raise ValueError(
        f"unknown method {t!r}: use input, rl, rlN (e.g. rl10), wiener, wiener:BALANCE, mpt:MODEL, h2t:MODEL or "
        "model:MODEL (a model method may end in @1, @4 or @8: orientations averaged, then s1 or s2: pixel shifts, "
        "e.g. @1s2; without: the model's default)"
    )


def parse_methods(texts: Sequence[str]) -> list[MethodSpec]:
    """Parse and de-duplicate; ``input`` is always included (first): it is the blurred baseline."""
    specs = [parse_method(t) for t in texts]
    keys = [s.key for s in specs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"methods listed twice: {', '.join(dupes)}")
    if "input" not in keys:
        specs.insert(0, MethodSpec("input", "input"))
    return specs


class ModelRestorer:
    """A saved deblurring model applied to a [0, 1]-like float image (H, W) -> (H, W) float32, or
    (C, H, W) -> (C, H, W) for a C-channel model.

    Runs through the inference engine (:class:`~napari_mpt_deblur.inference.Deblurrer`), exactly as
    ``mpt-deblur predict`` does: the plane is scaled by the model's own normalisation (percentiles
    of the blurred image), restored tile by tile with blending (the engine's default tile for the
    device unless ``tile`` is given) and scaled back. A grey image given to a multi-channel model
    is repeated over its channels and the first output channel is kept.
    """

    def __init__(self, name: str, device: str = "auto", arch: str | None = None, tile: int | None = None,
                 orientations: int | None = None, shifts: int | None = None) -> None:
        from ..inference import Deblurrer, InferenceSettings

        self.engine = Deblurrer(name, InferenceSettings(device=device, tile=tile, output_dtype="float32",
                                                        orientations=orientations, shifts=shifts))
        self.loaded = self.engine.loaded
        self.device = self.engine.device
        found = self.loaded.record.architecture.arch
        if arch is not None and found != arch:
            raise ValueError(f"model {name!r} is a {found} model, not {arch}; "
                             f"use {found.split('_')[0]}:{name} or model:{name}")

    @property
    def description(self) -> str:
        r = self.loaded.record
        tile, overlap, _ = self.engine.current_tile
        return (f"{r.name} ({r.architecture.arch}/{r.architecture.preset}{'' if r.trained else ', UNTRAINED'}; "
                f"tile {tile}, overlap {overlap}{self.engine.settings.averaging_note})")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        img = np.asarray(image, dtype=np.float32)
        channels = self.engine.in_channels
        if img.ndim == 3:  # (C, H, W): the engine takes colour planes channels-last
            if img.shape[0] != channels:
                raise ValueError(f"{self.loaded.record.name} takes {channels} channel(s), the image has {img.shape[0]}")
            out = self.engine.deblur_plane(np.moveaxis(img, 0, -1))
            return np.ascontiguousarray(np.moveaxis(np.asarray(out, dtype=np.float32), -1, 0))
        if channels == 1:
            return np.asarray(self.engine.deblur_plane(img), dtype=np.float32)
        out = self.engine.deblur_plane(np.repeat(img[..., None], channels, axis=-1))
        return np.asarray(out[..., 0], dtype=np.float32)


Restorer = Callable[[np.ndarray], np.ndarray]


def make_restorer(spec: MethodSpec, psfs: Sequence[np.ndarray], balance: float | None,
                  models: dict[str, ModelRestorer]) -> Restorer:
    """The restoration of one method; ``psfs``: the true PSF, one per channel (one for grey)."""
    from .classical import per_channel_psf, richardson_lucy, wiener

    if spec.kind == "input":
        return lambda img: np.asarray(img, dtype=np.float32)
    if spec.kind == "rl":
        return lambda img: per_channel_psf(img, psfs, lambda plane, k: richardson_lucy(plane, k, spec.iterations))
    if spec.kind == "wiener":
        assert balance is not None
        return lambda img: per_channel_psf(img, psfs, lambda plane, k: wiener(plane, k, balance))
    return models[spec.key]
