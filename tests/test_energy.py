"""Distances between distributions of segmentations (metrics.py): IoU distance, generalized
energy distance, Hungarian-matched IoU and the flip benchmark's mode statistics, on
hand-computed cases."""

from fractions import Fraction

import pytest
import torch

from ambiguity import Flip, mode_maps, mode_table
from metrics import EnergyMeter, ModeMeter, iou_distances, matched_iou

A = torch.tensor([[0, 0], [1, 1]])
B = torch.tensor([[0, 1], [1, 1]])
# class 0: A has 2 pixels, B 1, both 1 -> IoU 1/2; class 1: A 2, B 3, both 2 -> IoU 2/3
D_AB = 1 - (1 / 2 + 2 / 3) / 2  # 5/12


def stack(*maps):
    return torch.stack(maps)


def test_iou_distance_hand_example_absent_classes_and_void():
    d = iou_distances(stack(A, B), stack(A, B), [0, 1])
    assert d.dtype == torch.float64
    assert torch.allclose(d, torch.tensor([[0, D_AB], [D_AB, 0]], dtype=torch.float64))
    # class 2 occurs in neither map: skipped, not counted as IoU 0 or 1
    assert iou_distances(stack(A), stack(B), [0, 1, 2]).item() == pytest.approx(D_AB)
    # no evaluated class in either map: they agree on all of them, d = 0
    assert iou_distances(stack(A), stack(B), [5, 6]).item() == 0
    # only valid pixels count: without the top-right pixel the maps are equal
    valid = torch.tensor([[True, False], [True, True]])
    assert iou_distances(stack(A), stack(B), [0, 1], valid).item() == 0


def test_ged_of_identical_distributions_is_zero():
    meter = EnergyMeter([0, 1], sample_counts=(4,))
    annotations = stack(A, B, B, torch.ones(2, 2, dtype=torch.long))
    meter.update(annotations[[2, 0, 3, 1]], annotations)  # the same four maps, in another order
    r = meter.compute()[4]
    assert r["ged"] == pytest.approx(0, abs=1e-12)
    assert r["diversity"] == pytest.approx(r["e_yy"]) and r["diversity"] > 0
    assert r["matched_iou"] == pytest.approx(1.0)
    # weighted: modes A (1/4) and B (3/4), sampled exactly in proportion
    meter = EnergyMeter([0, 1], sample_counts=(4,))
    meter.update(stack(B, A, B, B), stack(A, B), weights=torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert meter.compute()[4]["ged"] == pytest.approx(0, abs=1e-12)


def test_ged_of_two_deterministic_maps_is_twice_their_distance():
    meter = EnergyMeter([0, 1], sample_counts=(1, 4))
    meter.update(stack(A, A, A, A), stack(B))
    for n in (1, 4):
        r = meter.compute()[n]
        assert r["ged"] == pytest.approx(2 * D_AB)
        assert r["diversity"] == 0 and r["e_yy"] == 0 and r["e_sy"] == pytest.approx(D_AB)
        assert r["matched_iou"] == pytest.approx(1 - D_AB)


def test_ged_streams_over_images_and_sums_across_ranks():
    one, two = EnergyMeter([0, 1], (1,)), EnergyMeter([0, 1], (1,))
    one.update(stack(A), stack(B))  # GED 2 d
    two.update(stack(A), stack(A))  # GED 0
    both = EnergyMeter([0, 1], (1,))
    both.load_state([x + y for x, y in zip(one.state(), two.state())])
    assert both.compute()[1]["ged"] == pytest.approx(D_AB)  # the mean over the two images
    with pytest.raises(ValueError, match="1 samples for sample counts up to 4"):
        EnergyMeter([0, 1], (4,)).update(stack(A), stack(B))


def test_ged_agrees_with_kohl_et_al_formula():
    """Against a direct transcription of the formula in Kohl et al.'s evaluation code
    (calc_energy_distances, probability_weighted), on random maps where every class occurs."""
    g = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 3, (6, 8, 8), generator=g)
    modes = torch.randint(0, 3, (3, 8, 8), generator=g)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)

    def d(x, y):
        ious = []
        for c in range(3):
            inter = ((x == c) & (y == c)).sum().item()
            union = ((x == c) | (y == c)).sum().item()
            ious.append(inter / union)
        return 1 - sum(ious) / 3

    d_ys = sum(w[m] * sum(d(modes[m], s) for s in samples) / 6 for m in range(3))
    d_ss = sum(d(s, t) for s in samples for t in samples) / 36
    d_yy = sum(w[m] * w[k] * d(modes[m], modes[k]) for m in range(3) for k in range(3))
    meter = EnergyMeter([0, 1, 2], (6,))
    meter.update(samples, modes, w)
    assert meter.compute()[6]["ged"] == pytest.approx(float(2 * d_ys - d_ss - d_yy), abs=1e-12)


def test_hungarian_iou_hand_example():
    d = torch.tensor([[0.2, 0.9], [0.8, 0.1]], dtype=torch.float64)
    assert matched_iou(d) == pytest.approx(1 - (0.2 + 0.1) / 2)  # pairs (0, 0), (1, 1)
    d = torch.tensor([[0.9, 0.2], [0.1, 0.8]], dtype=torch.float64)
    assert matched_iou(d) == pytest.approx(1 - (0.2 + 0.1) / 2)  # pairs (0, 1), (1, 0)
    # 4 samples, 2 annotations: each annotation matched twice, to its two nearest samples
    d = torch.tensor([[0.1, 0.6], [0.2, 0.7], [0.9, 0.3], [0.8, 0.4]], dtype=torch.float64)
    assert matched_iou(d) == pytest.approx(1 - (0.1 + 0.2 + 0.3 + 0.4) / 4)
    # weighted: the transport with uniform weights is the Hungarian matching
    assert matched_iou(d, torch.tensor([0.5, 0.5])) == pytest.approx(matched_iou(d))
    # one sample, modes of weight 0.3 and 0.7: it is matched to each by its weight
    d = torch.tensor([[0.2, 0.6]], dtype=torch.float64)
    assert matched_iou(d, torch.tensor([0.3, 0.7])) == pytest.approx(1 - (0.3 * 0.2 + 0.7 * 0.6))


