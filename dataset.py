"""Data in: pairing images with masks, class tables, decoding, the Dataset, the split cache, the demo set.

Also the joint augmentation of image and mask batches.

A split (--train_path, --val_path, --test_path) is one of:
  1. a folder with `images/` and a labels folder (`masks/`, `labels/`, `annotations/`, `gt/`, or
     DRIVE's `1st_manual/`), optionally a region-of-interest folder (`roi/`, `fov/`, or DRIVE's
     `mask/` beside `1st_manual/`); several annotators: `masks/<annotator>/` subfolders, or
     `1st_manual/` + `2nd_manual/`;
  2. a folder `X` with a sibling labels folder: `Xannot/` (SegNet), `X_labels/`, `X_masks/` (Kaggle);
  3. a list file of `image mask [mask2 ...] [roi=ROI]` lines, paths relative to the list file;
  4. a Pascal VOC ID list, `VOC2012/ImageSets/Segmentation/train.txt`, read with JPEGImages/ and
     SegmentationClass/ of that VOC folder.
Images and masks pair by file name; a suffix every mask shares (`_L`, `_mask`, `_manual1`) or every
image shares (`_training`) is ignored, and `mask_suffix` picks one kind of mask where a folder
holds several per image.

`load_split` decodes a split once into a uint8 cache at the training size, on disk under
`default_cache_dir()` when given a `cache_dir` (memory-mapped, shared by runs and processes),
else in memory. `SegmentationDataset` decodes per item instead, for DataLoader workers.

Write the built-in demo set to disk (images/ + masks/ layout, with its class table):
    python dataset.py --write_demo demo_data
"""

import argparse
import csv
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif"}
VOID_NAMES = {"unlabelled", "unlabeled", "void", "ignore", "__ignore__", "dontcare", "don't care"}
TABLE_NAMES = ("classes.csv", "class_dict.csv", "label_colors.txt", "labelmap.txt")
IMAGE_DIRS = ("images", "image", "imgs", "img")
LABEL_DIRS = ("masks", "labels", "annotations", "gt", "groundtruth", "ground_truth", "segmentations")
ROI_DIRS = ("roi", "fov")
ANNOTATOR_DIR = re.compile(r"^\d+(st|nd|rd|th)_manual$")  # DRIVE: 1st_manual/, 2nd_manual/
SIBLING_SUFFIXES = ("annot", "_annot", "_labels", "_label", "_masks", "_mask", "_gt", "_annotations",
                    "-labels", "-masks")
VOC_MASK_DIRS = ("SegmentationClass", "SegmentationClassAug", "SegmentationClassPNG")
SEPARATORS = "_-. "
SKIPPED_FILES = {"thumbs.db", "desktop.ini"}
LOSSY_FORMATS = {"JPEG", "MPO", "JPEG2000"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_VERSION = 1  # bump when decoding or resizing changes what a cache holds
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]

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
    ignore_index: int  # the void label: excluded from losses and metrics, stored in uint8 masks
    void_colour: tuple = None  # RGB colour of void in colour masks, if the table names one
    values: list = None  # value of each class in index masks, where it is not the class index
    void_value: int = None  # value of void in index masks, where it is not ignore_index
    source: str = ""  # where the table came from, for the log

    @property
    def num_classes(self):
        return len(self.names)

    def to_dict(self):
        """Plain lists, ints and strings: what a checkpoint stores (loads with weights_only=True)."""
        return {"names": list(self.names), "colours": [list(c) if c is not None else None for c in self.colours],
                "ignore_index": int(self.ignore_index),
                "void_colour": list(self.void_colour) if self.void_colour is not None else None,
                "values": list(self.values) if self.values is not None else None,
                "void_value": self.void_value, "source": self.source}

    @classmethod
    def from_dict(cls, d):
        names = list(d["names"])
        colours = d.get("colours") or [None] * len(names)
        return cls(names=names, colours=[tuple(c) if c is not None else None for c in colours],
                   ignore_index=int(d["ignore_index"]),
                   void_colour=tuple(d["void_colour"]) if d.get("void_colour") is not None else None,
                   values=list(d["values"]) if d.get("values") is not None else None,
                   void_value=d.get("void_value"), source=d.get("source", ""))


