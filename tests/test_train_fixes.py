"""train.py's contracts that a careless change breaks quietly: best.pt without validation, one
random stream per torchrun rank, resume refusing what would bend the schedule, the time budget,
and the outputs a run keeps or leaves behind."""

import json
import math
import types

import pytest
import torch
from conftest import TINY_MODEL, assert_refused, metrics_rows, run

import train
from checkpoint import build_model, load_checkpoint
from dataset import DataError
from runtime import pick_precision, precision_name

RUN = [*TINY_MODEL, "--precision", "fp32"]


def argv(data, out, *extra, val=True):
    return ["--train_path", str(data / "train"), *(["--val_path", str(data / "val")] if val else []), *RUN,
            "--output_dir", str(out), *map(str, extra)]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_best_pt_without_validation_even_when_the_loss_stays_above_one(tiny_data, tmp_path):
    out = tmp_path / "run"
    state = train.main(train.get_args(argv(tiny_data, out, "--epochs", 1, "--kl_weight", 50, val=False)))
    assert state["history"][0]["train_loss"] > 1  # the case that used to write no best.pt
    assert load_checkpoint(out / "best.pt")["epoch"] == 1


def test_each_rank_draws_its_own_augmentation_and_latent_noise():
    assert len({train.augment_seed(0, 5, r) for r in range(4)}) == 4
    assert len({train.augment_seed(0, s, 0) for s in range(1000)}) == 1000
    assert train.rank_seed(7, 0) == 7 and len({train.rank_seed(7, r) for r in range(4)}) == 4
    draws = []
    for rank in (0, 1):
        torch.manual_seed(train.rank_seed(0, rank))
        draws.append(torch.randn(8))
    assert not torch.equal(*draws)


def test_restored_loss_sums_are_counted_once(tiny_data, tmp_path):
    """last.pt holds the sums of all ranks: after a resume rank 0 carries them, the others start at 0."""
    out = tmp_path / "run"
    train.main(train.get_args(argv(tiny_data, out, "--epochs", 1)))
    ckpt = load_checkpoint(out / "last.pt")
    ckpt["partial"] = {"loss": 6.0, "kl": 1.0, "images": 4.0}
    model = build_model(ckpt)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    sums = []
    for rank in (0, 1):
        state = {}
        train.restore(ckpt, model, opt, sched, scaler, state, torch.device("cpu"), rank)
        sums.append(float(state["partial"]["loss"]))
    assert sums == [6.0, 0.0]


@pytest.mark.parametrize("flag, value", [("--epochs", 3), ("--batch_size", 2), ("--lr", 0.5),
                                         ("--image_size", "48 64")])
def test_resume_refuses_changed_flags(tiny_data, tmp_path, flag, value):
    out = tmp_path / "run"
    train.main(train.get_args(argv(tiny_data, out, "--epochs", 2)))
    before = (out / "config.json").read_text()
    extra = [flag, *str(value).split()]
    if flag == "--epochs":
        extra = ["--epochs", 3]
        args = argv(tiny_data, out, "--resume", "auto", *extra)
    else:
        args = argv(tiny_data, out, "--epochs", 2, "--resume", "auto", *extra)
    if flag == "--image_size":  # the last --image_size on the line wins
        args = args + ["--image_size", "48", "64"]
    with pytest.raises(DataError, match=f"{flag} .* \\(now"):
        train.main(train.get_args(args))
    assert (out / "config.json").read_text() == before


