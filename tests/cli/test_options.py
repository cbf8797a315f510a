"""Training options come from the config model: each flag sets its field, shows its choices,
refuses other values; --set reaches every field; tune and cv share the flags."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
from typer.testing import CliRunner

from medsight.cli import app
from medsight.cli.options import TRAIN_OPTIONS
from medsight.config import TrainConfig

WIDE = {"COLUMNS": "240"}  # Rich wraps --help at the terminal's width

#: README's "Training" flags (and the rest of train's): arguments → dotted field → value.
README_FLAGS = [
    (["--out", "runs/x"], "out", "runs/x"),
    (["--model", "resnet18"], "model.name", "resnet18"),
    (["--mode", "finetune"], "optim.mode", "finetune"),
    (["--pretrained"], "model.pretrained", True),
    (["--no-pretrained"], "model.pretrained", False),
    (["--weights", "w.safetensors"], "model.weights", "w.safetensors"),
    (["--attention", "cbam"], "model.attention", "cbam"),
    (["--pool", "avg"], "model.pool", "avg"),
    (["--freeze-stages", "2"], "optim.freeze_stages", 2),
    (["--epochs", "3"], "optim.epochs", 3),
    (["--time", "10m"], "optim.time", "10m"),
    (["--batch-size", "16"], "optim.batch_size", 16),
    (["--lr", "0.01"], "optim.lr", 0.01),
    (["--optimizer", "sgd"], "optim.optimizer", "sgd"),
    (["--schedule", "cosine"], "optim.schedule", "cosine"),
    (["--weight-decay", "0.05"], "optim.weight_decay", 0.05),
    (["--label-smoothing", "0.1"], "optim.label_smoothing", 0.1),
    (["--class-weights", "none"], "optim.class_weights", "none"),
    (["--balanced"], "optim.balanced_sampler", True),
    (["--no-balanced"], "optim.balanced_sampler", False),
    (["--augment", "xray"], "optim.augment", "xray"),
    (["--augment-strength", "0.5"], "optim.augment_strength", 0.5),
    (["--image-size", "64"], "data.image_size", 64),
    (["--monitor", "loss"], "optim.monitor", "loss"),
    (["--patience", "2"], "optim.patience", 2),
    (["--workers", "1"], "optim.workers", 1),
    (["--device", "cpu"], "device", "cpu"),
    (["--precision", "bf16"], "precision", "bf16"),
    (["--cache"], "data.cache", True),
    (["--no-cache"], "data.cache", False),
    (["--log", "tensorboard"], "optim.log", "tensorboard"),
    (["--seed", "7"], "seed", 7),
    (["--task", "classify"], "task", "classify"),
    (["--format", "csv"], "data.format", "csv"),
    (["--allow-outside"], "data.allow_outside", True),
    (["--axis", "1"], "data.nifti_axis", 1),
    (["--slice", "4"], "data.nifti_slice", 4),
    (["--dims", "3"], "data.dims", "3"),
    (["--volume", "1"], "data.volume", 1),
    (["--intensity", "ct-lung"], "data.intensity", "ct-lung"),
    (["--tilt", "correct"], "data.tilt", "correct"),
    (["--slices", "3"], "data.slices", 3),
    (["--ema", "0"], "optim.ema", 0.0),
    (["--loss", "focal"], "optim.loss", "focal"),
    (["--labels", "effusion,mass"], "data.labels", "effusion,mass"),
    (["--uncertain", "zeros"], "data.uncertain", "zeros"),
    (["--findings-column", "Findings"], "data.findings_column", "Findings"),
]


@pytest.fixture
def captured(monkeypatch):
    """Run ``medsight train`` with a ``train`` that records its config instead of training."""
    import medsight.training.trainer as trainer

    calls: list[dict] = []
    monkeypatch.setattr(
        trainer, "train", lambda config, **kw: calls.append({"config": config, **kw})
    )

    def invoke(*args: str, command: str = "train"):
        result = CliRunner().invoke(app, [command, *args], env=WIDE)
        return result, (calls[-1] if calls else None)

    return invoke


def _get(config: TrainConfig, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize(("args", "key", "expected"), README_FLAGS)
def test_each_training_flag_sets_its_config_field(captured, args, key, expected):
    result, call = captured("--data", "data/chest.npz", *args)
    assert result.exit_code == 0, result.output
    config = call["config"]
    assert _get(config, key) == expected
    default = TrainConfig.parse({"data": {"path": "data/chest.npz"}, "out": config.out})
    changed = {k for k in TrainConfig.field_keys() if _get(config, k) != _get(default, k)}
    assert changed <= {key, "data", "model", "optim"}  # nothing else moved


def test_data_config_and_overwrite_keep_their_meaning(captured, tmp_path):
    result, call = captured("--data", "data/chest.npz")
    assert result.exit_code == 0, result.output
    assert call["config"].data.path == "data/chest.npz" and call["config"].out == "runs/chest"
    assert call["overwrite"] is False
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(call["config"].model_copy(update={"seed": 5}).to_yaml())
    result, call = captured("--config", str(yaml_file), "--lr", "0.5", "--overwrite")
    assert result.exit_code == 0, result.output
    config = call["config"]
    assert (config.seed, config.optim.lr, config.out, call["overwrite"]) == (
        5,
        0.5,
        "runs/chest",
        True,
    )


def test_every_readme_training_flag_is_declared():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Training", 1)[1].split("\n## ", 1)[0]
    flags = {f for option in TRAIN_OPTIONS for f in re.split(r"/", option.flag)}
    flags |= {"--config", "--set", "--overwrite", "--resume", "--help"}
    assert set(re.findall(r"--[a-z][a-z-]*", section)) <= flags
    tested = {a for args, _, _ in README_FLAGS for a in args if a.startswith("--")}
    assert tested | {"--data"} == flags - {"--config", "--set", "--overwrite", "--resume", "--help"}


def test_help_lists_the_choices_of_each_literal():
    result = CliRunner().invoke(app, ["train", "--help"], env=WIDE)
    assert result.exit_code == 0
    literal_options = [
        (option, get_args(_field(option.key).annotation))
        for option in TRAIN_OPTIONS
        if get_origin(_field(option.key).annotation) is Literal
    ]
    assert {o.flag for o, _ in literal_options} >= {"--optimizer", "--attention", "--monitor"}
    for option, choices in literal_options:
        assert "|".join(choices) in result.output, option.flag
    assert "folder|zip|csv|npz|dicom|nifti" in result.output  # --format: the readers' list


def _field(dotted: str):
    *sections, name = dotted.split(".")
    model = TrainConfig
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[name]


def test_a_bad_choice_exits_2_naming_the_allowed_values(captured):
    result, call = captured("--data", "d", "--optimizer", "adagrad")
    assert result.exit_code == 2 and call is None
    message = " ".join(result.output.replace("│", " ").split())
    assert "'--optimizer'" in message and "'adagrad'" in message
    assert all(f"'{name}'" in message for name in ("adam", "adamw", "rmsprop", "sgd"))


def test_set_reaches_any_field_and_wins_over_flags(captured):
    result, call = captured(
        "--data", "d.zip", "--lr", "0.1",
        "--set", "optim.warmup_epochs=0.5",
        "--set", "data.window=[-1000, 400]",
        "--set", "optim.lr=0.2",
        "--set", "data.image_size=null",
        "--set", "data.positive_class=1",
        "--set", "data.channels=1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = call["config"]
    assert config.optim.warmup_epochs == 0.5 and config.data.window == (-1000.0, 400.0)
    assert config.optim.lr == 0.2 and config.data.image_size is None
    assert config.data.positive_class == "1" and config.data.channels == 1  # text stays text


def test_set_refuses_an_unknown_key_naming_close_ones(captured):
    result, call = captured("--data", "d", "--set", "optim.warmup=1")
    assert result.exit_code == 2 and call is None
    assert "unknown config key 'optim.warmup'" in result.output
    assert "'optim.warmup_epochs'" in result.output
    result, _ = captured("--data", "d", "--set", "optim.lr")
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    result, _ = captured("--data", "d", "--set", "optim.optimizer=adagrad")
    assert result.exit_code == 2 and "optim.optimizer" in result.output
    assert "'adagrad'" in result.output and "'rmsprop'" in result.output


def test_set_can_name_the_data_instead_of_data(captured):
    result, call = captured("--set", "data.path=scans/ct.zip")
    assert result.exit_code == 0, result.output
    assert call["config"].data.path == "scans/ct.zip" and call["config"].out == "runs/ct"
    result, call = captured()
    assert result.exit_code == 2 and "give --data PATH" in result.output


def _flags(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", help_text))


@pytest.mark.parametrize("command", ["tune", "cv"])
def test_tune_and_cv_show_the_same_train_flags(command):
    runner = CliRunner()
    train_help = runner.invoke(app, ["train", "--help"], env=WIDE).output
    other_help = runner.invoke(app, [command, "--help"], env=WIDE).output
    # --nproc launches one training under torchrun; tune and cv start their own processes
    shared = _flags(train_help) - {"--resume", "--help", "--nproc", "--nproc-per-node"}
    assert {"--data", "--batch-size", "--set", "--no-balanced"} <= shared
    assert shared <= _flags(other_help)


def test_the_config_literal_is_the_list_of_attention_blocks():
    from medsight.models import attention

    assert set(attention._BUILDERS) == set(attention.ATTENTION_KINDS)


def test_importing_the_cli_does_not_import_torch():
    code = (
        "import sys, medsight.cli; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    )
    src = Path(__file__).parents[2] / "src"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(src)},
    )
    assert done.stdout.strip() == "[]"
