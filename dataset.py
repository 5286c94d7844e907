"""Data in: pairing images with masks, decoding, class tables, augmentation, the demo set.

Three layouts are accepted for a split (the same for --train_path, --val_path, --test_path):
  1. a folder with `images/` and `masks/` subfolders;
  2. a CamVid/SegNet-style folder `X` whose masks are in the sibling folder `Xannot`;
  3. a text file of `image_path mask_path` lines (SegNet's train.txt), relative to the file.
Images and masks pair by file stem. A split is decoded once and kept in memory as uint8
tensors, so epochs after the first do no PNG decoding.

Write the built-in demo set to disk (images/ + masks/ layout, with its class table):
    python dataset.py --write_demo demo_data
"""

import argparse
import csv
import math
import sys
import warnings

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif"}
VOID_NAMES = {"unlabelled", "unlabeled", "void", "ignore"}
TABLE_NAMES = ("classes.csv", "class_dict.csv")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PIL warns (UserWarning) about damaged metadata in files it then decodes or rejects; either way
# _open reports what matters, and the warnings would only add stray lines to stderr. A global
# filter, because warnings.catch_warnings is not safe in load_split's decoding threads.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


class DataError(ValueError):
    """An input the user supplied cannot be used; the message says which and how to fix it."""


# ---------------------------------------------------------------------------------------------
# class tables


@dataclass
class ClassTable:
    names: list  # one name per trained class, index order
    colours: list  # (r, g, b) per class, or None where the table gave none
    ignore_index: int  # the void label: excluded from losses and metrics
    void_colour: tuple = None  # RGB colour of void in colour masks, if the table names one

    @property
    def num_classes(self):
        return len(self.names)


def read_class_table(path, ignore_index=None):
    """Read `index,name,r,g,b` or `name,r,g,b` (class_dict.csv). A row named Unlabelled/void
    becomes the void label unless `ignore_index` is given; every other row is a class."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"class table {path} cannot be read ({e}); give a CSV with rows "
                        "index,name,r,g,b or name,r,g,b") from None
    if rows and not _is_int(rows[0][-1]):
        rows = rows[1:]  # header
    if not rows:
        raise DataError(f"class table {path} has no rows; give one row per class: index,name,r,g,b")
    entries = []
    for line_no, row in enumerate(rows, 1):
        row = [c.strip() for c in row]
        if len(row) == 5 and all(_is_int(c) for c in (row[0], *row[2:])):
            index, name, rgb = int(row[0]), row[1], tuple(int(c) for c in row[2:])
        elif len(row) == 4 and all(_is_int(c) for c in row[1:]):
            index, name, rgb = len(entries), row[0], tuple(int(c) for c in row[1:])
        else:
            raise DataError(f"class table {path} row {line_no} {','.join(row)!r} is malformed; "
                            "expected index,name,r,g,b or name,r,g,b with integer fields")
        if not all(0 <= c <= 255 for c in rgb):
            raise DataError(f"class table {path} row {line_no} has colour {rgb} outside 0-255")
        entries.append((index, name, rgb))
    void = [e for e in entries if e[1].lower() in VOID_NAMES]
    classes = sorted(e for e in entries if e not in void)
    if not classes:
        raise DataError(f"class table {path} has only void rows ({', '.join(e[1] for e in void)}); "
                        "add one row per class: index,name,r,g,b")
    if [e[0] for e in classes] != list(range(len(classes))):
        raise DataError(f"class table {path} indices {[e[0] for e in classes]} are not "
                        f"0..{len(classes) - 1}; number the classes from 0 without gaps")
    if ignore_index is None:
        ignore_index = void[0][0] if void else 255
    return ClassTable(names=[e[1] for e in classes], colours=[e[2] for e in classes],
                      ignore_index=ignore_index, void_colour=void[0][2] if void else None)


def find_class_table(split_path):
    """A classes.csv / class_dict.csv in the data folder or its parent, or None."""
    split_path = Path(split_path)
    folder = split_path if split_path.is_dir() else split_path.parent
    for d in (folder, folder.parent):
        for name in TABLE_NAMES:
            if (d / name).is_file():
                return d / name
    return None


def make_class_table(classes_path, data_path, num_classes=None, ignore_index=None):
    """The class table from --classes, else next to the data, else generic names."""
    if classes_path and not Path(classes_path).is_file():
        raise DataError(f"class table {classes_path} does not exist; give --classes a CSV file with rows "
                        "index,name,r,g,b or name,r,g,b")
    if data_path:
        check_exists(data_path)
    path = classes_path or (find_class_table(data_path) if data_path else None)
    if path:
        table = read_class_table(path, ignore_index)
        if num_classes is not None and num_classes != table.num_classes:
            raise DataError(f"--num_classes {num_classes} disagrees with class table {path}, "
                            f"which has {table.num_classes} classes; drop one of the two")
        return table
    if num_classes is None:
        raise DataError(f"no class table (classes.csv or class_dict.csv) found next to {data_path}; "
                        "give --classes TABLE.csv or --num_classes N")
    if num_classes < 1:
        raise DataError(f"--num_classes {num_classes} must be at least 1")
    return ClassTable(names=[f"class_{i}" for i in range(num_classes)], colours=[None] * num_classes,
                      ignore_index=255 if ignore_index is None else ignore_index)


def palette(table):
    """(num_classes, 3) uint8 colours: the table's, or a fixed spread of hues."""
    out = []
    for i, c in enumerate(table.colours):
        if c is None:
            h = (i * 0.618034) % 1.0  # golden-ratio hue steps keep neighbours apart
            c = tuple(int(255 * v) for v in _hsv_to_rgb(h, 0.75, 0.95))
        out.append(c)
    return np.array(out, dtype=np.uint8).reshape(-1, 3)


