"""--calibration: the fair Brier score of prior samples (its value, that its expectation is least at
the labels' frequencies) and that it trains the prior alone."""

import itertools

import pytest
import torch

from model import SegVAE, VAEConfig, fair_brier_loss

SMALL = dict(num_classes=3, widths=(8, 16), latent_channels=2, latent_dim=2, prior="learned")


def hard(classes, num_classes=2):
    """Sharp logits (K, 1, C, 1, 1) for one pixel whose K samples show `classes`."""
    onehot = torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float()  # (K, C)
    return (50 * onehot)[:, None, :, None, None]


def label(c):
    return torch.tensor([[[c]]])


def test_fair_brier_hand_values_and_void():
    # Two samples that agree: 0 on their class, |e0 - e1|^2 = 2 on the other.
    assert fair_brier_loss(hard([0, 0]), label(0), 255).item() == pytest.approx(0.0, abs=1e-6)
    assert fair_brier_loss(hard([0, 0]), label(1), 255).item() == pytest.approx(2.0, abs=1e-6)
    # Two samples that disagree: mean |p_k - y|^2 = 1, minus half their squared distance 2 / 2.
    assert fair_brier_loss(hard([0, 1]), label(0), 255).item() == pytest.approx(0.0, abs=1e-6)
    # Soft samples, by the definition: K = 3 uniform distributions over 2 classes.
    uniform = torch.zeros(3, 1, 2, 1, 1)
    assert fair_brier_loss(uniform, label(1), 255).item() == pytest.approx(0.5, abs=1e-6)  # |(.5, .5) - e1|^2
    # Void and out-of-range labels are left out of the mean.
    logits = torch.cat([hard([0, 0]), hard([0, 0])], dim=-1)  # (2, 1, 2, 1, 2): two pixels
    assert fair_brier_loss(logits, torch.tensor([[[1, 255]]]), 255).item() == pytest.approx(2.0, abs=1e-6)
    assert fair_brier_loss(logits, torch.tensor([[[255, 255]]]), 255).item() == 0.0
    with pytest.raises(ValueError, match="at least 2 samples"):
        fair_brier_loss(hard([0]), label(0), 255)


@pytest.mark.parametrize("k", [2, 3])
def test_fair_brier_expectation_is_least_at_the_labels_frequency(k):
    """Samples that show class 1 with probability q, labels that are class 1 with probability p:
    the exact expectation over every draw is 2 (q - p)^2 + 2 p (1 - p), the Brier score of the
    samples' mean, whatever K; so it is least at q = p."""
    p = 0.3
    for q in (0.1, 0.3, 0.6):
        expected = 0.0
        for draw in itertools.product([0, 1], repeat=k):
            weight = q ** sum(draw) * (1 - q) ** (k - sum(draw))
            for y, py in ((0, 1 - p), (1, p)):
                expected += weight * py * fair_brier_loss(hard(list(draw)), label(y), 255).item()
        assert expected == pytest.approx(2 * (q - p) ** 2 + 2 * p * (1 - p), abs=1e-5)


def test_prior_samples_train_the_prior_alone():
    torch.manual_seed(0)
    model = SegVAE(VAEConfig(**SMALL))
    x, target = torch.randn(2, 3, 32, 48), torch.randint(0, 3, (2, 32, 48))
    out = model(x, target, prior_samples=4)
    assert len(out) == 6
    assert out[5].shape == (4, 2, 3, 16, 24)  # (K, B, classes, H/2, W/2)
    assert not torch.allclose(out[5][0], out[5][1])  # distinct draws
    fair_brier_loss(out[5], target[:, ::2, ::2], 255).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("prior_net."))
    for name, g in grads.items():  # the head, the decoder and the posterior get nothing
        if name.startswith(("head.", "ups.", "from_latent.", "posterior_net.")):
            assert g is None or g.abs().sum() == 0, name
    with pytest.raises(ValueError, match="inject='head'"):
        SegVAE(VAEConfig(**SMALL, inject="bottleneck"))(x, target, prior_samples=2)