# Two flips on a 3-class base table (void 5): class 1 -> 3 with 1/2, class 2 -> 4 with 1/4.
FLIPS = (Flip(1, 3, Fraction(1, 2), "one-2", (0, 0, 0)), Flip(2, 4, Fraction(1, 4), "two-2", (0, 0, 0)))
FLIP_PAIRS = [(1, 3), (2, 4)]


def test_mode_statistics_of_a_sampler_with_the_true_frequencies():
    switches, probs = mode_table(FLIPS)  # modes: none 3/8, flip 1 3/8, flip 2 1/8, both 1/8
    assert probs.tolist() == [3 / 8, 3 / 8, 1 / 8, 1 / 8]
    label = torch.tensor([[0, 1, 1], [2, 2, 5]])
    modes = mode_maps(label, FLIPS, void_in=5)
    samples = modes[[0, 0, 0, 1, 1, 1, 2, 3]]  # each mode as often as its probability says
    valid = label != 5
    energy, stats = EnergyMeter([1, 2, 3, 4], (8,)), ModeMeter(switches, probs, FLIP_PAIRS)
    d = energy.update(samples, modes, probs, valid)
    stats.update(samples, label, d["ys"], d["yy"], valid)
    r = stats.compute()
    assert energy.compute()[8]["ged"] == pytest.approx(0, abs=1e-12)
    assert r["mode_tv"] == pytest.approx(0, abs=1e-12)
    assert r["pixel_share"] == pytest.approx([0.5, 0.25]) and r["image_share"] == pytest.approx([0.5, 0.25])
    assert r["true_share"] == pytest.approx([0.5, 0.25])


def test_tied_modes_share_a_sample_by_probability():
    """An image without class 2: modes that differ only in flip 2 are the same map there. A
    sampler right about flip 1 must still get TV 0 (giving ties to the first mode would put all
    of flip 2's probability on "not flipped": TV 0.25)."""
    switches, probs = mode_table(FLIPS)
    label = torch.tensor([[0, 1, 1], [0, 0, 5]])
    modes = mode_maps(label, FLIPS, void_in=5)
    stats = ModeMeter(switches, probs, FLIP_PAIRS)
    energy = EnergyMeter([1, 2, 3, 4], (2,))

    def add(samples):
        d = energy.update(samples, modes, probs)
        stats.update(samples, label, d["ys"], d["yy"])

    add(modes[[0, 1]])
    r = stats.compute()
    assert r["mode_tv"] == pytest.approx(0, abs=1e-12)
    assert r["image_share"][0] == pytest.approx(0.5)
    assert r["image_share"][1] != r["image_share"][1]  # NaN: no image with class 2
    # a sampler that never flips class 1: frequencies (3/4, 0, 1/4, 0), TV = 1/2
    stats.reset()
    add(modes[[0, 0]])
    assert stats.compute()["mode_tv"] == pytest.approx(0.5)
    assert stats.compute()["pixel_share"][0] == 0


def test_a_sample_far_from_every_mode_counts_for_the_first():
    """A sample with no flippable class is equally far (d = 1) from all four modes; it must not
    be spread over them by probability, which would pass for a perfect sampler (TV 0)."""
    switches, probs = mode_table(FLIPS)
    label = torch.tensor([[0, 1, 1], [2, 2, 5]])
    modes = mode_maps(label, FLIPS, void_in=5)
    stats = ModeMeter(switches, probs, FLIP_PAIRS)
    samples = torch.zeros(2, 2, 3, dtype=torch.long)  # all class 0
    d = EnergyMeter([1, 2, 3, 4], (2,)).update(samples, modes, probs)
    assert torch.all(d["ys"] == 1)
    stats.update(samples, label, d["ys"], d["yy"])
    assert stats.compute()["mode_freq"] == pytest.approx([1, 0, 0, 0])
    assert stats.compute()["mode_tv"] == pytest.approx(1 - 3 / 8)


def test_weighted_samples_count_as_repeated_ones():
    """ModeMeter's weights (the oracle's 32 maps with their probabilities): a sample of weight 2
    counts as that sample twice, in the pixel shares, image shares and mode frequencies."""
    switches, probs = mode_table(FLIPS)
    label = torch.tensor([[0, 1, 1], [2, 2, 5]])
    modes = mode_maps(label, FLIPS, void_in=5)
    energy = EnergyMeter([1, 2, 3, 4], (2,))
    weighted, repeated = (ModeMeter(switches, probs, FLIP_PAIRS) for _ in range(2))
    d = energy.update(modes[[0, 3, 3]], modes, probs)
    repeated.update(modes[[0, 3, 3]], label, d["ys"], d["yy"])
    weighted.update(modes[[0, 3]], label, d["ys"][:2], d["yy"], weights=torch.tensor([1.0, 2.0]))
    a, b = weighted.compute(), repeated.compute()
    for key in ("pixel_share", "image_share", "mode_freq", "mode_tv"):
        assert a[key] == pytest.approx(b[key], abs=1e-12)
