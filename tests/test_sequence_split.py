"""The held-out-sequence check: whole video sequences, never frames of one sequence on both sides."""

import pytest
from conftest import CLASSES_CSV, run, write_split

import dataset
from dataset import DataError


def camvid_like(root):
    """Two splits whose frames carry CamVid-style sequence prefixes; one sequence spans both."""
    for split, n, seed in (("train", 6, 0), ("val", 3, 1)):
        write_split(root / split, n, seed)
        for sub in ("images", "masks"):
            for i, p in enumerate(sorted((root / split / sub).iterdir())):
                seq = {"train": ["0001TP", "0001TP", "0006R0", "0006R0", "0016E5", "0016E5"],
                       "val": ["0016E5"] * 3}[split][i]
                p.rename(p.with_name(f"{seq}_{split}{i:03d}.png"))
    (root / "classes.csv").write_text(CLASSES_CSV)
    return [root / "train", root / "val"]


def test_sequence_of():
    assert dataset.sequence_of("a/0016E5_07959.png") == "0016E5"
    assert dataset.sequence_of("Seq05VD_f00000.png") == "Seq05VD"


def test_sequence_split_holds_out_whole_sequences(tmp_path):
    splits = camvid_like(tmp_path / "data")
    written = dataset.write_sequence_split(splits, ["0016E5"], tmp_path / "out")
    train = dataset.find_pairs(written["train"][0])
    hold = dataset.find_pairs(written["holdout"][0])
    assert written["train"][1] == 4 and written["holdout"][1] == 5
    assert {dataset.sequence_of(i) for i, _ in train} == {"0001TP", "0006R0"}
    assert {dataset.sequence_of(i) for i, _ in hold} == {"0016E5"}  # from train and val alike
    assert all(i.stem == m.stem for i, m in train + hold)  # pairs stay pairs
    assert (tmp_path / "out" / "classes.csv").is_file()  # the class table travels with the lists


def test_sequence_split_refuses_an_unknown_sequence(tmp_path):
    splits = camvid_like(tmp_path / "data")
    with pytest.raises(DataError, match="Seq05VD.*0001TP 0006R0 0016E5"):
        dataset.write_sequence_split(splits, ["Seq05VD"], tmp_path / "out")
    r = run("dataset.py", "--sequence_split", *splits, "--holdout", "nope", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.startswith("error: --holdout nope")
