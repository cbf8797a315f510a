"""medsight tune: search spaces, a tiny study, resuming it, two workers on one SQLite file."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from medsight.cli import app
from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from medsight.errors import ConfigError, MedsightError
from medsight.workflows import tune as tuning
from medsight.workflows.tune import SearchSpace, open_storage, tune
from tests.conftest import make_two_class_manifest

TINY_SPACE = {
    "optim.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
    "model.attention": ["none", "se"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_two_class_manifest(tmp_path_factory.mktemp("tune") / "data", n_patients=12)


def base_config(data: Path, out: Path, epochs: int = 2) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(path=str(data), ratios=(0.5, 0.25, 0.25)),
        model=ModelConfig(name="medcnn_s"),
        optim=OptimConfig(epochs=epochs, batch_size=8, patience=10),
        out=str(out),
    )


def test_three_trial_study_keeps_the_best_run_with_its_summary(data, tmp_path):
    out = tmp_path / "tuned"
    summary = tune(
        base_config(data, out),
        trials=3,
        space=SearchSpace.from_dict(TINY_SPACE),
        live=False,
    )
    assert summary["counts"] == {"complete": 3}
    assert len(summary["trials"]) == 3
    values = [t["value"] for t in summary["trials"]]
    assert summary["best"]["value"] == max(values)
    # the first trial runs the base recipe, so tuning can only improve on it (on validation)
    assert summary["trials"][0]["params"] == {"optim.lr": 3e-3, "model.attention": "none"}
    # the best trial is an ordinary run at --out, its config pointing there
    from medsight.runs import Run

    run = Run.load(out)
    assert run.config.out == str(out)
    assert run.config.optim.lr == pytest.approx(summary["best"]["params"]["optim.lr"])
    assert run.model_config["attention"] == summary["best"]["params"]["model.attention"]
    page = (out / "tune.html").read_text()
    assert "Optimisation history" in page and "data:image/png;base64," in page
    assert json.loads((out / "tune.json").read_text())["best"] == summary["best"]
    trial_dirs = sorted((tmp_path / "tuned-trials").glob("*/trial_*"))
    assert len(trial_dirs) == 3


def test_a_study_in_sqlite_resumes_where_it_stopped(data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    space = SearchSpace.from_dict(TINY_SPACE)
    first = tune(
        base_config(data, tmp_path / "a"), trials=2, space=space, storage=storage, live=False
    )
    assert first["counts"] == {"complete": 2}
    second = tune(
        base_config(data, tmp_path / "b"), trials=4, space=space, storage=storage, live=False
    )
    assert second["counts"] == {"complete": 4}
    numbers = [t["number"] for t in second["trials"]]
    assert numbers == [0, 1, 2, 3]
    # the two trials of the first call are kept, not re-run
    assert [t["params"] for t in second["trials"][:2]] == [t["params"] for t in first["trials"]]


def test_two_workers_share_one_sqlite_study_without_corrupting_it(data, tmp_path):
    db = tmp_path / "shared.db"
    storage = f"sqlite:///{db}"
    open_storage(storage)  # the schema exists before the workers start, as after a first run
    script = textwrap.dedent(
        f"""
        import sys
        from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
        from medsight.workflows.tune import SearchSpace, tune
        import time
        from pathlib import Path
        worker = sys.argv[1]
        # start together (after the imports), so both really share the study
        Path({str(tmp_path)!r}, "ready" + worker).touch()
        while not all(Path({str(tmp_path)!r}, "ready" + k).exists() for k in "12"):
            time.sleep(0.05)
        base = TrainConfig(
            data=DataConfig(path={str(data)!r}, ratios=(0.5, 0.25, 0.25)),
            model=ModelConfig(name="medcnn_s"),
            optim=OptimConfig(epochs=2, batch_size=8, patience=10),
            out={str(tmp_path)!r} + "/worker" + worker,
        )
        tune(base, trials=6, space=SearchSpace.from_dict({TINY_SPACE!r}),
             storage={storage!r}, study_name="shared", live=False)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(k)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k in (1, 2)
    ]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    study = optuna.load_study(study_name="shared", storage=storage)
    states = [t.state for t in study.trials]
    finished = [s for s in states if s == optuna.trial.TrialState.COMPLETE]
    assert len(finished) >= 6
    assert optuna.trial.TrialState.FAIL not in states
    assert len({t.number for t in study.trials}) == len(study.trials)
    # both processes ran trials of the same study
    owners = {Path(t.user_attrs["config"]["out"]).parts[-3] for t in study.trials}
    assert owners == {"worker1-trials", "worker2-trials"}
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_pruned_trials_stop_early_and_leave_no_run(data, tmp_path, monkeypatch):
    monkeypatch.setattr(
        tuning, "_pruner", lambda name, epochs: optuna.pruners.ThresholdPruner(lower=1.5)
    )
    with pytest.raises(MedsightError, match="no trial finished"):
        tune(
            base_config(data, tmp_path / "t", epochs=3),
            trials=2,
            space=SearchSpace.from_dict(TINY_SPACE),
            live=False,
        )
    assert not list((tmp_path / "t-trials").glob("*/trial_*"))
    assert not (tmp_path / "t").exists()


