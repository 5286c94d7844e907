"""Apply a trained segmentation VAE: segment images, or evaluate a labelled split.

    python test.py --test_image_path IMAGE --model_path runs/x/best.pt [--mask_path MASK]
    python test.py --test_image_path "photos/*.png" --model_path runs/x/best.pt --samples 16
    python test.py --test_path ../shared/data/camvid/val --model_path runs/x/best.pt

The model is rebuilt from the checkpoint alone (checkpoint.py); evaluation is evaluate.py's and
the pictures are figures.py's.
"""

import glob
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from checkpoint import build_model, load_checkpoint, save_checkpoint, table_from_checkpoint
from cli import Parser, make_output_dir, refuse, write_csv, write_json
from dataset import IMAGE_EXTENSIONS, DataError, load_image, load_mask, load_split, palette
from evaluate import (evaluate, evaluate_uncertainty, fit_temperature, format_scores, forward_probs, segment_image,
                      summarize)
from figures import colourize, save_confusion, save_examples, save_figure, save_map, save_reliability
from metrics import confusion_matrix, scores, uncertainty_maps
from runtime import pick_device, pick_precision


MAPS = {  # name -> (title, upper end of the colour scale from the class count; None: from the map)
    "entropy": ("predictive entropy (nats)", lambda c: math.log(c)),
    "mutual_info": ("mutual information: uncertainty from the latent (nats)", lambda c: None),
    "variance": ("sample variance of the winning class probability", lambda c: None),
}


def run_images(args, ckpt, model, device, dtype):
    """Segment each image: colour mask, figure and, with --samples > 1, uncertainty maps
    (PNG with colour bar and .npy) per image, and uncertainty_ranking.csv over the images."""
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
        title = ""
        if truth is not None:
            s = image_scores(pred, truth, table)
            title = f"this image: mIoU {s['miou'] * 100:.1f}, pixel accuracy {s['pixel_acc'] * 100:.1f}"
        written = [out_dir / f"{path.stem}_mask.png", out_dir / f"{path.stem}_figure.png"]
        Image.fromarray(colourize(pred, pal)).save(written[0])
        save_figure(written[1], image, pred, pal, table, truth, maps["entropy"], math.log(table.num_classes),
                    args.samples, title)
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
        write_csv(out_dir / "uncertainty_ranking.csv", ["rank", "image", "mean_entropy", "mean_mutual_info",
                                                        "mean_variance"],
                  [[i, r[0], f"{r[1]:.6f}", f"{r[2]:.6f}", f"{r[3]:.6f}"] for i, r in enumerate(ranking, 1)])
        print(f"images ranked by mean predictive entropy (label these first): {out_dir / 'uncertainty_ranking.csv'}")


def image_scores(pred, truth, table):
    """Scores of one predicted label map against its truth (numpy or torch, same shape)."""
    return scores(confusion_matrix(torch.as_tensor(pred), torch.as_tensor(truth), table.num_classes,
                                   table.ignore_index))


def example_rows(model, split, table, ckpt, device, dtype, n, flip=False):
    """`n` images spread evenly over the split, each as (name, image, prediction, truth, void,
    mIoU) at the label's resolution, for figures.save_examples."""
    picks = sorted({round(i * (len(split) - 1) / max(n - 1, 1)) for i in range(n)})
    temperature = float(ckpt.get("temperature", 1.0))
    rows = []
    for i in picks:
        truth = split.label_masks[i]
        probs = forward_probs(model, split.images[i:i + 1], device, dtype, temperature=temperature, flip=flip)[0]
        pred = F.interpolate(probs.cpu(), size=truth.shape, mode="bilinear", align_corners=False).argmax(1)[0]
        image = F.interpolate(split.images[i:i + 1].float(), size=truth.shape, mode="bilinear",
                              align_corners=False)[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        rows.append((split.names[i], image, pred.numpy(), truth.numpy(), table.ignore_index,
                     image_scores(pred, truth, table)["miou"]))
    return rows


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


def run_split(args, ckpt, model, device, dtype):
    """Evaluate a labelled split: mIoU, per-class IoU, pixel and class accuracy (void ignored,
    at each label's resolution), calibration and error detection; metrics.json and plots."""
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
        save_examples(out_dir / "examples.png", example_rows(model, split, table, ckpt, device, dtype, args.examples,
                                                             args.flip), palette(table), table.names)
        written.append(out_dir / "examples.png")
    write_json(out_dir / "metrics.json", metrics)
    print("wrote " + ", ".join(map(str, written)))
    return metrics


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
        refuse(e)
