"""Run directories: refusal to clobber, atomic files, positive-class guessing."""

from __future__ import annotations

import pandas as pd
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


def _dead_pid() -> int:
    """The pid of a process that has ended (a child, waited for)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _age(path, seconds: float) -> None:
    import os
    import time

    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_full_disk_is_one_write_error_naming_the_file_and_errno(tmp_path):
    import errno

    target = tmp_path / "history.csv"

    def full(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(runs.WriteError) as caught:
        runs.write_atomic(target, full)
    assert str(caught.value) == (
        f"cannot write {target}: No space left on device (ENOSPC); "
        "free space on that disk or write elsewhere"
    )
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary one


def test_weights_on_a_full_disk_raise_a_write_error_not_a_safetensors_error(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(runs.WriteError, match=r"model.safetensors: No space left on device"):
        runs.save_weights(tmp_path / "model.safetensors", {"w": torch.ones(2)})
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_a_folder_should_be_is_named(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(runs.WriteError) as caught:
        runs.write_json(tmp_path / "out" / "r.json", {})
    assert (
        str(caught.value) == f"cannot create the folder {tmp_path / 'out'}: it is a file (ENOTDIR)"
    )


def test_file_names_that_are_not_utf8_keep_their_bytes_in_run_csvs(tmp_path):
    import os

    name = os.fsdecode(b"a/\xff\xfe.png")  # what os.listdir gives for those bytes
    frame = pd.DataFrame({"sample_id": [name, "a/ok.png"], "split": ["train", "val"]}, dtype=object)
    runs.write_text(tmp_path / runs.SPLITS, frame.to_csv(index=False))
    assert b"a/\xff\xfe.png,train" in (tmp_path / runs.SPLITS).read_bytes()
    back = runs.read_csv(tmp_path / runs.SPLITS, dtype={"sample_id": str})
    assert back["sample_id"].tolist() == [name, "a/ok.png"]


def test_a_new_run_appears_only_when_committed(tmp_path):
    final = tmp_path / "r"
    new = runs.NewRun(final)
    runs.write_json(new.path / runs.MODEL, {"n": 1})
    assert not final.exists()
    assert new.path.name == "r"  # the run keeps its name while it is built
    assert new.commit() == final
    assert (final / runs.MODEL).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # the hidden folder is gone


def test_a_failed_new_run_leaves_nothing_and_an_old_run_is_replaced_only_at_commit(tmp_path):
    final = tmp_path / "r"
    final.mkdir()
    (final / runs.MODEL).write_text("old")
    with pytest.raises(ConfigError, match="already exists"):
        runs.NewRun(final)
    with pytest.raises(RuntimeError), runs.NewRun(final, overwrite=True) as new:
        runs.write_json(new.path / runs.MODEL, {"n": 2})
        raise RuntimeError("bad data")
    assert (final / runs.MODEL).read_text() == "old"  # kept: the new run never got going
    assert [p.name for p in tmp_path.iterdir()] == ["r"]
    with runs.NewRun(final, overwrite=True) as new:
        runs.write_json(new.path / runs.MODEL, {"n": 3})
    assert (final / runs.MODEL).read_text().strip() == '{\n  "n": 3\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


def test_a_write_error_in_a_new_run_names_the_final_place(tmp_path):
    import errno

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(runs.WriteError) as caught, runs.NewRun(tmp_path / "r") as new:
        runs.write_atomic(new.path / "checkpoints" / "last.pt", full)
    assert str(caught.value).startswith(
        f"cannot write {tmp_path / 'r' / 'checkpoints' / 'last.pt'}:"
    )
    assert list(tmp_path.iterdir()) == []


def test_what_interrupted_writers_left_is_cleaned_when_their_process_is_gone(tmp_path):
    import os

    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".last.pt.{dead}.tmpk2j4a9"
    recent = tmp_path / f".history.csv.{dead}.tmpa8d7s6"
    writing = tmp_path / f".model.safetensors.{alive}.tmpq1w2e3"
    partial = tmp_path / f".r.partial-{dead}-x7y8z9"
    legacy = tmp_path / ".last.pt.k2j4_a9z"  # an older version's name, without a pid
    mine = tmp_path / ".notes.txt"
    for path in (stale, recent, writing, legacy, mine):
        path.write_bytes(b"x" * 10)
    (partial / "r").mkdir(parents=True)
    for path in (stale, writing, partial, mine):
        _age(path, 120)
    _age(legacy, 7200)
    removed = runs.clean_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([stale.name, partial.name, legacy.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [recent.name, writing.name, mine.name]
    )


def test_resuming_a_run_cleans_its_stale_temporary_files(tmp_path):
    run = tmp_path / "r"
    (run / runs.CHECKPOINTS).mkdir(parents=True)
    (run / runs.CHECKPOINTS / "last.pt").write_bytes(b"ok")
    left = run / runs.CHECKPOINTS / f".last.pt.{_dead_pid()}.tmpabc123"
    left.write_bytes(b"x" * 1000)
    _age(left, 120)
    runs.prepare_run_dir(run, resume=True)
    assert not left.exists()


def test_resuming_a_run_that_never_got_a_checkpoint_says_so(tmp_path):
    with pytest.raises(ConfigError, match="no such run; a run stopped before its first checkpoint"):
        runs.prepare_run_dir(tmp_path / "gone", resume=True)
