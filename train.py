"""Train the segmentation VAE on paired images and masks (or on the built-in demo set).

    python train.py --train_path ../shared/data/camvid/train --val_path ../shared/data/camvid/val --epochs 100
    python train.py --epochs 8                        # the synthetic demo set
    python train.py --train_path ../shared/data/camvid/train --val_path ../shared/data/camvid/val \
        --prior learned --label_flips 1               # the learned prior on CamVid's known ambiguity
    torchrun --nproc_per_node=2 train.py ...          # DistributedDataParallel, --batch_size per process

Every epoch trains, validates (loss, KL, mIoU, per-class IoU, pixel accuracy), saves
epoch_NNN.pt, last.pt and best.pt in --output_dir, rewrites metrics.csv and redraws loss_plot.png.
"""

import copy
import csv
import dataclasses
import gc
import json
import math
import os
import signal
import statistics
import sys
import time
import types
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import dataset
from ambiguity import CAMVID_FLIPS, check_base_table, extended_classes, flip_labels, flips_to_list
from ambiguity import VOID as FLIP_VOID
from dataset import DataError
from checkpoint import build_model, load_checkpoint, make_checkpoint, save_checkpoint
from cli import Parser, make_output_dir, refuse, write_csv, write_json
from evaluate import DIVERSITY_IMAGES, diversity_stride, evaluate, summarize
from figures import plot_history
from model import (INJECTIONS, LATENT_FORMS, PRIORS, SegVAE, VAEConfig, count_parameters, fair_brier_loss, kl_loss,
                   segmentation_loss)
from runtime import (autocast, keep_freed_memory, memory_format, pick_device, pick_precision, precision_name,
                     set_threads)

DEFAULT_EPOCHS = 8


