"""Configuration for every step, as pydantic models: validated once, saved as YAML in the run.

A run's ``config.yaml`` is a :class:`TrainConfig` dumped in full (every default resolved), so
``medsight train --config RUN/config.yaml`` reproduces it. CLI flags override file values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medsight.errors import ConfigError

Mode = Literal["features", "finetune", "full", "scratch"]
Optimizer = Literal["adam", "adamw", "rmsprop", "sgd"]
Schedule = Literal["cosine", "onecycle", "plateau", "none"]
Augment = Literal["auto", "xray", "ct", "mri", "derm", "histo", "none"]
Monitor = Literal["auroc", "accuracy", "balanced_accuracy", "loss"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ReadOptions(_Strict):
    """How to read a collection (``medsight.data.sources.load_samples``); every field has the
    default people expect."""

    format: str | None = None
    allow_outside: bool = False
    path_column: str = "path"
    label_column: str = "label"
    patient_column: str | None = None
    split_column: str | None = None
    nifti_axis: int = Field(default=2, ge=0, le=2, description="slice axis of 3-D NIfTI (RAS+)")
    nifti_slice: int | None = Field(
        default=None, ge=0, description="slice index of 3-D NIfTI volumes (default: middle)"
    )


class DataConfig(ReadOptions):
    """Where the images are and how to read and split them (the reader's options included)."""

    path: str
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    image_size: int | None = Field(
        default=None, description="input side in px; default: native size up to 128, else model"
    )
    channels: Literal["auto", 1, 3] = "auto"
    window: tuple[float, float] | None = None
    cache: bool = Field(
        default=True,
        description="keep decoded images of up to 128 px in memory after the first epoch",
    )
    positive_class: str | None = Field(
        default=None, description="the class triage treats as urgent; guessed when omitted"
    )
    folds: int | None = Field(
        default=None,
        ge=2,
        description="cross-validation: split train+val into this many patient-grouped folds",
    )
    fold: int | None = Field(
        default=None, ge=0, description="cross-validation: the fold used for validation"
    )

    @model_validator(mode="after")
    def _fold_pair(self):
        if (self.folds is None) != (self.fold is None):
            raise ValueError("folds and fold go together: give both or neither")
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"fold must be below folds ({self.folds}), got {self.fold}")
        return self

    @field_validator("image_size")
    @classmethod
    def _size(cls, value):
        if value is not None and not 8 <= value <= 1024:
            raise ValueError(f"must be between 8 and 1024 px, got {value}")
        return value


class ModelConfig(_Strict):
    """Which network, from which weights."""

    name: str = "medcnn_s"
    pretrained: bool = False
    weights: str | None = None
    attention: str = "none"
    drop_rate: float = Field(default=0.1, ge=0.0, lt=1.0)


class OptimConfig(_Strict):
    """How the network learns."""

    mode: Mode = "full"
    freeze_stages: int | None = None
    epochs: int = Field(default=15, ge=1)
    batch_size: int = Field(default=64, ge=1)
    optimizer: Optimizer = "adamw"
    lr: float = Field(default=3e-3, gt=0)
    backbone_lr_mult: float = Field(default=0.1, gt=0, le=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    schedule: Schedule = "onecycle"
    warmup_epochs: float = Field(default=1.0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    class_weights: Literal["auto", "none"] = "auto"
    balanced_sampler: bool = False
    augment: Augment = "auto"
    augment_strength: float = Field(
        default=1.0, ge=0, le=3, description="scales the augmentation jitter (0: none)"
    )
    monitor: Monitor = "auroc"
    patience: int = Field(default=6, ge=1)
    amp: bool = True
    workers: int | None = None
    log: Literal["none", "tensorboard", "mlflow"] = "none"


class TrainConfig(_Strict):
    """Everything ``medsight train`` needs; saved whole as the run's ``config.yaml``."""

    task: str = Field(default="classify", description="kind of problem (medsight.tasks): classify")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    out: str = "runs/run"
    seed: int = 0

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Read and validate a YAML file; errors name the field and the value."""
        return cls.parse(read_yaml(path, "config file") or {}, origin=str(path))

    @classmethod
    def parse(cls, data: dict[str, Any], origin: str = "config") -> TrainConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{origin}: {explain_validation(exc)}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with dotted keys replaced (``{"optim.lr": 0.01}``); None values are ignored."""
        data = self.model_dump(mode="json")
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        return TrainConfig.parse(data, origin="options")


def read_yaml(path: str | Path, what: str = "file") -> Any:
    """Parse a YAML file; a missing file or bad YAML is a ConfigError naming the path."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None


def explain_validation(exc: ValidationError) -> str:
    """A pydantic error as one line naming each field, the problem and the value received."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"])
        received = error.get("input")
        shown = f" (got {received!r})" if not isinstance(received, dict) else ""
        parts.append(f"{where}: {error['msg']}{shown}")
    return "; ".join(parts)
