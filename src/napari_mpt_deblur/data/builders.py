"""Datasets from the data sources of a training config (:mod:`napari_mpt_deblur.data.sources`).

The trainer (:mod:`napari_mpt_deblur.training.trainer`) calls these to turn ``data``,
``extra_pairs``, ``unlabeled`` and ``validation.data`` into patch datasets and fixed validation
pairs. Sources of kind ``arrays`` (images handed over in memory) cannot be loaded from a config:
pass the data to ``Trainer`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import datasets as D
from .datasets import PatchConfig
from .sources import (
    ArraysSource,
    ArraysValidation,
    PairedFolderSource,
    PairedValidation,
    PlaneFolderSource,
    SyntheticSource,
    SyntheticValidation,
    UnlabeledSource,
    ZStackSource,
)


class MixedDataset:
    """Several datasets drawn from uniformly at random, per sample index (deterministic)."""

    def __init__(self, datasets: Sequence[Any], seed: int) -> None:
        self.datasets = list(datasets)
        self.seed = seed

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, index: int) -> dict:
        if len(self.datasets) == 1:
            return self.datasets[0][index]
        k = int(np.random.default_rng([self.seed, index, 3]).integers(len(self.datasets)))
        return self.datasets[k][index]


def _names(value, folder):
    """A named split (see ``data.splits.split_names``) as file stems of ``folder``, or the list given."""
    if not isinstance(value, str):
        return value
    from .splits import split_names

    return split_names(value, [p.stem for p in D.list_images(folder)])


def _in_memory_error(src) -> ValueError:
    return ValueError(f"data source of kind 'arrays' ({src.description or 'in-memory images'}) cannot be loaded "
                      "from a config; pass the data to Trainer(train_data=..., extra_data=...)")


def load_source_pairs(src) -> list[D.Pair]:
    """All (blurred, sharp) pairs of one paired source, loaded into memory."""
    if isinstance(src, PairedFolderSource):
        return D.load_folder_pairs(src.blurred, src.sharp, src.match, src.exclude)
    if isinstance(src, PlaneFolderSource):
        return D.load_plane_pairs(src.root, src.in_focus, src.planes, src.match, src.exclude)
    if isinstance(src, ZStackSource):
        return D.load_zstack_pairs(src.path, src.focus_plane, src.max_distance)[0]
    if isinstance(src, ArraysSource):
        raise _in_memory_error(src)
    raise TypeError(f"not a paired source: {type(src).__name__}")


def build_paired_dataset(sources: Sequence[Any], patch: PatchConfig, seed: int) -> MixedDataset:
    """Training pairs from paired sources (synthetic, folders, planes, z-stacks), mixed uniformly;
    patches of ``patch.size`` px, deterministic in (seed, sample index)."""
    parts = []
    for src in sources:
        if isinstance(src, SyntheticSource):
            images, names = D.load_images(src.sharp, _names(src.names, src.sharp), src.exclude, src.defocus.channels)
            labels = None
            if src.labels is not None:
                labels, _ = D.load_images(src.labels, names)
                labels = [np.asarray(l).astype(np.int64) for l in labels]
            parts.append(D.SyntheticPatches(images, patch, src.defocus, seed=seed, labels=labels,
                                            per_object_prob=src.per_object_prob, names=names))
        else:
            parts.append(D.PairedPatches(load_source_pairs(src), patch, seed=seed))
    return MixedDataset(parts, seed)


def build_unlabeled_dataset(sources: Sequence[UnlabeledSource], patch: PatchConfig, seed: int) -> D.UnlabeledPatches:
    """Unlabeled (blurry) patches for EFCRex from image folders."""
    images: list[np.ndarray] = []
    for src in sources:
        if isinstance(src, ArraysSource):
            raise _in_memory_error(src)
        images += D.load_images(src.folder, src.names, src.exclude)[0]
    return D.UnlabeledPatches(images, patch, seed=seed)


def build_validation_pairs(data: Any, crop: int | None, seed: int) -> list[D.Pair]:
    """Fixed validation pairs from a validation source (synthetic, paired or in memory), centre-cropped
    to ``crop`` px (None: whole images); ``seed`` fixes the synthetic blur and noise."""
    if isinstance(data, SyntheticValidation):
        channels = len(data.channel_wavelengths_um) if data.channel_wavelengths_um else 1
        images, names = D.load_images(data.sharp, _names(data.names, data.sharp), channels=channels)
        if data.max_images is not None:
            images, names = images[: data.max_images], names[: data.max_images]
        return D.synthetic_validation_pairs(
            images, names, data.defocus_um, data.optics, data.psf_model, data.peak_photons, data.read_sigma_photons,
            crop=crop, seed=seed, channel_wavelengths_um=data.channel_wavelengths_um,
        )
    if isinstance(data, ArraysValidation):
        raise _in_memory_error(data)
    assert isinstance(data, PairedValidation)
    pairs = load_source_pairs(data.source) if not isinstance(data.source, SyntheticSource) else []
    if data.max_images is not None:
        pairs = pairs[: data.max_images]
    return D.crop_pairs(pairs, crop)


__all__ = ["MixedDataset", "build_paired_dataset", "build_unlabeled_dataset", "build_validation_pairs",
           "load_source_pairs"]
