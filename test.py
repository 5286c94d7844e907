"""Apply a trained segmentation VAE: segment images, or evaluate a labelled split.

    python test.py --test_image_path IMAGE --model_path runs/x/best.pt [--mask_path MASK]
    python test.py --test_image_path "photos/*.png" --model_path runs/x/best.pt --samples 16
    python test.py --test_path ../shared/data/camvid/val --model_path runs/x/best.pt

The model is rebuilt from the checkpoint alone. matplotlib and the metrics are imported inside
the functions that need them, so that a run that draws nothing does not pay for them (torch
comes with dataset.py at start-up).
"""

import argparse
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

from dataset import DataError

CHECKPOINT_FORMAT = "segvae-1"


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(obj, path):
    """Write atomically: a temporary file in the same folder, flushed and fsynced, then renamed
    over `path`. A crash at any instant leaves either the old file or the new one."""
    import torch

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path, device="cpu"):
    """Load with weights_only=True (never runs code from the file) and check it is ours."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist; give --model_path a .pt file that "
                        "train.py wrote (e.g. runs/<time>/best.pt)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about old pickle protocols; we report below
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise DataError(f"checkpoint {path} holds arbitrary pickled Python objects, and loading "
                            "it would run code from the file; it was refused. Use a checkpoint "
                            "written by train.py") from None
        raise DataError(f"checkpoint {path} is not a readable PyTorch checkpoint; it may be truncated "
                        "or not a checkpoint at all. Give a .pt file that train.py wrote") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, AttributeError,
            IndexError, TypeError, UnicodeDecodeError) as e:
        raise DataError(f"checkpoint {path} is not a readable PyTorch checkpoint ({type(e).__name__}); "
                        "it may be truncated or not a checkpoint at all. Give a .pt file that train.py "
                        "wrote") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"checkpoint {path} was not written by this project's train.py (no "
                        f"'format': '{CHECKPOINT_FORMAT}' entry); give a checkpoint from train.py")
    missing = [k for k in ("model", "model_config", "classes", "colours", "ignore_index", "image_size")
               if k not in ckpt]
    if missing:
        raise DataError(f"checkpoint {path} lacks {', '.join(missing)}; it is damaged or was edited. "
                        "Give a checkpoint that train.py wrote")
    return ckpt


def build_model(ckpt, path="checkpoint", device="cpu"):
    """Rebuild the SegVAE from the config stored in the checkpoint and load its weights."""
    import torch

    from model import SegVAE, VAEConfig

    try:
        model = SegVAE(VAEConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        if len(ckpt["classes"]) != model.config.num_classes:
            raise ValueError(f"{len(ckpt['classes'])} class names for a model of {model.config.num_classes} "
                             "classes")
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise DataError(f"checkpoint {path} does not fit the model ({str(e).splitlines()[0][:160]}); "
                        "it was written by another version or is damaged") from None
    return model.to(device, memory_format=torch.channels_last).eval()


# ---------------------------------------------------------------------------------------------
# devices and precision (shared with train.py)


def pick_device(name):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name} was asked for but no CUDA GPU is available here; "
                        "use --device cpu or --device auto")
    return torch.device(name)


def pick_precision(name, device):
    """The autocast dtype, or None for fp32. auto: bf16 where the hardware has it (CUDA with
    bf16, or a CPU with AVX-512 bf16), else fp16 on CUDA, else fp32."""
    import torch

    if name == "fp32":
        return None
    if device.type == "cuda":
        if name == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if name == "bf16" else torch.float16
    if name == "fp16":
        raise DataError("--precision fp16 is for CUDA GPUs; on the CPU use bf16 or fp32")
    if name == "auto":
        return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else None
    return torch.bfloat16


def autocast(device, dtype):
    import torch

    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# ---------------------------------------------------------------------------------------------
# evaluation


def forward_probs(model, images, device, dtype, samples=1, temperature=1.0, latent_scale=1.0,
                  flip=False, generator=None):
    """Softmax probabilities of `samples` latent draws: (S, B, C, H, W) float32.
    images: uint8 (B, 3, H, W). flip=True averages with the mirrored image (test-time flip)."""
    import torch

    from dataset import normalize

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
    import torch
    import torch.nn.functional as F

    from dataset import normalize
    from metrics import confusion_matrix
    from model import kl_per_channel, segmentation_loss

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
    from metrics import scores
    from model import active_channels

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


# ---------------------------------------------------------------------------------------------
# single images


def table_from_checkpoint(ckpt):
    from dataset import ClassTable

    return ClassTable(names=list(ckpt["classes"]), colours=[tuple(c) if c else None for c in ckpt["colours"]],
                      ignore_index=int(ckpt["ignore_index"]))


def colourize(labels, pal, ignore_index=None):
    """(H, W) int labels -> (H, W, 3) uint8 colours; void is black."""
    import numpy as np

    labels = np.asarray(labels)
    out = pal[np.clip(labels, 0, len(pal) - 1)]
    if ignore_index is not None:
        out[labels == ignore_index] = 0
    return out


def segment_image(model, image, image_size, device, dtype, samples=1, temperature=1.0,
                  latent_scale=1.0, seed=0):
    """image: uint8 (3, H, W) at any size -> probs (S, C, H, W) at the image's own size."""
    import torch
    import torch.nn.functional as F

    from dataset import resize_image

    small = resize_image(image, image_size)[None]
    gen = torch.Generator(device=device).manual_seed(seed)
    probs = forward_probs(model, small, device, dtype, samples, temperature, latent_scale,
                          generator=gen)[:, 0]  # (S, C, h, w)
    return F.interpolate(probs, size=image.shape[-2:], mode="bilinear", align_corners=False).cpu()


