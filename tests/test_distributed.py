"""torchrun --nproc_per_node=2 train.py on the CPU (gloo): both ranks train, rank 0 alone logs
and writes, the validation mIoU it logs is what test.py measures on the saved checkpoint, and a
SIGTERM stops both ranks cleanly with last.pt saved for --resume auto."""

import json
import re
import signal
import subprocess
import sys

import pytest
from conftest import CLASSES_CSV, REPO, TINY_MODEL, epochs_of, free_port, metrics_rows, run, write_split

from checkpoint import load_checkpoint


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            str(REPO / "train.py"), *map(str, args)]


@pytest.fixture
def uneven_data(tmp_path):
    """7 training images (the sampler pads rank 1's share) and 5 validation images (shards of
    3 and 2), so nothing divides evenly between the two ranks."""
    data = tmp_path / "data"
    write_split(data / "train", 7, 0)
    write_split(data / "val", 5, 1)
    (data / "classes.csv").write_text(CLASSES_CSV)
    return data


def train_args(data, out, *extra):
    # fp32: the logged mIoU and test.py's must agree to the last pixel
    return ["--train_path", data / "train", "--val_path", data / "val", *TINY_MODEL, "--batch_size", 2,
            "--precision", "fp32", "--device", "cpu", "--output_dir", out, *extra]


def test_two_ranks_train_and_log_the_checkpoints_miou(uneven_data, tmp_path):
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    r = subprocess.run(torchrun(*train_args(uneven_data, out, "--epochs", 2, "--cache_dir", cache)), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    # The cache of each split was built once, by rank 0, and mapped by rank 1.
    assert r.stdout.count("cached train in") == 1 and r.stdout.count("cached val in") == 1, r.stdout
    assert sorted(p.name.split("-")[1] for p in cache.iterdir() if p.is_dir()) == ["train", "val"]
    # Both ranks trained: 4 images each per epoch (7 padded to 8), 2 steps of 2, 2 epochs.
    for rank in (0, 1):
        assert re.search(rf"^rank {rank} of 2: trained to step 4 on 4 of 7 images per epoch$", r.stdout, re.M), r.stdout
    # Rank 0 alone logged and wrote: each line once, every file whole.
    for line in ("config:", "epoch 1/2", "epoch 2/2", "2 process(es)"):
        assert r.stdout.count(line) == 1, line
    assert "error" not in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "epoch_001.pt", "epoch_002.pt",
                                                     "last.pt", "loss_plot.png", "metrics.csv"]
    for p in out.glob("*.pt"):
        load_checkpoint(p)
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    rows = metrics_rows(out)
    assert epochs_of(rows) == [1, 2]

    # One process on the whole split, from the checkpoint: the same mIoU as the two shards in memory.
    r = run("test.py", "--test_path", uneven_data / "val", "--model_path", out / "epoch_002.pt",
            "--precision", "fp32", "--device", "cpu", "--output_dir", tmp_path / "eval")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert abs(m["miou"] - float(rows[-1]["val_miou"])) < 1e-6  # metrics.csv keeps 6 significant digits
    assert abs(m["pixel_acc"] - float(rows[-1]["val_pixel_acc"])) < 1e-6
    for name, iou in zip(m["classes"], m["iou"]):
        assert abs(iou - float(rows[-1][f"iou_{name}"])) < 1e-6, name


def test_sigterm_stops_both_ranks_and_resume_finishes(uneven_data, tmp_path):
    out = tmp_path / "run"
    # batch 1 at 64x96: 4 steps an epoch per rank, time enough for the signal to land within epoch 1
    cmd = torchrun(*train_args(uneven_data, out, "--epochs", 2, "--batch_size", 1, "--image_size", 64, 96))
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # rank 0's last line before training; both ranks handle signals by then
        if line.startswith("config:"):
            break
    p.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    _, err = p.communicate(timeout=300)
    stops = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(stops) == 1 and "into epoch 1" in stops[0] and str(out / "last.pt") in stops[0], err[-3000:]
    assert "Traceback" not in err.split("stopped by")[0]  # no rank failed (torchrun's own report may follow)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 0 and 1 <= ckpt["batch_in_epoch"] <= 4 and ckpt["world_size"] == 2

    r = subprocess.run([*cmd, "--resume", "auto"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"{ckpt['batch_in_epoch']} batches into epoch 1" in r.stdout
    assert epochs_of(metrics_rows(out)) == [1, 2]
    assert load_checkpoint(out / "last.pt")["step"] == 8


def test_two_ranks_correct_a_time_budget_to_one_plan(uneven_data, tmp_path):
    """--time_budget under torchrun: each rank times its own first two epochs, and the correction
    all ranks follow is rank 0's (a rank on another plan would hang the next all-reduce)."""
    out = tmp_path / "run"
    r = subprocess.run(torchrun(*train_args(uneven_data, out, "--time_budget", 0.5, "--epochs", 4)), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert len(re.findall(r"^time budget 0.5 min: the first two epochs took .* -> 4 epochs", r.stdout, re.M)) == 1, \
        r.stdout
    for rank in (0, 1):  # 4 epochs of 2 steps on each rank
        assert re.search(rf"^rank {rank} of 2: trained to step 8 on 4 of 7 images per epoch$", r.stdout, re.M), r.stdout
    assert epochs_of(metrics_rows(out)) == [1, 2, 3, 4]
    assert load_checkpoint(out / "last.pt")["plan"]["epochs"] == 4
