"""Where and how the network runs: device, autocast precision and CPU threads, chosen once per
process by train.py, test.py and benchmark.py.

    device = pick_device("auto"); dtype = pick_precision("auto", device)
    with autocast(device, dtype): logits = model(x)
"""

import torch

from dataset import DataError


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name} was asked for but no CUDA GPU is available here; "
                        "use --device cpu or --device auto")
    return torch.device(name)


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


def autocast(device, dtype):
    """One autocast context for the whole project; a no-op for fp32 (dtype None)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