def new_figure(figsize):
    """A matplotlib figure without pyplot: no GUI backend or global state to set up, and a
    quicker import (savefig renders with Agg)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_figure(path, image, pred, pal, table, truth=None, uncertainty=None, vmax=1.0, samples=1):
    """input | prediction overlaid, with a legend | uncertainty | (ground truth | errors)."""
    import numpy as np
    from matplotlib.patches import Patch

    from metrics import confusion_matrix, scores

    img = image.permute(1, 2, 0).numpy()
    panels = [("input", img), ("prediction", (0.45 * img + 0.55 * colourize(pred, pal)).astype(np.uint8))]
    if uncertainty is not None:
        label = f"entropy, {samples} samples" if samples > 1 else "entropy (mean latent)"
        panels.append((label, uncertainty))
    title = ""
    if truth is not None:
        import torch

        valid = truth != table.ignore_index
        err = np.zeros((*truth.shape, 3), np.uint8)
        err[valid & (pred == truth)] = (40, 160, 60)
        err[valid & (pred != truth)] = (220, 40, 40)
        panels += [("ground truth", colourize(truth, pal, table.ignore_index)),
                   ("errors (red), void black", err)]
        s = scores(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), table.num_classes,
                                    table.ignore_index))
        title = f"this image: mIoU {s['miou'] * 100:.1f}, pixel accuracy {s['pixel_acc'] * 100:.1f}"
    fig = new_figure((4.2 * len(panels), 4.2 * img.shape[0] / img.shape[1] + 1.2))
    axes = fig.subplots(1, len(panels))
    for ax, (name, a) in zip(np.atleast_1d(axes), panels):
        ax.imshow(a, cmap="magma", vmin=0, vmax=vmax) if a.ndim == 2 else ax.imshow(a)
        ax.set_title(name)
        ax.axis("off")
    handles = [Patch(color=pal[i] / 255, label=n) for i, n in enumerate(table.names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)


def save_map(path, values, title, vmax=None):
    """A colour-mapped uncertainty map with a colour bar. vmax None: the scale ends at the map's
    own 99.5th percentile, so that a map of small values (the mutual information of a model with
    a quiet latent) still shows where they are; the colour bar gives the values."""
    import numpy as np

    if vmax is None:
        vmax = max(float(np.percentile(values, 99.5)), 1e-6)
        title += f"\n(scale: 0 to this image's 99.5th percentile, {vmax:.3g})"
    h, w = values.shape
    fig = new_figure((6, 6 * h / w + 0.6))
    ax = fig.subplots()
    im = ax.imshow(values, cmap="magma", vmin=0, vmax=vmax)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


MAPS = {  # name -> (title, upper end of the colour scale from the class count; None: from the map)
    "entropy": ("predictive entropy (nats)", lambda c: math.log(c)),
    "mutual_info": ("mutual information: uncertainty from the latent (nats)", lambda c: None),
    "variance": ("sample variance of the winning class probability", lambda c: None),
}


def run_images(args, ckpt, model, device, dtype):
    """Segment each image: colour mask, figure and, with --samples > 1, uncertainty maps
    (PNG with colour bar and .npy) per image, and uncertainty_ranking.csv over the images."""
    import csv

    import numpy as np
    from PIL import Image

    from dataset import load_image, load_mask, palette
    from metrics import uncertainty_maps

    paths = expand_image_paths(args.test_image_path)
    if args.mask_path and len(paths) > 1:
        raise DataError(f"--mask_path {args.mask_path} names one mask but --test_image_path "
                        f"{args.test_image_path} matches {len(paths)} images; give a single image")
    table = table_from_checkpoint(ckpt)
    pal = palette(table)
    image_size = tuple(ckpt["image_size"])
    out_dir = make_output_dir(args.output_dir)
    temperature, latent_scale = float(ckpt.get("temperature", 1.0)), float(ckpt.get("latent_scale", 1.0))
    ranking = []
    for path in paths:
        image = load_image(path)
        probs = segment_image(model, image, image_size, device, dtype, args.samples, temperature,
                              latent_scale, args.seed)
        maps = {k: v[0].numpy() for k, v in uncertainty_maps(probs[:, None]).items()}
        pred = maps["mean"].argmax(0).astype(np.uint8)
        truth = None
        if args.mask_path:
            truth = load_mask(args.mask_path, table).numpy()
            if truth.shape != pred.shape:
                raise DataError(f"mask {args.mask_path} is {truth.shape[1]}x{truth.shape[0]} but image "
                                f"{path} is {pred.shape[1]}x{pred.shape[0]}; give the image's own mask")
        written = [out_dir / f"{path.stem}_mask.png", out_dir / f"{path.stem}_figure.png"]
        Image.fromarray(colourize(pred, pal)).save(written[0])
        save_figure(written[1], image, pred, pal, table, truth, maps["entropy"], math.log(table.num_classes),
                    args.samples)
        if args.samples > 1:
            for name, (title, vmax) in MAPS.items():
                png, npy = out_dir / f"{path.stem}_{name}.png", out_dir / f"{path.stem}_{name}.npy"
                save_map(png, maps[name], f"{title}, {args.samples} samples", vmax(table.num_classes))
                np.save(npy, maps[name].astype(np.float32))
                written += [png, npy]
        ranking.append((str(path), float(maps["entropy"].mean()), float(maps["mutual_info"].mean()),
                        float(maps["variance"].mean())))
        print(f"{path}: " + ", ".join(str(p) for p in written))
    if args.samples > 1:
        ranking.sort(key=lambda r: -r[1])
        with open(out_dir / "uncertainty_ranking.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["rank", "image", "mean_entropy", "mean_mutual_info", "mean_variance"])
            for i, r in enumerate(ranking, 1):
                w.writerow([i, r[0], f"{r[1]:.6f}", f"{r[2]:.6f}", f"{r[3]:.6f}"])
        print(f"images ranked by mean predictive entropy (label these first): {out_dir / 'uncertainty_ranking.csv'}")


def expand_image_paths(spec):
    """A file, a folder of images, or a glob pattern -> sorted list of image paths."""
    import glob

    from dataset import IMAGE_EXTENSIONS

    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS)
    else:
        found = sorted(Path(q) for q in glob.glob(spec) if Path(q).suffix.lower() in IMAGE_EXTENSIONS)
    if not found:
        raise DataError(f"--test_image_path {spec} matches no image file; give an image, a folder of "
                        "images or a glob such as 'photos/*.png'")
    return found


def make_output_dir(path):
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DataError(f"output folder {path} cannot be written ({e.strerror}); choose another "
                        "--output_dir") from None
    return path


def evaluate_uncertainty(model, split, table, device, dtype, samples, temperature=1.0, latent_scale=1.0,
                         seed=0, batch_size=8, progress=None):
    """Calibration and error detection over a split, at each label's resolution. Three scores
    rank pixels by uncertainty: the predictive entropy and the mutual information of `samples`
    latent draws (calibration from their mean), and the softmax entropy of the mean-latent
    prediction (calibration from it), so the gain from sampling is visible."""
    import torch
    import torch.nn.functional as F

    from metrics import UncertaintyMeter, softmax_entropy, uncertainty_maps

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
    import torch
    import torch.nn.functional as F
    from scipy.optimize import minimize_scalar

    from dataset import normalize

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


def save_reliability(path, meters):
    fig = new_figure((11, 4.5))
    axes = fig.subplots(1, 2)
    for name, label in (("sampled_entropy", "sampled mean"), ("mean_softmax_entropy", "mean latent")):
        r = meters[name].reliability()
        axes[0].plot(r["confidence"], r["accuracy"], "o-", label=label)
    axes[0].plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    axes[0].set(xlabel="confidence", ylabel="accuracy", title="reliability diagram (15 bins)")
    for name, res in meters.items():
        curve = res.compute()["curve"]
        axes[1].plot(curve["coverage"], curve["accuracy"], label=name.replace("_", " "))
    axes[1].set(xlabel="coverage (most certain pixels kept)", ylabel="pixel accuracy",
                title="accuracy versus coverage")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def save_confusion(path, cm, names):
    """Row-normalized confusion matrix (rows: true class) as an image."""
    import numpy as np

    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = max(5.0, 1.5 + 0.55 * len(names))
    fig = new_figure((side, side))
    ax = fig.subplots()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{norm[i, j] * 100:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (% of each true class)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def save_examples(path, model, split, table, ckpt, device, dtype, n, flip=False):
    """A grid of `n` images spread evenly over the split, one row each: input | prediction |
    ground truth, at the label's resolution, with each image's own mIoU."""
    import torch.nn.functional as F
    from matplotlib.patches import Patch

    from dataset import palette
    from metrics import confusion_matrix, scores

    pal = palette(table)
    picks = sorted({round(i * (len(split) - 1) / max(n - 1, 1)) for i in range(n)})
    temperature = float(ckpt.get("temperature", 1.0))
    fig = new_figure((12, 3.2 * len(picks) + 0.6))
    axes = fig.subplots(len(picks), 3, squeeze=False)
    for row, i in zip(axes, picks):
        truth = split.label_masks[i]
        probs = forward_probs(model, split.images[i:i + 1], device, dtype, temperature=temperature, flip=flip)[0]
        pred = F.interpolate(probs.cpu(), size=truth.shape, mode="bilinear", align_corners=False).argmax(1)[0]
        image = F.interpolate(split.images[i:i + 1].float(), size=truth.shape, mode="bilinear",
                              align_corners=False)[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        s = scores(confusion_matrix(pred, truth, table.num_classes, table.ignore_index))
        panels = [(split.names[i], image), (f"prediction (mIoU {s['miou'] * 100:.1f})", colourize(pred.numpy(), pal)),
                  ("ground truth (void black)", colourize(truth.numpy(), pal, table.ignore_index))]
        for ax, (title, a) in zip(row, panels):
            ax.imshow(a)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    handles = [Patch(color=pal[i] / 255, label=name) for i, name in enumerate(table.names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (3.2 * len(picks) + 0.6), 1, 1))
    fig.savefig(path, dpi=90)


def run_split(args, ckpt, model, device, dtype):
    """Evaluate a labelled split: mIoU, per-class IoU, pixel and class accuracy (void ignored,
    at each label's resolution), calibration and error detection; metrics.json and plots."""
    from dataset import load_split

    table = table_from_checkpoint(ckpt)
    split = load_split(args.test_path, table, tuple(ckpt["image_size"]))
    out_dir = make_output_dir(args.output_dir)
    if args.calibrate:
        t, before, after = fit_temperature(model, split, table, device, dtype, args.samples, args.seed)
        ckpt["temperature"] = t
        ckpt["calibration"] = {"data": str(args.test_path), "samples": args.samples, "nll_before": before,
                               "nll_after": after}
        save_checkpoint(ckpt, args.model_path)
        print(f"calibrated on {args.test_path}: temperature {t:.3f} (pixel NLL {before:.4f} -> {after:.4f}); "
              f"stored in {args.model_path}")
    temperature, latent_scale = float(ckpt.get("temperature", 1.0)), float(ckpt.get("latent_scale", 1.0))
    sums = evaluate(model, split, num_classes=table.num_classes, ignore_index=table.ignore_index,
                    device=device, dtype=dtype, batch_size=args.batch_size, flip=args.flip)
    metrics = summarize(sums)
    print(f"{args.test_path}: {len(split)} images, evaluated at each label's resolution, void ignored")
    print(format_scores(metrics, table.names))
    meters = evaluate_uncertainty(model, split, table, device, dtype, args.samples, temperature, latent_scale,
                                  args.seed, args.batch_size)
    print(f"\nuncertainty, {args.samples} latent sample(s), temperature {temperature:.3f}:")
    print(f"{'score':<22}{'ECE':>7}{'NLL':>8}{'Brier':>8}{'AUROC':>8}"
          f"{'mIoU@50%':>10}{'mIoU@75%':>10}{'mIoU@90%':>10}")
    metrics["uncertainty"] = {}
    for name, meter in meters.items():
        r = meter.compute()
        cov = {round(c["coverage"], 2): c["miou"] for c in r["coverage"]}
        print(f"{name:<22}{r['ece']:>7.4f}{r['nll']:>8.4f}{r['brier']:>8.4f}{r['auroc']:>8.4f}"
              f"{cov[0.5] * 100:>10.1f}{cov[0.75] * 100:>10.1f}{cov[0.9] * 100:>10.1f}")
        r.pop("curve")
        metrics["uncertainty"][name] = r
    metrics.update({"classes": table.names, "confusion_matrix": sums["cm"].cpu().tolist(),
                    "data": str(args.test_path), "checkpoint": str(args.model_path), "samples": args.samples,
                    "temperature": temperature, "flip": args.flip})
    save_confusion(out_dir / "confusion_matrix.png", metrics["confusion_matrix"], table.names)
    save_reliability(out_dir / "reliability.png", meters)
    written = [out_dir / "metrics.json", out_dir / "confusion_matrix.png", out_dir / "reliability.png"]
    if args.examples:
        save_examples(out_dir / "examples.png", model, split, table, ckpt, device, dtype, args.examples, args.flip)
        written.append(out_dir / "examples.png")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print("wrote " + ", ".join(map(str, written)))
    return metrics


class Parser(argparse.ArgumentParser):
    """argparse that fails like every other bad input: one 'error: ...' line and exit 2, not the
    whole usage block (under torchrun from rank 0 alone)."""

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {message}; see python {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def get_args(argv=None):
    p = Parser(description="Segment images or evaluate a labelled split with a "
                                "trained segmentation VAE.")
    p.add_argument("--model_path", help="checkpoint written by train.py (best.pt, last.pt, ...); required")
    p.add_argument("--test_image_path", help="an image, a folder of images, or a glob pattern to segment")
    p.add_argument("--mask_path", help="ground-truth mask of --test_image_path: adds it, an error map "
                   "and this image's IoU to the figure")
    p.add_argument("--test_path", help="a labelled split to evaluate (same layouts as training data)")
    p.add_argument("--output_dir", default="predictions", help="where outputs go (default: predictions)")
    p.add_argument("--batch_size", type=int, default=8, help="images per forward pass in evaluation (default: 8)")
    p.add_argument("--flip", action="store_true", help="average with the mirrored image (test-time flip)")
    p.add_argument("--samples", type=int, default=1, help="latent samples per image; 1 decodes the mean "
                   "latent, more adds uncertainty maps (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for latent sampling (default: 0)")
    p.add_argument("--examples", type=int, default=4, help="with --test_path: images in examples.png, a grid "
                   "of input | prediction | ground truth (0: none; default: 4)")
    p.add_argument("--calibrate", action="store_true", help="fit a temperature on --test_path (use the val "
                   "split) and store it in the checkpoint; later runs use it")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype (default: auto = bf16 where the hardware has it)")
    args = p.parse_args(argv)
    if not args.model_path:
        raise DataError("give --model_path: a checkpoint written by train.py (e.g. runs/<time>/best.pt)")
    if not args.test_image_path and not args.test_path:
        raise DataError("give --test_image_path (segment images) or --test_path (evaluate a labelled split)")
    if args.examples < 0:
        raise DataError(f"--examples {args.examples} must be 0 or more")
    if args.samples < 1 or args.batch_size < 1:
        raise DataError(f"--samples {args.samples} and --batch_size {args.batch_size} must be at least 1")
    if args.calibrate and not args.test_path:
        raise DataError("--calibrate needs --test_path: the labelled split (val) to fit the temperature on")
    return args


def main(args):
    device = pick_device(args.device)
    dtype = pick_precision(args.precision, device)
    ckpt = load_checkpoint(args.model_path, device)
    model = build_model(ckpt, args.model_path, device)
    result = None
    if args.test_image_path:
        run_images(args, ckpt, model, device, dtype)
    if args.test_path:
        result = run_split(args, ckpt, model, device, dtype)
    return result


if __name__ == "__main__":
    try:
        main(get_args())
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