def _table_rows(path):
    """Non-empty, non-comment lines of a class table as field lists: CSV (spaces after commas
    allowed), CVAT's `name:r,g,b::` or CamVid's `r g b<TAB>name`."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"class table {path} cannot be read ({e}); give a CSV with rows "
                        "index,name,r,g,b or name,r,g,b") from None
    rows = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if ":" in s and "," not in s.split(":")[0]:  # CVAT labelmap.txt: name:r,g,b:parts:actions
            name, rgb = s.split(":")[:2]
            rows.append(("labelmap", [name.strip(), *[c.strip() for c in rgb.split(",") if c.strip()]], s))
        elif "," in s:
            rows.append(("csv", [c.strip() for c in next(csv.reader([s], skipinitialspace=True))], s))
        else:
            rows.append(("words", s.split(), s))
    return rows


def _parse_row(kind, f):
    """(index or None, name, rgb or None) of one data row, or None when it is not one."""
    if kind == "labelmap":
        if len(f) == 4 and all(_is_int(c) for c in f[1:]):
            return None, f[0], tuple(int(c) for c in f[1:])
        return (None, f[0], None) if len(f) == 1 and f[0] else None
    if len(f) == 5 and all(_is_int(c) for c in (f[0], *f[2:])):  # index,name,r,g,b
        return int(f[0]), f[1], tuple(int(c) for c in f[2:])
    if len(f) == 4 and all(_is_int(c) for c in f[1:]) and not _is_int(f[0]):  # name,r,g,b
        return None, f[0], tuple(int(c) for c in f[1:])
    if len(f) >= 4 and all(_is_int(c) for c in f[:3]):  # r g b name (CamVid's label_colors.txt)
        return None, " ".join(f[3:]), tuple(int(c) for c in f[:3])
    return None


def read_class_table(path, ignore_index=None):
    """Read `index,name,r,g,b` (classes.csv), `name,r,g,b` (class_dict.csv), CamVid's
    `r g b<TAB>name` (label_colors.txt) or CVAT's `name:r,g,b::` (labelmap.txt). A first row that
    is not data is a header. A row named Unlabelled/void becomes the void label unless
    `ignore_index` is given; every other row is a class. Without an index column, classes are
    numbered in row order, skipping void (CamVid's 32-colour table lists Void among the classes)."""
    path = Path(path)
    rows = _table_rows(path)
    if rows and _parse_row(rows[0][0], rows[0][1]) is None:
        rows = rows[1:]  # a header: never a row that parses as data
    if not rows:
        raise DataError(f"class table {path} has no rows; give one row per class: index,name,r,g,b")
    entries = []
    for row_no, (kind, fields, line) in enumerate(rows, 1):
        e = _parse_row(kind, fields)
        if e is None:
            raise DataError(f"class table {path} row {row_no} {line!r} is malformed; expected "
                            "index,name,r,g,b or name,r,g,b with integer fields")
        if e[2] is not None and not all(0 <= c <= 255 for c in e[2]):
            raise DataError(f"class table {path} row {row_no} has colour {e[2]} outside 0-255")
        entries.append(e)
    if len({e[0] is None for e in entries}) > 1:
        raise DataError(f"class table {path} mixes rows with and without an index column; "
                        "give every row as index,name,r,g,b or every row as name,r,g,b")
    is_void = [e[1].strip().lower() in VOID_NAMES for e in entries]
    void = [e for e, v in zip(entries, is_void) if v]
    if len(void) == len(entries):
        raise DataError(f"class table {path} has only void rows ({', '.join(e[1] for e in void)}); "
                        "add one row per class: index,name,r,g,b")
    values = void_value = None
    if entries[0][0] is not None:
        classes = sorted(e for e, v in zip(entries, is_void) if not v)
        if [e[0] for e in classes] != list(range(len(classes))):
            raise DataError(f"class table {path} indices {[e[0] for e in classes]} are not "
                            f"0..{len(classes) - 1}; number the classes from 0 without gaps")
        default_void = void[0][0] if void else 255
    else:
        classes = [e for e, v in zip(entries, is_void) if not v]
        rows_of = [i for i, v in enumerate(is_void) if not v]
        default_void = 255
        if void:
            first_void = is_void.index(True)
            if first_void >= len(classes):  # void after every class: index masks use its row number
                default_void = first_void
            else:  # void among the classes: index masks (if any) hold row numbers
                values, void_value = rows_of, first_void
    colours = [e[2] for e in classes]
    seen = {}
    for e in classes:
        if e[2] is not None and e[2] in seen:
            raise DataError(f"class table {path} gives colour {e[2]} to both {seen[e[2]]} and {e[1]}; "
                            "give each class its own colour")
        seen[e[2]] = e[1]
    if ignore_index is not None:
        void_value = None
    return ClassTable(names=[e[1] for e in classes], colours=colours,
                      ignore_index=default_void if ignore_index is None else ignore_index,
                      void_colour=void[0][2] if void else None, values=values, void_value=void_value,
                      source=str(path))


def _table_folders(split_path):
    """Where a class table of a split may be: the data folder and its parent; for a VOC ID list
    (VOC/ImageSets/Segmentation/train.txt) also the VOC folder."""
    p = Path(split_path)
    folder = p if p.is_dir() else p.parent
    out = [folder, folder.parent]
    if p.is_file() and folder.name.lower() == "segmentation" and folder.parent.name.lower() == "imagesets":
        out += [folder.parent.parent, folder.parent.parent.parent]
    return out


def find_class_table(split_path):
    """A classes.csv / class_dict.csv / label_colors.txt / labelmap.txt next to the data, or None."""
    for d in _table_folders(split_path):
        for name in TABLE_NAMES:
            if (d / name).is_file():
                return d / name
    return None


def make_class_table(classes_path, data_path, num_classes=None, ignore_index=None, mask_suffix=None,
                     num_threads=2, progress=None, also=()):
    """The class table from --classes, else next to the data, else --num_classes generic names,
    else read off the masks of `data_path` and the splits in `also` (validation): a palette
    PNG's palette (Pascal VOC) or two classes for binary masks (0/1 or 0/255)."""
    if classes_path and not Path(classes_path).is_file():
        raise DataError(f"class table {classes_path} does not exist; give --classes a CSV file with rows "
                        "index,name,r,g,b or name,r,g,b")
    if ignore_index is not None and not 0 <= ignore_index <= 255:
        raise DataError(f"--ignore_index {ignore_index} is outside 0-255; masks are stored as uint8, so "
                        "give a void label in 0-255 (255 is usual)")
    if data_path:
        check_exists(data_path)
    path = classes_path or (find_class_table(data_path) if data_path else None)
    if path:
        table = read_class_table(path, ignore_index)
        if num_classes is not None and num_classes != table.num_classes:
            raise DataError(f"--num_classes {num_classes} disagrees with class table {path}, "
                            f"which has {table.num_classes} classes; drop one of the two")
        if not 0 <= table.ignore_index <= 255:
            raise DataError(f"class table {path} makes {table.ignore_index} the void label, outside 0-255; "
                            "give --ignore_index 255")
        return table
    if num_classes is not None:
        if num_classes < 1:
            raise DataError(f"--num_classes {num_classes} must be at least 1")
        return ClassTable(names=[f"class_{i}" for i in range(num_classes)], colours=[None] * num_classes,
                          ignore_index=255 if ignore_index is None else ignore_index,
                          source=f"--num_classes {num_classes}")
    if data_path is None:
        raise DataError("no class table: give --classes TABLE.csv or --num_classes N")
    return infer_class_table([data_path, *also], ignore_index, mask_suffix, num_threads, progress)


def infer_class_table(data_paths, ignore_index=None, mask_suffix=None, num_threads=2, progress=None):
    """A table read off the masks of splits with no class table: palette masks give the classes
    and colours (values 0..max, void 255), binary masks (0/1 or 0/255, also JPEG) two classes."""
    data_path = data_paths[0]
    samples = [s for p in data_paths for s in find_samples(p, mask_suffix, roi=False)]
    scan = scan_masks(samples, None, num_threads, progress, "reading masks for the class table")
    void = 255 if ignore_index is None else ignore_index
    where = f"no class table (classes.csv, class_dict.csv, label_colors.txt) found next to {data_path}"
    present = np.flatnonzero(scan.counts)
    labelled = [int(v) for v in present if v != void]
    if scan.palette is not None and labelled:
        n = max(labelled) + 1
        if scan.palette_size < 256:  # a palette cut to the classes names them all
            n = max(n, scan.palette_size)
        pal = [tuple(scan.palette[3 * i:3 * i + 3]) for i in range(256)]
        voc = n == len(VOC_CLASSES) and pal[:n] == voc_colormap(n)
        names = VOC_CLASSES if voc else [f"class_{i}" for i in range(n)]
        return ClassTable(names=list(names), colours=pal[:n], ignore_index=void,
                          void_colour=pal[void] if scan.palette_size > void else None,
                          source=f"the palette of {scan.palette_file} ({n} classes, values 0-{n - 1}, void {void})")
    total = scan.counts.sum()
    near = scan.counts[:64].sum() + scan.counts[192:].sum()
    if set(labelled) <= {0, 1} or set(labelled) <= {0, 255} or (scan.lossy and near >= 0.99 * total):
        return ClassTable(names=["background", "foreground"], colours=[(0, 0, 0), (255, 255, 255)],
                          ignore_index=void, source="binary masks (0 background, 1 or 255 foreground)")
    if not labelled:
        raise DataError(f"{where}, and its masks hold only void ({void}); give --classes TABLE.csv")
    raise DataError(f"{where}, and its masks hold {len(labelled)} values in {min(labelled)}-{max(labelled)}; "
                    f"give --num_classes N (with --ignore_index V if one value is void) or --classes TABLE.csv")


def voc_colormap(n=256):
    """Pascal VOC's palette: the bits of the class index spread over r, g, b."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


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
# finding the images and masks of a split


class Sample(NamedTuple):
    image: Path
    masks: tuple  # one mask path per annotator
    roi: Path = None  # region of interest: pixels outside it (value 0) are void


def check_exists(path):
    """Refuse a data path that is not there, before anything is looked up next to it."""
    if not Path(path).exists():
        raise DataError(f"data path {path} does not exist; give a folder with images/ and masks/, "
                        "a folder X with a sibling Xannot/, or a list file of 'image mask' lines")


def _image_files(folder, what, mask_suffix=None):
    """{stem: path} of the image files in `folder` (hidden files skipped). Anything else is
    refused by name: a stray notes.txt would otherwise surface as an unpaired image, and two
    files with one stem (0001.png, 0001.jpg) would pair ambiguously."""
    files = {}
    for p in sorted(Path(folder).iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name.lower() in SKIPPED_FILES:
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


def _common_suffixes(stems):
    """Suffixes that every stem ends with and that start at a separator (`_L`, `_manual1`),
    shortest first, each leaving a non-empty name."""
    if not stems:
        return []
    first = min(stems, key=len)
    return [first[i:] for i in range(len(first) - 1, 0, -1)
            if first[i] in SEPARATORS and all(s.endswith(first[i:]) for s in stems)]


def _strip(stems, suffix):
    """{name without suffix: stem} or None when two stems would collide."""
    keys = {s[:len(s) - len(suffix)]: s for s in stems}
    return keys if len(keys) == len(stems) else None


def _match(images, masks, mask_dir, mask_suffix, what="mask"):
    """{image stem: mask path}: by equal names, else with the suffix shared by every mask
    (0001_L.png) and/or every image (21_training.tif) left out, or with `mask_suffix`."""
    if mask_suffix is not None:
        suffix = Path(mask_suffix).stem if Path(mask_suffix).suffix.lower() in IMAGE_EXTENSIONS else mask_suffix
        chosen = ({s: p for s, p in masks.items() if s in images} if suffix == ""
                  else {s: p for s, p in masks.items() if s.endswith(suffix)})
        mask_options = [suffix]
    else:
        chosen, mask_options = masks, ["", *_common_suffixes(masks)]
    best = None
    for si in ["", *_common_suffixes(images)]:
        ik = _strip(images, si)
        for sm in mask_options:
            mk = _strip(chosen, sm)
            if ik is None or mk is None:
                continue
            common = ik.keys() & mk.keys()
            if len(common) == len(ik) == len(mk):
                return {ik[k]: chosen[mk[k]] for k in ik}
            if best is None or len(common) > best[0]:
                best = (len(common), ik, mk)
    if mask_suffix is None:
        _refuse_several_masks(images, masks, mask_dir, what)
    _, ik, mk = best or (0, {s: s for s in images}, {s: s for s in chosen})
    lonely_images = sorted(images[ik[k]].name for k in set(ik) - set(mk))
    lonely_masks = sorted(chosen[mk[k]].name for k in set(mk) - set(ik))
    image_dir = next(iter(images.values())).parent if images else None
    parts = []
    if lonely_images:
        parts.append(f"{len(lonely_images)} image(s) in {image_dir} without a {what} in {mask_dir} "
                     f"(e.g. {', '.join(lonely_images[:3])})")
    if lonely_masks:
        parts.append(f"{len(lonely_masks)} {what}(s) in {mask_dir} without an image "
                     f"(e.g. {', '.join(lonely_masks[:3])})")
    hint = (f"only masks ending in {mask_suffix!r} are used (--mask_suffix)" if mask_suffix is not None else
            "images and masks pair by file name without extension; a suffix every mask shares (e.g. _L, "
            "_mask) is ignored, or give --mask_suffix")
    raise DataError("unpaired files: " + "; ".join(parts) + f"; {hint}")


def _refuse_several_masks(images, masks, mask_dir, what):
    """Several masks named after one image (0001_L.png, 0001_instance.png): ask which kind."""
    per_image = {}
    for stem in masks:
        for j in range(len(stem), 0, -1):
            if (j == len(stem) or stem[j] in SEPARATORS) and stem[:j] in images:
                per_image.setdefault(stem[:j], []).append(stem)
                break
    for image, stems in sorted(per_image.items()):
        if len(stems) > 1:
            suffixes = sorted(repr(s[len(image):]) for s in stems)
            raise DataError(f"{what} folder {mask_dir} holds several masks for image {images[image].name} "
                            f"({', '.join(masks[s].name for s in sorted(stems))}); pick one kind with "
                            f"--mask_suffix {' or --mask_suffix '.join(suffixes)}")


def _subdirs(folder):
    """{lower-case name: path} of the visible subfolders."""
    return {p.name.lower(): p for p in sorted(Path(folder).iterdir()) if p.is_dir() and not p.name.startswith(".")}


def _annotator_dirs(labels):
    """A labels folder holding only subfolders has one subfolder per annotator."""
    has_files = any(p.is_file() and not p.name.startswith(".") for p in labels.iterdir())
    subs = list(_subdirs(labels).values())
    return subs if subs and not has_files else [labels]


def _folder_layout(path):
    """(image folder, [labels folder per annotator], region-of-interest folder or None)."""
    subs = _subdirs(path)
    image_dir = next((subs[n] for n in IMAGE_DIRS if n in subs), None)
    if image_dir is not None:
        labels = next((subs[n] for n in LABEL_DIRS if n in subs), None)
        manual = [subs[n] for n in sorted(subs) if ANNOTATOR_DIR.match(n)]
        roi = next((subs[n] for n in ROI_DIRS if n in subs), None)
        if labels is not None:
            label_dirs = _annotator_dirs(labels)
        elif manual:
            label_dirs = manual
        else:
            label_dirs = [subs["mask"]] if "mask" in subs else []
        if roi is None and "mask" in subs and label_dirs != [subs["mask"]]:
            roi = subs["mask"]  # DRIVE: mask/ beside 1st_manual/ is the field of view, not the labels
        if label_dirs:
            return image_dir, label_dirs, roi
    for suffix in SIBLING_SUFFIXES:
        sibling = path.with_name(path.name + suffix)
        if sibling.is_dir():
            return path, _annotator_dirs(sibling), None
    if path.name.lower() in IMAGE_DIRS:  # the images folder itself, beside masks/
        beside = _subdirs(path.parent)
        labels = next((beside[n] for n in LABEL_DIRS if n in beside), None)
        if labels is not None:
            roi = next((beside[n] for n in ROI_DIRS if n in beside), None)
            return path, _annotator_dirs(labels), roi
    if path.parent.name.lower() in IMAGE_DIRS:  # ADE20K: images/training beside annotations/training
        for n in LABEL_DIRS:
            mirrored = path.parent.parent / n / path.name
            if mirrored.is_dir():
                return path, _annotator_dirs(mirrored), None
    if "jpegimages" in subs and (path / "ImageSets" / "Segmentation").is_dir():
        lists = sorted(p.name for p in (path / "ImageSets" / "Segmentation").glob("*.txt"))
        raise DataError(f"{path} is a Pascal VOC folder; give the ID list of a split instead, e.g. "
                        f"{path / 'ImageSets' / 'Segmentation' / (lists[0] if lists else 'train.txt')} "
                        f"(lists there: {', '.join(lists) or 'none'})")
    raise DataError(f"data folder {path} has neither images/ + masks/ subfolders nor a sibling "
                    f"{path.name}annot/ (or {path.name}_labels/, {path.name}_masks/) folder; arrange it in "
                    "one of those layouts or give a list file of 'image mask' lines")


def find_samples(path, mask_suffix=None, roi=True):
    """[Sample] of a split in any layout: folders sorted by image name, list files in their order.
    `roi=False` ignores region-of-interest masks."""
    path = Path(path)
    check_exists(path)
    if path.is_file():
        samples = _samples_from_list(path)
        return samples if roi else [s._replace(roi=None) for s in samples]
    image_dir, label_dirs, roi_dir = _folder_layout(path)
    images = _image_files(image_dir, "image")
    masks = [_image_files(d, "mask") for d in label_dirs]
    if not images and not any(masks):
        raise DataError(f"data folder {path} is empty: {image_dir} and {label_dirs[0]} hold no files")
    per_annotator = [_match(images, m, d, mask_suffix) for m, d in zip(masks, label_dirs)]
    rois = None
    if roi and roi_dir is not None:
        rois = _match(images, _image_files(roi_dir, "region-of-interest mask"), roi_dir, None,
                      "region-of-interest mask")
    return [Sample(images[s], tuple(m[s] for m in per_annotator), rois[s] if rois else None)
            for s in sorted(images)]


def find_pairs(path, mask_suffix=None):
    """[(image_path, mask_path)] of a split (the first annotator's mask where there are several)."""
    return [(s.image, s.masks[0]) for s in find_samples(path, mask_suffix, roi=False)]


def _samples_from_list(list_path):
    try:
        lines = list_path.read_text(encoding="utf-8-sig").splitlines()  # CRLF too
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"list file {list_path} cannot be read as text ({e}); give a text file of "
                        "'image_path mask_path' lines") from None
    rows = [(n, line.split()) for n, line in enumerate(lines, 1) if line.split() and not line.lstrip().startswith("#")]
    if not rows:
        raise DataError(f"list file {list_path} lists no 'image_path mask_path' pairs")
    if all(len(f) == 1 for _, f in rows):
        return _voc_samples(list_path, rows)
    samples, first = [], None
    for n, fields in rows:
        rois = [f[4:] for f in fields[1:] if f.startswith("roi=")]
        masks = [f for f in fields[1:] if not f.startswith("roi=")]
        if len(rois) > 1 or not masks:
            raise DataError(f"list file {list_path} line {n} has {len(fields)} fields; each line must be "
                            "'image_path mask_path' (more masks for more annotators, roi=PATH for a region "
                            "of interest)")
        if first is None:
            first = (n, len(masks))
        elif len(masks) != first[1]:
            raise DataError(f"list file {list_path} line {n} has {len(masks)} masks but line {first[0]} has "
                            f"{first[1]}; give every image the same number of annotations")
        paths = [p if p.is_absolute() else list_path.parent / p for p in map(Path, [fields[0], *masks, *rois])]
        for p in paths:
            if not p.is_file():
                raise DataError(f"list file {list_path} line {n} names {p}, which does not exist")
        samples.append(Sample(paths[0], tuple(paths[1:1 + len(masks)]), paths[-1] if rois else None))
    return samples


def _voc_samples(list_path, rows):
    """A Pascal VOC ID list (ImageSets/Segmentation/train.txt): JPEGImages/ID.jpg with
    SegmentationClass/ID.png (or SegmentationClassAug/, the augmented set's)."""
    root = next((d for d in (list_path.parent.parent.parent, list_path.parent, list_path.parent.parent)
                 if (d / "JPEGImages").is_dir()), None)
    ids = [f[0] for _, f in rows]
    if root is None:
        raise DataError(f"list file {list_path} holds one name per line (line {rows[0][0]}: {ids[0]!r}); such "
                        "ID lists are read as Pascal VOC splits and need JPEGImages/ and SegmentationClass/ "
                        "in the VOC folder (VOC2012/ImageSets/Segmentation/train.txt); otherwise write "
                        "'image_path mask_path' lines")
    images = _image_files(root / "JPEGImages", "image")
    mask_dirs = [root / d for d in VOC_MASK_DIRS if (root / d).is_dir()]
    if not mask_dirs:
        raise DataError(f"Pascal VOC folder {root} has no SegmentationClass/ folder for the masks of {list_path}")
    masks = None
    for d in mask_dirs:
        found = _image_files(d, "mask")
        if all(i in found for i in ids):
            masks = found
            break
    for n, (_, f) in enumerate(rows):
        if f[0] not in images:
            raise DataError(f"list file {list_path} line {rows[n][0]} names {f[0]}, which is not in "
                            f"{root / 'JPEGImages'}")
        if masks is None:
            raise DataError(f"list file {list_path} line {rows[n][0]} names {f[0]}, which has no mask in "
                            f"{' or '.join(str(d) for d in mask_dirs)}")
    return [Sample(images[i], (masks[i],), None) for i in ids]


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


def _open(path, what, load=True):
    """Open an image file, decoded and upright (EXIF orientation applied) unless `load` is
    False, with the file closed. Any exception from the decoder means the file is damaged or not
    an image: PIL raises a dozen types on hostile bytes (OSError, SyntaxError, struct.error,
    IndexError, ...), so all of them become one DataError."""
    try:
        with Image.open(path) as img:
            if not load:
                return img
            img.load()
            upright = ImageOps.exif_transpose(img)
            upright.format = img.format  # the copy forgets it; lossy (JPEG) masks are snapped
            return upright
    except Exception as e:  # any decoder failure means a bad file, see the docstring
        detail = str(e).splitlines()[0][:160] if str(e) else "no detail"
        raise DataError(f"{what} {path} is not a readable image ({type(e).__name__}: {detail}); "
                        "remove it or replace it with a valid file") from None


def load_image(path):
    """(3, H, W) uint8 RGB. Grayscale, RGBA, palette, 16-bit and EXIF-rotated files all work.
    Decoded by PIL: torchvision's decoder is about 20% faster on PNG but crashed the process
    (SIGSEGV) on a PNG with damaged pixel data, which PIL reports as an error."""
    img = _open(path, "image")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)  # (3, H, W), HWC memory


