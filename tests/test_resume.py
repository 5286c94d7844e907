"""Never lose work: a resumed run is the run that was never stopped; SIGTERM/SIGINT stop after
the current step with last.pt saved; SIGKILL at any instant leaves loadable checkpoints and a
consistent metrics.csv; a non-finite loss stops the run and keeps the last good checkpoint."""

import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, TINY_MODEL, epochs_of, metrics_rows

import train
from dataset import DataError
from checkpoint import load_checkpoint

# fp32: bit-exact on the CPU, so a resumed run can be compared with == rather than a tolerance.
RUN = [*TINY_MODEL, "--precision", "fp32"]


def argv(data, out, *extra):
    return ["--train_path", str(data / "train"), "--val_path", str(data / "val"), *RUN, "--output_dir", str(out),
            *map(str, extra)]


def assert_same_run(a, b):
    """Two runs' last.pt (model, optimizer, schedule, counters, RNG) and metrics.csv agree exactly,
    wall-clock seconds aside."""
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    for k in ("epoch", "step", "best_miou", "batch_in_epoch", "nonfinite", "scheduler", "scaler"):
        assert ca[k] == cb[k], k
    assert ca.get("swa_steps") == cb.get("swa_steps")
    for key in ("model", "train_model"):  # train_model: the trained weights beside an --ema average
        assert (key in ca) == (key in cb)
        for name, t in ca.get(key, {}).items():
            assert torch.equal(t, cb[key][name]), (key, name)
    for i, s in ca["optimizer"]["state"].items():
        for k, t in s.items():
            assert torch.equal(t, cb["optimizer"]["state"][i][k]), (i, k)
    assert torch.equal(ca["rng_cpu"], cb["rng_cpu"])
    ra, rb = metrics_rows(a), metrics_rows(b)
    assert epochs_of(ra) == epochs_of(rb)
    for x, y in zip(ra, rb):
        x.pop("seconds"), y.pop("seconds")
        assert x == y


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """train.main(--threads 1) sets torch's thread count for the whole pytest process; put it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("augment", [["--augment", 0], ["--augment", 1], ["--ema", 0.9, "--rotate", 20],
                                     ["--swa", 0.5]])
def test_stop_mid_epoch_and_resume_equals_uninterrupted(tiny_data, tmp_path, monkeypatch, augment):
    """3 epochs straight, versus a run that a real SIGTERM stops after the first step of epoch 2
    (8 images, batch 4: 2 steps an epoch) and that --resume auto then finishes."""
    full, part = tmp_path / "full", tmp_path / "part"
    train.main(train.get_args(argv(tiny_data, full, "--epochs", 3, *augment)))

    kl_weight_at = train.kl_weight_at

    def signal_at_step_2(step, *a):  # called once per step, before the forward pass
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return kl_weight_at(step, *a)

    monkeypatch.setattr(train, "kl_weight_at", signal_at_step_2)
    with pytest.raises(SystemExit) as stop:
        train.main(train.get_args(argv(tiny_data, part, "--epochs", 3, *augment)))
    assert stop.value.code == 143
    monkeypatch.setattr(train, "kl_weight_at", kl_weight_at)
    stopped = load_checkpoint(part / "last.pt")
    assert (stopped["epoch"], stopped["batch_in_epoch"], stopped["step"]) == (1, 1, 3)  # step 3 was finished
    assert epochs_of(metrics_rows(part)) == [1]

    state = train.main(train.get_args(argv(tiny_data, part, "--epochs", 3, *augment, "--resume", "auto")))
    assert state["epoch"] == 3 and state["step"] == 6
    assert_same_run(full, part)


def test_resume_repairs_metrics_and_removes_stale_temporaries(tiny_data, tmp_path):
    """A kill between writing last.pt and metrics.csv leaves the table a row short, and a kill
    inside a save leaves a temporary file: --resume auto puts both right, even with no epoch left."""
    out = tmp_path / "run"
    train.main(train.get_args(argv(tiny_data, out, "--epochs", 2)))
    lines = (out / "metrics.csv").read_text().splitlines(keepends=True)
    (out / "metrics.csv").write_text("".join(lines[:-1]))  # epoch 2's row lost
    (out / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    state = train.main(train.get_args(argv(tiny_data, out, "--epochs", 2, "--resume", "auto")))
    assert state["epoch"] == 2
    assert epochs_of(metrics_rows(out)) == [1, 2]
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------
# signals, through the CLI


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_after_the_step_and_resume_continues_mid_epoch(tiny_data, tmp_path, sig, code):
    out = tmp_path / "run"
    # batch 1 at 64x96: 8 steps, time enough for the signal to land within epoch 1
    cmd = [sys.executable, str(REPO / "train.py"),
           *argv(tiny_data, out, "--epochs", 2, "--batch_size", 1, "--image_size", 64, 96)]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # the config line is the last before training (handlers already in place)
        if line.startswith("config:"):
            break
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    m = re.fullmatch(rf"stopped by {sig.name} (\d+) of 8 steps into epoch 1 \(step (\d+)\); saved (\S+); "
                     rf"continue with --output_dir (\S+) --resume auto", lines[0])
    assert m and m[3] == str(out / "last.pt") and m[4] == str(out), lines[0]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 0 and ckpt["batch_in_epoch"] == ckpt["step"] == int(m[1]) == int(m[2]) >= 1
    assert not (out / "metrics.csv").exists()  # no epoch finished, so no row
    if sig == signal.SIGINT:
        return  # the resume below is the same for both signals
    r = subprocess.run([*cmd, "--resume", out / "last.pt"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{int(m[1])} batches into epoch 1" in r.stdout
    assert epochs_of(metrics_rows(out)) == [1, 2]
    assert load_checkpoint(out / "last.pt")["step"] == 16


# ---------------------------------------------------------------------------------------------
# SIGKILL at random instants


def _train_child(args, log):
    """Runs in a forked child: train.py's main on `args`, its output appended to `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    train.main(train.get_args(args))


