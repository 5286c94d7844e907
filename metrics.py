"""Evaluation metrics for the VAE segmenter.

Four groups of tools live here:

* confusion-matrix metrics (mIoU, pixel accuracy, class accuracy), with rows
  indexing the true class and columns the predicted class;
* per-pixel uncertainty maps computed from S sampled softmax predictions
  (predictive entropy, expected entropy, mutual information, variance);
* ``UncertaintyMeter``, a streaming accumulator for calibration (ECE, NLL,
  Brier) and for how well the uncertainty ranks the model's own errors
  (AUROC, accuracy/mIoU versus coverage) over a whole split, without storing
  per-pixel arrays;
* distances between distributions of segmentations, for models that sample
  them: the generalized energy distance with d = 1 - IoU, sample diversity and
  Hungarian-matched IoU (``EnergyMeter``), and the mode statistics of the
  label-flip benchmark (``ModeMeter``), each streaming image by image.

All reductions are done in float64 / int64 so that sums over tens of millions
of pixels do not lose precision.
"""

import math

import torch

# Floor used inside logarithms. With it, p * log(p) is exactly 0 for p == 0
# and p == 1, so a one-hot distribution has an entropy of exactly 0.
_EPS = 1e-12


# ---------------------------------------------------------------------------
# Confusion-matrix metrics
# ---------------------------------------------------------------------------


def confusion_matrix(pred, target, num_classes, ignore_index):
    """Count (true, predicted) class pairs.

    pred, target: integer tensors of the same (arbitrary) shape. ``pred`` must
    lie in [0, num_classes). Pixels whose target equals ``ignore_index``, or
    falls outside [0, num_classes), are left out.

    Returns an int64 tensor (C, C) on the input device; entry [t, p] is the
    number of pixels of true class t predicted as class p.
    """
    c = num_classes
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = (target != ignore_index) & (target >= 0) & (target < c)
    # Encode each (t, p) pair as one flat index so a single bincount builds
    # the whole matrix.
    flat = c * target[keep] + pred[keep]
    return torch.bincount(flat, minlength=c * c).reshape(c, c)


def scores(cm):
    """Segmentation scores from a (C, C) confusion matrix (rows = true class).

    Returns a dict:
      miou      mean IoU over classes with union > 0 (present in the ground
                truth or in the prediction);
      iou       per-class IoU list, NaN where the union is 0;
      pixel_acc global accuracy, trace / total;
      class_acc mean per-class recall over classes present in the ground truth;
      recall    per-class recall list, NaN where the class is absent from the
                ground truth.
    An all-zero matrix gives NaN for every value instead of raising.
    """
    cm = cm.detach().to("cpu", torch.float64)
    tp = cm.diagonal()
    gt = cm.sum(1)  # (C,) pixels of each true class
    pr = cm.sum(0)  # (C,) pixels predicted as each class
    union = gt + pr - tp
    nan = torch.full_like(tp, math.nan)
    # Division is guarded by where(); the 0/0 in the unused branch is harmless.
    iou = torch.where(union > 0, tp / union, nan)
    recall = torch.where(gt > 0, tp / gt, nan)
    total = cm.sum()
    pixel_acc = (tp.sum() / total).item() if total > 0 else math.nan
    return {
        "miou": _nanmean(iou),
        "iou": iou.tolist(),
        "pixel_acc": pixel_acc,
        "class_acc": _nanmean(recall),
        "recall": recall.tolist(),
    }


def _nanmean(x):
    """Mean of the non-NaN entries of a 1-D tensor, NaN if there are none."""
    valid = x[~torch.isnan(x)]
    return valid.mean().item() if valid.numel() > 0 else math.nan


# ---------------------------------------------------------------------------
# Uncertainty maps from sampled predictions
# ---------------------------------------------------------------------------


def softmax_entropy(probs_bchw):
    """Entropy (nats) of a categorical distribution along dim 1.

    probs_bchw: (B, C, H, W) probabilities. Returns (B, H, W).
    """
    p = probs_bchw
    return -(p * torch.log(p.clamp_min(_EPS))).sum(1)


