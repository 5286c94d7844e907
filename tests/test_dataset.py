"""Data in: layouts, class tables, mask formats, transforms and the demo set."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSES_CSV, write_split
from PIL import Image

import dataset
from dataset import DataError


def test_three_layouts_pair_the_same_files(tmp_path):
    folders = write_split(tmp_path / "a", 3, 0, layout="folders")
    annot = write_split(tmp_path / "train", 3, 0, layout="annot")
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"a/images/{i:03d}.png a/masks/{i:03d}.png\n" for i in range(3)))
    by_layout = [dataset.find_pairs(p) for p in (folders, annot, lst)]
    assert all(len(pairs) == 3 for pairs in by_layout)
    for pairs in by_layout:
        assert [(i.stem, m.stem) for i, m in pairs] == [(f"{k:03d}", f"{k:03d}") for k in range(3)]
    assert by_layout[1][0][1].parent.name == "trainannot"
    assert by_layout[2][0][0] == tmp_path / "a" / "images" / "000.png"  # relative to the list file


def test_class_table_formats(tmp_path):
    a = tmp_path / "classes.csv"
    a.write_text(CLASSES_CSV)
    t = dataset.read_class_table(a)
    assert t.names == ["sky", "ground", "box"] and t.ignore_index == 3 and t.colours[2] == (255, 0, 0)
    b = tmp_path / "class_dict.csv"
    b.write_text("name,r,g,b\nroad,128,64,128\ncar,64,0,128\nvoid,0,0,0\n")
    t = dataset.read_class_table(b)
    assert t.names == ["road", "car"] and t.ignore_index == 2 and t.void_colour == (0, 0, 0)
    c = tmp_path / "plain.csv"
    c.write_text("index,name,r,g,b\n0,a,1,2,3\n1,b,4,5,6\n")
    assert dataset.read_class_table(c).ignore_index == 255  # no void row: 255
    assert dataset.find_class_table(tmp_path / "x") in (a, b)  # found next to the data


def test_camvid_class_table_if_present():
    from conftest import CAMVID

    if not (CAMVID / "classes.csv").exists():
        pytest.skip("CamVid is not at ../shared/data/camvid")
    t = dataset.read_class_table(CAMVID / "classes.csv")
    assert t.num_classes == 11 and t.ignore_index == 11 and t.names[0] == "Sky"


def test_rgb_colour_masks_map_through_the_table(tmp_path):
    table = dataset.read_class_table(_write(tmp_path / "c.csv", "name,r,g,b\nroad,128,64,128\ncar,64,0,128\n"
                                            "void,0,0,0\n"))
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[:2] = (128, 64, 128)
    rgb[2:, :3] = (64, 0, 128)  # the rest stays black = void
    Image.fromarray(rgb).save(tmp_path / "m.png")
    labels = dataset.load_mask(tmp_path / "m.png", table)
    assert labels.tolist() == [[0] * 5, [0] * 5, [1, 1, 1, 2, 2], [1, 1, 1, 2, 2]]


def test_palette_index_masks(tmp_path):
    table = dataset.read_class_table(_write(tmp_path / "c.csv", CLASSES_CSV))
    p = Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8), mode="P")
    p.putpalette([0, 0, 255, 0, 255, 0, 255, 0, 0, 0, 0, 0] + [0] * 756)
    p.save(tmp_path / "p.png")
    assert dataset.load_mask(tmp_path / "p.png", table).tolist() == [[0, 1], [2, 3]]


def test_load_split_resizes_and_keeps_label_resolution(tmp_path):
    write_split(tmp_path / "s", 3, 0)
    table = dataset.read_class_table(_write(tmp_path / "classes.csv", CLASSES_CSV))
    split = dataset.load_split(tmp_path / "s", table, (16, 24))
    assert split.images.shape == (3, 3, 16, 24) and split.images.dtype == torch.uint8
    assert split.masks.shape == (3, 16, 24)
    assert split.label_masks[0].shape == (32, 48)  # metrics use the original resolution
    assert set(split.masks.unique().tolist()) <= {0, 1, 2, 3}  # nearest: no blended labels


@pytest.mark.parametrize("rotate", [0.0, 0.3])
def test_label_gather_is_grid_samples_nearest(rotate):
    """nearest_labels (an integer gather) against grid_sample's nearest mode on the same grid,
    zoomed in and out, flipped and shifted, with and without rotation; void outside."""
    g = torch.Generator().manual_seed(1)
    masks = torch.randint(0, 12, (6, 30, 40), generator=g, dtype=torch.uint8)
    theta = torch.zeros(6, 2, 3)
    theta[:, 0, 0] = torch.tensor([0.5, 1.3, -0.8, 1.0, -1.2, 0.77])
    theta[:, 1, 1] = torch.tensor([0.6, 1.3, 0.8, 1.0, 1.1, 0.91])
    theta[:, :, 2] = torch.rand(6, 2, generator=g) * 0.6 - 0.3
    theta[:, 0, 1], theta[:, 1, 0] = rotate, -rotate
    grid = F.affine_grid(theta, (6, 1, 25, 35), align_corners=False)
    ref = F.grid_sample(masks.float()[:, None] + 1, grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)[:, 0].long() - 1
    ref[ref < 0] = 255
    got = dataset.nearest_labels(masks, theta, (25, 35), 255)
    assert got.dtype == torch.int64 and got.shape == ref.shape
    assert (got != ref).float().mean() < 1e-3  # ties at exact pixel borders may round either way
    assert (got == 255).any() and (got != 255).any()


def test_augment_keeps_images_and_masks_aligned():
    # The image's red channel holds the label, so after any joint transform the two must agree.
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 4, (6, 4, 6), generator=torch.Generator().manual_seed(0))  # (6, 4, 6) blocks
    masks = masks.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (6, 32, 48)
    images = torch.stack([masks.float() * 10, torch.zeros_like(masks, dtype=torch.float),
                          torch.zeros_like(masks, dtype=torch.float)], 1)
    out, out_masks = dataset.augment(images, masks, g, ignore_index=255, jitter=0)
    assert out.shape == images.shape and out_masks.shape == masks.shape
    valid = out_masks != 255
    agree = (out[:, 0] / 10).round().long() == out_masks
    # Only block borders may differ (bilinear vs nearest): within 2 pixels of a label change,
    # the reach of a 1.5x zoom's bilinear blend. (A share of agreeing pixels, > 0.95, failed
    # for about 1 in 15 random draws of the blocks.)
    m = out_masks.float()[:, None]  # (B, 1, H, W)
    near_border = (F.max_pool2d(m, 5, 1, 2) != -F.max_pool2d(-m, 5, 1, 2))[:, 0]
    assert not (valid & ~agree & ~near_border).any() and agree[valid].float().mean() > 0.9
    assert not torch.equal(out_masks, masks)  # something actually changed
    again = dataset.augment(images, masks, torch.Generator().manual_seed(0), 255, jitter=0)
    assert torch.equal(again[1], out_masks)  # reproducible from the generator


def test_augment_flip_only_mirrors_both():
    g = torch.Generator().manual_seed(3)
    masks = torch.arange(8).repeat(8, 1)[None].repeat(16, 1, 1)  # (16, 8, 8): label = column
    images = masks[:, None].float().repeat(1, 3, 1, 1)
    out, out_masks = dataset.augment(images, masks, g, 255, scale=(1.0, 1.0), jitter=0)
    flipped = out_masks[:, 0, 0] == 7
    assert flipped.any() and (~flipped).any()  # about half are mirrored
    assert torch.equal(out_masks[flipped], masks[flipped].flip(-1))
    assert torch.allclose(out[:, 0], out_masks.float(), atol=1e-4)


def test_crop_at_zoom_one_is_a_window_of_image_and_mask():
    g = torch.Generator().manual_seed(1)
    masks = torch.randint(0, 5, (4, 30, 40))
    rows, cols = torch.meshgrid(torch.arange(30.0), torch.arange(40.0), indexing="ij")
    images = torch.stack([cols, rows, torch.zeros(30, 40)])[None].repeat(4, 1, 1, 1)  # pixel coordinates
    out, out_masks = dataset.augment(images, masks, g, 255, scale=(1.0, 1.0), flip=False, jitter=0,
                                     out_size=(12, 20))
    assert out.shape == (4, 3, 12, 20) and out_masks.shape == (4, 12, 20)
    for i in range(4):
        windows = [(y, x) for y in range(30 - 12 + 1) for x in range(40 - 20 + 1)
                   if torch.equal(masks[i, y:y + 12, x:x + 20], out_masks[i])]
        assert len(windows) == 1  # labels copied, never interpolated
        y, x = windows[0]
        # the image is sampled at the same points, at most half a pixel from the mask's pixels
        assert (out[i, 0] - cols[y:y + 12, x:x + 20]).abs().max() <= 0.5 + 1e-4
        assert (out[i, 1] - rows[y:y + 12, x:x + 20]).abs().max() <= 0.5 + 1e-4
    assert (out_masks != 255).all()  # a crop inside the image pulls in no void


def test_zoomed_out_crop_keeps_image_and_mask_aligned():
    g = torch.Generator().manual_seed(2)
    masks = torch.randint(0, 4, (6, 4, 6), generator=torch.Generator().manual_seed(0))  # (6, 4, 6) blocks
    masks = masks.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (6, 32, 48)
    images = (masks.float() * 10)[:, None].repeat(1, 3, 1, 1)
    out, out_masks = dataset.augment(images, masks, g, 255, scale=(0.5, 2.0), jitter=0, out_size=(16, 24))
    valid = out_masks != 255
    assert out_masks.shape == (6, 16, 24) and valid.any()
    agree = (out[:, 0] / 10).round().long() == out_masks
    assert agree[valid].float().mean() > 0.9


def test_colour_jitter_is_saturation_then_contrast_then_brightness():
    g = torch.Generator().manual_seed(5)
    images = torch.randn(3, 3, 8, 10)
    masks = torch.zeros(3, 8, 10, dtype=torch.long)
    out, _ = dataset.augment(images, masks, g, 255, scale=(1.0, 1.0), flip=False, jitter=0.3)
    # the same draws, step by step: zoom, shift x, shift y (identity here), then the jitter
    g = torch.Generator().manual_seed(5)
    torch.rand(3 * 3, generator=g)
    bright, contrast, sat = (torch.rand(3, generator=g).mul_(2 * 0.3).add_(lo).view(3, 1, 1, 1)
                             for lo in (-0.3, 0.7, 0.7))
    gray = images.mean(1, keepdim=True)
    x = gray + (images - gray) * sat
    mean = x.mean((1, 2, 3), keepdim=True)
    assert torch.allclose(out, (x - mean) * contrast + mean + bright * 4, atol=1e-5)


def test_cutmix_pastes_one_box_of_the_next_image_with_its_labels():
    b, h, w = 6, 40, 60
    images = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w).clone()  # image i is all i
    masks = torch.arange(b).view(b, 1, 1).expand(b, h, w).clone()
    same = dataset.cutmix(images, masks, torch.Generator().manual_seed(0), prob=0.0)
    assert torch.equal(same[0], images) and torch.equal(same[1], masks)
    out, out_masks = dataset.cutmix(images, masks, torch.Generator().manual_seed(0), prob=1.0, area=(0.1, 0.4))
    for i in range(b):
        pasted = out_masks[i] != i
        assert set(out_masks[i][pasted].tolist()) == {(i + 1) % b}  # labels of the next image
        assert torch.equal(out[i, 0], out_masks[i].float())  # the image moved with its labels
        rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int(pasted.sum()) == int(box)  # one rectangle
        assert 0.1 * h * w * 0.8 <= int(box) <= 0.4 * h * w * 1.2


def test_normalize_is_imagenet_mean_and_std():
    images = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    mean = torch.tensor(dataset.IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(dataset.IMAGENET_STD).view(1, 3, 1, 1) * 255
    out = dataset.normalize(images)
    assert out.dtype == torch.float32 and torch.allclose(out, (images.float() - mean) / std, atol=1e-5)


def test_demo_set_is_deterministic_with_void():
    a_img, a_mask = dataset.make_demo(4, seed=0)
    b_img, b_mask = dataset.make_demo(4, seed=0)
    assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask)
    assert not torch.equal(a_img, dataset.make_demo(4, seed=1)[0])
    assert (a_mask[:, 0] == dataset.DEMO_VOID).all()  # void border
    assert set(a_mask.unique().tolist()) - {dataset.DEMO_VOID} <= {0, 1, 2, 3}


def test_write_demo_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "DEMO_TRAIN", (3, 0))
    monkeypatch.setattr(dataset, "DEMO_VAL", (2, 1))
    root = dataset.write_demo(tmp_path / "demo")
    table = dataset.read_class_table(root / "classes.csv")
    assert table.names == dataset.DEMO_CLASSES and table.ignore_index == dataset.DEMO_VOID
    split = dataset.load_split(root / "train", table, dataset.DEMO_SIZE)
    images, masks = dataset.make_demo(3, 0)
    assert torch.equal(split.images, images) and torch.equal(split.masks, masks)


def test_unpaired_files_are_listed(tmp_path):
    write_split(tmp_path / "s", 3, 0)
    (tmp_path / "s" / "masks" / "001.png").unlink()
    with pytest.raises(DataError, match="001.png"):
        dataset.find_pairs(tmp_path / "s")


def _write(path, text):
    path.write_text(text)
    return path
