"""Configuration for every step, as pydantic models: validated once, saved as YAML in the run.

A run's ``config.yaml`` is a :class:`TrainConfig` dumped in full (every default resolved), so
``medsight train --config RUN/config.yaml`` reproduces it. CLI flags override file values.

The fields are also the single source of ``medsight train``'s options: a field marked
``json_schema_extra=flag("--batch-size")`` is that flag, its ``description`` the flag's help and
its ``Literal`` (or ``choices``) the values the flag accepts (:mod:`medsight.cli.options` reads
them). Every field, marked or not, is reachable as ``--set optim.warmup_epochs=0.5``.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medsight.errors import ConfigError

Mode = Literal["features", "finetune", "full", "scratch"]
Optimizer = Literal["adam", "adamw", "rmsprop", "sgd"]
Schedule = Literal["cosine", "onecycle", "plateau", "none"]
Augment = Literal["auto", "xray", "ct", "mri", "derm", "histo", "none"]
Monitor = Literal["auroc", "accuracy", "balanced_accuracy", "loss", "map50", "map"]
#: Attention blocks on a network's features (:mod:`medsight.models.attention` builds them).
Attention = Literal["none", "se", "cbam", "self", "diff", "sparse"]
#: How the classifier head pools the last feature map (:data:`medsight.models.zoo.POOLS`).
Pool = Literal["auto", "avg", "attention"]
Logger = Literal["none", "tensorboard", "mlflow"]

#: Collection layouts the readers know (:func:`medsight.data.sources.load_samples`).
READ_FORMATS: tuple[str, ...] = (
    "folder",
    "zip",
    "csv",
    "npz",
    "dicom",
    "nifti",
    "coco",
    "yolo",
    "voc",
    "boxes",
)


def flag(name: str, *, choices: tuple[str, ...] | None = None, show_default: bool = True) -> dict:
    """Field metadata that makes the field a ``medsight train`` option.

    ``name`` is the flag as typed (``"--lr"``, ``"--cache/--no-cache"`` for an on/off pair);
    ``choices`` lists the values of a ``str`` field whose values come from a registry rather
    than a ``Literal``; ``show_default=False`` keeps the field's default out of the help (where
    the command line has its own default).

    >>> flag("--batch-size")
    {'cli': '--batch-size'}
    """
    extra: dict[str, Any] = {"cli": name}
    if choices is not None:
        extra["choices"] = choices
    if not show_default:
        extra["show_default"] = False
    return extra


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|m|s)")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration written with units: ``90s``, ``10m``, ``1.5h``, ``1h30m``.

    A number needs its unit (``h``, ``m`` or ``s``); zero, negative and unreadable values are a
    ValueError naming the value.

    >>> parse_duration("1.5h"), parse_duration("10m"), parse_duration("1h30m")
    (5400.0, 600.0, 5400.0)
    """
    cleaned = str(text).strip().lower().replace(" ", "")
    parts = list(_DURATION.finditer(cleaned))
    if cleaned.startswith("-") or cleaned.lstrip("+-.0") in ("", "s", "m", "h"):
        raise ValueError(f"time {text!r} is not a positive duration; give one like 10m")
    if "".join(p.group(0) for p in parts) != cleaned:
        hint = "add a unit (s, m or h): " if _DURATION.fullmatch(cleaned + "s") else ""
        raise ValueError(
            f"time {text!r} is not a duration; {hint}write it like 90s, 10m, 1.5h or 1h30m"
        )
    seconds = sum(float(p.group(1)) * _SECONDS[p.group(2)] for p in parts)
    if seconds <= 0:
        raise ValueError(f"time {text!r} is not a positive duration; give one like 10m")
    return seconds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ReadOptions(_Strict):
    """How to read a collection (``medsight.data.sources.load_samples``); every field has the
    default people expect."""

    format: str | None = Field(
        default=None,
        description="reader to use (detected from the path)",
        json_schema_extra=flag("--format", choices=READ_FORMATS),
    )
    allow_outside: bool = Field(
        default=False,
        description="let manifest paths point outside the CSV's folder",
        json_schema_extra=flag("--allow-outside"),
    )
    path_column: str = "path"
    label_column: str = "label"
    labels: str | None = Field(
        default=None,
        description="multi-label CSV: its 0/1 finding columns, comma-separated "
        "(1 present, 0 absent, -1 or blank uncertain), or 'all' for every column that is not "
        "a path, id, split or known metadata column",
        json_schema_extra=flag("--labels"),
    )
    findings_column: str | None = Field(
        default=None,
        description="multi-label CSV: a column of findings joined by | (NIH ChestX-ray14's "
        "'Finding Labels', read without this flag when there is no label column)",
        json_schema_extra=flag("--findings-column"),
    )
    uncertain: Literal["ignore", "zeros", "ones"] = Field(
        default="ignore",
        description="uncertain multi-label entries (-1, blank): left out of the loss and the "
        "metrics, or counted as absent (zeros) or present (ones)",
        json_schema_extra=flag("--uncertain"),
    )
    patient_column: str | None = None
    split_column: str | None = None
    nifti_axis: int = Field(
        default=2,
        ge=0,
        le=2,
        description="slice axis of 3-D NIfTI volumes (RAS+)",
        json_schema_extra=flag("--axis"),
    )
    nifti_slice: int | None = Field(
        default=None,
        ge=0,
        description="slice index of 3-D NIfTI volumes (default: middle)",
        json_schema_extra=flag("--slice"),
    )
    dims: Literal["auto", "2", "3"] = Field(
        default="auto",
        description="2: images (a middle slice of each volume); 3: whole volumes (NIfTI, DICOM "
        "series: one sample per SeriesInstanceUID, MedMNIST3D); auto: 3 for MedMNIST3D, 3-D "
        "NIfTI without --slice/--axis and DICOM trees of CT/MR series (slices placed in "
        "space), else 2",
        json_schema_extra=flag("--dims"),
    )

    @field_validator("dims", mode="before")
    @classmethod
    def _dims_text(cls, value):
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    volume: int | None = Field(
        default=None,
        ge=0,
        description="which volume of 4-D NIfTI files (default: the first, said in a warning)",
        json_schema_extra=flag("--volume"),
    )