def uncertainty_maps(probs):
    """Per-pixel uncertainty from S sampled softmax predictions.

    probs: (S, B, C, H, W), one softmax output per latent sample.

    Uses the standard decomposition of predictive entropy into an expected
    (aleatoric) part and a mutual-information (epistemic) part
    (Gal 2016, "Uncertainty in Deep Learning", sec. 3.3;
    Depeweg et al. 2018, "Decomposition of Uncertainty in Bayesian Deep
    Learning for Efficient and Risk-sensitive Learning"):
        H[E_s p_s] = E_s H[p_s] + I(y; s).

    Returns a dict:
      mean             (B, C, H, W) mean probabilities over samples;
      entropy          (B, H, W) predictive entropy H[mean p];
      expected_entropy (B, H, W) mean over samples of H[p_s];
      mutual_info      (B, H, W) entropy - expected_entropy, clamped >= 0
                       (it can dip below 0 only through rounding);
      variance         (B, H, W) population variance over samples of the
                       probability given to the class that wins in the mean.
    S = 1 is allowed: mutual_info and variance are then 0.
    """
    s, b, c, h, w = probs.shape
    mean = probs.mean(0)  # (B, C, H, W)
    entropy = softmax_entropy(mean)
    # Fold S into the batch dim to reuse softmax_entropy: (S*B, H, W).
    per_sample = softmax_entropy(probs.reshape(s * b, c, h, w))
    expected_entropy = per_sample.reshape(s, b, h, w).mean(0)
    mutual_info = (entropy - expected_entropy).clamp_min(0)
    winner = mean.argmax(1)  # (B, H, W)
    index = winner[None, :, None].expand(s, b, 1, h, w)
    p_win = probs.gather(2, index).squeeze(2)  # (S, B, H, W)
    variance = p_win.var(0, correction=0)
    return {
        "mean": mean,
        "entropy": entropy,
        "expected_entropy": expected_entropy,
        "mutual_info": mutual_info,
        "variance": variance,
    }


# ---------------------------------------------------------------------------
# Streaming calibration / uncertainty evaluation
# ---------------------------------------------------------------------------


