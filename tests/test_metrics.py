"""Tests for metrics.py: confusion-matrix scores, uncertainty maps and the
streaming UncertaintyMeter, each checked against small hand-computed cases."""

import math

import torch

from metrics import (
    UncertaintyMeter,
    confusion_matrix,
    scores,
    softmax_entropy,
    uncertainty_maps,
)

VOID = 255


def close(a, b, tol=1e-6):
    return abs(a - b) <= tol


# ---------------------------------------------------------------------------
# Confusion matrix and scores
# ---------------------------------------------------------------------------


def test_confusion_matrix_hand_example():
    pred = torch.tensor([[0, 1, 2], [1, 1, 0]])
    target = torch.tensor([[0, 1, VOID], [2, 1, 0]])
    # (t, p) pairs: (0,0) (1,1) void (2,1) (1,1) (0,0)
    expected = torch.tensor([[2, 0, 0], [0, 2, 0], [0, 1, 0]])
    cm = confusion_matrix(pred, target, 3, VOID)
    assert cm.dtype == torch.int64
    assert torch.equal(cm, expected)


def test_confusion_matrix_drops_out_of_range_targets():
    cm = confusion_matrix(torch.tensor([0, 1, 0]), torch.tensor([0, 7, -1]),
                          2, VOID)
    assert cm.sum().item() == 1


def test_scores_hand_example_with_absent_class():
    # Class 2 appears neither in GT nor in the prediction.
    cm = torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    s = scores(cm)
    # class 0: tp 3, gt 4, pred 5 -> union 6 -> IoU 1/2
    # class 1: tp 4, gt 6, pred 5 -> union 7 -> IoU 4/7
    assert close(s["iou"][0], 0.5)
    assert close(s["iou"][1], 4 / 7)
    assert math.isnan(s["iou"][2])
    assert close(s["miou"], (0.5 + 4 / 7) / 2)
    assert close(s["pixel_acc"], 7 / 10)
    # recall: 3/4 and 4/6; class 2 absent from GT -> NaN, not averaged
    assert math.isnan(s["recall"][2])
    assert close(s["class_acc"], (3 / 4 + 4 / 6) / 2)


def test_scores_class_only_predicted_counts_in_miou():
    # Class 1 never in GT but predicted once: IoU 0, included in mIoU;
    # recall undefined so excluded from class_acc.
    s = scores(torch.tensor([[1, 1], [0, 0]]))
    assert close(s["iou"][1], 0.0)
    assert close(s["miou"], 0.25)
    assert close(s["class_acc"], 0.5)


def test_scores_empty_matrix_is_nan():
    s = scores(torch.zeros(3, 3, dtype=torch.int64))
    assert math.isnan(s["miou"]) and math.isnan(s["pixel_acc"])
    assert math.isnan(s["class_acc"])


# ---------------------------------------------------------------------------
# Uncertainty maps
# ---------------------------------------------------------------------------


def _random_probs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).softmax(2)


def test_uncertainty_maps_shapes_and_ranges():
    probs = _random_probs((3, 2, 4, 5, 6))
    m = uncertainty_maps(probs)
    assert m["mean"].shape == (2, 4, 5, 6)
    for k in ("entropy", "expected_entropy", "mutual_info", "variance"):
        assert m[k].shape == (2, 5, 6), k
    assert (m["mutual_info"] >= 0).all()
    assert (m["variance"] >= 0).all() and (m["variance"] <= 0.25).all()
    assert torch.allclose(m["entropy"], softmax_entropy(m["mean"]))


def test_entropy_one_hot_is_zero_and_uniform_is_log_c():
    c = 5
    one_hot = torch.zeros(1, c, 2, 2)
    one_hot[:, 2] = 1
    assert torch.equal(softmax_entropy(one_hot), torch.zeros(1, 2, 2))
    uniform = torch.full((1, c, 2, 2), 1 / c)
    assert torch.allclose(softmax_entropy(uniform),
                          torch.full((1, 2, 2), math.log(c)))