def check_after_kill(out):
    """What must hold at any instant: every checkpoint loads (weights_only), and metrics.csv
    holds epochs 1..k once each, k the epoch of last.pt or one less (a kill between the two).
    Returns the epochs done."""
    pts = sorted(out.glob("*.pt"))
    for p in pts:
        load_checkpoint(p)
    done = load_checkpoint(out / "last.pt")["epoch"] if (out / "last.pt").exists() else 0
    rows = epochs_of(metrics_rows(out))
    assert rows == list(range(1, len(rows) + 1)) and len(rows) in (done - 1, done), (rows, done)
    numbered = sorted(int(p.stem[6:]) for p in pts if p.stem.startswith("epoch_"))
    assert numbered[:done] == list(range(1, done + 1)) and len(numbered) <= done + 1, (numbered, done)
    return done


def test_sigkill_at_random_instants_loses_nothing(tiny_data, tmp_path):
    """Train, SIGKILL at 20 random instants, --resume auto after each: the final run equals an
    uninterrupted one. A forkserver that has imported train.py starts each run in a fraction of
    a second (a fresh python spends seconds importing torch, where a kill would test nothing)."""
    mp = multiprocessing.get_context("forkserver")
    # torch._dynamo: AdamW's constructor imports it, seconds on a busy CPU
    mp.set_forkserver_preload(["train", "torch._dynamo", "matplotlib.pyplot", __name__])
    warm_up = mp.Process(target=os.getpid)
    warm_up.start()  # starts the forkserver, so that its imports are not timed below
    warm_up.join()
    epochs = 20

    def start(out, *extra):
        p = mp.Process(target=_train_child, args=(argv(tiny_data, out, "--epochs", epochs, "--keep_epochs", -1,
                                                        *extra),
                                                  str(tmp_path / f"{out.name}.log")))
        p.start()
        return p

    ref, out = tmp_path / "reference", tmp_path / "killed"
    t0 = time.time()
    p = start(ref)
    p.join(120)
    assert p.exitcode == 0, (tmp_path / "reference.log").read_text()
    # The time scale of the kills, from the reference run's files: start-up to the first epoch's
    # checkpoint, and the time between two epochs' checkpoints.
    first = (ref / "epoch_001.pt").stat().st_mtime - t0
    period = ((ref / f"epoch_{epochs:03d}.pt").stat().st_mtime - (ref / "epoch_001.pt").stat().st_mtime) / (epochs - 1)

    rng = random.Random(0)
    done = 0
    for kill in range(20):
        p = start(out, "--resume", "auto")
        # An instant from start-up to the end of the next epoch: some kills come before any
        # progress, some while an epoch is saved. Near the end only start-up and restore, so
        # that the run never finishes between kills however fast this machine is right now.
        p.join(rng.uniform(0, first + period if done < epochs - 5 else first / 3))
        assert p.exitcode is None, f"kill {kill}: the run ended by itself: " + (tmp_path / "killed.log").read_text()
        p.kill()  # SIGKILL
        p.join()
        done = check_after_kill(out)

    p = start(out, "--resume", "auto")
    p.join(120)
    assert p.exitcode == 0, (tmp_path / "killed.log").read_text()[-2000:]
    check_after_kill(out)
    assert epochs_of(metrics_rows(out)) == list(range(1, epochs + 1))
    assert_same_run(ref, out)
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------
# non-finite loss


