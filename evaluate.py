"""Running a trained model over images and labelled splits: the validation sums behind mIoU
(train.py, every epoch), and for test.py one definition of a prediction (Predictor), the
scores of a split accumulated from it image by image (SplitScores), and temperature fitting.

    sums = evaluate(model, split, num_classes=11, ignore_index=11, device=device, dtype=None)
    print(format_scores(summarize(sums), class_names))

    p = Predictor(model, device, dtype, image_size=(288, 384), samples=8, flip=True)
    probs = p.probs(p.logits([image])[0], image.shape[-2:])  # (8, C, H, W) at the image's size
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from ambiguity import VOID, flip_labels, flippable_classes, merge_flipped, mode_maps, mode_table
from dataset import normalize, resize_image
from metrics import EnergyMeter, UncertaintyMeter, confusion_matrix, iou_distances, scores
from model import active_channels, kl_loss, kl_per_dim, latent_channel_kl, segmentation_loss
from runtime import autocast, layout_of


# Validation images whose samples are drawn for the diversity: spread evenly over the split. On
# CamVid val (101 images) drawing 4 samples of every image took 3.7 s of a 6.0 s validation, a
# quarter of a learned-prior epoch. Collapse (a diversity near 0) shows on any few images.
DIVERSITY_IMAGES = 26


def diversity_stride(n, limit=DIVERSITY_IMAGES):
    """Every `stride`-th image of a split of n is sampled for the diversity (at most `limit`)."""
    return max(1, math.ceil(n / limit)) if limit else 1


def evaluate(model, split, *, num_classes, ignore_index, device, dtype, batch_size=8,
             loss_kind="ce", class_weights=None, indices=None, progress=None, flips=None, diversity_samples=0,
             seed=0, diversity_images=DIVERSITY_IMAGES):
    """Validation sums over `split` (or the subset `indices`, for one rank's shard): a dict of
    tensors that add across ranks. `summarize` turns them into metrics. The loss is computed at
    the training size; the confusion matrix at each label's own resolution, as papers report.
    The prediction is the argmax of the mean latent's logits upsampled to the label, the same
    as test.py's Predictor with one sample, no flip and the training resolution.

    The KL is KL(q || p) of the model's own prior: against N(0, I) for the standard prior, and
    for the learned prior between the posterior of the true mask and the prior (how far apart
    they are). With `flips` (ambiguity.py) the split holds base labels and num_classes counts
    the base classes: the loss and mIoU score the model with each class merged with its second
    version, and the posterior sees each mask flipped at random (seeded, the same every call).
    `diversity_samples` > 1 adds the mean 1 - IoU between that many latent samples of each image
    (at the training size, the model's own classes): 0 means every sample is the same. With
    them comes the D2_GED of the samples (metrics.EnergyMeter): against the 32 modes of the
    flip benchmark with their probabilities, or against every annotator's mask of a
    multi-annotator split (the other scores take the first annotator). Both are measured on
    every image whose index in the split is a multiple of
    `diversity_stride(len(split), diversity_images)`, whichever shard holds it (0: all images)."""

    model.eval()
    config = model.config
    indices = list(range(len(split))) if indices is None else list(indices)
    z = config.latent_width
    sums = {
        "cm": torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device),
        "loss": torch.zeros((), dtype=torch.float64, device=device),
        "kl": torch.zeros((), dtype=torch.float64, device=device),
        "kl_image": torch.zeros((), dtype=torch.float64, device=device),
        "kl_channels": torch.zeros(z, dtype=torch.float64, device=device),
        "images": torch.zeros((), dtype=torch.float64, device=device),
        "mu_sum": torch.zeros(z, dtype=torch.float64, device=device),
        "mu_sq": torch.zeros(z, dtype=torch.float64, device=device),
        "mu_n": torch.zeros(z, dtype=torch.float64, device=device),
        "diversity": torch.zeros((), dtype=torch.float64, device=device),
        "diversity_n": torch.zeros((), dtype=torch.float64, device=device),
        "ged": torch.zeros((), dtype=torch.float64, device=device),
        "ged_n": torch.zeros((), dtype=torch.float64, device=device),
    }
    stride = diversity_stride(len(split), diversity_images)
    annotated, split = split, split.annotation(0)
    sampled = diversity_samples > 1 and config.stochastic
    if sampled:
        energy = EnergyMeter(flippable_classes(flips) if flips else range(num_classes), (diversity_samples,))
        mode_probs = mode_table(flips)[1] if flips else None
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    layout = layout_of(model)  # the model's own: train.py's by the CPU, build_model's channels-last
    for idx in progress(chunks, desc="val", leave=False) if progress else chunks:
        images = split.images[idx].to(device, non_blocking=True)
        target = split.masks[idx].to(device, non_blocking=True).long()
        x = normalize(images).contiguous(memory_format=layout)
        # the posterior's mask in the model's classes: flipped at random, seeded by the batch
        shown = flip_labels(target, torch.Generator().manual_seed(seed + idx[0]), flips) if flips else target
        shown = shown.masked_fill(shown == (VOID if flips else ignore_index), -1)  # void: no class
        with torch.no_grad(), autocast(device, dtype):
            logits, mu, logvar, prior_mu, prior_logvar = model.forward_val(x, shown)
        if flips:
            logits = merge_flipped(logits, flips, num_classes)  # log-probabilities of the base classes
        logits = logits.float()
        n = len(idx)
        pixels = x.shape[-1] * x.shape[-2]
        sums["loss"] += segmentation_loss(logits, target, loss_kind, ignore_index, class_weights).double() * n
        kl = kl_loss(mu, logvar, pixels, 0.0, prior_mu, prior_logvar).double()
        sums["kl"] += kl * n
        sums["kl_image"] += kl * pixels * n
        sums["kl_channels"] += latent_channel_kl(kl_per_dim(mu, logvar, prior_mu, prior_logvar), config).double() * n
        sums["images"] += n
        total, squares, count = channel_moments(mu.double(), config)
        sums["mu_sum"] += total
        sums["mu_sq"] += squares
        sums["mu_n"] += count
        picked = [j for j, i in enumerate(idx) if i % stride == 0]
        if sampled and picked:
            gen = torch.Generator(device=device).manual_seed(seed + idx[0])
            with torch.no_grad(), autocast(device, dtype):
                drawn = model.sample(x[picked], diversity_samples, generator=gen).argmax(2)  # (S, b, h, w)
            classes = list(range(config.num_classes))
            k = diversity_samples
            for r, j in enumerate(picked):
                d = iou_distances(drawn[:, r], drawn[:, r], classes, target[j] != ignore_index)
                sums["diversity"] += d.sum() / (k * (k - 1))  # mean over pairs of distinct samples
                sums["diversity_n"] += 1
                if flips:  # the label's 32 modes, each with its probability
                    truth = mode_maps(target[j], flips, void_in=ignore_index, void_out=VOID)
                else:  # (K, H, W): every annotator's mask
                    truth = annotated.masks[idx[j]].to(device).long().view(-1, *target.shape[-2:])
                valid = (truth != (VOID if flips else ignore_index)).all(0)  # pixels every map labels
                energy.update(drawn[:, r], truth, mode_probs, valid)
        for j, i in enumerate(idx):
            label = split.label_masks[i].to(device)
            up = F.interpolate(logits[j:j + 1], size=label.shape, mode="bilinear", align_corners=False)
            sums["cm"] += confusion_matrix(up.argmax(1)[0], label, num_classes, ignore_index)
    if sampled and int(energy.images):  # a sum over images, to add across ranks
        sums["ged"] += energy.compute()[diversity_samples]["ged"] * int(energy.images)
        sums["ged_n"] += int(energy.images)
    return sums


def channel_moments(mu, config):
    """Per latent channel (config.latent_width): sum, sum of squares and count of the posterior
    means over images (and positions of a spatial latent), for the activity of Burda et al. 2016.
    mu: (B, z, h, w) standard; (B, K) learned, laid out as GaussianNet says."""
    if mu.dim() == 4:
        b, z, h, w = mu.shape
        return mu.sum((0, 2, 3)), mu.pow(2).sum((0, 2, 3)), torch.full((z,), float(b * h * w), dtype=mu.dtype,
                                                                      device=mu.device)
    dg, cs = config.global_dims, config.spatial_channels
    b = mu.shape[0]
    g = mu[:, :dg]  # (B, d)
    sp = mu[:, dg:].reshape(b, cs, (mu.shape[1] - dg) // max(cs, 1))  # (B, c, h' * w')
    count = torch.cat([torch.full((dg,), float(b)), torch.full((cs,), float(b * sp.shape[2]))])
    return (torch.cat([g.sum(0), sp.sum((0, 2))]), torch.cat([g.pow(2).sum(0), sp.pow(2).sum((0, 2))]),
            count.to(mu.device, mu.dtype))


def summarize(sums):
    """Metrics from `evaluate` sums: loss, kl (nats per pixel), kl_image (nats per image),
    kl_channels (list, per latent channel), kl_active (channels with at least 0.01 nats of
    KL(q || p): a channel below carries nothing), active_latent (channels whose mean varies
    across inputs, Burda et al. 2016), diversity and ged (the samples' D2_GED; NaN when not
    measured), miou, iou (list), pixel_acc, class_acc."""
    n = sums["images"].clamp_min(1)
    mean = sums["mu_sum"] / sums["mu_n"].clamp_min(1)
    var = sums["mu_sq"] / sums["mu_n"].clamp_min(1) - mean.pow(2)
    per_channel = sums["kl_channels"] / n
    dn, gn = float(sums["diversity_n"]), float(sums["ged_n"])
    out = {"loss": float(sums["loss"] / n), "kl": float(sums["kl"] / n), "kl_image": float(sums["kl_image"] / n),
           "kl_channels": per_channel.tolist(), "kl_active": int((per_channel >= 0.01).sum()),
           "active_latent": active_channels(var),
           "diversity": float(sums["diversity"]) / dn if dn else math.nan,
           "ged": float(sums["ged"]) / gn if gn else math.nan}
    out.update(scores(sums["cm"].cpu()))
    return out


def format_scores(metrics, class_names):
    lines = [f"{'class':<14}{'IoU':>8}"]
    lines += [f"{name:<14}{iou * 100:>8.1f}" for name, iou in zip(class_names, metrics["iou"])]
    lines.append(f"{'mean IoU':<14}{metrics['miou'] * 100:>8.1f}")
    lines.append(f"{'pixel acc':<14}{metrics['pixel_acc'] * 100:>8.1f}")
    lines.append(f"{'class acc':<14}{metrics['class_acc'] * 100:>8.1f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# test.py's predictions


RESOLUTIONS = ("train", "native")


@dataclass
class Predictor:
    """One definition of a prediction, used for every file and score test.py writes.

    `samples` latent draws (1: the posterior mean) of the network's logits, each with the logits
    of the mirrored image when `flip`; the network sees the image resized to the training size
    (`resolution` "train") or at its own size ("native": padded to the network stride inside the
    model, and cut into overlapping tiles of `tile_size` when larger). All views of one image
    (mirrored, rescaled, tiled) decode the same draw of the learned prior's global latent, so
    each sample stays one latent, not a blend of draws. `probs` then upsamples the
    logits once to the label's resolution, divides them by the temperature, applies the softmax
    and averages the two orientations: the mean over samples of these probabilities is the
    prediction, and every uncertainty map comes from the same per-sample probabilities."""

    model: torch.nn.Module
    device: torch.device
    dtype: object  # autocast dtype, None for fp32
    image_size: tuple  # (H, W) the model was trained at
    samples: int = 1
    flip: bool = False
    resolution: str = "train"
    tile_size: tuple = (512, 512)
    seed: int = 0
    batch_size: int = 8  # tiles per forward pass
    scales: tuple = (1.0,)  # test-time multi-scale: the image resized by each factor, logits averaged

    def __post_init__(self):
        self.layout = layout_of(self.model)  # the inputs' memory format: the weights'
        self.restart()

    def restart(self):
        """Draw the latent samples from `seed` again: the temperature fit and the evaluation
        pass see the same draws, and so does a later run with the same flags."""
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def settings(self):
        """What the probabilities depend on besides the weights: the key under which a fitted
        temperature is stored."""
        key = f"samples={self.samples} flip={int(self.flip)} resolution={self.resolution}"
        return key if tuple(self.scales) == (1.0,) else key + " scales=" + ",".join(f"{s:g}" for s in self.scales)

    def logits(self, images):
        """images: list of uint8 (3, H, W) -> list of float32 logits (S, F, C, h, w) on the
        device, one view per scale and orientation: F = len(scales) x (2 with flip (the mirrored
        image's logits mirrored back), else 1); (h, w) is the training size, or the image's own
        size with resolution "native". Other scales' logits are resized to (h, w)."""
        noise = self._shared_noise(len(images))
        if tuple(self.scales) == (1.0,):
            return self._logits(images, 1.0, noise)
        views = [self._logits(images, s, noise) for s in self.scales]
        base = [tuple(self.image_size) if self.resolution == "train" else tuple(im.shape[-2:]) for im in images]
        return [torch.cat([self.at_size(v[k], base[k]) for v in views], 1) for k in range(len(images))]

    def _shared_noise(self, count):
        """(S, count, global_dims) standard normals, one per sample and image, that every view of
        an image decodes (mirrored, at each scale, each of its tiles): the learned prior's sample
        s is then one latent draw, not a blend of independent draws that mixes its alternatives.
        None where an image has one view, and for models without a global latent (the standard
        prior's spatial latent is drawn per view)."""
        cfg = getattr(self.model, "config", None)  # None: a stand-in network without a latent
        global_dims = cfg.global_dims if cfg is not None else 0  # 0 for the standard prior
        one_view = not self.flip and tuple(self.scales) == (1.0,) and self.resolution == "train"
        if one_view or self.samples == 1 or not global_dims or not cfg.stochastic:
            return None
        return torch.randn((self.samples, count, global_dims), generator=self.generator, device=self.device)

    def _logits(self, images, scale, noise=None):
        """`logits` of the images resized by `scale` from the size the network sees them at;
        noise: `_shared_noise` of the images, or None."""
        def scaled(size):
            return [max(1, round(n * scale)) for n in size]

        if self.resolution == "train":
            return self._forward(torch.stack([resize_image(im, scaled(self.image_size)) for im in images]), noise)
        if scale != 1.0:
            images = [resize_image(im, scaled(im.shape[-2:])) for im in images]
        out = [None] * len(images)
        same_size = {}
        for k, im in enumerate(images):
            if im.shape[-2] > self.tile_size[0] or im.shape[-1] > self.tile_size[1]:
                out[k] = self._tiled(im, None if noise is None else noise[:, k:k + 1])
            else:
                same_size.setdefault(tuple(im.shape[-2:]), []).append(k)
        for ks in same_size.values():
            for k, lg in zip(ks, self._forward(torch.stack([images[k] for k in ks]),
                                               None if noise is None else noise[:, ks])):
                out[k] = lg
        return out

    def at_size(self, logits, size):
        """(S, F, C, h, w) logits -> (S, F, C, H, W), upsampled (bilinear) to `size`, the label's."""
        s, f, c, h, w = logits.shape
        if (h, w) == tuple(size):
            return logits
        return F.interpolate(logits.reshape(s * f, c, h, w), size=tuple(size), mode="bilinear",
                             align_corners=False).view(s, f, c, *size)

    def probs(self, logits, size, temperature=1.0):
        """(S, F, C, h, w) logits -> (S, C, H, W) probabilities at `size` (the label's)."""
        return (self.at_size(logits, size) / temperature).softmax(2).mean(1)

    def _forward(self, images, noise=None):
        """uint8 (B, 3, h, w) -> list of B logits (S, F, C, h, w). Both orientations go through
        the network in one batch, decoding the same draws `noise` (S, B, global_dims) if given."""
        x = normalize(images.to(self.device, non_blocking=True))
        if self.flip:
            x = torch.cat([x, x.flip(-1)])
            noise = None if noise is None else torch.cat([noise, noise], 1)  # (S, 2 B, global_dims)
        with torch.no_grad(), autocast(self.device, self.dtype):
            logits = self.model.sample(x.contiguous(memory_format=self.layout), self.samples,
                                       generator=self.generator, global_noise=noise).float()  # (S, F*B, C, h, w)
        if self.flip:
            plain, mirrored = logits.chunk(2, dim=1)
            logits = torch.stack([plain, mirrored.flip(-1)], 1)  # (S, 2, B, C, h, w)
        else:
            logits = logits[:, None]  # (S, 1, B, C, h, w)
        return list(logits.unbind(2))

    def _tiled(self, image, noise=None):
        """Logits of an image larger than `tile_size`: overlapping tiles (a quarter of a tile
        apart at least, each a multiple of the network stride), blended with weights that fall
        off towards each tile's border, where the network sees least context. noise (S, 1,
        global_dims): the image's draws, decoded in every tile."""
        h, w = image.shape[-2:]
        stride = self.model.stride
        th, tw = (min(-(-t // stride) * stride, n) for t, n in zip(self.tile_size, (h, w)))
        boxes = [(y, x) for y in tile_starts(h, th) for x in tile_starts(w, tw)]
        weight = (tile_ramp(th)[:, None] * tile_ramp(tw)[None]).to(self.device)  # (th, tw)
        total, norm = None, torch.zeros(h, w, device=self.device)
        for i in range(0, len(boxes), self.batch_size):
            chunk = boxes[i:i + self.batch_size]
            crops = torch.stack([image[:, y:y + th, x:x + tw] for y, x in chunk])
            tile_noise = None if noise is None else noise.expand(-1, len(chunk), -1)  # (S, tiles, global_dims)
            for (y, x), lg in zip(chunk, self._forward(crops, tile_noise)):
                if total is None:
                    total = torch.zeros(*lg.shape[:3], h, w, device=self.device)  # (S, F, C, H, W)
                total[..., y:y + th, x:x + tw] += lg * weight
                norm[y:y + th, x:x + tw] += weight
        return total / norm


def tile_starts(n, tile):
    """Offsets of tiles of length `tile` covering 0..n: a quarter tile of overlap at least, the
    last tile flush with the end."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, tile - tile // 4)) + [n - tile]


def tile_ramp(tile):
    """(tile,) blending weights: rising linearly over the quarter tile at each end, 1 between,
    never 0 (a pixel near the image border is covered by one tile only)."""
    ramp = max(1, tile // 4)
    i = torch.arange(tile, dtype=torch.float32)
    return torch.minimum(torch.minimum(i + 1, tile - i), torch.tensor(float(ramp))) / ramp


class SplitScores:
    """The scores of one prediction over a labelled split, added image by image from the
    probabilities at the label's resolution: the confusion matrix of the argmax of the mean
    probabilities, and one UncertaintyMeter per uncertainty map computed from the same
    probabilities (calibration depends on the probabilities alone, so every meter holds the
    same ECE, NLL and Brier score; the maps differ in how well they rank the errors)."""

    def __init__(self, num_classes, ignore_index, samples):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        names = ("entropy", "mutual_info", "variance") if samples > 1 else ("entropy",)
        # The meters bin scores into 1000 bins. Mutual information spans several orders of magnitude
        # below log C, so scores are binned on a log scale, u -> log(1 + u / 1e-6); the map is monotone,
        # so AUROC and coverage (which depend only on the ranking) are unchanged by it but for ties.
        self.meters = {n: UncertaintyMeter(num_classes, ignore_index, math.log1p(math.log(num_classes) / 1e-6))
                       for n in names}

    def update(self, maps, truth):
        """maps: uncertainty_maps of one image's (S, 1, C, H, W) probabilities; truth: (H, W)."""
        truth = truth.to(maps["mean"].device).long()
        pred = maps["mean"].argmax(1)[0]
        self.cm += confusion_matrix(pred, truth, self.num_classes, self.ignore_index).cpu()
        for name, meter in self.meters.items():
            meter.update(maps["mean"], truth[None], torch.log1p(maps[name].float() / 1e-6))

    def result(self):
        """scores(cm) plus 'calibration' (ece, nll, brier) and, per map, 'uncertainty' (the AUROC
        of finding the wrong pixels, mIoU and pixel accuracy of the most certain 50/75/90%)."""
        out = scores(self.cm)
        out["uncertainty"] = {}
        for name, meter in self.meters.items():
            r = meter.compute(fractions=(0.5, 0.75, 0.9))
            out["calibration"] = {k: r[k] for k in ("ece", "nll", "brier")}
            out["uncertainty"][name] = {"auroc": r["auroc"], "coverage": r["coverage"]}
        return out


def segment_image(model, image, image_size, device, dtype, samples=1, temperature=1.0, seed=0, flip=False,
                  resolution="train", tile_size=(512, 512)):
    """image: uint8 (3, H, W) at any size -> probs (S, C, H, W) at the image's own size, on the CPU."""
    p = Predictor(model, device, dtype, tuple(image_size), samples, flip, resolution, tuple(tile_size), seed)
    return p.probs(p.logits([image])[0], image.shape[-2:], temperature).cpu()


class TemperatureFit:
    """Temperature scaling (Guo et al. 2017): the T > 0 that minimizes the NLL of a Predictor's
    probabilities (mean over samples and orientations of softmax(logits / T)) on a random
    subset of valid pixels, `per_image` from each image, kept as logits. `log_probs` maps
    tempered logits (S, F, C, n) to the log-probabilities of the labels' classes along dim 2:
    log_softmax (default), or for a flip model ambiguity.merge_flipped, so that the temperature
    acts on the model's own logits and the labels are the base classes."""

    def __init__(self, ignore_index, per_image, seed=0, log_probs=None):
        self.ignore_index, self.per_image, self.seed = ignore_index, per_image, seed
        self.log_probs = log_probs or (lambda t: t.log_softmax(2))
        self.logits, self.labels = [], []

    def add(self, logits, truth):
        """logits (S, F, C, H, W) at the label's resolution; truth (H, W)."""
        truth = truth.to(logits.device).long()
        valid = (truth != self.ignore_index).flatten().nonzero()[:, 0]
        order = torch.randperm(len(valid), generator=torch.Generator().manual_seed(self.seed + len(self.labels)))
        pick = valid[order[:self.per_image].to(valid.device)]
        self.logits.append(logits.flatten(3)[..., pick].cpu())  # (S, F, C, n)
        self.labels.append(truth.flatten()[pick].cpu())

    def fit(self):
        """-> (temperature, pixel NLL at T = 1, pixel NLL at the fitted T)."""
        logits, labels = torch.cat(self.logits, 3), torch.cat(self.labels)  # (S, F, C, n), (n,)
        s, f, _, n = logits.shape
        index = labels.view(1, 1, 1, n).expand(s, f, 1, n)

        def nll(log_t):
            # -log of the mean over samples and orientations of softmax(logits / T)[label],
            # through logsumexp so that float32 suffices
            lp = self.log_probs(logits / math.exp(log_t)).gather(2, index)[:, :, 0]  # (S, F, n)
            return float(-(lp.flatten(0, 1).logsumexp(0) - math.log(s * f)).double().mean())

        best = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
        return math.exp(float(best.x)), nll(0.0), float(best.fun)
