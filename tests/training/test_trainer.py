"""Training end to end on tiny data: run files, round trips, modes, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.conftest import tiny_train_config

from medsight import runs
from medsight.errors import ConfigError, DataError, TrainingError
from medsight.inference import Predictor
from medsight.tasks.classify import ClassifyTask
from medsight.training import trainer
from medsight.training.trainer import train

pytest.importorskip("medsight.models.zoo")

_config = tiny_train_config


def _interrupt_second_validation(monkeypatch):
    """Make the second validation pass raise KeyboardInterrupt (Ctrl-C during epoch 2); returns
    the real function, to put back before resuming."""
    calls = {"n": 0}
    real_validate = trainer._validate

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(trainer, "_validate", interrupted)
    return real_validate


def _dataset(root, helpers, n_patients=12, per_patient=2, size=16):
    return helpers.make_two_class_manifest(root, n_patients, per_patient, size)


def test_training_writes_the_run_directory_and_predicts_the_same_after_loading(tmp_path, helpers):
    data = _dataset(tmp_path / "data", helpers)
    run = train(_config(data, tmp_path / "run"), show_progress=False)
    for name in (
        "config.yaml",
        "model.safetensors",
        "model.json",
        "preprocess.json",
        "classes.json",
        "history.csv",
        "splits.csv",
        "versions.json",
    ):
        assert (run.path / name).exists(), name
    assert run.classes == ["lesion", "normal"] and run.positive_class == "lesion"
    history = run.history()
    assert list(history["epoch"]) == [1, 2]
    assert history["train_loss"].notna().all()
    splits = run.splits()
    assert (splits.groupby("patient_id")["split"].nunique() == 1).all()
    model_info = json.loads((run.path / "model.json").read_text())
    assert model_info["name"] == "medcnn_s" and model_info["in_chans"] == 1
    assert model_info["image_size"] == [16, 16]

    predictor = Predictor.from_run(run.path)
    files = sorted((data / "img").glob("*.png"))[:4]
    first = predictor.predict_files(files)
    again = Predictor.from_run(run.path).predict_files(files)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first.sum(axis=1), 1.0, atol=1e-6)


def test_resumed_run_ends_with_the_same_weights(tmp_path, helpers, monkeypatch):
    data = _dataset(tmp_path / "data", helpers)
    straight = train(_config(data, tmp_path / "a", epochs=3), show_progress=False)

    real_validate = _interrupt_second_validation(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(_config(data, tmp_path / "b", epochs=3), show_progress=False)
    monkeypatch.setattr(trainer, "_validate", real_validate)
    resumed = train(_config(data, tmp_path / "b", epochs=3), resume=True, show_progress=False)

    a = torch.load(straight.path / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(resumed.path / "checkpoints" / "last.pt", weights_only=False)
    for part in ("model", "average"):  # the weights and their average alike
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert list(resumed.history()["epoch"]) == [1, 2, 3]


def _weights_and_checkpoint(run):
    from safetensors.torch import load_file

    kept = load_file(run.path / runs.WEIGHTS)
    return kept, torch.load(run.path / "checkpoints" / "last.pt", weights_only=False)


def test_the_kept_weights_are_the_average_of_the_trained_ones_unless_ema_is_0(tmp_path, helpers):
    data = _dataset(tmp_path / "data", helpers)
    # one epoch of 6 steps validated once: that validation is the best, so the kept weights
    # are the average at its last step
    one_validation = {"epochs": 1, "batch_size": 2, "val_checks": 1}
    kept, last = _weights_and_checkpoint(train(_config(data, tmp_path / "a", **one_validation)))
    assert all(torch.equal(kept[k], last["average"][k]) for k in kept)
    assert not all(torch.equal(kept[k], last["model"][k]) for k in kept)

    kept, last = _weights_and_checkpoint(
        train(_config(data, tmp_path / "b", **one_validation, ema=0))
    )
    assert last["average"] is None
    assert all(torch.equal(kept[k], last["model"][k]) for k in kept)


def test_a_run_checkpointed_without_an_average_resumes_without_one(tmp_path, helpers, monkeypatch):
    data = _dataset(tmp_path / "data", helpers)
    real_validate = _interrupt_second_validation(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(_config(data, tmp_path / "run", epochs=2), show_progress=False)
    monkeypatch.setattr(trainer, "_validate", real_validate)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    old = torch.load(path, weights_only=False)
    del old["average"]  # as written before runs kept a weight average
    torch.save(old, path)

    resumed = train(_config(data, tmp_path / "run", epochs=2), resume=True)
    kept, last = _weights_and_checkpoint(resumed)
    assert last["average"] is None and list(resumed.history()["epoch"]) == [1, 2]


def test_a_copied_run_resumes_in_its_own_folder(tmp_path, helpers, monkeypatch):
    import shutil

    from typer.testing import CliRunner

    from medsight.cli import app

    data = _dataset(tmp_path / "data", helpers)
    real_validate = _interrupt_second_validation(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(_config(data, tmp_path / "original", epochs=2), show_progress=False)
    monkeypatch.setattr(trainer, "_validate", real_validate)
    shutil.copytree(tmp_path / "original", tmp_path / "copy")

    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "copy")])
    assert result.exit_code == 0, result.output
    assert list(runs.Run.load(tmp_path / "copy").history()["epoch"]) == [1, 2]
    assert list(runs.Run.load(tmp_path / "original").history()["epoch"]) == [1]  # left as it was


def test_features_mode_embeds_once_and_trains_only_the_head(tmp_path, helpers, monkeypatch):
    data = _dataset(tmp_path / "data", helpers)
    base = train(_config(data, tmp_path / "base", epochs=1), show_progress=False)
    decoded = {"n": 0}
    real_decode = trainer.ImageDataset.__getitem__

    def counting(self, i):
        decoded["n"] += 1
        return real_decode(self, i)

    monkeypatch.setattr(trainer.ImageDataset, "__getitem__", counting)
    config = _config(data, tmp_path / "feat", epochs=3, mode="features", lr=1e-2)
    config = config.with_overrides({"model.weights": str(base.path)})
    run = train(config, show_progress=False)
    n_images = len(run.splits().query("split in ['train', 'val']"))
    assert decoded["n"] == n_images  # each image went through the backbone once, for 3 epochs
    assert list((run.path / "features").glob("*.pt"))
    backbone_before = base.load_model().backbone.state_dict()
    backbone_after = run.load_model().backbone.state_dict()
    assert all(torch.equal(backbone_before[k], backbone_after[k]) for k in backbone_before)


def test_modes_that_need_learned_features_refuse_random_weights(tmp_path, helpers):
    data = _dataset(tmp_path / "data", helpers)
    with pytest.raises(ConfigError, match="--mode finetune trains on top of learned features"):
        train(_config(data, tmp_path / "r", mode="finetune"), show_progress=False)


def test_existing_run_is_refused(tmp_path, helpers):
    data = _dataset(tmp_path / "data", helpers)
    train(_config(data, tmp_path / "r", epochs=1), show_progress=False)
    with pytest.raises(ConfigError, match="already exists"):
        train(_config(data, tmp_path / "r", epochs=1), show_progress=False)


def test_class_too_small_and_batch_too_large_are_named(tmp_path, helpers):
    data = _dataset(tmp_path / "data", helpers, n_patients=4, per_patient=1)
    with pytest.raises(DataError, match=r"class '\w+' has \d image\(s\) in the \w+ split"):
        train(_config(data, tmp_path / "r"), show_progress=False)
    data = _dataset(tmp_path / "data2", helpers)
    with pytest.raises(ConfigError, match="batch_size=512 is larger than the training set"):
        train(_config(data, tmp_path / "r2", batch_size=512), show_progress=False)


def test_nan_loss_stops_with_the_batch_named(tmp_path, helpers, monkeypatch):
    data = _dataset(tmp_path / "data", helpers)

    class NanLoss(torch.nn.Module):
        def forward(self, logits, y):
            return logits.sum() * float("nan")

    monkeypatch.setattr(
        ClassifyTask, "build_loss", lambda self, counts, smoothing, loss="auto": NanLoss()
    )
    with pytest.raises(TrainingError, match="at epoch 1, batch 1") as caught:
        train(_config(data, tmp_path / "r"), show_progress=False)
    assert "before its first checkpoint (no checkpoint yet), so no run was kept" in str(
        caught.value
    )
    assert "last good checkpoint" not in str(caught.value)
    assert not (tmp_path / "r").exists()


def test_nan_loss_after_a_checkpoint_names_it(tmp_path, helpers, monkeypatch):
    data = _dataset(tmp_path / "data", helpers)
    real_build = ClassifyTask.build_loss

    class NanInEpochTwo(torch.nn.Module):
        def __init__(self, loss):
            super().__init__()
            self.loss, self.calls = loss, 0

        def forward(self, logits, y):
            self.calls += 1
            value = self.loss(logits, y)
            return value * float("nan") if self.calls > 1 else value  # 1 step per epoch

    def nan_in_epoch_two(self, counts, smoothing, loss="auto"):
        return NanInEpochTwo(real_build(self, counts, smoothing, loss))

    monkeypatch.setattr(ClassifyTask, "build_loss", nan_in_epoch_two)
    out = tmp_path / "r"
    with pytest.raises(TrainingError) as caught:
        train(_config(data, out, batch_size=12), show_progress=False)
    checkpoint = out / "checkpoints" / "last.pt"
    assert str(caught.value).startswith("the loss became nan at epoch 2, batch 1;")
    assert f"the last good checkpoint is {checkpoint} (epoch 1)" in str(caught.value)
    assert torch.load(checkpoint, weights_only=False)["state"]["epoch"] == 1


def _split_manifest(root, helpers, broken: str | None = None):
    """Two classes with a fixed split column: 8 train, 2 val, 2 test images each; ``broken``
    (a split) gets one file that is not an image."""
    lines = ["path,label,split"]
    for label, seed in (("normal", 0), ("lesion", 100)):
        for i, split in enumerate(["train"] * 8 + ["val"] * 2 + ["test"] * 2):
            rel = f"img/{label}_{i}.png"
            helpers.write_png(root / rel, helpers.random_image(seed + i))
            lines.append(f"{rel},{label},{split}")
    if broken:
        (root / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        lines.append(f"img/broken.png,normal,{broken}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def test_bad_data_found_during_training_leaves_no_run_and_a_rerun_is_not_refused(tmp_path, helpers):
    data = _split_manifest(tmp_path / "data", helpers, broken="val")
    out = tmp_path / "runs" / "r"
    with pytest.raises(DataError, match="broken.png"):
        train(_config(data, out, epochs=1), show_progress=False)
    assert list((tmp_path / "runs").iterdir()) == []  # no run, no hidden leftovers
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(_config(data, out, epochs=1), resume=True, show_progress=False)

    fixed = _split_manifest(tmp_path / "data", helpers)
    run = train(_config(fixed, out, epochs=1), show_progress=False)
    assert run.path == out and (out / "checkpoints" / "last.pt").exists()


def test_a_kill_during_the_first_checkpoint_leaves_no_run_that_evaluate_accepts(
    tmp_path, helpers, monkeypatch
):
    from medsight.training import handlers

    data = _dataset(tmp_path / "data", helpers)
    out = tmp_path / "runs" / "r"

    def killed(payload, path):
        path.write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # as far as this process goes, a kill

    monkeypatch.setattr(handlers, "_save", killed)
    # a real kill runs no clean-up: the hidden folder stays
    monkeypatch.setattr(runs.NewRun, "discard", lambda self: None)
    with pytest.raises(KeyboardInterrupt):
        train(_config(data, out), show_progress=False)
    assert not out.exists()
    with pytest.raises(ConfigError, match="is not a medsight run: it is not a folder"):
        runs.Run.load(out)  # what evaluate, predict and serve load
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(_config(data, out), resume=True, show_progress=False)
    left = list((tmp_path / "runs").iterdir())
    assert len(left) == 1 and left[0].name.startswith(".r.partial-")


def test_an_unfinished_run_of_a_dead_process_is_removed_by_the_next_start(tmp_path, helpers):
    import os
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    left = tmp_path / "runs" / f".r.partial-{child.pid}-abc123"
    (left / "r" / "checkpoints").mkdir(parents=True)
    (left / "r" / "checkpoints" / f".last.pt.{child.pid}.tmpxyz").write_bytes(b"x" * 1000)
    os.utime(left, (0, 0))
    data = _dataset(tmp_path / "data", helpers)
    train(_config(data, tmp_path / "runs" / "r", epochs=1), show_progress=False)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["r"]


def test_file_names_that_are_not_utf8_train_and_keep_their_splits(tmp_path, helpers):
    import os

    root = helpers.make_class_folders(tmp_path / "d", {"normal": 8, "lesion": 8})
    bad = os.path.join(os.fsencode(root / "lesion"), b"\xff\xfe.png")
    helpers.write_png(tmp_path / "x.png", helpers.random_image(99))
    os.replace(tmp_path / "x.png", bad)
    run = train(_config(root, tmp_path / "r", epochs=1), show_progress=False)
    name = os.fsdecode(b"lesion/\xff\xfe.png")
    assert name in run.splits()["sample_id"].tolist()
    assert b"lesion/\xff\xfe.png," in (run.path / runs.SPLITS).read_bytes()
    table = run.load_data()
    assert table["split"].notna().all()  # every sample found its split again
    assert name in table["sample_id"].tolist()


def test_finetune_freezes_early_stages_and_trains_the_rest(tmp_path, helpers):
    data = _dataset(tmp_path / "data", helpers)
    base = train(_config(data, tmp_path / "base", epochs=1), show_progress=False)
    config = _config(data, tmp_path / "ft", epochs=1, mode="finetune", freeze_stages=2)
    run = train(config.with_overrides({"model.weights": str(base.path)}), show_progress=False)
    before, after = base.load_model(), run.load_model()
    frozen = after.stage_names()[:2]
    assert json.loads((run.path / "model.json").read_text())["frozen_stages"] == 2
    for name in ("stem", "stage1"):
        assert name in frozen
    changed = {
        key: not torch.equal(before.state_dict()[key], after.state_dict()[key])
        for key in after.state_dict()
        if key.startswith("backbone.") and "num_batches" not in key
    }
    stem_keys = [k for k in changed if k.startswith("backbone.stem")]
    last_keys = [k for k in changed if k.startswith("backbone.stage3")]
    assert stem_keys and not any(changed[k] for k in stem_keys)
    assert any(changed[k] for k in last_keys)


def test_scratch_ignores_pretrained_and_cli_trains_a_run(tmp_path, helpers):
    from typer.testing import CliRunner

    from medsight.cli import app

    data = _dataset(tmp_path / "data", helpers)
    out = tmp_path / "cli-run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--mode",
            "scratch",
            "--pretrained",
            "--attention",
            "se",
        ],
    )
    assert result.exit_code == 0, result.output
    model_info = json.loads((out / "model.json").read_text())
    assert model_info["pretrained_source"] is None and model_info["attention"] == "se"
    again = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_dataloader_workers_follow_the_cache_and_the_cores(monkeypatch):
    monkeypatch.setattr(trainer.os, "cpu_count", lambda: 16)
    assert trainer._workers(None, cached=True, features_mode=False) == 0
    assert trainer._workers(None, cached=False, features_mode=True) == 0
    assert trainer._workers(None, cached=False, features_mode=False) == 4
    assert trainer._workers(3, cached=True, features_mode=False) == 3  # asked for: obeyed
    monkeypatch.setattr(trainer.os, "cpu_count", lambda: 2)
    assert trainer._workers(None, cached=False, features_mode=False) == 0


def test_a_checkpoint_from_before_step_plans_is_refused_by_name(tmp_path, helpers):
    data = _dataset(tmp_path / "data", helpers)
    run = train(_config(data, tmp_path / "r", epochs=1), show_progress=False)
    checkpoint = run.path / "checkpoints" / "last.pt"
    saved = torch.load(checkpoint, weights_only=False)
    old_keys = ("epoch", "best_score", "best_epoch", "bad_epochs", "history")
    saved["state"] = {k: v for k, v in saved["state"].items() if k in old_keys}  # 4d1acfa's
    torch.save(saved, checkpoint)
    with pytest.raises(ConfigError, match="older medsight.*--weights"):
        train(_config(data, tmp_path / "r", epochs=2), resume=True, show_progress=False)