class UncertaintyMeter:
    """Accumulates calibration and uncertainty-quality statistics over a split.

    Nothing per-pixel is stored; only these sum-able tensors (the public
    accumulators, all plain sums over pixels):

      ece_count   (n_bins_ece,) int64    pixels per confidence bin
      ece_conf    (n_bins_ece,) float64  sum of confidence per bin
      ece_correct (n_bins_ece,) float64  number correct per bin
      nll_sum     ()            float64  sum of -log p[target]
      brier_sum   ()            float64  sum of multi-class Brier scores
      cm          (n_bins_unc, C, C) int64  confusion matrix per
                  uncertainty bin (rows = true class)

    Accumulators live on the device of the last ``update`` input. For
    distributed evaluation, all_reduce (SUM) each tensor of ``state()`` in
    place on every rank, or gather them and call ``load_state`` with the
    element-wise sums, then call ``compute()``.
    """

    def __init__(self, num_classes, ignore_index, max_uncertainty,
                 n_bins_ece=15, n_bins_unc=1000):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.max_uncertainty = float(max_uncertainty)
        self.n_bins_ece = n_bins_ece
        self.n_bins_unc = n_bins_unc
        self.reset()

    def reset(self):
        """Zero all accumulators (on CPU)."""
        c, ne, nu = self.num_classes, self.n_bins_ece, self.n_bins_unc
        self.ece_count = torch.zeros(ne, dtype=torch.int64)
        self.ece_conf = torch.zeros(ne, dtype=torch.float64)
        self.ece_correct = torch.zeros(ne, dtype=torch.float64)
        self.nll_sum = torch.zeros((), dtype=torch.float64)
        self.brier_sum = torch.zeros((), dtype=torch.float64)
        self.cm = torch.zeros(nu, c, c, dtype=torch.int64)

    _NAMES = ("ece_count", "ece_conf", "ece_correct", "nll_sum", "brier_sum",
              "cm")

    def state(self):
        """The accumulator tensors, in a fixed order; all combine by summing."""
        return [getattr(self, n) for n in self._NAMES]

    def load_state(self, tensors):
        """Replace the accumulators with ``tensors`` (same order as state())."""
        if len(tensors) != len(self._NAMES):
            raise ValueError(f"expected {len(self._NAMES)} tensors, "
                             f"got {len(tensors)}")
        for name, t in zip(self._NAMES, tensors):
            old = getattr(self, name)
            if t.shape != old.shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)} != "
                                 f"{tuple(old.shape)}")
            setattr(self, name, t.to(old.dtype).clone())

    def _move(self, device):
        for name in self._NAMES:
            setattr(self, name, getattr(self, name).to(device))

    @torch.no_grad()
    def update(self, probs, target, uncertainty):
        """Add a batch.

        probs: (B, C, H, W) mean predictive probabilities.
        target: (B, H, W) integer labels; ignore_index pixels are skipped.
        uncertainty: (B, H, W) score in [0, max_uncertainty]; larger values
            are clipped into the last bin, negative ones into the first.
        """
        c = self.num_classes
        self._move(probs.device)
        # (B, C, H, W) -> (N, C) with one row per pixel.
        p = probs.movedim(1, -1).reshape(-1, c)
        t = target.reshape(-1).long()
        u = uncertainty.reshape(-1)
        keep = (t != self.ignore_index) & (t >= 0) & (t < c)
        p, t, u = p[keep], t[keep], u[keep]

        conf, pred = p.max(1)  # (N,), (N,)
        correct = pred == t

        # Reliability / ECE bins: equal width on [0, 1], bin k covers
        # [k/n, (k+1)/n), with confidence 1 folded into the last bin
        # (Naeini et al. 2015; Guo et al. 2017, sec. 2).
        ne = self.n_bins_ece
        ebin = (conf * ne).long().clamp_(0, ne - 1)
        self.ece_count += torch.bincount(ebin, minlength=ne)
        self.ece_conf += torch.bincount(ebin, weights=conf.double(),
                                        minlength=ne)
        self.ece_correct += torch.bincount(ebin, weights=correct.double(),
                                           minlength=ne)

        p_true = p.gather(1, t[:, None]).squeeze(1)  # (N,)
        self.nll_sum += -torch.log(p_true.double().clamp_min(_EPS)).sum()
        # Multi-class Brier score (Brier 1950): sum_c (p_c - 1[c = t])^2,
        # expanded as sum_c p_c^2 - 2 p_t + 1 to avoid building a one-hot.
        sq = (p.double() ** 2).sum(1)
        self.brier_sum += (sq - 2 * p_true.double() + 1).sum()

        # One confusion matrix per uncertainty bin, built with a single
        # bincount over the flat index (bin, t, pred).
        nu = self.n_bins_unc
        ubin = torch.floor(u.double() / self.max_uncertainty * nu)
        ubin = ubin.clamp_(0, nu - 1).long()
        flat = (ubin * c + t) * c + pred
        self.cm += torch.bincount(flat, minlength=nu * c * c).reshape(nu, c, c)

    def reliability(self):
        """Per-bin data for a reliability diagram (Guo et al. 2017, fig. 1).

        Returns lists over the n_bins_ece bins: ``confidence`` (mean
        confidence), ``accuracy``, ``count``, and ``edges`` (n_bins_ece + 1
        bin boundaries). Empty bins have NaN confidence and accuracy.
        """
        count = self.ece_count.cpu()
        n = count.double()
        nan = torch.full_like(n, math.nan)
        conf = torch.where(n > 0, self.ece_conf.cpu() / n, nan)
        acc = torch.where(n > 0, self.ece_correct.cpu() / n, nan)
        edges = torch.linspace(0, 1, self.n_bins_ece + 1, dtype=torch.float64)
        return {
            "confidence": conf.tolist(),
            "accuracy": acc.tolist(),
            "count": count.tolist(),
            "edges": edges.tolist(),
        }

    def compute(self, fractions=(0.5, 0.75, 0.9, 1.0)):
        """Final metrics from the accumulators.

        Returns a dict:
          ece        expected calibration error,
                     sum_b n_b / N * |acc_b - conf_b| (Guo et al. 2017, eq. 3);
          nll        mean negative log-likelihood of the true class;
          brier      mean multi-class Brier score (Brier 1950);
          auroc      AUROC of the uncertainty for detecting wrong pixels;
          miou, pixel_acc  over all counted pixels;
          coverage   list of dicts (one per requested fraction) with
                     coverage, actual_coverage, miou, pixel_acc over the
                     most certain pixels;
          curve      dict of lists over uncertainty bins: coverage and
                     accuracy (cumulative from the most certain bin), and
                     threshold (upper uncertainty edge of each bin).
        """
        cm = self.cm.cpu()
        n_total = int(self.ece_count.sum())
        if n_total > 0:
            ece = ((self.ece_correct - self.ece_conf).abs().sum()
                   / n_total).item()
            nll = (self.nll_sum / n_total).item()
            brier = (self.brier_sum / n_total).item()
        else:
            ece = nll = brier = math.nan
        overall = scores(cm.sum(0))

        # Per uncertainty bin (ascending uncertainty): pixels and correct ones.
        count = cm.sum((1, 2))  # (n_bins_unc,)
        right = cm.diagonal(dim1=1, dim2=2).sum(1)  # (n_bins_unc,)
        wrong = count - right

        cum = count.cumsum(0)  # (n_bins_unc,) pixels kept up to each bin
        cum_right = right.cumsum(0)
        coverage = []
        for frac in fractions:
            if n_total == 0:
                coverage.append({"coverage": frac, "actual_coverage": math.nan,
                                 "miou": math.nan, "pixel_acc": math.nan})
                continue
            # First bin whose cumulative count reaches frac * N; whole bins
            # are kept, so the actual coverage can exceed the request.
            need = torch.tensor([frac * n_total], dtype=torch.float64)
            idx = int(torch.searchsorted(cum.double(), need))
            idx = min(idx, self.n_bins_unc - 1)
            kept = scores(cm[: idx + 1].sum(0))
            coverage.append({
                "coverage": frac,
                "actual_coverage": cum[idx].item() / n_total,
                "miou": kept["miou"],
                "pixel_acc": kept["pixel_acc"],
            })

        cum_d = cum.double()
        curve_acc = torch.where(cum > 0, cum_right.double() / cum_d,
                                torch.full_like(cum_d, math.nan))
        thresholds = (torch.arange(1, self.n_bins_unc + 1, dtype=torch.float64)
                      * self.max_uncertainty / self.n_bins_unc)
        curve_cov = cum_d / n_total if n_total else torch.full_like(cum_d,
                                                                    math.nan)
        curve = {
            "coverage": curve_cov.tolist(),
            "accuracy": curve_acc.tolist(),
            "threshold": thresholds.tolist(),
        }

        return {
            "ece": ece,
            "nll": nll,
            "brier": brier,
            "auroc": _binned_auroc(wrong, right),
            "miou": overall["miou"],
            "pixel_acc": overall["pixel_acc"],
            "coverage": coverage,
            "curve": curve,
        }