def test_resume_refuses_another_number_of_processes(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = train.get_args(argv(tiny_data, out, "--epochs", 1))
    train.main(args)
    config = load_checkpoint(out / "last.pt")
    from model import VAEConfig

    with pytest.raises(DataError, match="1 process.*this run has 2.*without torchrun"):
        train.load_resume(out / "last.pt", VAEConfig.from_dict(config["model_config"]), args, 2, "cpu")


def test_resuming_a_finished_run_says_so_and_changes_nothing(tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(train.get_args(argv(tiny_data, out, "--epochs", 1)))
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = run("train.py", *argv(tiny_data, out, "--epochs", 1, "--resume", "auto"))
    assert r.returncode == 0, r.stderr
    assert "already finished" in r.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files


def test_ignore_index_outside_uint8_is_refused(tiny_data, tmp_path):
    r = run("train.py", *argv(tiny_data, tmp_path / "run", "--ignore_index", 300))
    assert_refused(r, "--ignore_index 300")
    assert not (tmp_path / "run").exists()


def test_failed_run_leaves_no_empty_folder(tmp_path):
    out = tmp_path / "run"
    r = run("train.py", "--train_path", tmp_path / "nowhere", "--output_dir", out)
    assert_refused(r, "nowhere")
    assert not out.exists()


def test_keep_epochs_keeps_the_most_recent(tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(train.get_args(argv(tiny_data, out, "--epochs", 4, "--keep_epochs", 2)))
    assert sorted(p.name for p in out.glob("epoch_*.pt")) == ["epoch_003.pt", "epoch_004.pt"]
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()


def test_help_never_ends_in_default_none():
    for script in ("train.py", "test.py"):
        r = run(script, "--help")
        assert r.returncode == 0
        assert "(default: None)" not in r.stdout, script


# ---------------------------------------------------------------------------------------------
# --time_budget


def test_epochs_for_budget():
    assert train.epochs_for_budget(600, 0, 60, safety=1.0) == 10
    assert train.epochs_for_budget(600, 60, 60, safety=1.0) == 9  # start-up counts against the budget
    assert train.epochs_for_budget(600, 0, 7000) == 1  # at least one epoch
    assert train.epochs_for_budget(1200, 30, 35) == 32  # 0.97 * 1200 - 30 = 1134 s -> 32 epochs of 35 s


def test_time_budget_plans_the_whole_schedule_and_resume_keeps_it(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    state = train.main(train.get_args(argv(tiny_data, out, "--time_budget", 0.05)))
    plan = state["plan"]
    assert plan["time_budget"] == 0.05 and plan["epochs"] >= 1
    assert plan["total_steps"] == plan["epochs"] * plan["steps_per_epoch"] == state["step"]
    assert state["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    # the same with three epochs planned (a busy machine may fit only one in 3 s), then resumed
    monkeypatch.setattr(train, "epochs_for_budget", lambda *a, **k: 3)
    out = tmp_path / "run3"
    state = train.main(train.get_args(argv(tiny_data, out, "--time_budget", 0.05)))
    plan = state["plan"]
    assert plan["epochs"] == 3
    assert plan["total_steps"] == plan["epochs"] * plan["steps_per_epoch"] == state["step"]
    # the cosine schedule ends at 0 exactly at the planned end
    assert state["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["plan"] == plan and plan["spent_s"] > 0
    # A resume keeps the budget: no new probe even when this machine is now much slower, and the
    # minutes spent before count against it.
    monkeypatch.setattr(train, "budget_plan", lambda *a, **k: pytest.fail("resume measured again"))
    ckpt["epoch"] = ckpt["history"][0]["epoch"]  # pretend it stopped after its first epoch
    ckpt["history"] = ckpt["history"][:1]
    ckpt["plan"] = dict(plan, spent_s=100.0)
    from checkpoint import save_checkpoint

    save_checkpoint(ckpt, out / "last.pt")
    state = train.main(train.get_args(argv(tiny_data, out, "--time_budget", 0.05, "--resume", "auto")))
    assert state["plan"]["time_budget"] == 0.05 and state["plan"]["spent_s"] > 100
    assert state["epoch"] == state["plan"]["epochs"] and state["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert json.loads((out / "config.json").read_text())["time_budget"] == 0.05


def test_epochs_cap_what_the_budget_plans(tiny_data, tmp_path, monkeypatch):
    """--epochs N --time_budget M: the budget's plan, but never more than N epochs, so one command
    runs N epochs on a fast machine and ends in time on a slow one. A resume keeps the cap."""
    out = tmp_path / "run"
    # 5 minutes fit far more, however busy the machine (beside a training run a few probe steps
    # can take minutes): the fit is fixed, so the cap alone decides
    monkeypatch.setattr(train, "epochs_for_budget", lambda *a, **k: 50)
    state = train.main(train.get_args(argv(tiny_data, out, "--time_budget", 5, "--epochs", 2)))
    assert state["plan"]["epochs"] == 2 and state["plan"]["time_budget"] == 5
    assert state["epoch"] == 2 and state["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    r = run("train.py", *argv(tiny_data, out, "--time_budget", 5, "--epochs", 3, "--resume", "auto"))
    assert_refused(r, "--epochs 2 (now 3)")
    # where the cap is above what fits, the budget decides
    monkeypatch.setattr(train, "epochs_for_budget", lambda *a, **k: 1)
    state = train.main(train.get_args(argv(tiny_data, tmp_path / "slow", "--time_budget", 5, "--epochs", 2)))
    assert state["plan"]["epochs"] == 1 and state["epoch"] == 1


@pytest.mark.parametrize("average", [[], ["--ema", 0.9], ["--swa", 0.5]])
def test_budget_measurement_leaves_the_model_untouched(tiny_data, tmp_path, monkeypatch, average):
    """Planning by the clock must not change what is trained: a --time_budget run whose plan
    comes out at N epochs equals an --epochs N run (warm-up share and all), also the average of
    the weights that --ema or --swa keeps (the probe's steps are not averaged)."""
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setattr(train, "replan", lambda plan, *a: plan["epochs"])  # the probe alone
    sa = train.main(train.get_args(argv(tiny_data, a, "--time_budget", 0.05, *average)))
    epochs = sa["plan"]["epochs"]
    monkeypatch.setattr(train, "fixed_plan", _with_budget(train.fixed_plan, 0.05))
    train.main(train.get_args(argv(tiny_data, b, "--epochs", epochs, *average)))
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca.get("swa_steps") == cb.get("swa_steps") and ca.get("swa_steps", 1) > 0  # some steps were averaged
    assert ("train_model" in ca) == ("train_model" in cb) == bool(average)
    for key in ("model", "train_model"):
        for name, t in ca.get(key, {}).items():
            assert torch.equal(t, cb[key][name]), (key, name)


@pytest.mark.parametrize("probe, measured, cap, expected", [(3, 5, None, 5), (5, 3, None, 3), (3, 9, 4, 4),
                                                            (4, 1, None, 3)])
def test_second_epoch_corrects_the_budget_plan(tiny_data, tmp_path, monkeypatch, capsys, probe, measured, cap,
                                               expected):
    """The probe's plan is corrected after the second epoch: longer or shorter, never past
    --epochs nor under three (a budget spent by the second epoch still gets a finished cosine),
    and the run is still one whole schedule that last.pt records. Each later epoch plans again
    (here to the same end, so the plan stands)."""
    calls = []

    def fit(budget_s, spent_s, epoch_s, safety=0.97):
        calls.append((budget_s, spent_s, epoch_s))
        return probe if len(calls) == 1 else measured

    monkeypatch.setattr(train, "epochs_for_budget", fit)
    out = tmp_path / "run"
    state = train.main(train.get_args(argv(tiny_data, out, "--time_budget", 5,
                                           *(["--epochs", cap] if cap else []))))
    plan = state["plan"]
    assert len(calls) == 1 + expected - 2 and calls[1][0] == 300  # the probe, then after epochs 2 .. N-1
    faster = min(r["seconds"] for r in state["history"][:2])
    assert calls[1][2] >= faster > 0  # the faster of the first two epochs, with the first's saves
    assert plan["probe_epochs"] == probe and plan["epochs"] == expected == state["epoch"]
    assert plan["total_steps"] == expected * plan["steps_per_epoch"] == state["step"]
    assert plan["warmup_steps"] == max(1, int(0.03 * probe * plan["steps_per_epoch"]))  # the warm-up is kept
    assert state["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine ends at the new end
    assert load_checkpoint(out / "last.pt")["plan"] == plan
    printed = capsys.readouterr().out
    assert f"-> {expected} epochs (the probe planned {probe})" in printed
    assert printed.count("time budget 5 min:") == 2  # the probe and its correction; nothing moved after


def test_later_epochs_plan_again_and_the_lr_never_jumps(tiny_data, tmp_path, monkeypatch, capsys):
    """Epochs that turn out faster than the first two add epochs to the plan once two more fit:
    the cosine stretches over the new end from where it is, so the LR falls all the way, ends at
    0, and last.pt records the final plan."""
    fits = iter([6, 6, 7, 8, 9, 9, 9])  # the probe, then the fit after epochs 2, 3, ...

    def fit(budget_s, spent_s, epoch_s, safety=0.97):
        return next(fits)

    monkeypatch.setattr(train, "epochs_for_budget", fit)
    out = tmp_path / "run"
    state = train.main(train.get_args(argv(tiny_data, out, "--time_budget", 5, "--warmup", 0)))
    plan = state["plan"]
    # after epoch 3 one epoch more fits (7 against 6): within the margin, the plan stands; after
    # epoch 4, two more (8): it grows; after that one more (9) again leaves it
    assert plan["epochs"] == 8 == state["epoch"] and plan["total_steps"] == state["step"]
    assert plan["anchor"][0] == 4 * plan["steps_per_epoch"]
    lrs = [r["lr"] for r in state["history"]]
    assert all(b < a for a, b in zip(lrs, lrs[1:])), lrs
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert load_checkpoint(out / "last.pt")["plan"] == plan
    assert "after 4 epochs" in capsys.readouterr().out


def test_the_correction_counts_the_slower_epochs_excess_as_spent():
    """Start-up 10 s; the first epoch 6 s and its saves 1 s; the second 2 s: from here an epoch
    costs 3 s, 19 s have passed at the end of the second validation and its 1 s of saves is due,
    so 2 + (0.97 * 300 - 19 - 1) // 3 = 92 epochs fit, where the first epoch's 7 s would plan 40.
    The other way round (2 s, then 6 s: a passing load) plans the same 92."""
    plan = {"time_budget": 5, "epochs": 50, "steps_per_epoch": 4, "total_steps": 200, "warmup_steps": 6}
    ctx = {"world": 1, "is_main": False}
    args = types.SimpleNamespace(epochs=None)
    assert train.replan(plan, 2, [6, 2], 1, 19, args, ctx) == 92
    assert plan["epochs"] == 92 and plan["total_steps"] == ctx["total_steps"] == 368
    assert train.replan(plan, 2, [2, 6], 1, 19, args, ctx) == 92
    args.epochs = 60
    assert train.replan(plan, 2, [6, 2], 1, 19, args, ctx) == 60
    # a budget already spent still gets one more epoch, to finish the cosine
    assert train.replan(dict(plan, time_budget=0.3), 2, [6, 2], 1, 19, args, ctx) == 3


def test_later_corrections_follow_drift_and_keep_the_lr():
    """After the first correction the plan moves only where the epochs drift: past the budget it
    shrinks, with two epochs of slack it grows, within that it stands. An epoch then costs the
    median of the last three, so one slow epoch moves nothing. The LR at the step where the plan
    changes is the one the old plan gave it."""
    args, ctx = types.SimpleNamespace(epochs=None), {"world": 1, "is_main": False}

    def plan(epochs):
        return {"time_budget": 5, "epochs": epochs, "steps_per_epoch": 4, "total_steps": 4 * epochs,
                "warmup_steps": 2}

    # 10 epochs of 19 s done at 195 s, 1 s of saves: (291 - 196) // 20 = 4 more fit
    p = plan(20)  # 10 more of 20 s would end at 396 s, past the 300 s budget: down to 14
    lr = train.lr_at(40, p["total_steps"], p["warmup_steps"])
    assert train.replan(p, 10, [19, 19, 19], 1, 195, args, ctx) == 14
    assert train.lr_at(40, p["total_steps"], p["warmup_steps"], p["anchor"]) == pytest.approx(lr)
    assert train.lr_at(56, p["total_steps"], p["warmup_steps"], p["anchor"]) == pytest.approx(0.0, abs=1e-12)
    assert train.replan(plan(15), 10, [19, 19, 19], 1, 195, args, ctx) == 15  # ends at 296 s: stands
    assert train.replan(plan(13), 10, [19, 19, 19], 1, 195, args, ctx) == 13  # one epoch of slack: stands
    assert train.replan(plan(12), 10, [19, 19, 19], 1, 195, args, ctx) == 14  # two: grows
    assert train.replan(plan(15), 10, [19, 90, 19], 1, 195, args, ctx) == 15  # one slow epoch: stands
    assert train.replan(plan(15), 10, [30, 90, 30], 1, 195, args, ctx) == 13  # slower epochs: shrinks
    assert train.replan(plan(12), 10, [19, 19, 19], 1, 400, args, ctx) == 11  # spent: one more, to end the cosine
    # a re-plan on a re-planned schedule starts from where the LR is, too
    p = plan(20)
    train.replan(p, 10, [19, 19, 19], 1, 195, args, ctx)
    lr = train.lr_at(48, p["total_steps"], p["warmup_steps"], p["anchor"])
    assert train.replan(p, 12, [30, 30, 30], 1, 250, args, ctx) == 13
    assert train.lr_at(48, p["total_steps"], p["warmup_steps"], p["anchor"]) == pytest.approx(lr)


def test_lr_continues_from_an_anchor():
    assert train.lr_at(50, 100, 10, [10, 0.0]) == pytest.approx(train.lr_at(50, 100, 10))
    assert train.lr_at(40, 60, 10, [40, 0.5]) == pytest.approx(0.5)  # half-way down at the anchor
    assert train.lr_at(50, 60, 10, [40, 0.5]) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert train.lr_at(60, 60, 10, [40, 0.5]) == pytest.approx(0.0, abs=1e-12)


def test_a_resumed_run_plans_again_from_its_own_epochs(tiny_data, tmp_path, monkeypatch):
    """A resume keeps its plan until it has timed two whole epochs of its own (its start-up and
    the epochs before ran in another process), then plans again, counting what the earlier
    process spent."""
    out = tmp_path / "run"
    monkeypatch.setattr(train, "epochs_for_budget", lambda *a, **k: 5)
    train.main(train.get_args(argv(tiny_data, out, "--time_budget", 5)))
    ckpt = load_checkpoint(out / "last.pt")
    from checkpoint import save_checkpoint

    calls = []
    replan = train.replan

    def recorded(plan, done, seconds, save_s, elapsed_s, *a):
        calls.append((done, len(seconds), elapsed_s))
        return replan(plan, done, seconds, save_s, elapsed_s, *a)

    monkeypatch.setattr(train, "replan", recorded)
    for stopped_after in (1, 3):
        calls.clear()
        plan = dict(ckpt["plan"], spent_s=120.0)
        save_checkpoint(dict(ckpt, epoch=stopped_after, history=ckpt["history"][:stopped_after], plan=plan),
                        out / "last.pt")
        state = train.main(train.get_args(argv(tiny_data, out, "--time_budget", 5, "--resume", "auto")))
        assert state["epoch"] == 5 and state["plan"]["spent_s"] > 120
        # after 1: epochs 2 and 3 timed here, planned again after 3 and 4; after 3: only 4 and 5, the last
        assert [c[:2] for c in calls] == ([(3, 2), (4, 3)] if stopped_after == 1 else [])
        assert all(c[2] > 120 for c in calls)


def test_the_logs_name_the_precision_as_the_flag_does():
    cpu = torch.device("cpu")
    for name in ("fp32", "bf16"):
        assert precision_name(pick_precision(name, cpu)) == name
    assert precision_name(torch.float16) == "fp16"  # what CUDA without bf16 gets


def _with_budget(fixed_plan, budget):
    def plan(epochs, steps_per_epoch, world, args, time_budget=None):
        return fixed_plan(epochs, steps_per_epoch, world, types.SimpleNamespace(**vars(args)), time_budget=budget)
    return plan


# ---------------------------------------------------------------------------------------------
# augmentation levers


def test_rotation_is_a_rotation_in_pixel_space_and_keeps_masks_aligned():
    """On a non-square image the sampled input points of neighbouring output pixels stay one
    pixel apart and at right angles (a rotation, not a shear), and masks follow the image."""
    import dataset

    rows, cols = torch.meshgrid(torch.arange(60.0), torch.arange(80.0), indexing="ij")
    images = torch.stack([cols, rows, torch.zeros(60, 80)])[None].repeat(8, 1, 1, 1)  # pixel coordinates
    masks = ((rows // 10) * 8 + cols // 10).long()[None].repeat(8, 1, 1)  # 10x10 blocks, one label each
    out, out_masks = dataset.augment(images, masks, torch.Generator().manual_seed(0), 255, scale=(1.0, 1.0),
                                     flip=True, jitter=0, rotate=30.0)
    x, y = out[:, 0, 20:40, 25:55], out[:, 1, 20:40, 25:55]  # inside: no reflection at the borders
    dx = torch.stack([x[:, :, 1:] - x[:, :, :-1], y[:, :, 1:] - y[:, :, :-1]])[..., :-1, :]
    dy = torch.stack([x[:, 1:] - x[:, :-1], y[:, 1:] - y[:, :-1]])[..., :-1]
    assert torch.allclose(dx.norm(dim=0), torch.ones(()), atol=1e-3)
    assert torch.allclose(dy.norm(dim=0), torch.ones(()), atol=1e-3)
    assert (dx * dy).sum(0).abs().max() < 1e-3
    angles = torch.atan2(dx[1, :, 0, 0], dx[0, :, 0, 0]).abs() * 180 / torch.pi
    assert angles.max() > 5  # something rotated
    ok = (out_masks != 255)
    from_image = ((out[:, 1].round() // 10) * 8 + out[:, 0].round() // 10).long()  # nearest pixel
    assert (from_image == out_masks)[ok].float().mean() > 0.99  # only ties at pixel centres may differ


def test_jitter_cutmix_and_input_norm_flags_reach_the_batches_and_the_saved_model(tiny_data, tmp_path,
                                                                                  monkeypatch):
    import dataset

    seen = []
    real = dataset.augment

    def spy(*a, **kw):
        seen.append(kw["jitter"])
        return real(*a, **kw)

    mixed = []
    real_cutmix = dataset.cutmix

    def spy_cutmix(images, masks, generator, prob):
        mixed.append(prob)
        return real_cutmix(images, masks, generator, prob)

    monkeypatch.setattr(dataset, "augment", spy)
    monkeypatch.setattr(dataset, "cutmix", spy_cutmix)
    out = tmp_path / "run"
    train.main(train.get_args(argv(tiny_data, out, "--epochs", 1, "--jitter", 0.45, "--input_norm", 1,
                                   "--cutmix", 0.5)))
    assert seen and set(seen) == {0.45}
    assert len(mixed) == len(seen) and set(mixed) == {0.5}  # every training batch
    model = build_model(load_checkpoint(out / "best.pt"), out / "best.pt")
    assert model.config.input_norm is True


def test_ema_weights_are_what_is_validated_and_saved(tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(train.get_args(argv(tiny_data, out, "--epochs", 2, "--ema", 0.9)))
    last, best = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    assert "train_model" in last and "train_model" not in best
    name = next(k for k in last["model"] if k.endswith("weight"))
    assert not torch.equal(last["model"][name], last["train_model"][name])  # the average, not the weights
    # with decay ramped as min(0.9, (1 + step) / (10 + step)) the average trails the trained weights
    # but stays closer to them than to the initial weights
    torch.manual_seed(0)
    from model import SegVAE, VAEConfig

    init = SegVAE(VAEConfig.from_dict(last["model_config"])).state_dict()[name]
    assert (last["model"][name] - last["train_model"][name]).norm() < (init - last["train_model"][name]).norm()


def test_swa_saves_the_mean_of_the_weights_since_it_began(tiny_data, tmp_path, monkeypatch):
    """4 epochs of 2 steps, LR warm-up 1 step: the cosine's progress at step s is (s - 1) / 7, so
    --swa 0.5 averages the weights after steps 5, 6 and 7 (0-based), the last three."""
    seen, real = [], train.update_swa

    def spy(avg, model, swa):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        real(avg, model, swa)

    monkeypatch.setattr(train, "update_swa", spy)
    out = tmp_path / "run"
    state = train.main(train.get_args(argv(tiny_data, out, "--epochs", 4, "--swa", 0.5)))
    assert state["step"] == 8 and len(seen) == 3
    last = load_checkpoint(out / "last.pt")
    assert last["swa_steps"] == 3
    for name, t in last["model"].items():
        if t.is_floating_point():  # weights and BN running statistics: the mean of the three
            assert torch.allclose(t, sum(s[name] for s in seen) / 3, atol=1e-6), name
        else:
            assert torch.equal(t, seen[-1][name]), name
        assert torch.equal(last["train_model"][name], seen[-1][name]), name
    # before the averaging began, the weights as trained were validated: epoch 2 with --swa is the
    # same epoch as without it
    plain = tmp_path / "plain"
    monkeypatch.setattr(train, "update_swa", real)
    train.main(train.get_args(argv(tiny_data, plain, "--epochs", 4)))
    a, b = metrics_rows(out), metrics_rows(plain)
    assert a[1]["val_miou"] == b[1]["val_miou"] and a[1]["val_loss"] == b[1]["val_loss"]
    assert a[3]["val_loss"] != b[3]["val_loss"]


def test_threads_leave_the_cores_other_processes_keep_busy(monkeypatch):
    """With torch's default threads, a second busy process made epochs 20-50x slower: the default
    (0) now takes the busy cores off, says so, and an explicit --threads is obeyed as given."""
    import runtime

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(runtime, "busy_cores", lambda interval=0.2: 1.1)
        monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1})
        note = runtime.set_threads(0)
        assert torch.get_num_threads() == 1 and "1.1 of 2 cores busy" in note
        torch.set_num_threads(2)
        assert runtime.set_threads(2) == "" and torch.get_num_threads() == 2
        monkeypatch.setattr(runtime, "busy_cores", lambda interval=0.2: 0.1)  # idle: torch's default stays
        assert runtime.set_threads(0) == "" and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_memory_format_follows_the_measured_speed(monkeypatch):
    """channels-last was 1.23x faster on an AVX-512 CPU and 1.14x slower on an AVX2 one (fp32):
    the layout follows the CPU."""
    import runtime

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for isa, fmt in (("AVX512", torch.channels_last), ("AVX2", torch.contiguous_format),
                     ("DEFAULT", torch.contiguous_format)):
        monkeypatch.setattr(runtime.torch.backends.cpu, "get_cpu_capability", lambda isa=isa: isa)
        assert runtime.memory_format(cpu) == fmt and runtime.memory_format(cuda) == torch.channels_last


def test_inputs_follow_the_models_layout():
    """layout_of, the layout evaluate and the Predictor give their inputs, reads the weights': NCHW
    for the model train.py builds on an AVX2 CPU, channels-last for checkpoint.build_model's."""
    from model import SegVAE, VAEConfig
    from runtime import layout_of

    model = SegVAE(VAEConfig(num_classes=4, widths=(8, 16), latent_channels=4))
    assert layout_of(model) == torch.contiguous_format
    assert layout_of(model.to(memory_format=torch.channels_last)) == torch.channels_last
    assert layout_of(model.to(memory_format=torch.contiguous_format)) == torch.contiguous_format


def test_freed_memory_is_kept_for_the_next_step():
    import platform

    from runtime import keep_freed_memory
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory() is True  # every mallopt call accepted its value