def get_args(argv=None):
    p = Parser(description="Train the segmentation VAE.")
    d = p.add_argument_group("data")
    d.add_argument("--train_path", help="training split: a folder with images/ and masks/ (or labels/, "
                   "1st_manual/), a folder X with a sibling Xannot/, X_labels/ or X_masks/, a list file of "
                   "'image mask' lines, or a Pascal VOC ID list VOC/ImageSets/Segmentation/train.txt "
                   "(default: the demo set)")
    d.add_argument("--val_path", help="validation split, same layouts (default: the demo val set, or "
                   "none when --train_path is given without it)")
    d.add_argument("--classes", help="class table: classes.csv (index,name,r,g,b), class_dict.csv "
                   "(name,r,g,b), label_colors.txt (r g b name) or labelmap.txt (default: one of those next "
                   "to the data, else read off the masks: a palette PNG's palette, or two classes for binary masks)")
    d.add_argument("--mask_suffix", help="use the masks named <image name><SUFFIX> (e.g. _L) where a folder "
                   "holds several masks per image; '' for masks named like their images (default: pair by "
                   "name, ignoring a suffix every mask shares)")
    d.add_argument("--roi", type=int, default=1, choices=[0, 1],
                   help="use region-of-interest masks (roi/, fov/, DRIVE's mask/ beside 1st_manual/, or roi=PATH "
                   "in list files): labels outside them are void")
    d.add_argument("--cache", type=int, default=1, choices=[0, 1],
                   help="1: decode each split once into a memory-mapped uint8 cache in --cache_dir, reused by "
                   "later runs, resumes and torchrun processes; 0: decode every batch again in --workers "
                   "processes (for data read once)")
    d.add_argument("--cache_dir", help="where the caches live (default: $XDG_CACHE_HOME/segvae, else "
                   "~/.cache/segvae; delete it to free the space)")
    d.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding batches with --cache 0")
    d.add_argument("--num_classes", type=int, help="number of classes when there is no class table")
    d.add_argument("--ignore_index", type=int, help="void label excluded from loss and metrics "
                   "(default: the table's Unlabelled/void row, else 255)")
    d.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"),
                   help="size images are decoded to, and validated at (default: 64 64 for the demo set, "
                   "240 320 otherwise)")
    d.add_argument("--crop_size", type=int, nargs=2, metavar=("H", "W"),
                   help="train on random crops of this size (cheaper steps at full detail; default: "
                   "whole images at --image_size)")
    d.add_argument("--augment", type=int, default=1, choices=[0, 1],
                   help="random zoom/shift/flip and colour jitter on training batches")
    d.add_argument("--rotate", type=float, default=0.0, metavar="DEGREES",
                   help="random rotation of training images and masks, up to this many degrees either way")
    d.add_argument("--scale", type=float, nargs=2, default=[0.75, 1.5], metavar=("MIN", "MAX"),
                   help="range of the random zoom (log-uniform; >1 magnifies)")
    d.add_argument("--jitter", type=float, default=0.2, metavar="S",
                   help="colour jitter strength: brightness +-4S in normalized units (ImageNet std), contrast and "
                   "saturation x[1-S, 1+S]")
    d.add_argument("--cutmix", type=float, default=0.0, metavar="P",
                   help="with probability P paste a box (10-40%% of the image) of another training image and "
                   "its labels into each training image (CutMix)")
    d.add_argument("--label_flips", type=int, default=0, choices=[0, 1],
                   help="CamVid's known-ambiguity benchmark (Kohl et al. 2018): each time an image is drawn, all "
                   "its Pavement, Pedestrian, Car, Tree, Road pixels become a second class with probability "
                   "8/17, 7/17, 6/17, 5/17, 4/17, independently (16 classes, 32 label maps per image); "
                   "validation scores the base classes")
    m = p.add_argument_group("model")
    m.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256],
                   help="channels of each downsampling block (depth = how many)")
    m.add_argument("--blocks", type=int, default=1,
                   help="residual 3x3 convs after each strided conv of the encoder (a deeper encoder)")
    m.add_argument("--latent_channels", type=int, default=32, help="channels of the spatial latent")
    m.add_argument("--skip", type=int, default=1, choices=[0, 1], help="U-Net skip connections")
    m.add_argument("--context", type=int, default=1, choices=[0, 1], help="dilated context at the bottleneck")
    m.add_argument("--image_context", type=int, default=0, choices=[0, 1],
                   help="1: the context also adds the whole image's pooled features at every bottleneck position")
    m.add_argument("--input_norm", type=int, default=0, choices=[0, 1],
                   help="1: the model standardizes each image by its own per-channel mean and std before "
                   "encoding it, so a scene's overall brightness, contrast and colour cast do not reach it")
    m.add_argument("--stochastic", type=int, default=1, choices=[0, 1],
                   help="sample the latent (0: decode the mean only, the deterministic ablation)")
    m.add_argument("--prior", default="standard", choices=PRIORS,
                   help="standard: the encoder's latent against N(0, I); learned: a prior net p(z|x) and a "
                   "posterior net q(z|x, mask) (the Probabilistic U-Net, Kohl et al. 2018)")
    m.add_argument("--latent_form", choices=LATENT_FORMS,
                   help="learned prior: a global vector, a spatial map (--latent_channels), or both "
                   "(default: global; the standard prior's latent is spatial)")
    m.add_argument("--latent_dim", type=int, default=6, help="learned prior: dims of the global latent vector")
    m.add_argument("--inject", choices=INJECTIONS,
                   help="learned prior: where z enters the decoder, at the head (concatenated with the last "
                   "features, then 1x1 convs; only the head reruns per sample) or the bottleneck "
                   "(default: head)")
    m.add_argument("--head_convs", type=int,
                   help="hidden 1x1 convs before the class logits (default: 1 with the learned prior, 0 otherwise)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, help=f"epochs to train (in total, also when resuming; default: "
                   f"{DEFAULT_EPOCHS}; with --time_budget, the most epochs the budget may plan)")
    o.add_argument("--time_budget", type=float, metavar="MINUTES",
                   help="fit the whole schedule (epochs, LR and KL warm-up, cosine decay) to this wall-clock "
                   "budget for the whole run, measured from the first steps, corrected after the second "
                   "epoch and again whenever the epochs drift; with --epochs N, N epochs or as many as fit, "
                   "whichever is fewer (default: none, --epochs)")
    o.add_argument("--batch_size", type=int, default=8, help="images per step, per process")
    o.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, cosine decay)")
    o.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    o.add_argument("--warmup", type=float, default=0.03, help="share of steps with linear LR warm-up")
    o.add_argument("--loss", default="ce", choices=["ce", "mse", "ce_dice"],
                   help="ce: pixel cross-entropy; mse: squared error of class probabilities vs one-hot; "
                   "ce_dice: cross-entropy plus soft Dice (each class present weighs alike: thin, rare classes)")
    o.add_argument("--class_weights", default="median_freq", choices=["none", "median_freq", "sqrt_median_freq"],
                   help="per-class loss weights computed from the training masks: median frequency (Eigen & "
                   "Fergus 2015), or its square root (milder on rare classes)")
    o.add_argument("--kl_weight", type=float, default=1.0,
                   help="beta on the KL term (KL in nats per pixel, so 1 is the ELBO with --loss ce)")
    o.add_argument("--kl_warmup", type=float, default=0.2, help="share of steps over which beta ramps up from 0")
    o.add_argument("--free_bits", type=float, default=0.0, help="KL floor in nats per latent element")
    o.add_argument("--calibration", type=float, default=0.0, metavar="WEIGHT",
                   help="learned prior: weight of a loss on --calibration_samples draws from the prior p(z|x), "
                   "the fair Brier score of their mean against the label, least where each class is sampled as "
                   "often as it is labelled; it moves only the prior (default 0: off)")
    o.add_argument("--calibration_samples", type=int, default=4, metavar="K",
                   help="prior draws per image for --calibration (at least 2)")
    o.add_argument("--val_samples", type=int,
                   help="latent samples per validation image for the sample diversity (mean 1 - IoU between two "
                   f"samples; near 0: collapse), drawn for up to {DIVERSITY_IMAGES} images spread over the split "
                   "(default: 4 with the learned prior, whose samples rerun only the head, else 0: off)")
    o.add_argument("--select", default="miou", choices=["miou", "ged"],
                   help="what best.pt keeps: the epoch with the highest validation mIoU, or the lowest D2_GED of "
                   "its --val_samples samples (against every annotator, or the flip benchmark's modes): for "
                   "data whose labels are ambiguous")
    o.add_argument("--grad_clip", type=float, default=5.0, help="clip the gradient norm (0: off)")
    o.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="validate and save an exponential moving average of the weights with this decay per "
                   "step, e.g. 0.999 (0: off, the weights as trained)")
    o.add_argument("--swa", type=float, default=0.0, metavar="SHARE",
                   help="stochastic weight averaging: from where the cosine LR schedule has this share left, "
                   "validate and save the plain mean of the weights after every step since, e.g. 0.5 "
                   "(0: off); BN statistics are averaged the same way")
    o.add_argument("--skip_nonfinite", type=int, default=0,
                   help="steps with a non-finite loss to skip before stopping the run")
    r = p.add_argument_group("run")
    r.add_argument("--output_dir", help="where checkpoints, metrics.csv and plots go (default: runs/<time>)")
    r.add_argument("--resume", help="a checkpoint to continue from, or 'auto' (last.pt in --output_dir if any)")
    r.add_argument("--seed", type=int, default=0, help="seed for weights, batch order, augmentation, sampling")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto = bf16 on CPUs with AVX-512 bf16 and on recent GPUs")
    r.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    r.add_argument("--eval_batch_size", type=int, default=8, help="images per step in validation")
    r.add_argument("--keep_epochs", type=int, default=3,
                   help="epoch_NNN.pt files to keep, the most recent (-1: all, 0: none); best.pt and last.pt "
                   "are always kept")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    if args.ignore_index is not None and not 0 <= args.ignore_index <= 255:
        raise DataError(f"--ignore_index {args.ignore_index} must be in 0..255 (masks are stored as uint8); "
                        "give the void label of your masks, or leave it out")
    if args.keep_epochs < -1:
        raise DataError(f"--keep_epochs {args.keep_epochs} must be -1 (keep all), 0 or more")
    positive = {"epochs": "100", "time_budget": "20 (minutes)", "batch_size": "8", "eval_batch_size": "8",
                "latent_channels": "32", "lr": "2e-3"}  # name -> an example of a value to give
    for name, example in positive.items():
        value = getattr(args, name)
        if value is None:  # --epochs / --time_budget left out
            continue
        if not value > 0:
            raise DataError(f"--{name} {value} must be greater than 0, e.g. --{name} {example}")
    for name in ("kl_weight", "free_bits", "calibration", "grad_clip", "weight_decay", "skip_nonfinite", "threads",
                 "workers"):
        if getattr(args, name) < 0:
            raise DataError(f"--{name} {getattr(args, name)} must not be negative")
    if not 0 <= args.warmup < 1 or not 0 <= args.kl_warmup <= 1:
        raise DataError("--warmup must be in [0, 1) and --kl_warmup in [0, 1]")
    if not 0 <= args.ema < 1:
        raise DataError(f"--ema {args.ema} must be in [0, 1): the decay per step, e.g. 0.999, or 0 for none")
    if not 0 <= args.swa <= 1:
        raise DataError(f"--swa {args.swa} must be in [0, 1]: the share of the schedule averaged, e.g. 0.5, or 0 "
                        "for none")
    if args.swa and args.ema:
        raise DataError(f"--swa {args.swa} and --ema {args.ema} both average the weights: choose one")
    if not 0 <= args.cutmix <= 1:
        raise DataError(f"--cutmix {args.cutmix} must be a probability in [0, 1]")
    if not 0 <= args.jitter < 1:
        raise DataError(f"--jitter {args.jitter} must be in [0, 1)")
    if not 0 <= args.rotate <= 180:
        raise DataError(f"--rotate {args.rotate} must be in 0..180 degrees")
    if args.val_samples is None:
        args.val_samples = 4 if args.prior == "learned" else 0
    if args.val_samples < 0 or args.val_samples == 1:
        raise DataError(f"--val_samples {args.val_samples} must be 0 (off) or at least 2")
    if args.select == "ged" and (args.val_samples < 2 or not args.stochastic):
        raise DataError(f"--select ged compares latent samples with the labels; it needs a stochastic model and "
                        f"--val_samples of at least 2 (now {args.val_samples}), e.g. --val_samples 16")
    if args.calibration and (args.prior != "learned" or args.inject == "bottleneck"):
        raise DataError(f"--calibration {args.calibration} trains the learned prior through the decoder's head: it "
                        "needs --prior learned with the latent at the head (--inject head, the default)")
    if args.calibration_samples < 2:
        raise DataError(f"--calibration_samples {args.calibration_samples} must be at least 2")
    if args.latent_dim < 1 or (args.head_convs is not None and args.head_convs < 0):
        raise DataError(f"--latent_dim {args.latent_dim} must be at least 1 and --head_convs {args.head_convs} "
                        "not negative")
    if args.prior == "learned" and not args.stochastic:
        raise DataError("--prior learned with --stochastic 0 would never train the prior net (no KL term); the "
                        "deterministic baseline is --prior standard --stochastic 0 --kl_weight 0")
    if args.prior == "standard" and (args.latent_form not in (None, "spatial") or args.inject not in
                                     (None, "bottleneck")):
        raise DataError(f"--latent_form {args.latent_form} / --inject {args.inject} are for --prior learned; the "
                        "standard prior's latent is the spatial bottleneck")
    if not 0 < args.scale[0] <= args.scale[1]:
        raise DataError(f"--scale {args.scale[0]} {args.scale[1]} must be two positive numbers, MIN <= MAX")
    if any(w < 1 for w in args.widths):
        raise DataError(f"--widths {args.widths} must all be at least 1")
    if args.blocks < 1:
        raise DataError(f"--blocks {args.blocks} must be at least 1, e.g. --blocks 2")
    for name in ("image_size", "crop_size"):
        if getattr(args, name) and min(getattr(args, name)) < 1:
            raise DataError(f"--{name} {getattr(args, name)} must be positive")