def _mask_array(img, path, table):
    """("grey", (H, W) uint8 values) or ("colour", (H, W, 3) uint8) of a decoded mask."""
    mode = img.mode
    if mode in ("P", "PA") and _grey_palette(img):
        # Binary GIFs store black/white as palette entries in any order: read the grey levels
        # the annotator saw, not the entry numbers.
        return "grey", np.array(img.convert("L"), dtype=np.uint8)
    if mode in ("P", "L", "1"):
        return "grey", np.array(img, dtype=np.uint8)
    if mode in ("LA", "PA"):
        return "grey", np.array(img, dtype=np.uint8)[..., 0]
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img)
        if a.size and (a.max() > 255 or a.min() < 0):
            bad = int(a.max() if a.max() > 255 else a.min())
            raise DataError(f"mask {path} holds value {bad}; mask values must be labels in 0-255")
        return "grey", a.astype(np.uint8)
    if mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"))
        if table is not None and any(c is not None for c in table.colours):
            return "colour", rgb
        spread = np.abs(rgb.astype(np.int16) - rgb.astype(np.int16).mean(-1, keepdims=True)).max() if rgb.size else 0
        if spread <= (24 if img.format in LOSSY_FORMATS else 0):  # grey saved as RGB (JPEG: nearly grey)
            return "grey", np.round(rgb.mean(-1)).astype(np.uint8)
        raise DataError(f"mask {path} is an RGB colour mask but the class table has no colours; give "
                        "--classes TABLE.csv with rows name,r,g,b (such as class_dict.csv)")
    raise DataError(f"mask {path} has image mode {mode}; masks must be single-channel index images "
                    "(PNG mode L or P, GIF, TIFF) or RGB colour masks")


