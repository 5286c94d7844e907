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
from metrics import EnergyMeter, ModeMeter, iou_distances, mode_assignment

SAMPLE_COUNTS = (1, 4, 8, 16)  # Kohl et al. 2018 report the energy distance for these
SAMPLINGS = ("latent", "pixel")
FLOOR_DRAWS = 20  # simulated exact samplers behind the mode-TV noise floor


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
            pairs = [(f.source, f.target) for f in flips]
            self.modes = ModeMeter(switches, self.mode_probs, pairs)
            self.oracle = torch.zeros(2, dtype=torch.float64)  # sum of per-image oracle GEDs, images
            self.oracle_modes = ModeMeter(switches, self.mode_probs, pairs)
            # FLOOR_DRAWS exact samplers of the modes, as many samples an image as the model: the
            # mode TV that sampling noise alone gives (a sampler with the true frequencies scores it)
            self.floor_modes = torch.zeros(FLOOR_DRAWS, len(self.mode_probs), dtype=torch.float64)
            self.floor_rng = torch.Generator().manual_seed(0)
        else:
            self.energy = EnergyMeter(range(num_classes), counts)
            self.modes = None

    def update(self, samples, label, base_pred=None):
        """samples (S, H, W) label maps in the model's classes; label (H, W), or (K, H, W) for K
        annotators, at the same size (base labels with flips). With flips, base_pred (H, W): the
        model's mean segmentation in the base classes, for the oracle GED (`oracle_ged`)."""
        label = label.to(samples.device).long()
        if self.flips:
            valid = label != self.base_void
            modes = mode_maps(label, self.flips, void_in=self.base_void, void_out=self.ignore_index)
            d = self.energy.update(samples, modes, self.mode_probs, valid)
            self.modes.update(samples, label, d["ys"], d["yy"], valid)
            drawn = torch.multinomial(self.mode_probs.double(), FLOOR_DRAWS * samples.shape[0], replacement=True,
                                      generator=self.floor_rng).view(FLOOR_DRAWS, -1)
            counts = torch.zeros_like(self.floor_modes).scatter_add_(1, drawn, torch.ones_like(drawn).double())
            self.floor_modes += counts @ mode_assignment(d["yy"], d["yy"], self.mode_probs)
            if base_pred is not None:
                base_pred = base_pred.to(samples.device).long()
                ged, guesses, d_gy = oracle_ged(base_pred, modes, d["yy"], valid, self.flips, self.mode_probs,
                                                self.base_void, self.ignore_index)
                self.oracle += torch.tensor([ged, 1.0], dtype=torch.float64)
                self.oracle_modes.update(guesses, label, d_gy, d["yy"], valid, self.mode_probs)
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
            if self.energy.images:
                freq = self.floor_modes / self.floor_modes.sum(1, keepdim=True)
                out["mode_tv_floor"] = float((0.5 * (freq - self.mode_probs.double()).abs().sum(1)).mean())
            if self.oracle[1] > 0:
                out["oracle_ged"] = float(self.oracle[0] / self.oracle[1])
                out["oracle_mode_tv"] = self.oracle_modes.compute()["mode_tv"]
        return out


def oracle_ged(base_pred, modes, d_yy, valid, flips, mode_probs, base_void=CAMVID_VOID, void=255):
    """The exact D2_GED (infinitely many samples) of an oracle that knows the flips but segments
    as the model does: the 32 flips of the model's own base segmentation `base_pred` (H, W),
    each with its true probability, against the 32 modes (M, H, W) of the label (d_yy, their
    distances, and valid as in EnergyMeter.update). What is left of D2_GED once the flips are
    sampled perfectly is the segmentation's error, the reference the model's GED is read against
    (not a strict bound: where the segmentation is wrong, hedging samples can score lower).
    Returns (GED, the oracle's 32 maps (M, H, W), their distances to the modes (M, M))."""
    guesses = mode_maps(base_pred, flips, void_in=base_void, void_out=void)  # (M, H, W)
    classes = flippable_classes(flips)
    w = mode_probs.double().to(d_yy.device)
    d_sy = iou_distances(guesses, modes, classes, valid).cpu()
    d_ss = iou_distances(guesses, guesses, classes, valid).cpu()
    return float(2 * w @ d_sy @ w - w @ d_ss @ w - w @ d_yy.double() @ w), guesses, d_sy