def test_sampling_skips_transfer_parameters_for_networks_trained_from_scratch():
    space = SearchSpace.default()
    base = TrainConfig(data=DataConfig(path="."))
    custom = space.sample(
        optuna.trial.FixedTrial(
            {
                "model.name": "medcnn_m",
                "model.attention": "cbam",
                "optim.lr": 1e-3,
                "optim.weight_decay": 1e-4,
                "optim.batch_size": 32,
                "optim.augment_strength": 0.5,
                "optim.label_smoothing": 0.1,
            }
        ),
        base,
    )
    assert (custom.model.name, custom.model.pretrained, custom.optim.mode) == (
        "medcnn_m",
        False,
        "full",
    )
    assert custom.model.attention == "cbam" and custom.optim.batch_size == 32
    transfer = space.sample(
        optuna.trial.FixedTrial(
            {
                "model.name": "mobilenet_v2",
                "optim.mode": "finetune",
                "optim.freeze_stages": 2,
                "model.attention": "none",
                "optim.lr": 1e-3,
                "optim.weight_decay": 1e-4,
                "optim.batch_size": 64,
                "optim.augment_strength": 1.0,
                "optim.label_smoothing": 0.0,
            }
        ),
        base,
    )
    assert transfer.model.pretrained is True
    assert (transfer.optim.mode, transfer.optim.freeze_stages) == ("finetune", 2)


def test_a_yaml_space_replaces_the_default(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
        "optim.batch_size: [16, 32]\n"
        "model.name: {choices: [medcnn_s]}\n"
        "optim.epochs: 4\n"
    )
    space = SearchSpace.from_yaml(path)
    assert space.names() == ["optim.lr", "optim.batch_size", "model.name", "optim.epochs"]
    kinds = [p.kind for p in space.params]
    assert kinds == ["float", "categorical", "categorical", "fixed"]
    config = space.sample(
        optuna.trial.FixedTrial(
            {"optim.lr": 2e-3, "optim.batch_size": 16, "model.name": "medcnn_s"}
        ),
        TrainConfig(data=DataConfig(path=".")),
    )
    assert (config.optim.lr, config.optim.batch_size, config.optim.epochs) == (2e-3, 16, 4)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"optim.lrr": {"low": 1e-4, "high": 1e-2}}, "unknown parameter 'optim.lrr'.*optim.lr"),
        ({"optim.lr": {"low": 1e-2, "high": 1e-4}}, "optim.lr has an empty range"),
        ({"optim.batch_size": []}, "optim.batch_size has no choices"),
        ({"optim.lr": {"low": 0.0, "high": 1e-2, "log": True}}, "log range needs low > 0"),
        ({"model.name": ["medcnn_s", "not_a_net"]}, "not_a_net"),
        ({"optim.optimizer": ["adam", "lion"]}, "lion"),
        ({"data.path": ["a", "b"]}, "data.path cannot be tuned"),
        ({}, "search space is empty"),
    ],
)
def test_bad_search_spaces_are_refused_naming_the_parameter(space, message):
    with pytest.raises(ConfigError, match=message):
        SearchSpace.from_dict(space)


