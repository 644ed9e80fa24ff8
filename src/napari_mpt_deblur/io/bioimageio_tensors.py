"""Test tensors, sample images and the cover picture of a bioimage.io package
(:mod:`napari_mpt_deblur.io.bioimageio`): which bundled image a package is tested on, its
``scale_range`` preprocessing as numpy, and what the package's text says about that image."""

from __future__ import annotations

import io

import numpy as np

from .bioimageio_package import BioimageioError


def _test_image(channels: int) -> np.ndarray:
    """The bundled image a package is tested on, (C, H, W) raw units: the defocused BBBC006 field
    (repeated over the channels of a grey-trained multi-channel model), or for a 3-channel (RGB)
    model the defocused stained-tissue sample."""
    from ..data import samples

    if channels == 3:
        return np.moveaxis(samples.defocused_tissue_rgb(), -1, 0)
    return np.repeat(samples.defocused_bbbc006()[None], channels, axis=0)


def _test_crop(side: int, channels: int = 1) -> np.ndarray:
    """A centred ``side`` x ``side`` crop (float32, (C, side, side), raw units) of :func:`_test_image`."""
    image = _test_image(channels)
    h, w = image.shape[-2:]
    if side > min(h, w):
        raise BioimageioError(f"test tile {side} is larger than the bundled image {h}x{w}")
    y0, x0 = (h - side) // 2, (w - side) // 2
    return image[:, y0:y0 + side, x0:x0 + side].astype(np.float32)


def _scale_range(x: np.ndarray, low: float, high: float, eps: float) -> np.ndarray:
    """bioimage.io ``scale_range`` per sample over (y, x), and over the channels too when there are
    several (one range for a colour image, as the engine and training normalise it):
    (x - lo) / (hi - lo + eps)."""
    axes = (-2, -1) if x.shape[1] == 1 else (-3, -2, -1)
    lo = np.percentile(x, low, axis=axes, keepdims=True)
    hi = np.percentile(x, high, axis=axes, keepdims=True)
    return ((x - lo) / (hi - lo + eps)).astype(np.float32)


def _forward(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(torch.from_numpy(np.ascontiguousarray(x))).float().numpy()


def _cover_png(before: np.ndarray, after: np.ndarray) -> bytes:
    """before | after side by side (2:1), both shown with the before image's 0.1/99.9 percentile range."""
    from matplotlib.figure import Figure

    lo, hi = np.percentile(before, [0.1, 99.9])
    scale = max(float(hi - lo), 1e-12)
    panel = np.concatenate([(before - lo) / scale, (after - lo) / scale], axis=1).clip(0, 1)
    h, w = panel.shape
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(panel, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axvline(w / 2 - 0.5, color="white", linewidth=2)
    for x, text in ((0.02, "before (defocused)"), (0.52, "after (deblurred)")):
        ax.text(x, 0.96, text, transform=ax.transAxes, color="white", fontsize=10, va="top",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 2, "edgecolor": "none"})
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _training_data_note(channels: int) -> str:
    if channels == 3:
        return ("Trained on stained tissue sections (RGB brightfield, BBBC038 histology) with synthetic defocus, "
                "each colour\nblurred at its own wavelength (incoherent imaging assumed); other stains and "
                "modalities may need fine-tuning.")
    return ("Trained on Hoechst-stained\nU2OS nuclei (widefield); other samples and modalities may need "
            "fine-tuning (`mpt-deblur finetune`).")


def test_data_text(channels: int, side: int) -> str:
    """The README's sentence on what the package's test tensors are."""
    if channels == 3:
        return (f"a {side}x{side} crop of the bundled stained tissue section (BBBC038 histology, held-out test split) "
                "with 6 um of synthetic defocus,\neach colour blurred at its own wavelength")
    return (f"a {side}x{side} crop of a real defocused BBBC006 image (plane z_00, about\n"
            "32 um below focus, excluded from training)")


def modality_tags(channels: int) -> list[str]:
    """bioimage.io tags for the images a model was trained on."""
    if channels == 3:
        return ["brightfield-microscopy", "histology", "rgb"]
    return ["fluorescence-light-microscopy", "nuclei"]
