"""Dataset formats as they are published, on tiny copies the tests write: Kaggle/SMP folders with
suffixed colour masks and class_dict.csv, CamVid's label_colors.txt, Pascal VOC ID lists with
palette PNGs, binary masks (0/1, 0/255; PNG, GIF, TIFF, JPEG), DRIVE's field-of-view masks,
several annotators; and the on-disk cache: reuse, invalidation, a killed build, two processes."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

import dataset
from dataset import DataError

# CamVid's 32-colour table as Kaggle ships it: Void sits between Truck_Bus and Wall (a subset here).
CLASS_DICT = ("name,r,g,b\nAnimal, 64, 128, 64\nSky, 128, 128, 128\nTruck_Bus, 192, 128, 192\nVoid, 0, 0, 0\n"
              "Wall, 64, 192, 0\n")
COLOURS = [(64, 128, 64), (128, 128, 128), (192, 128, 192), (64, 192, 0)]  # classes 0-3; void black


def label_map(rng, h=12, w=16, values=(0, 1, 2, 3), void=None, block=4):
    """Blocky labels (block x block pixels, so nearest resizing keeps them), every value present."""
    blocks = rng.choice(values, (h // block, w // block))
    blocks.flat[:len(values)] = values
    m = blocks.repeat(block, 0).repeat(block, 1).astype(np.uint8)
    if void is not None:
        m[0, :] = void
    return m


def save_rgb(path, labels, colours, void_colour=(0, 0, 0), void=255, **kw):
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    for i, c in enumerate(colours):
        rgb[labels == i] = c
    rgb[labels == void] = void_colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, **kw)


def save_image(path, h=12, w=16, seed=0, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, **kw)


def kaggle_camvid(root, n=3, seed=0, h=12, w=16, block=4):
    """root/train/NAME.png + root/train_labels/NAME_L.png colour masks + root/class_dict.csv."""
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        name = f"0001TP_{6690 + 30 * i:06d}"
        save_image(root / "train" / f"{name}.png", h, w, seed=i)
        labels = label_map(rng, h, w, void=255, block=block)
        save_rgb(root / "train_labels" / f"{name}_L.png", labels, COLOURS)
        truth[name] = labels
    (root / "class_dict.csv").write_text(CLASS_DICT)
    return truth


# --- class tables -------------------------------------------------------------------------


def test_class_dict_with_void_among_the_classes(tmp_path):
    p = tmp_path / "class_dict.csv"
    p.write_text(CLASS_DICT)
    t = dataset.read_class_table(p)
    assert t.names == ["Animal", "Sky", "Truck_Bus", "Wall"]  # Void skipped, Wall is class 3
    assert t.colours == COLOURS and t.void_colour == (0, 0, 0) and t.ignore_index == 255
    assert t.values == [0, 1, 2, 4] and t.void_value == 3  # index masks hold row numbers


def test_camvid_label_colors_txt(tmp_path):
    p = tmp_path / "label_colors.txt"
    p.write_text("64 128 64\tAnimal\n192 0 128\tArchway\n0 0 0\tVoid\n64 192 0\tWall\n")
    t = dataset.read_class_table(p)
    assert t.names == ["Animal", "Archway", "Wall"] and t.colours[2] == (64, 192, 0) and t.void_colour == (0, 0, 0)
    p.write_text("r g b name\n64 128 64\tAnimal\n0 0 0\tVoid\n")  # a header line
    assert dataset.read_class_table(p).names == ["Animal"]


def test_header_detected_and_no_data_row_swallowed(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("road,128,64,128\ncar,64,0,128\n")  # no header: the first row is a class
    assert dataset.read_class_table(p).names == ["road", "car"]
    p.write_text("0,road,128,64,128\r\n1,car,64,0,128\r\n")
    assert dataset.read_class_table(p).names == ["road", "car"]
    p.write_text("\ufeffname, r, g, b\r\nroad, 128, 64, 128\r\n")  # BOM, spaces, CRLF
    assert dataset.read_class_table(p).names == ["road"]


def test_cvat_labelmap(tmp_path):
    p = tmp_path / "labelmap.txt"
    p.write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\ncat:255,0,0::\n")
    t = dataset.read_class_table(p)
    assert t.names == ["background", "cat"] and t.colours == [(0, 0, 0), (255, 0, 0)]


def test_class_table_round_trips_through_a_checkpoint(tmp_path):
    p = tmp_path / "class_dict.csv"
    p.write_text(CLASS_DICT)
    t = dataset.read_class_table(p)
    torch.save({"class_table": t.to_dict()}, tmp_path / "c.pt")
    back = dataset.ClassTable.from_dict(torch.load(tmp_path / "c.pt", weights_only=True)["class_table"])
    assert back == t and back.void_colour == (0, 0, 0)


def test_duplicate_colour_refused(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("name,r,g,b\na,1,2,3\nb,1,2,3\n")
    with pytest.raises(DataError, match=r"\(1, 2, 3\)"):
        dataset.read_class_table(p)


# --- Kaggle / SMP layout ------------------------------------------------------------------


def test_kaggle_camvid_trains_out_of_the_box(tmp_path):
    truth = kaggle_camvid(tmp_path)
    table = dataset.make_class_table(None, tmp_path / "train")  # class_dict.csv found in the parent
    split = dataset.load_split(tmp_path / "train", table, (8, 8))
    assert split.names == sorted(truth)
    for name, label in zip(split.names, split.label_masks):
        expected = truth[name].copy()
        expected[expected == 3] = 255  # the test's label 3 is coloured with Wall's colour, class 3
        expected[truth[name] == 3] = 3
        assert torch.equal(label, torch.from_numpy(expected))
    assert dataset.absent_classes(split.stats, table) == []


@pytest.mark.parametrize("sibling,suffix", [("_labels", "_L"), ("_masks", "_mask"), ("annot", ""),
                                            ("_gt", "_gt")])
def test_sibling_label_folders_and_suffixes(tmp_path, sibling, suffix):
    (tmp_path / f"train{sibling}").mkdir()
    for i in range(2):
        save_image(tmp_path / "train" / f"{i:03d}.png")
        Image.fromarray(np.full((12, 16), i, np.uint8)).save(tmp_path / f"train{sibling}" / f"{i:03d}{suffix}.png")
    pairs = dataset.find_pairs(tmp_path / "train")
    assert [(i.name, m.name) for i, m in pairs] == [(f"{i:03d}.png", f"{i:03d}{suffix}.png") for i in range(2)]


def test_several_masks_per_image_need_mask_suffix(tmp_path):
    for i in range(2):
        save_image(tmp_path / "train" / f"{i:03d}.png")
        save_image(tmp_path / "train_labels" / f"{i:03d}_L.png")
        save_image(tmp_path / "train_labels" / f"{i:03d}_instance.png")
    with pytest.raises(DataError, match="--mask_suffix '_L'") as e:
        dataset.find_pairs(tmp_path / "train")
    assert "000_L.png" in str(e.value) and "000_instance.png" in str(e.value)
    pairs = dataset.find_pairs(tmp_path / "train", mask_suffix="_L")
    assert [m.name for _, m in pairs] == ["000_L.png", "001_L.png"]
    assert [m.name for _, m in dataset.find_pairs(tmp_path / "train", mask_suffix="_instance.png")] == \
        ["000_instance.png", "001_instance.png"]


def test_unpaired_with_suffix_names_the_files(tmp_path):
    for i in range(3):
        save_image(tmp_path / "train" / f"{i:03d}.png")
    for i in range(2):
        save_image(tmp_path / "train_labels" / f"{i:03d}_L.png")
    with pytest.raises(DataError, match="002.png"):
        dataset.find_pairs(tmp_path / "train")


def test_jpeg_colour_masks_are_snapped_and_counted(tmp_path):
    truth = kaggle_camvid(tmp_path, n=2, h=64, w=96, block=16)
    for p in (tmp_path / "train_labels").iterdir():  # the same masks saved lossily
        Image.open(p).save(p.with_suffix(".jpg"), quality=75)
        p.unlink()
    table = dataset.make_class_table(None, tmp_path / "train")
    split = dataset.load_split(tmp_path / "train", table, (8, 8))
    assert split.stats["snapped_pixels"] > 0 and any("snapped" in n for n in split.notes)
    for name, label in zip(split.names, split.label_masks):
        expected = np.where(truth[name] == 255, 255, truth[name])
        agree = (label.numpy() == expected).mean()
        assert agree > 0.99, agree  # JPEG blurs the block edges only


def test_png_colour_mask_with_unknown_colour_is_refused(tmp_path):
    kaggle_camvid(tmp_path, n=2)
    p = tmp_path / "train_labels" / "0001TP_006690_L.png"
    a = np.array(Image.open(p))
    a[3, 4] = (1, 2, 3)
    Image.fromarray(a).save(p)
    table = dataset.make_class_table(None, tmp_path / "train")
    with pytest.raises(DataError, match=r"\(1, 2, 3\)") as e:
        dataset.load_split(tmp_path / "train", table, (8, 8))
    assert str(p) in str(e.value)


# --- Pascal VOC ---------------------------------------------------------------------------


def voc(root, n=4, classes=21):
    rng = np.random.default_rng(0)
    pal = [c for rgb in dataset.voc_colormap(256) for c in rgb]
    ids = [f"2007_{i:06d}" for i in range(n)]
    for i, name in enumerate(ids):
        save_image(root / "JPEGImages" / f"{name}.jpg", seed=i)
        values = tuple(range(i * 7, i * 7 + 7)) if i < 3 else (0, 5, 10, 20)  # the training images hold all 21
        m = label_map(rng, values=values if classes == 21 else (0, 1, 2), void=255)
        img = Image.fromarray(m, mode="P")
        img.putpalette(pal)
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        img.save(root / "SegmentationClass" / f"{name}.png")
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_bytes("".join(f"{i}\r\n" for i in ids[:3]).encode())  # CRLF, as some copies have
    (lists / "val.txt").write_text(f"{ids[3]}\n")
    return lists


def test_voc_id_list_with_palette_masks_and_no_class_table(tmp_path):
    lists = voc(tmp_path / "VOC2012")
    samples = dataset.find_samples(lists / "train.txt")
    assert [s.image.name for s in samples] == ["2007_000000.jpg", "2007_000001.jpg", "2007_000002.jpg"]
    assert samples[0].masks[0].parent.name == "SegmentationClass"
    table = dataset.make_class_table(None, lists / "val.txt")  # the class count: the largest value seen, 20
    assert table.num_classes == 21 and table.names == dataset.VOC_CLASSES and table.ignore_index == 255
    assert table.colours[15] == (192, 128, 128) and table.void_colour == (224, 224, 192)
    split = dataset.load_split(lists / "val.txt", table, (8, 8))
    assert set(split.label_masks[0].unique().tolist()) == {0, 5, 10, 20, 255}
    assert dataset.make_class_table(None, lists / "train.txt").num_classes == 21


def test_voc_palette_gives_the_classes_of_a_custom_set(tmp_path):
    lists = voc(tmp_path / "VOCcustom", classes=3)
    table = dataset.make_class_table(None, lists / "train.txt")
    assert table.names == ["class_0", "class_1", "class_2"] and table.colours[1] == (128, 0, 0)


def test_voc_root_names_the_lists(tmp_path):
    voc(tmp_path / "VOC2012")
    with pytest.raises(DataError, match="train.txt") as e:
        dataset.find_samples(tmp_path / "VOC2012")
    assert "val.txt" in str(e.value) and "ImageSets" in str(e.value)


def test_id_list_outside_voc_is_refused(tmp_path):
    (tmp_path / "ids.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="'image_path mask_path'"):
        dataset.find_samples(tmp_path / "ids.txt")


# --- binary masks -------------------------------------------------------------------------


def binary_split(root, ext, high=255, n=3, mode="L", **kw):
    rng = np.random.default_rng(1)
    truth = []
    for i in range(n):
        save_image(root / "images" / f"{i:02d}.png", seed=i)
        m = label_map(rng, values=(0, 1))
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray((m * high).astype(np.uint8)).convert(mode).save(root / "masks" / f"{i:02d}{ext}", **kw)
        truth.append(m)
    return truth


@pytest.mark.parametrize("ext,high,mode", [(".png", 255, "L"), (".png", 1, "L"), (".gif", 255, "L"),
                                           (".gif", 1, "P"), (".tif", 255, "L"), (".tif", 255, "1"),
                                           (".png", 255, "RGB")])
def test_binary_masks_255_is_foreground(tmp_path, ext, high, mode):
    truth = binary_split(tmp_path / "s", ext, high, mode=mode)
    table = dataset.make_class_table(None, tmp_path / "s", num_classes=2)  # the issue's --num_classes 2
    split = dataset.load_split(tmp_path / "s", table, (12, 16))
    for label, m in zip(split.label_masks, truth):
        assert torch.equal(label, torch.from_numpy(m))  # never void
    assert split.stats["void_pixels"] == 0 and split.stats["label_pixels"][1] > 0
    assert dataset.absent_classes(split.stats, table) == []
    stored = Image.open(tmp_path / "s" / "masks" / f"00{ext}")  # mode 1 stores bits: 0/1
    assert (stored.mode != "1" and high == 255) == any("255 read as class 1" in n for n in split.notes)


def test_binary_masks_without_any_table(tmp_path):
    truth = binary_split(tmp_path / "s", ".png")
    table = dataset.make_class_table(None, tmp_path / "s")  # no --num_classes either
    assert table.names == ["background", "foreground"] and table.ignore_index == 255
    split = dataset.load_split(tmp_path / "s", table, (12, 16))
    assert torch.equal(split.label_masks[0], torch.from_numpy(truth[0]))


def test_jpeg_binary_masks_are_snapped(tmp_path):
    truth = binary_split(tmp_path / "s", ".jpg", quality=70)
    for mode in ("L", "RGB"):  # once grey JPEGs, once RGB JPEGs (the old TypeError)
        if mode == "RGB":
            for p in (tmp_path / "s" / "masks").iterdir():
                Image.open(p).convert("RGB").save(p, quality=70)
        for table in (dataset.make_class_table(None, tmp_path / "s", num_classes=2),
                      dataset.make_class_table(None, tmp_path / "s")):
            split = dataset.load_split(tmp_path / "s", table, (12, 16))
            assert split.stats["snapped_pixels"] > 0 and any("snapped" in n for n in split.notes)
            for label, m in zip(split.label_masks, truth):
                assert (label.numpy() == m).mean() > 0.97 and split.stats["void_pixels"] == 0


def test_zero_one_masks_with_void_255_keep_void(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(2):
        save_image(tmp_path / "s" / "images" / f"{i}.png")
        (tmp_path / "s" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_map(rng, values=(0, 1), void=255)).save(tmp_path / "s" / "masks" / f"{i}.png")
    table = dataset.make_class_table(None, tmp_path / "s", num_classes=2)
    split = dataset.load_split(tmp_path / "s", table, (12, 16))
    assert split.stats["void_pixels"] == 2 * 16 and not any("255 read as" in n for n in split.notes)


def test_single_mask_with_0_255_reads_255_as_foreground(tmp_path):
    binary_split(tmp_path / "s", ".png")
    table = dataset.make_class_table(None, None, num_classes=2)
    assert set(dataset.load_mask(tmp_path / "s" / "masks" / "00.png", table).unique().tolist()) == {0, 1}


def test_grey_masks_of_unknown_meaning_ask_for_num_classes(tmp_path):
    rng = np.random.default_rng(3)
    for i in range(2):
        save_image(tmp_path / "s" / "images" / f"{i}.png")
        (tmp_path / "s" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_map(rng, values=(0, 3, 7))).save(tmp_path / "s" / "masks" / f"{i}.png")
    with pytest.raises(DataError, match="--num_classes") as e:
        dataset.make_class_table(None, tmp_path / "s")
    assert "0-7" in str(e.value)


# --- region of interest (DRIVE) -----------------------------------------------------------


def drive(root, n=2, second=False):
    """DRIVE's layout: images/21_training.tif, 1st_manual/21_manual1.gif (vessels 255),
    mask/21_training_mask.gif (the field of view, 255 inside)."""
    rng = np.random.default_rng(4)
    fov = np.zeros((12, 16), np.uint8)
    fov[2:10, 2:14] = 255
    truth = []
    for i in range(21, 21 + n):
        save_image(root / "images" / f"{i}_training.tif", seed=i)
        for sub in ["1st_manual", "mask"] + ["2nd_manual"] * second:
            (root / sub).mkdir(parents=True, exist_ok=True)
        vessels = label_map(rng, values=(0, 1))
        Image.fromarray(vessels * 255).save(root / "1st_manual" / f"{i}_manual1.gif")
        if second:
            Image.fromarray((1 - vessels) * 255).save(root / "2nd_manual" / f"{i}_manual2.gif")
        Image.fromarray(fov).save(root / "mask" / f"{i}_training_mask.gif")
        truth.append(np.where(fov > 0, vessels, 255))
    return truth


def test_drive_layout_labels_and_field_of_view(tmp_path):
    truth = drive(tmp_path / "training")
    samples = dataset.find_samples(tmp_path / "training")
    assert [(s.image.name, s.masks[0].name, s.roi.name) for s in samples][0] == \
        ("21_training.tif", "21_manual1.gif", "21_training_mask.gif")  # mask/ is the FOV, not the labels
    table = dataset.make_class_table(None, tmp_path / "training")
    assert table.num_classes == 2
    split = dataset.load_split(tmp_path / "training", table, (12, 16))
    for label, t in zip(split.label_masks, truth):
        assert torch.equal(label, torch.from_numpy(t.astype(np.uint8)))  # void outside the field of view
    assert dataset.load_split(tmp_path / "training", table, (12, 16), roi=False).stats["void_pixels"] == 0


def test_roi_column_in_list_files(tmp_path):
    drive(tmp_path / "d")
    d = tmp_path / "d"
    (tmp_path / "list.txt").write_text("d/images/21_training.tif d/1st_manual/21_manual1.gif "
                                       "roi=d/mask/21_training_mask.gif\n")
    (s,) = dataset.find_samples(tmp_path / "list.txt")
    assert s.masks == (d / "1st_manual" / "21_manual1.gif",) and s.roi == d / "mask" / "21_training_mask.gif"


# --- several annotators -------------------------------------------------------------------


def test_annotators_from_list_file_folders_and_drive(tmp_path):
    drive(tmp_path / "test", second=True)
    table = dataset.ClassTable(["background", "vessel"], [None, None], 255)
    by_drive = dataset.load_split(tmp_path / "test", table, (6, 8))
    assert by_drive.masks.shape == (2, 2, 6, 8) and by_drive.annotators == 2
    assert by_drive.label_masks[0].shape == (2, 12, 16)
    a, b = by_drive.label_masks[0]
    inside = a != 255
    assert torch.equal(a[inside], 1 - b[inside])  # the second annotator is the complement here

    t = tmp_path / "test"
    (tmp_path / "list.txt").write_text("".join(f"test/images/{i}_training.tif test/1st_manual/{i}_manual1.gif "
                                               f"test/2nd_manual/{i}_manual2.gif\n" for i in (21, 22)))
    by_list = dataset.load_split(tmp_path / "list.txt", table, (6, 8), roi=False)
    folders = tmp_path / "f"
    for k, sub in enumerate(("1st_manual", "2nd_manual")):
        (folders / "masks" / f"rater{k}").mkdir(parents=True)
        for i in (21, 22):
            os.link(t / sub / f"{i}_manual{k + 1}.gif", folders / "masks" / f"rater{k}" / f"{i}.gif")
    (folders / "images").mkdir()
    for i in (21, 22):
        os.link(t / "images" / f"{i}_training.tif", folders / "images" / f"{i}.tif")
    by_folder = dataset.load_split(folders, table, (6, 8))
    assert torch.equal(by_list.masks, by_folder.masks) and by_list.masks.shape == (2, 2, 6, 8)
    assert by_list.stats["label_pixels"][1] == by_folder.stats["label_pixels"][1] > 0

    gen = torch.Generator().manual_seed(0)
    drawn = dataset.draw_annotations(by_list.masks, gen)
    assert drawn.shape == (2, 6, 8) and all(any(torch.equal(drawn[i], by_list.masks[i, k]) for k in range(2))
                                            for i in range(2))


def test_one_annotation_of_a_multi_annotator_split(tmp_path):
    drive(tmp_path / "test", second=True)
    table = dataset.ClassTable(["background", "vessel"], [None, None], 255)
    both = dataset.load_split(tmp_path / "test", table, (6, 8))
    second = both.annotation(1)
    assert second.annotators == 1 and torch.equal(second.masks, both.masks[:, 1])
    assert torch.equal(second.label_masks[1], both.label_masks[1][1])
    lazy = dataset.DecodingSplit(dataset.SegmentationDataset(tmp_path / "test", table, (6, 8))).annotation(1)
    assert torch.equal(lazy.masks[[0, 1]], second.masks) and torch.equal(lazy.label_masks[0], second.label_masks[0])
    image, target = dataset.SegmentationDataset(tmp_path / "test", table).annotation(1)[1]
    assert target.shape == (12, 16) and torch.equal(target, second.label_masks[1])


def test_annotator_count_must_agree(tmp_path):
    drive(tmp_path / "test", second=True)
    (tmp_path / "list.txt").write_text("test/images/21_training.tif test/1st_manual/21_manual1.gif "
                                       "test/2nd_manual/21_manual2.gif\n"
                                       "test/images/22_training.tif test/1st_manual/22_manual1.gif\n")
    with pytest.raises(DataError, match="line 2 has 1 masks but line 1 has 2"):
        dataset.find_samples(tmp_path / "list.txt")


# --- absent classes -----------------------------------------------------------------------


def test_class_never_in_the_masks_is_named(tmp_path):
    kaggle_camvid(tmp_path)
    (tmp_path / "class_dict.csv").write_text(CLASS_DICT + "Tunnel, 64, 0, 64\n")
    table = dataset.make_class_table(None, tmp_path / "train")
    split = dataset.load_split(tmp_path / "train", table, (8, 8))
    assert dataset.absent_classes(split.stats, table) == ["Tunnel"]


def test_stats_match_the_masks(tmp_path):
    kaggle_camvid(tmp_path, n=4)
    table = dataset.make_class_table(None, tmp_path / "train")
    split = dataset.load_split(tmp_path / "train", table, (8, 8))
    assert split.stats == dataset.class_stats(split.masks, split.label_masks, table)


# --- the Dataset --------------------------------------------------------------------------


def test_dataset_with_dataloader_workers_matches_the_split(tmp_path):
    kaggle_camvid(tmp_path, n=5)
    table = dataset.make_class_table(None, tmp_path / "train")
    split = dataset.load_split(tmp_path / "train", table, (8, 8))
    ds = dataset.SegmentationDataset(tmp_path / "train", table, image_size=(8, 8), with_label=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=dataset.collate_with_labels)
    batches = list(loader)
    images, masks = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    labels = [label for b in batches for label in b[2]]
    assert torch.equal(images, split.images) and torch.equal(masks, split.masks)
    assert all(torch.equal(a, b) for a, b in zip(labels, split.label_masks))
    assert dataset.dataset_stats(ds) == split.stats  # what --cache 0 computes for the class weights
    lazy = dataset.DecodingSplit(ds)  # validation without a cache
    assert torch.equal(lazy.images[[3, 1]], split.images[[3, 1]]) and torch.equal(lazy.masks[2:4], split.masks[2:4])
    assert torch.equal(lazy.label_masks[4], split.label_masks[4]) and len(lazy) == 5
    image, mask = dataset.SegmentationDataset(tmp_path / "train", table)[0]  # no size: the file's own
    assert image.shape == (3, 12, 16) and mask.shape == (12, 16) and mask.dtype == torch.uint8


# --- the cache ----------------------------------------------------------------------------


def cached(path, table, cache, size=(8, 8)):
    return dataset.load_split(path, table, size, cache_dir=cache)


def test_cache_is_built_once_then_mapped(tmp_path):
    kaggle_camvid(tmp_path / "d", n=4)
    table = dataset.make_class_table(None, tmp_path / "d" / "train")
    memory = dataset.load_split(tmp_path / "d" / "train", table, (8, 8))
    first = cached(tmp_path / "d" / "train", table, tmp_path / "cache")
    assert any(n.startswith("cached train") for n in first.notes)
    second = cached(tmp_path / "d" / "train", table, tmp_path / "cache")
    assert second.cache == first.cache and not any(n.startswith("cached") for n in second.notes)
    assert torch.equal(second.images, memory.images) and torch.equal(second.masks, memory.masks)
    assert all(torch.equal(a, b) for a, b in zip(second.label_masks, memory.label_masks))
    assert second.stats == memory.stats and second.names == memory.names
    folders = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "meta.json").is_file()
    base = second.images.untyped_storage().data_ptr()
    assert np.memmap(folders[0] / "images.u8", np.uint8, "r").shape[0] == 4 * 3 * 8 * 8 and base  # a file map


def test_cache_is_invalidated_by_files_size_and_table(tmp_path):
    kaggle_camvid(tmp_path / "d", n=2)
    train = tmp_path / "d" / "train"
    table = dataset.make_class_table(None, train)
    cache = tmp_path / "cache"
    keys = {cached(train, table, cache).cache}
    keys.add(cached(train, table, cache, size=(4, 8)).cache)
    mask = tmp_path / "d" / "train_labels" / "0001TP_006690_L.png"
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 10**9))
    keys.add(cached(train, table, cache).cache)
    table.names[0] = "Cow"
    keys.add(cached(train, table, cache).cache)
    assert len(keys) == 4


def test_killed_build_leaves_no_cache_that_looks_valid(tmp_path):
    kaggle_camvid(tmp_path / "d", n=2)
    train = tmp_path / "d" / "train"
    table = dataset.make_class_table(None, train)
    cache = tmp_path / "cache"
    split = cached(train, table, cache)
    final = split.cache
    del split
    # as a build killed half-way leaves it: a temporary folder, no final folder
    os.rename(final, f"{os.path.dirname(final)}/.{os.path.basename(final)}.tmp-99999")
    (cache / f".{os.path.basename(final)}.tmp-99999" / "meta.json").unlink()
    again = cached(train, table, cache)
    assert again.cache == final and any(n.startswith("cached") for n in again.notes)
    assert not list(cache.glob(".*.tmp-*"))  # the leftover was cleaned up


def test_two_processes_build_the_cache_once(tmp_path):
    kaggle_camvid(tmp_path / "d", n=6)
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        import dataset
        table = dataset.make_class_table(None, {str(tmp_path / 'd' / 'train')!r})
        s = dataset.load_split({str(tmp_path / 'd' / 'train')!r}, table, (8, 8), cache_dir={str(tmp_path / 'c')!r},
                               builder=sys.argv[1] == '0')
        print(json.dumps({{"built": any(n.startswith("cached") for n in s.notes), "cache": s.cache,
                          "sum": int(s.images.sum())}}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(rank)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in (0, 1)]
    out = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [o["built"] for o in out] == [True, False]  # rank 0 built, rank 1 waited and mapped
    assert out[0]["cache"] == out[1]["cache"] and out[0]["sum"] == out[1]["sum"]


def test_unwritable_cache_folder_names_the_flags(tmp_path):
    kaggle_camvid(tmp_path / "d", n=1)
    (tmp_path / "file").write_text("")
    table = dataset.make_class_table(None, tmp_path / "d" / "train")
    with pytest.raises(DataError, match="--cache_dir") as e:
        cached(tmp_path / "d" / "train", table, tmp_path / "file" / "cache")
    assert "--cache 0" in str(e.value)


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert dataset.default_cache_dir() == tmp_path / "segvae"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert dataset.default_cache_dir() == dataset.Path.home() / ".cache" / "segvae"


# --- the first command a user types, per format --------------------------------------------


@pytest.fixture(scope="module")
def format_runs(tmp_path_factory):
    """train.py, as a user would first run it, on each format; plus the refusals that name a flag."""
    root = tmp_path_factory.mktemp("formats")
    kaggle_camvid(root / "kaggle", n=4)
    drive(root / "DRIVE" / "training", n=4)
    lists = voc(root / "VOC2012")
    binary_split(root / "jpeg", ".jpg", n=4, quality=80)
    for i in range(2):  # two kinds of mask per image
        save_image(root / "twokinds" / "train" / f"{i:03d}.png")
        save_image(root / "twokinds" / "train_labels" / f"{i:03d}_L.png")
        save_image(root / "twokinds" / "train_labels" / f"{i:03d}_instance.png")
    rng = np.random.default_rng(5)
    for i in range(2):  # grey masks with no table: which values are classes?
        save_image(root / "grey" / "images" / f"{i}.png")
        (root / "grey" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_map(rng, values=(0, 3, 7))).save(root / "grey" / "masks" / f"{i}.png")
    commands = {
        "kaggle": [root / "kaggle" / "train", "--val_path", root / "kaggle" / "train"],
        "drive": [root / "DRIVE" / "training"],
        "voc": [lists / "train.txt", "--val_path", lists / "val.txt"],
        "jpeg": [root / "jpeg", "--num_classes", 2],
        "two_kinds": [root / "twokinds" / "train"],
        "grey_no_table": [root / "grey"],
        "voc_root": [root / "VOC2012"],
    }
    from conftest import TINY_MODEL, run_many
    runs = run_many([("train.py", "--train_path", *args, "--epochs", 1, *TINY_MODEL, "--output_dir", root / name)
                     for name, args in commands.items()], parallel=2)
    return root, dict(zip(commands, runs))


@pytest.mark.parametrize("name", ["kaggle", "drive", "voc", "jpeg"])
def test_first_command_trains(format_runs, name):
    root, runs = format_runs
    r = runs[name]
    assert r.returncode == 0, r.stderr
    assert (root / name / "last.pt").exists() and "warning" not in r.stderr, r.stderr


def test_first_command_logs_what_it_decided(format_runs):
    _, runs = format_runs
    assert "255 read as class 1" in runs["drive"].stdout  # DRIVE's 0/255 GIFs: vessels, not void
    assert "2 classes, void = 255 (classes from binary masks" in runs["drive"].stdout
    assert "snapped" in runs["jpeg"].stdout and "255 read as class 1" in runs["jpeg"].stdout
    assert "21 classes, void = 255 (classes from the palette of" in runs["voc"].stdout
    assert "4 classes, void = 255 (classes from" in runs["kaggle"].stdout and "class_dict.csv" in runs["kaggle"].stdout


@pytest.mark.parametrize("name,names", [("two_kinds", ["--mask_suffix '_L'", "000_instance.png"]),
                                        ("grey_no_table", ["--num_classes", "0-7"]),
                                        ("voc_root", ["ImageSets", "train.txt"])])
def test_first_command_refused_naming_the_flag(format_runs, name, names):
    from conftest import assert_refused
    assert_refused(format_runs[1][name], *names)


def test_absent_class_warned_at_start(tmp_path):
    from conftest import TINY_MODEL, run
    kaggle_camvid(tmp_path, n=2)
    (tmp_path / "class_dict.csv").write_text(CLASS_DICT + "Tunnel, 64, 0, 64\n")
    r = run("train.py", "--train_path", tmp_path / "train", "--epochs", 1, *TINY_MODEL, "--output_dir", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert "warning: 1 of 5 classes appear in no training mask: Tunnel" in r.stderr


def test_test_py_scores_colour_masks_holding_the_void_colour(format_runs, tmp_path):
    from conftest import run
    root, runs = format_runs
    assert runs["kaggle"].returncode == 0, runs["kaggle"].stderr
    ckpt = torch.load(root / "kaggle" / "best.pt", weights_only=True)
    assert ckpt["void_colour"] == [0, 0, 0] and ckpt["class_table"]["void_colour"] == [0, 0, 0]
    image = root / "kaggle" / "train" / "0001TP_006690.png"
    mask = root / "kaggle" / "train_labels" / "0001TP_006690_L.png"
    assert (np.asarray(Image.open(mask)) == 0).all(-1).any()  # the mask holds void's colour
    r = run("test.py", "--test_image_path", image, "--mask_path", mask, "--model_path", root / "kaggle" / "best.pt",
            "--output_dir", tmp_path / "one")
    assert r.returncode == 0, r.stderr
    r = run("test.py", "--test_path", root / "kaggle" / "train", "--model_path", root / "kaggle" / "best.pt",
            "--output_dir", tmp_path / "split", "--examples", 0)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "split" / "metrics.json").read_text())["classes"] == ["Animal", "Sky", "Truck_Bus",
                                                                                        "Wall"]


def test_test_py_on_drive_with_two_annotators_and_a_field_of_view(format_runs, tmp_path):
    from conftest import run
    root, runs = format_runs
    assert runs["drive"].returncode == 0, runs["drive"].stderr
    drive(tmp_path / "test", n=2, second=True)
    r = run("test.py", "--test_path", tmp_path / "test", "--model_path", root / "drive" / "best.pt",
            "--output_dir", tmp_path / "out", "--examples", 0)
    assert r.returncode == 0, r.stderr
    assert "2 annotations per image; the scores are against the first" in r.stdout
    assert "255 read as class 1" in r.stdout  # the vessels, as in training
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    cm = np.array(metrics["confusion_matrix"])
    assert cm.sum() == 2 * 8 * 12  # the field of view only: 8x12 pixels of each 12x16 image
