"""Throughput, FLOP utilisation, memory and inference latency of the CamVid recipe on this machine.

    python benchmark.py                                   # the recipe: default model, 288x384, batch 8
    python benchmark.py --steps 3 --warmup 1 --train_images 32 --cli_runs 1   # a quick check
    python benchmark.py --model_path runs/x/best.pt --json benchmark.json --profile 15
    python benchmark.py --levers      # also: each speed lever off in turn, and torch.compile

The peak it compares against is measured in the same run: one 3x3 conv (--peak_conv) forward +
backward, channels-last, in fp32 and in the training dtype. Training is timed in a child process
(its peak resident memory is training's alone) that decodes CamVid train to train.py's uint8
cache and then alternates two kinds of step on one model: a fixed normalized batch (no data
path) and train.train_one_epoch on the next batch of the cache (index, normalize, augment,
exactly as train.py). Alternating makes the loader overhead, their ratio, immune to the
machine's slow and fast spells. The cache is memory-mapped from a temporary folder, as train.py
maps it from --cache_dir. Inference runs test.py's model on one 360x480 CamVid val image, in-process and as
`python test.py` from launch to PNG written. Run it on an otherwise idle machine.
"""

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from torch.utils.flop_counter import FlopCounterMode

import dataset
import train
from checkpoint import build_model, load_checkpoint, save_checkpoint
from evaluate import segment_image
from model import SegVAE, count_parameters
from runtime import autocast, keep_freed_memory, memory_format, pick_device, pick_precision, precision_name

REPO = Path(__file__).resolve().parent


def get_args(argv=None):
    base = train.get_args([])  # train.py's defaults, so the benchmark runs the recipe's model
    p = argparse.ArgumentParser(description="Benchmark training and inference of the segmentation VAE.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--camvid", default="../shared/data/camvid", help="data folder with train/ and val/ splits")
    p.add_argument("--image_size", type=int, nargs=2, default=[288, 384], metavar=("H", "W"),
                   help="training size (the CamVid recipe's)")
    p.add_argument("--batch_size", type=int, default=base.batch_size, help="images per training step")
    p.add_argument("--widths", type=int, nargs="+", default=base.widths, help="channels of each down block")
    p.add_argument("--latent_channels", type=int, default=base.latent_channels, help="channels of the latent")
    p.add_argument("--steps", type=int, default=20, help="timed steps (or runs) per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    p.add_argument("--train_images", type=int, default=0,
                   help="decode only this many CamVid train images (0: all, as train.py; sets the cache size)")
    p.add_argument("--peak_conv", type=int, nargs=3, default=[128, 60, 80], metavar=("C", "H", "W"),
                   help="the reference layer: C->C 3x3 conv on (batch_size, C, H, W)")
    p.add_argument("--model_path", help="checkpoint for the inference figures; none: a fresh untrained "
                   "one, saved in train.py's format at --image_size")
    p.add_argument("--test_image", help="image for the inference figures; none: the first CamVid val image")
    p.add_argument("--cli_runs", type=int, default=3, help="launches of test.py to time (median)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default=base.precision, choices=["auto", "fp32", "bf16", "fp16"],
                   help="training and inference autocast dtype, as in train.py / test.py")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--profile", type=int, default=0,
                   help="print the top N ops of two profiled training steps (data path)")
    p.add_argument("--levers", action="store_true",
                   help="also time the fixed-batch step with each speed lever off in turn (NCHW, fp32, 1 thread)")
    p.add_argument("--compile", type=int, choices=[0, 1], default=1,
                   help="with --levers, also time torch.compile (needs a C++ compiler; compiling takes a minute)")
    p.add_argument("--lever_steps", type=int, default=10, help="timed steps per --levers variant")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--memory_pairs", type=int, nargs="+", metavar="N",
                   help="instead of the rest: one training epoch of train.py on N CamVid pairs (a list file "
                   "repeating train), for each N: peak private memory of the process tree and epoch time")
    p.add_argument("--memory_seconds", type=float, default=0,
                   help="with --memory_pairs: stop each epoch after this many seconds of training and project "
                   "the epoch time from the steps done (0: whole epochs)")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.levers and args.compile and shutil.which(os.environ.get("CXX", "c++")) is None:
        raise dataset.DataError("--levers times torch.compile, which needs a C++ compiler and none was found "
                                "on PATH; install one (g++) or add --compile 0")
    if min(args.steps, args.batch_size, args.cli_runs) < 1 or args.warmup < 0:
        raise dataset.DataError("--steps, --batch_size and --cli_runs must be at least 1, --warmup at least 0")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as train.py
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device, pick_precision(args.precision, device)