def _grey_palette(img):
    """Whether every palette entry a palette image uses is a grey level."""
    pal = np.array((img.getpalette() or []) + [0] * 768, np.int16)[:768].reshape(256, 3)
    used = pal[np.unique(np.asarray(img)[..., 0] if img.mode == "PA" else np.asarray(img))]
    return bool((used == used[:, :1]).all())


class MaskScan(NamedTuple):
    counts: np.ndarray  # (256,) pixels of each grey/index value over the split's grey masks
    first_file: dict  # value -> the first mask holding it (for error messages)
    lossy: bool  # some mask is JPEG: values are snapped to the nearest class value or colour
    shapes: list  # (h, w) of each sample's masks
    palette: list  # the first palette mask's palette (768 values), or None
    palette_size: int
    palette_file: Path


def scan_masks(samples, table, num_threads=2, progress=None, desc="reading masks"):
    """Read every mask once: the value histogram of grey/index masks (which decides how values
    become classes, see mask_coding), each sample's label size, and whether any mask is lossy.
    Where the table leaves one reading of the values (most tables: values are class indices),
    and for colour masks under a table with colours, only the files' headers are read."""
    colour_table = table is not None and any(c is not None for c in table.colours)
    headers_only = table is not None and len(_candidates(table)) == 1

    def one(sample):
        shapes, counts, lossy, pal = [], [], False, None
        for path in sample.masks:
            img = _open(path, "mask", load=False)
            lossy |= img.format in LOSSY_FORMATS
            if headers_only or (colour_table and img.mode in ("RGB", "RGBA")):
                shapes.append((img.size[1], img.size[0]))  # EXIF may transpose it: the same pixel count
                continue
            img = _open(path, "mask")
            kind, a = _mask_array(img, path, table)
            if kind == "colour":
                shapes.append(a.shape[:2])
                continue
            counts.append((path, _hist(a)))
            shapes.append(a.shape)
            if img.mode in ("P", "PA") and pal is None and not _grey_palette(img):
                raw = img.getpalette() or []
                pal = (raw + [0] * 768)[:768], len(raw) // 3, path
        if len(set(shapes)) > 1:
            raise DataError(f"masks {', '.join(str(p) for p in sample.masks)} of image {sample.image} differ in "
                            f"size ({' vs '.join(f'{w}x{h}' for h, w in shapes)}); annotations must match the image")
        return shapes[0], counts, lossy, pal

    counts, first, lossy, shapes, pal = np.zeros(256, np.int64), {}, False, [], None
    with ThreadPoolExecutor(max(1, num_threads)) as pool:  # PIL decoding releases the GIL
        results = pool.map(one, samples)
        if progress:
            results = progress(results, total=len(samples), desc=desc)
        for shape, per_mask, lo, p in results:
            shapes.append(shape)
            lossy |= lo
            pal = pal or p
            for path, c in per_mask:
                for v in np.flatnonzero(c):
                    first.setdefault(int(v), path)
                counts += c
    return MaskScan(counts, first, lossy, shapes, *(pal or (None, 0, None)))


class MaskCoding(NamedTuple):
    """How the grey/index values of a split's masks become labels, decided once per split."""
    lut: np.ndarray  # (256,) int16: value -> class index or void; -1: not allowed
    exact: np.ndarray  # (256,) bool: values taken as they are (the rest were snapped)
    note: str  # what was decided, for the log ("" when values are plain class indices)
    identity: bool  # every allowed value is its own label: masks are used as they are


def _hist(a):
    """(256,) int64 pixel count of each value of a uint8 array (torch.bincount: 3x np.bincount)."""
    return torch.bincount(torch.from_numpy(np.ascontiguousarray(a)).reshape(-1), minlength=256).numpy()


def _index_keys(table):
    """{mask value: label} for index masks under the table."""
    keys = {}
    for c in range(table.num_classes):
        v = table.values[c] if table.values is not None else c
        if 0 <= v <= 255:
            keys[v] = c
    v = table.void_value if table.void_value is not None else table.ignore_index
    if 0 <= v <= 255:
        keys[v] = table.ignore_index
    return keys


def _candidates(table):
    """[(name, {mask value: label})]: the readings of grey/index mask values the table allows."""
    candidates = [("index", _index_keys(table))]
    if table.num_classes == 2 and table.values is None:
        candidates.append(("binary", {0: 0, 255: 1}))
    if table.colours and all(c is not None and c[0] == c[1] == c[2] for c in table.colours):
        grey = {c[0]: i for i, c in enumerate(table.colours)}
        if table.void_colour is not None and table.void_colour[0] == table.void_colour[1] == table.void_colour[2]:
            grey.setdefault(table.void_colour[0], table.ignore_index)
        if len(grey) >= table.num_classes and grey not in [k for _, k in candidates]:
            candidates.append(("grey", grey))
    return candidates