@pytest.mark.parametrize(
    "url", ["sqlite:////no/such/folder/tune.db", "nosuchdb://user@host/x", "not a url"]
)
def test_a_storage_that_cannot_be_opened_is_named(url):
    with pytest.raises(ConfigError, match="cannot open the study storage"):
        open_storage(url)


def test_tune_cli_runs_a_study_and_reports_bad_input(data, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {low: 1.0e-3, high: 1.0e-2, log: true}\n")
    runner = CliRunner()
    args = ["tune", "--data", str(data), "--trials", "2", "--space", str(space)]
    args += ["--epochs", "2", "--batch-size", "8", "--out", str(tmp_path / "best")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "best" / "tune.html").exists()
    assert "best config" in result.output
    space.write_text("optim.momentum: [0.9]\n")
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 2
    assert "unknown parameter 'optim.momentum'" in result.output
    space.write_text("optim.lr: {low: 1.0e-3, high: 1.0e-2}\n")
    bad_storage = ["--storage", "sqlite:////no/such/dir/t.db", "--overwrite"]
    result = runner.invoke(app, [*args, *bad_storage])
    assert result.exit_code == 2 and "cannot open the study storage" in result.output


def test_the_default_space_only_lists_networks_that_train_offline():
    from medsight.models import get_spec

    for name in tuning.DEFAULT_SPACE["model.name"]:
        spec = get_spec(name)
        assert spec.family == "custom" or spec.offline_weights, name


def test_failed_trials_are_reported_and_an_all_failed_study_says_why(data, tmp_path):
    console_file = tmp_path / "console.txt"
    from rich.console import Console

    from medsight.cli.render import Renderer

    with console_file.open("w") as handle, pytest.raises(MedsightError, match="batch_size=4096"):
        tune(
            base_config(data, tmp_path / "t"),
            trials=2,
            space=SearchSpace.from_dict({"optim.batch_size": [4096]}),
            live=False,
            events=Renderer(Console(file=handle, width=200)),
        )
    assert "trial 0 failed: batch_size=4096 is larger than the training set" in (
        console_file.read_text()
    )


def test_the_best_trial_is_retrained_when_its_run_is_not_on_this_machine(data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    space = SearchSpace.from_dict(TINY_SPACE)
    first = tune(
        base_config(data, tmp_path / "a"),
        trials=2,
        space=space,
        storage=storage,
        pruner="hyperband",
        live=False,
    )
    import shutil

    shutil.rmtree(tmp_path / "a-trials")  # as if the trials had run on another machine
    again = tune(
        base_config(data, tmp_path / "b"), trials=2, space=space, storage=storage, live=False
    )
    assert again["best"] == first["best"]
    from medsight.runs import Run

    run = Run.load(tmp_path / "b")
    assert run.config.optim.lr == pytest.approx(first["best"]["params"]["optim.lr"])
    assert (tmp_path / "b" / "model.safetensors").exists()


def test_a_sqlite_study_reads_and_updates_a_trial_under_one_write_lock(tmp_path):
    # Two workers must not both see an enqueued trial as waiting and both run it: SQLite
    # ignores SELECT ... FOR UPDATE, so each transaction takes the write lock from its start.
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    storage = open_storage(url)
    other = sqlite3.connect(tmp_path / "tune.db", timeout=0)
    with storage.engine.begin() as connection:
        connection.exec_driver_sql("SELECT count(*) FROM trials").scalar()  # a read only
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("UPDATE studies SET study_name = study_name")
    other.execute("UPDATE studies SET study_name = study_name")  # free once it ended
    other.close()