def train_args(args):
    """train.py's arguments for the benchmarked recipe; every flag not named here is train.py's default."""
    return train.get_args(["--train_path", str(Path(args.camvid) / "train"), "--batch_size", str(args.batch_size),
                           "--image_size", *map(str, args.image_size), "--widths", *map(str, args.widths),
                           "--latent_channels", str(args.latent_channels), "--precision", args.precision,
                           "--device", args.device, "--threads", str(args.threads)])


def new_model(targs, table, device, channels_last=None):
    """The recipe's model in train.py's memory format, or channels-last (True) or NCHW (False)."""
    config = train.vae_config(targs, table.num_classes)
    return SegVAE(config).to(device, memory_format=layout(device, channels_last))


def layout(device, channels_last):
    if channels_last is None:
        return memory_format(device)
    return torch.channels_last if channels_last else torch.contiguous_format


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, n, warmup, device):
    """Seconds per call of fn() for n calls after `warmup` untimed ones, synchronized each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def peak_rss_mib():
    """This process's peak resident memory. On Linux VmHWM, because ru_maxrss survives exec: a child
    started by a parent that once held 800 MiB reports ru_maxrss >= 800 MiB whatever it does itself."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


# ---------------------------------------------------------------------------------------------
# measurements


def conv_peak(args, device, dtype):
    """GFLOP/s of one C->C 3x3 conv, forward + backward (input and weight gradients), channels-last."""
    c, h, w = args.peak_conv
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(device, memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, c, h, w, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()

    def step():
        with autocast(device, dtype):
            y = conv(x)
        y.backward(torch.ones_like(y))
        conv.weight.grad = x.grad = None

    with FlopCounterMode(display=False) as fc:
        step()
    return fc.get_total_flops() / median(time_calls(step, args.steps, args.warmup, device)) / 1e9


def count_flops(model, size, device):
    """FLOPs per image of the training forward and of its backward (FlopCounterMode counts convs
    and matmuls; batch norm, activations and resampling are not counted)."""
    model.train()
    x = torch.randn(1, 3, *size, device=device).contiguous(memory_format=memory_format(device))
    with FlopCounterMode(display=False) as fwd:
        logits, mu, logvar = model(x)
    with FlopCounterMode(display=False) as bwd:
        (logits.float().mean() + mu.float().mean() + logvar.float().mean()).backward()
    model.zero_grad(set_to_none=True)
    return fwd.get_total_flops(), bwd.get_total_flops()


def training_setup(targs, table, class_weights, n_train, device, dtype, channels_last=None):
    """Model, optimizer, schedule, ctx and state as train._main builds them (one process)."""
    torch.manual_seed(targs.seed)
    model = new_model(targs, table, device, channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=targs.lr, weight_decay=targs.weight_decay)
    plan = train.fixed_plan(targs.epochs or train.DEFAULT_EPOCHS, math.ceil(n_train / targs.batch_size), 1, targs)
    total = plan["total_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: train.lr_at(s, total, plan["warmup_steps"]))
    ctx = {"device": device, "dtype": dtype, "table": table, "optimizer": optimizer, "scheduler": scheduler,
           "rank": 0, "world": 1, "is_main": False,  # no tqdm bar
           "scaler": torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
           "size": tuple(targs.image_size), "total_steps": total, "stop": {"signal": None},
           "class_weights": class_weights.to(device)}
    state = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "nonfinite": 0, "partial": train.new_partial(device)}
    return model, ctx, state


def fixed_batch_step(targs, model, ctx, state, images, masks, channels_last=None):
    """train.train_step on a normalized batch made once and reused: the training step itself,
    without the data path (indexing the cache, normalizing, augmenting)."""
    x = dataset.normalize(images.to(ctx["device"])).contiguous(memory_format=layout(ctx["device"], channels_last))
    target = masks.to(ctx["device"]).long()

    def step():
        model.train()
        train.train_step(model, x, target, state, targs, ctx)

    return step


def data_path_step(targs, model, ctx, state, split):
    """One step of train.train_one_epoch itself (index the uint8 cache, normalize, augment,
    channels-last, step), on the next whole batch of `split` in turn."""
    b, batches = targs.batch_size, len(split) // targs.batch_size
    turn = {"i": 0}

    def step():
        lo = turn["i"] % batches * b
        turn["i"] += 1
        one = dataset.Split(split.images[lo:lo + b], split.masks[lo:lo + b], [], split.names[lo:lo + b])
        state["batch_in_epoch"] = 0
        train.train_one_epoch(model, one, state, targs, ctx)
        state["epoch"] += 1  # a new shuffle of the batch each call, as a new epoch would

    return step


def interleaved_times(args, steps, device):
    """Seconds per call of each function in `steps`, called in turn (a, b, a, b, ...) so that
    the machine's slow and fast spells fall on all of them alike."""
    times = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def lever_times(args, targs, table, images, masks, class_weights, device, dtype):
    """Median fixed-batch step time of the recipe's model with each speed lever switched off in
    turn (memory format, autocast dtype, threads) and with torch.compile, steps interleaved."""
    cl = memory_format(device) == torch.channels_last  # train.py's layout on this device
    variants = []
    for dt in [None] + ([dtype] if dtype is not None else []):  # fp32, and the training dtype
        for fmt in (False, True):
            label = f"{'channels-last' if fmt else 'NCHW'}, {precision_name(dt)}"
            variants.append((label + (" (the default)" if (fmt, dt) == (cl, dtype) else ""), fmt, dt, 0, False))
    name = f"{'channels-last' if cl else 'NCHW'}, {precision_name(dtype)}"
    if args.compile:
        variants.append((name + ", torch.compile", cl, dtype, 0, True))
    if device.type == "cpu" and torch.get_num_threads() > 1:
        variants.append((name + ", 1 thread", cl, dtype, 1, False))
    steps = {}
    for label, channels_last, dt, threads, compiled in variants:
        model, ctx, state = training_setup(targs, table, class_weights, len(images), device, dt, channels_last)
        if compiled:
            model = torch.compile(model)
        step = fixed_batch_step(targs, model, ctx, state, images, masks, channels_last)
        steps[label] = with_threads(step, threads) if threads else step
    t0 = time.perf_counter()
    times = interleaved_times(argparse.Namespace(warmup=max(1, args.warmup), steps=args.lever_steps), steps, device)
    return {label: median(t) for label, t in times.items()}, time.perf_counter() - t0


def with_threads(fn, n):
    def call():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            fn()
        finally:
            torch.set_num_threads(before)
    return call


def print_profile(args, targs, model, ctx, state, split):
    """The top --profile ops of two more train_one_epoch steps, by self time, on stderr."""
    cuda = ctx["device"].type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    b = args.batch_size
    with torch.profiler.profile(activities=activities) as prof:
        two = dataset.Split(split.images[:2 * b], split.masks[:2 * b], [], split.names[:2 * b])
        train.train_one_epoch(model, two, state, targs, ctx)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.profile), file=sys.stderr)