def mask_coding(scan, table):
    """Decide how mask values map to labels, from the values of the whole split (one mask alone
    cannot tell 0/255 binary masks from 0/1 masks with void 255). Candidates: the values are the
    class indices; with two classes, 0/255 (255 the foreground); grey levels of the table's grey
    colours. Of those that explain every value, the one with the fewest void pixels wins: a
    foreground is never read as void. Lossy (JPEG) masks are snapped to the nearest value of the
    candidate that needs the least snapping."""
    counts = scan.counts
    candidates = _candidates(table)
    index = candidates[0][1]
    present = np.flatnonzero(counts)
    total = max(1, int(counts.sum()))

    def void_pixels(keys, snap):
        lut = _lut(keys, snap)
        return int(counts[lut == table.ignore_index].sum())

    if not scan.lossy:
        fits = [(n, k) for n, k in candidates if all(int(v) in k for v in present)]
        if not fits:
            bad = next(int(v) for v in present if int(v) not in index)
            raise DataError(f"mask {scan.first_file[bad]} has label {bad} but the class table has {table.num_classes} "
                            f"classes (0-{table.num_classes - 1}) and void is {table.ignore_index}; fix the mask, "
                            "or give --classes / --num_classes / --ignore_index to match it")
        name, keys = min(fits, key=lambda nk: void_pixels(nk[1], False))  # ties: the first, index
    else:
        cost = {n: sum(int(counts[v]) * min(abs(int(v) - t) for t in k) for v in present) / total
                for n, k in candidates}
        best = min(cost.values())
        near = [(n, k) for n, k in candidates if cost[n] <= best + 1.0]  # within one grey level a pixel
        name, keys = min(near, key=lambda nk: void_pixels(nk[1], True))
    lut = _lut(keys, scan.lossy)
    exact = np.zeros(256, bool)
    exact[list(keys)] = True
    notes = []
    if name == "binary":
        notes.append(f"masks hold 0 and 255: 255 read as class 1 ({table.names[1]}), 0 as class 0 ({table.names[0]})")
    elif name == "grey":
        notes.append("mask values read as the grey levels of the class table's colours")
    identity = bool(((lut == np.arange(256)) | (lut < 0)).all())
    return MaskCoding(lut, exact, "; ".join(notes), identity)


def _lut(keys, snap):
    """(256,) int16 value -> label: the keys; the other values snapped to the nearest key, or -1."""
    lut = np.full(256, -1, np.int16)
    ks = np.array(sorted(keys))
    if snap and len(ks):
        nearest = ks[np.abs(np.arange(256)[:, None] - ks[None]).argmin(1)]
        lut[:] = [keys[int(k)] for k in nearest]
    for k, v in keys.items():
        lut[k] = v
    return lut


def _colour_labels(rgb, path, table, lossy):
    """(H, W, 3) colours -> (H, W) labels through the table's colours (void colour: void);
    lossy masks snap each colour to the nearest table colour. Returns labels and snapped pixels."""
    colours = {c: i for i, c in enumerate(table.colours) if c is not None}
    if table.void_colour is not None:
        colours.setdefault(tuple(table.void_colour), table.ignore_index)
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    keys = np.array(sorted((r << 16) | (g << 8) | b for r, g, b in colours))
    vals = np.array([colours[(k >> 16, (k >> 8) & 255, k & 255)] for k in keys], np.int16)
    pos = np.clip(np.searchsorted(keys, code), 0, len(keys) - 1)
    bad = keys[pos] != code
    labels = vals[pos]
    snapped = int(bad.sum())
    if snapped:
        if not lossy:
            c = int(code[bad][0])
            raise DataError(f"mask {path} has colour {(c >> 16, (c >> 8) & 255, c & 255)} that is not "
                            "in the class table; add it to the table (or as the Unlabelled row)")
        # JPEG keeps luma sharp and blurs chroma (4:2:0), so a pixel at a class boundary keeps
        # its class's luma but mixes chroma: nearest in YCbCr with luma weighted 4x agreed with
        # the true labels on 99.9% of pixels against 97.7% in RGB (8-pixel blocks, quality 75).
        odd, inverse = np.unique(code[bad], return_inverse=True)
        odd_ycc = _ycbcr(np.stack([odd >> 16, (odd >> 8) & 255, odd & 255], 1))
        key_ycc = _ycbcr(np.stack([keys >> 16, (keys >> 8) & 255, keys & 255], 1))
        nearest = ((odd_ycc[:, None] - key_ycc[None]) ** 2).sum(-1).argmin(1)  # (distinct odd colours,)
        labels[bad] = vals[nearest][inverse]
    return labels, snapped