# ---------------------------------------------------------------------------------------------
# schedules (pure)


def lr_at(step, total_steps, warmup_steps, anchor=None):
    """LR multiplier: linear warm-up, then cosine decay to 0 (Loshchilov & Hutter 2017)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * cosine_progress(step, total_steps, warmup_steps, anchor)))


def cosine_progress(step, total_steps, warmup_steps, anchor=None):
    """How far the cosine has come at `step`, 0 to 1. `anchor` = (step, progress) is where a
    --time_budget run last changed its plan: from there the rest of the cosine spans the steps
    now left, so the LR goes on from the value it had, never jumps."""
    start, done = anchor or (warmup_steps, 0.0)
    return min(1.0, done + (1.0 - done) * (step - start) / max(1, total_steps - start))


def kl_weight_at(step, total_steps, beta, warmup_share):
    """KL weight: linear ramp from 0 to beta over the first `warmup_share` of training, so the
    decoder learns to use the latent before the KL term pulls it to the prior (Bowman et al. 2016)."""
    ramp = warmup_share * total_steps
    return beta if ramp <= 0 else beta * min(1.0, step / ramp)


def rank_seed(seed, rank):
    """The seed of rank `rank`'s own random streams (latent noise): rank 0 keeps `seed`, so one
    process trains exactly as without torchrun."""
    return seed + 1_000_003 * rank


def augment_seed(seed, step, rank):
    """The augmentation draw of `step` on `rank`: reproducible on resume, different per rank (each
    rank augments its own images)."""
    return (seed * 1_000_003 + step) * 4099 + rank


def fixed_plan(epochs, steps_per_epoch, world, args, time_budget=None):
    """The run's schedule, fixed at its start and kept in every checkpoint: epochs, total steps
    (per process) and LR warm-up steps."""
    total = steps_per_epoch * epochs
    return {"epochs": epochs, "steps_per_epoch": steps_per_epoch, "total_steps": total,
            "warmup_steps": max(1, int(args.warmup * total)), "world": world, "batch_size": args.batch_size,
            "time_budget": time_budget}


def epochs_for_budget(budget_s, spent_s, epoch_s, safety=0.97):
    """Whole epochs that fit what is left of the budget (at least 1)."""
    return max(1, int((safety * budget_s - spent_s) // epoch_s))


def budget_plan(model, raw_model, train, val, args, ctx, steps_per_epoch, t_start, out, steps=6, warmup=2):
    """--time_budget: time a few real training steps, a validation batch and a checkpoint save on
    this machine, then plan as many epochs as fit the budget for the whole run (no more than
    --epochs, where given). The model, optimizer and RNG are put back as they were, so the run
    trains as if unmeasured."""
    saved = (copy.deepcopy(raw_model.state_dict()), copy.deepcopy(ctx["optimizer"].state_dict()),
             torch.get_rng_state())
    probe_ctx = dict(ctx, scheduler=types.SimpleNamespace(step=lambda: None), total_steps=1)
    probe = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "nonfinite": 0, "partial": new_partial(ctx["device"])}
    if isinstance(train, dataset.SegmentationDataset):  # --cache 0: the probe decodes its batch too
        sub = copy.copy(train)
        sub.samples, sub.names = train.samples[:args.batch_size], train.names[:args.batch_size]
    else:
        sub = dataset.Split(train.images[:args.batch_size], train.masks[:args.batch_size], [],
                            train.names[:args.batch_size])
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        probe["batch_in_epoch"] = 0
        train_one_epoch(model, sub, probe, args, probe_ctx)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    val_s = 0.0
    if val is not None:  # a batch without, then with the diversity samples (drawn for a few images)
        n = min(len(val), args.eval_batch_size)
        per_image = []
        for samples in (0, args.val_samples) if args.val_samples else (0,):
            runs = []
            for _ in range(2):  # the faster of two: the first carries one-time start-up costs
                t0 = time.perf_counter()
                evaluate(raw_model, val, num_classes=ctx["table"].num_classes,
                         ignore_index=ctx["table"].ignore_index, device=ctx["device"], dtype=ctx["dtype"],
                         batch_size=args.eval_batch_size, indices=range(n), flips=ctx.get("flips"),
                         diversity_samples=samples, seed=args.seed, diversity_images=0)
                runs.append(time.perf_counter() - t0)
            per_image.append(min(runs) / n)
        sampled = math.ceil(len(val) / diversity_stride(len(val)))
        val_s = (per_image[0] * math.ceil(len(val) / ctx["world"])
                 + max(0.0, per_image[-1] - per_image[0]) * math.ceil(sampled / ctx["world"]))
    # One file per rank: under torchrun every rank times a save into the same folder, and with one
    # shared name a rank could delete the file before another had finished with it.
    probe_file = out / f".budget_probe.rank{ctx['rank']}.tmp"
    t0 = time.perf_counter()
    save_checkpoint({"model": raw_model.state_dict(), "optimizer": ctx["optimizer"].state_dict()}, probe_file)
    probe_file.unlink()
    save_s = 3 * (time.perf_counter() - t0) + 0.5  # epoch_NNN, best, last; metrics.csv and the plot
    raw_model.load_state_dict(saved[0])
    ctx["optimizer"].load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    epoch_s = steps_per_epoch * step_s + val_s + save_s
    spent = time.time() - t_start
    fit, epochs = planned_epochs(args.time_budget, spent, epoch_s, args)
    epochs = agreed(epochs, ctx)
    if ctx["is_main"]:
        print(f"time budget {args.time_budget:g} min: {step_s:.2f} s per step, {val_s:.1f} s per validation, "
              f"{epoch_s:.0f} s per epoch, {spent:.0f} s spent before training -> {epochs} epochs"
              + (f" (--epochs {args.epochs}; {fit} would fit)" if epochs < fit else ""))
    return dict(fixed_plan(epochs, steps_per_epoch, ctx["world"], args, time_budget=args.time_budget),
                probe_epochs=epochs, spent_s=0.0)


def replan(plan, done, seconds, save_s, elapsed_s, args, ctx):
    """--time_budget, after each whole epoch from the second that this process has run: plan the
    rest of the run again with what its epochs cost, and return the epochs now planned.

    `seconds` are this process's whole epochs' training and validation times, `save_s` its last
    epoch's saves (the current epoch's are still due), `elapsed_s` the budget spent so far (what
    earlier processes of a resumed run spent, then this one's start-up and epochs). An epoch
    costs the faster of the first two with the saves (the first carries one-time costs: cuDNN's
    autotuning, allocator growth; either may be slowed by a passing load), then the median of
    the last three.

    The first time (two epochs measured) the plan is always replaced: it came from a few probe
    steps, which misjudge an epoch by 10-20% on a noisy CPU, or from another process. After
    that it changes only where the epochs drift: when the plan would end past the budget, or
    when two epochs more would fit. The new plan fits 97% of the budget, never beyond --epochs,
    and keeps one epoch at least, so that a spent budget still ends on a finished cosine. The
    plan changes in place, so the LR schedule follows at once and stays continuous (see
    `cosine_progress`); the warm-up keeps its length."""
    first = len(seconds) == 2
    epoch_s = (min(seconds) if first else statistics.median(seconds[-3:])) + save_s
    budget_s = 60 * plan["time_budget"]
    _, epochs = planned_epochs(plan["time_budget"], elapsed_s + save_s - done * epoch_s, epoch_s, args)
    epochs = max(done + 1, epochs)
    projected_s = elapsed_s + save_s + (plan["epochs"] - done) * epoch_s
    if not (first or projected_s > budget_s or epochs >= plan["epochs"] + 2):
        epochs = plan["epochs"]
    epochs = agreed(epochs, ctx)
    if ctx["is_main"] and (first or epochs != plan["epochs"]):
        if first:
            why = (f"the {'first two epochs' if done == 2 else 'two epochs since the resume'} took "
                   f"{seconds[0] + save_s:.1f} s and {seconds[1] + save_s:.1f} s with their saves")
        else:
            why = (f"after {done} epochs, {elapsed_s / 60:.1f} min spent and {epoch_s:.1f} s per epoch "
                   f"(the median of the last three)")
        was = "the probe planned" if done == 2 else "was"
        print(f"time budget {plan['time_budget']:g} min: {why} -> {epochs} epochs"
              + (f" ({was} {plan['epochs']})" if epochs != plan["epochs"] else ", as planned"), flush=True)
    if epochs != plan["epochs"]:
        step = done * plan["steps_per_epoch"]
        if step > plan["warmup_steps"]:
            plan["anchor"] = [step, cosine_progress(step, plan["total_steps"], plan["warmup_steps"],
                                                    plan.get("anchor"))]
        plan["epochs"] = epochs
        plan["total_steps"] = epochs * plan["steps_per_epoch"]
        ctx["total_steps"] = plan["total_steps"]
    return epochs


def planned_epochs(minutes, spent_s, epoch_s, args):
    """(epochs that fit the budget, epochs planned): the fit capped by --epochs."""
    fit = epochs_for_budget(60 * minutes, spent_s, epoch_s)
    return fit, min(fit, args.epochs) if args.epochs else fit


def agreed(epochs, ctx):
    """Rank 0's plan on every rank: each rank reads its own clock, and all must plan the same
    schedule."""
    if ctx["world"] > 1:
        t = torch.tensor([epochs], device=ctx["device"])
        dist.broadcast(t, 0)
        epochs = int(t)
    return epochs


def median_frequency_weights(masks, num_classes, ignore_index):
    """median_frequency_weights_of counted over masks (N, H, W)."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    present_pixels = torch.zeros(num_classes, dtype=torch.float64)
    for m in masks:
        m = m.long().flatten()
        c = torch.bincount(m[m != ignore_index].clamp_max(num_classes - 1), minlength=num_classes).double()
        counts += c
        present_pixels += (c > 0).double() * m.numel()
    return median_frequency_weights_of(counts, present_pixels)


def loss_class_weights(kind, counts, present_pixels):
    """--class_weights: None ("none"), median_frequency_weights_of ("median_freq") or its
    square root ("sqrt_median_freq")."""
    if kind == "none":
        return None
    weights = median_frequency_weights_of(counts, present_pixels)
    return weights.sqrt() if kind == "sqrt_median_freq" else weights


def median_frequency_weights_of(counts, present_pixels):
    """w_c = median(freq) / freq_c, freq_c = pixels of class c / pixels of images holding c
    (Eigen & Fergus 2015), from the two per-class counts (a cache's stats hold them). Classes
    absent from the training masks get weight 0."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    present_pixels = torch.as_tensor(present_pixels, dtype=torch.float64)
    freq = counts / present_pixels.clamp_min(1)
    present = counts > 0
    weights = torch.zeros(len(counts), dtype=torch.float64)
    weights[present] = freq[present].quantile(0.5) / freq[present]  # the usual median (mean of middle two)
    return weights.float()


# ---------------------------------------------------------------------------------------------
# distributed set-up (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)


def setup_distributed(device_name):
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_sums(sums, world):
    if world > 1:
        for v in sums.values():
            dist.all_reduce(v)
    return sums


# ---------------------------------------------------------------------------------------------
# data


def load_data(args, is_main):
    """Training and validation splits, the class table and the training size. With --cache 1
    the splits are memory-mapped caches (dataset.load_split); with --cache 0 training reads a
    SegmentationDataset through DataLoader workers and validation decodes per batch."""
    size = tuple(args.image_size or (dataset.DEMO_SIZE if args.train_path is None else (240, 320)))
    if args.crop_size and (args.crop_size[0] > size[0] or args.crop_size[1] > size[1]):
        raise DataError(f"--crop_size {args.crop_size[0]} {args.crop_size[1]} is larger than the image size "
                        f"{size[0]} {size[1]}; pass a smaller crop or a larger --image_size")
    if args.train_path is None:
        if args.label_flips:
            raise DataError("--label_flips is CamVid's benchmark; give --train_path (and --val_path) of CamVid")
        if is_main:
            print("=" * 72 + "\nNo --train_path given: training on the built-in SYNTHETIC DEMO set "
                  f"({dataset.DEMO_TRAIN[0]} train / {dataset.DEMO_VAL[0]} val images).\n" + "=" * 72)
        table = dataset.demo_table()
        train = dataset.demo_split(*dataset.DEMO_TRAIN, image_size=size)
        val = dataset.demo_split(*dataset.DEMO_VAL, image_size=size)
        return train, val, table, size
    for path in (args.train_path, args.val_path):
        if path:
            dataset.check_exists(path)  # before minutes of decoding the other split
    bar = (lambda it, **kw: tqdm(it, disable=None, **kw)) if is_main else None  # None: terminal only
    threads = args.threads or torch.get_num_threads()
    table = dataset.make_class_table(args.classes, args.train_path, args.num_classes, args.ignore_index,
                                     args.mask_suffix, threads, bar, also=[args.val_path] if args.val_path else [])
    if args.label_flips:
        try:
            check_base_table(table.names, table.ignore_index)
        except ValueError as e:
            raise DataError(f"--label_flips with {args.train_path}: {e}") from None
    paths = [p for p in (args.train_path, args.val_path) if p]
    if args.cache:
        cache_dir = Path(args.cache_dir) if args.cache_dir else dataset.default_cache_dir()
        splits = [dataset.load_split(p, table, size, threads, bar, cache_dir, args.mask_suffix, bool(args.roi),
                                     builder=is_main) for p in paths]
    else:
        splits = [dataset.SegmentationDataset(p, table, size, mask_suffix=args.mask_suffix, roi=bool(args.roi),
                                              num_threads=threads) for p in paths]
        splits[0].stats = dataset.dataset_stats(splits[0], threads, bar)  # class weights, absent classes
        splits[1:] = [dataset.DecodingSplit(ds) for ds in splits[1:]]
    train, val = splits[0], splits[1] if len(splits) > 1 else None
    if is_main:
        for note in (n for s in splits for n in s.notes):
            print(note, file=sys.stderr if note.startswith("warning") else sys.stdout)
        absent = dataset.absent_classes(train.stats, table)
        if absent:
            print(f"warning: {len(absent)} of {table.num_classes} classes appear in no training mask: "
                  f"{', '.join(absent)}; a wrong class table or label mapping looks like this (check --classes, "
                  "--num_classes, --ignore_index)", file=sys.stderr)
        if val is not None and val.annotators > 1:
            print(f"note: {args.val_path} has {val.annotators} annotations per image; validation scores the first "
                  "(the samples' D2_GED compares them with all)")
    return train, val, table, size


def batches_of(train, batches, workers, device):
    """uint8 (images (B, 3, H, W), masks (B, [K,] H, W)) of each batch of indices: indexed from
    the cached split, or decoded by DataLoader workers from a SegmentationDataset (--cache 0)."""
    if isinstance(train, dataset.SegmentationDataset):
        # Its own generator: the workers' seed would otherwise be drawn from the global RNG, and
        # the latent samples of the steps would differ from the cached path's.
        yield from torch.utils.data.DataLoader(train, batch_sampler=batches, num_workers=workers,
                                               pin_memory=device.type == "cuda", generator=torch.Generator())
    else:
        for idx in batches:  # index_select copies whole rows: 10x faster than indexing by a list
            idx = torch.as_tensor(idx, device=train.images.device)
            yield train.images.index_select(0, idx), train.masks.index_select(0, idx)


def cache_on_device(split, device, share=0.25):
    """On a GPU, the split's uint8 training cache moves to the GPU once (CamVid train at 288x384:
    160 MB), so that steps copy nothing from the host; it stays on the host when it would fill
    more than `share` of the free GPU memory (then each batch is copied, 2.6 MB per step)."""
    if not isinstance(split, dataset.Split) or device.type != "cuda":
        return split
    if split.images.nbytes + split.masks.nbytes > share * torch.cuda.mem_get_info(device)[0]:
        return split
    return dataclasses.replace(split, images=split.images.to(device), masks=split.masks.to(device))


def batch_order(n, epoch, seed, rank, world):
    """This rank's sample indices for `epoch`: a DistributedSampler permutation (seed + epoch),
    so an interrupted epoch can be replayed exactly on resume."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                                  seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return list(sampler)


