"""The learned prior, the label flips and the distribution scores wired through train.py,
evaluate.py and test.py: validation sums, the flip model seen on the base classes, sampled label
maps, and the scripts end to end on tiny CamVid-like data."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ambiguity import (CAMVID_FLIPS, check_base_table, check_labels, merge_flipped, merge_flipped_probs, mode_maps,
                       mode_table)
from checkpoint import build_model
from conftest import CAMVID, CLASSES_CSV, TINY_MODEL, assert_refused, metrics_rows, run
from dataset import LabelMasks, Split, load_mask, make_class_table, normalize
from evaluate import diversity_stride, evaluate, summarize
from model import SegVAE, VAEConfig, kl_loss
from sampling import SampleScores, label_samples, sample_counts

CPU = torch.device("cpu")
CAMVID_CSV = ("index,name,r,g,b\n0,Sky,128,128,128\n1,Building,128,0,0\n2,Pole,192,192,128\n3,Road,128,64,128\n"
              "4,Pavement,60,40,222\n5,Tree,128,128,0\n6,SignSymbol,192,128,128\n7,Fence,64,64,128\n"
              "8,Car,64,0,128\n9,Pedestrian,64,64,0\n10,Bicyclist,0,128,192\n11,Unlabelled,0,0,0\n")


def tiny_split(n=4, classes=11, void=11, seed=0):
    """n random 32x32 images of 8x8 blocks, labels 0..classes-1 with some void."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, classes, (n, 4, 4), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
    masks[:, :2, :2] = void
    images = (masks[:, None].float() * 20 + torch.rand(n, 3, 32, 32, generator=g) * 30).clamp(0, 255).byte()
    return Split(images=images, masks=masks.byte(), label_masks=[m.byte() for m in masks], names=[str(i) for i in
                                                                                                   range(n)])


@pytest.mark.parametrize("prior", ["standard", "learned"])
def test_validation_sums_kl_and_diversity(prior):
    torch.manual_seed(0)
    model = SegVAE(VAEConfig(num_classes=11, widths=(8, 16), latent_channels=4, prior=prior)).eval()
    split = tiny_split()
    m = summarize(evaluate(model, split, num_classes=11, ignore_index=11, device=CPU, dtype=None,
                           diversity_samples=3))
    x = normalize(split.images)  # as evaluate sees them
    target = split.masks.long().masked_fill(split.masks.long() == 11, -1)
    _, mu, logvar, pmu, plogvar = model.forward_val(x, target)
    assert m["kl"] == pytest.approx(kl_loss(mu, logvar, 32 * 32, 0.0, pmu, plogvar).item(), rel=1e-4)
    assert m["kl_image"] == pytest.approx(m["kl"] * 32 * 32, rel=1e-6)
    assert len(m["kl_channels"]) == model.config.latent_width
    assert 0 < m["diversity"] <= 1  # untrained: samples differ
    det = SegVAE(VAEConfig(num_classes=11, widths=(8, 16), latent_channels=4, stochastic=False)).eval()
    m = summarize(evaluate(det, split, num_classes=11, ignore_index=11, device=CPU, dtype=None,
                           diversity_samples=3))
    assert math.isnan(m["diversity"])  # a deterministic model is not sampled


def test_diversity_is_sampled_on_images_spread_over_the_split():
    torch.manual_seed(0)
    model = SegVAE(VAEConfig(num_classes=11, widths=(8, 16), latent_channels=4, prior="learned")).eval()
    split = tiny_split(n=10)
    run = dict(num_classes=11, ignore_index=11, device=CPU, dtype=None, diversity_samples=3, batch_size=4)
    assert diversity_stride(10, 3) == 4 and diversity_stride(10, 0) == 1 and diversity_stride(3, 26) == 1
    some = evaluate(model, split, diversity_images=3, **run)
    assert some["diversity_n"] == 3 and some["images"] == 10  # images 0, 4, 8; every image scored
    # two shards of the split sample the same images between them
    halves = [evaluate(model, split, diversity_images=3, indices=part, **run) for part in (range(0, 5), range(5, 10))]
    assert [h["diversity_n"] for h in halves] == [2, 1]
    assert evaluate(model, split, diversity_images=0, **run)["diversity_n"] == 10