def _hsv_to_rgb(h, s, v):
    i, f = int(h * 6) % 6, (h * 6) % 1
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def _is_int(s):
    try:
        int(s)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# pairing


def _image_files(folder, what):
    """{stem: path} of the image files in `folder` (hidden files skipped). Anything else is
    refused by name: a stray notes.txt would otherwise surface as an unpaired image, and two
    files with one stem (0001.png, 0001.jpg) would pair ambiguously."""
    files = {}
    for p in sorted(Path(folder).iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"{what} folder {folder} holds {p.name}, which is not an image (extension "
                            f"{p.suffix or 'none'!r}; expected one of {' '.join(sorted(IMAGE_EXTENSIONS))}); "
                            "move it out of the folder")
        if p.stem in files:
            raise DataError(f"{what} folder {folder} holds both {files[p.stem].name} and {p.name}; "
                            "images and masks pair by file name without extension, so keep only one")
        files[p.stem] = p
    return files


def check_exists(path):
    """Refuse a data path that is not there, before anything is looked up next to it."""
    if not Path(path).exists():
        raise DataError(f"data path {path} does not exist; give a folder with images/ and masks/, "
                        "a folder X with a sibling Xannot/, or a list file of 'image mask' lines")


def find_pairs(path):
    """[(image_path, mask_path)] for a split in any of the three layouts, sorted by stem."""
    path = Path(path)
    check_exists(path)
    if path.is_file():
        return _pairs_from_list(path)
    if (path / "images").is_dir() and (path / "masks").is_dir():
        image_dir, mask_dir = path / "images", path / "masks"
    elif path.with_name(path.name + "annot").is_dir():
        image_dir, mask_dir = path, path.with_name(path.name + "annot")
    else:
        raise DataError(f"data folder {path} has neither images/ + masks/ subfolders nor a sibling "
                        f"{path.name}annot/ folder; arrange it in one of those layouts")
    images, masks = _image_files(image_dir, "image"), _image_files(mask_dir, "mask")
    if not images and not masks:
        raise DataError(f"data folder {path} is empty: {image_dir} and {mask_dir} hold no files")
    lonely_images = sorted(set(images) - set(masks))
    lonely_masks = sorted(set(masks) - set(images))
    if lonely_images or lonely_masks:
        parts = []
        if lonely_images:
            parts.append(f"{len(lonely_images)} image(s) in {image_dir} without a mask "
                         f"(e.g. {', '.join(images[s].name for s in lonely_images[:3])})")
        if lonely_masks:
            parts.append(f"{len(lonely_masks)} mask(s) in {mask_dir} without an image "
                         f"(e.g. {', '.join(masks[s].name for s in lonely_masks[:3])})")
        raise DataError("unpaired files: " + "; ".join(parts) + "; images and masks pair by file "
                        "name without extension")
    return [(images[s], masks[s]) for s in sorted(images)]


