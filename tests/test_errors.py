"""Bad input is refused in one clear line with exit status 2; odd but valid input is converted.

Each refusal runs train.py or test.py as a user would. Most of a launch is importing torch, so
one module fixture starts them all, a few at a time, and each test then checks its own result.
"""

import io
import os
import pickle
import random
import re

import numpy as np
import pytest
import torch
from conftest import CLASSES_CSV, TINY_MODEL, assert_refused, run, run_many, write_split
from PIL import Image

import dataset
from dataset import DataError

CASES = {}  # name -> builder(root, trained_run) -> (script, args, what the message must name)


def case(fn):
    CASES[fn.__name__] = fn
    fn.__test__ = False  # a case builder, run by test_refused_in_one_line; not a test itself
    return fn


def split(root, n=4):
    """A fresh tiny split (images/ + masks/) under root, with classes.csv next to it."""
    write_split(root / "train", n, 0)
    (root / "classes.csv").write_text(CLASSES_CSV)
    return root / "train"


def train_cmd(root, train_path, *extra):
    return ("train.py", "--train_path", train_path, "--epochs", 1, *TINY_MODEL, "--output_dir", root / "out", *extra)


def test_cmd(ckpt, *extra):
    return ("test.py", "--model_path", ckpt, *extra)


test_cmd.__test__ = False  # builds a test.py command line


# --- data paths and pairing ----------------------------------------------------------------


@case
def missing_path(root, run_dir):
    p = root / "no_such_folder"
    return train_cmd(root, p), [p, "does not exist"]


@case
def missing_val_path(root, run_dir):
    p = root / "no_such_val"
    return train_cmd(root, split(root), "--val_path", p), [p, "does not exist"]


@case
def empty_folder(root, run_dir):
    for sub in ("images", "masks"):
        (root / "train" / sub).mkdir(parents=True)
    (root / "classes.csv").write_text(CLASSES_CSV)
    return train_cmd(root, root / "train"), [root / "train", "empty"]


@case
def image_without_mask(root, run_dir):
    s = split(root)
    (s / "masks" / "001.png").unlink()
    return train_cmd(root, s), ["001.png", "without a mask"]


@case
def mask_without_image(root, run_dir):
    s = split(root)
    (s / "images" / "002.png").unlink()
    return train_cmd(root, s), ["002.png", "without an image"]


@case
def non_image_file_among_images(root, run_dir):
    s = split(root)
    (s / "images" / "notes.txt").write_text("shot on a Tuesday")
    return train_cmd(root, s), [s / "images", "notes.txt", "not an image"]


@case
def two_files_one_stem(root, run_dir):
    s = split(root)
    Image.open(s / "images" / "001.png").save(s / "images" / "001.jpg")
    return train_cmd(root, s), ["001.png", "001.jpg"]


# --- decoding -----------------------------------------------------------------------------


@case
def truncated_image(root, run_dir):
    s = split(root)
    p = s / "images" / "001.png"
    p.write_bytes(p.read_bytes()[:150])
    return train_cmd(root, s), [p, "not a readable image"]


@case
def corrupt_image(root, run_dir):
    s = split(root)
    p = s / "images" / "001.png"
    b = bytearray(p.read_bytes())
    b[60:160] = bytes(100)  # zeros over the compressed pixel data
    p.write_bytes(bytes(b))
    return train_cmd(root, s), [p, "not a readable image"]


@case
def text_file_named_png(root, run_dir):
    s = split(root)
    p = s / "images" / "003.png"
    p.write_text("not a picture")
    return train_cmd(root, s), [p, "not a readable image"]


@case
def image_and_mask_sizes_differ(root, run_dir):
    s = split(root)
    Image.fromarray(np.zeros((30, 48), np.uint8)).save(s / "masks" / "001.png")
    return train_cmd(root, s), [s / "images" / "001.png", s / "masks" / "001.png", "48x32", "48x30"]


@case
def mask_label_outside_table(root, run_dir):
    s = split(root)
    m = np.zeros((32, 48), np.uint8)
    m[5, 7] = 9  # the table has classes 0-2 and void 3
    Image.fromarray(m).save(s / "masks" / "002.png")
    return train_cmd(root, s), [s / "masks" / "002.png", "label 9", "3 classes"]


