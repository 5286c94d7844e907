"""Running a trained model over images and labelled splits: probabilities of sampled latents,
the validation sums behind mIoU, calibration and error-detection meters, and temperature fitting.
Used by train.py (validation every epoch) and test.py (inference and evaluation).

    sums = evaluate(model, split, num_classes=11, ignore_index=11, device=device, dtype=None)
    print(format_scores(summarize(sums), class_names))
"""

import math

import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from dataset import normalize, resize_image
from metrics import UncertaintyMeter, confusion_matrix, scores, softmax_entropy, uncertainty_maps
from model import active_channels, kl_per_channel, segmentation_loss
from runtime import autocast


def forward_probs(model, images, device, dtype, samples=1, temperature=1.0, latent_scale=1.0,
                  flip=False, generator=None):
    """Softmax probabilities of `samples` latent draws: (S, B, C, H, W) float32.
    images: uint8 (B, 3, H, W). flip=True averages with the mirrored image (test-time flip)."""

    x = normalize(images.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(device, dtype):
        logits = model.sample(x, samples, generator=generator, latent_scale=latent_scale)
        probs = (logits.float() / temperature).softmax(dim=2)
        if flip:
            flipped = model.sample(x.flip(-1), samples, generator=generator, latent_scale=latent_scale)
            probs = 0.5 * (probs + (flipped.float() / temperature).softmax(dim=2).flip(-1))
    return probs


def evaluate(model, split, *, num_classes, ignore_index, device, dtype, batch_size=8,
             loss_kind="ce", class_weights=None, indices=None, flip=False, progress=None):
    """Validation sums over `split` (or the subset `indices`, for one rank's shard): a dict of
    tensors that add across ranks. `summarize` turns them into metrics. The loss is computed at
    the training size; the confusion matrix at each label's own resolution, as papers report."""

    model.eval()
    indices = list(range(len(split))) if indices is None else list(indices)
    z = model.config.latent_channels
    sums = {
        "cm": torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device),
        "loss": torch.zeros((), dtype=torch.float64, device=device),
        "kl": torch.zeros((), dtype=torch.float64, device=device),
        "images": torch.zeros((), dtype=torch.float64, device=device),
        "mu_sum": torch.zeros(z, dtype=torch.float64, device=device),
        "mu_sq": torch.zeros(z, dtype=torch.float64, device=device),
        "mu_n": torch.zeros((), dtype=torch.float64, device=device),
    }
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    for idx in progress(chunks, desc="val", leave=False) if progress else chunks:
        images = split.images[idx].to(device, non_blocking=True)
        target = split.masks[idx].to(device, non_blocking=True).long()
        x = normalize(images).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(device, dtype):
            logits, mu, logvar = model(x)
            if flip:
                logits = 0.5 * (logits + model(x.flip(-1))[0].flip(-1))
        logits = logits.float()
        n = len(idx)
        sums["loss"] += segmentation_loss(logits, target, loss_kind, ignore_index, class_weights).double() * n
        kl = kl_per_channel(mu, logvar).sum() * mu.shape[-1] * mu.shape[-2] / (x.shape[-1] * x.shape[-2])
        sums["kl"] += kl.double() * n
        sums["images"] += n
        mu = mu.double()
        sums["mu_sum"] += mu.sum((0, 2, 3))
        sums["mu_sq"] += mu.pow(2).sum((0, 2, 3))
        sums["mu_n"] += mu.shape[0] * mu.shape[2] * mu.shape[3]
        for j, i in enumerate(idx):
            label = split.label_masks[i].to(device)
            up = F.interpolate(logits[j:j + 1], size=label.shape, mode="bilinear", align_corners=False)
            sums["cm"] += confusion_matrix(up.argmax(1)[0], label, num_classes, ignore_index)
    return sums


def summarize(sums):
    """Metrics from `evaluate` sums: loss, kl, miou, iou (list), pixel_acc, class_acc,
    active_latent (channels whose mean varies across inputs, Burda et al. 2016)."""
    n = sums["images"].clamp_min(1)
    mean = sums["mu_sum"] / sums["mu_n"].clamp_min(1)
    var = sums["mu_sq"] / sums["mu_n"].clamp_min(1) - mean.pow(2)
    out = {"loss": float(sums["loss"] / n), "kl": float(sums["kl"] / n),
           "active_latent": active_channels(var)}
    out.update(scores(sums["cm"].cpu()))
    return out


