"""A model's samples scored as a distribution of segmentations, for test.py --samples N: label
maps drawn from the model (its latent samples, or per pixel from its softmax), and their
generalized energy distance, Hungarian-matched IoU and diversity against the annotations (one,
several annotators, or the 32 known modes of the label-flip benchmark, whose mode statistics
are added).

    scores = SampleScores(num_classes=16, ignore_index=255, counts=(1, 4, 8, 16), flips=CAMVID_FLIPS)
    for probs, label in split:  # probs (S, C, H, W) at the label's size, from test.py's one pass
        scores.update(label_samples(probs), label)
    result = scores.compute()
"""

import torch

from ambiguity import CAMVID_VOID, flippable_classes, mode_maps, mode_table
from metrics import EnergyMeter, ModeMeter

SAMPLE_COUNTS = (1, 4, 8, 16)  # Kohl et al. 2018 report the energy distance for these
SAMPLINGS = ("latent", "pixel")


def sample_counts(samples):
    """The sample counts reported for `samples` draws per image: those of SAMPLE_COUNTS up to it,
    and `samples` itself."""
    return tuple(sorted({n for n in SAMPLE_COUNTS if n <= samples} | {samples}))


def label_samples(probs, sampling="latent", generator=None):
    """probs (S, C, H, W), one softmax per latent draw -> (S, H, W) int64 label maps.

    "latent": the argmax of each draw: a latent sample decoded into one segmentation.
    "pixel": S maps whose pixels are drawn independently from the mean probabilities, the
    samples a deterministic network offers (each pixel right as often as its softmax says, but
    no map need be consistent: a class can come out half flipped)."""
    if sampling == "latent":
        return probs.argmax(1)
    if sampling != "pixel":
        raise ValueError(f"sampling {sampling!r} is not one of {SAMPLINGS}")
    s, c, h, w = probs.shape
    p = probs.mean(0).movedim(0, -1).reshape(-1, c)  # (H * W, C)
    drawn = torch.multinomial(p.float().cpu(), s, replacement=True, generator=generator)  # (H * W, S)
    return drawn.T.reshape(s, h, w).to(probs.device)


class SampleScores:
    """Streaming distribution scores over a split, one image at a time.

    num_classes, ignore_index: the model's classes and void. counts: the sample counts to report
    (each update brings at least max(counts) samples). flips: None, or the flip benchmark's flips
    (ambiguity.py): then each label is a base label (void base_void) whose 32 modes, weighted by
    their probabilities, are the annotations, and the energy distance is taken over the ten
    flippable classes (Kohl et al. 2018); otherwise over every class, against the label's
    annotation(s) with equal weights."""

    def __init__(self, num_classes, ignore_index, counts=SAMPLE_COUNTS, flips=None, base_void=CAMVID_VOID):
        self.ignore_index, self.flips, self.base_void = ignore_index, flips, base_void
        if flips:
            switches, self.mode_probs = mode_table(flips)
            self.energy = EnergyMeter(flippable_classes(flips), counts)
            self.modes = ModeMeter(switches, self.mode_probs, [(f.source, f.target) for f in flips])
        else:
            self.energy = EnergyMeter(range(num_classes), counts)
            self.modes = None

    def update(self, samples, label):
        """samples (S, H, W) label maps in the model's classes; label (H, W), or (K, H, W) for K
        annotators, at the same size (base labels with flips)."""
        label = label.to(samples.device).long()
        if self.flips:
            valid = label != self.base_void
            modes = mode_maps(label, self.flips, void_in=self.base_void, void_out=self.ignore_index)
            d = self.energy.update(samples, modes, self.mode_probs, valid)
            self.modes.update(samples, label, d["ys"], d["yy"], valid)
            return
        annotations = label if label.dim() == 3 else label[None]  # (K, H, W)
        valid = (annotations != self.ignore_index).all(0)  # pixels every annotator labelled
        self.energy.update(samples, annotations, None, valid)

    def compute(self):
        """{"ged": {N: value}, "matched_iou": {N: ...}, "diversity": {N: ...}, "e_sy": ..., "e_yy": ...}
        and, with flips, the mode statistics of metrics.ModeMeter.compute."""
        per_n = self.energy.compute()
        out = {key: {n: row[key] for n, row in per_n.items()}
               for key in ("ged", "matched_iou", "diversity", "e_sy", "e_yy")}
        out["images"] = int(self.energy.images)
        if self.modes is not None:
            out.update(self.modes.compute())
            out["flipped_classes"] = [f.name for f in self.flips]
        return out
