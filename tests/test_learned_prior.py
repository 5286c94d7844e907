"""The learned prior (Kohl et al. 2018): prior and posterior shapes, the KL between two Gaussians,
sampling from the prior, old configs, the NaN guards, and that it learns an ambiguous toy task."""

import math

import pytest
import torch

from model import (LOGVAR_MAX, LOGVAR_MIN, SegVAE, VAEConfig, gaussian_kl, kl_loss, kl_per_dim, latent_channel_kl,
                   segmentation_loss, soft_clamp)

SMALL = dict(num_classes=3, widths=(8, 16), latent_channels=2, latent_dim=4)


def learned(**kw):
    return SegVAE(VAEConfig(**{**SMALL, "prior": "learned", **kw}))


@pytest.mark.parametrize("form, k", [("global", 4), ("spatial", 2 * 8 * 12), ("both", 4 + 2 * 8 * 12)])
@pytest.mark.parametrize("inject", ["head", "bottleneck"])
def test_prior_and_posterior_shapes(form, k, inject):
    torch.manual_seed(0)
    model = learned(latent_form=form, inject=inject)
    x, target = torch.randn(2, 3, 30, 45), torch.randint(0, 4, (2, 30, 45))  # 3 = void
    logits, mu_q, logvar_q, mu_p, logvar_p = model(x, target)
    # 30 x 45 is padded to 32 x 48: an 8 x 12 grid at stride 4.
    assert logits.shape == (2, 3, 30, 45)
    assert mu_q.shape == logvar_q.shape == mu_p.shape == logvar_p.shape == (2, k)
    logits, mu, logvar = model(x)  # no target: z from the prior, whose statistics come back
    assert logits.shape == (2, 3, 30, 45) and torch.equal(mu, mu_p)
    mu, logvar, feats = model.encode(torch.randn(2, 3, 32, 48))
    assert mu.shape == (2, k) and feats[-1].shape == (2, 16, 8, 12)
    assert model.decode(model.reparameterize(mu, logvar), feats, (32, 48)).shape == (2, 3, 32, 48)
    assert latent_channel_kl(kl_per_dim(mu_q, logvar_q, mu_p, logvar_p), model.config).shape == \
        ({"global": 4, "spatial": 2, "both": 6}[form],)


def test_posterior_sees_the_mask():
    torch.manual_seed(0)
    model = learned()
    for p in model.posterior_net.parameters():  # away from the zero init of its output layer
        torch.nn.init.normal_(p, 0, 0.5)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    a = model(x, torch.zeros(1, 32, 32, dtype=torch.long))[1]
    b = model(x, torch.ones(1, 32, 32, dtype=torch.long))[1]
    void = model(x, torch.full((1, 32, 32), 3))[1]
    nothing = model(x, torch.full((1, 32, 32), 255))[1]
    assert not torch.allclose(a, b)
    assert torch.equal(void, nothing)  # every label outside [0, classes) is the same "no class"


def test_gaussian_kl_hand_value_and_torch_distributions():
    # KL(N(1, 0.5) || N(-1, 2)) = 1/2 (log 2 - log 0.5 + 0.5 / 2 + (1 - -1)^2 / 2 - 1)
    expected = 0.5 * (math.log(2) - math.log(0.5) + 0.25 + 2.0 - 1.0)
    got = gaussian_kl(*(torch.tensor(v) for v in (1.0, math.log(0.5), -1.0, math.log(2.0))))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    mq, mp = torch.randn(5, 6, generator=g) * 3, torch.randn(5, 6, generator=g) * 3
    lq, lp = torch.randn(5, 6, generator=g) * 2, torch.randn(5, 6, generator=g) * 2
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mq, (0.5 * lq).exp()),
                                            torch.distributions.Normal(mp, (0.5 * lp).exp()))
    assert torch.allclose(gaussian_kl(mq, lq, mp, lp), ref, rtol=1e-5, atol=1e-5)
    assert torch.all(gaussian_kl(mq, lq, mq, lq) == 0)  # KL(q || q) = 0 exactly
    # With p = N(0, I) it is the standard prior's KL.
    assert torch.allclose(kl_per_dim(mq, lq, torch.zeros(()), torch.zeros(())), kl_per_dim(mq, lq))