@case
def rgb_mask_colour_not_in_table(root, run_dir):
    s = split(root)
    m = np.zeros((32, 48, 3), np.uint8)
    m[:] = (0, 0, 255)
    m[3, 4] = (1, 2, 3)
    Image.fromarray(m).save(s / "masks" / "000.png")
    return train_cmd(root, s), [s / "masks" / "000.png", "(1, 2, 3)"]


# --- class tables -------------------------------------------------------------------------


@case
def malformed_class_table(root, run_dir):
    s = split(root)
    (root / "classes.csv").write_text("index,name,r,g,b\n0,sky,0,0\n")
    return train_cmd(root, s), [root / "classes.csv", "row 1", "0,sky,0,0"]


@case
def class_table_of_only_void(root, run_dir):
    s = split(root)
    (root / "classes.csv").write_text("index,name,r,g,b\n0,Unlabelled,0,0,0\n")
    return train_cmd(root, s), [root / "classes.csv", "Unlabelled"]


@case
def class_table_not_text(root, run_dir):
    s = split(root)
    (root / "classes.csv").write_bytes(b"\xff\xfe\x00\x81 binary")
    return train_cmd(root, s), [root / "classes.csv", "cannot be read"]


@case
def classes_flag_missing_file(root, run_dir):
    p = root / "no_such_table.csv"
    return train_cmd(root, split(root), "--classes", p), [p, "does not exist"]


# --- flags --------------------------------------------------------------------------------


@case
def epochs_zero(root, run_dir):
    return train_cmd(root, split(root), "--epochs", 0), ["--epochs 0"]


@case
def epochs_negative(root, run_dir):
    return train_cmd(root, split(root), "--epochs", -3), ["--epochs -3"]


@case
def swa_with_ema(root, run_dir):
    return train_cmd(root, split(root), "--swa", 0.5, "--ema", 0.999), ["--swa 0.5", "--ema 0.999", "choose one"]


@case
def time_budget_negative(root, run_dir):
    return train_cmd(root, split(root), "--time_budget", -5), ["--time_budget -5", "e.g. --time_budget 20"]


@case
def blocks_zero(root, run_dir):
    return train_cmd(root, split(root), "--blocks", 0), ["--blocks 0", "e.g. --blocks 2"]


@case
def negative_learning_rate(root, run_dir):
    return train_cmd(root, split(root), "--lr", -0.1), ["--lr -0.1"]


@case
def epochs_not_a_number(root, run_dir):
    return train_cmd(root, split(root), "--epochs", "ten"), ["--epochs", "'ten'"]


@case
def output_dir_under_a_file(root, run_dir):
    # chmod 0o500 does not stop root; a path below a regular file stops everyone.
    (root / "a_file").write_text("")
    p = root / "a_file" / "sub"
    return train_cmd(root, split(root), "--output_dir", p), [p, "cannot be written"]


@case
def output_dir_read_only(root, run_dir):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; output_dir_under_a_file covers this")
    ro = root / "read_only"
    ro.mkdir()
    ro.chmod(0o500)
    return train_cmd(root, split(root), "--output_dir", ro / "run"), [ro / "run", "cannot be written"]