def measure_training(args):
    """Run in a child process: decode the CamVid train split to train.py's uint8 cache, then time
    training steps on one fixed batch (no data path) and through train.train_one_epoch (the
    data path), interleaved. Median seconds per step of each and the process's peak RSS."""
    device, dtype = setup(args)
    targs = train_args(args)
    table = dataset.make_class_table(None, targs.train_path)
    size, b = tuple(args.image_size), args.batch_size
    pairs = dataset.find_pairs(targs.train_path)
    if len(pairs) < b or len(pairs) < args.train_images:
        raise dataset.DataError(f"{targs.train_path} has {len(pairs)} images, fewer than --batch_size {b} "
                                f"or --train_images {args.train_images}")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = targs.train_path
        if args.train_images:  # a SegNet-style list file of the first N pairs
            src = Path(tmp) / "train.txt"
            src.write_text("".join(f"{i.resolve()} {m.resolve()}\n" for i, m in pairs[:args.train_images]))
        threads = args.threads or torch.get_num_threads()
        t0 = time.perf_counter()
        split = dataset.load_split(src, table, size, threads, cache_dir=Path(tmp) / "cache")  # built
        out["decode_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        split = dataset.load_split(src, table, size, threads, cache_dir=Path(tmp) / "cache")  # mapped, as a rerun
        out["map_s"] = time.perf_counter() - t0
        out["cache_mib"] = dataset.split_bytes(split.cache) / 2**20
    # The folder is gone now; its memory maps stay valid until the split is dropped (POSIX).
    # as train.py: the weights from the cache's class counts, not a second scan of every mask
    class_weights = train.median_frequency_weights_of(split.stats["pixels"], split.stats["image_pixels"])
    model, ctx, state = training_setup(targs, table, class_weights, len(pairs), device, dtype)
    split = train.cache_on_device(split, device)  # as train.py, after the class weights
    out["rss_before_mib"] = peak_rss_mib()
    steps = {"fixed": fixed_batch_step(targs, model, ctx, state, split.images[:b], split.masks[:b]),
             "data": data_path_step(targs, model, ctx, state, split)}
    for name, times in interleaved_times(args, steps, device).items():
        out[name] = {"step_s": median(times), "step_times_s": times}
    out["peak_rss_mib"] = peak_rss_mib()
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if args.levers:  # after the memory reading: these are extra models
        out["levers"], out["levers_s"] = lever_times(args, targs, table, split.images[:b], split.masks[:b],
                                                     class_weights, device, dtype)
    if args.profile:  # after the memory reading: the profiler holds its own buffers
        print_profile(args, targs, model, ctx, state, split)
    return out


def run_worker(args):
    """measure_training in a fresh process, so its peak RSS is that training run's and not inflated
    by the benchmark's other parts (conv peak, FLOP count, inference)."""
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args.argv, "--_worker"],
                       stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark worker failed with exit code {r.returncode} (its error is above)")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure_inference(args, table, device, dtype, tmp):
    """test.py's forward at the checkpoint's size on one image, in-process and as a whole process."""
    targs = train_args(args)
    ckpt_path = args.model_path
    if ckpt_path is None:  # an untrained model, saved exactly as train.py saves epoch_NNN.pt
        ckpt_path = Path(tmp) / "fresh.pt"
        torch.manual_seed(targs.seed)
        state = {"epoch": 0, "step": 0, "best_miou": None, "history": [], "plan": None}
        ckpt = train.checkpoint_dict(new_model(targs, table, torch.device("cpu")), state, targs,
                                     {"table": table, "size": tuple(args.image_size)}, full=False)
        save_checkpoint(ckpt, ckpt_path)
    image_path = Path(args.test_image or dataset.find_pairs(Path(args.camvid) / "val")[0][0])
    ckpt = load_checkpoint(ckpt_path, device)
    model = build_model(ckpt, ckpt_path, device)
    size = tuple(ckpt["image_size"])
    image = dataset.load_image(image_path)
    x = dataset.normalize(dataset.resize_image(image, size)[None].to(device))
    x = x.contiguous(memory_format=torch.channels_last)  # (1, 3, h, w), as evaluate.Predictor

    def forward():
        with torch.no_grad(), autocast(device, dtype):
            model.sample(x, 1)

    out = {"image": str(image_path), "image_hw": list(image.shape[-2:]), "model_hw": list(size),
           "forward_ms": 1e3 * median(time_calls(forward, args.steps, args.warmup, device)),
           "segment_ms": 1e3 * median(time_calls(lambda: segment_image(model, image, size, device, dtype),
                                                 args.steps, args.warmup, device))}
    cmd = [sys.executable, "test.py", "--test_image_path", str(image_path.resolve()), "--model_path",
           str(Path(ckpt_path).resolve()), "--output_dir", str(Path(tmp) / "pred"), "--device", args.device,
           "--precision", args.precision]
    env = dict(os.environ)
    if args.threads:  # test.py has no --threads; torch reads this at start-up
        env["OMP_NUM_THREADS"] = str(args.threads)
    walls = []
    for _ in range(args.cli_runs):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        if r.returncode != 0 or not (Path(tmp) / "pred" / f"{image_path.stem}_mask.png").is_file():
            raise RuntimeError(f"{' '.join(cmd)} failed (exit code {r.returncode}): {r.stderr[-2000:]}")
    out["cli_s"] = median(walls)
    return out


