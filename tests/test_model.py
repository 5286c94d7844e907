"""The VAE: shapes, the KL term, the losses, sampling, and that it can learn."""

import math

import pytest
import torch

from model import SegVAE, VAEConfig, kl_loss, kl_per_channel, segmentation_loss, soft_dice_loss, standardize

TINY = VAEConfig(num_classes=3, widths=(8, 16), latent_channels=4)


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("size", [(32, 48), (50, 70), (17, 9)])
def test_forward_shapes_any_size(skip, size):
    model = SegVAE(VAEConfig(num_classes=5, widths=(8, 16, 32), latent_channels=6, skip=skip))
    logits, mu, logvar = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 5, *size)
    # The input is padded to a multiple of 8 before encoding.
    assert mu.shape == logvar.shape == (2, 6, math.ceil(size[0] / 8), math.ceil(size[1] / 8))


def test_input_norm_ignores_a_scene_s_brightness_contrast_and_colour_cast():
    x = torch.randn(2, 3, 32, 48)
    y = standardize(x)
    assert torch.allclose(y.mean((2, 3)), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(y.std((2, 3), unbiased=False), torch.ones(2, 3), atol=1e-3)
    gain, offset = torch.tensor([0.5, 1.5, 2.0]).view(1, 3, 1, 1), torch.tensor([-1.0, 0.3, 2.0]).view(1, 3, 1, 1)
    brighter = x * gain + offset  # per-channel contrast and brightness: a colour cast
    torch.manual_seed(0)
    model = SegVAE(VAEConfig(num_classes=3, widths=(8, 16), latent_channels=4, input_norm=True)).eval()
    plain = SegVAE(VAEConfig(num_classes=3, widths=(8, 16), latent_channels=4)).eval()
    plain.load_state_dict(model.state_dict())  # the same weights: input_norm adds none
    with torch.no_grad():
        assert torch.allclose(model(x)[0], model(brighter)[0], atol=1e-3)
        assert not torch.allclose(plain(x)[0], plain(brighter)[0], atol=1e-2)
        assert torch.allclose(model(x)[0], plain(standardize(x))[0], atol=1e-5)


def test_image_context_lets_every_position_see_the_whole_image():
    x = torch.randn(1, 3, 128, 128)
    far = x.clone()
    far[..., -32:, -32:] += 10.0  # a change in the bottom-right corner, beyond the convolutions' reach
    for image_context, reaches in ((False, False), (True, True)):
        torch.manual_seed(0)
        model = SegVAE(VAEConfig(num_classes=3, widths=(8, 16), latent_channels=4,
                                 image_context=image_context)).eval()
        with torch.no_grad():
            top_left = (model(x)[0] - model(far)[0])[..., :16, :16].abs().max()
        assert (top_left > 0) if reaches else top_left == 0  # exactly: beyond reach nothing moves
    with pytest.raises(ValueError, match="image_context"):
        VAEConfig(context=False, image_context=True)


def test_encode_reparameterize_decode():
    model = SegVAE(TINY)
    mu, logvar, skips = model.encode(torch.randn(2, 3, 32, 32))
    assert mu.shape == (2, 4, 8, 8) and [s.shape[1] for s in skips] == [8]
    z = model.reparameterize(mu, torch.full_like(logvar, -30.0))
    assert torch.allclose(z, mu, atol=1e-5)  # sigma ~ 0 leaves the mean
    assert model.decode(z, skips, (32, 32)).shape == (2, 3, 32, 32)


def test_kl_closed_form():
    mu, logvar = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    assert torch.all(kl_per_channel(mu, logvar) == 0)  # posterior equals the prior
    mu = torch.full((1, 1, 1, 1), 2.0)
    logvar = torch.full((1, 1, 1, 1), math.log(0.5))
    expected = 0.5 * (4.0 + 0.5 - 1.0 - math.log(0.5))  # 1/2 (mu^2 + s^2 - 1 - log s^2)
    assert kl_per_channel(mu, logvar).item() == pytest.approx(expected, rel=1e-6)
    # nats per image pixel: 1 latent position for 16 image pixels
    assert kl_loss(mu, logvar, image_pixels=16).item() == pytest.approx(expected / 16, rel=1e-6)


def test_kl_free_bits_floor_and_float32():
    mu, logvar = torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16), torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16)
    assert kl_per_channel(mu, logvar).dtype == torch.float32
    # 3 channels at the floor of 0.1 nats, 16 latent positions, 64 pixels
    assert kl_loss(mu, logvar, 64, free_bits=0.1).item() == pytest.approx(3 * 0.1 * 16 / 64)


def test_losses_ignore_void_and_mse_is_brier():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 5.0]]]])  # (1, 2, 1, 2): two pixels, two classes
    target = torch.tensor([[[0, 9]]])  # second pixel is void (9)
    p0 = math.exp(2) / (math.exp(2) + 1)
    assert segmentation_loss(logits, target, "mse", 9).item() == pytest.approx(2 * (1 - p0) ** 2, rel=1e-5)
    assert segmentation_loss(logits, target, "ce", 9).item() == pytest.approx(-math.log(p0), rel=1e-5)
    changed = logits.clone()
    changed[..., 1] = -7.0  # whatever happens on the void pixel does not count
    for kind in ("ce", "mse"):
        assert segmentation_loss(changed, target, kind, 9) == segmentation_loss(logits, target, kind, 9)


