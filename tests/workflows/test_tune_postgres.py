"""medsight tune on a real PostgreSQL server: worker processes share one study, and bad
credentials are one line without the password."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from medsight.cli import app
from medsight.errors import ConfigError
from medsight.workflows.tune import open_storage
from tests.conftest import make_two_class_manifest

pytest_plugins = ["tests.postgres"]

TINY_SPACE = {
    "optim.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
    "model.attention": ["none", "se"],
}
WORKERS = 2
TRIALS = 4
SECRET = "Not-The-Password-93"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_two_class_manifest(tmp_path_factory.mktemp("tune-pg") / "data", n_patients=12)


def test_worker_processes_share_one_study_on_postgresql(data, tmp_path, postgres_url):
    # No schema yet: the workers create Optuna's tables together, as on a new database.
    script = textwrap.dedent(
        f"""
        import json, sys, time
        from pathlib import Path
        from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
        from medsight.workflows.tune import SearchSpace, tune
        worker, url = sys.argv[1], sys.argv[2]
        # start together (after the imports), so all really share the study
        Path({str(tmp_path)!r}, "ready" + worker).touch()
        while len(list(Path({str(tmp_path)!r}).glob("ready*"))) < {WORKERS}:
            time.sleep(0.05)
        base = TrainConfig(
            data=DataConfig(path={str(data)!r}, ratios=(0.5, 0.25, 0.25)),
            model=ModelConfig(name="medcnn_s"),
            optim=OptimConfig(epochs=1, batch_size=8, patience=10),
            out={str(tmp_path)!r} + "/worker" + worker,
        )
        summary = tune(base, trials={TRIALS}, space=SearchSpace.from_dict({TINY_SPACE!r}),
                       storage=url, study_name="shared", live=False)
        Path({str(tmp_path)!r}, "summary" + worker + ".json").write_text(json.dumps(summary))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(k), postgres_url],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k in range(1, WORKERS + 1)
    ]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0] * WORKERS, logs

    study = optuna.load_study(study_name="shared", storage=open_storage(postgres_url))
    states = [t.state for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # each worker stops once the study holds TRIALS; trials already running may finish too
    assert TRIALS <= len(complete) <= TRIALS + WORKERS - 1
    assert optuna.trial.TrialState.FAIL not in states
    assert optuna.trial.TrialState.RUNNING not in states
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(len(study.trials)))  # none lost, none twice
    owners = {Path(t.user_attrs["config"]["out"]).parts[-3] for t in study.trials}
    assert owners == {f"worker{k}-trials" for k in range(1, WORKERS + 1)}
    # every worker reports the study's best trial, kept as a run at its --out
    best = max(complete, key=lambda t: t.value)
    for k in range(1, WORKERS + 1):
        summary = json.loads((tmp_path / f"summary{k}.json").read_text())
        assert summary["best"]["value"] == pytest.approx(study.best_value)
        assert summary["best"]["value"] == pytest.approx(best.value)
        assert SECRET not in json.dumps(summary)
        assert make_url(postgres_url).password not in json.dumps(summary)
        assert summary["storage"] == make_url(postgres_url).render_as_string(hide_password=True)
        assert (tmp_path / f"worker{k}" / "tune.json").exists()


def wrong_password(url: str) -> str:
    return make_url(url).set(password=SECRET).render_as_string(hide_password=False)


def test_bad_credentials_are_one_line_without_the_password(postgres_url):
    with pytest.raises(ConfigError) as refused:
        open_storage(wrong_password(postgres_url))
    message = str(refused.value)
    assert "\n" not in message and SECRET not in message
    assert "cannot open the study storage" in message and "***" in message
    assert "password authentication failed" in message


def test_tune_cli_with_bad_credentials_prints_one_line(data, tmp_path, postgres_url):
    args = ["tune", "--data", str(data), "--trials", "1", "--epochs", "1"]
    args += ["--out", str(tmp_path / "best"), "--storage", wrong_password(postgres_url)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert SECRET not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot open the study storage")