def _binned_auroc(pos, neg):
    """AUROC from per-bin positive / negative counts (bins in ascending score).

    Uses the Mann-Whitney form: the probability that a random positive scores
    higher than a random negative, with pairs in the same bin counted as a
    half (they are tied at the bin's resolution). NaN if either class is
    empty.
    """
    pos = pos.double()
    neg = neg.double()
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_below = neg.cumsum(0) - neg  # negatives in strictly lower bins
    wins = (pos * (neg_below + 0.5 * neg)).sum()
    return (wins / (n_pos * n_neg)).item()


# ---------------------------------------------------------------------------
# Distributions of segmentations: generalized energy distance and modes
# ---------------------------------------------------------------------------


def iou_distances(a, b, classes, valid=None):
    """d = 1 - IoU between every map of ``a`` and every map of ``b``, the distance of the
    generalized energy distance in Kohl et al. 2018 (sec. 4).

    a: (N, H, W), b: (M, H, W) integer label maps of one image; classes: the class indices the
    IoU is taken over; valid: (H, W) bool, the pixels to compare (None: all).

    For a pair, the IoU of each class present in either map is averaged; classes absent from
    both are skipped (Kohl et al.'s nanmean). When no class of ``classes`` occurs in either map,
    the two agree on every evaluated class and d = 0 (Kohl et al.'s code gives NaN there).
    Returns (N, M) float64.
    """
    n, m = a.shape[0], b.shape[0]
    # uint8 labels (all < 256) make the per-class comparisons below cheaper than int64 ones.
    a, b = a.reshape(n, -1).to(torch.uint8), b.reshape(m, -1).to(torch.uint8)
    if valid is not None:
        keep = valid.reshape(-1).to(a.device)
        a, b = a[:, keep], b[:, keep]
    k = len(classes)
    inter = torch.zeros(n, m, k, dtype=torch.float64, device=a.device)
    area_a = torch.zeros(n, k, dtype=torch.float64, device=a.device)
    area_b = torch.zeros(m, k, dtype=torch.float64, device=a.device)
    for i, c in enumerate(classes):
        # float32 sums of 0/1 are exact up to 2^24 pixels per map.
        ia, ib = (a == c).float(), (b == c).float()  # (N, P), (M, P)
        inter[:, :, i] = (ia @ ib.T).double()  # (N, M) pixels of class c in both
        area_a[:, i], area_b[:, i] = ia.sum(1).double(), ib.sum(1).double()
    union = area_a[:, None] + area_b[None] - inter  # (N, M, K)
    present = union > 0
    iou = torch.where(present, inter / union.clamp_min(1), torch.zeros_like(union))
    count = present.sum(-1)  # (N, M) classes in either map
    mean_iou = iou.sum(-1) / count.clamp_min(1)
    return torch.where(count > 0, 1 - mean_iou, torch.zeros_like(mean_iou))


