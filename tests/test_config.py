"""Configuration: validation names the field, YAML round trips, overrides win."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from medsight.config import DataConfig, TrainConfig
from medsight.errors import ConfigError


def test_yaml_round_trip_keeps_every_resolved_value(tmp_path):
    config = TrainConfig(data=DataConfig(path="data/x.npz"), out="runs/x", seed=3)
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert TrainConfig.from_yaml(path) == config
    assert "batch_size: auto" in path.read_text() and "epochs: auto" in path.read_text()


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


def test_overrides_refuse_an_unknown_key_naming_the_closest_fields():
    config = TrainConfig(data=DataConfig(path="a"))
    with pytest.raises(ConfigError, match=r"'optim\.warmup'; did you mean 'optim\.warmup_epochs'"):
        config.with_overrides({"optim.warmup": 1})
    with pytest.raises(ConfigError, match=r"'lr'; did you mean 'optim\.lr'\? valid keys: task"):
        config.with_overrides({"lr": 0.1})


def test_keep_none_sets_a_field_to_none():
    config = TrainConfig(data=DataConfig(path="a", image_size=64))
    assert config.with_overrides({"data.image_size": None}).data.image_size == 64
    assert config.with_overrides({"data.image_size": None}, keep_none=True).data.image_size is None


def test_field_keys_list_sections_and_their_fields():
    keys = TrainConfig.field_keys()
    assert {"task", "data", "data.path", "optim.warmup_epochs", "model.attention"} <= set(keys)


def test_every_flag_field_says_what_it_does():
    def fields(model):
        for name, info in model.model_fields.items():
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                yield from fields(info.annotation)
            elif isinstance(info.json_schema_extra, dict) and "cli" in info.json_schema_extra:
                yield name, info

    flagged = dict(fields(TrainConfig))
    assert len(flagged) >= 28
    assert all(info.description for info in flagged.values()), [
        name for name, info in flagged.items() if not info.description
    ]


def test_attention_is_one_of_the_known_blocks():
    with pytest.raises(ConfigError, match=r"model\.attention: .*'cbam'.*got 'cbma'"):
        TrainConfig.parse({"data": {"path": "a"}, "model": {"attention": "cbma"}})