# ---------------------------------------------------------------------------------------------
# training


class StopRequested(Exception):
    pass


class NonFiniteLoss(Exception):
    pass


def train_one_epoch(model, train, state, args, ctx):
    """One pass over this rank's share of the training split, starting after the batches
    already done (`state['batch_in_epoch']`, non-zero when resuming mid-epoch)."""
    device, table = ctx["device"], ctx["table"]
    order = batch_order(len(train), state["epoch"], args.seed, ctx["rank"], ctx["world"])
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    model.train()
    crop = tuple(args.crop_size) if args.crop_size else None
    layout = memory_format(device)  # the model's: channels-last or NCHW, by the CPU
    fixed = (dict(scale=tuple(args.scale), rotate=args.rotate, jitter=args.jitter) if args.augment
             else dict(scale=(1, 1), flip=False, jitter=0))
    bar = tqdm(initial=state["batch_in_epoch"], total=len(batches), desc=f"epoch {state['epoch'] + 1}",
               disable=None if ctx["is_main"] else True, leave=False, dynamic_ncols=True)  # None: terminal only
    for images, target in batches_of(train, batches[state["batch_in_epoch"]:], args.workers, device):
        images = images.to(device, non_blocking=True)  # uint8: augment normalizes in its colour pass
        target = target.to(device, non_blocking=True)
        gen = torch.Generator().manual_seed(augment_seed(args.seed, state["step"], ctx["rank"]))
        if target.dim() == 4:  # (B, K, H, W): one of the K annotations per image, drawn each step
            target = dataset.draw_annotations(target, gen)
        if args.augment or crop:  # labels stay uint8 through the resampling
            images, target = dataset.augment(images, target, gen, table.ignore_index, out_size=crop, **fixed)
        else:
            images = dataset.normalize(images)
        target = target.long()
        if args.cutmix:
            images, target = dataset.cutmix(images, target, gen, args.cutmix)
        if ctx.get("flips"):
            target = flip_labels(target, gen, ctx["flips"])  # (B, h, w) in the 16 classes, void 255
        stop = train_step(model, images.contiguous(memory_format=layout), target, state, args, ctx)
        state["batch_in_epoch"] += 1
        bar.update()
        part = state["partial"]
        if state["step"] % 10 == 0 and ctx["is_main"] and part["images"] > 0:
            bar.set_postfix(loss=f"{float(part['loss'] / part['images']):.4f}",
                            kl=f"{float(part['kl'] / part['images']):.4f}")
        if stop:
            raise StopRequested(ctx["stop"]["signal"] or "another rank's signal")
    bar.close()


