"""Architecture contracts: shapes, gradients, determinism, CSWA locality, parameter budget."""

from __future__ import annotations

import pytest
import torch

from napari_mpt_deblur.models.config import MPTConfig, preset_config
from napari_mpt_deblur.models.layers import crop_to, reflect_pad_to_multiple
from napari_mpt_deblur.models.mpt import CrossScaleWindowAttention
from napari_mpt_deblur.models.registry import build_model

ARCHS = ("mpt", "h2t_unet")
PRESETS = ("paper", "small", "tiny")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", PRESETS)
# A whole 520 x 696 BBBC006 field through the paper/small MPT takes 30-75 s on 2 CPU cores.
@pytest.mark.parametrize("shape", [pytest.param((1, 1, 520, 696), marks=pytest.mark.slow), (1, 3, 130, 77), (2, 1, 64, 64)])
def test_output_shape_equals_input_shape(arch, preset, shape):
    model = build_model(preset_config(arch, preset, in_channels=shape[1])).eval()
    x = torch.rand(shape)
    with torch.inference_mode():
        y = model(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", PRESETS)
def test_gradients_reach_every_parameter(arch, preset):
    model = build_model(preset_config(arch, preset, in_channels=1)).train()
    size = model.size_multiple
    x = torch.rand(1, 1, size, size)
    model(x).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_h2t_concat_fusion_gradients_and_scales():
    cfg = preset_config("h2t_unet", "tiny", 1).model_copy(update={"fusion": "concat", "num_scales": 3})
    model = build_model(cfg)
    x = torch.rand(2, 1, cfg.size_multiple, cfg.size_multiple)
    outs = model.forward_scales(x)
    assert [o.shape[-1] for o in outs] == [cfg.size_multiple // 4, cfg.size_multiple // 2, cfg.size_multiple]
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match="multiples of"):
        model.forward_scales(torch.rand(1, 1, cfg.size_multiple + 1, cfg.size_multiple))


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_mode_is_deterministic(arch):
    model = build_model(preset_config(arch, "tiny", 1)).eval()
    x = torch.rand(1, 1, 100, 140)
    with torch.inference_mode():
        assert torch.equal(model(x), model(x))


def test_wrong_channel_count_is_rejected_with_clear_message():
    model = build_model(preset_config("mpt", "tiny", 1))
    with pytest.raises(ValueError, match=r"expects \(B, 1, H, W\).*\(1, 3, 64, 64\)"):
        model(torch.rand(1, 3, 64, 64))


def test_paper_preset_parameter_budget_is_exact():
    model = build_model(preset_config("mpt", "paper", in_channels=3))
    assert sum(p.numel() for p in model.parameters()) == 19_799_356


def test_paper_preset_macs_match_the_paper():
    from napari_mpt_deblur.models.complexity import count_conv_linear_macs

    model = build_model(preset_config("mpt", "paper", in_channels=3)).eval()
    macs = count_conv_linear_macs(model, (1, 3, 256, 256))
    assert abs(macs - 76.2e9) / 76.2e9 < 0.03


def test_sub_block_parameter_formula():
    """SPEC's per-sub-block budget: 6C + (4C^2+27C+h) + (4C^2+27C+226h [+C^2]) + 3CF + 9F."""
    from napari_mpt_deblur.models.mpt import PyramidSubBlock

    for c, h, s in [(40, 1, 1 / 8), (80, 2, 1.0), (320, 8, 1 / 2)]:
        f = int(2.6 * c)
        block = PyramidSubBlock(c, h, s, 8, False, 2.6)
        expected = 6 * c + (4 * c * c + 27 * c + h) + (4 * c * c + 27 * c + h + 225 * h) + 3 * c * f + 9 * f
        expected += c * c if s < 1 else 0
        assert sum(p.numel() for p in block.parameters()) == expected


# ------------------------------------------------------------------------------------------
# CSWA locality: a query window sees exactly the pooled window that covers it.

def _cswa_output_window(layer, x, rows, cols):
    with torch.no_grad():
        return layer(x)[..., rows[0] : rows[1], cols[0] : cols[1]]


def _perturb_outside(x, rows, cols):
    y = x.clone()
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[..., rows[0] : rows[1], cols[0] : cols[1]] = True
    y[~keep] = torch.rand(int((~keep).sum()))
    return y


@pytest.mark.parametrize("shifted", [False, True])
def test_cswa_query_window_sees_only_its_covering_pooled_window(shifted):
    torch.manual_seed(1)
    m, factor = 8, 4  # scale 1/4: one pooled 8x8 window covers a 32x32 region = 16 query windows
    layer = CrossScaleWindowAttention(8, 2, 1 / factor, window_size=m, shifted=shifted).eval()
    x = torch.rand(1, 8, 128, 128)
    q_rows, q_cols = (40, 48), (48, 56)  # the query window at window-grid position (5, 6)
    # Region covered by the paired pooled window (in full-resolution pixels). Unshifted: pooled
    # window (floor(5/4), floor(6/4)) = (1, 1) covers [32, 64)^2. Shifted: groups start 16 px
    # (= M/(2s)) later, so the covering region is rows [16, 48), cols [48, 80).
    region = ((32, 64), (32, 64)) if not shifted else ((16, 48), (48, 80))
    # The 3x3 depthwise convs ("NPConv") see one pixel beyond a window: one pooled pixel
    # (= factor full-res pixels) for keys/values, so pixels within `factor` of the region matter.
    halo = factor
    rows = (region[0][0] - halo, region[0][1] + halo)
    cols = (region[1][0] - halo, region[1][1] + halo)
    ref = _cswa_output_window(layer, x, q_rows, q_cols)

    outside = _perturb_outside(x, rows, cols)
    assert torch.allclose(_cswa_output_window(layer, outside, q_rows, q_cols), ref, atol=1e-6)

    # A pixel inside the covering region but in ANOTHER query window still changes the output:
    # the pairing is spatial, the receptive field is the whole M/s x M/s region.
    inside = x.clone()
    inside[..., region[0][1] - 6 : region[0][1] - 2, region[1][0] + 2 : region[1][0] + 6] += 5.0
    changed = _cswa_output_window(layer, inside, q_rows, q_cols)
    assert (changed - ref).abs().max() > 1e-3


def test_cswa_shift_mask_blocks_wrapped_regions():
    """After the cyclic roll, the top rows share a group with the bottom rows; the mask must
    keep them apart, so the top query window does not see the bottom of the image."""
    torch.manual_seed(2)
    layer = CrossScaleWindowAttention(8, 2, 1 / 4, window_size=8, shifted=True).eval()
    x = torch.rand(1, 8, 128, 128)
    q_rows, q_cols = (0, 8), (48, 56)
    ref = _cswa_output_window(layer, x, q_rows, q_cols)
    y = x.clone()
    y[..., 128 - 24 :, :] = torch.rand(1, 8, 24, 128) * 5
    assert torch.allclose(_cswa_output_window(layer, y, q_rows, q_cols), ref, atol=1e-6)
    # It does depend on its own region: rows [0, 16) (the wrapped group's top part), cols [48, 80).
    z = x.clone()
    z[..., 10:14, 60:64] += 5.0
    assert (_cswa_output_window(layer, z, q_rows, q_cols) - ref).abs().max() > 1e-3


def test_fefn_without_autograd_is_the_same_function_and_leaves_its_inputs_alone():
    """Without autograd FEFN computes GELU and the product in place, in its own hidden map."""
    from napari_mpt_deblur.models.mpt import FeatureEnhancingFFN

    torch.manual_seed(4)
    ffn = FeatureEnhancingFFN(8, 2.6).eval()
    x1, x2 = torch.randn(2, 8, 12, 20), torch.randn(2, 8, 12, 20)
    kept1, kept2 = x1.clone(), x2.clone()
    with_grad = ffn(x1, x2)
    assert with_grad.requires_grad
    with torch.no_grad():
        no_grad = ffn(x1, x2)
    with torch.inference_mode():
        inference = ffn(x1, x2)
    assert torch.allclose(no_grad, with_grad.detach(), atol=1e-6)
    assert torch.allclose(inference, with_grad.detach(), atol=1e-6)
    assert torch.equal(x1, kept1) and torch.equal(x2, kept2)


def test_residual_additions_stay_float32_under_autocast_and_keep_gradients():
    """Residuals are added into the branch output in place, except when the branch is in lower
    precision (autocast): then the sum is a new float32 map, as x + branch would be."""
    from napari_mpt_deblur.models.mpt import _add_residual

    x = torch.randn(1, 4, 8, 8)
    branch = torch.randn(1, 4, 8, 8)
    expected = x + branch
    same = _add_residual(branch, x)
    assert same.data_ptr() == branch.data_ptr() and torch.equal(same, expected)
    low = torch.randn(1, 4, 8, 8).to(torch.bfloat16)
    mixed = _add_residual(low, x)
    assert mixed.dtype == torch.float32 and mixed.data_ptr() != low.data_ptr()
    assert torch.equal(mixed, x + low)
    # A whole MPT under CPU bf16 autocast returns float32 like before.
    model = build_model(preset_config("mpt", "tiny", 1)).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(1, 1, 64, 64))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_cswa_rejects_sizes_off_the_grid():
    layer = CrossScaleWindowAttention(8, 1, 1 / 2, window_size=8)
    with pytest.raises(ValueError, match="multiples of 16"):
        layer(torch.rand(1, 8, 24, 32))


