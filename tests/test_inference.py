"""test.py's outputs: one prediction behind every score and file, one pass over a split,
calibration kept beside the checkpoint, test-time flip, unique output names, class-index PNGs,
native-resolution and tiled inference, progress and Ctrl-C, help texts, figures with many classes.

Most tests call test.py's main in this process (a launch costs seconds of importing torch);
the Ctrl-C test runs it as a user would.
"""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run, write_split
from PIL import Image

import figures
from checkpoint import build_model, load_checkpoint, table_from_checkpoint
from cli import Parser
from dataset import ClassTable, DataError, load_image, load_mask, load_split, normalize, palette, resize_image
from evaluate import Predictor, evaluate, summarize, tile_starts
from metrics import UncertaintyMeter, softmax_entropy
from model import SegVAE, VAEConfig


@pytest.fixture(scope="module")
def script():
    """test.py as a module (loaded by path: `import test` could find the standard library's)."""
    spec = importlib.util.spec_from_file_location("test_script", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call(script, *argv):
    """test.py's main on these arguments, in this process; returns its result."""
    return script.main(script.get_args([str(a) for a in argv]))


def strict_json(path):
    """Parse a file as JSON proper: NaN or Infinity in it fails the test."""
    def refuse_constant(name):
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse_constant)


def count_forwards(monkeypatch):
    """Record the batch size of every forward and sample call of the network."""
    seen = []
    forward, sample = SegVAE.forward, SegVAE.sample

    def counted_forward(self, x, *a, **k):
        seen.append(("forward", x.shape[0]))
        return forward(self, x, *a, **k)

    def counted_sample(self, x, *a, **k):
        seen.append(("sample", x.shape[0]))
        return sample(self, x, *a, **k)

    monkeypatch.setattr(SegVAE, "forward", counted_forward)
    monkeypatch.setattr(SegVAE, "sample", counted_sample)
    return seen


# --- one prediction, one pass -------------------------------------------------------------


