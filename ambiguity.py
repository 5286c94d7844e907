"""Known ambiguity: the label-flip benchmark of Kohl et al. 2018 (sec. 4.2), applied to CamVid.

Each time a training image is drawn, all pixels of a flippable class are relabelled at once to
that class's second version, independently per class: Pavement -> Pavement-2 with probability
8/17, Pedestrian 7/17, Car 6/17, Tree 5/17, Road 4/17 (the probabilities Kohl et al. give
sidewalk, person, car, vegetation and road on Cityscapes). That makes 11 + 5 = 16 classes and
2^5 = 32 possible label maps per image, each with a known probability, so a model's samples can
be compared with the exact distribution they should follow.

The five new classes take indices 11..15, where CamVid keeps its void label (11), so void must
move: `flip_labels` and `mode_maps` write it as 255 (`VOID`). Everything here is plain torch on
whatever device the masks are on; it imports nothing else of this repository.

    python ambiguity.py   # prints the 16-class table and the 32 modes with their probabilities

    from ambiguity import CAMVID_FLIPS, flip_labels, mode_maps, mode_table
    masks = flip_labels(masks, generator=g)    # (B, H, W) uint8/int, CamVid void 11 -> 255
    modes, probs = mode_maps(label), mode_table()[1]   # (32, H, W), (32,) summing to 1
"""

from fractions import Fraction
from typing import NamedTuple

import torch

VOID = 255  # void after flipping; 11 is Pavement-2 there


class Flip(NamedTuple):
    source: int  # class index in the base table
    target: int  # index of its second version in the extended table
    probability: Fraction  # chance that an image's pixels of `source` all become `target`
    name: str  # name of the second version
    colour: tuple  # its display colour (r, g, b)


# Kohl et al. 2018's order and probabilities; colours chosen to stand apart from CamVid's palette.
CAMVID_FLIPS = (
    Flip(4, 11, Fraction(8, 17), "Pavement-2", (46, 247, 180)),
    Flip(9, 12, Fraction(7, 17), "Pedestrian-2", (167, 242, 242)),
    Flip(8, 13, Fraction(6, 17), "Car-2", (30, 193, 252)),
    Flip(5, 14, Fraction(5, 17), "Tree-2", (242, 160, 19)),
    Flip(3, 15, Fraction(4, 17), "Road-2", (84, 86, 22)),
)
CAMVID_CLASSES = 11  # base classes 0..10
CAMVID_VOID = 11  # void in the base labels


def extended_classes(names, colours, flips=CAMVID_FLIPS):
    """The class table after flipping: names and colours of the base classes (void excluded,
    indices 0..len(names)-1) followed by the second versions. Refuses flips whose targets are
    not the next indices in order (the model's classes must stay contiguous)."""
    names, colours = list(names), [tuple(c) for c in colours]
    if len(names) != len(colours):
        raise ValueError(f"{len(names)} class names but {len(colours)} colours")
    for i, f in enumerate(flips):
        if f.target != len(names) + i:
            raise ValueError(f"flip {f.name} has target {f.target}, expected {len(names) + i}: the second "
                             f"versions must follow the {len(names)} base classes in order")
        if not 0 <= f.source < len(names):
            raise ValueError(f"flip {f.name} has source {f.source}, not a base class 0..{len(names) - 1}")
    return names + [f.name for f in flips], colours + [f.colour for f in flips]


def flippable_classes(flips=CAMVID_FLIPS):
    """The classes the flip benchmark's energy distance is computed over (Kohl et al. 2018):
    each flippable class and its second version, 2 * len(flips) indices."""
    return [f.source for f in flips] + [f.target for f in flips]


def mode_table(flips=CAMVID_FLIPS):
    """All 2^F ways the F flips can fall. Returns switches (M, F) bool, row m flipping class i
    when bit i of m is set, and their probabilities (M,) float64, exactly the products of p_i
    or 1 - p_i (computed with fractions, so they sum to 1 up to float rounding)."""
    n = len(flips)
    m = torch.arange(2 ** n)
    switches = (m[:, None] >> torch.arange(n)) & 1 == 1  # (M, F)
    probs = []
    for row in switches.tolist():
        p = Fraction(1)
        for on, f in zip(row, flips):
            p *= f.probability if on else 1 - f.probability
        probs.append(float(p))
    return switches, torch.tensor(probs, dtype=torch.float64)


def lookup_tables(switches, flips=CAMVID_FLIPS, void_in=CAMVID_VOID, void_out=VOID):
    """One relabelling table per row of switches (N, F): (N, 256) int64, identity except void_in
    -> void_out and, where the row says so, each flip's source -> target. Labels are < 256."""
    lut = torch.arange(256, device=switches.device).repeat(switches.shape[0], 1)  # (N, 256)
    lut[:, void_in] = void_out
    for i, f in enumerate(flips):
        lut[:, f.source] = torch.where(switches[:, i], f.target, f.source)
    return lut


def relabel(masks, lut):
    """masks (N, H, W) integer labels in [0, 256), lut (N, 256) or (256,) -> relabelled (N, H, W)
    int64 with one gather for the whole batch."""
    flat = masks.reshape(masks.shape[0], -1).long()  # (N, H * W)
    lut = lut.expand(masks.shape[0], -1) if lut.dim() == 1 else lut
    return lut.gather(1, flat).reshape(masks.shape)


