"""benchmark.py on tiny data and a tiny model: every measurement runs and the figures are sane."""

import json

from conftest import run

import benchmark

TINY = ["--image_size", "32", "48", "--widths", "8", "16", "--latent_channels", "4", "--batch_size", "4",
        "--threads", "1", "--steps", "2", "--warmup", "1", "--peak_conv", "8", "8", "8", "--cli_runs", "1"]


def test_measurements_in_process(tiny_data, tmp_path):
    args = benchmark.get_args(["--camvid", str(tiny_data), *TINY])
    device, dtype = benchmark.setup(args)
    assert benchmark.conv_peak(args, device, None) > 0
    targs = benchmark.train_args(args)
    assert targs.widths == [8, 16] and targs.loss == "ce" and targs.augment == 1  # train.py's recipe flags
    table = benchmark.dataset.make_class_table(None, tiny_data / "train")
    fwd, bwd = benchmark.count_flops(benchmark.new_model(targs, table, device), (32, 48), device)
    assert fwd > 0 and 1.5 < bwd / fwd <= 2.0  # grad input + grad weight; the first conv needs no grad input
    for mode in ("memory", "data"):
        r = benchmark.measure_training(args, mode)
        assert len(r["step_times_s"]) == 2 and r["step_s"] > 0 and r["peak_rss_mib"] > 50
    assert r["cache_mib"] > 0 and r["decode_s"] > 0
    i = benchmark.measure_inference(args, table, device, dtype, tmp_path)
    assert i["model_hw"] == [32, 48] and i["image_hw"] == [32, 48] and i["forward_ms"] > 0 and i["cli_s"] > 0


def test_script_end_to_end(tiny_data, tmp_path):
    r = run("benchmark.py", "--camvid", tiny_data, *TINY, "--json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    for label in ("conv peak fp32", "MFU, CamVid data path", "peak RSS, fixed batch", "loader overhead",
                  "python test.py, launch to PNG"):
        assert label in r.stdout
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["config"]["batch_size"] == 4 and res["memory"]["step_s"] > 0 and res["inference"]["cli_s"] > 0


def test_missing_data_is_a_clear_error(tmp_path):
    r = run("benchmark.py", "--camvid", tmp_path / "nowhere", *TINY)
    assert r.returncode == 2 and "does not exist" in r.stderr