def test_one_miou_per_metrics_file_and_saved_masks_agree(trained_tiny, tmp_path):
    """With samples and flip, metrics.json holds one mIoU (that of the prediction), the flags it
    was made with, valid JSON, and the per-image masks are that same prediction."""
    data, run_dir = trained_tiny
    r = run("test.py", "--test_path", data / "val", "--model_path", run_dir / "best.pt", "--output_dir", tmp_path,
            "--samples", 3, "--flip", "--save_predictions")
    assert r.returncode == 0, r.stderr
    assert not r.stderr.strip()  # no progress bar when stderr is not a terminal
    assert "evaluated 4 images in" in r.stdout.splitlines()[-1]  # a closing line
    m = strict_json(tmp_path / "metrics.json")

    def mious(obj, path=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "miou":
                    yield path, v
                elif k != "coverage":  # mIoU of the most certain pixels: a subset, named as such
                    yield from mious(v, f"{path}/{k}")
        elif isinstance(obj, list):
            for v in obj:
                yield from mious(v, path)

    assert [v for _, v in mious(m)] == [m["miou"]], list(mious(m))
    assert (m["samples"], m["flip"], m["resolution"]) == (3, True, "train")
    assert set(m["uncertainty"]) == {"entropy", "mutual_info", "variance"}
    table = table_from_checkpoint(load_checkpoint(run_dir / "best.pt"))
    cm = np.zeros((3, 3), np.int64)
    for i in range(4):
        labels = Image.open(tmp_path / f"{i:03d}_labels.png")
        assert labels.mode == "P"
        truth = load_mask(data / "val" / "masks" / f"{i:03d}.png", table).numpy()
        keep = truth != table.ignore_index
        np.add.at(cm, (truth[keep], np.asarray(labels)[keep]), 1)
    assert cm.tolist() == m["confusion_matrix"]


def test_scores_come_from_the_probabilities_at_label_resolution(script, trained_tiny, tmp_path):
    """Rebuilt from the network's own pieces: the mean latent's logits upsampled to the label,
    softmax, and the entropy of those probabilities as the score. Calibration and AUROC in
    metrics.json are those of exactly this, and the mIoU is the one train.py validates with."""
    data, run_dir = trained_tiny
    m = call(script, "--test_path", data / "val", "--model_path", run_dir / "best.pt", "--output_dir", tmp_path,
             "--precision", "fp32", "--examples", 0)
    ckpt = load_checkpoint(run_dir / "best.pt")
    model, table = build_model(ckpt), table_from_checkpoint(ckpt)
    meter = UncertaintyMeter(3, table.ignore_index, math.log1p(math.log(3) / 1e-6))
    for i in range(4):
        image = resize_image(load_image(data / "val" / "images" / f"{i:03d}.png"), tuple(ckpt["image_size"]))
        truth = load_mask(data / "val" / "masks" / f"{i:03d}.png", table)
        with torch.no_grad():
            logits = model(normalize(image[None]))[0]
        probs = F.interpolate(logits, size=truth.shape, mode="bilinear", align_corners=False).softmax(1)
        meter.update(probs, truth[None], torch.log1p(softmax_entropy(probs) / 1e-6))
    ref = meter.compute()
    for k in ("ece", "nll", "brier"):
        assert m["calibration"][k] == pytest.approx(ref[k], rel=1e-4), k
    assert m["uncertainty"]["entropy"]["auroc"] == pytest.approx(ref["auroc"], abs=1e-3)
    assert m["miou"] == pytest.approx(ref["miou"], abs=1e-9)
    split = load_split(data / "val", table, tuple(ckpt["image_size"]))
    val = summarize(evaluate(model, split, num_classes=3, ignore_index=table.ignore_index,
                             device=torch.device("cpu"), dtype=None))
    assert m["miou"] == pytest.approx(val["miou"], abs=1e-9)


@pytest.mark.parametrize("calibrate", [False, True])
def test_split_is_read_in_one_pass(script, trained_tiny, tmp_path, monkeypatch, calibrate):
    """Scores, uncertainty and examples from one pass over the images; the temperature fit is
    a pass of its own before it."""
    data, run_dir = trained_tiny
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes((run_dir / "best.pt").read_bytes())
    seen = count_forwards(monkeypatch)
    call(script, "--test_path", data / "val", "--model_path", ckpt, "--output_dir", tmp_path / "out",
         "--samples", 2, "--examples", 4, *(["--calibrate"] if calibrate else []))
    assert sum(n for _, n in seen) == 4 * (2 if calibrate else 1), seen


def test_calibration_is_stored_per_setting_beside_the_checkpoint(script, trained_tiny, tmp_path, capsys):
    data, run_dir = trained_tiny
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes((run_dir / "best.pt").read_bytes())
    before = ckpt.read_bytes()
    fitted = call(script, "--test_path", data / "val", "--model_path", ckpt, "--output_dir", tmp_path / "a",
                  "--samples", 2, "--calibrate")
    assert ckpt.read_bytes() == before  # what training wrote stays
    calibrated = load_checkpoint(tmp_path / "best.calibrated.pt")
    t = calibrated["calibration"]["samples=2 flip=0 resolution=train"]["temperature"]
    assert t != 1.0 and fitted["temperature"] == t
    # the calibrated file with the same settings: the same temperature and the same draws
    again = call(script, "--test_path", data / "val", "--model_path", tmp_path / "best.calibrated.pt",
                 "--output_dir", tmp_path / "b", "--samples", 2)
    assert again["temperature"] == t and again["calibration"] == fitted["calibration"]
    capsys.readouterr()
    other = call(script, "--test_path", data / "val", "--model_path", tmp_path / "best.calibrated.pt",
                 "--output_dir", tmp_path / "c", "--samples", 1)
    assert other["temperature"] == 1.0
    assert "no temperature fitted for samples=1 flip=0 resolution=train" in capsys.readouterr().out


def test_flip_applies_to_single_images(script, trained_tiny, tmp_path, monkeypatch):
    """--flip on an image: the network sees it mirrored too, and the prediction of the mirrored
    image is the mirror of the image's prediction."""
    data, run_dir = trained_tiny
    image = data / "val" / "images" / "000.png"  # 32x48, the training size: no resize
    mirrored = tmp_path / "mirrored.png"
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    seen = count_forwards(monkeypatch)
    call(script, "--test_image_path", image, "--model_path", run_dir / "best.pt", "--output_dir", tmp_path / "a",
         "--flip")
    assert seen == [("sample", 2)]  # the image and its mirror, in one batch
    call(script, "--test_image_path", mirrored, "--model_path", run_dir / "best.pt", "--output_dir",
         tmp_path / "b", "--flip")
    a = np.asarray(Image.open(tmp_path / "a" / "000_labels.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "mirrored_labels.png"))
    assert np.array_equal(a[:, ::-1], b)


# --- progress, Ctrl-C, threads, help -------------------------------------------------------


def test_ctrl_c_during_evaluation_is_one_line(trained_tiny, tmp_path):
    _, run_dir = trained_tiny
    data = tmp_path / "big"
    write_split(data, 400, 3)
    args = ["--test_path", data, "--model_path", run_dir / "best.pt", "--output_dir", tmp_path / "out",
            "--samples", 64, "--flip"]
    p = subprocess.Popen([sys.executable, str(REPO / "test.py"), *map(str, args)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"},
                         # a suite started in the background inherits SIGINT ignored, and Python
                         # then keeps ignoring it: give the child the terminal's default
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    p.stdout.readline()  # the configuration line: the model is loaded, the pass begins
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted"), err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_threads_flag(script, trained_tiny, tmp_path):
    data, run_dir = trained_tiny
    before = torch.get_num_threads()
    try:
        call(script, "--test_image_path", data / "val" / "images" / "000.png", "--model_path", run_dir / "best.pt",
             "--output_dir", tmp_path, "--threads", 1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert json.loads((tmp_path / "test_config.json").read_text())["threads"] == 1


def test_parser_shows_a_default_of_0(capsys):
    p = Parser(prog="x")
    p.add_argument("--n", type=int, default=0, help="how many")
    p.add_argument("--what", help="a path, or nothing")
    p.print_help()
    text = " ".join(capsys.readouterr().out.split())
    assert "how many (default: 0)" in text and "(default: None)" not in text


def test_help_states_each_default_once(script, capsys):
    with pytest.raises(SystemExit):
        script.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text
    assert "seed for latent sampling (default: 0)" in text  # a default of 0 is shown too
    assert "(default: 512 512)" in text and "[512, 512]" not in text


# --- output names --------------------------------------------------------------------------


def test_same_stem_inputs_get_distinct_names(script, trained_tiny, tmp_path, capsys):
    data, run_dir = trained_tiny
    for sub in ("a", "b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        (tmp_path / "in" / sub / "x.png").write_bytes((data / "val" / "images" / f"00{len(sub)}.png").read_bytes())
    call(script, "--test_image_path", tmp_path / "in" / "*" / "x.png", "--model_path", run_dir / "best.pt",
         "--output_dir", tmp_path / "out")
    assert (tmp_path / "out" / "a__x_labels.png").is_file() and (tmp_path / "out" / "b__x_labels.png").is_file()
    assert "a__x" in capsys.readouterr().out  # said, not silent
    names = script.output_names([tmp_path / "x.png", tmp_path / "x.jpg", tmp_path / "y.png"])
    assert names == ["x_png", "x_jpg", "y"]


def test_outputs_of_two_checkpoints_never_mix(script, trained_tiny, tmp_path, capsys):
    data, run_dir = trained_tiny
    image = data / "val" / "images" / "000.png"
    assert script.default_output_dir("runs/a/best.pt") != script.default_output_dir("runs/b/best.pt")
    assert script.default_output_dir("runs/a/best.pt") != script.default_output_dir("runs/a/last.pt")
    other = tmp_path / "other.pt"
    other.write_bytes((run_dir / "best.pt").read_bytes())
    call(script, "--test_image_path", image, "--model_path", run_dir / "best.pt", "--output_dir", tmp_path / "o")
    with pytest.raises(DataError, match="holds the outputs of checkpoint"):
        call(script, "--test_image_path", image, "--model_path", other, "--output_dir", tmp_path / "o")
    capsys.readouterr()
    call(script, "--test_image_path", image, "--model_path", run_dir / "best.pt", "--output_dir", tmp_path / "o")
    assert "replaced 3 file(s)" in capsys.readouterr().out  # the same checkpoint again: said, not silent


# --- class-index PNGs ----------------------------------------------------------------------


@pytest.mark.parametrize("ignore_index", [3, 300])
def test_labels_png_reads_back_as_class_indices(tmp_path, ignore_index):
    table = ClassTable(names=["a", "b", "c"], colours=[(255, 255, 255), (0, 0, 0), (200, 10, 10)],
                       ignore_index=ignore_index, void_colour=(0, 0, 0))
    labels = np.random.default_rng(0).integers(0, 3, (20, 30))
    labels[:4, :5] = ignore_index
    figures.save_labels(tmp_path / "l.png", labels, palette(table), ignore_index, table.void_colour)
    img = Image.open(tmp_path / "l.png")
    assert img.mode == "P"
    stored = min(ignore_index, 255)
    assert np.array_equal(np.asarray(img), np.where(labels == ignore_index, stored, labels))
    pal = np.array(img.getpalette()).reshape(-1, 3)
    assert pal[:3].tolist() == [[255, 255, 255], [0, 0, 0], [200, 10, 10]]
    if ignore_index == 3:  # the project's own reader gets the same labels back, void included
        assert np.array_equal(load_mask(tmp_path / "l.png", table).numpy(), labels)


def test_single_image_writes_labels_beside_the_colours(script, trained_tiny, tmp_path):
    data, run_dir = trained_tiny
    call(script, "--test_image_path", data / "val" / "images" / "001.png", "--model_path", run_dir / "best.pt",
         "--output_dir", tmp_path)
    labels = np.asarray(Image.open(tmp_path / "001_labels.png"))
    colours = np.asarray(Image.open(tmp_path / "001_mask.png").convert("RGB"))
    pal = palette(table_from_checkpoint(load_checkpoint(run_dir / "best.pt")))
    assert labels.shape == (32, 48) and np.array_equal(pal[labels], colours)


# --- native resolution and tiles -----------------------------------------------------------


class PixelModel(torch.nn.Module):
    """A stand-in network whose logits depend on each pixel alone: tiles must reproduce the
    whole image's logits exactly."""

    stride = 4

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 1)

    def sample(self, x, n, generator=None, global_noise=None):
        return self.conv(x).expand(n, *self.conv(x).shape)  # (n, B, C, H, W)


def test_tiles_blend_back_to_the_whole_image():
    torch.manual_seed(0)
    model = PixelModel()
    image = torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8)
    whole, tiled = (Predictor(model, torch.device("cpu"), None, (32, 32), samples=2, flip=True, resolution="native",
                              tile_size=t, batch_size=3).logits([image])[0] for t in ((64, 128), (16, 20)))
    assert whole.shape == tiled.shape == (2, 2, 5, 45, 70)
    assert torch.allclose(whole, tiled, atol=1e-5)
    for n, t in ((70, 20), (45, 16), (16, 16), (17, 16)):
        starts = tile_starts(n, t)
        assert starts[0] == 0 and starts[-1] == n - t if n > t else starts == [0]
        assert all(b - a <= t - t // 4 for a, b in zip(starts, starts[1:]))  # overlapping, no gap


@pytest.mark.parametrize("resolution", ["train", "native"])
def test_multi_scale_views_are_each_scale_resized_back(resolution):
    """--scales: one view per scale (and orientation), each the logits of the image resized by
    that factor, brought back to the size the network sees the image at; its own settings key."""
    torch.manual_seed(0)
    model = PixelModel()
    image = torch.randint(0, 256, (3, 24, 40), dtype=torch.uint8)
    size = (32, 48) if resolution == "train" else (24, 40)
    one, multi = (Predictor(model, torch.device("cpu"), None, (32, 48), samples=2, flip=True, resolution=resolution,
                            scales=s) for s in ((1.0,), (1.0, 0.5)))
    base, views = one.logits([image])[0], multi.logits([image])[0]
    assert base.shape == (2, 2, 5, *size) and views.shape == (2, 4, 5, *size)
    assert torch.equal(views[:, :2], base)
    half = model.conv(normalize(resize_image(image, [n // 2 for n in size])[None]))
    expected = F.interpolate(half, size=size, mode="bilinear", align_corners=False)[0]
    assert torch.allclose(views[0, 2], expected, atol=1e-5)
    assert torch.allclose(views[0, 3], expected, atol=1e-4)  # the mirrored half-size image, mirrored back
    assert multi.settings() == one.settings() + " scales=1,0.5"


@pytest.mark.parametrize("resolution, scales", [("train", (1.0,)), ("train", (1.0, 0.5)), ("native", (1.0,))])
def test_views_of_an_image_decode_one_latent_draw(resolution, scales):
    """With the learned prior's global latent, sample s of an image is one latent: the mirrored
    view, each scale and each tile decode the same draw (independent draws per view would blend
    alternatives, e.g. Road in one view and Road-2 in the other, into one sample)."""
    torch.manual_seed(0)
    model = SegVAE(VAEConfig(num_classes=4, widths=(8, 16), prior="learned", latent_dim=3)).eval()
    images = [torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8) for _ in range(2)]
    draws, sample = [], model.sample

    def recording(x, n, generator=None, global_noise=None):
        draws.append(global_noise)
        return sample(x, n, generator, global_noise)

    model.sample = recording
    predictor = Predictor(model, torch.device("cpu"), None, (32, 48), samples=3, flip=True, resolution=resolution,
                          tile_size=(24, 32), scales=scales)
    logits = predictor.logits(images)
    flip_pairs = [d.view(3, 2, -1, 3) for d in draws]  # (S, orientation, images or tiles, latent)
    assert all(torch.equal(d[:, 0], d[:, 1]) for d in flip_pairs)
    per_image = torch.cat([d[:, 0] for d in flip_pairs], 1)  # (S, calls' images or tiles, latent)
    assert len({tuple(per_image[:, i].flatten().tolist()) for i in range(per_image.shape[1])}) == len(images)
    if resolution == "train":  # one call per scale, each with both images in order: the same draws each time
        assert all(torch.equal(d[:, 0], flip_pairs[0][:, 0]) for d in flip_pairs)
    assert not torch.equal(per_image[0], per_image[1])  # different samples draw differently
    if resolution == "train" and scales == (1.0,):
        # the same draw through model.sample directly: the plain view, and the mirrored one mirrored back
        noise = torch.randn((3, 2, 3), generator=torch.Generator().manual_seed(0))
        x = normalize(torch.stack([resize_image(im, [32, 48]) for im in images]))
        plain = model.sample(x, 3, global_noise=noise)
        mirrored = model.sample(x.flip(-1), 3, global_noise=noise).flip(-1)
        assert torch.allclose(logits[0][:, 0], plain[:, 0], atol=1e-5)
        assert torch.allclose(logits[1][:, 1], mirrored[:, 1], atol=1e-5)


def test_native_resolution_split(script, trained_tiny, tmp_path):
    """Images larger than the training size: segmented at their own size (tiled here), every
    valid pixel scored once, the masks at the image's size."""
    _, run_dir = trained_tiny
    rng = np.random.default_rng(5)
    (tmp_path / "big" / "images").mkdir(parents=True)
    (tmp_path / "big" / "masks").mkdir()
    for i in range(3):
        mask = rng.integers(0, 4, (40, 60)).astype(np.uint8)
        image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / "big" / "images" / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / "big" / "masks" / f"{i}.png")
    valid = sum(int((np.asarray(Image.open(p)) != 3).sum()) for p in (tmp_path / "big" / "masks").iterdir())
    for res in ("train", "native"):
        m = call(script, "--test_path", tmp_path / "big", "--model_path", run_dir / "best.pt", "--output_dir",
                 tmp_path / res, "--resolution", res, "--tile_size", 24, 32, "--save_predictions", "--samples", 2)
        assert np.array(m["confusion_matrix"]).sum() == valid and m["resolution"] == res
        assert Image.open(tmp_path / res / "0_labels.png").size == (60, 40)


# --- figures -------------------------------------------------------------------------------


def test_legend_of_32_classes_stays_below_the_panels(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    drawn = []
    monkeypatch.setattr(figures, "save", lambda fig, path, dpi=100: drawn.append(fig))
    table = ClassTable(names=[f"class number {i}" for i in range(32)], colours=[None] * 32, ignore_index=32)
    pred = np.arange(48)[None].repeat(32, 0) % 32
    figures.save_figure(tmp_path / "f.png", np.zeros((32, 48, 3), np.uint8), pred, palette(table), table, pred,
                        np.zeros((32, 48)), 1.0)
    fig = drawn[0]
    FigureCanvasAgg(fig).draw()
    legend = fig.legends[0].get_window_extent()
    panels = min(ax.get_tightbbox().y0 for ax in fig.axes)
    assert legend.y1 <= panels and legend.y0 >= 0 and legend.x0 >= 0 and legend.x1 <= fig.bbox.width


def test_void_is_drawn_unlike_a_black_class():
    pal = np.array([[0, 0, 0], [255, 255, 255]], np.uint8)
    labels = np.array([[0] * 8, [9] * 8] * 4)
    rgb = figures.colourize(labels, pal, ignore_index=9)
    void = rgb[labels == 9]
    assert (void != 0).any(1).all() and len({tuple(c) for c in void}) == 2  # grey checkerboard, no black