def check_labels(masks, num_classes=CAMVID_CLASSES, void_in=CAMVID_VOID):
    """Refuse masks with a label that is neither a base class nor void: a label 11..15 there
    would be read as void or pass as a second version. One host sync; call it once per split,
    not per step."""
    bad = (masks.long() >= num_classes) & (masks.long() != void_in)
    if bool(bad.any()):
        found = sorted(set(masks[bad].long().unique().tolist()))
        raise ValueError(f"labels {found} are neither a class 0..{num_classes - 1} nor void {void_in}; the flip "
                         f"benchmark expects base labels")


def flip_labels(masks, generator=None, flips=CAMVID_FLIPS, void_in=CAMVID_VOID, void_out=VOID):
    """The training-time flips: for each mask of the batch (B, H, W) independently, each flip i
    happens with its probability and then relabels all pixels of its class at once. Void moves
    from void_in to void_out whether or not anything flips. Returns (B, H, W) int64 on the masks'
    device. The coins are drawn on the CPU from `generator` (seeded: reproducible), B * F numbers."""
    p = torch.tensor([float(f.probability) for f in flips], dtype=torch.float64)
    coins = torch.rand((masks.shape[0], len(flips)), generator=generator, dtype=torch.float64) < p  # (B, F)
    return relabel(masks, lookup_tables(coins.to(masks.device), flips, void_in, void_out))


def mode_maps(label, flips=CAMVID_FLIPS, void_in=CAMVID_VOID, void_out=VOID):
    """The 2^F possible label maps of one base label (H, W): (M, H, W) int64, in the order of
    `mode_table`, void moved to void_out in all of them."""
    switches, _ = mode_table(flips)
    return relabel(label.expand(len(switches), *label.shape), lookup_tables(switches.to(label.device), flips,
                                                                              void_in, void_out))


def base_labels(masks, flips=CAMVID_FLIPS, void=VOID, void_out=CAMVID_VOID):
    """Undo the flips: (B, H, W) labels of the extended table -> base classes, void -> void_out."""
    lut = torch.arange(256, device=masks.device)
    lut[void] = void_out
    for f in flips:
        lut[f.target] = f.source
    return relabel(masks, lut)


def check_base_table(names, ignore_index, flips=CAMVID_FLIPS, base_names=None):
    """Refuse (ValueError) a class table the flips cannot apply to: the second versions take the
    indices after the base classes, so there must be exactly `base_classes` classes, void must be
    CamVid's 11, and each flipped class must be where CamVid has it (by name)."""
    base_names = base_names or ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                                "Pedestrian", "Bicyclist"]
    found = [str(n).lower() for n in names]
    wrong = [f"{f.source} should be {base_names[f.source]!r}" for f in flips
             if f.source >= len(found) or found[f.source] != base_names[f.source].lower()]
    if len(names) != len(base_names) or ignore_index != CAMVID_VOID or wrong:
        raise ValueError(f"the label flips are CamVid's benchmark: they need its {len(base_names)} classes with void "
                         f"{CAMVID_VOID}, but the class table has {len(names)} classes, void {ignore_index}"
                         + (f" (class {', '.join(wrong)})" if wrong else ""))


def flips_to_list(flips=CAMVID_FLIPS):
    """The flips as primitives for a checkpoint: [[source, target, numerator, denominator, name,
    [r, g, b]], ...]."""
    return [[f.source, f.target, f.probability.numerator, f.probability.denominator, f.name, list(f.colour)]
            for f in flips]


def flips_from_list(rows):
    """Inverse of `flips_to_list`."""
    return tuple(Flip(int(s), int(t), Fraction(int(n), int(d)), str(name), tuple(colour))
                 for s, t, n, d, name, colour in rows)


def merge_flipped(logits, flips=CAMVID_FLIPS, num_base=CAMVID_CLASSES, dim=1):
    """Logits over the extended table -> log-probabilities over the base classes, each class's
    probability plus its second version's: (..., base + F, ...) -> (..., base, ...) along `dim`.
    Used to score a flip model's segmentation on the unflipped labels (mIoU, calibration)."""
    logp = logits.float().log_softmax(dim)
    out = logp.narrow(dim, 0, num_base).clone()
    for f in flips:
        both = torch.logaddexp(logp.select(dim, f.source), logp.select(dim, f.target))
        out.select(dim, f.source).copy_(both)
    return out


def merge_flipped_probs(probs, flips=CAMVID_FLIPS, num_base=CAMVID_CLASSES, dim=1):
    """Probabilities over the extended table -> over the base classes (each class's plus its
    second version's), along `dim`."""
    out = probs.narrow(dim, 0, num_base).clone()
    for f in flips:
        out.select(dim, f.source).add_(probs.select(dim, f.target))
    return out


def main():
    names = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
             "Bicyclist"]
    names, colours = extended_classes(names, [(0, 0, 0)] * len(names))
    print("index,name (void is", VOID, "after flipping)")
    for i, name in enumerate(names):
        print(f"{i},{name}")
    switches, probs = mode_table()
    print("\nmode  " + "  ".join(f.name for f in CAMVID_FLIPS) + "  probability")
    for m, (row, p) in enumerate(zip(switches.tolist(), probs.tolist())):
        print(f"{m:>4}  " + "  ".join(f"{int(on):>{len(f.name)}}" for on, f in zip(row, CAMVID_FLIPS))
              + f"  {p:.5f}")
    print(f"sum {probs.sum().item():.12f}")


if __name__ == "__main__":
    main()