def test_kl_loss_units_float32_and_free_bits():
    mu_q, lv_q = torch.ones(2, 6, dtype=torch.bfloat16), torch.zeros(2, 6, dtype=torch.bfloat16)
    mu_p, lv_p = torch.zeros(2, 6, dtype=torch.bfloat16), torch.zeros(2, 6, dtype=torch.bfloat16)
    assert kl_per_dim(mu_q, lv_q, mu_p, lv_p).dtype == torch.float32
    # each dim 1/2 nat per image, 6 dims, over 100 image pixels
    assert kl_loss(mu_q, lv_q, 100, 0.0, mu_p, lv_p).item() == pytest.approx(6 * 0.5 / 100)
    assert kl_loss(mu_p, lv_p, 100, 0.2, mu_p, lv_p).item() == pytest.approx(6 * 0.2 / 100)


def test_logvar_guard_keeps_the_kl_finite():
    x = torch.linspace(-1e4, 1e4, 101)
    y = soft_clamp(x, LOGVAR_MIN, LOGVAR_MAX)
    assert y.min() >= LOGVAR_MIN and y.max() <= LOGVAR_MAX
    assert soft_clamp(torch.tensor(0.0), LOGVAR_MIN, LOGVAR_MAX).abs() < 0.01  # about x inside
    torch.manual_seed(0)
    model = learned()
    with torch.no_grad():  # a prior head gone wild: log-variances of +-1e6
        model.prior_net.to_global.bias.copy_(torch.tensor([0.0] * 4 + [-1e6, 1e6, -1e6, 1e6]))
    x, target = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    logits, *stats = model.train()(x.to(torch.bfloat16).float(), target)
    kl = kl_loss(*stats[:2], 32 * 32, 0.0, *stats[2:])
    assert torch.isfinite(kl) and torch.isfinite(logits).all()
    kl.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("form", ["global", "spatial", "both"])
def test_prior_samples_differ_and_match_decode(form):
    torch.manual_seed(0)
    model = learned(latent_form=form).eval()
    x = torch.randn(2, 3, 32, 32)
    s = model.sample(x, 4, generator=torch.Generator().manual_seed(1))
    assert s.shape == (4, 2, 3, 32, 32)
    assert not torch.allclose(s[0], s[1])  # distinct z, distinct segmentations
    assert torch.equal(s, model.sample(x, 4, generator=torch.Generator().manual_seed(1)))
    # The head-only fast path (U-Net run once) equals decoding each z in full.
    mu, logvar, feats = model.encode(x)
    eps = torch.randn((4, *mu.shape), generator=torch.Generator().manual_seed(1))
    z = mu + torch.exp(0.5 * logvar) * eps
    full = torch.stack([model.decode(z[i], feats, (32, 32)) for i in range(4)])
    assert torch.allclose(s, full, atol=1e-5)
    assert torch.allclose(model.sample(x, 1)[0], model(x)[0], atol=1e-5)  # n = 1: the prior mean


def test_standard_prior_with_target_gives_the_unit_prior():
    torch.manual_seed(0)
    model = SegVAE(VAEConfig(**SMALL)).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, mu, logvar, mu_p, logvar_p = model(x, torch.zeros(2, 32, 32, dtype=torch.long))
    assert torch.equal(logits, model(x)[0]) and mu_p.abs().sum() == 0 and logvar_p.abs().sum() == 0
    assert kl_loss(mu, logvar, 1024, 0.0, mu_p, logvar_p) == kl_loss(mu, logvar, 1024)


