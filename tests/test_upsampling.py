"""Checkerboard-free upsampling (issue 13): resize-convolution layers, presets, old records, and
tying the phases of a model trained with a phase-split upsampler."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from napari_mpt_deblur.models.config import preset_config
from napari_mpt_deblur.models.layers import ResizeConvUpsample
from napari_mpt_deblur.models.phase_tying import phase_imbalance, tie_upsampling_phases
from napari_mpt_deblur.models.registry import build_model, load_model, save_model

PHASE_SPLIT = {"h2t_unet": "transposed", "mpt": "pixel_shuffle"}


def _nyquist_share(y: torch.Tensor) -> float:
    """Share of the power of (B, C, H, W) maps on the Nyquist row and column of the spectrum."""
    power = torch.fft.fft2(y.detach().double()).abs() ** 2
    h, w = y.shape[-2:]
    nyq = power[..., h // 2, :].sum() + power[..., :, w // 2].sum() - power[..., h // 2, w // 2].sum()
    return float(nyq / power.sum())


def test_resize_conv_output_has_no_nyquist_energy_and_a_transposed_conv_has():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 24)
    up = ResizeConvUpsample(8, 4)
    y = up(x)
    assert y.shape == (2, 4, 32, 48)
    assert _nyquist_share(y) < 1e-12
    transposed = nn.ConvTranspose2d(8, 4, 2, stride=2)
    assert _nyquist_share(transposed(x)) > 1e-3


@pytest.mark.parametrize("arch", ["h2t_unet", "mpt"])
def test_presets_use_resize_conv_and_the_mpt_paper_preset_stays_the_published_network(arch):
    for preset in ("small", "tiny"):
        assert preset_config(arch, preset).upsample == "resize_conv"
    expected = "pixel_shuffle" if arch == "mpt" else "resize_conv"
    assert preset_config(arch, "paper").upsample == expected
    assert preset_config(arch, "tiny", upsample=PHASE_SPLIT[arch]).upsample == PHASE_SPLIT[arch]


@pytest.mark.parametrize("arch", ["h2t_unet", "mpt"])
def test_tying_equals_averaging_the_phases_in_place(arch):
    torch.manual_seed(1)
    model = build_model(preset_config(arch, "tiny", upsample=PHASE_SPLIT[arch])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # phases apart, as after training
    assert all(v > 1.0 for v in phase_imbalance(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    tied = tie_upsampling_phases(model)
    assert tied.config.upsample == "resize_conv" and not tied.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched

    reference = copy.deepcopy(model)  # the old network with each upsampler's phases averaged
    with torch.no_grad():
        for up in (reference.unet.ups if arch == "h2t_unet" else reference.ups):
            w = up.weight if arch == "h2t_unet" else up[0].weight
            if arch == "h2t_unet":
                w.copy_(w.mean(dim=(2, 3), keepdim=True).expand_as(w))
            else:
                o = w.shape[0] // 4
                w.copy_(w.reshape(o, 4, *w.shape[1:]).mean(1, keepdim=True).expand(o, 4, *w.shape[1:]).reshape(w.shape))
    assert all(v < 1e-6 for v in phase_imbalance(reference))
    x = torch.rand(2, 1, 128, 192)
    with torch.no_grad():
        out_tied, out_ref, out_old = tied(x), reference(x), model(x)
    assert torch.allclose(out_tied, out_ref, atol=1e-5)
    assert not torch.allclose(out_tied, out_old, atol=1e-3)
    with pytest.raises(ValueError, match="already upsamples with 'resize_conv'"):
        tie_upsampling_phases(tied)


@pytest.mark.parametrize("arch", ["h2t_unet", "mpt"])
def test_a_record_written_before_the_upsample_field_loads_its_old_upsampler(arch, tmp_path):
    torch.manual_seed(2)
    model = build_model(preset_config(arch, "tiny", upsample=PHASE_SPLIT[arch])).eval()
    record_path = save_model(model, tmp_path / "old-model")
    raw = json.loads(record_path.read_text())
    del raw["architecture"]["upsample"]  # as every record written before issue 13
    record_path.write_text(json.dumps(raw))
    loaded = load_model(record_path)
    assert loaded.record.architecture.upsample == PHASE_SPLIT[arch]
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_the_paper_mpt_as_resize_conv_has_fewer_upsampler_weights():
    paper = build_model(preset_config("mpt", "paper", in_channels=3))
    resize = build_model(preset_config("mpt", "paper", in_channels=3, upsample="resize_conv"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # Each upsampler's 3x3 conv C -> 2C becomes C -> C/2: 9 * C * 1.5C fewer weights, C = 80, 160, 320.
    assert count(paper) - count(resize) == sum(9 * c * 3 * c // 2 for c in (80, 160, 320))
