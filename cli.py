"""Command-line plumbing that train.py and test.py share: an argument parser and a refusal that
answer bad input in one line with exit status 2, output folders, and atomic file writes.

    from cli import Parser, refuse, write_json
"""

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from dataset import DataError


def is_main_process():
    """Rank 0 under torchrun, or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def refuse(message):
    """Exit with status 2 and one 'error: ...' line, as for every bad input (under torchrun from
    rank 0 alone: every rank fails alike, and one line is enough)."""
    if is_main_process():
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class HelpFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to a flag's help unless the help already states its default or the
    default is None (then the help says what happens instead)."""

    def _get_help_string(self, action):
        text = action.help or ""
        # `is`, not `in (None, False)`: 0 == False, and a default of 0 must be shown
        if "default" in text or any(action.default is v for v in (None, argparse.SUPPRESS, False)) \
                or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse that fails like every other bad input: one 'error: ...' line and exit 2, not the
    whole usage block."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        refuse(f"{message}; see python {self.prog} --help")


def make_output_dir(path):
    """Create `path` (and parents) and check it can be written; a DataError naming it if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DataError(f"output folder {path} cannot be written ({e.strerror}); choose another "
                        "--output_dir") from None
    return path


def write_atomic(path, data):
    """Write bytes or text to a temporary file in the same folder, fsync it, and rename it over
    `path`: a crash at any instant leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _json_safe(value):
    """NaN and infinities become None (JSON null): json.dumps would write NaN, which is not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path, obj):
    """Valid JSON (NaN written as null), atomically."""
    write_atomic(path, json.dumps(_json_safe(obj), indent=1, allow_nan=False) + "\n")


def write_csv(path, header, rows):
    """A CSV file of `header` and `rows`, atomically."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    write_atomic(path, buf.getvalue())
