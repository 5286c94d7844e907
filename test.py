"""Apply a trained segmentation VAE: segment images, or evaluate a labelled split.

    python test.py --test_image_path IMAGE --model_path runs/x/best.pt [--mask_path MASK]
    python test.py --test_image_path "photos/*.png" --model_path runs/x/best.pt --samples 16
    python test.py --test_path ../shared/data/camvid/val --model_path runs/x/best.pt [--save_predictions]
    python test.py --test_path ../shared/data/camvid/val --model_path runs/x/best.pt --samples 8 --calibrate
    python test.py --test_image_path big.png --model_path runs/x/best.pt --resolution native

With --samples N a labelled split is also scored as a distribution of segmentations (sampling.py:
generalized energy distance for N = 1, 4, 8, 16, Hungarian-matched IoU, diversity, against every
annotator's mask; for a model trained with --label_flips, against the 32 known modes, with the
flipped classes' shares), and each image gets a grid of its N sampled segmentations.

The model is rebuilt from the checkpoint alone (checkpoint.py). Every output of a run comes from
one definition of the prediction (evaluate.Predictor: --samples, --flip, --resolution), and a
labelled split is read in one pass (two with --calibrate). The pictures are figures.py's.
"""

import glob
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ambiguity import flips_from_list, merge_flipped, merge_flipped_probs, mode_maps
from checkpoint import build_model, load_checkpoint, save_checkpoint, table_from_checkpoint
from cli import Parser, make_output_dir, refuse, write_atomic, write_csv, write_json
from dataset import IMAGE_EXTENSIONS, ClassTable, DataError, SegmentationDataset, load_image, load_mask, palette
from evaluate import RESOLUTIONS, Predictor, SplitScores, TemperatureFit, format_scores
from figures import (colourize, save_confusion, save_examples, save_figure, save_labels, save_map, save_reliability,
                     save_rgb, save_samples)
from metrics import confusion_matrix, scores, uncertainty_maps
from runtime import pick_device, pick_precision, precision_name, set_threads
from sampling import SAMPLINGS, SampleScores, label_samples, sample_counts

MAPS = {  # name -> (title, upper end of the colour scale from the class count; None: from the map)
    "entropy": ("predictive entropy (nats)", lambda c: math.log(c)),
    "mutual_info": ("mutual information: uncertainty from the latent (nats)", lambda c: None),
    "variance": ("sample variance of the winning class probability", lambda c: None),
}
CONFIG_FILE = "test_config.json"  # the run's flags and checkpoint, next to its outputs


# ---------------------------------------------------------------------------------------------
# inputs and output names


def expand_image_paths(spec):
    """A file, a folder of images, or a glob pattern -> sorted list of image paths."""
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


def output_names(paths):
    """One distinct output name per input path: its file stem, or, where inputs share a stem
    (a/x.png and b/x.png, or x.png and x.jpg), its path below the inputs' common folder with
    '__' for each '/' (a__x), and the extension too if that is not enough (x_png)."""
    full = [Path(os.path.abspath(p)) for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in full]))
    names = [p.stem for p in full]
    for spell in (lambda p: "__".join(p.relative_to(root).with_suffix("").parts),
                  lambda p: "__".join(p.relative_to(root).with_suffix("").parts) + "_" + p.suffix[1:]):
        count = Counter(names)
        names = [spell(p) if count[n] > 1 else n for p, n in zip(full, names)]
    count, seen = Counter(names), Counter()
    for i, n in enumerate(names):  # a last resort that real paths rarely reach
        if count[n] > 1:
            seen[n] += 1
            names[i] = f"{n}_{seen[n]}"
    renamed = [(str(p), n) for p, n in zip(paths, names) if n != Path(p).stem]
    if renamed:
        print(f"{len(renamed)} inputs share a file stem with another input; their outputs are named by "
              "path: " + ", ".join(f"{p} -> {n}" for p, n in renamed[:6]) + (" ..." if len(renamed) > 6 else ""))
    return names