def test_dice_term_on_hand_computed_cases():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 5.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 9]]])  # one valid pixel, of class 0; class 1 absent
    p0 = math.exp(2) / (math.exp(2) + 1)
    # class 0 alone is present: Dice = 2 p0 / (p0 + 1)
    assert soft_dice_loss(logits, target, 9).item() == pytest.approx(1 - 2 * p0 / (p0 + 1), rel=1e-5)
    assert segmentation_loss(logits, target, "ce_dice", 9).item() == pytest.approx(
        -math.log(p0) + 1 - 2 * p0 / (p0 + 1), rel=1e-5)
    # a confident, right prediction of two classes: Dice near 1 for both
    sure = torch.tensor([[[[20.0, -20.0]], [[-20.0, 20.0]]]])
    assert soft_dice_loss(sure, torch.tensor([[[0, 1]]]), 9).item() == pytest.approx(0, abs=1e-6)
    # a class of one pixel weighs as much as a class of three
    thin = torch.zeros(1, 2, 1, 4, requires_grad=True)
    soft_dice_loss(thin, torch.tensor([[[0, 0, 0, 1]]]), 9).backward()
    assert thin.grad[0, 1, 0, 3] < 0 and abs(thin.grad[0, 1, 0, 3]) > abs(thin.grad[0, 0, 0, 0])
    assert soft_dice_loss(logits, torch.full((1, 1, 2), 9), 9).item() == 0  # all void


def test_class_weights_reweight_mse():
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    w = torch.tensor([1.0, 3.0])
    # both pixels have Brier 0.5 (p = 0.5, 0.5), so any weighting keeps the mean at 0.5
    assert segmentation_loss(logits, target, "mse", 255, w).item() == pytest.approx(0.5)


def test_sampling_batched_and_mean():
    torch.manual_seed(0)
    model = SegVAE(TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    samples = model.sample(x, 5, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (5, 2, 3, 32, 32)
    assert not torch.allclose(samples[0], samples[1])  # the latent noise reaches the output
    again = model.sample(x, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(samples, again)  # seeded sampling is reproducible
    mean_logits = model(x)[0]  # eval mode decodes the posterior mean
    assert torch.allclose(model.sample(x, 1)[0], mean_logits, atol=1e-5)
    det = SegVAE(VAEConfig(**{**TINY.to_dict(), "stochastic": False})).eval()
    s = det.sample(x, 3)
    assert torch.equal(s[0], s[2])  # the deterministic ablation never samples


def test_blocks_deepen_the_encoder_and_old_checkpoints_still_load():
    torch.manual_seed(0)
    one = SegVAE(VAEConfig(num_classes=3, widths=(8, 16), latent_channels=4))
    two = SegVAE(VAEConfig(num_classes=3, widths=(8, 16), latent_channels=4, blocks=2))
    keys_one, keys_two = set(one.state_dict()), set(two.state_dict())
    extra = keys_two - keys_one
    # One more residual conv + BN per down block, and nothing renamed.
    assert keys_one < keys_two and {k.split(".more.")[0] for k in extra} == {"downs.0", "downs.1"}
    assert sum(p.numel() for p in two.parameters()) - sum(p.numel() for p in one.parameters()) == \
        (8 * 8 * 9 + 2 * 8) + (16 * 16 * 9 + 2 * 16)
    logits, mu, _ = two(torch.randn(2, 3, 20, 28))
    assert logits.shape == (2, 3, 20, 28) and mu.shape == (2, 4, 5, 7)
    # A config saved before `blocks` existed rebuilds the one-block model and takes its weights.
    old = {k: v for k, v in one.config.to_dict().items() if k != "blocks"}
    again = SegVAE(VAEConfig.from_dict(old))
    again.load_state_dict(one.state_dict())  # strict: the same keys
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(again.eval()(x)[0], one.eval()(x)[0])
    with pytest.raises(ValueError, match="blocks 0"):
        VAEConfig(blocks=0)


def test_config_round_trip():
    cfg = VAEConfig(num_classes=7, widths=(4, 8, 16), latent_channels=3, skip=False)
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config"):
        VAEConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_overfits_one_tiny_batch():
    torch.manual_seed(0)
    model = SegVAE(TINY)
    # Random 8x8 blocks of three classes, each drawn in its own colour plus noise.
    target = torch.randint(0, 3, (4, 4, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)  # (4, 32, 32)
    colours = torch.tensor([[1.0, -1, 0], [-1, 1, 0], [0, 0, 1]])
    x = colours[target].permute(0, 3, 1, 2) + 0.3 * torch.randn(4, 3, 32, 32)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    first = None
    for _ in range(60):
        logits, mu, logvar = model(x)
        loss = segmentation_loss(logits, target, "ce", 255) + 1e-3 * kl_loss(mu, logvar, 32 * 32)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < 0.3 * first
