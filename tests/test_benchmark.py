"""benchmark.py on tiny data and a tiny model: every measurement runs and the figures are sane."""

import json

import pytest
import torch

from conftest import run

import benchmark
from runtime import precision_name

TINY = ["--image_size", "32", "48", "--widths", "8", "16", "--latent_channels", "4", "--batch_size", "4",
        "--threads", "1", "--steps", "2", "--warmup", "1", "--peak_conv", "8", "8", "8", "--cli_runs", "1"]


def test_measurements_in_process(tiny_data, tmp_path):
    args = benchmark.get_args(["--camvid", str(tiny_data), *TINY, "--levers", "--compile", "0", "--lever_steps", "1"])
    device, dtype = benchmark.setup(args)
    assert benchmark.conv_peak(args, device, None) > 0
    targs = benchmark.train_args(args)
    assert targs.widths == [8, 16] and targs.loss == "ce" and targs.augment == 1  # train.py's recipe flags
    table = benchmark.dataset.make_class_table(None, tiny_data / "train")
    fwd, bwd = benchmark.count_flops(benchmark.new_model(targs, table, device), (32, 48), device)
    assert fwd > 0 and 1.5 < bwd / fwd <= 2.0  # grad input + grad weight; the first conv needs no grad input
    r = benchmark.measure_training(args)
    for kind in ("fixed", "data"):
        assert len(r[kind]["step_times_s"]) == 2 and r[kind]["step_s"] > 0
    assert r["peak_rss_mib"] >= r["rss_before_mib"] > 50 and r["cache_mib"] > 0 and r["decode_s"] > 0
    # NCHW and channels-last, in fp32 and (where the CPU has it) bf16; one thread already, so no 1-thread row
    assert len(r["levers"]) == (4 if dtype else 2) and any(k.startswith("NCHW, fp32") for k in r["levers"])
    default = [k for k in r["levers"] if k.endswith("(the default)")]  # train.py's layout and dtype, once
    cl = benchmark.memory_format(device) == torch.channels_last
    assert default == [f"{'channels-last' if cl else 'NCHW'}, {precision_name(dtype)} (the default)"]
    assert all(v > 0 for v in r["levers"].values())
    i = benchmark.measure_inference(args, table, device, dtype, tmp_path)
    assert i["model_hw"] == [32, 48] and i["image_hw"] == [32, 48] and i["forward_ms"] > 0 and i["cli_s"] > 0


def test_script_end_to_end(tiny_data, tmp_path):
    r = run("benchmark.py", "--camvid", tiny_data, *TINY, "--levers", "--compile", "0", "--json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    for label in ("conv peak fp32", "MFU, CamVid data path", "peak RSS of training", "loader overhead",
                  "python test.py, launch to PNG", "speed-up over NCHW fp32"):
        assert label in r.stdout
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["config"]["batch_size"] == 4 and res["training"]["data"]["step_s"] > 0 and res["inference"]["cli_s"] > 0


def test_missing_data_is_a_clear_error(tmp_path):
    r = run("benchmark.py", "--camvid", tmp_path / "nowhere", *TINY)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_levers_without_a_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(benchmark.dataset.DataError, match="needs a C\\+\\+ compiler.*--compile 0"):
        benchmark.get_args(["--levers"])
    assert benchmark.get_args(["--levers", "--compile", "0"]).levers  # without torch.compile it runs


def test_memory_scaling_runs_train_py_and_reads_private_memory(tiny_data, tmp_path):
    args = benchmark.get_args(["--camvid", str(tiny_data), *TINY, "--memory_pairs", "8", "8", "16"])
    rows = benchmark.main(args)
    assert [r["pairs"] for r in rows] == [8, 8, 16]
    for r in rows:
        assert 50 < r["peak_private_mib"] < 4000  # a python with torch, not zero and not the mapped cache
        assert r["epoch_s"] > 0 and r["prepare_s"] > 0 and not r["projected"]
        assert r["steps_done"] == r["steps_epoch"] == r["pairs"] // 4
