"""Parameter, FLOP and multiply-accumulate counts of the architectures (``mpt-deblur info``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    """All floating-point operations of one forward pass, counted by PyTorch's FlopCounterMode.

    Matrix products of every kind are counted (conv, linear, the attention products), at 2 FLOPs
    per multiply-accumulate; elementwise work (norms, softmax, GELU) is not. MPT attention is
    counted on its reference (matmul) path: FlopCounterMode sees nothing inside the fused CPU
    ``scaled_dot_product_attention`` kernel, and both paths do the same products.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .mpt import attention_backend

    x = torch.zeros(shape)
    with torch.no_grad(), attention_backend("reference"), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def count_conv_linear_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of Conv2d/ConvTranspose2d/Linear modules only (the paper's count)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.ConvTranspose2d):
            kh, kw = module.kernel_size
            total += inputs[0].numel() * (module.out_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(shape))
    finally:
        for h in handles:
            h.remove()
    return total


@dataclass
class ModelComplexity:
    arch: str
    preset: str
    in_channels: int
    out_channels: int
    input_shape: tuple[int, ...]
    parameters: int
    flops: int
    conv_linear_macs: int
    size_multiple: int

    def as_dict(self) -> dict:
        return asdict(self)


def describe(arch: str, preset: str, channels: int = 1, size: int = 256) -> ModelComplexity:
    """Counts for one preset at input 1 x channels x size x size."""
    from .config import preset_config
    from .registry import build_model

    config = preset_config(arch, preset, channels)
    model = build_model(config).eval()
    shape = (1, channels, size, size)
    return ModelComplexity(
        arch=arch,
        preset=preset,
        in_channels=channels,
        out_channels=channels,
        input_shape=shape,
        parameters=count_parameters(model),
        flops=count_flops(model, shape),
        conv_linear_macs=count_conv_linear_macs(model, shape),
        size_multiple=config.size_multiple,
    )