def test_cswa_rejects_non_reciprocal_scale():
    with pytest.raises(ValueError, match="1/n"):
        CrossScaleWindowAttention(8, 1, 0.3)


# ------------------------------------------------------------------------------------------
# Configs and padding


def test_size_multiple_covers_every_level():
    assert preset_config("mpt", "paper").size_multiple == 128
    assert preset_config("mpt", "tiny").size_multiple == 64
    assert preset_config("h2t_unet", "paper").size_multiple == 64


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="heads"):
        MPTConfig(dim=40, heads=(1, 3, 4, 8))
    with pytest.raises(ValueError, match="scales"):
        MPTConfig(scales=((0.3, 1.0), (1.0,), (1.0,), (1.0,)))
    with pytest.raises(ValueError, match="unknown mpt preset 'huge'"):
        preset_config("mpt", "huge")
    with pytest.raises(ValueError, match="unknown architecture"):
        preset_config("resnet", "tiny")


@pytest.mark.parametrize("h,w", [(1, 1), (5, 3), (64, 64), (65, 130), (200, 7)])
def test_reflect_pad_to_multiple_and_crop_back(h, w):
    x = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)
    padded, size = reflect_pad_to_multiple(x, 64)
    assert padded.shape[-2] % 64 == 0 and padded.shape[-1] % 64 == 0
    assert padded.shape[-2] >= h and padded.shape[-1] >= w
    assert size == (h, w)
    assert torch.equal(crop_to(padded, size), x)
    # Padding takes only values from the image (reflection), never zeros from outside.
    assert set(padded.unique().tolist()) <= set(x.unique().tolist())
