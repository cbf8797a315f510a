"""The run directory: the contract between training and everything after it.

``runs/<name>/`` holds the resolved ``config.yaml``, the weights (``model.safetensors``) and the
architecture (``model.json``), ``preprocess.json``, ``classes.json``, ``history.csv``,
``splits.csv`` and ``versions.json``. Files are written atomically (temporary file, then
rename), so a crash never leaves a half-written run that looks complete.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from medsight.config import TrainConfig
from medsight.data.transforms import Preprocess
from medsight.errors import ConfigError

CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
MODEL = "model.json"
PREPROCESS = "preprocess.json"
CLASSES = "classes.json"
HISTORY = "history.csv"
SPLITS = "splits.csv"
VERSIONS = "versions.json"
CALIBRATION = "calibration.json"
METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
CHECKPOINTS = "checkpoints"
# Written by the later stages and workflows into a run (or a workflow's parent folder).
REPORT = "report.html"
LOCALISATION = "localisation.json"
EXPLANATIONS = "explanations.jsonl"
ENSEMBLE = "ensemble.json"
CV_JSON = "cv.json"
CV_HTML = "cv.html"
CV_OOF = "oof_predictions.csv"
TUNE_JSON = "tune.json"
TUNE_HTML = "tune.html"

#: Class names that usually mean "nothing found": the other class is the urgent one for triage.
_BENIGN_NAMES = ("normal", "negative", "healthy", "benign", "no_finding", "no finding", "0")


def prepare_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the run folder; an existing run is refused unless ``overwrite`` or ``resume``."""
    path = Path(path)
    if resume:
        if not (path / CHECKPOINTS / "last.pt").exists():
            raise ConfigError(f"{path}: nothing to resume (no {CHECKPOINTS}/last.pt)")
        return path
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"{path} already exists; pass --overwrite to replace it, --resume to continue "
                "it, or choose another --out"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp)`` then rename ``tmp`` onto ``path`` (same folder, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run files are meant to be shared and served
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, data: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def write_text(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def save_weights(path: str | Path, state_dict: dict) -> None:
    """Save a state dict as safetensors (contiguous CPU tensors), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))


def load_weights(path: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def guess_positive_class(classes: list[str]) -> str:
    """The class triage treats as most urgent: for two classes the one not named like 'normal'."""
    if len(classes) == 2:
        lowered = [c.lower() for c in classes]
        if lowered[0] in _BENIGN_NAMES and lowered[1] not in _BENIGN_NAMES:
            return classes[1]
        if lowered[1] in _BENIGN_NAMES and lowered[0] not in _BENIGN_NAMES:
            return classes[0]
    for hint in ("malignan", "cancer", "tumo", "pneumonia", "abnormal", "positive", "lesion"):
        for name in classes:
            if hint in name.lower():
                return name
    return classes[-1]


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("medsight", "torch", "torchvision", "timm", "numpy", "pandas", "scikit-learn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


@dataclass
class Run:
    """A finished (or resumable) training run, loaded from its directory."""

    path: Path
    config: TrainConfig
    classes: list[str]
    positive_class: str
    preprocess: Preprocess
    model_config: dict
    #: The run's task by name (:func:`medsight.tasks.get_task` turns it into the object):
    #: ``model.json``'s ``task``, else ``config.yaml``'s, else ``"classify"`` (older runs).
    task: str = "classify"

    @classmethod
    def load(cls, path: str | Path) -> Run:
        path = Path(path)
        missing = [f for f in (CONFIG, MODEL, PREPROCESS, CLASSES) if not (path / f).exists()]
        if not path.is_dir() or missing:
            what = "is not a folder" if not path.is_dir() else f"lacks {', '.join(missing)}"
            raise ConfigError(f"{path} is not a medsight run: it {what}")
        classes = json.loads((path / CLASSES).read_text())
        config = TrainConfig.from_yaml(path / CONFIG)
        model_config = json.loads((path / MODEL).read_text())
        return cls(
            path=path,
            config=config,
            classes=list(classes["classes"]),
            positive_class=classes["positive"],
            preprocess=Preprocess.load(path / PREPROCESS),
            model_config=model_config,
            task=model_config.get("task") or config.task or "classify",
        )

    def load_model(self, weights: str = WEIGHTS):
        """The trained network in eval mode, exactly as saved."""
        from medsight.models import model_from_config

        model = model_from_config(self.model_config)
        model.load_state_dict(load_weights(self.path / weights))
        return model.eval()

    def calibration(self) -> dict | None:
        """The fitted calibration (``calibration.json``), or None when the run has none."""
        path = self.path / CALIBRATION
        return json.loads(path.read_text()) if path.exists() else None

    def history(self) -> pd.DataFrame:
        return pd.read_csv(self.path / HISTORY)

    def splits(self) -> pd.DataFrame:
        return pd.read_csv(self.path / SPLITS, dtype={"patient_id": str})

    def is_own_data(self, data: str | Path | None) -> bool:
        """Whether ``data`` (None: yes) is the collection this run was trained on."""
        if data is None:
            return True
        try:
            return Path(data).resolve() == Path(self.config.data.path).resolve()
        except (OSError, TypeError):
            return False

    def load_data(self, data: str | Path | None = None) -> pd.DataFrame:
        """The run's own data with the splits it was trained with (``data`` None or the run's
        own path), or another collection as its reader returns it.

        Samples of the run's data that ``splits.csv`` does not list get no split.
        """
        from medsight.data.sources import load_samples

        if not self.is_own_data(data):
            return load_samples(data)
        table = load_samples(self.config.data.path, options=self.config.data)
        if (self.path / SPLITS).exists():
            assigned = self.splits().set_index("sample_id")["split"]
            table = table.assign(split=table["sample_id"].map(assigned))
        return table
