"""The scripts end to end, as a user runs them: train.py, then test.py on images and splits."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import CAMVID, TINY_MODEL, run

import train
from checkpoint import load_checkpoint
from figures import save_map


def test_train_writes_every_output(trained_tiny):
    data, out = trained_tiny
    for name in ("epoch_001.pt", "epoch_002.pt", "last.pt", "best.pt", "metrics.csv", "loss_plot.png",
                 "config.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"iou_sky", "iou_ground", "iou_box", "val_miou", "active_latent"} <= set(rows[0])
    ckpt = torch.load(out / "last.pt", weights_only=True)  # plain dict, no pickled objects
    assert ckpt["epoch"] == 2 and ckpt["classes"] == ["sky", "ground", "box"] and ckpt["ignore_index"] == 3
    assert "optimizer" in ckpt and "optimizer" not in torch.load(out / "epoch_001.pt", weights_only=True)
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    best = max(rows, key=lambda r: float(r["val_miou"]))
    assert load_checkpoint(out / "best.pt")["epoch"] == int(best["epoch"])


def test_segment_one_image_with_truth(trained_tiny, tmp_path):
    data, out = trained_tiny
    img, mask = data / "val" / "images" / "000.png", data / "val" / "masks" / "000.png"
    r = run("test.py", "--test_image_path", img, "--mask_path", mask, "--model_path", out / "best.pt",
            "--output_dir", tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("000_labels.png", "000_mask.png", "000_figure.png"):
        assert str(tmp_path / name) in r.stdout
    from PIL import Image

    assert Image.open(tmp_path / "000_mask.png").size == (48, 32)  # at the image's own size
    assert Image.open(tmp_path / "000_labels.png").size == (48, 32)
    assert not (tmp_path / "000_entropy.npy").exists()  # one sample: no uncertainty files


def test_sampled_uncertainty_maps_and_ranking(trained_tiny, tmp_path):
    data, out = trained_tiny
    args = ["--test_image_path", data / "val" / "images", "--model_path", out / "best.pt", "--samples", 6]
    r = run("test.py", *args, "--output_dir", tmp_path / "a", "--seed", 1)
    assert r.returncode == 0, r.stderr
    for stem in ("000", "001", "002", "003"):
        for name in ("entropy", "mutual_info", "variance"):
            assert (tmp_path / "a" / f"{stem}_{name}.png").is_file()
        ent = np.load(tmp_path / "a" / f"{stem}_entropy.npy")
        mi = np.load(tmp_path / "a" / f"{stem}_mutual_info.npy")
        var = np.load(tmp_path / "a" / f"{stem}_variance.npy")
        assert ent.shape == mi.shape == var.shape == (32, 48)
        assert 0 <= ent.min() and ent.max() <= np.log(3) + 1e-5
        assert 0 <= mi.min() and (mi <= ent + 1e-5).all()  # MI is the part of the entropy due to z
        assert 0 <= var.min() and var.max() <= 0.25
    rows = list(csv.DictReader(open(tmp_path / "a" / "uncertainty_ranking.csv")))
    assert len(rows) == 4
    ent = [float(r["mean_entropy"]) for r in rows]
    assert ent == sorted(ent, reverse=True)  # most uncertain first
    # The same seed gives the same maps; another seed other samples.
    run("test.py", *args, "--output_dir", tmp_path / "b", "--seed", 1)
    run("test.py", *args, "--output_dir", tmp_path / "c", "--seed", 2)
    a, b, c = (np.load(tmp_path / d / "000_variance.npy") for d in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_uncertainty_map_of_small_values_is_visible(tmp_path):
    """A map whose values are all far below log(C) (a quiet latent's mutual information) is
    scaled to its own range: drawn in the colour map's middle, not black."""
    from PIL import Image

    values = np.full((90, 120), 0.005)
    values[0, 0] = 0.01  # the map's range: 0.005 is in the middle of it
    brightness = {}
    for name, vmax in (("fixed", np.log(11)), ("own", None)):
        save_map(tmp_path / f"{name}.png", values, "t", vmax)
        rgb = np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB")).astype(float)
        h, w = rgb.shape[:2]
        brightness[name] = rgb[int(0.45 * h):int(0.6 * h), int(0.3 * w):int(0.6 * w)].sum(2).mean()  # inside the map
    assert brightness["fixed"] < 60 and brightness["own"] > 200, brightness


def test_evaluate_split_and_calibrate(trained_tiny, tmp_path):
    data, out = trained_tiny
    ckpt_path = tmp_path / "model.pt"
    ckpt_path.write_bytes((out / "best.pt").read_bytes())
    r = run("test.py", "--test_path", data / "val", "--model_path", ckpt_path, "--output_dir", tmp_path,
            "--samples", 3, "--calibrate")
    assert r.returncode == 0, r.stderr
    assert "temperature" in r.stdout and "mean IoU" in r.stdout
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= m["miou"] <= 1 and len(m["iou"]) == 3 and np.array(m["confusion_matrix"]).shape == (3, 3)
    # void pixels (a 3x3 corner per image) are not counted: 4 images of 32x48 minus 4 * 9
    assert np.array(m["confusion_matrix"]).sum() == 4 * (32 * 48 - 9)
    c = m["calibration"]
    assert 0 <= c["ece"] <= 1 and c["nll"] > 0 and 0 <= c["brier"] <= 2
    assert set(m["uncertainty"]) == {"entropy", "mutual_info", "variance"}
    assert 0 <= m["uncertainty"]["entropy"]["auroc"] <= 1
    stored = load_checkpoint(tmp_path / "model.calibrated.pt")["calibration"]["samples=3 flip=0 resolution=train"]
    assert stored["temperature"] == pytest.approx(m["temperature"]) and stored["temperature"] != 1.0
    for name in ("confusion_matrix.png", "reliability.png", "examples.png"):
        assert (tmp_path / name).is_file()
    from PIL import Image

    w, h = Image.open(tmp_path / "examples.png").size
    assert h > w * 0.8  # four rows of input | prediction | truth (the default --examples 4)


def test_demo_set_is_default_and_announced(tmp_path, monkeypatch):
    r = run("train.py", "--epochs", 1, "--output_dir", tmp_path / "demo", "--widths", 8, "--latent_channels", 2,
            "--batch_size", 64, "--image_size", 16, 16, "--threads", 1)
    assert r.returncode == 0, r.stderr
    assert "SYNTHETIC DEMO" in r.stdout
    assert (tmp_path / "demo" / "best.pt").is_file()


@pytest.mark.parametrize("augment", [0, 1])
def test_train_on_crops_validates_whole_images(tiny_data, tmp_path, augment):
    out = tmp_path / "crops"
    r = run("train.py", "--train_path", tiny_data / "train", "--val_path", tiny_data / "val", "--epochs", 1,
            *TINY_MODEL, "--crop_size", 16, 24, "--augment", augment, "--output_dir", out)
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["image_size"] == [32, 48] and ckpt["run_config"]["crop_size"] == [16, 24]
    assert 0 <= ckpt["best_miou"] <= 1


def test_fp32_fallback_trains(tiny_data, tmp_path):
    """fp32 is what CPUs without bf16 get; the default runs use bf16 here."""
    out = tmp_path / "fp32"
    r = run("train.py", "--train_path", tiny_data / "train", "--val_path", tiny_data / "val", "--epochs", 1,
            *TINY_MODEL, "--precision", "fp32", "--output_dir", out)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["run_config"]["precision"] == "fp32" and ckpt["scaler"] == {}  # no grad scaler outside fp16
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_schedules_and_class_weights():
    assert train.lr_at(0, 100, 10) == pytest.approx(0.1)
    assert train.lr_at(10, 100, 10) == pytest.approx(1.0)
    assert train.lr_at(100, 100, 10) == pytest.approx(0.0)
    assert train.kl_weight_at(0, 100, 0.5, 0.2) == 0 and train.kl_weight_at(10, 100, 0.5, 0.2) == 0.25
    assert train.kl_weight_at(50, 100, 0.5, 0.2) == 0.5 and train.kl_weight_at(3, 100, 0.5, 0) == 0.5
    # class 0: 6 px in 2 images of 4 px -> freq 0.75; class 1: 1 px in 1 image -> 0.25; class 2 absent
    masks = [torch.tensor([[0, 0], [0, 1]]), torch.tensor([[0, 0], [0, 9]])]
    w = train.median_frequency_weights(masks, 3, ignore_index=9)
    assert w.tolist() == pytest.approx([0.5 / 0.75, 0.5 / 0.25, 0.0])
    counts, present = [6, 1, 0], [8, 4, 0]
    assert train.loss_class_weights("none", counts, present) is None
    assert train.loss_class_weights("median_freq", counts, present).tolist() == pytest.approx(w.tolist())
    assert train.loss_class_weights("sqrt_median_freq", counts, present).tolist() == pytest.approx(
        [(0.5 / 0.75) ** 0.5, (0.5 / 0.25) ** 0.5, 0.0])


@pytest.mark.skipif(not (CAMVID / "train").is_dir(), reason="CamVid is not at ../shared/data/camvid")
def test_camvid_end_to_end(tmp_path):
    """A few real CamVid images through train.py and test.py, via a SegNet-style list file."""
    names = sorted(p.name for p in (CAMVID / "train").iterdir())[:4]
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"{CAMVID}/train/{n} {CAMVID}/trainannot/{n}\n" for n in names))
    out = tmp_path / "run"
    r = run("train.py", "--train_path", lst, "--val_path", lst, "--classes", CAMVID / "classes.csv",
            "--epochs", 1, "--output_dir", out, *TINY_MODEL[:5], "--image_size", 48, 64, "--batch_size", 4)
    assert r.returncode == 0, r.stderr
    assert "11 classes, void = 11" in r.stdout
    r = run("test.py", "--test_path", lst, "--model_path", out / "best.pt", "--output_dir", tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert len(m["iou"]) == 11 and m["classes"][10] == "Bicyclist"
    cm = np.array(m["confusion_matrix"])
    from dataset import load_mask, read_class_table

    table = read_class_table(CAMVID / "classes.csv")
    valid = sum(int((load_mask(CAMVID / "trainannot" / n, table) != 11).sum()) for n in names)
    assert cm.sum() == valid  # every non-void pixel at 360x480 counted once


def test_training_cache_placement(monkeypatch):
    """The uint8 cache stays where it is on the CPU, and on a GPU whose free memory it would
    crowd (the move itself needs a GPU and is not run here)."""
    from types import SimpleNamespace

    from dataset import demo_split

    split = demo_split(4, 0)
    assert train.cache_on_device(split, torch.device("cpu")) is split
    fake_gpu = SimpleNamespace(type="cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (split.images.nbytes, 80 * 2**30))
    assert train.cache_on_device(split, fake_gpu) is split  # needs more than a quarter of the free memory