class DataConfig(ReadOptions):
    """Where the images are and how to read and split them (the reader's options included)."""

    path: str = Field(description="dataset path (any reader)", json_schema_extra=flag("--data"))
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    image_size: int | None = Field(
        default=None,
        description="input side in px; default: native size up to 128, else model",
        json_schema_extra=flag("--image-size"),
    )
    channels: Literal["auto", 1, 3] = "auto"
    window: tuple[float, float] | None = None
    spacing: tuple[float, float, float] | None = Field(
        default=None,
        description="3-D: resample volumes to this voxel spacing in mm (X, Y, Z), then pad or "
        "crop to the input size; default: resize each volume to the input size",
    )
    slices: int | None = Field(
        default=None,
        ge=1,
        description="2.5-D: feed this many adjacent axial slices of each volume (odd; 1: the "
        "middle slice) as channels to a 2-D network, e.g. an ImageNet backbone with 3",
        json_schema_extra=flag("--slices"),
    )
    intensity: Literal[
        "auto", "ct-soft-tissue", "ct-lung", "ct-bone", "ct-brain", "percentile", "uint8", "minmax"
    ] = Field(
        default="auto",
        description="3-D intensity scaling: a CT window preset, percentile (MR), uint8 (/255) "
        "or minmax; auto: uint8 for 8-bit MedMNIST3D, ct-soft-tissue for CT series and "
        "volumes in Hounsfield units, else percentile",
        json_schema_extra=flag("--intensity"),
    )
    tilt: Literal["refuse", "correct"] = Field(
        default="refuse",
        description="3-D: a DICOM series acquired with gantry tilt (slices stacked off their "
        "normal): refuse it by name, or correct it by resampling onto an orthogonal grid "
        "(recorded in preprocess.json, so prediction does the same)",
        json_schema_extra=flag("--tilt"),
    )
    cache: bool = Field(
        default=True,
        description="keep decoded images of up to 128 px in memory after the first epoch",
        json_schema_extra=flag("--cache/--no-cache"),
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

    name: str = Field(
        default="auto",
        description="network name (medsight models lists them; any timm name works); auto: "
        "chosen from the data (medsight.training.recipe)",
        json_schema_extra=flag("--model"),
    )
    pretrained: bool = Field(
        default=False,
        description="start from ImageNet weights",
        json_schema_extra=flag("--pretrained/--no-pretrained"),
    )
    weights: str | None = Field(
        default=None,
        description="start from a state-dict file (.safetensors, .pth) or a run directory",
        json_schema_extra=flag("--weights"),
    )
    attention: Attention = Field(
        default="none",
        description="attention block on the network's features",
        json_schema_extra=flag("--attention"),
    )
    pool: Pool = Field(
        default="auto",
        description="how the head pools the last feature map: avg, or attention (a learnt query"
        " of the attention's kind; its weights are the model's attention map); auto: attention"
        " for a custom CNN with self, diff or sparse attention, else avg",
        json_schema_extra=flag("--pool"),
    )
    drop_rate: float = Field(default=0.1, ge=0.0, lt=1.0)


class OptimConfig(_Strict):
    """How the network learns."""

    mode: Mode = Field(
        default="full",
        description="transfer mode: features (frozen backbone, cached embeddings), finetune "
        "(--freeze-stages, lower backbone LR), full, scratch",
        json_schema_extra=flag("--mode"),
    )
    freeze_stages: int | None = Field(
        default=None,
        description="stages frozen in finetune mode",
        json_schema_extra=flag("--freeze-stages"),
    )
    epochs: int | Literal["auto"] = Field(
        default="auto",
        description="training epochs; auto: about 60,000 images seen, 1 to 20 passes "
        "(with --time: as many as fit, a number is then a cap)",
        json_schema_extra=flag("--epochs"),
    )
    time: str | None = Field(
        default=None,
        description="wall-clock budget, e.g. 90s, 10m, 1.5h: the epochs are planned to fit and "
        "training ends in time",
        json_schema_extra=flag("--time"),
    )
    batch_size: int | Literal["auto"] = Field(
        default="auto",
        description="images per step; auto: 64, or the training set when smaller (the run's "
        "config.yaml records the number)",
        json_schema_extra=flag("--batch-size"),
    )
    optimizer: Optimizer = Field(
        default="adamw", description="optimiser", json_schema_extra=flag("--optimizer")
    )
    lr: float | Literal["auto"] = Field(
        default="auto",
        description="learning rate (head); auto: 3e-3, for a detector 3e-4 (the run's "
        "config.yaml records the number)",
        json_schema_extra=flag("--lr"),
    )
    backbone_lr_mult: float = Field(default=0.1, gt=0, le=1)
    weight_decay: float = Field(
        default=1e-4, ge=0, description="weight decay", json_schema_extra=flag("--weight-decay")
    )
    schedule: Schedule = Field(
        default="onecycle",
        description="learning-rate schedule",
        json_schema_extra=flag("--schedule"),
    )
    warmup_epochs: float = Field(default=1.0, ge=0)
    label_smoothing: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="label smoothing of the cross-entropy",
        json_schema_extra=flag("--label-smoothing"),
    )
    ema: float = Field(
        default=1.0,
        ge=0,
        le=100,
        description="validate and keep an exponential moving average of the weights, over "
        "about this many epochs of steps (0: the weights as trained)",
        json_schema_extra=flag("--ema"),
    )
    loss: Literal["auto", "focal"] = Field(
        default="auto",
        description="auto: cross-entropy (classes), binary cross-entropy weighted per finding "
        "(findings); focal: sigmoid focal loss for findings (torchvision's, alpha 0.25, "
        "gamma 2)",
        json_schema_extra=flag("--loss"),
    )
    class_weights: Literal["auto", "none"] = Field(
        default="auto",
        description="weight the loss by inverse class frequency (auto) or not",
        json_schema_extra=flag("--class-weights"),
    )
    balanced_sampler: bool = Field(
        default=False,
        description="class-balanced sampler",
        json_schema_extra=flag("--balanced/--no-balanced"),
    )
    augment: Augment = Field(
        default="auto",
        description="augmentation recipe (X-rays are never flipped left-right)",
        json_schema_extra=flag("--augment"),
    )
    augment_strength: float = Field(
        default=1.0,
        ge=0,
        le=3,
        description="scales the augmentation jitter (0: none, at most 3)",
        json_schema_extra=flag("--augment-strength"),
    )
    monitor: Monitor = Field(
        default="auroc",
        description="validation metric for early stopping and the kept checkpoint "
        "(detection: map50 or map; auroc means map50 there)",
        json_schema_extra=flag("--monitor"),
    )
    patience: int = Field(
        default=6,
        ge=1,
        description="early stopping: epochs without a better validation score",
        json_schema_extra=flag("--patience"),
    )
    val_checks: int = Field(
        default=8,
        ge=1,
        description="validations per run at least, when they are more than one per epoch",
    )
    val_mid_epoch_above: int = Field(
        default=10_000,
        ge=1,
        description="training sets larger than this (or runs of 3 epochs or fewer) also "
        "validate within epochs",
    )
    val_subsample: int = Field(
        default=2_000,
        ge=1,
        description="validations within an epoch use a seeded subsample of this many "
        "validation images when the split is larger; each epoch ends on the whole split",
    )
    workers: int | None = Field(
        default=None,
        description="DataLoader workers (default: fitted to the cache and the cores)",
        json_schema_extra=flag("--workers"),
    )
    log: Logger = Field(
        default="none",
        description="experiment logger (tensorboard, mlflow: when that package is installed)",
        json_schema_extra=flag("--log"),
    )

    @field_validator("epochs", "batch_size", mode="before")
    @classmethod
    def _count_or_auto(cls, value, info):
        if value == "auto":
            return value
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and value.strip().isdigit():
            number = int(value)
        if number is None or number < 1:
            raise ValueError(f"must be a whole number of at least 1 or 'auto', got {value!r}")
        return number

    @field_validator("lr", mode="before")
    @classmethod
    def _rate_or_auto(cls, value):
        if value == "auto":
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if isinstance(value, bool) or number is None or not number > 0 or number == float("inf"):
            raise ValueError(f"must be a positive number or 'auto', got {value!r}")
        return number

    @field_validator("time")
    @classmethod
    def _duration(cls, value):
        if value is not None:
            parse_duration(value)
        return value