def format_scores(metrics, class_names):
    lines = [f"{'class':<14}{'IoU':>8}"]
    lines += [f"{name:<14}{iou * 100:>8.1f}" for name, iou in zip(class_names, metrics["iou"])]
    lines.append(f"{'mean IoU':<14}{metrics['miou'] * 100:>8.1f}")
    lines.append(f"{'pixel acc':<14}{metrics['pixel_acc'] * 100:>8.1f}")
    lines.append(f"{'class acc':<14}{metrics['class_acc'] * 100:>8.1f}")
    return "\n".join(lines)


def segment_image(model, image, image_size, device, dtype, samples=1, temperature=1.0,
                  latent_scale=1.0, seed=0):
    """image: uint8 (3, H, W) at any size -> probs (S, C, H, W) at the image's own size."""

    small = resize_image(image, image_size)[None]
    gen = torch.Generator(device=device).manual_seed(seed)
    probs = forward_probs(model, small, device, dtype, samples, temperature, latent_scale,
                          generator=gen)[:, 0]  # (S, C, h, w)
    return F.interpolate(probs, size=image.shape[-2:], mode="bilinear", align_corners=False).cpu()


def evaluate_uncertainty(model, split, table, device, dtype, samples, temperature=1.0, latent_scale=1.0,
                         seed=0, batch_size=8, progress=None):
    """Calibration and error detection over a split, at each label's resolution. Three scores
    rank pixels by uncertainty: the predictive entropy and the mutual information of `samples`
    latent draws (calibration from their mean), and the softmax entropy of the mean-latent
    prediction (calibration from it), so the gain from sampling is visible."""

    c, void = table.num_classes, table.ignore_index
    # The meters bin scores into 1000 bins. Mutual information spans several orders of magnitude
    # below log C, so scores are binned on a log scale: u -> log(1 + u / 1e-6). The map is
    # monotone, so AUROC and coverage (which depend only on the ranking) are unchanged by it
    # except for fewer ties.
    eps = 1e-6

    def scale(u):
        return torch.log1p(u.float() / eps)

    meters = {name: UncertaintyMeter(c, void, math.log1p(math.log(c) / eps))
              for name in ("sampled_entropy", "sampled_mutual_info", "mean_softmax_entropy")}
    gen = torch.Generator(device=device).manual_seed(seed)
    chunks = [list(range(i, min(i + batch_size, len(split)))) for i in range(0, len(split), batch_size)]
    for idx in progress(chunks, desc="uncertainty", leave=False) if progress else chunks:
        images = split.images[idx]
        maps = uncertainty_maps(forward_probs(model, images, device, dtype, samples, temperature,
                                              latent_scale, generator=gen))
        mean_latent = forward_probs(model, images, device, dtype, 1, temperature)[0]  # (B, C, h, w)
        for j, i in enumerate(idx):
            label = split.label_masks[i][None].to(device).long()  # (1, H, W)

            def up(t, j=j, size=label.shape[-2:]):
                t = t[j:j + 1]
                t = t if t.dim() == 4 else t[:, None]  # (1, C or 1, h, w)
                return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

            probs, single = up(maps["mean"]), up(mean_latent)
            meters["sampled_entropy"].update(probs, label, scale(up(maps["entropy"])[:, 0]))
            meters["sampled_mutual_info"].update(probs, label, scale(up(maps["mutual_info"])[:, 0]))
            meters["mean_softmax_entropy"].update(single, label, scale(softmax_entropy(single)))
    return meters


def fit_temperature(model, split, table, device, dtype, samples, seed=0, max_pixels=400_000):
    """Temperature scaling (Guo et al. 2017): the T > 0 that minimizes the NLL of the mean of
    softmax(logits_s / T) over a random subset of the split's valid pixels."""

    gen = torch.Generator(device=device).manual_seed(seed)
    per_image = max(1, max_pixels // max(1, len(split)))
    logits_kept, labels_kept = [], []
    for i in range(len(split)):
        x = normalize(split.images[i:i + 1].to(device)).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(device, dtype):
            logits = model.sample(x, samples, generator=gen)[:, 0].float()  # (S, C, h, w)
        label = split.label_masks[i].to(device).long()
        logits = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False)
        valid = (label != table.ignore_index).flatten().nonzero()[:, 0]
        pick = valid[torch.randperm(len(valid), generator=torch.Generator().manual_seed(seed + i))[:per_image]
                     .to(device)]
        logits_kept.append(logits.flatten(2)[:, :, pick].cpu())  # (S, C, n)
        labels_kept.append(label.flatten()[pick].cpu())
    logits, labels = torch.cat(logits_kept, 2).double(), torch.cat(labels_kept)

    def nll(log_t):
        p = (logits / math.exp(log_t)).softmax(1).mean(0)  # (C, n)
        return float(-p.gather(0, labels[None]).clamp_min(1e-12).log().mean())

    best = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return math.exp(float(best.x)), nll(0.0), float(best.fun)