@case
def cuda_without_gpu(root, run_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    return train_cmd(root, split(root), "--device", "cuda"), ["--device cuda", "--device cpu"]


@case
def output_dir_holds_a_run(root, run_dir):
    return train_cmd(root, split(root), "--output_dir", run_dir), [run_dir, "--resume auto"]


@case
def resume_missing_checkpoint(root, run_dir):
    p = root / "nowhere" / "last.pt"
    return train_cmd(root, split(root), "--resume", p), [p, "does not exist"]


@case
def resume_other_architecture(root, run_dir):
    cmd = train_cmd(root, split(root), "--resume", run_dir / "last.pt", "--widths", 8, 32)  # the last --widths wins
    return cmd, [run_dir / "last.pt", "'widths': [8, 16]", "'widths': [8, 32]"]


@case
def resume_mid_epoch_other_batch_size(root, run_dir):
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    ckpt["batch_in_epoch"] = 1  # as if stopped by a signal after the first step of an epoch
    p = root / "mid_epoch.pt"
    torch.save(ckpt, p)
    return train_cmd(root, split(root), "--resume", p, "--batch_size", 2), [p, "--batch_size 4 (now 2)"]


@case
def loss_diverges(root, run_dir):
    # lr 1e30: the first step blows the weights up, the second loss is NaN (deterministic on CPU).
    # One step per epoch, so that is epoch 2, after epoch 1's checkpoint.
    cmd = train_cmd(root, split(root), "--lr", 1e30, "--precision", "fp32", "--epochs", 2)
    return cmd, ["loss nan at epoch 2 step 2", root / "out" / "last.pt", "--skip_nonfinite"]


# --- test.py: checkpoints -----------------------------------------------------------------


class Payload:
    """Stands for any class a hostile checkpoint could ask the unpickler to build."""


def write_ckpt(root, name, obj):
    p = root / name
    torch.save(obj, p)
    return p


def edited(run_dir, edit):
    ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    edit(ckpt)
    return ckpt


@case
def model_path_missing(root, run_dir):
    p = root / "no_such.pt"
    return test_cmd(p, "--test_image_path", run_dir / "loss_plot.png"), [p, "does not exist"]


@case
def checkpoint_of_random_bytes(root, run_dir):
    p = root / "random.pt"
    p.write_bytes(random.Random(0).randbytes(5000))
    return test_cmd(p, "--test_image_path", run_dir / "loss_plot.png"), [p, "not a readable"]


@case
def checkpoint_truncated(root, run_dir):
    p = root / "half.pt"
    b = (run_dir / "best.pt").read_bytes()
    p.write_bytes(b[:len(b) // 2])
    return test_cmd(p, "--test_image_path", run_dir / "loss_plot.png"), [p, "not a readable"]


@case
def checkpoint_text_file(root, run_dir):
    p = root / "notes.pt"
    p.write_text("hello world\n")
    return test_cmd(p, "--test_image_path", run_dir / "loss_plot.png"), [p, "not a readable"]


@case
def checkpoint_plain_pickle(root, run_dir):
    p = root / "plain.pt"
    p.write_bytes(pickle.dumps({"model": 1}))  # pickle protocol 4/5, not torch.save
    return test_cmd(p, "--test_image_path", run_dir / "loss_plot.png"), [p, "not a readable"]


@case
def checkpoint_with_pickled_class(root, run_dir):
    p = write_ckpt(root, "class.pt", {"format": "segvae-1", "model": Payload()})
    return test_cmd(p, "--test_image_path", run_dir / "loss_plot.png"), [p, "would run code"]


@case
def checkpoint_with_pickled_function(root, run_dir):
    p = write_ckpt(root, "function.pt", {"format": "segvae-1", "hook": os.system})
    return test_cmd(p, "--test_image_path", run_dir / "loss_plot.png"), [p, "would run code"]


@case
def checkpoint_other_class_count(root, run_dir):
    def edit(c):
        c["model_config"]["num_classes"] = 5  # the weights still have 3 outputs

    p = write_ckpt(root, "classes5.pt", edited(run_dir, edit))
    return test_cmd(p, "--test_image_path", run_dir / "loss_plot.png"), [p, "does not fit"]


@case
def checkpoint_other_architecture(root, run_dir):
    def edit(c):
        c["model_config"]["widths"] = [8, 16, 32]

    p = write_ckpt(root, "deeper.pt", edited(run_dir, edit))
    return test_cmd(p, "--test_image_path", run_dir / "loss_plot.png"), [p, "does not fit"]


@case
def checkpoint_weight_of_wrong_shape(root, run_dir):
    def edit(c):
        c["model"]["head.weight"] = torch.zeros(5, 8, 1, 1)

    p = write_ckpt(root, "head5.pt", edited(run_dir, edit))
    return test_cmd(p, "--test_image_path", run_dir / "loss_plot.png"), [p, "does not fit"]


@case
def checkpoint_names_fewer_classes_than_model(root, run_dir):
    from model import SegVAE, VAEConfig

    def edit(c):  # a sound 5-class model whose class list names only 3
        config = VAEConfig.from_dict({**c["model_config"], "num_classes": 5})
        c["model_config"], c["model"] = config.to_dict(), SegVAE(config).state_dict()

    p = write_ckpt(root, "names3.pt", edited(run_dir, edit))
    data = run_dir.parent / "data" / "val"
    return test_cmd(p, "--test_path", data, "--output_dir", root / "eval"), [p, "5", "3"]


@case
def checkpoint_without_class_names(root, run_dir):
    p = write_ckpt(root, "nonames.pt", edited(run_dir, lambda c: c.pop("classes")))
    return test_cmd(p, "--test_image_path", run_dir / "loss_plot.png"), [p, "classes"]


# --- test.py: images, splits, flags -------------------------------------------------------


@case
def test_image_missing(root, run_dir):
    p = root / "no_such.png"
    return test_cmd(run_dir / "best.pt", "--test_image_path", p), [p]


@case
def test_image_not_an_image(root, run_dir):
    p = root / "photo.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing useful")
    return test_cmd(run_dir / "best.pt", "--test_image_path", p, "--output_dir", root), [p, "not a readable image"]


@case
def test_mask_of_another_size(root, run_dir):
    data = run_dir.parent / "data" / "val"
    m = root / "small_mask.png"
    Image.fromarray(np.zeros((16, 24), np.uint8)).save(m)
    image = data / "images" / "000.png"
    return test_cmd(run_dir / "best.pt", "--test_image_path", image, "--mask_path", m, "--output_dir", root), [m, image]


@case
def test_model_path_not_given(root, run_dir):
    return ("test.py", "--test_image_path", root), ["--model_path"]


@case
def test_zero_samples(root, run_dir):
    return test_cmd(run_dir / "best.pt", "--test_image_path", root, "--samples", 0), ["--samples 0"]


@case
def test_samples_not_a_number(root, run_dir):
    return test_cmd(run_dir / "best.pt", "--test_image_path", root, "--samples", "abc"), ["--samples", "abc"]


@case
def test_scale_of_zero(root, run_dir):
    return test_cmd(run_dir / "best.pt", "--test_image_path", root, "--scales", 1, 0), ["--scales 1 0"]


@case
def crop_larger_than_images(root, run_dir):
    return train_cmd(root, split(root), "--image_size", 32, 48, "--crop_size", 40, 48), ["--crop_size 40 48", "32 48"]


@case
def fp16_on_cpu(root, run_dir):
    if torch.cuda.is_available():
        return None
    return train_cmd(root, split(root), "--precision", "fp16", "--device", "cpu"), ["--precision fp16", "bf16"]


@case
def scale_range_reversed(root, run_dir):
    return train_cmd(root, split(root), "--scale", 2, 1), ["--scale 2.0 1.0"]


@case
def cutmix_above_one(root, run_dir):
    return train_cmd(root, split(root), "--cutmix", 1.5), ["--cutmix 1.5", "[0, 1]"]


@case
def jitter_of_one(root, run_dir):
    return train_cmd(root, split(root), "--jitter", 1), ["--jitter 1.0", "[0, 1)"]


@case
def calibration_without_the_learned_prior(root, run_dir):
    return train_cmd(root, split(root), "--calibration", 1), ["--calibration 1.0", "--prior learned"]


@case
def one_calibration_sample(root, run_dir):
    return (train_cmd(root, split(root), "--prior", "learned", "--calibration", 1, "--calibration_samples", 1),
            ["--calibration_samples 1", "at least 2"])


@pytest.fixture(scope="module")
def refusals(trained_tiny, tmp_path_factory):
    """Build every case's input and run all the commands: {name: (CompletedProcess, names)}."""
    _, run_dir = trained_tiny
    built, skipped = {}, {}
    for name, build in CASES.items():
        root = tmp_path_factory.mktemp(name)
        try:
            built[name] = build(root, run_dir)
        except pytest.skip.Exception as e:
            skipped[name] = str(e)
    results = run_many([cmd for cmd, _ in built.values()], parallel=4, timeout=120)
    out = {name: (r, names) for (name, (_, names)), r in zip(built.items(), results)}
    out.update({name: (None, reason) for name, reason in skipped.items()})
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_refused_in_one_line(refusals, name):
    r, names = refusals[name]
    if r is None:
        pytest.skip(names)
    assert_refused(r, *names)


def test_a_missing_image_is_refused_before_the_model_loads(refusals):
    r, _ = refusals["test_image_missing"]
    assert r.stdout == "", f"printed before the refusal:\n{r.stdout}"


# --- converted and working, not errors -----------------------------------------------------


def save_exif_rotated(path, rgb):
    """Store `rgb` (H, W, 3) rotated a quarter turn, with the EXIF tag that turns it back."""
    img = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, k=1)))  # stored W x H
    exif = img.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    img.save(path, exif=exif.tobytes(), quality=95)