def test_old_configs_load_as_the_standard_model():
    old = {"in_channels": 3, "num_classes": 11, "widths": [32, 64, 128, 256], "latent_channels": 32,
           "skip": True, "context": True, "stochastic": True, "extra": {}}
    cfg = VAEConfig.from_dict(old)
    assert (cfg.prior, cfg.latent_form, cfg.inject, cfg.head_convs) == ("standard", "spatial", "bottleneck", 0)
    keys = set(SegVAE(cfg).state_dict())
    assert {"to_stats.weight", "head.weight", "from_latent.0.weight"} <= keys
    assert not any(k.startswith(("prior_net", "posterior_net")) for k in keys)
    new = VAEConfig(prior="learned")
    assert (new.latent_form, new.inject, new.head_convs, new.latent_dim) == ("global", "head", 1, 6)
    assert VAEConfig.from_dict(new.to_dict()) == new
    with pytest.raises(ValueError, match="prior 'standard' has a spatial latent"):
        VAEConfig(latent_form="global")
    with pytest.raises(ValueError, match="prior 'gaussian'"):
        VAEConfig(prior="gaussian")


def test_overfits_a_tiny_batch_with_the_learned_prior():
    torch.manual_seed(0)
    model = learned()
    target = torch.randint(0, 3, (4, 4, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)  # (4, 32, 32)
    colours = torch.tensor([[1.0, -1, 0], [-1, 1, 0], [0, 0, 1]])
    x = colours[target].permute(0, 3, 1, 2) + 0.3 * torch.randn(4, 3, 32, 32)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    first = None
    for _ in range(60):
        logits, *stats = model(x, target)
        loss = segmentation_loss(logits, target, "ce", 255) + kl_loss(*stats[:2], 32 * 32, 0.0, *stats[2:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < 0.3 * first


def test_learns_a_known_ambiguity():
    """One image (noisy copies), two labelings: a square of class 1 or of class 2, 50/50. The
    posterior tells them apart, and samples from the prior show both, about equally often
    (a collapsed model shows one: the share is then 0 or 1)."""
    torch.manual_seed(0)
    model = learned(latent_dim=2)
    x = torch.zeros(1, 3, 16, 16)
    x[:, :, 4:12, 4:12] = 1.0
    opt = torch.optim.Adam(model.parameters(), 5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        which = 1 + torch.randint(0, 2, (8,), generator=g)  # (8,) the square's class per copy
        target = torch.zeros(8, 16, 16, dtype=torch.long)
        target[:, 4:12, 4:12] = which[:, None, None]
        logits, *stats = model(x + 0.3 * torch.randn(8, 3, 16, 16, generator=g), target)
        loss = segmentation_loss(logits, target, "ce", 255) + kl_loss(*stats[:2], 16 * 16, 0.0, *stats[2:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kl_loss(*stats[:2], 1, 0.0, *stats[2:]) > 0.3  # nats per image: the posterior carries the mode
    model.eval()
    square = model.sample(x, 200, generator=torch.Generator().manual_seed(1))[:, 0, :, 8, 8].argmax(1)  # (200,)
    share = (square == 2).float().mean().item()
    assert 0.2 < share < 0.8, f"class 2 in {share:.2f} of the prior's samples, expected about 0.5"


@pytest.mark.parametrize("prior", ["standard", "learned"])
def test_forward_val_is_the_eval_prediction_with_the_kl_statistics(prior):
    torch.manual_seed(0)
    model = SegVAE(VAEConfig(**SMALL, prior=prior)).eval()
    x, target = torch.randn(2, 3, 30, 40), torch.randint(0, 4, (2, 30, 40))
    logits, mu_q, logvar_q, mu_p, logvar_p = model.forward_val(x, target)
    assert torch.allclose(logits, model(x)[0], atol=1e-5)  # what test time decodes
    ref = model(x, target)
    for a, b in zip((mu_q, logvar_q, mu_p, logvar_p), ref[1:]):
        assert torch.allclose(a, b, atol=1e-6)
    per = latent_channel_kl(kl_per_dim(mu_q, logvar_q, mu_p, logvar_p), model.config)
    assert per.shape == (model.config.latent_width,)