def matched_iou(d, weights=None):
    """Hungarian-matched IoU between N samples and M annotations, from d = 1 - IoU (N, M).

    Uniform weights (weights None: multi-annotator data): both sets are repeated up to
    lcm(N, M) members, so each sample and each annotation is matched equally often (the
    Hierarchical Probabilistic U-Net, Kohl et al. 2019, duplicates the ground-truth set to the
    samples' size), and the optimal one-to-one matching (Kuhn 1955;
    scipy.optimize.linear_sum_assignment) gives the mean IoU of matched pairs. Weighted
    annotations (weights (M,) summing to 1: the flip modes) cannot be repeated in proportion;
    the same matching is then the optimal transport between 1/N per sample and w_m per
    annotation (a linear program, scipy.optimize.linprog), of which the uniform case is a
    special case (Birkhoff: the optimum of the linear program is a permutation).
    Returns a float in [0, 1].
    """
    import numpy as np
    from scipy.optimize import linear_sum_assignment, linprog

    cost = d.detach().cpu().double().numpy()
    n, m = cost.shape
    if weights is None:
        size = math.lcm(n, m)
        big = np.repeat(np.repeat(cost, size // n, axis=0), size // m, axis=1)  # (L, L)
        rows, cols = linear_sum_assignment(big)
        return float(1 - big[rows, cols].mean())
    w = weights.detach().cpu().double().numpy()
    # Plan x (N, M) flattened row-major: rows sum to 1/N, columns to w_m, x >= 0.
    a_rows = np.kron(np.eye(n), np.ones((1, m)))
    a_cols = np.kron(np.ones((1, n)), np.eye(m))
    res = linprog(cost.reshape(-1), A_eq=np.vstack([a_rows, a_cols]),
                  b_eq=np.concatenate([np.full(n, 1 / n), w / w.sum()]), bounds=(0, None), method="highs")
    if not res.success:
        raise RuntimeError(f"optimal transport for the matched IoU failed: {res.message}")
    return float(1 - res.fun)


class EnergyMeter:
    """Streaming generalized energy distance over a split, one image at a time.

    D2_GED = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')], d = 1 - IoU (``iou_distances``), S and S'
    the model's samples, Y and Y' the annotations (uniform weights) or the known modes with their
    probabilities (Kohl et al. 2018, sec. 4; Szekely & Rizzo 2013, "Energy statistics"). For
    each sample count N in ``sample_counts`` the first N samples are used, and, as in Kohl et
    al.'s code, the expectations over pairs include each member paired with itself (d = 0), so
    E[d(S, S')] is 0 for N = 1. Per image: the GED, its three terms (E[d(S, S')] is the sample diversity) and the
    Hungarian-matched IoU (``matched_iou``); ``compute`` averages them over images.

    Accumulators (``state()``, all combine by summing across ranks): ``sums`` (len(counts), 5)
    float64 of per-image ged, e_sy, e_ss, e_yy, matched IoU; ``images`` () int64.
    """

    _FIELDS = ("ged", "e_sy", "e_ss", "e_yy", "matched_iou")

    def __init__(self, classes, sample_counts=(1, 4, 8, 16)):
        self.classes = list(classes)
        self.counts = tuple(sorted(sample_counts))
        self.reset()

    def reset(self):
        self.sums = torch.zeros(len(self.counts), len(self._FIELDS), dtype=torch.float64)
        self.images = torch.zeros((), dtype=torch.int64)

    def state(self):
        return [self.sums, self.images]

    def load_state(self, tensors):
        self.sums, self.images = (t.detach().cpu().to(o.dtype).clone() for t, o in zip(tensors, self.state()))

    @torch.no_grad()
    def update(self, samples, annotations, weights=None, valid=None):
        """Add one image.

        samples: (S, H, W) labels, S >= max(sample_counts); annotations: (M, H, W) labels;
        weights: (M,) probabilities of the annotations (None: uniform); valid: (H, W) bool pixels
        to compare (None: all), e.g. the non-void pixels of the label.
        Returns the distance matrices {"ys": (S, M), "ss": (S, S), "yy": (M, M)} (float64), which
        ``ModeMeter.update`` reuses.
        """
        if samples.shape[0] < self.counts[-1]:
            raise ValueError(f"{samples.shape[0]} samples for sample counts up to {self.counts[-1]}")
        d_ys = iou_distances(samples, annotations, self.classes, valid).cpu()
        d_ss = iou_distances(samples, samples, self.classes, valid).cpu()
        d_yy = iou_distances(annotations, annotations, self.classes, valid).cpu()
        m = annotations.shape[0]
        w = torch.full((m,), 1 / m, dtype=torch.float64) if weights is None else weights.cpu().double()
        e_yy = float(w @ d_yy @ w)
        for i, n in enumerate(self.counts):
            e_sy = float((d_ys[:n] @ w).mean())
            e_ss = float(d_ss[:n, :n].mean())
            hung = matched_iou(d_ys[:n], None if weights is None else w)
            self.sums[i] += torch.tensor([2 * e_sy - e_ss - e_yy, e_sy, e_ss, e_yy, hung], dtype=torch.float64)
        self.images += 1
        return {"ys": d_ys, "ss": d_ss, "yy": d_yy}

    def compute(self):
        """{N: {"ged", "e_sy", "diversity" (= E[d(S, S')]), "e_yy", "matched_iou"}} averaged over
        images; NaN when no image was added."""
        n = int(self.images)
        out = {}
        for i, count in enumerate(self.counts):
            mean = (self.sums[i] / n).tolist() if n else [math.nan] * len(self._FIELDS)
            row = dict(zip(self._FIELDS, mean))
            row["diversity"] = row.pop("e_ss")
            out[count] = row
        return out


def mode_assignment(d_ys, d_yy, probs):
    """Which mode each sample counts for, (S, M) float64 rows summing to 1: its nearest mode by
    d_ys (S, M) (ties to the first), spread over the modes that are the same map on this image
    (d_yy (M, M) = 0) in proportion to their probabilities (M,); see ModeMeter."""
    nearest = d_ys.cpu().double().argmin(1)  # (S,)
    same = d_yy.cpu().double() == 0  # (M, M)
    share = same[nearest] * probs.cpu().double()
    return share / share.sum(1, keepdim=True)


class ModeMeter:
    """Streaming statistics of the flip benchmark (ambiguity.py) over a split.

    switches: (M, F) bool, which flips each of the M modes makes; probs: (M,) their
    probabilities; flips: F (source, target) class pairs.

    - Pixel share of each flip: over the valid pixels whose unflipped label is the source class,
      the sampled pixels labelled target / (source + target) (Kohl et al. 2018's pixel-wise
      counts); its true value is the flip's probability.
    - Mode frequencies: each sample is assigned to its nearest mode by d = 1 - IoU, as Kohl et
      al. do (ties to the first). Modes that differ only in a class absent from the image are the
      same map there (d(Y, Y') = 0); Kohl et al. count such a sample for the first of them, which
      biases the frequencies whenever an image lacks a flippable class, so here it is shared by
      the identical modes in proportion to their probabilities. The total-variation distance
      1/2 sum_m |freq_m - p_m| is then 0 for a model that samples each image's modes with their
      true probabilities, while a sample equally far from every mode (say, with no flippable
      class at all) still counts for the first mode alone.
    - Image share of each flip: the share of samples whose assigned mode makes the flip, over
      images that contain the source class.

    Accumulators (``state()``, all sums): ``pixels`` (F, 2) float64 sampled source / target
    pixels; ``modes`` (M,) float64 assigned samples; ``flip_on`` (F, 2) float64 samples assigned
    to a mode with the flip, samples counted (images with the class only).
    """

    def __init__(self, switches, probs, flips):
        self.switches = switches.cpu().bool()
        self.probs = probs.cpu().double()
        self.flips = [(int(s), int(t)) for s, t in flips]
        self.reset()

    def reset(self):
        f, m = len(self.flips), len(self.probs)
        self.pixels = torch.zeros(f, 2, dtype=torch.float64)
        self.modes = torch.zeros(m, dtype=torch.float64)
        self.flip_on = torch.zeros(f, 2, dtype=torch.float64)

    def state(self):
        return [self.pixels, self.modes, self.flip_on]

    def load_state(self, tensors):
        self.pixels, self.modes, self.flip_on = (t.detach().cpu().double().clone() for t in tensors)

    @torch.no_grad()
    def update(self, samples, base_label, d_ys, d_yy, valid=None, weights=None):
        """Add one image: samples (S, H, W) labels of the extended table; base_label (H, W) the
        unflipped label; d_ys (S, M) distances of each sample to each mode and d_yy (M, M)
        between the modes (from ``EnergyMeter.update``); valid (H, W) bool pixels to count
        (None: all); weights (S,): what each sample counts for (None: 1 each; the oracle of
        ``sampling.oracle_ged`` gives its 32 maps their probabilities)."""
        valid = torch.ones_like(base_label, dtype=torch.bool) if valid is None else valid
        w = torch.ones(samples.shape[0], dtype=torch.float64) if weights is None else weights.cpu().double()
        for i, (src, tgt) in enumerate(self.flips):
            where = (base_label == src) & valid  # (H, W)
            on = samples[:, where]  # (S, pixels of the class)
            self.pixels[i, 0] += float(w @ (on == src).sum(1).cpu().double())
            self.pixels[i, 1] += float(w @ (on == tgt).sum(1).cpu().double())
        share = mode_assignment(d_ys, d_yy, self.probs) * w[:, None]  # rows sum to each sample's weight
        self.modes += share.sum(0)
        flipped = share @ self.switches.double()  # (S, F) chance each sample's mode makes flip i
        for i, (src, _) in enumerate(self.flips):
            if bool(((base_label == src) & valid).any()):
                self.flip_on[i] += torch.tensor([flipped[:, i].sum().item(), w.sum().item()])

    def compute(self):
        """{"pixel_share": [F], "image_share": [F], "true_share": [F], "mode_freq": [M],
        "mode_prob": [M], "mode_tv": float}; NaN where nothing was counted."""
        nan = torch.full((len(self.flips),), math.nan, dtype=torch.float64)
        tot = self.pixels.sum(1)
        pixel_share = torch.where(tot > 0, self.pixels[:, 1] / tot.clamp_min(1), nan)
        image_share = torch.where(self.flip_on[:, 1] > 0, self.flip_on[:, 0] / self.flip_on[:, 1].clamp_min(1), nan)
        n = self.modes.sum()
        freq = self.modes / n if n > 0 else torch.full_like(self.modes, math.nan)
        true = [float(self.probs[self.switches[:, i]].sum()) for i in range(len(self.flips))]
        return {
            "pixel_share": pixel_share.tolist(),
            "image_share": image_share.tolist(),
            "true_share": true,
            "mode_freq": freq.tolist(),
            "mode_prob": self.probs.tolist(),
            "mode_tv": float(0.5 * (freq - self.probs).abs().sum()) if n > 0 else math.nan,
        }
