"""Where and how the network runs: device, autocast precision and CPU threads, chosen once per
process by train.py, test.py and benchmark.py.

    device = pick_device("auto"); dtype = pick_precision("auto", device)
    with autocast(device, dtype): logits = model(x)
"""

import ctypes
import os
import time

import torch

from dataset import DataError


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name} was asked for but no CUDA GPU is available here; "
                        "use --device cpu or --device auto")
    return torch.device(name)


def precision_name(dtype):
    """The --precision name of an autocast dtype from pick_precision (None: fp32)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def pick_precision(name, device):
    """The autocast dtype, or None for fp32. auto: bf16 where the hardware has it (CUDA with
    bf16, or a CPU with AVX-512 bf16), else fp16 on CUDA, else fp32."""
    if name == "fp32":
        return None
    if device.type == "cuda":
        if name == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if name == "bf16" else torch.float16
    if name == "fp16":
        raise DataError("--precision fp16 is for CUDA GPUs; on the CPU use bf16 or fp32")
    if name == "auto":
        return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else None
    return torch.bfloat16


def memory_format(device):
    """The layout of the network's weights and inputs in training and validation: channels-last on
    CUDA and on CPUs with AVX-512, where it made the recipe's step 1.23x faster in fp32 and 1.13x
    in bf16; NCHW on other CPUs, where it made the step 1.05-1.14x slower (an AVX2 CPU, fp32;
    `benchmark.py --levers`). Inference (`checkpoint.build_model`) stays channels-last: batch-1
    forwards on that AVX2 CPU were about 10% slower in NCHW."""
    if torch.device(device).type == "cpu" and not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return torch.contiguous_format
    return torch.channels_last


def layout_of(model):
    """The memory format the model's weights are in, for its inputs to match: train.py builds the
    model in `memory_format(device)`, `checkpoint.build_model` in channels-last."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[-1] * p.shape[-2] > 1:  # a 1x1 kernel fits either layout
            cl = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            return torch.channels_last if cl else torch.contiguous_format
    return torch.contiguous_format


def autocast(device, dtype):
    """One autocast context for the whole project; a no-op for fp32 (dtype None)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def busy_cores(interval=0.2):
    """Cores kept busy by other processes, from two readings of /proc/stat `interval` seconds
    apart while this process sleeps (None where there is no /proc/stat)."""
    def read():
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = read()
        time.sleep(interval)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * os.cpu_count()


def set_threads(requested=0):
    """torch's CPU threads. requested > 0: that many. 0: torch's default (one per physical core),
    less the cores other processes keep busy right now: on a shared machine, threads that wait
    for a core held by another process stall every parallel op (epochs 20-50x slower were seen
    with two busy processes). Returns a line for the log when it chose fewer, else ''."""
    if requested:
        torch.set_num_threads(requested)
        return ""
    default = torch.get_num_threads()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = busy_cores()
    if busy is None or busy < 0.5:
        return ""
    threads = max(1, min(default, usable - round(busy)))
    if threads == default:
        return ""
    torch.set_num_threads(threads)
    return (f"note: other processes keep about {busy:.1f} of {usable} cores busy; using {threads} thread(s) "
            f"instead of {default} (set --threads to choose)")


def keep_freed_memory():
    """Ask glibc's malloc to keep the memory a training step frees for the next step instead of
    handing it back to the kernel: by default each step's large activations are mapped afresh
    (or the heap trimmed) and every page faulted in and zeroed again. Measured on the recipe's
    CPU step (benchmark.py): about 20% faster, for about 100 MiB more peak RSS; memory still does
    not grow from step to step (a step's working set is the same every step). Returns False
    where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # malloc.h
    return all(libc.mallopt(option, value) == 1 for option, value in (
        (m_mmap_threshold, 32 << 20),  # glibc's maximum: larger blocks are mapped (and unmapped) each time
        (m_trim_threshold, 2**31 - 1),  # never trim the heap's top
        (m_top_pad, 64 << 20)))  # grow the heap in 64 MiB steps