def train_step(model, images, target, state, args, ctx):
    """One optimizer step on a normalized, augmented batch: images (B, 3, h, w) float,
    target (B, h, w) int64. Adds the batch's loss, KL and --calibration score to state['partial'] and advances
    state['step']; returns True when a stop signal reached any rank."""
    device, dtype = ctx["device"], ctx["dtype"]
    optimizer, scheduler, scaler = ctx["optimizer"], ctx["scheduler"], ctx["scaler"]
    part = state["partial"]
    n = images.shape[0]
    beta = kl_weight_at(state["step"], ctx["total_steps"], args.kl_weight, args.kl_warmup)
    prior, drawn, brier = (), None, None
    void = outputs_table(ctx).ignore_index
    with autocast(device, dtype):
        if model_config(model).prior == "learned":  # z from q(z|x, y); KL(q || p(z|x))
            k = args.calibration_samples if args.calibration else 0
            logits, mu, logvar, *prior = model(images, target.masked_fill(target == void, -1), prior_samples=k)
            if k:
                *prior, drawn = prior
        else:
            logits, mu, logvar = model(images)
    recon = segmentation_loss(logits, target, args.loss, void, ctx["class_weights"])
    kl = kl_loss(mu, logvar, images.shape[-2] * images.shape[-1], args.free_bits, *prior)
    loss = recon + beta * kl if model_config(model).stochastic else recon
    if drawn is not None:  # the head's resolution: every second label row and column
        brier = fair_brier_loss(drawn, target[:, ::2, ::2], void)
        loss = loss + args.calibration * brier
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    ok = torch.isfinite(loss)
    unscaled = bool(args.grad_clip or not scaler.is_enabled())
    if unscaled:
        scaler.unscale_(optimizer)
        # max_norm inf only measures: a non-finite norm would turn every weight into NaN.
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)
        if not scaler.is_enabled():  # fp16's scaler skips such steps itself
            ok = ok & torch.isfinite(norm)
    # The step's one host sync, after the backward is queued. Every rank must take the same
    # branch: one that skipped a step or stopped alone would leave the others waiting in the
    # next gradient all-reduce.
    bad, stop = any_rank(ctx, ~ok, ctx["stop"]["signal"] is not None)
    if bad:
        if not torch.isfinite(loss):
            bad = f"loss {float(loss.detach()):g}"
        elif bool(ok):
            bad = "a non-finite loss or gradient on another rank"
        else:
            bad = f"gradient norm {float(norm):g}"
        state["nonfinite"] += 1
        if state["nonfinite"] > args.skip_nonfinite:
            raise NonFiniteLoss(f"{bad} at epoch {state['epoch'] + 1} step {state['step'] + 1}")
        if not unscaled:
            scaler.unscale_(optimizer)  # fp16: records the inf check that update() needs
        scaler.update()  # fp16: lowers the scale; a no-op otherwise
        optimizer.zero_grad(set_to_none=True)
    else:
        scaler.step(optimizer)
        scaler.update()
        if ctx.get("swa") is not None:  # neither average exists yet while --time_budget times its steps
            if swa_started(state["step"], state["plan"], args.swa):
                update_swa(ctx["average"], getattr(model, "module", model), ctx["swa"])
        elif ctx.get("average") is not None:
            update_ema(ctx["average"], getattr(model, "module", model), args.ema, state["step"])
        part["loss"] += loss.detach().double() * n
        part["kl"] += kl.detach().double() * n
        if brier is not None:
            part["brier"] += brier.detach().double() * n
        part["images"] += n
    scheduler.step()
    state["step"] += 1
    return stop


def any_rank(ctx, *flags):
    """Each flag (a bool, or a one-element bool tensor on the device) ORed over all ranks, as
    Python bools, with a single host sync."""
    t = torch.stack([torch.as_tensor(f, device=ctx["device"]).reshape(()) for f in flags]).int()
    if ctx["world"] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def outputs_table(ctx):
    """The class table of the model's outputs: the data's, or with --label_flips the 16 classes."""
    return ctx.get("model_table") or ctx["table"]


def vae_config(args, num_classes):
    """The model that the model flags in `args` describe (ValueError if they do not fit together)."""
    return VAEConfig(num_classes=num_classes, widths=tuple(args.widths), latent_channels=args.latent_channels,
                     skip=bool(args.skip), context=bool(args.context), stochastic=bool(args.stochastic),
                     prior=args.prior, latent_form=args.latent_form, latent_dim=args.latent_dim, inject=args.inject,
                     head_convs=args.head_convs, input_norm=bool(args.input_norm),
                     image_context=bool(args.image_context), blocks=args.blocks)


def model_config(model):
    return getattr(model, "module", model).config


def update_ema(ema, model, decay, step):
    """ema <- decay * ema + (1 - decay) * weights, the decay ramped up from 0.1 over the first steps
    so the average does not start from random weights (as in TensorFlow's ExponentialMovingAverage
    with num_updates); buffers (BN statistics) are copied."""
    d = min(decay, (1 + step) / (10 + step))
    lerp_weights(ema, model, 1 - d, buffers=False)


