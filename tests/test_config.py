"""Configuration: validation names the field, YAML round trips, overrides win."""

from __future__ import annotations

import pytest

from medsight.config import DataConfig, TrainConfig
from medsight.errors import ConfigError


def test_yaml_round_trip_keeps_every_resolved_value(tmp_path):
    config = TrainConfig(data=DataConfig(path="data/x.npz"), out="runs/x", seed=3)
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert TrainConfig.from_yaml(path) == config
    assert "batch_size: 64" in path.read_text()


def test_overrides_replace_dotted_fields_and_ignore_none():
    config = TrainConfig(data=DataConfig(path="a"))
    changed = config.with_overrides({"optim.lr": 0.01, "model.name": "resnet18", "seed": None})
    assert changed.optim.lr == 0.01 and changed.model.name == "resnet18" and changed.seed == 0


def test_bad_values_name_the_field_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.optimizer: .*got 'adagrad'"):
        TrainConfig.parse({"data": {"path": "a"}, "optim": {"optimizer": "adagrad"}})
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        TrainConfig(data=DataConfig(path="a")).with_overrides({"optim.lr": -1})
    with pytest.raises(ConfigError, match="colour"):
        TrainConfig.parse({"data": {"path": "a", "colour": 1}})
    with pytest.raises(ConfigError, match="config file not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
