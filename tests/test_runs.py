"""Run directories: refusal to clobber, atomic files, positive-class guessing."""

from __future__ import annotations

import pytest
import torch

from medsight import runs
from medsight.errors import ConfigError


def test_existing_run_is_refused_unless_overwrite(tmp_path):
    run = tmp_path / "r"
    runs.prepare_run_dir(run)
    (run / "model.json").write_text("{}")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        runs.prepare_run_dir(run)
    runs.prepare_run_dir(run, overwrite=True)
    assert not (run / "model.json").exists()
    with pytest.raises(ConfigError, match="nothing to resume"):
        runs.prepare_run_dir(run, resume=True)


def test_atomic_write_leaves_no_partial_file_on_failure(tmp_path):
    target = tmp_path / "history.csv"
    target.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        runs.write_atomic(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]


def test_weights_round_trip_through_safetensors(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.arange(3.0)}
    runs.save_weights(tmp_path / "m.safetensors", state)
    loaded = runs.load_weights(tmp_path / "m.safetensors")
    assert all(torch.equal(state[k], loaded[k]) for k in state)


@pytest.mark.parametrize(
    ("classes", "expected"),
    [
        (["normal", "pneumonia"], "pneumonia"),
        (["Pneumonia", "NORMAL"], "Pneumonia"),
        (["benign", "malignant", "normal"], "malignant"),
        (["cat", "dog"], "dog"),
    ],
)
def test_positive_class_guess(classes, expected):
    assert runs.guess_positive_class(classes) == expected


def test_loading_a_folder_that_is_not_a_run_says_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="is not a medsight run: it lacks config.yaml"):
        runs.Run.load(tmp_path)