def sampling_as(model, maps):
    """Make model.sample draw the label maps `maps` (n, H, W), the same for every image, as
    one-hot logits: a model whose samples are known."""
    def sample(x, n, generator=None):
        assert n == len(maps)
        onehot = torch.nn.functional.one_hot(maps.long(), model.config.num_classes).movedim(-1, 1).float()
        return onehot[:, None].expand(n, x.shape[0], *onehot.shape[1:])
    model.sample = sample
    return model


def test_validation_ged_on_the_flip_benchmark_by_hand():
    """Every image: Car on the left, Sky on the right, a void corner. Only the Car flip shows,
    so the modes are the label (1 - p) and its Car-2 version (p = 6/17), 1 - IoU = 1 apart (the
    ten flippable classes: Car in one, Car-2 in the other). Samples that always draw the label:
    E[d(S, Y)] = p, E[d(S, S')] = 0, E[d(Y, Y')] = 2p(1 - p), so D2_GED = 2p^2."""
    masks = torch.zeros(3, 32, 32, dtype=torch.uint8)
    masks[:, :, :16] = 8
    masks[:, :4, :4] = 11
    images = torch.full((3, 3, 32, 32), 100, dtype=torch.uint8)
    split = Split(images=images, masks=masks, label_masks=list(masks), names=["0", "1", "2"])
    torch.manual_seed(0)
    model = SegVAE(VAEConfig(num_classes=16, widths=(8, 16), prior="learned")).eval()
    run = dict(num_classes=11, ignore_index=11, device=CPU, dtype=None, flips=CAMVID_FLIPS, diversity_images=0)
    label = masks[0].long().masked_fill(masks[0] == 11, 0)  # what the samples draw under void does not count
    m = summarize(evaluate(sampling_as(model, torch.stack([label, label])), split, diversity_samples=2, **run))
    p = 6 / 17
    assert m["ged"] == pytest.approx(2 * p * p, abs=1e-9) and m["diversity"] == 0
    flipped = label.masked_fill(label == 8, 13)  # Car-2: one sample of each mode
    m = summarize(evaluate(sampling_as(model, torch.stack([label, flipped])), split, diversity_samples=2, **run))
    assert m["ged"] == pytest.approx(2 * 0.5 - 0.5 - 2 * p * (1 - p), abs=1e-9)
    assert math.isnan(summarize(evaluate(model, split, diversity_samples=0, **run))["ged"])  # not sampled


def test_validation_ged_compares_samples_with_every_annotator():
    """Two annotators, a (top half class 1) and b (all class 0). Samples drawing a and b match the
    annotations (D2_GED 0); samples drawing a only are a deterministic model, D2_GED > 0, while
    mIoU and the loss score the first annotator alone."""
    a = torch.zeros(32, 32, dtype=torch.uint8)
    a[:16] = 1
    b = torch.zeros(32, 32, dtype=torch.uint8)
    both = torch.stack([a, b])  # (K, H, W)
    flat = np.concatenate([both.numpy().ravel()] * 2)
    split = Split(images=torch.full((2, 3, 32, 32), 100, dtype=torch.uint8), masks=torch.stack([both, both]),
                  label_masks=LabelMasks(flat, np.array([0, 2048, 4096]), [(32, 32)] * 2, 2), names=["0", "1"])
    torch.manual_seed(0)
    model = SegVAE(VAEConfig(num_classes=2, widths=(8, 16), prior="learned")).eval()
    run = dict(num_classes=2, ignore_index=255, device=CPU, dtype=None, diversity_samples=2, diversity_images=0)
    m = summarize(evaluate(sampling_as(model, torch.stack([a, b])), split, **run))
    assert m["ged"] == pytest.approx(0, abs=1e-12)
    # d(a, b) = 1 - (0.5 + 0) / 2 = 0.75: E[d(S, Y)] = 0.375, E[d(S, S')] = 0, E[d(Y, Y')] = 0.375
    sums = evaluate(sampling_as(model, torch.stack([a, a])), split, **run)
    assert summarize(sums)["ged"] == pytest.approx(2 * 0.375 - 0.375, abs=1e-12)
    assert sums["cm"].sum(1).tolist() == [1024, 1024]  # true classes of annotator a (b: [2048, 0])


