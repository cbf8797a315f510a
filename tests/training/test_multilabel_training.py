"""Training a multi-label run: the task from the data, the run it writes, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from tests.conftest import FINDINGS_LABELS

from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from medsight.data.sources import load_samples
from medsight.errors import ConfigError
from medsight.training import trainer
from medsight.training.trainer import train

pytest.importorskip("medsight.models.zoo")


def _config(data, out, task="auto", **optim):
    settings = {"epochs": 3, "batch_size": 8, "lr": 3e-3, "patience": 10, **optim}
    return TrainConfig(
        task=task,
        data=DataConfig(
            path=str(data / "manifest.csv"), labels="bright,dark", ratios=(0.5, 0.25, 0.25)
        ),
        model=ModelConfig(name="medcnn_lite"),
        optim=OptimConfig(**settings),
        out=str(out),
    )


def test_findings_columns_train_a_multilabel_run_that_records_its_task(tmp_path, helpers):
    data = helpers.make_findings_manifest(tmp_path / "data")
    run = train(_config(data, tmp_path / "run", epochs=6))

    assert run.task == "multilabel"
    assert json.loads((run.path / "model.json").read_text())["task"] == "multilabel"
    assert yaml.safe_load((run.path / "config.yaml").read_text())["task"] == "multilabel"
    assert json.loads((run.path / "classes.json").read_text()) == {
        "classes": ["bright", "dark"],
        "positive": None,
    }
    assert run.positive_class is None
    history = run.history()
    assert {"val_auroc", "val_average_precision", "val_loss"} <= set(history.columns)
    # the two blocks are easy to see: the mean AUROC over findings climbs well above chance
    assert history["val_auroc"].max() > 0.9
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    splits = run.splits()
    assert set(splits["label"]) <= FINDINGS_LABELS


def test_uncertain_findings_follow_the_policy(tmp_path, helpers):
    data = helpers.make_findings_manifest(tmp_path / "data")
    labels = {}
    for policy in ("ignore", "zeros", "ones"):
        table = load_samples(data / "manifest.csv", labels="bright,dark", uncertain=policy)
        labels[policy] = table.set_index("sample_id")["label"]
    uncertain = labels["ignore"].str.contains(r"\?dark")
    assert uncertain.sum() == 6  # patients 4, 9, 14 (two images each)
    assert not labels["zeros"][uncertain].str.contains("dark").any()
    assert labels["ones"][uncertain].str.endswith("dark").all()
    assert (labels["zeros"][~uncertain] == labels["ignore"][~uncertain]).all()


def test_a_resumed_multilabel_run_ends_with_the_same_weights(tmp_path, helpers, monkeypatch):
    data = helpers.make_findings_manifest(tmp_path / "data")
    straight = train(_config(data, tmp_path / "a"))

    real_validate = trainer._validate

    def interrupted(*args, **kwargs):
        # Stop at the first validation after the first checkpoint (after epoch 1), whether or
        # not the split's size makes the plan validate within epochs too.
        if (tmp_path / "b" / "checkpoints" / "last.pt").exists():
            raise KeyboardInterrupt
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(trainer, "_validate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_config(data, tmp_path / "b"))
    monkeypatch.setattr(trainer, "_validate", real_validate)
    resumed = train(_config(data, tmp_path / "b"), resume=True)

    a = torch.load(straight.path / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(resumed.path / "checkpoints" / "last.pt", weights_only=False)
    for part in ("model", "average"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    np.testing.assert_array_equal(straight.history()["val_auroc"], resumed.history()["val_auroc"])


def test_the_task_must_fit_the_data(tmp_path, helpers):
    findings = helpers.make_findings_manifest(tmp_path / "findings")
    with pytest.raises(ConfigError, match="--task classify is single-label"):
        train(_config(findings, tmp_path / "a", task="classify"))

    classes = helpers.make_two_class_manifest(tmp_path / "classes")
    config = TrainConfig(
        task="multilabel",
        data=DataConfig(path=str(classes / "manifest.csv")),
        out=str(tmp_path / "b"),
    )
    with pytest.raises(ConfigError, match="--task multilabel needs multi-label data"):
        train(config)
    with pytest.raises(ConfigError, match="--balanced samples by class"):
        train(_config(findings, tmp_path / "c", balanced_sampler=True))
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_the_cli_trains_findings_and_says_the_task(tmp_path, helpers):
    from typer.testing import CliRunner

    from medsight.cli import app

    data = helpers.make_findings_manifest(tmp_path / "data")
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            str(data / "manifest.csv"),
            "--labels",
            "bright,dark",
            "--epochs",
            "2",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "auroc" in result.output
    assert json.loads((tmp_path / "run" / "model.json").read_text())["task"] == "multilabel"


def test_each_finding_is_scored_against_its_own_mask(tmp_path, helpers):
    from medsight.explain.localisation import score_localisation

    data = helpers.make_findings_manifest(tmp_path / "data")
    run = train(_config(data, tmp_path / "run", epochs=4))
    result = score_localisation(run.path, methods=["gradcam"], faithfulness=2, n_bootstrap=50)

    table = load_samples(data / "manifest.csv", labels="bright,dark")
    test = table.set_index("sample_id").loc[run.splits().query("split == 'test'")["sample_id"]]
    present = {
        name: int(test["label"].str.split("|").apply(lambda parts, n=name: n in parts).sum())
        for name in ("bright", "dark")
    }
    per_finding = result["methods"]["gradcam"]["per_finding"]
    assert {name: v["n_images"] for name, v in per_finding.items()} == present
    assert result["n_images"] == sum(present.values())
    assert result["target"] == "each finding present"
    assert 0.0 <= per_finding["bright"]["pointing_game"]["value"] <= 1.0


def test_single_label_only_workflows_refuse_findings_by_name(tmp_path, helpers):
    from medsight.workflows.cv import check_folds
    from medsight.workflows.ensemble import build_ensemble

    data = helpers.make_findings_manifest(tmp_path / "data")
    with pytest.raises(ConfigError, match="medsight cv pools single-label"):
        check_folds(_config(data, tmp_path / "cv"), 3)
    a = train(_config(data, tmp_path / "a", epochs=1))
    b = train(_config(data, tmp_path / "b", epochs=1, lr=1e-3))
    with pytest.raises(ConfigError, match="is a multilabel run; `medsight ensemble` averages"):
        build_ensemble([a.path, b.path], tmp_path / "ensemble")


def test_findings_train_with_the_focal_loss_and_classes_refuse_it(tmp_path, helpers):
    data = helpers.make_findings_manifest(tmp_path / "data")
    run = train(_config(data, tmp_path / "focal", epochs=6, loss="focal"))
    assert yaml.safe_load((run.path / "config.yaml").read_text())["optim"]["loss"] == "focal"
    assert run.history()["val_auroc"].max() > 0.9

    classes = helpers.make_two_class_manifest(tmp_path / "classes")
    config = TrainConfig(
        data=DataConfig(path=str(classes / "manifest.csv")),
        optim=OptimConfig(loss="focal"),
        out=str(tmp_path / "refused"),
    )
    with pytest.raises(ConfigError, match="--loss focal is a loss for several findings"):
        train(config)
    assert not (tmp_path / "refused").exists()