def _pairs_from_list(list_path):
    try:
        lines = list_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"list file {list_path} cannot be read as text ({e}); give a text file of "
                        "'image_path mask_path' lines") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or line.lstrip().startswith("#"):
            continue
        if len(fields) != 2:
            raise DataError(f"list file {list_path} line {n} has {len(fields)} fields; "
                            "each line must be 'image_path mask_path'")
        pair = tuple(p if p.is_absolute() else list_path.parent / p for p in map(Path, fields))
        for p in pair:
            if not p.is_file():
                raise DataError(f"list file {list_path} line {n} names {p}, which does not exist")
        pairs.append(pair)
    if not pairs:
        raise DataError(f"list file {list_path} lists no 'image_path mask_path' pairs")
    return pairs


def sequence_of(path):
    """The video sequence of a frame: its file name up to the first underscore (CamVid:
    0016E5_07959.png -> 0016E5, Seq05VD_f00000.png -> Seq05VD)."""
    return Path(path).stem.split("_", 1)[0]


def write_sequence_split(paths, holdout, out_dir):
    """Pool the pairs of the splits in `paths` and write two list files to `out_dir`: train.txt
    with every frame of the other sequences and holdout.txt with every frame of the sequences in
    `holdout`. Validating on whole unseen sequences predicts held-out scenes; frames of one
    sequence in both train and val (as in CamVid's val) do not. Returns the two paths and counts."""
    pairs = [pair for path in paths for pair in find_pairs(path)]
    seqs = sorted({sequence_of(i) for i, _ in pairs})
    unknown = sorted(set(holdout) - set(seqs))
    if unknown:
        raise DataError(f"--holdout {' '.join(unknown)} names no sequence of {' '.join(map(str, paths))}; "
                        f"its sequences are {' '.join(seqs)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = {"train": [p for p in pairs if sequence_of(p[0]) not in holdout],
             "holdout": [p for p in pairs if sequence_of(p[0]) in holdout]}
    if not parts["train"]:
        raise DataError(f"--holdout {' '.join(holdout)} holds out every sequence; keep at least one to train on")
    table = find_class_table(paths[0])
    if table:  # the list files' folder then finds it, as the split folders did
        (out_dir / table.name).write_bytes(table.read_bytes())
    written = {}
    for name, ps in parts.items():
        (out_dir / f"{name}.txt").write_text("".join(f"{Path(i).resolve()} {Path(m).resolve()}\n" for i, m in ps))
        written[name] = (out_dir / f"{name}.txt", len(ps))
    return written


# ---------------------------------------------------------------------------------------------
# decoding


def _open(path, what):
    """Decode a whole image file, upright (EXIF orientation applied), with the file closed.
    Any exception from the decoder means the file is damaged or not an image: PIL raises a
    dozen types on hostile bytes (OSError, SyntaxError, struct.error, IndexError, ...), so all
    of them become one DataError."""
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except Exception as e:  # any decoder failure means a bad file, see the docstring
        detail = str(e).splitlines()[0][:160] if str(e) else "no detail"
        raise DataError(f"{what} {path} is not a readable image ({type(e).__name__}: {detail}); "
                        "remove it or replace it with a valid file") from None


def load_image(path):
    """(3, H, W) uint8 RGB. Grayscale, RGBA, palette, 16-bit and EXIF-rotated files all work."""
    img = _open(path, "image")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    a = np.asarray(img.convert("RGB"))
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