def test_flip_model_is_scored_on_the_base_classes():
    logits = torch.randn(2, 16, 5, 5)
    merged = merge_flipped(logits)
    assert merged.shape == (2, 11, 5, 5)
    p16, p11 = logits.softmax(1), merged.exp()
    assert torch.allclose(p11.sum(1), torch.ones(2, 5, 5), atol=1e-5)
    assert torch.allclose(p11[:, 4], p16[:, 4] + p16[:, 11], atol=1e-6)  # Pavement + Pavement-2
    assert torch.allclose(p11[:, 0], p16[:, 0], atol=1e-6)  # Sky has no second version
    assert torch.allclose(merge_flipped_probs(p16), p11, atol=1e-6)
    torch.manual_seed(0)
    model = SegVAE(VAEConfig(num_classes=16, widths=(8, 16), prior="learned")).eval()
    m = summarize(evaluate(model, tiny_split(), num_classes=11, ignore_index=11, device=CPU, dtype=None,
                           flips=CAMVID_FLIPS))
    assert len(m["iou"]) == 11 and math.isfinite(m["loss"]) and math.isfinite(m["kl_image"])


def test_label_samples_latent_and_per_pixel():
    probs = torch.zeros(3, 2, 1, 2)
    probs[:, 0] = torch.tensor([0.9, 0.2])[:, None].T  # pixel 0 mostly class 0, pixel 1 mostly class 1
    probs[:, 1] = 1 - probs[:, 0]
    assert torch.equal(label_samples(probs), torch.tensor([[[0, 1]]] * 3))
    many = torch.full((4000, 2, 1, 2), 0.0)
    many[:, 0, 0, 0], many[:, 0, 0, 1] = 0.9, 0.2
    many[:, 1] = 1 - many[:, 0]
    drawn = label_samples(many, "pixel", torch.Generator().manual_seed(0))  # (4000, 1, 2)
    share = (drawn == 0).double().mean((0, 1))
    assert abs(share[0] - 0.9) < 0.02 and abs(share[1] - 0.2) < 0.02
    assert sample_counts(16) == (1, 4, 8, 16) and sample_counts(6) == (1, 4, 6)


def test_sample_scores_of_the_true_modes_with_camvid_void():
    """Samples that are the modes themselves, in proportion: GED 0 at N = 16 within sampling
    error, void (11 in the base label) excluded, the extended void 255 in the modes."""
    label = torch.tensor([[3, 4, 5, 8], [9, 0, 11, 11]])  # every flippable class, some void
    modes = mode_maps(label)
    assert torch.all(modes[:, 1, 2:] == 255)
    scores = SampleScores(16, 255, (1, 16), CAMVID_FLIPS)
    g = torch.Generator().manual_seed(0)
    probs = mode_table()[1]
    for _ in range(40):
        pick = torch.multinomial(probs, 16, replacement=True, generator=g)
        scores.update(modes[pick], label)
    r = scores.compute()
    assert abs(r["ged"][16]) < 0.05 and r["ged"][1] > 0.3  # one sample cannot cover the modes
    assert r["mode_tv"] < 0.15 and all(abs(a - b) < 0.08 for a, b in zip(r["image_share"], r["true_share"]))


def test_mode_tv_floor_is_the_sampling_noise_of_an_exact_sampler():
    """The mode-TV floor: what a sampler with the true frequencies scores with the model's number
    of samples per image, here against the expected TV of as many multinomial draws; it halves
    with four times the samples, and an exact sampler's own mode TV sits at it."""
    label = torch.tensor([[3, 4, 5, 8], [9, 0, 11, 11]])  # every flippable class: 32 distinct modes
    probs = mode_table()[1].double()
    g = torch.Generator().manual_seed(1)

    def expected_tv(n):  # the mean TV of 4000 multinomial draws of n samples
        counts = torch.distributions.Multinomial(n, probs).sample((4000,))
        return float((0.5 * (counts / n - probs).abs().sum(1)).mean())

    floors = {}
    for per_image in (4, 16):
        scores = SampleScores(16, 255, (1,), CAMVID_FLIPS)
        modes = mode_maps(label)
        for _ in range(30):
            scores.update(modes[torch.multinomial(probs, per_image, replacement=True, generator=g)], label)
        r = scores.compute()
        floors[per_image] = r["mode_tv_floor"]
        assert r["mode_tv_floor"] == pytest.approx(expected_tv(30 * per_image), abs=0.015)
        assert abs(r["mode_tv"] - r["mode_tv_floor"]) < 0.08  # one draw of the same noise
    assert floors[16] == pytest.approx(floors[4] / 2, rel=0.2)


