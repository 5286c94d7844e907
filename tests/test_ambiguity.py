"""The label-flip benchmark: class table, the 32 modes and their probabilities, the flips'
frequencies, void handling."""

from fractions import Fraction

import pytest
import torch

from ambiguity import (CAMVID_FLIPS, VOID, base_labels, check_labels, extended_classes, flip_labels,
                       flippable_classes, mode_maps, mode_table)

CAMVID_NAMES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                "Bicyclist"]


def every_class():
    """A (2, 6) base label with each class 0..10 once and one void pixel (11)."""
    return torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]], dtype=torch.uint8)


def test_extended_class_table():
    names, colours = extended_classes(CAMVID_NAMES, [(i, i, i) for i in range(11)])
    assert len(names) == len(colours) == 16
    assert names[11:] == ["Pavement-2", "Pedestrian-2", "Car-2", "Tree-2", "Road-2"]
    assert len(set(colours)) == 16  # every class its own colour
    assert flippable_classes() == [4, 9, 8, 5, 3, 11, 12, 13, 14, 15]
    with pytest.raises(ValueError, match="must follow the 10 base classes"):
        extended_classes(CAMVID_NAMES[:10], [(0, 0, 0)] * 10)


def test_modes_and_probabilities():
    switches, probs = mode_table()
    assert switches.shape == (32, 5) and probs.shape == (32,)
    assert len({tuple(r) for r in switches.tolist()}) == 32  # every combination once
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    # mode 0 flips nothing: (9/17)(10/17)(11/17)(12/17)(13/17); mode 31 flips all: (8*7*6*5*4)/17^5
    assert probs[0].item() == pytest.approx(float(Fraction(9 * 10 * 11 * 12 * 13, 17 ** 5)), rel=1e-12)
    assert probs[31].item() == pytest.approx(float(Fraction(8 * 7 * 6 * 5 * 4, 17 ** 5)), rel=1e-12)
    # each flip's marginal over the modes is its own probability
    for i, f in enumerate(CAMVID_FLIPS):
        assert probs[switches[:, i]].sum().item() == pytest.approx(float(f.probability), abs=1e-12)


def test_mode_maps_of_one_label():
    label = every_class()
    modes = mode_maps(label)
    switches, _ = mode_table()
    assert modes.shape == (32, 2, 6)
    assert torch.all(modes[:, 1, 5] == VOID)  # void moved off 11, in every mode
    assert torch.equal(modes[0], torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, VOID]]))
    assert torch.equal(modes[31], torch.tensor([[0, 1, 2, 15, 11, 14], [6, 7, 13, 12, 10, VOID]]))
    pavement = modes[:, 0, 4]
    assert torch.equal(pavement == 11, switches[:, 0])
    assert torch.equal(base_labels(modes), label.long().expand(32, -1, -1))  # flips undone, void back to 11


def test_flip_frequencies_match_the_probabilities():
    """40000 masks: each frequency within 0.012 of its probability (about 4.5 standard errors,
    while neighbouring probabilities are 1/17 = 0.059 apart, so a swapped or wrong one fails);
    each class flips as a whole; flips are independent (the 32 modes' frequencies)."""
    n = 40000
    masks = every_class().repeat(n, 1, 1)  # (n, 2, 6)
    out = flip_labels(masks, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.int64 and out.shape == masks.shape
    assert torch.all(out[:, 1, 5] == VOID)  # void untouched (moved to 255 only)
    fixed = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 4)]  # Sky, Building, Pole, Sign, Fence, Bicyclist
    for r, c in fixed:
        assert torch.all(out[:, r, c] == masks[0, r, c])
    where = {4: (0, 4), 9: (1, 3), 8: (1, 2), 5: (0, 5), 3: (0, 3)}
    flipped = []
    for f in CAMVID_FLIPS:
        r, c = where[f.source]
        values = out[:, r, c]
        assert set(values.unique().tolist()) == {f.source, f.target}
        on = values == f.target
        assert abs(on.double().mean().item() - float(f.probability)) < 0.012, f.name
        flipped.append(on)
    # a class flips as a whole: a second pixel of Pavement in each mask always agrees with the first
    two = torch.tensor([[4, 4, 11]], dtype=torch.uint8).repeat(1000, 1, 1)
    out2 = flip_labels(two, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out2[:, 0, 0], out2[:, 0, 1]) and torch.all(out2[:, 0, 2] == VOID)
    # independence: the joint outcomes follow the 32 mode probabilities (total variation < 0.03;
    # a draw of 40000 is about 0.01 away on average)
    index = sum(on.long() << i for i, on in enumerate(flipped))  # (n,) mode number
    freq = torch.bincount(index, minlength=32).double() / n
    assert 0.5 * (freq - mode_table()[1]).abs().sum().item() < 0.03


def test_flips_are_seeded_and_stay_on_the_device():
    masks = every_class().repeat(8, 1, 1)
    a = flip_labels(masks, generator=torch.Generator().manual_seed(3))
    b = flip_labels(masks, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.device == masks.device


def test_check_labels_refuses_extended_labels():
    check_labels(every_class())  # base labels and void 11 pass
    with pytest.raises(ValueError, match=r"labels \[12\]"):
        check_labels(torch.tensor([[0, 12]]))
