"""Processes of a training run: ranks and world size under ``torchrun``, the process group, and
the data-loading workers that assemble each step's batch (deterministic in the step number).
Used by :class:`napari_mpt_deblur.training.trainer.Trainer`, which re-exports these names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..data import datasets as D

if TYPE_CHECKING:  # annotation only: the trainer imports this module
    from .trainer import Trainer


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def dist_from_env() -> DistInfo:
    """Rank and world size as ``torchrun`` sets them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(rank=int(os.environ.get("RANK", "0")), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(info: DistInfo, device: torch.device) -> None:
    import torch.distributed as dist

    if info.active and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world)


class _StepBatches(torch.utils.data.IterableDataset):
    """Worker-side batch assembly: worker w of W builds the batches of steps w, w + W, ...;
    DataLoader hands them out round-robin, so the order is the step order."""

    def __init__(self, trainer: Trainer, start_step: int) -> None:
        self.train_data = trainer.train_data
        self.extra_data = trainer.extra_data
        # Plain numbers, not the trainer: spawned workers (macOS, Windows) pickle this object.
        self.batch, self.world, self.rank = trainer.config.batch_size, trainer.dist.world, trainer.dist.rank
        self.start = start_step

    def indices(self, step: int) -> list[int]:
        start = (step * self.world + self.rank) * self.batch
        return list(range(start, start + self.batch))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        step = self.start + wid
        while True:
            idx = self.indices(step)
            batch = D.collate([self.train_data[i] for i in idx])
            extra = None if self.extra_data is None else D.collate([self.extra_data[i] for i in idx])
            yield idx, batch, extra
            step += nw


def resolve_workers(setting: int | str, device: torch.device) -> int:
    """Data-loading worker processes: a number as given; ``auto``: on a GPU all cores but one (at
    most 8: the synthesis itself runs on the GPU), none on a CPU or MPS device (the main process
    synthesises there, and on a small machine workers only compete with the model for cores)."""
    if setting != "auto":
        return int(setting)
    if device.type == "cuda":
        return max(0, min(8, (os.cpu_count() or 1) - 1))
    return 0