def test_oracle_ged_is_zero_for_a_perfect_segmentation_and_the_weighted_ged_otherwise():
    """The oracle GED (the true flips of the model's own segmentation): 0 when that segmentation
    is the label; for a wrong one, the probability-weighted GED of its 32 flips, computed here
    from the distances pair by pair."""
    label = torch.tensor([[3, 4, 5, 8], [9, 0, 11, 11]])
    scores = SampleScores(16, 255, (1,), CAMVID_FLIPS)
    modes = mode_maps(label)
    scores.update(modes[:1], label, base_pred=label)
    r = scores.compute()
    assert r["oracle_ged"] == pytest.approx(0, abs=1e-12) and r["oracle_mode_tv"] == pytest.approx(0, abs=1e-12)
    wrong = torch.tensor([[3, 3, 5, 8], [9, 0, 0, 4]])  # Pavement as Road; void pixels do not count
    scores.update(modes[:1], label, base_pred=wrong)
    probs = mode_table()[1].tolist()
    guesses = mode_maps(wrong)
    valid = label != 11
    flippable = [3, 4, 5, 8, 9, 11, 12, 13, 14, 15]

    def d(a, b):
        ious = [((a == c) & (b == c) & valid).sum().item() / ((a == c) | (b == c))[valid].sum().item()
                for c in flippable if ((a == c) | (b == c))[valid].any()]
        return 1 - sum(ious) / len(ious)

    m = len(probs)
    pairs = [(i, j) for i in range(m) for j in range(m)]
    ged = sum(probs[i] * probs[j] * (2 * d(guesses[i], modes[j]) - d(guesses[i], guesses[j]) - d(modes[i], modes[j]))
              for i, j in pairs)
    assert ged > 0.1
    assert scores.compute()["oracle_ged"] == pytest.approx(ged / 2, abs=1e-9)  # the mean over the two images


def test_old_checkpoint_config_builds():
    torch.manual_seed(0)
    model = SegVAE(VAEConfig(num_classes=3, widths=(8, 16), latent_channels=4))
    cfg = {k: v for k, v in model.config.to_dict().items()
           if k not in ("prior", "latent_form", "latent_dim", "inject", "head_convs")}
    ckpt = {"model": model.state_dict(), "model_config": cfg, "classes": ["a", "b", "c"]}
    rebuilt = build_model(ckpt)
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(rebuilt(x)[0], model.eval()(x)[0], atol=1e-5)  # (channels-last: rounding only)


