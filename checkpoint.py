"""The checkpoint format: what train.py saves, what test.py and --resume load, and rebuilding the
model from a checkpoint alone.

A checkpoint is a plain dict of state dicts and primitives that loads with
torch.load(path, weights_only=True): the model's weights and config, the class table (names,
colours, void label and colour), the training size, the run's flags and history, and, in
last.pt only, the optimizer, scheduler, scaler and RNG state that --resume needs. A file that
test.py --calibrate writes (best.calibrated.pt) adds "calibration": {settings: {"temperature",
...}}, one temperature per --samples/--flip/--resolution it was fitted for.

    ckpt = load_checkpoint("runs/x/best.pt"); model = build_model(ckpt, "runs/x/best.pt")
"""

import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from cli import write_atomic
from dataset import ClassTable, DataError
from model import SegVAE, VAEConfig

CHECKPOINT_FORMAT = "segvae-1"
REQUIRED = ("model", "model_config", "classes", "colours", "ignore_index", "image_size")


def make_checkpoint(model, table, image_size, run_config, **fields):
    """The dict every checkpoint shares, plus `fields` (epoch, step, history, optimizer, ...).
    `model` is the unwrapped module (never the DDP wrapper), so keys carry no prefix."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "model_config": model.config.to_dict(),
        "run_config": run_config,
        "classes": list(table.names),
        "colours": [list(c) if c else None for c in table.colours],
        "ignore_index": int(table.ignore_index),
        "void_colour": list(table.void_colour) if table.void_colour else None,
        "class_table": table.to_dict(),  # all of it, e.g. the mask values of a table whose void row is not last
        "image_size": list(image_size),
        **fields,
    }


def save_checkpoint(obj, path):
    """torch.save, written atomically (temporary file, fsync, rename)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, device="cpu"):
    """Load with weights_only=True (never runs code from the file) and check it is ours."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist; give --model_path a .pt file that "
                        "train.py wrote (e.g. runs/<time>/best.pt)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about old pickle protocols; we report below
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise DataError(f"checkpoint {path} holds arbitrary pickled Python objects, and loading "
                            "it would run code from the file; it was refused. Use a checkpoint "
                            "written by train.py") from None
        raise DataError(f"checkpoint {path} is not a readable PyTorch checkpoint; it may be truncated "
                        "or not a checkpoint at all. Give a .pt file that train.py wrote") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, AttributeError,
            IndexError, TypeError, UnicodeDecodeError) as e:
        raise DataError(f"checkpoint {path} is not a readable PyTorch checkpoint ({type(e).__name__}); "
                        "it may be truncated or not a checkpoint at all. Give a .pt file that train.py "
                        "wrote") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"checkpoint {path} was not written by this project's train.py (no "
                        f"'format': '{CHECKPOINT_FORMAT}' entry); give a checkpoint from train.py")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise DataError(f"checkpoint {path} lacks {', '.join(missing)}; it is damaged or was edited. "
                        "Give a checkpoint that train.py wrote")
    return ckpt


def build_model(ckpt, path="checkpoint", device="cpu"):
    """Rebuild the SegVAE from the config stored in the checkpoint and load its weights."""
    try:
        model = SegVAE(VAEConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        if len(ckpt["classes"]) != model.config.num_classes:
            raise ValueError(f"{len(ckpt['classes'])} class names for a model of {model.config.num_classes} "
                             "classes")
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise DataError(f"checkpoint {path} does not fit the model ({str(e).splitlines()[0][:160]}); "
                        "it was written by another version or is damaged") from None
    return model.to(device, memory_format=torch.channels_last).eval()


def table_from_checkpoint(ckpt):
    """The class table the model was trained with, void colour included (so colour masks that
    contain void can be scored)."""
    if isinstance(ckpt.get("class_table"), dict):
        return ClassTable.from_dict(ckpt["class_table"])
    void = ckpt.get("void_colour")
    return ClassTable(names=list(ckpt["classes"]), colours=[tuple(c) if c else None for c in ckpt["colours"]],
                      ignore_index=int(ckpt["ignore_index"]), void_colour=tuple(void) if void else None)
