"""The fused (SDPA) attention path against the explicit matmul reference, and FLOP counting.

Tolerance: fp32, |sdpa - reference| <= 1e-5 per attention layer (outputs are O(1)); a whole
network, 24-36 sub-blocks deep, within 1e-4. The two paths differ only in summation order
inside the fused kernel.
"""

from __future__ import annotations

import pytest
import torch

from napari_mpt_deblur.models import mpt
from napari_mpt_deblur.models.complexity import count_flops
from napari_mpt_deblur.models.config import preset_config
from napari_mpt_deblur.models.mpt import CrossScaleWindowAttention, IntraScaleChannelAttention
from napari_mpt_deblur.models.registry import build_model, load_model


def _both(layer, x):
    with torch.no_grad():
        with mpt.attention_backend("reference"):
            ref = layer(x)
        with mpt.attention_backend("sdpa"):
            fused = layer(x)
    return ref, fused


def _trained_like(layer: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial temperatures and biases, so that folding them into SDPA is really tested."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name in ("logit_scale", "temperature"):
                p.copy_(torch.rand_like(p) * 4.0)  # includes values above the log(100) clamp
            elif name == "relative_position_bias_table":
                p.normal_(0, 1.0)
    return layer.eval()


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("factor", [1, 2, 4])
@pytest.mark.parametrize("groups", [(2, 3), (1, 3), (3, 1), (1, 1)], ids=lambda g: f"{g[0]}x{g[1]}groups")
def test_cswa_sdpa_matches_reference(factor, shifted, batch, groups):
    """Every grid of groups, including a single row or column, where the shifted fused path
    (which runs the last group row and column apart, with their masks) has empty regions."""
    layer = _trained_like(CrossScaleWindowAttention(16, 2, 1 / factor, window_size=8, shifted=shifted))
    x = torch.rand(batch, 16, 8 * factor * groups[0], 8 * factor * groups[1])
    ref, fused = _both(layer, x)
    assert fused.shape == ref.shape == x.shape
    assert torch.isfinite(fused).all()
    assert (fused - ref).abs().max() <= 1e-5
    # A bias that matters: the result is not insensitive to the table (else the test proves little).
    with torch.no_grad():
        layer.relative_position_bias_table.zero_()
    _, fused_no_bias = _both(layer, x)
    assert (fused_no_bias - fused).abs().max() > 1e-3


@pytest.mark.parametrize("batch", [1, 2])
def test_isca_sdpa_matches_reference(batch):
    layer = _trained_like(IntraScaleChannelAttention(24, 3))
    layer.fused_on_cpu = True  # the CPU default is the matmul path (measured faster for ISCA)
    x = torch.rand(batch, 24, 40, 56)
    with torch.no_grad(), torch.profiler.profile() as prof:
        _both(layer, x)
    assert any("scaled_dot_product" in e.name for e in prof.events())  # the fused path really ran
    ref, fused = _both(layer, x)
    assert (fused - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
def test_isca_cpu_path_matches_reference(batch, channels_last):
    """On the CPU the default path works on (H*W, d) matrices (views of a channels-last qkv, a
    copy of a contiguous one) and divides q^T k by |q| |k|^T instead of normalising q and k."""
    layer = _trained_like(IntraScaleChannelAttention(24, 3))
    assert not layer.fused_on_cpu
    x = torch.rand(batch, 24, 40, 56)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.profiler.profile() as prof:
        _, fused = _both(layer, x)
    assert not any("scaled_dot_product" in e.name for e in prof.events())
    ref, fused = _both(layer, x)
    assert (fused - ref).abs().max() <= 1e-5
    # An all-zero map: both floor its norm at 1e-12 and give the same finite output.
    with torch.no_grad():
        layer.qkv.weight[:8].zero_()  # head 1's queries are zero everywhere
    ref, fused = _both(layer, x)
    assert torch.isfinite(fused).all() and (fused - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("layer_kind", ["isca", "cswa_shifted"])
def test_training_gradients_of_the_fast_paths_match_the_reference(layer_kind):
    """Training runs the default paths too: their gradients (parameters and input) are the
    reference's, within fp32 rounding."""
    if layer_kind == "isca":
        layer, x = IntraScaleChannelAttention(16, 2), torch.rand(2, 16, 24, 40)
    else:
        layer, x = CrossScaleWindowAttention(16, 2, 1 / 2, window_size=8, shifted=True), torch.rand(2, 16, 32, 48)
    layer = _trained_like(layer).train()
    grads = {}
    for backend in ("reference", "sdpa"):
        layer.zero_grad()
        xin = x.clone().requires_grad_(True)
        with mpt.attention_backend(backend):
            layer(xin).square().sum().backward()
        grads[backend] = [xin.grad] + [p.grad for p in layer.parameters()]
    for ref, fast in zip(grads["reference"], grads["sdpa"]):
        assert ref is not None and fast is not None
        assert (fast - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_shipped_mpt_loads_unchanged_and_both_paths_agree():
    """The shipped weights load into the same parameter names; the network's output agrees."""
    loaded = load_model("mpt-small-fluo")
    model = loaded.model.eval()
    fresh = build_model(loaded.record.architecture)
    assert set(model.state_dict()) == set(fresh.state_dict())
    x = torch.rand(1, 1, 96, 128)
    ref, fused = _both(model, x)
    assert (fused - ref).abs().max() <= 1e-4
    assert (ref - x).abs().max() > 1e-3  # the trained model does something


def test_default_backend_is_sdpa_and_unknown_names_are_rejected():
    assert mpt.get_attention_backend() == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        mpt.set_attention_backend("flash")
    with mpt.attention_backend("reference"):
        assert mpt.get_attention_backend() == "reference"
    assert mpt.get_attention_backend() == "sdpa"


def test_flop_count_is_the_reference_count_whatever_the_backend():
    """FlopCounterMode does not see inside the fused CPU SDPA kernel, so count_flops always
    counts the reference path: same number under either backend, attention products included."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(preset_config("mpt", "tiny", 1)).eval()
    shape = (1, 1, 64, 64)
    with mpt.attention_backend("reference"):
        ref = count_flops(model, shape)
    fused = count_flops(model, shape)
    assert fused == ref
    assert mpt.get_attention_backend() == "sdpa"  # restored
    # Counting the fused path directly would miss the attention products.
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(shape))
    assert counter.get_total_flops() < ref