def _ycbcr(rgb, luma_weight=4.0):
    """(n, 3) RGB -> (n, 3) JPEG's YCbCr (ITU-R BT.601) without offsets, luma scaled."""
    m = np.array([[0.299 * luma_weight, 0.587 * luma_weight, 0.114 * luma_weight],
                  [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    return rgb.astype(np.float64) @ m.T


def read_mask(path, table, coding):
    """(H, W) uint8 labels of one mask file and the number of its pixels that were snapped."""
    img = _open(path, "mask")
    kind, a = _mask_array(img, path, table)
    if kind == "colour":
        labels, snapped = _colour_labels(a, path, table, img.format in LOSSY_FORMATS)
        return labels.astype(np.uint8), snapped
    hist = _hist(a)
    bad = np.flatnonzero((hist > 0) & (coding.lut < 0))
    if len(bad):
        raise DataError(f"mask {path} has label {bad[0]} but the class table has {table.num_classes} classes "
                        f"(0-{table.num_classes - 1}) and void is {table.ignore_index}; fix the mask, or give "
                        "--classes / --num_classes / --ignore_index to match it")
    labels = a if coding.identity else np.take(coding.lut.astype(np.uint8), a)
    return labels, int(hist[~coding.exact].sum())


def load_mask(path, table):
    """(H, W) uint8 label indices of one mask, its values read as a split's would be (0/255
    binary masks: 255 is class 1 when there are two classes)."""
    path = Path(path)
    scan = scan_masks([Sample(path, (path,))], table, 1)
    return torch.from_numpy(read_mask(path, table, mask_coding(scan, table))[0])


def load_roi(path, shape, image):
    """(H, W) bool: inside the region of interest (the brighter half of the ROI mask's values)."""
    img = _open(path, "region-of-interest mask")
    a = np.asarray(img.convert("L"))
    if a.shape != tuple(shape):
        raise DataError(f"region-of-interest mask {path} is {a.shape[1]}x{a.shape[0]} but image {image} is "
                        f"{shape[1]}x{shape[0]}; they must be the same size")
    return a > (int(a.max()) // 2) if a.size else np.zeros(shape, bool)


def decode_sample(sample, table, coding):
    """image (3, h, w) uint8, labels (K, h, w) uint8 at the label's own size (void outside the
    region of interest), and the number of snapped mask pixels."""
    image = load_image(sample.image)
    labels, snapped = [], 0
    for path in sample.masks:
        m, s = read_mask(path, table, coding)
        if image.shape[-2:] != m.shape:
            raise DataError(f"image {sample.image} is {image.shape[2]}x{image.shape[1]} but its mask "
                            f"{path} is {m.shape[1]}x{m.shape[0]}; they must be the same size")
        labels.append(m)
        snapped += s
    labels = np.stack(labels)  # (K, h, w)
    if sample.roi is not None:
        labels[:, ~load_roi(sample.roi, labels.shape[1:], sample.image)] = table.ignore_index
    return image, labels, snapped


def resize_image(img, size):
    """(3, h, w) uint8 -> (3, H, W) uint8, bilinear with antialiasing. On uint8 directly (3.4x
    faster than through float at 360x480 -> 288x384, and what torchvision's resize runs)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]


def resize_mask(mask, size):
    """(..., h, w) uint8 -> (..., H, W) uint8, nearest neighbour so labels are never blended."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    lead = mask.shape[:-2]
    flat = mask.reshape(1, -1, *mask.shape[-2:]).float()  # (1, K, h, w)
    return F.interpolate(flat, size=tuple(size), mode="nearest-exact").to(torch.uint8).reshape(*lead, *size)


# ---------------------------------------------------------------------------------------------
# the Dataset: decode per item


class SegmentationDataset(torch.utils.data.Dataset):
    """Images and masks of a split, decoded per item: for data read once, or too large to cache,
    with DataLoader workers. Like torchvision's VOCSegmentation, item i is (image, target) after
    the optional `transforms(image, target)`: image (3, H, W) uint8, target (H, W) uint8 labels
    (void = table.ignore_index), or (K, H, W) with K annotators; at `image_size` when given,
    else at the file's size. `with_label=True` adds the label at its own size (for metrics;
    batch it with `collate_with_labels`).

    How mask values become labels is decided from up to `scan_limit` masks spread over the split
    (None: all of them, as the cached path); a later mask that does not fit raises a DataError.
    `annotator=k` keeps annotator k's masks only."""

    def __init__(self, path, table, image_size=None, transforms=None, mask_suffix=None, roi=True,
                 with_label=False, scan_limit=64, num_threads=2, annotator=None):
        self.samples = find_samples(path, mask_suffix, roi)
        self.table, self.transforms, self.with_label = table, transforms, with_label
        self.image_size = tuple(image_size) if image_size else None
        step = max(1, len(self.samples) // scan_limit) if scan_limit else 1
        self.coding = mask_coding(scan_masks(self.samples[::step][:scan_limit], table, num_threads), table)
        self.names = [s.image.stem for s in self.samples]
        self.annotators = len(self.samples[0].masks) if annotator is None else 1
        self.annotator = annotator
        self.notes = [n for n in self.coding.note.split("; ") if n]  # what was decided, for the log
        self.stats = None  # class_stats, once dataset_stats has read every mask

    def __len__(self):
        return len(self.samples)

    def annotation(self, k):
        """The dataset with annotator k's masks only (no rescan)."""
        return self if self.annotators == 1 and self.annotator is None else _copy(self, annotator=k, annotators=1)

    def __getitem__(self, i):
        image, labels, _ = decode_sample(self.samples[i], self.table, self.coding)
        labels = torch.from_numpy(labels if self.annotator is None else labels[self.annotator:self.annotator + 1])
        target = labels
        if self.image_size:
            image, target = resize_image(image, self.image_size), resize_mask(labels, self.image_size)
        image, target = image.contiguous(), target[0] if len(target) == 1 else target
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        if self.with_label:
            return image, target, labels[0] if len(labels) == 1 else labels
        return image, target


def dataset_stats(ds, num_threads=2, progress=None):
    """class_stats of a SegmentationDataset's masks (at its image_size), read once: its masks
    only, without the images. A note on snapped pixels goes to ds.notes."""
    size, table = ds.image_size, ds.table
    label_hist, small_hist, image_hist = (np.zeros(256, np.int64) for _ in range(3))
    snapped = 0

    def one(sample):
        labels, n = [], 0
        for path in sample.masks:
            m, s = read_mask(path, table, ds.coding)
            labels.append(m)
            n += s
        labels = np.stack(labels)
        if sample.roi is not None:
            labels[:, ~load_roi(sample.roi, labels.shape[1:], sample.image)] = table.ignore_index
        small = resize_mask(torch.from_numpy(labels), size).numpy() if size else labels
        return _hist(labels), [_hist(m) for m in small], n

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        results = pool.map(one, ds.samples)
        if progress:
            results = progress(results, total=len(ds.samples), desc="reading masks")
        for full, small, n in results:
            label_hist += full
            snapped += n
            for c in small:
                small_hist += c
                image_hist += (c > 0) * int(c.sum())
    stats = class_stats_from_hist(label_hist, small_hist, image_hist, table, snapped)
    if snapped:
        ds.notes.append(_snapped_note(snapped, stats["label_total"], "the training split"))
    return stats


def _snapped_note(snapped, total, name):
    return (f"snapped {snapped} of {total} mask pixels of {name} ({100 * snapped / total:.2f}%) to the nearest "
            "class value or colour: lossy (JPEG) masks")


class DecodingSplit:
    """Split's interface (images[idx], masks[idx], label_masks[i], names) over a
    SegmentationDataset that decodes on access: for validation without a cache. The items of
    the last batch are kept, nothing more, so memory does not grow with the split."""

    def __init__(self, ds, keep=64):
        self.ds, self.keep, self._items = _copy(ds, with_label=True), keep, {}
        self.names, self.stats, self.notes, self.cache = ds.names, ds.stats, ds.notes, None
        self.images, self.masks, self.label_masks = _Rows(self, 0), _Rows(self, 1), _Rows(self, 2)

    def __len__(self):
        return len(self.ds)

    @property
    def annotators(self):
        return self.ds.annotators

    def annotation(self, k):
        """The split with annotator k's masks only."""
        return self if self.annotators == 1 else DecodingSplit(self.ds.annotation(k), self.keep)

    def item(self, i):
        if i not in self._items:
            if len(self._items) >= self.keep:
                self._items.clear()
            self._items[i] = self.ds[i]
        return self._items[i]


def _copy(ds, **changes):
    """A shallow copy of a SegmentationDataset with some attributes changed (no rescan)."""
    out = SegmentationDataset.__new__(SegmentationDataset)
    out.__dict__.update(ds.__dict__, **changes)
    return out


class _Rows:
    """split.images / .masks / .label_masks of a DecodingSplit: one index gives one item, a
    list, range, slice or tensor of indices a stacked batch."""

    def __init__(self, split, part):
        self.split, self.part = split, part

    def __getitem__(self, idx):
        if isinstance(idx, int):
            return self.split.item(idx)[self.part]
        if isinstance(idx, slice):
            idx = range(*idx.indices(len(self.split)))
        return torch.stack([self.split.item(int(i))[self.part] for i in idx])

    def __len__(self):
        return len(self.split)


def collate_with_labels(batch):
    """(images (B, 3, H, W), targets (B, ...), [label at its own size]) from items of
    SegmentationDataset(with_label=True), whose labels differ in size."""
    images, targets, labels = zip(*batch)
    return torch.stack(images), torch.stack(targets), list(labels)


# ---------------------------------------------------------------------------------------------
# a decoded split: in memory, or a memory-mapped cache on disk


class LabelMasks:
    """Each image's label at its own size, stored flat: item i is a (h, w) uint8 tensor, or
    (K, h, w) with K annotators, viewing the flat array (a memory map of the cache) without a copy."""

    def __init__(self, flat, offsets, shapes, annotators, pick=None):
        self.flat, self.offsets, self.shapes, self.annotators, self.pick = flat, offsets, shapes, annotators, pick

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        h, w = (int(v) for v in self.shapes[i])
        a = self.flat[int(self.offsets[i]):int(self.offsets[i + 1])].reshape(self.annotators, h, w)
        if self.pick is not None:
            return torch.from_numpy(a[self.pick])
        return torch.from_numpy(a if self.annotators > 1 else a[0])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


@dataclass
class Split:
    """A decoded split. images (N, 3, H, W) and masks (N, H, W) (or (N, K, H, W) with K
    annotators) are uint8 at the training size; label_masks[i] is mask i at its own resolution,
    for metrics that compare with papers. From a cache these are memory maps of files: pages are
    read on first use and can be dropped by the kernel, so memory does not grow with the split.
    stats: per-class pixel counts (see class_stats); notes: what loading decided, for the log."""
    images: torch.Tensor
    masks: torch.Tensor
    label_masks: list
    names: list
    stats: dict = None
    notes: list = field(default_factory=list)
    cache: str = None  # the cache folder, when on disk

    def __len__(self):
        return len(self.names)

    @property
    def annotators(self):
        return self.masks.shape[1] if self.masks.dim() == 4 else 1

    def annotation(self, k):
        """The split with annotator k's masks only, as single-annotator data."""
        if self.annotators == 1:
            return self
        lm = self.label_masks
        return replace(self, masks=self.masks[:, k], label_masks=LabelMasks(lm.flat, lm.offsets, lm.shapes,
                                                                            lm.annotators, k))


def default_cache_dir():
    """$XDG_CACHE_HOME/segvae, else ~/.cache/segvae."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segvae"


def cache_key(samples, table, image_size):
    """What a cache depends on: every file (path, size, mtime), the training size, the class
    table and the code version. 16 hex digits of its SHA-256."""
    labelling = {k: v for k, v in table.to_dict().items() if k != "source"}  # moving the table file changes nothing
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "size": list(image_size), "table": labelling},
                                  sort_keys=True).encode())
    for s in samples:
        for p in (s.image, *s.masks, *([s.roi] if s.roi is not None else [])):
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(b"|")  # sample boundary: K masks and a ROI are not confused
    return h.hexdigest()[:16]


def _slug(path):
    """A readable folder name for a split: its last two path components (camvid-train)."""
    p = Path(path).resolve()
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{p.parent.name}-{p.stem}").strip("._-") or "split"


def load_split(path, table, image_size, num_threads=2, progress=None, cache_dir=None, mask_suffix=None,
               roi=True, builder=True):
    """Decode every sample of a split once, check it and resize it to `image_size` (H, W).

    With `cache_dir`, the split is cached on disk in `cache_dir/<name>-HxW-<key>/` (see
    cache_key) and memory-mapped: the first call builds it, later ones (other runs, resumes, the
    other torchrun processes) map it at once. One process builds under a file lock while the
    others wait; a build is written to a temporary folder and renamed when complete, so a killed
    build is never mistaken for a cache. `builder=False` (the non-zero torchrun ranks) waits a
    few seconds for another process to take the lock before building itself. Without
    `cache_dir`, the split is decoded into memory."""
    samples = find_samples(path, mask_suffix, roi)
    size = tuple(int(s) for s in image_size)
    name = Path(path).name
    if cache_dir is None:
        return _build(samples, table, size, None, num_threads, progress, name)
    root = Path(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise DataError(f"cache folder {root} cannot be written ({e.strerror}); give --cache_dir DIR elsewhere, "
                        "or --cache 0 to decode per batch instead") from None
    final = root / f"{_slug(path)}-{size[0]}x{size[1]}-{cache_key(samples, table, size)}"
    built = None
    if not (final / "meta.json").is_file():
        built = _build_once(final, builder, lambda tmp: _build(samples, table, size, tmp, num_threads,
                                                                  progress, name))
    split = open_cache(final)
    if built is not None:
        mib = split_bytes(final) / 2**20
        stale = [p for p in root.glob(f"{final.name.rsplit('-', 1)[0]}-*") if p != final and p.is_dir()]
        split.notes.append(f"cached {name} in {final} ({mib:.0f} MiB, {built:.1f} s)"
                           + (f"; older caches of it, no longer used: {', '.join(str(p) for p in stale)}"
                              if stale else ""))
    return split


def _build_once(final, builder, build, grace_s=10.0):
    """Run build(tmp_folder) under a lock unless another process has built `final` meanwhile;
    rename the finished folder to `final`. Returns seconds spent building, or None."""
    lock_path = final.with_name(final.name + ".lock")
    deadline = time.monotonic() + (0 if builder else grace_s)
    with open(lock_path, "a") as lock:
        while time.monotonic() < deadline and not (final / "meta.json").is_file():
            time.sleep(0.2)  # let the main process take the lock (it shows the progress bar)
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process builds
        try:
            if (final / "meta.json").is_file():
                return None
            for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed build
                shutil.rmtree(stale, ignore_errors=True)
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            tmp.mkdir()
            t0 = time.perf_counter()
            try:
                build(tmp)
                _fsync_dir(tmp)
                os.rename(tmp, final)
                _fsync_dir(final.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return time.perf_counter() - t0
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def split_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def _build(samples, table, size, folder, num_threads, progress, name):
    """Decode, check and resize every sample into arrays: files in `folder` (memory-mapped
    later by open_cache), or memory when `folder` is None. Returns the Split (in memory) or None."""
    n, k = len(samples), len(samples[0].masks)
    h, w = size
    scan = scan_masks(samples, table, num_threads, progress, f"reading masks of {name}")
    coding = mask_coding(scan, table)
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([k * a * b for a, b in scan.shapes])
    mask_shape = (n, h, w) if k == 1 else (n, k, h, w)
    if folder is not None:
        need = n * 3 * h * w + math.prod(mask_shape) + int(offsets[-1])
        free = shutil.disk_usage(folder).free
        if need > 0.95 * free:
            raise DataError(f"cache folder {folder.parent} has {free / 2**30:.1f} GiB free but the cache of "
                            f"{name} needs {need / 2**30:.1f} GiB; give --cache_dir DIR on a larger disk, or "
                            "--cache 0 to decode per batch instead")

        def array(file, shape):
            return np.memmap(folder / file, np.uint8, "w+", shape=shape)
    else:
        def array(file, shape):
            return np.empty(shape, np.uint8)
    arrays = {"images": array("images.u8", (n, 3, h, w)), "masks": array("masks.u8", mask_shape),
              "labels": array("labels.u8", (max(1, int(offsets[-1])),))}
    shapes = np.zeros((n, 2), np.int64)

    def one(i):
        image, labels, snapped = decode_sample(samples[i], table, coding)  # labels (K, h0, w0)
        if labels.size != offsets[i + 1] - offsets[i]:
            raise DataError(f"mask {samples[i].masks[0]} changed while the split was read; run again")
        small = resize_mask(torch.from_numpy(labels), size).numpy()  # (K, H, W)
        arrays["images"][i] = resize_image(image, size).numpy()
        arrays["masks"][i] = small[0] if k == 1 else small
        arrays["labels"][offsets[i]:offsets[i + 1]] = labels.ravel()
        shapes[i] = labels.shape[1:]
        return _hist(labels), np.stack([_hist(m) for m in small]), snapped

    label_hist, small_hist, image_hist = (np.zeros(256, np.int64) for _ in range(3))
    snapped = 0
    with ThreadPoolExecutor(max(1, num_threads)) as pool:  # PIL decoding releases the GIL
        results = pool.map(one, range(n))
        if progress:
            results = progress(results, total=n, desc=f"caching {name}" if folder is not None else f"decoding {name}")
        try:
            for full, small, s in results:
                label_hist += full
                small_hist += small.sum(0)
                image_hist += (small > 0).sum(0) * (h * w)
                snapped += s
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # a bad file: stop at once, not after the rest
            raise
    stats = class_stats_from_hist(label_hist, small_hist, image_hist, table, snapped)
    notes = [note for note in coding.note.split("; ") if note]
    labelled = stats["label_total"]
    if snapped:
        notes.append(_snapped_note(snapped, labelled, name))
    if labelled and stats["void_pixels"] > 0.5 * labelled:
        notes.append(f"warning: {100 * stats['void_pixels'] / labelled:.0f}% of the mask pixels of {name} are void "
                     f"({table.ignore_index}); check --ignore_index and the class table")
    names = [s.image.stem for s in samples]
    if folder is None:
        return Split(images=torch.from_numpy(arrays["images"]), masks=torch.from_numpy(arrays["masks"]),
                     label_masks=LabelMasks(arrays["labels"], offsets, shapes, k), names=names, stats=stats,
                     notes=notes)
    for a in arrays.values():
        a.flush()
    arrays.clear()  # unmapped: the files are complete
    np.save(folder / "offsets.npy", offsets)
    np.save(folder / "shapes.npy", shapes)
    meta = {"version": CACHE_VERSION, "count": n, "annotators": k, "size": [h, w], "names": names,
            "sources": [[str(s.image), *map(str, s.masks), str(s.roi) if s.roi else None] for s in samples],
            "table": table.to_dict(), "stats": stats, "notes": notes}
    for file in folder.iterdir():
        with open(file, "rb+") as f:
            os.fsync(f.fileno())
    tmp = folder / "meta.json.tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / "meta.json")  # written last: a folder with meta.json is complete
    return None


def open_cache(folder):
    """The Split of a cache folder, memory-mapped copy-on-write (mode "c"): torch.from_numpy
    takes the maps without a copy, and nothing is ever written back to the files."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    n, k, (h, w) = meta["count"], meta["annotators"], meta["size"]
    images = np.memmap(folder / "images.u8", np.uint8, "c", shape=(n, 3, h, w))
    masks = np.memmap(folder / "masks.u8", np.uint8, "c", shape=(n, h, w) if k == 1 else (n, k, h, w))
    flat = np.memmap(folder / "labels.u8", np.uint8, "c")
    labels = LabelMasks(flat, np.load(folder / "offsets.npy"), np.load(folder / "shapes.npy"), k)
    return Split(images=torch.from_numpy(images), masks=torch.from_numpy(masks), label_masks=labels,
                 names=meta["names"], stats=meta["stats"], notes=list(meta["notes"]), cache=str(folder))


# ---------------------------------------------------------------------------------------------
# class statistics


def class_stats_from_hist(label_hist, small_hist, image_hist, table, snapped=0):
    """Per-class counts for the log and for median-frequency weights: `pixels` (at the training
    size), `image_pixels` (pixels of the masks holding the class, at the training size),
    `label_pixels` (at each label's own size); void and snapped pixel counts."""
    c, void = table.num_classes, table.ignore_index
    return {"pixels": [int(v) for v in small_hist[:c]], "image_pixels": [int(v) for v in image_hist[:c]],
            "label_pixels": [int(v) for v in label_hist[:c]], "void_pixels": int(label_hist[void]),
            "label_total": int(label_hist.sum()), "snapped_pixels": int(snapped)}


def class_stats(masks, label_masks, table):
    """class_stats_from_hist of masks (N, [K,] H, W) and their full-size labels."""
    def hist(m):
        return torch.bincount(m.flatten().long(), minlength=256)

    small = torch.stack([hist(m) for m in masks.reshape(-1, *masks.shape[-2:])])  # (N * K, 256)
    full = sum((hist(m) for m in label_masks), torch.zeros(256, dtype=torch.long))
    hw = masks.shape[-1] * masks.shape[-2]
    return class_stats_from_hist(full.numpy(), small.sum(0).numpy(), ((small > 0).sum(0) * hw).numpy(), table)


def absent_classes(stats, table):
    """Names of the classes no mask holds: the signature of a wrong label mapping."""
    return [name for name, n in zip(table.names, stats["label_pixels"]) if n == 0]


def normalize(images):
    """uint8 (B, 3, H, W) -> float, ImageNet mean/std (any fixed affine map works; this one is
    what users of pretrained encoders expect). One fused multiply-add, no uint8 -> float copy."""
    scale, shift = normalization(images.device)
    return torch.addcmul(shift.view(1, 3, 1, 1), images, scale.view(1, 3, 1, 1))


def normalization(device):
    """Per-channel (scale, shift) of `normalize`: x * scale + shift."""
    std = torch.tensor(IMAGENET_STD, device=device)
    return 1 / (std * 255), -torch.tensor(IMAGENET_MEAN, device=device) / std


def draw_annotations(masks, generator):
    """(B, K, H, W) masks of K annotators -> (B, H, W): one annotation per image, drawn uniformly."""
    pick = torch.randint(0, masks.shape[1], (masks.shape[0],), generator=generator).to(masks.device)
    return masks[torch.arange(masks.shape[0], device=masks.device), pick]


# ---------------------------------------------------------------------------------------------
# augmentation


def uniform(n, lo, hi, generator):
    """n draws from U(lo, hi) on the CPU, from `generator` (the augmentations' shared draw)."""
    return torch.rand(n, generator=generator).mul_(hi - lo).add_(lo)


def augment(images, masks, generator, ignore_index, scale=(0.75, 1.5), flip=True, jitter=0.2, out_size=None,
            rotate=0.0):
    """Random zoom, shift and horizontal flip applied jointly to a batch of images (bilinear)
    and masks (nearest: labels are never interpolated), plus brightness/contrast/saturation
    jitter on the images. One batched grid_sample instead of a Python loop per sample.

    images: (B, 3, H, W) uint8 (normalized on the way, in the same pass as the jitter) or float
    (already normalized); masks: (B, H, W) integer (uint8 is cheapest). Returns normalized float
    images and int64 masks. Pixels pulled in from outside the image become void. `out_size`
    (h, w) returns random crops of that size (at zoom 1 a crop keeps the input's pixel scale);
    default: the input size. `generator` makes the draw reproducible.
    """
    b = images.shape[0]
    dev = images.device
    big_h, big_w = images.shape[-2:]
    h, w = out_size or (big_h, big_w)

    def u(lo, hi):
        return uniform(b, lo, hi, generator)

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
    # F.affine_grid's grid, by broadcasting (affine_grid runs a batched matmul over every pixel):
    # output pixel centres at (2j + 1) / w - 1, (2i + 1) / h - 1 (align_corners=False)
    xs = (torch.arange(w, device=dev, dtype=theta.dtype) * 2 + 1) / w - 1  # (w,)
    ys = (torch.arange(h, device=dev, dtype=theta.dtype) * 2 + 1) / h - 1  # (h,)
    t = theta[:, :, :, None, None]  # (B, 2, 3, 1, 1)
    grid = (t[:, :, 0] * xs + t[:, :, 1] * ys[:, None] + t[:, :, 2]).permute(0, 2, 3, 1)  # (B, h, w, 2)
    raw = images.dtype == torch.uint8
    out = F.grid_sample(images.float() if raw else images, grid.to(torch.float32 if raw else images.dtype),
                        mode="bilinear", padding_mode="reflection", align_corners=False)
    out_masks = nearest_labels(masks, theta, (h, w), ignore_index)
    if not (jitter or raw):
        return out, out_masks
    # One colour map per image, z = A x + o, applied by one batched matrix product that reads the
    # batch once (a (C, C) x (C, pixels) product: the (pixels, C) x (C, C) form that would write
    # channels-last directly measured 5x slower on CPU). It holds the normalization y = D x + t
    # of uint8 input and the jitter: saturation s, then contrast c about the image mean, then
    # brightness, M y + (1 - c) mean + 4 bright with M = c s I + c (1 - s) / C (mixing with the
    # grey image keeps the mean, so the contrast pivot is the mean of the input).
    c = out.shape[1]
    d, t = normalization(dev) if raw else (torch.ones(c, device=dev), torch.zeros(c, device=dev))
    eye = torch.eye(c, device=dev)
    if jitter:
        bright = u(-jitter, jitter).view(b, 1, 1).to(dev)
        contrast = u(1 - jitter, 1 + jitter).view(b, 1, 1).to(dev)
        sat = u(1 - jitter, 1 + jitter).view(b, 1, 1).to(dev)
        m = contrast * sat * eye + contrast * (1 - sat) / c  # (B, C, C)
        mean = (out.float().mean((2, 3)) * d + t).mean(1).view(b, 1, 1)  # of the normalized image
        offset = m @ t.view(c, 1) + (1 - contrast) * mean + bright * 4  # (B, C, 1)
    else:
        m, offset = eye.expand(b, c, c), t.view(1, c, 1).expand(b, c, 1)
    a = m * d.view(1, 1, c)  # A = M D
    out = torch.baddbmm(offset.to(out.dtype), a.to(out.dtype), out.reshape(b, c, h * w)).view(b, c, h, w)
    return out, out_masks


def cutmix(images, masks, generator, prob, area=(0.1, 0.4)):
    """CutMix for segmentation (Yun et al. 2019; French et al. 2020): with probability `prob`
    each image of the batch gets a box of another image of the batch (the next one) pasted in,
    its labels with it, so that objects appear in scenes they were not recorded in. The box
    covers a share of the image drawn from `area`, with an aspect ratio between 1/2 and 2.
    images (B, C, h, w), masks (B, h, w); returns new tensors."""
    b, h, w = masks.shape

    def u(lo, hi):
        return uniform(b, lo, hi, generator)

    on = torch.rand(b, generator=generator) < prob
    share, aspect = u(*area), torch.exp(u(math.log(0.5), math.log(2.0)))
    bh = (share / aspect).sqrt().mul(h).clamp(max=h)  # box height and width in pixels
    bw = (share * aspect).sqrt().mul(w).clamp(max=w)
    top, left = u(0, 1) * (h - bh), u(0, 1) * (w - bw)
    dev = masks.device
    ys, xs = torch.arange(h, device=dev).view(1, h, 1), torch.arange(w, device=dev).view(1, 1, w)

    def col(t):
        return t.to(dev).view(b, 1, 1)

    box = ((ys >= col(top)) & (ys < col(top + bh)) & (xs >= col(left)) & (xs < col(left + bw))
           & col(on))  # (B, h, w)
    if b < 2 or not bool(box.any()):
        return images, masks
    src = torch.roll(torch.arange(b, device=dev), -1)
    return (torch.where(box[:, None], images[src], images), torch.where(box, masks[src], masks))


def nearest_labels(masks, theta, size, ignore_index):
    """Labels of (B, H, W) `masks` at the sampling grid of `theta` (B, 2, 3) (normalized, as
    F.affine_grid, align_corners False) of output `size` (h, w): the nearest pixel, void outside
    the image; what grid_sample's nearest mode gives. Read by one integer gather from the masks
    framed by one void pixel; without rotation each row index depends on the output row alone
    and each column index on the output column, so only those vectors are computed."""
    b, big_h, big_w = masks.shape
    h, w = size
    xs = (torch.arange(w, device=masks.device, dtype=theta.dtype) * 2 + 1) / w - 1  # output pixel centres
    ys = (torch.arange(h, device=masks.device, dtype=theta.dtype) * 2 + 1) / h - 1

    def framed_index(t, n):
        """Index into the framed axis of length n + 2 of g = t0 x + t1 y + t2: input pixel
        ((g + 1) n - 1) / 2, nearest = floor((g + 1) n / 2); -1 and n land on the frame."""
        g = t[:, 2].view(b, 1, 1)
        if bool((t[:, 0] != 0).any()):
            g = g + t[:, 0].view(b, 1, 1) * xs  # (B, 1, w)
        if bool((t[:, 1] != 0).any()):
            g = g + t[:, 1].view(b, 1, 1) * ys[:, None]  # (B, h, 1) or (B, h, w)
        return g.add(1).mul_(n / 2).floor_().clamp_(-1, n).add_(1).long()

    index = framed_index(theta[:, 1], big_h) * (big_w + 2) + framed_index(theta[:, 0], big_w)
    framed = F.pad(masks, (1, 1, 1, 1), value=ignore_index).view(b, -1)
    return framed.gather(1, index.expand(b, h, w).reshape(b, -1)).view(b, h, w).long()


# ---------------------------------------------------------------------------------------------
# the synthetic demo set

DEMO_CLASSES = ["background", "disc", "square", "triangle"]
DEMO_COLOURS = [(40, 40, 40), (230, 80, 60), (70, 170, 230), (250, 210, 60)]
DEMO_VOID = 255
DEMO_SIZE = (64, 64)


def demo_table():
    return ClassTable(names=list(DEMO_CLASSES), colours=list(DEMO_COLOURS), ignore_index=DEMO_VOID,
                      void_colour=(0, 0, 0), source="the built-in demo set")


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
    small = torch.stack([resize_mask(m, image_size) for m in masks])
    return Split(images=torch.stack([resize_image(i, image_size) for i in images]), masks=small,
                 label_masks=label_masks, names=[f"demo_{seed}_{i:04d}" for i in range(n)],
                 stats=class_stats(small, label_masks, demo_table()))


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