def load_mask(path, table):
    """(H, W) uint8 label indices. Index masks (mode L/P/16-bit) are read as they are; RGB
    masks are mapped through the class table's colours."""
    img = _open(path, "mask")
    if img.mode in ("RGB", "RGBA"):
        a = np.asarray(img.convert("RGB")).astype(np.int32)
        code = (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]
        lut = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(table.colours) if r is not None}
        if table.void_colour is not None:
            r, g, b = table.void_colour
            lut[(r << 16) | (g << 8) | b] = table.ignore_index
        if not lut:
            raise DataError(f"mask {path} is an RGB colour mask but the class table has no colours; "
                            "give --classes with index,name,r,g,b rows")
        keys = np.array(sorted(lut))
        vals = np.array([lut[k] for k in keys])
        pos = np.clip(np.searchsorted(keys, code), 0, len(keys) - 1)
        bad = keys[pos] != code
        if bad.any():
            c = int(code[bad][0])
            raise DataError(f"mask {path} has colour {(c >> 16, (c >> 8) & 255, c & 255)} that is not "
                            "in the class table; add it to the table (or as the Unlabelled row)")
        labels = vals[pos]
    elif img.mode in ("L", "P", "I;16", "I;16B", "I;16L", "I", "1"):
        labels = np.asarray(img).astype(np.int64)
    else:
        raise DataError(f"mask {path} has image mode {img.mode}; masks must be single-channel index "
                        "PNGs (mode L or P) or RGB colour masks")
    valid = labels != table.ignore_index
    if valid.any() and (labels[valid].max() >= table.num_classes or labels[valid].min() < 0):
        bad = int(labels[valid & ((labels >= table.num_classes) | (labels < 0))][0])
        raise DataError(f"mask {path} has label {bad} but the class table has {table.num_classes} "
                        f"classes (0-{table.num_classes - 1}) and void is {table.ignore_index}; fix the "
                        "mask, or give --classes / --num_classes / --ignore_index to match it")
    if not 0 <= table.ignore_index <= 255:
        labels = np.where(valid, labels, 255)  # masks are kept as uint8
    return torch.from_numpy(labels.astype(np.uint8))


def resize_image(img, size):
    """(3, h, w) uint8 -> (3, H, W) uint8, bilinear with antialiasing."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    out = F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False,
                        antialias=True)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def resize_mask(mask, size):
    """(h, w) uint8 -> (H, W) uint8, nearest neighbour so labels are never blended."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(torch.uint8)


@dataclass
class Split:
    """A decoded split. images (N, 3, H, W) and masks (N, H, W) are uint8 at the training size;
    label_masks holds each mask at its own resolution, for metrics that compare with papers."""
    images: torch.Tensor
    masks: torch.Tensor
    label_masks: list
    names: list

    def __len__(self):
        return len(self.names)


def load_split(path, table, image_size, num_threads=2, progress=None):
    """Decode every pair of a split once, check it, and resize it to `image_size` (H, W)."""
    pairs = find_pairs(path)

    def one(pair):
        image, mask = load_image(pair[0]), load_mask(pair[1], table)
        if image.shape[-2:] != mask.shape:
            raise DataError(f"image {pair[0]} is {image.shape[2]}x{image.shape[1]} but its mask "
                            f"{pair[1]} is {mask.shape[1]}x{mask.shape[0]}; they must be the same size")
        return resize_image(image, image_size), resize_mask(mask, image_size), mask

    with ThreadPoolExecutor(max(1, num_threads)) as pool:  # PIL decoding releases the GIL
        items = pool.map(one, pairs)
        if progress:
            items = progress(items, total=len(pairs), desc=f"decoding {Path(path).name}")
        items = list(items)
    return Split(images=torch.stack([i[0] for i in items]), masks=torch.stack([i[1] for i in items]),
                 label_masks=[i[2] for i in items], names=[p[0].stem for p in pairs])


def normalize(images):
    """uint8 (B, 3, H, W) -> float, ImageNet mean/std (any fixed affine map works; this one is
    what users of pretrained encoders expect). One fused multiply-add, no uint8 -> float copy."""
    scale = 1 / (torch.tensor(IMAGENET_STD, device=images.device) * 255)
    shift = -torch.tensor(IMAGENET_MEAN, device=images.device) / torch.tensor(IMAGENET_STD, device=images.device)
    return torch.addcmul(shift.view(1, 3, 1, 1), images, scale.view(1, 3, 1, 1))


# ---------------------------------------------------------------------------------------------
# augmentation