def test_mutual_info_zero_when_samples_agree():
    sample = _random_probs((1, 2, 3, 4, 4))
    m = uncertainty_maps(sample.expand(4, -1, -1, -1, -1))
    assert torch.allclose(m["mutual_info"], torch.zeros(2, 4, 4), atol=1e-6)
    assert torch.allclose(m["variance"], torch.zeros(2, 4, 4), atol=1e-12)


def test_mutual_info_two_disagreeing_one_hot_samples():
    # Sample 0 says class 0, sample 1 says class 1 (C = 3, one pixel).
    probs = torch.zeros(2, 1, 3, 1, 1)
    probs[0, 0, 0] = 1
    probs[1, 0, 1] = 1
    m = uncertainty_maps(probs)
    assert close(m["entropy"].item(), math.log(2))
    assert m["expected_entropy"].item() == 0.0
    assert close(m["mutual_info"].item(), math.log(2))
    # winning-class probability is 1 in one sample, 0 in the other
    assert close(m["variance"].item(), 0.25)


def test_uncertainty_maps_single_sample():
    probs = _random_probs((1, 2, 3, 4, 4))
    m = uncertainty_maps(probs)
    assert torch.equal(m["mutual_info"], torch.zeros(2, 4, 4))
    assert torch.equal(m["variance"], torch.zeros(2, 4, 4))
    assert torch.allclose(m["entropy"], m["expected_entropy"])


# ---------------------------------------------------------------------------
# UncertaintyMeter
# ---------------------------------------------------------------------------


def _pixels(p_class0, target, unc):
    """Build (1, 2, 1, N) probs, (1, 1, N) target, (1, 1, N) uncertainty for
    a two-class problem from per-pixel P(class 0)."""
    p0 = torch.tensor(p_class0, dtype=torch.float32)
    probs = torch.stack([p0, 1 - p0])[None, :, None, :]
    target = torch.tensor(target)[None, None, :]
    unc = torch.tensor(unc, dtype=torch.float32)[None, None, :]
    return probs, target, unc


def test_ece_hand_example():
    # Five pixels, all with confidence 0.8 in class 0; 3 of 5 are class 0.
    probs, target, unc = _pixels([0.8] * 5, [0, 0, 0, 1, 1], [0.1] * 5)
    meter = UncertaintyMeter(2, VOID, 1.0)
    meter.update(probs, target, unc)
    assert close(meter.compute()["ece"], 0.2)
    rel = meter.reliability()
    assert sum(rel["count"]) == 5 and len(rel["edges"]) == 16
    k = rel["count"].index(5)
    assert close(rel["accuracy"][k], 0.6) and close(rel["confidence"][k], 0.8)


def test_nll_and_brier_hand_example():
    # Pixel 1: p = (0.75, 0.25), target 0 -> NLL -log .75, Brier .0625*2
    # Pixel 2: p = (0.25, 0.75), target 0 -> NLL -log .25, Brier .5625*2
    probs, target, unc = _pixels([0.75, 0.25], [0, 0], [0.0, 0.0])
    meter = UncertaintyMeter(2, VOID, 1.0)
    meter.update(probs, target, unc)
    out = meter.compute()
    assert close(out["nll"], (-math.log(0.75) - math.log(0.25)) / 2)
    assert close(out["brier"], (0.125 + 1.125) / 2)


def _auroc(p_class0, target, unc):
    meter = UncertaintyMeter(2, VOID, 1.0, n_bins_unc=10)
    meter.update(*_pixels(p_class0, target, unc))
    return meter


def test_auroc_perfect_constant_and_hand_value():
    # All pixels predict class 0 with confidence 0.9: target 1 means wrong.
    p = [0.9] * 4
    target = [0, 1, 0, 1]
    assert close(_auroc(p, target, [0.1, 0.8, 0.2, 0.9]).compute()["auroc"],
                 1.0)
    assert close(_auroc(p, target, [0.4] * 4).compute()["auroc"], 0.5)
    # correct at u = 0.1, 0.5; wrong at u = 0.5, 0.7. Pairs (wrong, correct):
    # (.5,.1) win, (.5,.5) tie = 1/2, (.7,.1) win, (.7,.5) win -> 3.5 / 4
    meter = _auroc(p, target, [0.1, 0.5, 0.5, 0.7])
    assert close(meter.compute()["auroc"], 0.875)
    # No errors at all -> undefined.
    assert math.isnan(_auroc(p, [0] * 4, [0.1] * 4).compute()["auroc"])