def default_output_dir(model_path):
    """predictions/<checkpoint's folder>_<checkpoint's name>: a folder per checkpoint."""
    p = Path(os.path.abspath(model_path))
    return Path("predictions") / f"{p.parent.name}_{p.stem}"


def prepare_output(args, predictor):
    """Create the output folder and claim it for this checkpoint: a folder that holds another
    checkpoint's outputs is refused (they would be overwritten file by file). Writes the run's
    flags to test_config.json; returns the folder and the files already in it."""
    out = make_output_dir(args.output_dir)
    config_path = out / CONFIG_FILE
    checkpoint = os.path.abspath(args.model_path)
    if config_path.is_file():
        try:
            earlier = json.loads(config_path.read_text()).get("checkpoint")
        except (ValueError, AttributeError):
            earlier = None
        if earlier is not None and earlier != checkpoint:
            raise DataError(f"output folder {out} holds the outputs of checkpoint {earlier} ({config_path}); "
                            f"give another --output_dir for {args.model_path}, or remove the folder")
    existing = {p for p in out.iterdir() if p.is_file() and p.name != CONFIG_FILE}
    write_json(config_path, {**vars(args), "checkpoint": checkpoint, "settings": predictor.settings(),
                             "threads": torch.get_num_threads()})
    return out, existing


def report_replaced(written, existing, out):
    replaced = sorted(p.name for p in set(written) & existing)
    if replaced:
        print(f"replaced {len(replaced)} file(s) in {out} that an earlier run had written: "
              + ", ".join(replaced[:6]) + (" ..." if len(replaced) > 6 else ""))


# ---------------------------------------------------------------------------------------------
# calibration


def calibrated_path(model_path):
    """best.pt -> best.calibrated.pt beside it, so the checkpoint training wrote stays as it was."""
    p = Path(model_path)
    return p if p.stem.endswith(".calibrated") else p.with_name(f"{p.stem}.calibrated{p.suffix}")


def fitted_temperatures(ckpt):
    """{settings: entry} of the temperatures fitted for this checkpoint (Predictor.settings keys).
    Checkpoints calibrated before temperatures were stored per setting hold one temperature and
    the sample count it was fitted at, without flip, at the training resolution."""
    cal = ckpt.get("calibration") or {}
    if "samples" in cal and "temperature" in ckpt:
        return {f"samples={cal['samples']} flip=0 resolution=train": {**cal, "temperature": ckpt["temperature"]}}
    return cal


def temperature_for(ckpt, predictor):
    """The temperature fitted for the predictor's settings, 1.0 (and a note) where there is none."""
    fitted = fitted_temperatures(ckpt)
    key = predictor.settings()
    if key in fitted:
        return float(fitted[key]["temperature"])
    if fitted:
        print(f"note: no temperature fitted for {key} (fitted: {'; '.join(fitted)}); using 1.0. The "
              "temperature depends on these settings: run --calibrate with them to fit one")
    return 1.0