# ---------------------------------------------------------------------------------------------
# report


def report(args, res):
    dt, b, (h, w), (c, ph, pw) = res["dtype"], args.batch_size, args.image_size, args.peak_conv
    fwd = res["fwd_flops"]
    rows = [(f"conv peak fp32 ({c}->{c} 3x3, {ph}x{pw}, batch {b})", res["peak_fp32"], "GFLOP/s",
             "one conv layer fwd+bwd, channels-last, median step"),
            (f"conv peak {dt}", res["peak_train"], "GFLOP/s", "the same layer in the training dtype: MFU's 100%"),
            ("parameters", res["params"] / 1e6, "M", f"widths {args.widths}, latent {args.latent_channels}"),
            (f"forward FLOPs per image at {h}x{w}", fwd / 1e9, "GFLOP", "FlopCounterMode, training mode"),
            ("counted fwd+bwd / forward", (fwd + res["bwd_flops"]) / fwd, "x", "MFU below assumes 3x")]
    t = res["training"]
    for key, name in (("fixed", "fixed batch"), ("data", "CamVid data path")):
        ips = b / t[key]["step_s"]
        rows += [(f"train step, {name}", 1e3 * t[key]["step_s"], "ms", f"median of {args.steps}, batch {b}, {dt}"),
                 (f"train throughput, {name}", ips, "images/s", "batch / median step time"),
                 (f"achieved, {name}", 3 * fwd * ips / 1e9, "GFLOP/s", "3 x forward FLOPs x images/s"),
                 (f"MFU, {name}", 100 * 3 * fwd * ips / 1e9 / res["peak_train"], "%", f"of the {dt} conv peak")]
    rows += [("loader overhead", t["data"]["step_s"] / t["fixed"]["step_s"], "x",
              "data-path / fixed-batch step time, steps interleaved"),
             ("peak RSS of training", t["peak_rss_mib"], "MiB", "the training child: uint8 cache, model, steps"),
             ("  of which before the first step", t["rss_before_mib"], "MiB", "imports, model, data")]
    if "peak_gpu_mib" in t:
        rows.append(("peak GPU memory of training", t["peak_gpu_mib"], "MiB", "max_memory_allocated"))
    rows += [("CamVid decode to the uint8 cache", t["decode_s"], "s", "first run: decode, resize, write the cache"),
             ("CamVid cache mapped again", t["map_s"], "s", "later runs, resumes, torchrun processes"),
             ("uint8 cache size", t["cache_mib"], "MiB", "images + masks + full-size label masks, on disk")]
    i = res["inference"]
    rows += [(f"inference forward at {i['model_hw'][0]}x{i['model_hw'][1]}", i["forward_ms"], "ms",
              f"median, batch 1, {res['dtype']}, no_grad"),
             (f"segment one {i['image_hw'][0]}x{i['image_hw'][1]} image", i["segment_ms"], "ms",
              "resize + forward + softmax + upsample (evaluate.segment_image)"),
             ("python test.py, launch to PNG", i["cli_s"], "s", f"median of {args.cli_runs} process wall times")]
    print(f"\n{'measurement':<52}{'value':>10}  {'unit':<9}meaning")
    for name, value, unit, meaning in rows:
        print(f"{name:<52}{value:>10.{1 if abs(value) >= 10 else 3}f}  {unit:<9}{meaning}")
    if "levers" in t:
        base = next(sec for name, sec in t["levers"].items() if name.startswith("NCHW, fp32"))
        print(f"\nlevers: fixed-batch step, median of {args.lever_steps} interleaved steps "
              f"({t['levers_s']:.0f} s incl. compiling)\n{'variant':<52}{'ms/step':>10}  speed-up over NCHW fp32")
        for name, sec in t["levers"].items():
            print(f"{name:<52}{1e3 * sec:>10.1f}  {base / sec:.2f}x")


