"""Every picture the project draws: the segmentation figure, uncertainty maps, the loss plot,
the confusion matrix, the reliability diagram and the examples grid, and the prediction files
(class-index palette PNG, colour mask). Functions take arrays (labels, probabilities,
histories), never a model, and write PNG files atomically.

matplotlib is used without pyplot (no GUI backend or global state; Agg renders on save).
"""

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from cli import write_atomic

VOID_TILE = ((235, 235, 235), (150, 150, 150))  # void: a light grey checkerboard, unlike any class colour


def new_figure(figsize):
    return Figure(figsize=figsize)


def save(fig, path, dpi=100):
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def colourize(labels, pal, ignore_index=None):
    """(H, W) int labels -> (H, W, 3) uint8 colours. Void (and any label outside the palette) is
    drawn as a small grey checkerboard, so it is never confused with a black class."""
    labels = np.asarray(labels)
    out = pal[np.clip(labels, 0, len(pal) - 1)]
    void = labels >= len(pal)
    if ignore_index is not None:
        void |= labels == ignore_index
    if void.any():
        yy, xx = np.indices(labels.shape)
        checker = ((yy // 4 + xx // 4) % 2).astype(bool)
        out[void & checker], out[void & ~checker] = VOID_TILE
    return out


def save_labels(path, labels, pal, ignore_index, void_colour=None):
    """(H, W) class indices as a palette PNG (PIL mode "P") that other tools, and load_mask, read
    back as the same indices: each pixel's value is its class index, void is `ignore_index` (255
    when that is above 255), and the palette holds the class colours, void's colour (the class
    table's, else the checkerboard's grey) at the void index."""
    labels = np.asarray(labels)
    void = ignore_index if 0 <= ignore_index <= 255 else 255
    values = np.where(labels == ignore_index, void, labels)
    if values.min() < 0 or values.max() > 255:
        raise ValueError(f"labels {values.min()}..{values.max()} do not fit a palette PNG (0..255)")
    colours = np.zeros((256, 3), np.uint8)
    colours[:len(pal)] = pal
    if void >= len(pal):
        colours[void] = void_colour if void_colour is not None else VOID_TILE[1]
    img = Image.fromarray(values.astype(np.uint8))  # mode L
    img.putpalette(colours.ravel().tolist())  # mode P, same pixel values
    write_atomic(path, lambda f: img.save(f, format="PNG"))


def save_rgb(path, rgb):
    """(H, W, 3) uint8 as a PNG, atomically."""
    img = Image.fromarray(np.ascontiguousarray(rgb))
    write_atomic(path, lambda f: img.save(f, format="PNG"))


def add_legend(fig, pal, names, void=False):
    """Class swatches (with a dark edge, so a white class shows) in as many columns as fit the
    figure's width, at its foot; `legend_height_in` says how much height to leave for it."""
    handles = [Patch(facecolor=pal[i] / 255, edgecolor="0.2", linewidth=0.5, label=n) for i, n in enumerate(names)]
    if void:
        handles.append(Patch(facecolor=np.array(VOID_TILE[1]) / 255, edgecolor="0.2", hatch="xx", linewidth=0.5,
                             label="void"))
    ncol = max(1, min(len(handles), int(fig.get_size_inches()[0] / 1.6)))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))


def legend_height_in(n_classes, width_in):
    """Inches of figure height that add_legend's rows take (one more swatch for void)."""
    ncol = max(1, min(n_classes + 1, int(width_in / 1.6)))
    return 0.22 * -(-(n_classes + 1) // ncol) + 0.25


def save_figure(path, image, pred, pal, table, truth=None, uncertainty=None, vmax=1.0, samples=1, title=""):
    """input | prediction overlaid | uncertainty (with a colour bar) | (ground truth | errors),
    with a legend of every class below."""
    img = image.permute(1, 2, 0).numpy() if hasattr(image, "permute") else np.asarray(image)
    panels = [("input", img), ("prediction", (0.45 * img + 0.55 * colourize(pred, pal)).astype(np.uint8))]
    if uncertainty is not None:
        label = f"entropy (nats), {samples} samples" if samples > 1 else "entropy (nats), mean latent"
        panels.append((label, uncertainty))
    if truth is not None:
        valid = truth != table.ignore_index
        err = colourize(np.full(truth.shape, len(pal)), pal)  # void where the truth is void
        err[valid & (pred == truth)] = (40, 160, 60)
        err[valid & (pred != truth)] = (220, 40, 40)
        panels += [("ground truth", colourize(truth, pal, table.ignore_index)),
                   ("errors (red), void grey", err)]
    width = 4.2 * len(panels)
    panel_h = 4.2 * img.shape[0] / img.shape[1]
    legend_h = legend_height_in(len(table.names), width)
    fig = new_figure((width, panel_h + 0.8 + legend_h))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (name, a) in zip(axes, panels):
        if a.ndim == 2:
            im = ax.imshow(a, cmap="magma", vmin=0, vmax=vmax)
            fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02)
        else:
            ax.imshow(a)
        ax.set_title(name)
        ax.axis("off")
    add_legend(fig, pal, table.names, void=truth is not None)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, legend_h / fig.get_size_inches()[1], 1, 1))
    save(fig, path)