class TrainConfig(_Strict):
    """Everything ``medsight train`` needs; saved whole as the run's ``config.yaml``."""

    task: str = Field(
        default="auto",
        description="kind of problem, by its medsight.tasks name (classify, multilabel); auto: "
        "from the data (several findings per image: multilabel)",
        json_schema_extra=flag("--task"),
    )
    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    out: str = Field(
        default="runs/run",
        description="run directory to create (default: runs/<data name>)",
        json_schema_extra=flag("--out", show_default=False),
    )
    seed: int = Field(
        default=0,
        description="random seed: splits, initialisation and sampling",
        json_schema_extra=flag("--seed"),
    )
    device: str = Field(
        default="auto",
        description="where to train: auto (CUDA when a GPU is present, else CPU), cpu, cuda, "
        "cuda:N or mps; under torchrun each process takes its local rank's GPU",
        json_schema_extra=flag("--device"),
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="arithmetic precision: auto (bf16 autocast on GPUs that have it, fp16 with "
        "loss scaling on older ones, fp32 on the CPU), fp32, bf16 or fp16; config.yaml records "
        "what auto chose",
        json_schema_extra=flag("--precision"),
    )

    @model_validator(mode="before")
    @classmethod
    def _amp_is_precision(cls, value):
        # Runs before --precision kept `optim.amp: true|false`: read it as auto or fp32.
        if isinstance(value, dict) and isinstance(value.get("optim"), dict):
            optim = value["optim"]
            if "amp" in optim:
                optim = dict(optim)
                amp = optim.pop("amp")
                value = {**value, "optim": optim}
                value.setdefault("precision", "auto" if amp else "fp32")
        return value

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

    @classmethod
    def field_keys(cls) -> list[str]:
        """Every dotted field name, sections included (``"optim"``, ``"optim.lr"``, ...)."""
        return _keys(cls)

    def with_overrides(self, overrides: dict[str, Any], *, keep_none: bool = False) -> TrainConfig:
        """A copy with dotted keys replaced (``{"optim.lr": 0.01}``).

        None values are ignored unless ``keep_none`` (then they set the field to None); a key
        that is no field is a ConfigError naming it, the closest field names and the valid ones.
        """
        data = self.model_dump(mode="json")
        for dotted, value in overrides.items():
            if value is None and not keep_none:
                continue
            _check_key(dotted)
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        return TrainConfig.parse(data, origin="options")


def _check_key(dotted: str) -> None:
    known = TrainConfig.field_keys()
    if dotted in known:
        return
    sections = {k.rpartition(".")[0] for k in known}
    section, _, leaf = dotted.rpartition(".")
    if section not in sections:
        section, leaf = "", dotted
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == section]
    close = [k for k in siblings if k.startswith(leaf)] if section else []
    close += difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.6) if section else []
    close = [f"{section}.{k}" for k in dict.fromkeys(close)][:3]
    close = close or [k for k in known if k.endswith(f".{dotted}")]  # "lr" → "optim.lr"
    close = close or difflib.get_close_matches(dotted, known, n=3)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    where = f" in {section}" if section else ""
    raise ConfigError(
        f"unknown config key {dotted!r}; {hint}valid keys{where}: {', '.join(siblings)}"
    )


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        keys.append(prefix + name)
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            keys += _keys(info.annotation, f"{prefix}{name}.")
    return keys


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