def swa_started(step, plan, share):
    """Whether `step` is in the last `share` of the cosine schedule (the plan as it stands)."""
    return cosine_progress(step, plan["total_steps"], plan["warmup_steps"], plan.get("anchor")) >= 1 - share


def update_swa(avg, model, swa):
    """avg <- the plain mean of the weights after each of the swa["n"] + 1 steps averaged so far
    (Izmailov et al. 2018); float buffers (BN running statistics) are averaged alike, so the mean
    needs no pass over the data to be validated."""
    swa["n"] += 1
    lerp_weights(avg, model, 1 / swa["n"], buffers=True)


def lerp_weights(avg, model, w, buffers):
    """avg's parameters <- (1 - w) * avg + w * model's; its float buffers too where `buffers`, the
    others (and all of them otherwise) copied."""
    with torch.no_grad():
        mine, theirs = list(avg.parameters()), list(model.parameters())
        for a, b in zip(avg.buffers(), model.buffers()):
            if buffers and a.is_floating_point():  # averaged in the one fused call below
                mine.append(a)
                theirs.append(b)
            else:
                a.copy_(b)
        torch._foreach_lerp_(mine, theirs, w)


def eval_model(raw_model, ctx):
    """The weights that are validated and saved for test.py: the moving average with --ema, the
    mean since the averaging began with --swa (the weights as trained before it)."""
    swa = ctx.get("swa")
    return raw_model if ctx.get("average") is None or (swa is not None and swa["n"] == 0) else ctx["average"]


def new_partial(device):
    return {k: torch.zeros((), dtype=torch.float64, device=device) for k in ("loss", "kl", "brier", "images")}


def checkpoint_dict(raw_model, state, args, ctx, full):
    """The run's checkpoint (checkpoint.py's format); `full` adds what --resume needs."""
    fields = {k: state[k] for k in ("epoch", "step", "best_miou", "history", "plan")}
    if full:
        if ctx.get("average") is not None:  # "model" holds the average; resume needs the trained weights too
            fields["train_model"] = raw_model.state_dict()
        if ctx.get("swa") is not None:
            fields["swa_steps"] = ctx["swa"]["n"]
        fields.update({
            "optimizer": ctx["optimizer"].state_dict(),
            "scheduler": ctx["scheduler"].state_dict(),
            "scaler": ctx["scaler"].state_dict(),
            "batch_in_epoch": state["batch_in_epoch"],
            "partial": {k: float(v) for k, v in state["partial"].items()},
            "nonfinite": state["nonfinite"],
            "world_size": ctx["world"],
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        })
    if ctx.get("flips"):  # test.py reads the base labels and builds the 32 modes from these
        fields["label_flips"] = flips_to_list(ctx["flips"])
        fields["base_ignore_index"] = ctx["table"].ignore_index
    return make_checkpoint(eval_model(raw_model, ctx), outputs_table(ctx), ctx["size"], run_config(args), **fields)


def run_config(args):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def write_metrics_csv(path, history, class_names):
    keys = ["epoch", "step", "train_loss", "train_kl", "train_brier", "val_loss", "val_kl", "val_kl_image", "kl_active",
            "val_diversity", "val_ged", "val_miou", "val_pixel_acc", "val_class_acc", "active_latent", "lr", "seconds"]
    write_csv(path, keys + [f"iou_{n}" for n in class_names],
              [[_fmt(row.get(k)) for k in keys] + [_fmt(v) for v in row.get("val_iou", [])] for row in history])


def metrics_csv_rows(path):
    """Rows in a metrics.csv (0 if there is none)."""
    if not path.exists():
        return 0
    with open(path, newline="") as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)


def _fmt(v):
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)


