"""Optional experiment loggers: a missing package is a clear error, not an ImportError."""

from __future__ import annotations

import builtins

import pytest

from medsight.errors import ConfigError
from medsight.training.loggers import EpochLogger, create_logger


def test_none_logs_nothing(tmp_path):
    logger = create_logger("none", tmp_path, {})
    assert type(logger) is EpochLogger
    logger.log({"epoch": 1, "train_loss": 0.5}, 1)
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def without_mlflow(name, *args, **kwargs):
        if name == "mlflow":
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_mlflow)
    with pytest.raises(ConfigError, match="--log mlflow needs the mlflow package: pip install"):
        create_logger("mlflow", tmp_path, {"a": {"b": 1}})


def test_unknown_logger_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="log must be one of none, tensorboard, mlflow"):
        create_logger("wandb", tmp_path, {})


def test_tensorboard_writes_event_files_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    logger = create_logger("tensorboard", tmp_path, {})
    logger.log({"epoch": 1, "train_loss": 0.5, "val_auroc": 0.9}, 1)
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