def calibrate(args, ckpt, predictor, split, table, flips=None):
    """Fit the temperature on the split (a pass of its own: every probability of the evaluation
    pass depends on it, and holding the split's logits until it is known would take S x C floats
    per pixel), store it under the predictor's settings in <checkpoint>.calibrated.pt. A flip
    model's tempered probabilities are scored on the base classes (each merged with its second
    version), as the evaluation scores them; with several annotators, against the first."""
    log_probs = (lambda t: merge_flipped(t, flips, table.num_classes, dim=2)) if flips else None
    fit = TemperatureFit(table.ignore_index, per_image=max(1, 400_000 // len(split)), seed=args.seed,
                         log_probs=log_probs)
    for _, _, truth, logits in predictions(predictor, split, args.batch_size, "fitting temperature"):
        truth = truth[0] if truth.dim() == 3 else truth
        fit.add(predictor.at_size(logits, truth.shape), truth)
    t, before, after = fit.fit()
    calibrated = {**ckpt, "calibration": {**fitted_temperatures(ckpt), predictor.settings(): {
        "temperature": t, "data": str(args.test_path), "images": len(split), "nll_before": before,
        "nll_after": after}}}
    calibrated.pop("temperature", None)
    path = calibrated_path(args.model_path)
    save_checkpoint(calibrated, path)
    print(f"calibrated on {args.test_path} ({predictor.settings()}): temperature {t:.3f} (pixel NLL "
          f"{before:.4f} -> {after:.4f}); stored in {path}, for later runs with these settings")
    return t


def label_tables(ckpt):
    """(the table the labels are read and scored with, the table of the model's outputs, the
    label flips or None). A model trained with --label_flips outputs 16 classes but is scored on
    the unflipped labels: its second versions merged into their classes (void as in the data)."""
    model_table = table_from_checkpoint(ckpt)
    if not ckpt.get("label_flips"):
        return model_table, model_table, None
    flips = flips_from_list(ckpt["label_flips"])
    base = len(model_table.names) - len(flips)
    table = ClassTable(names=model_table.names[:base], colours=model_table.colours[:base],
                       ignore_index=int(ckpt["base_ignore_index"]))
    return table, model_table, flips


def base_probs(probs, table, flips):
    """(S, C, H, W) probabilities of the model's classes -> of the labels' classes."""
    return merge_flipped_probs(probs, flips, table.num_classes) if flips else probs


# ---------------------------------------------------------------------------------------------
# one pass over images


def open_split(args, table):
    """The pairs of --test_path at their own size, their mask values read as training read them
    (decided from all the split's masks: 0/255 binary masks, JPEG snapping), labels outside a
    region of interest void; with several annotators, the first annotator's masks, or with
    --samples > 1 all of them ((K, H, W) labels: the distribution scores compare the samples
    with every annotator, the other scores with the first)."""
    split = SegmentationDataset(args.test_path, table, mask_suffix=args.mask_suffix, roi=bool(args.roi),
                                scan_limit=None, num_threads=torch.get_num_threads())
    for note in split.notes:
        print(note)
    if split.annotators > 1:
        print(f"note: {args.test_path} has {split.annotators} annotations per image; the scores are against the first"
              + (", the sample distribution's against all" if args.samples > 1 else ""))
        if args.samples == 1:
            split = split.annotation(0)
    return split


def predictions(predictor, split, batch_size, desc):
    """Decode each (image, mask) pair of a SegmentationDataset, run the network on `batch_size`
    images at a time and yield (index, image (3, H, W) uint8, truth (H, W), logits (S, F, C, h, w)),
    with a progress bar when stderr is a terminal."""
    predictor.restart()
    bar = tqdm(total=len(split), desc=desc, unit="image", disable=None, leave=False)
    try:
        for start in range(0, len(split), batch_size):
            batch = [split[i] for i in range(start, min(start + batch_size, len(split)))]  # size checked there
            for k, ((image, truth), logits) in enumerate(zip(batch, predictor.logits([b[0] for b in batch]))):
                yield start + k, image, truth, logits
                bar.update()
    finally:
        bar.close()


def image_scores(pred, truth, table):
    """Scores of one predicted label map against its truth (numpy or torch, same shape)."""
    return scores(confusion_matrix(torch.as_tensor(pred), torch.as_tensor(truth), table.num_classes,
                                   table.ignore_index))


def save_prediction(out_dir, name, pred, pal, table):
    """<name>_labels.png (class indices, palette PNG) and <name>_mask.png (colours)."""
    paths = [out_dir / f"{name}_labels.png", out_dir / f"{name}_mask.png"]
    save_labels(paths[0], pred, pal, table.ignore_index, table.void_colour)
    save_rgb(paths[1], colourize(pred, pal))
    return paths


def run_images(args, paths, ckpt, predictor, temperature):
    """Segment each image in `paths`: class-index and colour masks, figure and, with --samples > 1,
    uncertainty maps (PNG with colour bar and .npy) and the grid of the sampled segmentations
    per image, and uncertainty_ranking.csv."""
    if args.mask_path and len(paths) > 1:
        raise DataError(f"--mask_path {' '.join(args.mask_path)} names one image's mask(s) but --test_image_path "
                        f"{args.test_image_path} matches {len(paths)} images; give a single image")
    names = output_names(paths)
    table, model_table, flips = label_tables(ckpt)
    pal = palette(table)
    truth, annotations = None, []
    for mask_path in args.mask_path or []:  # one image: check it against its masks before anything is written
        annotations.append(load_mask(mask_path, table).numpy())
        image = load_image(paths[0])
        if annotations[-1].shape != tuple(image.shape[-2:]):
            raise DataError(f"mask {mask_path} is {annotations[-1].shape[1]}x{annotations[-1].shape[0]} but image "
                            f"{paths[0]} is {image.shape[2]}x{image.shape[1]}; give the image's own mask")
    if annotations:
        truth = annotations[0]
    out_dir, existing = prepare_output(args, predictor)
    predictor.restart()
    ranking, all_written = [], []
    for path, name in zip(paths, names):
        image = load_image(path)
        probs = predictor.probs(predictor.logits([image])[0], image.shape[-2:], temperature)  # (S, C, H, W)
        maps = {k: v[0].cpu().numpy() for k, v in uncertainty_maps(base_probs(probs, table, flips)[:, None]).items()}
        pred = maps["mean"].argmax(0).astype(np.uint8)
        title = ""
        if truth is not None:
            s = image_scores(pred, truth, table)
            title = f"this image: mIoU {s['miou'] * 100:.1f}, pixel accuracy {s['pixel_acc'] * 100:.1f}"
        written = save_prediction(out_dir, name, pred, pal, table) + [out_dir / f"{name}_figure.png"]
        save_figure(written[-1], image, pred, pal, table, truth, maps["entropy"], math.log(table.num_classes),
                    args.samples, title)
        if args.samples > 1:
            written.append(out_dir / f"{name}_samples.png")
            save_sample_grid(written[-1], args, image, probs, (table, model_table), flips, annotations)
            for key, (map_title, vmax) in MAPS.items():
                png, npy = out_dir / f"{name}_{key}.png", out_dir / f"{name}_{key}.npy"
                save_map(png, maps[key], f"{map_title}, {args.samples} samples", vmax(table.num_classes))
                write_atomic(npy, lambda f, a=maps[key]: np.save(f, a.astype(np.float32)))
                written += [png, npy]
        ranking.append((str(path), float(maps["entropy"].mean()), float(maps["mutual_info"].mean()),
                        float(maps["variance"].mean())))
        all_written += written
        print(f"{path}: " + ", ".join(str(p) for p in written))
    if args.samples > 1:
        ranking.sort(key=lambda r: -r[1])
        csv_path = out_dir / "uncertainty_ranking.csv"
        write_csv(csv_path, ["rank", "image", "mean_entropy", "mean_mutual_info", "mean_variance"],
                  [[i, r[0], f"{r[1]:.6f}", f"{r[2]:.6f}", f"{r[3]:.6f}"] for i, r in enumerate(ranking, 1)])
        all_written.append(csv_path)
        print(f"images ranked by mean predictive entropy (label these first): {csv_path}")
    report_replaced(all_written, existing, out_dir)


def save_sample_grid(path, args, image, probs, tables, flips, annotations):
    """The image's --samples segmentations, from its probabilities (S, C, H, W) of the model's
    classes (the argmax of each latent draw, or with --sampling pixel labels drawn per pixel
    from the mean softmax), with the annotations beside them (for a flip model the unflipped
    label, in the model's classes). tables: (the labels' table, the model's table)."""
    table, model_table = tables
    if flips:
        annotations = [mode_maps(torch.as_tensor(a).long(), flips, table.ignore_index,
                                 model_table.ignore_index)[0].numpy() for a in annotations]
    maps = label_samples(probs, args.sampling, torch.Generator().manual_seed(args.seed)).cpu().numpy()
    save_samples(path, image, list(maps), palette(model_table), model_table, annotations)


def print_sample_scores(r, sampling, flips):
    """The table of SampleScores.compute() that test.py prints."""
    against = "the 32 label-flip modes" if flips else "the annotation(s)"
    print(f"\nsamples as a distribution ({sampling} sampling, against {against}; d = 1 - IoU):")
    print(f"{'samples':>8}{'D2_GED':>9}{'matched IoU':>13}{'diversity':>11}")
    for n in r["ged"]:
        print(f"{n:>8}{r['ged'][n]:>9.4f}{r['matched_iou'][n]:>13.4f}{r['diversity'][n]:>11.4f}")
    if flips:
        print(f"{'flipped class':<16}{'true':>7}{'pixel share':>13}{'image share':>13}")
        for name, true, px, im in zip(r["flipped_classes"], r["true_share"], r["pixel_share"], r["image_share"]):
            print(f"{name:<16}{true:>7.3f}{px:>13.3f}{im:>13.3f}")
        print(f"mode total-variation distance (nearest mode per sample): {r['mode_tv']:.4f} (sampling noise alone, "
              f"an exact sampler with as many samples: {r['mode_tv_floor']:.4f})")
        if "oracle_ged" in r:
            print(f"oracle (the true flips of the model's own mean segmentation, exact): D2_GED {r['oracle_ged']:.4f}, "
                  f"mode TV {r['oracle_mode_tv']:.4f}")


def run_split(args, ckpt, predictor, temperature):
    """Evaluate a labelled split in one pass: mIoU, per-class IoU, pixel and class accuracy (void
    ignored, at each label's resolution), calibration and error detection, all of one prediction;
    with --samples > 1 or a flip model also the distribution scores of sampling.py; metrics.json,
    plots, examples and, with --save_predictions, per-image masks."""
    table, model_table, flips = label_tables(ckpt)
    pal = palette(table)
    split = open_split(args, table)
    names = output_names([s.image for s in split.samples])
    out_dir, existing = prepare_output(args, predictor)
    if args.calibrate:
        temperature = calibrate(args, ckpt, predictor, split, table, flips)
    t0 = time.time()
    n_ex = min(args.examples, len(split))
    picks = {round(i * (len(split) - 1) / max(n_ex - 1, 1)) for i in range(n_ex)}
    split_scores = SplitScores(table.num_classes, table.ignore_index, args.samples)
    sample_scores = (SampleScores(model_table.num_classes, model_table.ignore_index, sample_counts(args.samples),
                                  flips, table.ignore_index) if args.samples > 1 or flips else None)
    pixel_draws = torch.Generator().manual_seed(args.seed)
    examples, written = [], []
    for i, image, truth, logits in predictions(predictor, split, args.batch_size, "evaluating"):
        probs = predictor.probs(logits, truth.shape[-2:], temperature)  # (S, C, H, W), the model's classes
        maps = uncertainty_maps(base_probs(probs, table, flips)[:, None])
        if sample_scores is not None:  # against every annotator's mask, (K, H, W), or the one
            sample_scores.update(label_samples(probs, args.sampling, pixel_draws), truth,
                                 maps["mean"][0].argmax(0) if flips else None)
        truth = truth[0] if truth.dim() == 3 else truth  # the first annotator for the other scores
        split_scores.update(maps, truth)
        if args.save_predictions or i in picks:
            pred = maps["mean"][0].argmax(0).cpu().numpy().astype(np.uint8)
            if args.save_predictions:
                written += save_prediction(out_dir, names[i], pred, pal, table)
            if i in picks:
                examples.append((names[i], image.permute(1, 2, 0).numpy(), pred, truth.numpy(), table.ignore_index,
                                 image_scores(pred, truth, table)["miou"]))
    seconds = time.time() - t0
    metrics = split_scores.result()
    print(f"{args.test_path}: {len(split)} images, {predictor.settings()}, temperature {temperature:.3f}; "
          "scored at each label's resolution, void ignored")
    print(format_scores(metrics, table.names))
    cal = metrics["calibration"]
    print(f"\ncalibration: ECE {cal['ece']:.4f}, pixel NLL {cal['nll']:.4f}, Brier {cal['brier']:.4f}")
    print(f"{'uncertainty map':<16}{'AUROC':>8}{'mIoU@50%':>10}{'mIoU@75%':>10}{'mIoU@90%':>10}"
          "   (finding the wrong pixels; mIoU of the most certain pixels)")
    for name, u in metrics["uncertainty"].items():
        print(f"{name:<16}{u['auroc']:>8.4f}" + "".join(f"{c['miou'] * 100:>10.1f}" for c in u["coverage"]))
    if sample_scores is not None:
        metrics["samples_scores"] = sample_scores.compute()
        print_sample_scores(metrics["samples_scores"], args.sampling, flips)
    metrics.update({"classes": table.names, "confusion_matrix": split_scores.cm.tolist(), "images": len(split),
                    "data": str(args.test_path), "checkpoint": str(args.model_path), "samples": args.samples,
                    "flip": args.flip, "scales": args.scales, "resolution": args.resolution, "seed": args.seed,
                    "sampling": args.sampling, "temperature": temperature})
    files = [out_dir / n for n in ("metrics.json", "confusion_matrix.png", "reliability.png")]
    write_json(files[0], metrics)
    save_confusion(files[1], metrics["confusion_matrix"], table.names)
    save_reliability(files[2], split_scores.meters)
    if examples:
        files.append(out_dir / "examples.png")
        save_examples(files[-1], examples, pal, table.names)
    report_replaced(written + files, existing, out_dir)
    masks = f", and {len(written) // 2} images' _labels.png and _mask.png" if written else ""
    print(f"evaluated {len(split)} images in {seconds:.1f} s ({seconds / len(split):.2f} s per image); wrote "
          + ", ".join(map(str, files)) + masks)
    return metrics


# ---------------------------------------------------------------------------------------------
# command line


def get_args(argv=None):
    p = Parser(description="Segment images or evaluate a labelled split with a trained segmentation VAE.")
    p.add_argument("--model_path", help="checkpoint written by train.py (best.pt, last.pt, ...); required")
    p.add_argument("--test_image_path", help="an image, a folder of images, or a glob pattern to segment")
    p.add_argument("--mask_path", nargs="+", help="ground-truth mask of --test_image_path: adds it, an error "
                   "map and this image's IoU to the figure; several masks (annotators) go beside the sample grid")
    p.add_argument("--test_path", help="a labelled split to evaluate (same layouts as training data)")
    p.add_argument("--mask_suffix", help="with --test_path: use the masks named <image name><SUFFIX> where a "
                   "folder holds several per image (as train.py --mask_suffix)")
    p.add_argument("--roi", type=int, default=1, choices=[0, 1], help="with --test_path: labels outside "
                   "region-of-interest masks are void (as train.py --roi)")
    p.add_argument("--output_dir", help="where outputs go (default: predictions/<checkpoint's folder>_<checkpoint "
                   "name>, a folder per checkpoint)")
    p.add_argument("--save_predictions", action="store_true", help="with --test_path: also write each image's "
                   "<name>_labels.png (class indices) and <name>_mask.png (colours)")
    p.add_argument("--batch_size", type=int, default=8, help="images (or tiles) per forward pass")
    p.add_argument("--flip", action="store_true", help="average each sample's probabilities with those of the "
                   "mirrored image (test-time flip)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                   help="test-time multi-scale: also see each image resized by these factors (relative to "
                   "--resolution's size) and average the probabilities, e.g. 0.75 1 1.25 (default: 1)")
    p.add_argument("--samples", type=int, default=1, help="latent samples per image; 1 decodes the mean "
                   "latent, more adds uncertainty maps")
    p.add_argument("--resolution", default="train", choices=RESOLUTIONS, help="train: the network sees each "
                   "image resized to the checkpoint's training size, the scale it learned (default); native: "
                   "at the image's own size, padded to the network stride, in overlapping tiles when larger "
                   "than --tile_size (for models trained on full-resolution crops)")
    p.add_argument("--tile_size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"),
                   help="with --resolution native: the tile size for larger images (default: 512 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for latent sampling")
    p.add_argument("--sampling", default="latent", choices=SAMPLINGS,
                   help="how --samples segmentations are drawn for the sample grid and the distribution scores: "
                   "latent (decode each latent draw) or pixel (labels drawn per pixel from the mean softmax: "
                   "the samples of a deterministic network)")
    p.add_argument("--examples", type=int, default=4, help="with --test_path: images in examples.png, a grid "
                   "of input | prediction | ground truth (0: none)")
    p.add_argument("--calibrate", action="store_true", help="fit a temperature on --test_path (use the val "
                   "split) for these --samples/--flip/--resolution and store it in <checkpoint>.calibrated.pt "
                   "beside the checkpoint; runs with that file and these settings use it")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype (default: auto = bf16 where the hardware has it)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = p.parse_args(argv)
    if not args.model_path:
        raise DataError("give --model_path: a checkpoint written by train.py (e.g. runs/<time>/best.pt)")
    if not args.test_image_path and not args.test_path:
        raise DataError("give --test_image_path (segment images) or --test_path (evaluate a labelled split)")
    if args.examples < 0:
        raise DataError(f"--examples {args.examples} must be 0 or more")
    if args.samples < 1 or args.batch_size < 1:
        raise DataError(f"--samples {args.samples} and --batch_size {args.batch_size} must be at least 1")
    if min(args.scales) <= 0 or max(args.scales) > 4:
        raise DataError(f"--scales {' '.join(f'{s:g}' for s in args.scales)}: each must be above 0 and at most 4 "
                        "(e.g. --scales 0.75 1 1.25)")
    if min(args.tile_size) < 1 or args.threads < 0:
        raise DataError(f"--tile_size {args.tile_size[0]} {args.tile_size[1]} must be positive and --threads "
                        f"{args.threads} 0 or more")
    if args.calibrate and not args.test_path:
        raise DataError("--calibrate needs --test_path: the labelled split (val) to fit the temperature on")
    if args.save_predictions and not args.test_path:
        raise DataError("--save_predictions is for --test_path; --test_image_path always writes each image's masks")
    if args.output_dir is None:
        args.output_dir = str(default_output_dir(args.model_path))
    return args


def main(args):
    # a path that matches nothing fails first, before the model loads
    paths = expand_image_paths(args.test_image_path) if args.test_image_path else []
    note = set_threads(args.threads)
    if note:
        print(note)
    device = pick_device(args.device)
    dtype = pick_precision(args.precision, device)
    ckpt = load_checkpoint(args.model_path, device)
    model = build_model(ckpt, args.model_path, device)
    predictor = Predictor(model, device, dtype, tuple(ckpt["image_size"]), args.samples, args.flip,
                          args.resolution, tuple(args.tile_size), args.seed, args.batch_size, tuple(args.scales))
    temperature = temperature_for(ckpt, predictor)
    size = "x".join(map(str, ckpt["image_size"]))
    print(f"{args.model_path}: epoch {ckpt.get('epoch', '?')}, trained at {size}; {predictor.settings()}, "
          f"temperature {temperature:.3f}; {device.type}, {precision_name(dtype)}, "
          f"{torch.get_num_threads()} threads; output {args.output_dir}")
    result = None
    if args.test_image_path:
        run_images(args, paths, ckpt, predictor, temperature)
    if args.test_path:
        result = run_split(args, ckpt, predictor, temperature)
    return result


if __name__ == "__main__":
    try:
        main(get_args())
    except DataError as e:
        refuse(e)
    except KeyboardInterrupt:
        print("\ninterrupted: finished outputs stay as written; metrics.json is written only at the end of a "
              "pass", file=sys.stderr)
        sys.exit(130)