def resolve_output(args):
    """The output folder and the checkpoint to resume from (None: a new run)."""
    out = Path(args.output_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    resume = args.resume
    if resume == "auto":
        resume = out / "last.pt" if (out / "last.pt").exists() else None
    elif resume is not None and not Path(resume).is_file():
        raise DataError(f"--resume {resume} does not exist; give the last.pt of an earlier run, or "
                        "--resume auto to continue the run in --output_dir if there is one")
    elif resume is None and (out / "last.pt").exists():
        raise DataError(f"output folder {out} already holds a run (last.pt); continue it with "
                        "--resume auto, or choose another --output_dir")
    return out, resume


def remove_stale_temporaries(out):
    """Delete the temporary files of saves that a killed run left half-written (the finished
    files they were meant to replace are intact: every save is write-then-rename)."""
    for p in out.iterdir():
        if p.is_file() and p.name.endswith((".tmp", ".tmp.png")):
            p.unlink()


def main(args):
    rank, world, device = setup_distributed(args.device)
    stop = {"signal": None}  # set by SIGINT/SIGTERM; training stops after the current step

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name
        for s, h in old_handlers.items():  # a second signal ends the process at once
            signal.signal(s, h)

    # Installed before any work, on every rank: a signal that comes once rank 0 has printed its
    # set-up finds every rank ready for it (torchrun passes signals on to all of them).
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t_start = time.time()
    try:
        state = _main(args, rank, world, device, rank == 0, stop, t_start)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if world > 1 and dist.is_initialized():
            # Free the DDP wrapper (its reducer holds gloo work) while the group is alive: one
            # left to interpreter exit makes gloo abort now and then, failing a finished run.
            gc.collect()
            dist.destroy_process_group()
    if state["stopped_by"]:
        sys.exit(130 if state["stopped_by"] == "SIGINT" else 143)
    return state


def _main(args, rank, world, device, is_main, stop, t_start):
    threads_note = set_threads(args.threads)
    keep_freed_memory()
    dtype = pick_precision(args.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out, resume = resolve_output(args)
    created = not out.exists()
    if is_main:
        make_output_dir(out)
        remove_stale_temporaries(out)
        if threads_note:
            print(threads_note)
    try:
        return _train(args, rank, world, device, dtype, is_main, stop, t_start, out, resume)
    except BaseException:
        if is_main and created:
            remove_if_unused(out)
        raise


def remove_if_unused(out):
    """A run that failed before its first checkpoint leaves no folder behind (only its own
    config.json would be in it)."""
    if out.is_dir() and not any(out.glob("*.pt")):
        (out / "config.json").unlink(missing_ok=True)
        if not any(out.iterdir()):
            out.rmdir()


def _train(args, rank, world, device, dtype, is_main, stop, t_start, out, resume):
    if args.train_path and args.val_path is None and is_main:
        print("note: no --val_path; best.pt then follows the training loss")
    train, val, table, size = load_data(args, is_main)

    torch.manual_seed(args.seed)
    flips, model_table = None, table
    if args.label_flips:
        flips = CAMVID_FLIPS
        names, colours = extended_classes(table.names, [c or (0, 0, 0) for c in table.colours], flips)
        model_table = dataset.ClassTable(names=names, colours=colours, ignore_index=FLIP_VOID)
    try:
        config = vae_config(args, model_table.num_classes)
    except ValueError as e:
        raise DataError(f"model flags: {e}") from None
    raw_model = SegVAE(config).to(device, memory_format=memory_format(device))
    torch.manual_seed(rank_seed(args.seed, rank))  # the same weights everywhere, each rank its own latent noise
    model = raw_model
    if world > 1:
        ids = [device] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(raw_model, device_ids=ids)
    class_weights = loss_class_weights(args.class_weights, train.stats["pixels"], train.stats["image_pixels"])
    if class_weights is not None:
        if flips:
            # A class and its second version share one weight: unequal weights would bias the
            # probabilities the model learns for the flip (p_c' / p_c scaled by w_c' / w_c).
            class_weights = torch.cat([class_weights, class_weights[[f.source for f in flips]]])
        class_weights = class_weights.to(device)
    train = cache_on_device(train, device)
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(train) / world) / args.batch_size)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "best_miou": None, "history": [], "nonfinite": 0,
             "partial": new_partial(device), "stopped_by": None, "plan": None}
    ctx = {"device": device, "dtype": dtype, "table": table, "optimizer": optimizer, "scaler": scaler,
           "rank": rank, "world": world, "is_main": is_main, "size": size, "class_weights": class_weights,
           "stop": stop, "flips": flips, "model_table": model_table, "t_start": t_start}
    ckpt = load_resume(resume, config, args, world, device) if resume else None
    if ckpt is not None:
        state["plan"] = ckpt["plan"]
    elif args.time_budget:
        state["plan"] = budget_plan(model, raw_model, train, val, args, ctx, steps_per_epoch, t_start, out)
    else:
        state["plan"] = fixed_plan(args.epochs or DEFAULT_EPOCHS, steps_per_epoch, world, args)
    plan = state["plan"]
    ctx["total_steps"] = plan["total_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, plan["total_steps"], plan["warmup_steps"], plan.get("anchor")))
    ctx["scheduler"] = scheduler
    ctx["average"] = copy.deepcopy(raw_model).eval().requires_grad_(False) if args.ema or args.swa else None
    ctx["swa"] = {"n": ckpt.get("swa_steps", 0) if ckpt else 0} if args.swa else None
    if ckpt is not None:
        restore(ckpt, raw_model, optimizer, scheduler, scaler, state, device, rank, ctx["average"])
        if is_main and metrics_csv_rows(out / "metrics.csv") != len(state["history"]):
            # a kill between writing last.pt and metrics.csv left the table a row short
            write_metrics_csv(out / "metrics.csv", state["history"], table.names)
            plot_history(out / "loss_plot.png", state["history"])
        if state["epoch"] >= plan["epochs"]:
            if is_main:
                print(f"the run in {out} already finished its {plan['epochs']} epochs; nothing to train "
                      f"(its best.pt and last.pt are unchanged). Start a new run with another --output_dir")
            return state
        if is_main:
            print(f"resumed from {resume}: {state['epoch']} epochs done, step {state['step']}"
                  + (f", {state['batch_in_epoch']} batches into epoch {state['epoch'] + 1}"
                     if state["batch_in_epoch"] else ""))
    elif args.resume == "auto" and is_main:
        print(f"--resume auto: no last.pt in {out}, starting a new run")
    if is_main:
        print(f"model: {count_parameters(raw_model) / 1e6:.2f}M parameters, {config}")
        print(f"data: {len(train)} train / {len(val) if val else 0} val images at {size[0]}x{size[1]}, "
              f"{table.num_classes} classes, void = {table.ignore_index} (classes from {table.source}); "
              + (f"cache {Path(train.cache).parent}" if getattr(train, "cache", None) else
                 f"no cache: {args.workers} DataLoader worker(s) decode each batch" if not args.cache else
                 "in memory"))
        if flips:
            print(f"label flips: {', '.join(f'{table.names[f.source]} -> {f.name} ({f.probability})' for f in flips)}; "
                  f"the model has {model_table.num_classes} classes (void {FLIP_VOID}); validation merges each "
                  "second version into its class")
        print(f"device {device}, precision {precision_name(dtype)}, {world} process(es), "
              f"{torch.get_num_threads()} threads, output {out}")
        print(f"schedule: {plan['epochs']} epochs, {plan['total_steps']} steps"
              + (f", fitted to a {plan['time_budget']:g}-minute budget" if plan.get("time_budget") else ""))
        print("config: " + json.dumps(run_config(args)), flush=True)
        if ckpt is None:  # a resumed run has the same flags (load_resume checks); its config.json stays
            write_json(out / "config.json", run_config(args))
    # --time_budget: the minutes this run has spent, with what earlier processes of a resumed run
    # spent. A plan without that record (written before it was kept) stands as it is.
    if plan.get("time_budget") and "spent_s" in plan:
        spent_before = plan["spent_s"]
        ctx["budget_spent"] = lambda: spent_before + time.time() - t_start
    try:
        train_loop(model, raw_model, train, val, state, args, ctx, out)
    except StopRequested as e:
        # every rank is here (the stop is agreed in any_rank): last.pt keeps the training-loss sums
        # of all ranks, which rank 0 alone carries on after a resume
        state["partial"] = all_reduce_sums(dict(state["partial"]), world)
        if ctx.get("budget_spent"):  # the budget spent includes the part of an epoch done
            plan["spent_s"] = ctx["budget_spent"]()
        if is_main:
            save_checkpoint(checkpoint_dict(raw_model, state, args, ctx, full=True), out / "last.pt")
            where = (f"{state['batch_in_epoch']} of {steps_per_epoch} steps into epoch {state['epoch'] + 1}"
                     if state["batch_in_epoch"] else f"after epoch {state['epoch']}")
            print(f"stopped by {e} {where} (step {state['step']}); saved {out / 'last.pt'}; continue "
                  f"with --output_dir {out} --resume auto", file=sys.stderr)
        state["stopped_by"] = str(e)  # main() exits with 130 / 143 once the process group is gone
    except NonFiniteLoss as e:
        last = out / "last.pt"
        kept = (f"the last good checkpoint {last} (end of epoch {state['epoch']}) is kept"
                if is_main and state["epoch"] > 0 and last.exists() else "no checkpoint was written before it")
        raise DataError(f"stopped: {e}; {kept}. Lower --lr, use --precision fp32, or allow a few bad "
                        "steps with --skip_nonfinite N") from None
    if world > 1:  # proof of work from every rank; everything else is logged by rank 0 alone
        print(f"rank {rank} of {world}: trained to step {state['step']} on "
              f"{len(batch_order(len(train), 0, args.seed, rank, world))} of {len(train)} images per epoch")
        dist.barrier()  # wait for rank 0's last saves: no rank tears the group down under another
    return state


def train_loop(model, raw_model, train, val, state, args, ctx, out):
    is_main, device = ctx["is_main"], ctx["device"]
    plan = state["plan"]
    epochs = plan["epochs"]
    spent = ctx.get("budget_spent")  # --time_budget: the plan follows what whole epochs cost (`replan`)
    seconds, save_s = [], 0.0
    while state["epoch"] < epochs:
        t0 = time.time()
        whole = state["batch_in_epoch"] == 0  # not the rest of an epoch begun before a resume
        train_one_epoch(model, train, state, args, ctx)
        part = all_reduce_sums(dict(state["partial"]), ctx["world"])
        n = float(part["images"]) or math.nan  # nan, not 0, when --skip_nonfinite skipped every step
        row = {"epoch": state["epoch"] + 1, "step": state["step"], "train_loss": float(part["loss"]) / n,
               "train_kl": float(part["kl"]) / n, "lr": ctx["scheduler"].get_last_lr()[0]}
        if args.calibration:
            row["train_brier"] = float(part["brier"]) / n
        if ctx["world"] > 1:
            # BN running statistics drift apart per rank; evaluate every shard with rank 0's,
            # which are the ones the checkpoint holds.
            for b in eval_model(raw_model, ctx).buffers():
                dist.broadcast(b, 0)
        if val is not None:
            shard = range(ctx["rank"], len(val), ctx["world"])
            weights = ctx["class_weights"]
            if weights is not None and ctx.get("flips"):
                weights = weights[:ctx["table"].num_classes]  # validation scores the base classes
            sums = evaluate(eval_model(raw_model, ctx), val, num_classes=ctx["table"].num_classes,
                            ignore_index=ctx["table"].ignore_index, device=device, dtype=ctx["dtype"],
                            batch_size=args.eval_batch_size, loss_kind=args.loss, class_weights=weights,
                            indices=shard, flips=ctx.get("flips"), diversity_samples=args.val_samples, seed=args.seed)
            m = summarize(all_reduce_sums(sums, ctx["world"]))
            row.update({"val_loss": m["loss"], "val_kl": m["kl"], "val_kl_image": m["kl_image"],
                        "kl_active": m["kl_active"], "val_kl_channels": m["kl_channels"],
                        "val_diversity": None if math.isnan(m["diversity"]) else m["diversity"],
                        "val_ged": None if math.isnan(m["ged"]) else m["ged"],
                        "val_miou": m["miou"], "val_pixel_acc": m["pixel_acc"], "val_class_acc": m["class_acc"],
                        "active_latent": m["active_latent"], "val_iou": m["iou"]})
        row["seconds"] = time.time() - t0
        score = best_score(row, args.select)
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
        state["partial"] = new_partial(device)
        state["history"].append(row)
        improved = state["best_miou"] is None or score > state["best_miou"]
        if improved:
            state["best_miou"] = score
        if whole:
            seconds.append(row["seconds"])
        if spent:  # before last.pt stores the plan
            plan["spent_s"] = spent()
            if len(seconds) >= 2 and whole and state["epoch"] < epochs:
                epochs = replan(plan, state["epoch"], seconds, save_s, plan["spent_s"], args, ctx)
        t_save = time.time()
        if is_main:
            save_epoch(raw_model, state, args, ctx, out, improved)
            print(epoch_line(row, epochs))
            warning = collapse_warning(row, raw_model.config, state["step"] >= args.kl_warmup * ctx["total_steps"])
            if warning:
                print(warning, flush=True)
        save_s = time.time() - t_save  # every rank: each plans from its own clock, and rank 0's plan wins
        if any_rank(ctx, ctx["stop"]["signal"] is not None)[0] and state["epoch"] < epochs:
            raise StopRequested(ctx["stop"]["signal"] or "another rank's signal")  # came during validation


def save_epoch(raw_model, state, args, ctx, out, improved):
    light = checkpoint_dict(raw_model, state, args, ctx, full=False)
    save_checkpoint(light, out / f"epoch_{state['epoch']:03d}.pt")
    if improved:
        save_checkpoint(light, out / "best.pt")
    save_checkpoint(checkpoint_dict(raw_model, state, args, ctx, full=True), out / "last.pt")
    if args.keep_epochs >= 0:  # after last.pt is safe: drop epoch files beyond the most recent few
        for p in out.glob("epoch_*.pt"):
            if p.stem[6:].isdigit() and int(p.stem[6:]) <= state["epoch"] - args.keep_epochs:
                p.unlink()
    write_metrics_csv(out / "metrics.csv", state["history"], ctx["table"].names)
    plot_history(out / "loss_plot.png", state["history"])


def epoch_line(row, epochs):
    s = f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f}  kl {row['train_kl']:.4f}"
    if row.get("train_brier") is not None:
        s += f"  brier {row['train_brier']:.4f}"
    if "val_miou" in row:
        s += (f"  val loss {row['val_loss']:.4f}  mIoU {row['val_miou'] * 100:.1f}  "
              f"pixel acc {row['val_pixel_acc'] * 100:.1f}  active latent {row['active_latent']}  "
              f"KL(q||p) {row['val_kl_image']:.2f} nats/image")
        if row.get("val_diversity") is not None:
            s += f"  diversity {row['val_diversity']:.3f}"
        if row.get("val_ged") is not None:
            s += f"  D2_GED {row['val_ged']:.3f}"
    return s + f"  ({row['seconds']:.0f}s)"