def cpu_name():
    if Path("/proc/cpuinfo").is_file():
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def private_mib(pid):
    """Private memory of a process and all its descendants: resident anonymous pages (RssAnon),
    what the kernel cannot drop or share. Memory-mapped cache pages are file-backed: not counted."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total / 2**10


def memory_run(args, n, pairs, tmp, run=0):
    """train.py for one epoch on `n` pairs (train repeated), sampling the private memory of its
    process tree every 0.2 s. Returns peak MiB, data-preparation and training seconds, steps."""
    lst = Path(tmp) / f"train{n}.txt"  # the same n twice: the same list, so the second run maps the cache
    lst.write_text("".join(f"{pairs[i % len(pairs)][0].resolve()} {pairs[i % len(pairs)][1].resolve()}\n"
                           for i in range(n)))
    table = dataset.find_class_table(Path(args.camvid) / "train")
    (Path(tmp) / table.name).write_bytes(table.read_bytes())
    cmd = [sys.executable, str(REPO / "train.py"), "--train_path", str(lst), "--epochs", "1",
           "--image_size", *map(str, args.image_size), "--batch_size", str(args.batch_size),
           "--cache_dir", str(Path(tmp) / "cache"), "--output_dir", str(Path(tmp) / f"run{run}-{n}"),
           "--keep_epochs", "0", "--precision", args.precision, "--threads", str(args.threads or 2),
           "--widths", *map(str, args.widths), "--latent_channels", str(args.latent_channels)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    os.set_blocking(proc.stdout.fileno(), False)
    peak, started, log, stopped = 0.0, None, "", False
    while proc.poll() is None:
        peak = max(peak, private_mib(proc.pid))
        log += (proc.stdout.read() or b"").decode(errors="replace")
        if started is None and "config: " in log:
            started = time.perf_counter()
        if args.memory_seconds and started and not stopped and time.perf_counter() - started > args.memory_seconds:
            proc.send_signal(2)  # SIGINT: train.py stops after the step and saves
            stopped = True
        time.sleep(0.2)
    end = time.perf_counter()
    log += (proc.stdout.read() or b"").decode(errors="replace")
    if proc.returncode not in (0, 130) or started is None:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{log[-2000:]}")
    steps_total = math.ceil(n / args.batch_size)
    steps_done = steps_total
    if stopped:
        m = re.search(r"stopped by SIGINT (\d+) of (\d+) steps", log)
        steps_done = int(m.group(1)) if m else steps_total
    return {"pairs": n, "peak_private_mib": peak, "prepare_s": started - t0, "train_s": end - started,
            "steps_done": steps_done, "steps_epoch": steps_total,
            "epoch_s": (end - started) * steps_total / max(steps_done, 1), "projected": stopped}


def measure_memory(args):
    pairs = dataset.find_pairs(Path(args.camvid) / "train")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.memory_pairs:
            rows.append(memory_run(args, n, pairs, tmp, len(rows)))
            r = rows[-1]
            print(f"{n:>7} pairs  peak private {r['peak_private_mib']:7.0f} MiB  data preparation "
                  f"{r['prepare_s']:6.1f} s  epoch {r['epoch_s']:7.0f} s"
                  + (f" (projected from {r['steps_done']} of {r['steps_epoch']} steps)" if r["projected"] else ""),
                  flush=True)
    return rows


def main(args):
    if args.memory_pairs:
        print("training one epoch per size at " + "x".join(map(str, args.image_size)) + f", batch {args.batch_size}")
        rows = measure_memory(args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return rows
    if args._worker:
        print(json.dumps(measure_training(args)))
        return None
    device, dtype = setup(args)
    cpu = f"{cpu_name()}, {torch.get_num_threads()} threads"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    print(f"device {device} ({name}), torch {torch.__version__}, training dtype {precision_name(dtype)}")
    config = {k: v for k, v in vars(args).items() if k not in ("argv", "_worker")}
    print("config: " + json.dumps(config))
    dataset.find_pairs(Path(args.camvid) / "train")  # a missing data folder fails here, with the fix
    table = dataset.make_class_table(None, Path(args.camvid) / "train")
    res = {"device": str(device), "device_name": name, "torch": torch.__version__,
           "dtype": str(dtype or "fp32").replace("torch.", ""),
           "peak_fp32": conv_peak(args, device, None)}
    res["peak_train"] = conv_peak(args, device, dtype) if dtype else res["peak_fp32"]
    model = new_model(train_args(args), table, device)
    res["params"] = count_parameters(model)
    res["fwd_flops"], res["bwd_flops"] = count_flops(model, tuple(args.image_size), device)
    del model
    res["training"] = run_worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        res["inference"] = measure_inference(args, table, device, dtype, tmp)
    report(args, res)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": config, **res}, indent=1))
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    try:
        main(get_args(sys.argv[1:]))
    except dataset.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