def save_map(path, values, title, vmax=None):
    """A colour-mapped uncertainty map with a colour bar. vmax None: the scale ends at the map's
    own 99.5th percentile, so that a map of small values (the mutual information of a model with
    a quiet latent) still shows where they are; the colour bar gives the values."""
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
    save(fig, path)


def save_samples(path, image, samples, pal, table, annotations=()):
    """input | N sampled segmentations | (the annotations), in a grid of at most 6 columns."""
    img = image.permute(1, 2, 0).numpy() if hasattr(image, "permute") else np.asarray(image)
    panels = [("input", img)] + [(f"sample {i + 1}", colourize(s, pal, table.ignore_index))
                                 for i, s in enumerate(samples)]
    panels += [(f"annotation {i + 1}", colourize(a, pal, table.ignore_index)) for i, a in enumerate(annotations)]
    cols = min(6, len(panels))
    rows = -(-len(panels) // cols)
    width = 3.2 * cols
    cell_h = 3.2 * img.shape[0] / img.shape[1] + 0.4
    legend_h = legend_height_in(len(table.names), width)
    fig = new_figure((width, rows * cell_h + legend_h))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, (name, a) in zip(axes, panels):
        ax.imshow(a)
        ax.set_title(name, fontsize=9)
    add_legend(fig, pal, table.names, void=bool(len(annotations)))
    fig.tight_layout(rect=(0, legend_h / fig.get_size_inches()[1], 1, 1))
    save(fig, path)


def save_reliability(path, meters):
    """Reliability diagram (15 bins) of the prediction and accuracy versus coverage of each
    uncertainty map. meters: {map name: UncertaintyMeter}, all fed the same probabilities, so
    any one of them gives the reliability."""
    fig = new_figure((11, 4.5))
    axes = fig.subplots(1, 2)
    r = next(iter(meters.values())).reliability()
    axes[0].plot(r["confidence"], r["accuracy"], "o-", label="prediction")
    axes[0].plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    axes[0].set(xlabel="confidence", ylabel="accuracy", title="reliability diagram (15 bins)")
    for name, meter in meters.items():
        curve = meter.compute()["curve"]
        axes[1].plot(curve["coverage"], curve["accuracy"], label=name.replace("_", " "))
    axes[1].set(xlabel="coverage (most certain pixels kept)", ylabel="pixel accuracy",
                title="accuracy versus coverage")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save(fig, path)


def save_confusion(path, cm, names):
    """Row-normalized confusion matrix (rows: true class) as an image."""
    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = max(5.0, 1.5 + 0.4 * len(names))
    fig = new_figure((side, side))
    ax = fig.subplots()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    font = 7 if len(names) <= 20 else 5
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{norm[i, j] * 100:.0f}", ha="center", va="center", fontsize=font,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=font + 1)
    ax.set_yticks(range(len(names)), names, fontsize=font + 1)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (% of each true class)")
    fig.tight_layout()
    save(fig, path)


def save_examples(path, rows, pal, names):
    """A grid, one row per image: input | prediction | ground truth. rows: (name, image (H, W, 3)
    uint8, prediction (H, W), truth (H, W), ignore_index, miou)."""
    width = 12
    legend_h = legend_height_in(len(names), width)
    fig = new_figure((width, 3.2 * len(rows) + legend_h))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for row, (name, image, pred, truth, void, miou) in zip(axes, rows):
        panels = [(name, image), (f"prediction (mIoU {miou * 100:.1f})", colourize(pred, pal)),
                  ("ground truth (void grey)", colourize(truth, pal, void))]
        for ax, (title, a) in zip(row, panels):
            ax.imshow(a)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    add_legend(fig, pal, names, void=True)
    fig.tight_layout(rect=(0, legend_h / fig.get_size_inches()[1], 1, 1))
    save(fig, path, dpi=90)


def plot_history(path, history):
    """Training and validation loss, KL and validation mIoU (%) by epoch."""
    ep = [h["epoch"] for h in history]
    fig = new_figure((14, 3.8))
    axes = fig.subplots(1, 3)
    axes[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    if history[0].get("val_loss") is not None:
        axes[0].plot(ep, [h["val_loss"] for h in history], "o-", label="validation")
    axes[0].set_title("loss (train: incl. beta * KL)")
    axes[1].plot(ep, [h["train_kl"] for h in history], "o-", label="train")
    if history[0].get("val_kl") is not None:
        axes[1].plot(ep, [h["val_kl"] for h in history], "o-", label="validation")
    axes[1].set_title("KL (nats per pixel)")
    if history[0].get("val_miou") is not None:
        axes[2].plot(ep, [100 * h["val_miou"] for h in history], "o-", color="C2", label="validation")
    axes[2].set_title("validation mIoU (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:  # without --val_path the mIoU panel is empty; legend() would warn on stderr
            ax.legend()
    fig.tight_layout()
    save(fig, path, dpi=90)
