"""Haar DWT, EFCR / EFCRex with gradients, multi-scale L1 (issue 3)."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch

from napari_mpt_deblur.losses import (
    EFCRConfig,
    EFCRObjective,
    basic_cr,
    haar_dwt2,
    haar_idwt2,
    low_high,
    multiscale_pixel_loss,
    random_reblur,
)
from napari_mpt_deblur.losses.efcr import gaussian_blur, single_scale
from napari_mpt_deblur.models.config import MPTConfig, preset_config
from napari_mpt_deblur.models.registry import build_model




@pytest.mark.parametrize("shape", [(2, 3, 16, 24), (1, 1, 9, 13), (5, 7)])
def test_haar_matches_pywavelets(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape)
    ll, (lh, hl, hh) = haar_dwt2(torch.from_numpy(x))
    ca, (ch, cv, cd) = pywt.dwt2(x, "haar", axes=(-2, -1))
    for ours, ref in ((ll, ca), (lh, ch), (hl, cv), (hh, cd)):
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6, rtol=0)


def test_haar_inverts_exactly_and_is_orthonormal():
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    ll, details = haar_dwt2(x)
    back = haar_idwt2(ll, details)
    assert back.shape == x.shape
    assert torch.max(torch.abs(back - x)) < 1e-12
    energy = sum(float((b**2).sum()) for b in (ll, *details))
    assert energy == pytest.approx(float((x**2).sum()), rel=1e-12)
    # f_l / f_h channel layout used by EFCR
    f_l, f_h = low_high(x)
    assert f_l.shape == (2, 3, 16, 24) and f_h.shape == (2, 9, 16, 24)
    assert torch.equal(f_h[:, 3:6], details[1])


def test_haar_is_differentiable():
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: low_high(t)[1].square().sum(), (x,))


def test_random_reblur_sizes_and_reproducibility():
    x = torch.rand(8, 1, 32, 32)
    a, sizes = random_reblur(x, (3, 5, 7), torch.Generator().manual_seed(1))
    b, sizes_b = random_reblur(x, (3, 5, 7), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(sizes, sizes_b)
    assert set(sizes.tolist()) <= {3, 5, 7}
    for i, k in enumerate(sizes.tolist()):
        assert torch.allclose(a[i : i + 1], gaussian_blur(x[i : i + 1], k))
    const = torch.full((2, 1, 16, 16), 0.4)
    assert torch.allclose(random_reblur(const)[0], const, atol=1e-6)
    # Larger kernels smooth more.
    noise = torch.randn(1, 1, 64, 64)
    assert gaussian_blur(noise, 7).std() < gaussian_blur(noise, 5).std() < gaussian_blur(noise, 3).std()
    with pytest.raises(ValueError, match="reblur_kernel_sizes"):
        EFCRConfig(reblur_kernel_sizes=(4,))


def _tiny_mpt(seed: int = 0):
    """A two-level MPT (same blocks as the presets, 8 channels) so gradient tests run in ms."""
    torch.manual_seed(seed)
    return build_model(MPTConfig(preset="micro", dim=8, heads=(1, 2), scales=((0.5, 1.0), (1.0, 1.0)), window_size=4))


def _batch(seed: int, n: int = 2, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(n, 1, size, size, generator=g)
    inp = gaussian_blur(gt, 7) + 0.01 * torch.randn(n, 1, size, size, generator=g)
    return inp, gt


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def test_cr_term_has_gradients_wrt_model_parameters():
    model = _tiny_mpt()
    inp, gt = _batch(1)
    terms = EFCRObjective(EFCRConfig(beta=1.0))(single_scale(model), inp, gt, generator=torch.Generator().manual_seed(0))
    assert terms.cr.requires_grad and terms.l_ext is not None
    terms.cr.backward()
    grads = _grads(model)
    nonzero = [k for k, g in grads.items() if g.abs().max() > 0]
    assert len(nonzero) > 0.9 * len(list(model.parameters())), f"{len(nonzero)} params got CR gradients"
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_one_step_on_the_efcr_term_alone_changes_the_weights():
    model = _tiny_mpt()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inp, gt = _batch(2)
    terms = EFCRObjective(EFCRConfig(beta=1e-5))(single_scale(model), inp, gt, generator=torch.Generator().manual_seed(0))
    (terms.total - terms.pixel).backward()  # = beta * CR only
    opt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 0.9 * len(before)
    # The extended pass carries gradient too: switching it off changes the CR gradient.
    def cr_grads(extended_grad: bool, cap: float | None = None):
        m = _tiny_mpt()
        t = EFCRObjective(EFCRConfig(beta=1.0, extended_grad=extended_grad, extended_cap=cap))(
            single_scale(m), inp, gt, generator=torch.Generator().manual_seed(0))
        t.cr.backward()
        return _grads(m), float(t.cr)
    with_ext, cr_a = cr_grads(True)
    without_ext, cr_b = cr_grads(False)
    assert cr_a == pytest.approx(cr_b, rel=1e-5)  # same value, different gradient
    scale = max(float(g.abs().max()) for g in without_ext.values())
    diff = max(float((with_ext[k] - without_ext[k]).abs().max()) for k in with_ext)
    assert diff > 1e-3 * scale
    # Clipped (the default cap 1): this random net changes the reblurred high band by more than
    # the reblur did, so L_ext sits above the cap and the extended pass gives no gradient at all
    # (up to float32 rounding: the two graphs sum the same gradients in a different order).
    capped_ext, _ = cr_grads(True, cap=1.0)
    capped_no_ext, _ = cr_grads(False, cap=1.0)
    capped_scale = max(float(g.abs().max()) for g in capped_no_ext.values())
    assert max(float((capped_ext[k] - capped_no_ext[k]).abs().max()) for k in capped_ext) < 1e-5 * capped_scale


def test_efcrex_unlabeled_batch_gets_gradient_that_depends_on_it():
    model = _tiny_mpt()
    inp, gt = _batch(3)
    # Uncapped: this random net's L_ext is above the default cap of 1, where it has no gradient.
    objective = EFCRObjective(EFCRConfig(beta=1.0, extended_cap=None))

    def run(unlabeled: torch.Tensor):
        model.zero_grad()
        u = unlabeled.clone().requires_grad_(True)
        terms = objective(single_scale(model), inp, gt, extra_inp=u, generator=torch.Generator().manual_seed(5))
        terms.cr.backward()
        return terms, u.grad, _grads(model)

    u1 = _batch(10)[0]
    u2 = _batch(11)[0]
    t1, g_u1, g1 = run(u1)
    t2, _, g2 = run(u2)
    assert g_u1 is not None and g_u1.abs().max() > 0  # the unlabeled images are in the graph
    # L+ and L- come from the labeled batch: identical for both runs; L_ext' from the unlabeled one.
    assert torch.allclose(t1.l_pos, t2.l_pos) and torch.allclose(t1.l_neg, t2.l_neg)
    assert not torch.allclose(t1.l_ext, t2.l_ext)
    diff = max(float((g1[k] - g2[k]).abs().max()) for k in g1)
    assert diff > 1e-8
    with pytest.raises(ValueError, match="pairs sample i"):
        objective(single_scale(model), inp, gt, extra_inp=u1[:1])


def test_efcrex_labeled_uses_extra_pairs_on_high_bands():
    model = _tiny_mpt()
    inp, gt = _batch(4)
    x_inp, x_gt = _batch(6)
    terms = EFCRObjective(EFCRConfig(beta=1.0))(
        single_scale(model), inp, gt, extra_inp=x_inp, extra_gt=x_gt, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_extra = model(x_inp)
    from napari_mpt_deblur.losses.haar import high
    expected_pos = (high(out_extra) - high(x_gt)).abs().flatten(1).mean(1)
    assert torch.allclose(terms.l_pos, expected_pos, atol=1e-5)
    terms.cr.backward()
    assert any(p.grad.abs().max() > 0 for p in model.parameters())


def test_basic_cr_values_and_plain_l1_when_beta_zero():
    gt = torch.rand(2, 1, 8, 8)
    inp = gaussian_blur(gt, 5)
    l_pos, l_neg = basic_cr(gt, gt, inp)
    assert torch.all(l_pos == 0) and torch.all(l_neg > 0)
    l_pos, l_neg = basic_cr(inp, gt, inp)
    assert torch.all(l_pos > 0) and torch.all(l_neg == 0)
    terms = EFCRObjective(EFCRConfig(beta=0.0))(lambda x: [x * 0.5], inp, gt)
    assert terms.cr is None
    assert float(terms.total) == pytest.approx(float((inp * 0.5 - gt).abs().mean()))


def test_pixel_loss_mse_is_the_mean_squared_error_at_every_scale():
    """EFCRConfig.pixel_loss "mse": single-scale and multi-scale (H2T) pixel terms are mean squared
    errors; the contrastive ratio is unchanged; an unknown name is refused."""
    gt = torch.rand(2, 1, 8, 8)
    inp = gaussian_blur(gt, 5)
    plain = EFCRObjective(EFCRConfig(beta=0.0, pixel_loss="mse"))(lambda x: [x * 0.5], inp, gt)
    assert float(plain.total) == pytest.approx(float(((inp * 0.5 - gt) ** 2).mean()), rel=1e-6)
    l1 = EFCRObjective(EFCRConfig(beta=1.0))(lambda x: [x * 0.5], inp, gt, reblur_sizes=[3, 3])
    sq = EFCRObjective(EFCRConfig(beta=1.0, pixel_loss="mse"))(lambda x: [x * 0.5], inp, gt, reblur_sizes=[3, 3])
    assert float(sq.cr) == pytest.approx(float(l1.cr), rel=1e-6)
    assert float(sq.pixel) == pytest.approx(float(((inp * 0.5 - gt) ** 2).mean()), rel=1e-6)
    pooled = [torch.nn.functional.avg_pool2d(gt, 2) + 0.1, gt - 0.2]
    assert float(multiscale_pixel_loss(pooled, gt, "mse")) == pytest.approx((0.01 + 0.04) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="pixel_loss"):
        EFCRConfig(pixel_loss="l2")


def test_multiscale_l1_with_h2t_unet():
    torch.manual_seed(0)
    net = build_model(preset_config("h2t_unet", "tiny", 1))
    x = torch.rand(2, 1, 32, 32)
    outs = net.forward_scales(x)
    loss = multiscale_pixel_loss(outs, x)
    expected = np.mean([float((o - torch.nn.functional.avg_pool2d(x, 32 // o.shape[-1]) if o.shape[-1] < 32 else o - x)
                              .abs().mean()) for o in outs])
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    pooled = [torch.nn.functional.avg_pool2d(x, 2), x]
    assert float(multiscale_pixel_loss(pooled, x)) == 0.0
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    terms = EFCRObjective(EFCRConfig(beta=1.0))(net.forward_scales, x, x)
    assert float(terms.pixel) == pytest.approx(float(multiscale_pixel_loss(net.forward_scales(x), x)), rel=1e-5)


def test_efcrex_extra_patches_of_another_size_run_separately():
    """Extra (unlabeled) patches need not match the main batch's size: the objective then calls
    the network once per part instead of on one concatenated batch."""
    model = _tiny_mpt()
    inp, gt = _batch(2)
    size = inp.shape[-1] * 2
    unlabeled = torch.rand(inp.shape[0], 1, size, size, generator=torch.Generator().manual_seed(3))
    terms = EFCRObjective(EFCRConfig(beta=1.0))(single_scale(model), inp, gt, extra_inp=unlabeled,
                                                generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(terms.total) and terms.l_ext.shape == (inp.shape[0],)
    with torch.no_grad():
        expected = float((model(inp) - gt).abs().mean())
    assert float(terms.pixel) == pytest.approx(expected, rel=1e-5)


def test_extended_term_is_capped_and_the_lowpass_hides_a_period_2_pattern():
    """Issue 13: above the cap L_ext no longer lowers the ratio (a net cannot buy a lower loss by
    changing the reblurred image's high band MORE than the reblur did), and with ``below_nyquist``
    a checkerboard added to the output changes no contrastive distance."""
    from napari_mpt_deblur.losses.efcr import nyquist_lowpass

    inp, gt = _batch(4)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    board = 0.05 * (-1.0) ** (yy + xx)

    def terms(net, **cfg):
        return EFCRObjective(EFCRConfig(beta=1.0, **cfg))(single_scale(net), inp, gt, generator=torch.Generator().manual_seed(0))

    identity = lambda x: x  # noqa: E731
    boarded = lambda x: x + board  # noqa: E731
    plain = terms(boarded, extended_cap=None)
    assert float(plain.l_ext.min()) > 1.0  # the pattern alone over-"restores" the reblur
    capped = terms(boarded)
    assert torch.allclose(capped.l_ext, plain.l_ext)  # reported raw ...
    assert float(capped.cr) > float(plain.cr)  # ... but the ratio uses min(L_ext, 1)
    hidden = terms(boarded, below_nyquist=True)
    clean = terms(identity, below_nyquist=True)
    # The identity scores 0 on both; the board is invisible (float rounding only), where unfiltered
    # it scored L_ext > 1 above.
    assert torch.allclose(hidden.l_neg, clean.l_neg, atol=1e-6) and float(hidden.l_ext.max()) < 1e-4
    assert float(nyquist_lowpass(board[None, None]).abs().max()) < 1e-6


def test_nyquist_loss_sees_a_period_2_pattern_and_nothing_else():
    """Issue 13: the Nyquist coefficients are the amplitudes of the three period-2 patterns (and 0
    for a smooth image); the loss enters the total with its weight, covers the reblurred
    unlabeled outputs too, and carries gradients."""
    from napari_mpt_deblur.losses.efcr import nyquist_coefficients, nyquist_l1

    inp, gt = _batch(4, n=4)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    patterns = torch.stack([(-1.0) ** yy, (-1.0) ** xx, (-1.0) ** (yy + xx)])
    amplitudes = torch.tensor([0.03, -0.02, 0.01])
    coeffs = nyquist_coefficients((amplitudes[:, None, None] * patterns).sum(0)[None, None])
    assert torch.allclose(coeffs[0, 0], amplitudes, atol=1e-7)
    smooth = torch.cos(2 * torch.pi * (yy + 3 * xx) / 32)[None, None] + 5  # periodic, far below Nyquist
    assert float(nyquist_coefficients(smooth).abs().max()) < 1e-6
    assert float(nyquist_l1(inp + 0.02 * patterns[1], inp)) == pytest.approx(0.02 / 3, rel=1e-5)
    # A pattern whose sign follows the content cancels over the whole image, not per block.
    flipping = torch.cat([patterns[1], -patterns[1]], dim=0)[None, None]  # (1, 1, 64, 32)
    assert float(nyquist_coefficients(flipping).abs().max()) < 1e-7
    assert nyquist_coefficients(flipping, 32).shape == (1, 1, 2, 1, 3)
    assert float(nyquist_l1(flipping, torch.zeros_like(flipping))) == pytest.approx(1 / 3, rel=1e-6)
    # Sides that are not multiples of the block: blocks tile what fits; an odd side is cropped to
    # an even one, so a constant image has no Nyquist content.
    odd = 0.02 * (-1.0) ** torch.arange(70.0).expand(40, 70)[None, None]
    assert nyquist_coefficients(odd, 32).shape == (1, 1, 1, 2, 3)
    assert torch.allclose(nyquist_coefficients(odd, 32)[..., 1], torch.full((1, 1, 1, 2), 0.02))
    assert float(nyquist_coefficients(torch.full((1, 1, 33, 33), 7.0)).abs().max()) == 0.0
    with pytest.raises(ValueError, match="even"):
        nyquist_coefficients(odd, 31)

    amplitude = torch.tensor(0.02, requires_grad=True)
    net = lambda x: x + amplitude * patterns[1]  # noqa: E731
    plain = EFCRObjective(EFCRConfig(beta=0.0))(single_scale(net), inp, gt)
    terms = EFCRObjective(EFCRConfig(beta=0.0, nyquist_weight=2.0))(single_scale(net), inp, gt)
    assert plain.nyquist is None
    assert float(terms.nyquist) == pytest.approx(float(nyquist_l1(net(inp), gt)), rel=1e-6)
    assert float(terms.total) == pytest.approx(float(plain.total) + 2.0 * float(terms.nyquist), rel=1e-6)
    assert terms.as_floats()["nyquist"] == pytest.approx(float(terms.nyquist))
    # Unlabeled EFCRex: the reblurred images' outputs are compared with the images themselves.
    unlabeled = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(9))
    sizes = [3, 5, 7, 3]
    with_cr = EFCRObjective(EFCRConfig(beta=1.0, nyquist_weight=2.0))(single_scale(net), inp, gt, extra_inp=unlabeled,
                                                                     reblur_sizes=sizes)
    from napari_mpt_deblur.losses.efcr import random_reblur

    b_in = random_reblur(unlabeled, (3, 5, 7), None, sizes)[0]
    expected = nyquist_l1(net(inp), gt) + nyquist_l1(net(b_in), unlabeled)
    assert float(with_cr.nyquist) == pytest.approx(float(expected), rel=1e-5)
    # Its gradient alone shrinks the planted pattern: +1/3 from each compared output (main and
    # reblurred; the x bin is one of the 3 bins averaged, every sample above its reference).
    (grad,) = torch.autograd.grad(with_cr.nyquist, amplitude)
    assert float(grad) == pytest.approx(2 / 3, rel=1e-4)
