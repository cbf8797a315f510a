"""Data-parallel training under torchrun: two gloo processes on the CPU train one run, with
identical weights on both ranks and the validation of a single process with the same global
batch; --nproc launches torchrun; what cannot run is refused with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from tests.conftest import make_two_class_manifest, tiny_train_config

from medsight import runs
from medsight.errors import ConfigError
from medsight.training import distributed
from medsight.training.trainer import train

# 24 patients × 4 images: 48 train images at ratios 0.5/0.25/0.25, which split evenly into
# global batches of 16 (8 a process), so one and two processes take the same steps.
TRAIN_ARGS = ["--model", "medcnn_s", "--epochs", "8", "--batch-size", "16", "--lr", "0.003"]
TRAIN_ARGS += ["--patience", "10", "--set", "data.ratios=[0.5,0.25,0.25]"]


class Stop(Exception):
    pass


def _torchrun(*args: str, tmp: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", "-m", "medsight", "train", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


@pytest.fixture
def data(tmp_path) -> Path:
    return make_two_class_manifest(tmp_path / "data", 24, 4, 16)


def _single_process(data: Path, out: Path):
    config = tiny_train_config(data, out, epochs=8, batch_size=16, patience=10)
    return train(config, show_progress=False)


def test_two_gloo_processes_train_one_run_like_one_process(data, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "runs" / "ddp"
    done = _torchrun("--data", str(data), "--out", str(out), *TRAIN_ARGS, tmp=scratch)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # One run directory, written by rank 0 alone; the other rank's scratch is gone.
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["ddp"]
    assert not list(scratch.glob("medsight-rank*"))
    said = " ".join((done.stdout + done.stderr).split())  # as one line, unwrapped
    assert said.count("2 processes (gloo): effective batch 16 = 2 × 8 a process") == 1
    trained_on = json.loads((out / runs.MODEL).read_text())["trained_on"]
    assert trained_on["processes"] == 2 and trained_on["backend"] == "gloo"
    assert (trained_on["batch_per_process"], trained_on["effective_batch"]) == (8, 16)
    digests = trained_on["weights_sha256_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert runs.Run.load(out).config.optim.batch_size == 16  # the global batch, recorded

    single = _single_process(data, tmp_path / "runs-1" / "single")
    ddp = pd.read_csv(out / runs.HISTORY)
    one = pd.read_csv(single.path / runs.HISTORY)
    # The same steps and validations: every validation image is scored once, gathered from
    # both processes in order.
    assert ddp["step"].tolist() == one["step"].tolist()
    assert ddp["val_images"].tolist() == one["val_images"].tolist()
    # Not the same numbers: each process normalises its own 8 images (BatchNorm) and the
    # images are drawn in another order. On these 24 validation images the final loss of one
    # process spreads 0.03-0.23 over seeds, as two processes' does; the scores agree.
    assert ddp["val_auroc"].iloc[-1] == pytest.approx(one["val_auroc"].iloc[-1], abs=0.02)
    assert ddp["val_accuracy"].iloc[-1] == pytest.approx(one["val_accuracy"].iloc[-1], abs=0.1)
    assert ddp["val_loss"].iloc[-1] == pytest.approx(one["val_loss"].iloc[-1], abs=0.25)
    assert ddp["images_seen"].tolist() == one["images_seen"].tolist()  # both processes' images


def test_a_run_stopped_on_one_process_resumes_on_two(data, tmp_path):
    out = tmp_path / "runs" / "r"

    def after_first_epoch(epoch, row):
        raise Stop

    config = tiny_train_config(data, out, epochs=2, batch_size=16, patience=10)
    with pytest.raises(Stop):
        train(config, show_progress=False, on_epoch=after_first_epoch)
    assert pd.read_csv(out / runs.HISTORY)["epoch"].max() == 1
    done = _torchrun("--resume", str(out), tmp=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "after epoch 1" in " ".join((done.stdout + done.stderr).split())
    history = pd.read_csv(out / runs.HISTORY)
    assert history["epoch"].iloc[-1] == 2 and history["step"].tolist() == [1, 2, 3, 4, 5, 6]
    trained_on = json.loads((out / runs.MODEL).read_text())["trained_on"]
    assert len(set(trained_on["weights_sha256_by_rank"])) == 1


def test_nproc_starts_torchrun_without_itself(monkeypatch):
    started = []
    monkeypatch.setattr(subprocess, "call", lambda command, env: started.append(command) or 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert distributed.launch(2, ["train", "--data", "d"]) == 0
    command = started[0]
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert command[5:] == ["-m", "medsight", "train", "--data", "d"]

    from medsight.cli.main import _without_nproc

    assert _without_nproc(["--data", "d", "--nproc", "2", "--nproc=3", "--epochs", "1"]) == [
        "--data",
        "d",
        "--epochs",
        "1",
    ]


def test_more_processes_than_cores_or_gpus_are_refused_with_the_reason(monkeypatch):
    import torch

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="has 2 CPU core.* no GPU; .* give --nproc 2 or fewer"):
        distributed.launch(3, ["train"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="has 1 GPU.*one process per GPU, so give --nproc 1"):
        distributed.launch(2, ["train"])


def test_features_mode_is_refused_under_torchrun(data, tmp_path):
    done = _torchrun(
        "--data", str(data), "--out", str(tmp_path / "f"), "--mode", "features",
        "--model", "mobilenet_v2", "--pretrained", "--epochs", "1", tmp=tmp_path,
    )  # fmt: skip
    assert done.returncode != 0
    assert "--mode features trains a head on cached embeddings" in done.stdout + done.stderr
    assert not (tmp_path / "f").exists()