def best_score(row, select):
    """What best.pt maximizes: the validation mIoU, or minus its samples' D2_GED (--select ged);
    without validation, minus the training loss."""
    if "val_miou" not in row:
        return -row["train_loss"]
    return -row["val_ged"] if select == "ged" else row["val_miou"]


def collapse_warning(row, config, warmed_up):
    """A line when, after the KL warm-up, the latent looks collapsed, else ''. Two signs: no
    latent channel with 0.01 nats of KL(q || p) (the posterior tells the decoder nothing the
    prior does not, so samples cannot follow the data's alternatives), and samples of one image
    that differ by under 0.01 in 1 - IoU (every sample the same segmentation)."""
    if not config.stochastic or not warmed_up or "kl_active" not in row:
        return ""
    what = []
    if row["kl_active"] == 0:
        what.append(f"no latent channel carries 0.01 nats of KL(q||p) ({row['val_kl_image']:.3f} nats per image), "
                    "so the samples do not follow the data's alternatives")
    if row.get("val_diversity") is not None and row["val_diversity"] < 0.01:
        what.append(f"samples of one image differ by 1 - IoU {row['val_diversity']:.4f}: one segmentation")
    if not what:
        return ""
    return (f"warning: posterior collapse at epoch {row['epoch']}: {'; and '.join(what)}. Try --free_bits 0.05 "
            "(a KL floor per latent element) or a longer --kl_warmup; with --prior learned, --head_convs 0 or 1")


# Flags that may differ when resuming: where and how fast the run goes, not what it trains.
RESUME_FREE = {"resume", "output_dir", "threads", "device", "eval_batch_size", "skip_nonfinite", "keep_epochs"}


def load_resume(path, config, args, world, device):
    """The checkpoint to resume from, refused in one line when it cannot continue this run as it
    was planned: weights only, another model, other flags, or another number of processes (each
    would silently bend the LR and KL schedules or change what is trained)."""
    ckpt = load_checkpoint(path, device)
    if "optimizer" not in ckpt:
        raise DataError(f"checkpoint {path} holds weights only (epoch_NNN.pt / best.pt); resume from "
                        "last.pt, which also holds the optimizer state")
    try:
        same = VAEConfig.from_dict(ckpt["model_config"]) == config  # configs saved before a field was added load
    except (ValueError, TypeError):
        same = False
    if not same:
        raise DataError(f"checkpoint {path} was trained with model {ckpt['model_config']}, but these "
                        f"arguments build {config.to_dict()}; use the same model and data flags to resume")
    then, now = {"select": "miou", **ckpt["run_config"]}, run_config(args)  # older runs chose by mIoU
    changed = [k for k in sorted(set(then) & set(now)) if k not in RESUME_FREE and then[k] != now[k]]
    if changed:
        diff = ", ".join(f"--{k} {_flag(then[k])} (now {_flag(now[k])})" for k in changed)
        raise DataError(f"checkpoint {path} was trained with {diff}; resume with the flags it was started "
                        "with, or start a new run in another --output_dir")
    if ckpt.get("world_size", 1) != world:
        n = ckpt.get("world_size", 1)
        how = "without torchrun" if n == 1 else f"with torchrun --nproc_per_node {n}"
        raise DataError(f"checkpoint {path} was trained by {n} process(es), this run has {world}; resume it "
                        f"{how} (the schedule counts steps per process)")
    if "plan" not in ckpt:
        raise DataError(f"checkpoint {path} has no schedule plan (written by an older version); start a new run")
    build_model(ckpt, path)  # checks the weights fit before anything is overwritten
    return ckpt


def _flag(v):
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)


def restore(ckpt, raw_model, optimizer, scheduler, scaler, state, device, rank, average=None):
    raw_model.load_state_dict(ckpt.get("train_model", ckpt["model"]))
    if average is not None:
        average.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    for k in ("epoch", "step", "best_miou", "history", "batch_in_epoch", "nonfinite"):
        state[k] = ckpt[k]
    # last.pt holds the sums of all ranks: rank 0 carries them on, the others start from zero
    state["partial"] = new_partial(device)  # a run saved before a sum was added has none of it
    state["partial"].update({k: torch.tensor(v if rank == 0 else 0.0, dtype=torch.float64, device=device)
                             for k, v in ckpt["partial"].items()})
    if rank == 0:
        torch.set_rng_state(ckpt["rng_cpu"].cpu())
        if ckpt["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng_cuda"]])
    else:  # only rank 0's RNG is saved; the others get fresh noise of their own
        torch.manual_seed(rank_seed(ckpt["run_config"]["seed"] + ckpt["step"], rank))


if __name__ == "__main__":
    try:
        main(get_args())
    except DataError as e:
        refuse(e)
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one during it
        print("interrupted; checkpoints already written are intact (continue with --resume auto)",
              file=sys.stderr)
        sys.exit(130)