def augment(images, masks, generator, ignore_index, scale=(0.75, 1.5), flip=True, jitter=0.2, out_size=None,
            rotate=0.0):
    """Random zoom, shift and horizontal flip applied jointly to a batch of images (bilinear)
    and masks (nearest: labels are never interpolated), plus brightness/contrast/saturation
    jitter on the images. One batched grid_sample instead of a Python loop per sample.

    images: (B, 3, H, W) float (normalized); masks: (B, H, W) integer. Pixels pulled in from
    outside the image become void. `out_size` (h, w) returns random crops of that size (at zoom
    1 a crop keeps the input's pixel scale); default: the input size. `generator` makes the
    draw reproducible.
    """
    b = images.shape[0]
    dev = images.device
    big_h, big_w = images.shape[-2:]
    h, w = out_size or (big_h, big_w)

    def u(lo, hi, n=b):
        return torch.rand(n, generator=generator).mul_(hi - lo).add_(lo)

    # Zoom s > 1 magnifies: the sampling grid covers 1/s of the image, shifted within bounds.
    s = torch.exp(u(math.log(scale[0]), math.log(scale[1])))
    fx, fy = w / big_w / s, h / big_h / s  # share of the input's width and height the output covers
    tx = u(-1, 1) * (1 - fx).abs()
    ty = u(-1, 1) * (1 - fy).abs()
    sign = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = fx * sign, tx
    theta[:, 1, 1], theta[:, 1, 2] = fy, ty
    if rotate:  # a rotation by a in pixel space, in normalized coordinates: x_in/W_in = R (x_out/W_out) W_out/W_in
        a = u(-rotate, rotate) * math.pi / 180
        cos, sin = torch.cos(a), torch.sin(a)
        theta[:, 0, 0], theta[:, 0, 1] = fx * cos * sign, -sin * (h / s) / big_w
        theta[:, 1, 0], theta[:, 1, 1] = sin * (w / s) / big_h * sign, fy * cos
    theta = theta.to(dev)
    grid = F.affine_grid(theta, [b, images.shape[1], h, w], align_corners=False)  # (B, h, w, 2)
    out = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    # Labels shifted by one so that 0 marks "outside the image" after zero padding.
    m = F.grid_sample((masks.float() + 1)[:, None], grid.float(), mode="nearest", padding_mode="zeros",
                      align_corners=False)[:, 0].long()  # (B, H, W)
    out_masks = torch.where(m == 0, torch.full_like(m, ignore_index), m - 1)
    if jitter:
        # saturation s, then contrast c about the image mean, then brightness, folded into one
        # multiply-add: c*s*x + c*(1-s)*gray + (1-c)*mean + 4*bright (mixing with the grey image
        # keeps the mean, so the contrast pivot is the mean of the input).
        bright = u(-jitter, jitter).view(b, 1, 1, 1).to(dev)
        contrast = u(1 - jitter, 1 + jitter).view(b, 1, 1, 1).to(dev)
        sat = u(1 - jitter, 1 + jitter).view(b, 1, 1, 1).to(dev)
        gray = out.mean(1, keepdim=True)
        offset = (1 - contrast) * gray.mean((2, 3), keepdim=True) + bright * 4  # ~jitter*255/std, normalized
        out = torch.addcmul(torch.addcmul(offset, contrast * (1 - sat), gray), contrast * sat, out)
    return out, out_masks


# ---------------------------------------------------------------------------------------------
# the synthetic demo set

DEMO_CLASSES = ["background", "disc", "square", "triangle"]
DEMO_COLOURS = [(40, 40, 40), (230, 80, 60), (70, 170, 230), (250, 210, 60)]
DEMO_VOID = 255
DEMO_SIZE = (64, 64)


def demo_table():
    return ClassTable(names=list(DEMO_CLASSES), colours=list(DEMO_COLOURS), ignore_index=DEMO_VOID,
                      void_colour=(0, 0, 0))