@pytest.fixture(scope="module")
def camvid_like(tmp_path_factory):
    """CamVid's class table with random 32x48 blocks of its 11 classes and void 11."""
    root = tmp_path_factory.mktemp("camvid_like")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        (root / split).mkdir()
        (root / f"{split}annot").mkdir()
        for i in range(n):
            mask = np.kron(rng.integers(0, 11, (4, 6)), np.ones((8, 8), np.int64)).astype(np.uint8)
            mask[:4, :4] = 11
            image = (mask[..., None] * 20 + rng.integers(0, 30, (32, 48, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / split / f"{i:03d}.png")
            Image.fromarray(mask, mode="L").save(root / f"{split}annot" / f"{i:03d}.png")
    (root / "classes.csv").write_text(CAMVID_CSV)
    return root


def test_learned_prior_with_flips_end_to_end(camvid_like, tmp_path):
    out = tmp_path / "run"
    r = run("train.py", "--train_path", camvid_like / "train", "--val_path", camvid_like / "val", "--epochs", 3,
            "--output_dir", out, "--prior", "learned", "--label_flips", 1, "--select", "ged", "--calibration", 1,
            *TINY_MODEL)
    assert r.returncode == 0, r.stderr
    assert "label flips: Pavement -> Pavement-2 (8/17)" in r.stdout and "D2_GED" in r.stdout
    assert json.loads((out / "config.json").read_text())["calibration"] == 1 and "  brier " in r.stdout
    rows = metrics_rows(out)
    assert all(0 < float(row["train_brier"]) < 2 for row in rows)  # the fair Brier score of the prior's samples
    assert {"val_kl_image", "kl_active", "val_diversity", "val_ged", "iou_Bicyclist"} <= set(rows[0])
    assert "iou_Pavement-2" not in rows[0]  # validation scores the base classes
    ckpt = torch.load(out / "best.pt", weights_only=True)
    geds = [float(row["val_ged"]) for row in rows]
    assert ckpt["epoch"] == 1 + geds.index(min(geds))  # --select ged: best.pt is the lowest D2_GED
    assert len(ckpt["classes"]) == 16 and ckpt["ignore_index"] == 255 and len(ckpt["label_flips"]) == 5
    assert ckpt["model_config"]["prior"] == "learned" and ckpt["base_ignore_index"] == 11

    pred = tmp_path / "pred"
    r = run("test.py", "--test_path", camvid_like / "val", "--model_path", out / "best.pt", "--samples", 4,
            "--output_dir", pred, "--examples", 0)
    assert r.returncode == 0, r.stderr
    assert "against the 32 label-flip modes" in r.stdout and "mode total-variation distance" in r.stdout
    m = json.loads((pred / "metrics.json").read_text())
    s = m["samples_scores"]
    assert set(s["ged"]) == {"1", "4"} and len(s["mode_freq"]) == 32 and len(m["iou"]) == 11
    assert s["true_share"][0] == pytest.approx(8 / 17)
    assert 0 <= s["oracle_ged"] <= 2 and 0 <= s["oracle_mode_tv"] <= 1 and "oracle (the true flips" in r.stdout

    r = run("test.py", "--test_image_path", camvid_like / "val" / "000.png", "--mask_path",
            camvid_like / "valannot" / "000.png", "--model_path", out / "best.pt", "--samples", 3,
            "--output_dir", pred)
    assert r.returncode == 0, r.stderr
    assert (pred / "000_samples.png").is_file()


def test_baselines_run_with_the_same_flags(camvid_like, tmp_path):
    """The unit-prior VAE and the deterministic network (per-pixel samples) on the same benchmark."""
    for name, flags, sampling in (("unit", ["--prior", "standard"], "latent"),
                                  ("det", ["--stochastic", 0, "--kl_weight", 0], "pixel")):
        out = tmp_path / name
        r = run("train.py", "--train_path", camvid_like / "train", "--val_path", camvid_like / "val", "--epochs", 1,
                "--output_dir", out, "--label_flips", 1, *flags, *TINY_MODEL)
        assert r.returncode == 0, r.stderr
        r = run("test.py", "--test_path", camvid_like / "val", "--model_path", out / "best.pt", "--samples", 4,
                "--sampling", sampling, "--output_dir", tmp_path / f"{name}_pred", "--examples", 0)
        assert r.returncode == 0, r.stderr
        s = json.loads((tmp_path / f"{name}_pred" / "metrics.json").read_text())["samples_scores"]
        assert s["diversity"]["4"] > 0 if name == "det" else s["diversity"]["4"] >= 0


def test_refusals(camvid_like, tmp_path, tiny_data):
    r = run("train.py", "--train_path", tiny_data / "train", "--label_flips", 1, "--output_dir", tmp_path / "a",
            *TINY_MODEL)
    assert_refused(r, "--label_flips", "3 classes")
    r = run("train.py", "--train_path", camvid_like / "train", "--latent_form", "global", "--output_dir",
            tmp_path / "b", *TINY_MODEL)
    assert_refused(r, "--latent_form global", "--prior learned")
    r = run("train.py", "--train_path", camvid_like / "train", "--val_samples", 1, "--output_dir", tmp_path / "c",
            *TINY_MODEL)
    assert_refused(r, "--val_samples 1")
    r = run("train.py", "--train_path", camvid_like / "train", "--prior", "learned", "--stochastic", 0,
            "--output_dir", tmp_path / "d", *TINY_MODEL)
    assert_refused(r, "--prior learned with --stochastic 0", "--prior standard --stochastic 0")
    r = run("train.py", "--train_path", camvid_like / "train", "--select", "ged", "--output_dir", tmp_path / "e",
            *TINY_MODEL)
    assert_refused(r, "--select ged", "--val_samples")


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid not under ../shared/data/camvid")
def test_camvid_labels_fit_the_flips():
    """The real CamVid masks hold labels 0..11 only, so the flips apply (void 11 moves to 255)."""
    table = make_class_table(None, CAMVID / "train")
    check_base_table(table.names, table.ignore_index)
    mask = load_mask(sorted((CAMVID / "trainannot").iterdir())[0], table)
    check_labels(mask[None])


def test_collapse_warning():
    from train import collapse_warning

    cfg = VAEConfig(prior="learned")
    fine = {"epoch": 3, "kl_active": 4, "val_kl_image": 3.1, "val_diversity": 0.2}
    assert collapse_warning(fine, cfg, True) == ""
    quiet = collapse_warning({**fine, "kl_active": 0, "val_kl_image": 0.001}, cfg, True)
    assert quiet.startswith("warning: posterior collapse at epoch 3") and "0.001 nats per image" in quiet
    alike = collapse_warning({**fine, "val_diversity": 0.002}, cfg, True)
    assert "differ by 1 - IoU 0.0020" in alike
    assert collapse_warning({**fine, "kl_active": 0}, cfg, False) == ""  # during the KL warm-up
    assert collapse_warning({**fine, "kl_active": 0}, VAEConfig(stochastic=False), True) == ""


def test_sample_scores_against_several_annotators():
    a = torch.tensor([[0, 0], [1, 1]])
    b = torch.tensor([[0, 1], [1, 1]])
    scores = SampleScores(2, 255, (2,))
    scores.update(torch.stack([b, a]), torch.stack([a, b]))  # (K, H, W): samples are the annotations
    r = scores.compute()
    assert r["ged"][2] == pytest.approx(0, abs=1e-12) and r["e_yy"][2] > 0 and r["matched_iou"][2] == 1


def test_test_py_scores_samples_against_every_annotator(tmp_path):
    """A folder with masks/<annotator>/ subfolders: the distribution scores use both annotators."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, n in (("train", 8), ("val", 2)):
        for sub in ("images", "masks/a", "masks/b"):
            (root / split / sub).mkdir(parents=True)
        for i in range(n):
            mask = np.zeros((32, 48), np.uint8)
            mask[16:] = 1
            y, x = rng.integers(2, 20), rng.integers(2, 34)
            mask[y:y + 10, x:x + 12] = 2
            other = mask.copy()
            other[y:y + 10, x:x + 12] = 1 if y >= 16 else 0  # the second annotator saw no box
            image = (np.array([(60, 90, 220), (70, 180, 60), (220, 40, 40)])[mask]
                     + rng.normal(0, 8, (32, 48, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"{i:03d}.png")
            Image.fromarray(mask, mode="L").save(root / split / "masks" / "a" / f"{i:03d}.png")
            Image.fromarray(other, mode="L").save(root / split / "masks" / "b" / f"{i:03d}.png")
    (root / "classes.csv").write_text(CLASSES_CSV)
    out = tmp_path / "run"
    r = run("train.py", "--train_path", root / "train", "--val_path", root / "val", "--epochs", 1, "--output_dir",
            out, "--prior", "learned", *TINY_MODEL)
    assert r.returncode == 0, r.stderr
    pred = tmp_path / "pred"
    r = run("test.py", "--test_path", root / "val", "--model_path", out / "best.pt", "--samples", 4,
            "--output_dir", pred, "--examples", 0)
    assert r.returncode == 0, r.stderr
    assert "the sample distribution's against all" in r.stdout
    s = json.loads((pred / "metrics.json").read_text())["samples_scores"]
    assert s["images"] == 2 and s["e_yy"]["4"] > 0  # two different annotations per image
