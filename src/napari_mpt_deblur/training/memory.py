"""How much activation memory a training step needs, measured (``mpt-deblur train --estimate-memory``).

What is measured: the bytes of every tensor that autograd keeps for the backward pass during one
training forward (the EFCR objective's, so the extended pass is included), counted once per
storage and without the weights, through ``torch.autograd.graph.saved_tensors_hooks``. That is
the memory that grows with the batch and the patch and that activation checkpointing trades for
compute. With checkpointing, autograd keeps only each block's input; the block's own activations
exist again, one block at a time, while it is recomputed in the backward pass, so the peak is
the kept tensors plus the largest block's activations (both measured). On CUDA the allocator's
own peak for a whole step is reported too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MemoryEstimate:
    """Activation memory of one configuration, per sample of the batch, in bytes."""

    arch: str
    preset: str
    patch: int
    checkpointing: bool
    kept_per_sample: int  # kept for the backward pass through the whole forward
    recompute_per_sample: int  # extra, one block at a time, while recomputing (checkpointing only)
    cuda_peak_per_sample: int | None = None

    @property
    def peak_per_sample(self) -> int:
        return self.kept_per_sample + self.recompute_per_sample


class _SavedBytes:
    """Counts the bytes autograd saves, once per storage, weights excluded."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.seen: set[int] = set()
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ref = _storage_id(t)
        if ref not in self.exclude and ref not in self.seen:
            self.seen.add(ref)
            self.total += storage.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def _storage_id(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (its C++ object: also unique on the meta device, where
    every data pointer is 0)."""
    return t.untyped_storage()._cdata


def _blocks(net: nn.Module) -> list[nn.Module]:
    """The modules that activation checkpointing recomputes as a unit."""
    from ..models.h2t_unet import HeadToTailUNet
    from ..models.mpt import MultiPyramidTransformer

    if isinstance(net, MultiPyramidTransformer):
        return [*net.encoders, net.bottleneck, *net.decoders]
    if isinstance(net, HeadToTailUNet):
        return [*net.unet.encoders, *net.unet.decoders]
    return []


def _objective_forward(net: nn.Module, batch: int, patch: int, efcr, device: torch.device,
                       counter: _SavedBytes | None) -> torch.Tensor:
    from ..losses.efcr import EFCRObjective
    from .network import ScalesModule

    channels = net.config.in_channels
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(batch, channels, patch, patch, generator=g).to(device)
    inp = (gt + 0.05 * torch.randn(batch, channels, patch, patch, generator=g).to(device)).clamp(0, 1)
    objective = EFCRObjective(efcr)
    if counter is None:
        return objective(ScalesModule(net), inp, gt, reblur_sizes=[3] * batch).total
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        return objective(ScalesModule(net), inp, gt, reblur_sizes=[3] * batch).total


def measure(net: nn.Module, patch: int, efcr=None, checkpointing: bool = False, batch: int = 2,
            device: torch.device | str = "cpu") -> MemoryEstimate:
    """Measure the activation memory per sample of ``net`` at ``patch`` px (see the module doc).

    The difference between a batch of ``batch`` and a batch of 1 is divided by ``batch - 1``, so
    what does not grow with the batch (e.g. buffers) is left out. ``device="meta"`` runs the same
    code on shapes only (no arithmetic, no memory): the same tensors are saved, so the count is
    the same as on a real device, quickly, for configurations that would not fit here."""
    device = torch.device(device)
    if device.type == "meta":
        # The fused attention kernels have no meta version (PyTorch would count its math
        # fallback): count the explicit-matmul reference path, exact for it and an upper bound for
        # the fused path, which keeps less.
        from ..models.mpt import attention_backend

        with attention_backend("reference"):
            return _measure(net, patch, efcr, checkpointing, batch, device)
    return _measure(net, patch, efcr, checkpointing, batch, device)


def _measure(net: nn.Module, patch: int, efcr, checkpointing: bool, batch: int, device: torch.device,
             ) -> MemoryEstimate:
    from ..losses.efcr import EFCRConfig
    from ..models.layers import set_gradient_checkpointing

    efcr = efcr or EFCRConfig()
    if device.type == "meta":
        import copy

        net = copy.deepcopy(net)
    net = net.to(device).train()
    weights = {_storage_id(p) for p in net.parameters()} | {_storage_id(b) for b in net.buffers()}

    def kept(b: int, ckpt: bool) -> tuple[int, list[int]]:
        set_gradient_checkpointing(net, ckpt)
        counter = _SavedBytes(weights)
        per_block: list[int] = []
        hooks = []
        if not ckpt:
            starts: dict[int, int] = {}
            for block in _blocks(net):
                hooks.append(block.register_forward_pre_hook(
                    lambda m, a, starts=starts: starts.__setitem__(id(m), counter.total)))
                hooks.append(block.register_forward_hook(
                    lambda m, a, o, starts=starts: per_block.append(counter.total - starts[id(m)])))
        try:
            loss = _objective_forward(net, b, patch, efcr, device, counter)
        finally:
            for h in hooks:
                h.remove()
            set_gradient_checkpointing(net, False)
        del loss
        return counter.total, per_block

    one, blocks_one = kept(1, False)
    many, blocks_many = kept(batch, False)
    plain_per_sample = (many - one) // (batch - 1)
    if checkpointing:
        k1, _ = kept(1, True)
        kb, _ = kept(batch, True)
        kept_per_sample = (kb - k1) // (batch - 1)
        # A checkpointed block runs on the whole (EFCR-extended) batch at once when recomputed.
        largest = max((m - o for m, o in zip(blocks_many, blocks_one)), default=0) // (batch - 1)
        recompute = largest
    else:
        kept_per_sample, recompute = plain_per_sample, 0
    cuda_peak = None
    if device.type == "cuda":
        cuda_peak = _cuda_peak_per_sample(net, patch, efcr, device, checkpointing, batch)
    cfg = net.config
    return MemoryEstimate(cfg.arch, cfg.preset, patch, checkpointing, kept_per_sample, recompute, cuda_peak)


def _cuda_peak_per_sample(net, patch, efcr, device, checkpointing, batch) -> int:
    from ..models.layers import set_gradient_checkpointing

    peaks = []
    set_gradient_checkpointing(net, checkpointing)
    try:
        for b in (1, batch):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            loss = _objective_forward(net, b, patch, efcr, device, None)
            loss.backward()
            net.zero_grad(set_to_none=True)
            del loss
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
    finally:
        set_gradient_checkpointing(net, False)
    return (peaks[1] - peaks[0]) // (batch - 1)


def estimate_config(config) -> list[MemoryEstimate]:
    """Both settings (without and with checkpointing) for a training config's model and patch:
    counted on the meta device (shapes only), plus the allocator's peak when training on CUDA."""
    from .network import build_network

    net, _ = build_network(config)
    cuda = str(config.device).startswith(("cuda", "auto")) and torch.cuda.is_available()
    rows = []
    for ckpt in (False, True):
        row = measure(net, config.patch.size, config.efcr, ckpt, device="meta")
        if cuda:
            row.cuda_peak_per_sample = _cuda_peak_per_sample(net.to("cuda"), config.patch.size, config.efcr,
                                                             torch.device("cuda"), ckpt, 2)
        rows.append(row)
    return rows


def format_estimates(rows: list[MemoryEstimate]) -> str:
    lines = [f"{'model':<16} {'patch':>5} {'checkpointing':>13} {'kept MiB/sample':>16} {'peak MiB/sample':>16}"
             + ("  cuda peak MiB/sample" if any(r.cuda_peak_per_sample for r in rows) else "")]
    for r in rows:
        line = (f"{r.arch + '/' + r.preset:<16} {r.patch:>5} {('on' if r.checkpointing else 'off'):>13} "
                f"{r.kept_per_sample / 2**20:>16.1f} {r.peak_per_sample / 2**20:>16.1f}")
        if r.cuda_peak_per_sample is not None:
            line += f"  {r.cuda_peak_per_sample / 2**20:>20.1f}"
        lines.append(line)
    lines.append("measured: bytes autograd keeps for the backward pass in one EFCR training forward (extended pass "
                 "included), fp32; under bf16 autocast most activations take half.")
    return "\n".join(lines)