def test_odd_image_modes_are_converted(tmp_path):
    """Grayscale, RGBA, 16-bit and EXIF-rotated images load as (3, H, W) uint8 RGB, paired
    with ordinary masks of the displayed size."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    rgb[:8] = (250, 10, 10)  # a red top band, to check the rotation's direction
    root = tmp_path / "s"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(rgb[..., 0]).save(root / "images" / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((32, 48), 128, np.uint8)])).save(root / "images" / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(root / "images" / "deep.png")  # 16-bit
    save_exif_rotated(root / "images" / "rotated.jpg", rgb)
    for stem in ("gray", "rgba", "deep", "rotated"):
        Image.fromarray(np.zeros((32, 48), np.uint8)).save(root / "masks" / f"{stem}.png")
    assert Image.open(root / "images" / "deep.png").mode == "I;16"
    assert Image.open(root / "images" / "rotated.jpg").size == (32, 48)  # stored sideways

    gray, rgba, deep, rotated = (dataset.load_image(root / "images" / name)
                                 for name in ("gray.png", "rgba.png", "deep.png", "rotated.jpg"))
    for t in (gray, rgba, deep, rotated):
        assert t.shape == (3, 32, 48) and t.dtype == torch.uint8
    assert torch.equal(gray[0], gray[2]) and torch.equal(gray[0], torch.from_numpy(rgb[..., 0]))
    assert torch.equal(rgba, torch.from_numpy(rgb).permute(2, 0, 1))  # alpha dropped
    assert torch.equal(deep, gray)  # 16-bit v * 257 scales back to the same 8-bit v
    band = rotated[:, :8].float().mean((1, 2))
    assert band[0] > 200 and band[1] < 60 and rotated[0, 8:].float().mean() < 200  # the red band is on top

    table = dataset.ClassTable(names=["a", "b", "c"], colours=[None] * 3, ignore_index=255)
    s = dataset.load_split(root, table, (16, 24))
    assert s.names == ["deep", "gray", "rgba", "rotated"] and s.images.shape == (4, 3, 16, 24)


def test_image_size_the_network_cannot_divide(tiny_data, tmp_path):
    """50x70 is no multiple of the network stride 4: the model pads inside, train and test run."""
    out = tmp_path / "run"
    r = run("train.py", "--train_path", tiny_data / "train", "--val_path", tiny_data / "val", "--epochs", 1,
            *TINY_MODEL, "--image_size", 50, 70, "--output_dir", out)  # the last --image_size wins
    assert r.returncode == 0, r.stderr
    assert "at 50x70" in r.stdout
    assert torch.load(out / "last.pt", weights_only=True)["image_size"] == [50, 70]
    r = run("test.py", "--test_image_path", tiny_data / "val" / "images" / "000.png", "--model_path", out / "best.pt",
            "--output_dir", tmp_path / "pred")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "pred" / "000_mask.png").size == (48, 32)  # back at the image's own size


# --- fuzz ---------------------------------------------------------------------------------

FUZZ_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F"]
FUZZ_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".webp": "WEBP"}


def fuzz_file(rng, folder, size, labels):
    """Random bytes, or a random image of `size` (H, W) in a random mode and format, sometimes
    damaged. `labels`: pixel values 0-3 (mask-like) instead of 0-255. Returns the path."""
    ext = rng.choice(sorted(FUZZ_FORMATS))
    path = folder / f"x{ext}"
    if rng.random() < 0.25:
        path.write_bytes(rng.randbytes(rng.randint(0, 300)))
        return path
    h, w = size
    a = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 4 if labels else 256, (h, w), dtype=np.uint8)
    mode = rng.choice(FUZZ_MODES)
    img = Image.fromarray(a).convert(mode) if mode != "I;16" else Image.fromarray(a.astype(np.uint16))
    buf = io.BytesIO()
    try:
        img.save(buf, FUZZ_FORMATS[ext])
    except (OSError, ValueError, KeyError):  # this format cannot store this mode
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, FUZZ_FORMATS[ext])
    b = bytearray(buf.getvalue())
    if rng.random() < 0.25:  # damage it: cut it short or flip a few bytes
        if rng.random() < 0.5:
            b = b[:rng.randint(0, len(b))]
        else:
            for _ in range(4):
                b[rng.randrange(len(b))] = rng.getrandbits(8)
    path.write_bytes(bytes(b))
    return path


FUZZ_CASES = 20


@pytest.fixture(scope="module")
def fuzz_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    pairs = []
    for seed in range(FUZZ_CASES):
        rng = random.Random(seed)
        d = root / str(seed)
        (d / "images").mkdir(parents=True)
        (d / "masks").mkdir()
        size = (rng.randint(1, 40), rng.randint(1, 40))
        mask_size = size if rng.random() < 0.7 else (rng.randint(1, 40), rng.randint(1, 40))
        pairs.append((d, fuzz_file(rng, d / "images", size, False), fuzz_file(rng, d / "masks", mask_size, True)))
    return pairs


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on the damaged files it reads
def test_fuzz_load_split(fuzz_pairs):
    """Whatever the files hold, load_split either returns a split or raises DataError naming a file."""
    table = dataset.ClassTable(names=["a", "b", "c"], colours=[(0, 0, 255), (0, 255, 0), (255, 0, 0)],
                               ignore_index=3, void_colour=(0, 0, 0))
    outcomes = []
    for folder, image, mask in fuzz_pairs:
        try:
            s = dataset.load_split(folder, table, (16, 16))
            assert s.images.shape == (1, 3, 16, 16) and s.masks.shape == (1, 16, 16)
            outcomes.append("ok")
        except DataError as e:
            assert str(image) in str(e) or str(mask) in str(e), str(e)
            outcomes.append("refused")
    assert {"ok", "refused"} <= set(outcomes)  # the cases cover both ends


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzz_test_image_path(fuzz_pairs, trained_tiny, tmp_path):
    """The same images through `test.py --test_image_path`. load_image is the oracle: the files it
    reads are segmented in one run (exit 0, a mask each); a file it refuses, one per kind of
    decoder failure (a launch costs seconds), gets its own run, which must end in one 'error:'
    line naming that file and exit status 2."""
    _, run_dir = trained_tiny
    good, bad = tmp_path / "good", {}
    good.mkdir()
    for i, (_, image, _) in enumerate(fuzz_pairs):
        try:
            dataset.load_image(image)
            (good / f"{i:02d}{image.suffix}").write_bytes(image.read_bytes())
        except DataError as e:
            kind = re.search(r"not a readable image \((\w+):", str(e))[1]  # the decoder's exception type
            bad.setdefault(kind, image)
    bad = list(bad.values())
    assert len(bad) >= 2 and len(list(good.iterdir())) >= 3  # the cases cover both ends
    commands = [("test.py", "--test_image_path", good, "--model_path", run_dir / "best.pt",
                 "--output_dir", tmp_path / "good_out")]
    commands += [("test.py", "--test_image_path", p, "--model_path", run_dir / "best.pt",
                  "--output_dir", tmp_path / "bad_out") for p in bad]
    first, *rest = run_many(commands, parallel=4, timeout=120)
    assert first.returncode == 0 and not first.stderr.strip(), first.stderr
    assert sorted(p.name for p in (tmp_path / "good_out").glob("*_mask.png")) == sorted(
        f"{p.stem}_mask.png" for p in good.iterdir())
    for path, r in zip(bad, rest):
        assert_refused(r, path)
