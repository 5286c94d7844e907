"""Shared fixtures and helpers: tiny paired data on disk, CLI runners, the one-line-refusal check."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "data" / "camvid"
# A model small enough to train in a second on two cores.
TINY_MODEL = ["--widths", "8", "16", "--latent_channels", "4", "--image_size", "32", "48", "--batch_size", "4",
              "--threads", "1"]
CLASSES_CSV = "index,name,r,g,b\n0,sky,0,0,255\n1,ground,0,255,0\n2,box,255,0,0\n3,Unlabelled,0,0,0\n"


@pytest.fixture(scope="session", autouse=True)
def own_cache_dir(tmp_path_factory):
    """The scripts cache decoded splits in $XDG_CACHE_HOME/segvae: the tests use their own, not the user's."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


def tiny_pair(rng, h=32, w=48):
    """An image whose colour encodes its label: sky on top, ground below, a red box, void corner."""
    mask = np.zeros((h, w), np.uint8)
    mask[h // 2:] = 1
    y, x = rng.integers(2, h - 12), rng.integers(2, w - 14)
    mask[y:y + 10, x:x + 12] = 2
    mask[:3, :3] = 3
    colours = np.array([(60, 90, 220), (70, 180, 60), (220, 40, 40), (0, 0, 0)], np.float64)
    image = colours[mask] + rng.normal(0, 8, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_split(root, n, seed, layout="folders"):
    """Write n tiny pairs. layout: "folders" (images/ + masks/) or "annot" (X + Xannot)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    img_dir, mask_dir = (root / "images", root / "masks") if layout == "folders" else (root, Path(f"{root}annot"))
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, mask = tiny_pair(rng)
        Image.fromarray(image).save(img_dir / f"{i:03d}.png")
        Image.fromarray(mask, mode="L").save(mask_dir / f"{i:03d}.png")
    return root


@pytest.fixture
def tiny_data(tmp_path):
    """tmp/data/{train,val}/{images,masks} with classes.csv (3 classes, void = 3)."""
    data = tmp_path / "data"
    write_split(data / "train", 8, 0)
    write_split(data / "val", 4, 1)
    (data / "classes.csv").write_text(CLASSES_CSV)
    return data


def run(script, *args, timeout=300):
    """Run one of the repo's scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """A run of train.py on tiny data (2 epochs), shared by the inference tests."""
    tmp = tmp_path_factory.mktemp("trained")
    data = tmp / "data"
    write_split(data / "train", 8, 0)
    write_split(data / "val", 4, 1)
    (data / "classes.csv").write_text(CLASSES_CSV)
    out = tmp / "run"
    r = run("train.py", "--train_path", data / "train", "--val_path", data / "val", "--epochs", 2,
            "--output_dir", out, *TINY_MODEL)
    assert r.returncode == 0, r.stderr
    return data, out


def assert_refused(r, *names):
    """The promised refusal of bad input: exit status 2 and exactly one line on stderr,
    'error: ...', that names each of `names` (paths, values). No traceback, no warnings."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, f"exit status {r.returncode}, stderr:\n{r.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one 'error:' line:\n{r.stderr}"
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"


def run_many(commands, parallel=4, timeout=300):
    """run() each (script, *args) command, `parallel` at a time: a launch spends most of its
    time importing torch, so a few at once finish sooner even on two cores."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda c: run(*c, timeout=timeout), commands))


def metrics_rows(out):
    """The rows of a run's metrics.csv as dicts ([] when there is none yet)."""
    path = out / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def epochs_of(rows):
    return [int(r["epoch"]) for r in rows]


def free_port():
    """A TCP port nobody listens on now (for torchrun's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