def test_coverage_curve():
    # Sorted by uncertainty: correct, wrong, correct, wrong.
    meter = _auroc([0.9] * 4, [0, 1, 0, 1], [0.1, 0.3, 0.5, 0.7])
    out = meter.compute()
    cov = {c["coverage"]: c for c in out["coverage"]}
    assert close(cov[1.0]["miou"], out["miou"])
    assert close(cov[1.0]["pixel_acc"], out["pixel_acc"])
    assert close(cov[1.0]["actual_coverage"], 1.0)
    for c in out["coverage"]:
        assert c["actual_coverage"] >= c["coverage"]
    assert close(cov[0.5]["pixel_acc"], 0.5)
    assert close(cov[0.75]["actual_coverage"], 0.75)
    assert close(cov[0.75]["pixel_acc"], 2 / 3)
    assert close(cov[0.9]["actual_coverage"], 1.0)
    assert len(out["curve"]["coverage"]) == 10
    assert close(out["curve"]["accuracy"][1], 1.0)
    assert close(out["curve"]["coverage"][-1], 1.0)


def _random_batch(seed, b=2, c=3, h=4, w=5):
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(b, c, h, w, generator=g).softmax(1)
    target = torch.randint(0, c, (b, h, w), generator=g)
    unc = torch.rand(b, h, w, generator=g) * 1.2  # some above max -> clipped
    return probs, target, unc


def _same_state(m1, m2):
    return all(torch.allclose(a.double(), b.double(), rtol=0, atol=1e-9)
               for a, b in zip(m1.state(), m2.state()))


def test_void_pixels_are_ignored():
    probs, target, unc = _random_batch(1)
    clean = UncertaintyMeter(3, VOID, 1.0, n_bins_unc=20)
    clean.update(probs, target, unc)
    # Append a column of void pixels with arbitrary probs and uncertainty.
    extra_p, _, extra_u = _random_batch(2, w=1)
    extra_t = torch.full((2, 4, 1), VOID)
    noisy = UncertaintyMeter(3, VOID, 1.0, n_bins_unc=20)
    noisy.update(torch.cat([probs, extra_p], 3), torch.cat([target, extra_t],
                 2), torch.cat([unc, extra_u], 2))
    assert _same_state(clean, noisy)
    assert int(noisy.cm.sum()) == target.numel()


def test_two_updates_equal_one_concatenated_update():
    a, b = _random_batch(3), _random_batch(4)
    twice = UncertaintyMeter(3, VOID, 1.0, n_bins_unc=20)
    twice.update(*a)
    twice.update(*b)
    once = UncertaintyMeter(3, VOID, 1.0, n_bins_unc=20)
    once.update(*(torch.cat([x, y]) for x, y in zip(a, b)))
    assert _same_state(twice, once)
    assert close(twice.compute()["ece"], once.compute()["ece"])


def test_state_sum_merges_meters():
    # What a distributed all_reduce(SUM) over ranks amounts to.
    a, b = _random_batch(5), _random_batch(6)
    m1 = UncertaintyMeter(3, VOID, 1.0, n_bins_unc=20)
    m1.update(*a)
    m2 = UncertaintyMeter(3, VOID, 1.0, n_bins_unc=20)
    m2.update(*b)
    both = UncertaintyMeter(3, VOID, 1.0, n_bins_unc=20)
    both.update(*a)
    both.update(*b)
    merged = UncertaintyMeter(3, VOID, 1.0, n_bins_unc=20)
    merged.load_state([x + y for x, y in zip(m1.state(), m2.state())])
    assert _same_state(merged, both)