def make_demo(n, seed, size=DEMO_SIZE):
    """A deterministic synthetic set: discs, squares and triangles of random colour on striped,
    noisy backgrounds, with a void border and a few void occluding bars.
    Returns images (n, 3, H, W) uint8 and masks (n, H, W) uint8."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    images = np.empty((n, h, w, 3), np.uint8)
    masks = np.empty((n, h, w), np.uint8)
    for i in range(n):
        f, angle, phase = rng.uniform(0.1, 0.5), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        stripes = np.sin(f * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        base = rng.uniform(60, 190, 3)
        img = base + 35 * stripes[..., None] * rng.uniform(0.3, 1.0, 3)
        mask = np.zeros((h, w), np.uint8)
        for _ in range(rng.integers(1, 4)):
            cls = int(rng.integers(1, 4))
            r = rng.uniform(0.12, 0.24) * min(h, w)
            cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
            if cls == 1:
                region = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            elif cls == 2:
                region = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
            else:  # upward triangle: below the apex, inside both slanted edges
                dy = yy - (cy - r)
                region = (dy >= 0) & (yy <= cy + r * 0.7) & (np.abs(xx - cx) <= dy * 0.6)
            colour = rng.uniform(0, 255, 3)
            while np.abs(colour - base).max() < 90:  # keep every shape visible against the background
                colour = rng.uniform(0, 255, 3)
            img[region] = colour
            mask[region] = cls
        img += rng.normal(0, 12, img.shape)
        # Void: a 2-pixel border and, sometimes, a thin occluding bar with its own colour.
        mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = DEMO_VOID, DEMO_VOID, DEMO_VOID, DEMO_VOID
        if rng.random() < 0.3:
            x0 = int(rng.integers(0, w - 3))
            img[:, x0:x0 + 2] = rng.uniform(0, 255, 3)
            mask[:, x0:x0 + 2] = DEMO_VOID
        images[i] = np.clip(img, 0, 255)
        masks[i] = mask
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(masks)


def demo_split(n, seed, image_size=DEMO_SIZE):
    images, masks = make_demo(n, seed)
    label_masks = list(masks)
    return Split(images=torch.stack([resize_image(i, image_size) for i in images]),
                 masks=torch.stack([resize_mask(m, image_size) for m in masks]),
                 label_masks=label_masks, names=[f"demo_{seed}_{i:04d}" for i in range(n)])


DEMO_TRAIN, DEMO_VAL = (1200, 0), (100, 1)  # (images, seed) of the demo splits


def write_demo(root):
    """Write the demo splits as PNGs in the images/ + masks/ layout, with classes.csv."""
    root = Path(root)
    for split, (n, seed) in (("train", DEMO_TRAIN), ("val", DEMO_VAL)):
        images, masks = make_demo(n, seed)
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(root / split / "images" / f"{i:04d}.png")
            Image.fromarray(masks[i].numpy(), mode="L").save(root / split / "masks" / f"{i:04d}.png")
    with open(root / "classes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "name", "r", "g", "b"])
        for i, (name, c) in enumerate(zip(DEMO_CLASSES, DEMO_COLOURS)):
            w.writerow([i, name, *c])
        w.writerow([DEMO_VOID, "Unlabelled", 0, 0, 0])
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write_demo", metavar="DIR",
                        help="folder to write the demo set to (train/ and val/ with images/ and masks/)")
    parser.add_argument("--sequence_split", nargs="+", metavar="SPLIT",
                        help="splits to pool and divide by video sequence into train.txt and holdout.txt")
    parser.add_argument("--holdout", nargs="+", default=[], help="with --sequence_split: the sequences to hold out")
    parser.add_argument("--out", default="splits", help="with --sequence_split: folder for the list files")
    cli = parser.parse_args()
    try:
        if cli.write_demo:
            root = write_demo(cli.write_demo)
            print(f"wrote the demo set to {root}/train and {root}/val (class table {root}/classes.csv)")
        elif cli.sequence_split:
            if not cli.holdout:
                raise DataError("--sequence_split needs --holdout SEQUENCE (e.g. 0006R0)")
            for name, (path, n) in write_sequence_split(cli.sequence_split, cli.holdout, cli.out).items():
                print(f"{name}: {n} pairs in {path}")
        else:
            parser.error("give --write_demo DIR or --sequence_split SPLIT ... --holdout SEQ")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