@pytest.mark.parametrize("nan_steps, skip, stops_at", [
    ({3}, 0, 3),  # stop at step 3, the first of epoch 2; epoch 1's checkpoint is the last good one
    ({3}, 1, None),  # one bad step allowed: skipped, the run finishes
    ({2, 3}, 1, 3),  # the second bad step is one too many
])
def test_nonfinite_loss(tiny_data, tmp_path, monkeypatch, nan_steps, skip, stops_at):
    calls = []
    segmentation_loss = train.segmentation_loss

    def loss_with_nan(*a, **k):  # train.py's loss, NaN at the given (1-based) training steps
        calls.append(1)
        value = segmentation_loss(*a, **k)
        return value * float("nan") if len(calls) in nan_steps else value

    monkeypatch.setattr(train, "segmentation_loss", loss_with_nan)
    out = tmp_path / "run"
    args = train.get_args(argv(tiny_data, out, "--epochs", 2, "--skip_nonfinite", skip))
    if stops_at is None:
        state = train.main(args)
        assert state["nonfinite"] == 1 and state["step"] == 4
        assert epochs_of(metrics_rows(out)) == [1, 2]
    else:
        with pytest.raises(DataError) as e:
            train.main(args)
        assert f"loss nan at epoch 2 step {stops_at}" in str(e.value)
        assert f"last good checkpoint {out / 'last.pt'} (end of epoch 1) is kept" in str(e.value)
        assert "--skip_nonfinite" in str(e.value)
        assert epochs_of(metrics_rows(out)) == [1]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == (2 if stops_at is None else 1)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


@pytest.mark.parametrize("grad_clip", [0, 5])
def test_nonfinite_loss_with_fp16_grad_scaler(tiny_data, tmp_path, monkeypatch, grad_clip):
    """The fp16 path (GradScaler, as on CUDA) skips a bad step and carries on: CPU autocast in
    fp16 stands in for the GPU, which train.py itself refuses to run in fp16."""
    calls = []
    segmentation_loss = train.segmentation_loss

    def loss_with_nan(*a, **k):
        calls.append(1)
        value = segmentation_loss(*a, **k)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(train, "segmentation_loss", loss_with_nan)
    monkeypatch.setattr(train, "pick_precision", lambda name, device: torch.float16)
    out = tmp_path / "run"
    args = train.get_args(argv(tiny_data, out, "--epochs", 2, "--skip_nonfinite", 1, "--grad_clip", grad_clip))
    state = train.main(args)
    assert state["nonfinite"] == 1 and state["step"] == 4 and epochs_of(metrics_rows(out)) == [1, 2]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["scaler"]["scale"] < 2.0**16  # the bad step lowered the scale from GradScaler's start
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
