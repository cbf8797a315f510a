"""The run directory: the contract between training and everything after it.

``runs/<name>/`` holds the resolved ``config.yaml``, the weights (``model.safetensors``) and the
architecture (``model.json``), ``preprocess.json``, ``classes.json``, ``history.csv``,
``splits.csv`` and ``versions.json``. Files are written atomically (temporary file, then
rename), so a crash never leaves a half-written file; a new run is built in a hidden folder
beside its place and moved there at its first checkpoint (:class:`NewRun`), so a run folder is
either resumable or not there. What interrupted writers leave behind (temporary files, unfinished
new runs) is removed when a run is next created, resumed or loaded (:func:`clean_stale`).

Text files are UTF-8, with the file names of the data written back as the bytes they are on
disk: a name that is not valid UTF-8 (Python holds it with surrogate escapes, like ``os.listdir``)
goes to ``splits.csv`` and ``predictions.csv`` unchanged, and :meth:`Run.splits` reads it back
to the same string, so the run's own data still finds its splits.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from medsight.config import TrainConfig
from medsight.data.transforms import Preprocess, load_preprocess
from medsight.errors import ConfigError, MedsightError

if TYPE_CHECKING:
    from medsight.data.volumes import VolumePreprocess

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


#: How the text files of a run are encoded: names that are not UTF-8 keep their bytes.
ENCODING, ENCODING_ERRORS = "utf-8", "surrogateescape"
#: What an interrupted writer leaves is removed once it is older than this (seconds) and the
#: process that wrote it is gone (or, for temporary files of older versions, an hour).
STALE_AFTER = 60.0
_LEGACY_STALE_AFTER = 3600.0
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp[A-Za-z0-9_]*$")
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)-[A-Za-z0-9_]+$")
#: mkstemp's names before the writer's pid was part of them: ``.last.pt.k2j4_a9z``.
_LEGACY_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}$")


class WriteError(MedsightError, OSError):
    """A file could not be written (disk full, read-only folder...): one line naming the file,
    what failed and the system's reason. Also an :class:`OSError`, with its ``errno``."""

    def __init__(self, path: str | Path, exc: OSError, what: str = "write"):
        code = exc.errno
        reason = exc.strerror or str(exc)
        name = errno.errorcode.get(code, "") if code is not None else ""
        hint = _WRITE_HINTS.get(name, "")
        message = f"cannot {what} {path}: {reason}{f' ({name})' if name else ''}{hint}"
        super().__init__(code, message, str(path))
        self.message, self.path, self.what, self.cause = message, Path(path), what, exc

    def __str__(self) -> str:
        return self.message


_WRITE_HINTS = {
    "ENOSPC": "; free space on that disk or write elsewhere",
    "EDQUOT": "; the disk quota is used up: free space or write elsewhere",
    "EACCES": "; the folder is not writable by this user: choose another place",
    "EPERM": "; the folder is not writable by this user: choose another place",
    "EROFS": "; that file system is read-only: choose another place",
}


def prepare_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the run folder; an existing run is refused unless ``overwrite`` or ``resume``.

    Training builds a new run with :class:`NewRun` instead, which replaces nothing until the
    new run has its first checkpoint."""
    path = Path(path)
    if resume:
        _check_resumable(path)
        clean_stale(path)
        clean_stale(path / CHECKPOINTS)
        return path
    _refuse_existing(path, overwrite)
    clean_stale(path.parent)
    if path.exists() and overwrite:
        shutil.rmtree(path)
    _mkdir(path)
    return path


def _check_resumable(path: Path) -> None:
    if (path / CHECKPOINTS / "last.pt").exists():
        return
    if not path.exists():
        raise ConfigError(
            f"{path}: nothing to resume (no such run; a run stopped before its first "
            "checkpoint leaves none): start it again without --resume"
        )
    raise ConfigError(f"{path}: nothing to resume (no {CHECKPOINTS}/last.pt)")


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(
            f"{path} already exists; pass --overwrite to replace it, --resume to continue "
            "it, or choose another --out"
        )
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file, not a run folder; choose another --out")


def _mkdir(path: Path) -> None:
    blocking = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        what = "it is a file" if blocking == path else f"{blocking} is a file, not a folder"
        cause = OSError(errno.ENOTDIR, what)
        raise WriteError(path, cause, "create the folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(path, exc, "create the folder") from None


class NewRun:
    """A new run directory that appears only once it can be resumed.

    Its files are written to :attr:`path`, a hidden folder beside :attr:`final`
    (``runs/.name.partial-<pid>-<random>/name``: the run keeps its name, which loggers use);
    :meth:`commit` (training calls it after the first checkpoint) moves it into place,
    replacing an existing run only then, when ``overwrite``. Used as a context manager, it
    is discarded when the block fails before the commit, and committed when it ends normally:

    >>> with NewRun("runs/p") as new:                   # doctest: +SKIP
    ...     write_json(new.path / MODEL, {...}); new.commit()
    """

    def __init__(self, final: str | Path, *, overwrite: bool = False):
        self.final = Path(final)
        self.overwrite = overwrite
        _refuse_existing(self.final, overwrite)
        _mkdir(self.final.parent)
        clean_stale(self.final.parent)
        try:
            holder = tempfile.mkdtemp(
                prefix=f".{self.final.name}.partial-{os.getpid()}-", dir=self.final.parent
            )
        except OSError as exc:
            raise WriteError(self.final.parent, exc, "create a run in") from None
        self._holder = Path(holder)
        self.path = self._holder / self.final.name
        self.path.mkdir()
        self.committed = False

    def commit(self) -> Path:
        """Move the run into place (replacing an old one only now, when ``overwrite``)."""
        if self.committed:
            return self.final
        final = self.final
        _refuse_existing(final, self.overwrite)  # another process may have made it meanwhile
        aside = None
        try:
            if final.is_dir() and any(final.iterdir()):
                aside = self._holder / f".replaced-{final.name}"
                os.replace(final, aside)
            elif final.is_dir():
                final.rmdir()
            os.replace(self.path, final)
        except OSError as exc:
            if aside is not None and not final.exists():
                os.replace(aside, final)  # the old run stays as it was
            raise WriteError(final, exc, "move the new run to") from None
        self.committed = True
        shutil.rmtree(self._holder, ignore_errors=True)
        return final

    def discard(self) -> None:
        """Remove the unfinished run (nothing of it stays)."""
        shutil.rmtree(self._holder, ignore_errors=True)

    def __enter__(self) -> NewRun:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self.committed:
            return
        if kind is None:
            self.commit()
            return
        self.discard()
        if isinstance(exc, WriteError) and exc.path.is_relative_to(self.path):
            # name the file where the user will look for it, not the hidden folder
            where = self.final / exc.path.relative_to(self.path)
            raise WriteError(where, exc.cause, exc.what) from None


def clean_stale(folder: str | Path, *, now: float | None = None) -> list[Path]:
    """Remove what interrupted writers left in ``folder``: temporary files of
    :func:`write_atomic` and unfinished new runs (:class:`NewRun`) whose process is gone and
    that are older than :data:`STALE_AFTER`; returns what was removed. Never fails: a folder
    that cannot be read or written is left as it is."""
    folder = Path(folder)
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith("."):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
            if not _is_stale(entry.name, age):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


def _is_stale(name: str, age: float) -> bool:
    match = _TEMP.match(name) or _PARTIAL.match(name)
    if match:
        return age > STALE_AFTER and not _process_alive(int(match["pid"]))
    legacy = _LEGACY_TEMP.match(name)
    return bool(legacy) and legacy["name"] in _RUN_FILES and age > _LEGACY_STALE_AFTER


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # no safe liveness probe (os.kill would end it): age alone is not enough
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def write_atomic(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp)`` then rename ``tmp`` onto ``path`` (same folder, so atomic).

    An :class:`OSError` on the way (disk full, a read-only folder) becomes a
    :class:`WriteError` naming ``path``; the temporary file never stays behind, except when
    the process is killed, and then :func:`clean_stale` removes it later (its name holds the
    writer's pid: ``.last.pt.<pid>.tmp<random>``)."""
    path = Path(path)
    _mkdir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.tmp", dir=path.parent)
    except OSError as exc:
        raise WriteError(path, exc) from None
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run files are meant to be shared and served
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError(path, exc) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically as UTF-8; surrogate-escaped file names keep their bytes."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding=ENCODING, errors=ENCODING_ERRORS))


def save_weights(path: str | Path, state_dict: dict) -> None:
    """Save a state dict as safetensors (contiguous CPU tensors), atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    # Serialised here and written by Python, so a full disk is an OSError naming the file
    # (safetensors' own file writer reports it as an opaque SafetensorError).
    data = save(tensors)
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def load_weights(path: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def read_csv(path: str | Path, **kwargs) -> pd.DataFrame:
    """A CSV of a run, as :func:`write_text` wrote it (file names keep their bytes)."""
    from medsight.data.sources import python_strings

    with python_strings():
        return pd.read_csv(path, encoding=ENCODING, encoding_errors=ENCODING_ERRORS, **kwargs)


def read_predictions(path: str | Path) -> pd.DataFrame:
    """A run's ``predictions.csv``. Class names such as "NA" or "0" stay strings: no NA
    guessing, ids and labels as text."""
    return read_csv(
        path, dtype={"sample_id": str, "label": str, "predicted": str}, keep_default_na=False
    )


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


def _known_task(name: str | None) -> str:
    """A config's task as a run records it (runs from before tasks, or ``auto`` never
    resolved, are classification runs)."""
    return name if name and name != "auto" else "classify"


@dataclass
class Run:
    """A finished (or resumable) training run, loaded from its directory."""

    path: Path
    config: TrainConfig
    classes: list[str]
    positive_class: str | None  # None: a multi-label run (each finding has its own threshold)
    #: :class:`~medsight.data.transforms.Preprocess`, or for a 3-D run (``dims`` 3)
    #: :class:`~medsight.data.volumes.VolumePreprocess`.
    preprocess: Preprocess | VolumePreprocess
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
        clean_stale(path)
        clean_stale(path / CHECKPOINTS)
        classes = json.loads((path / CLASSES).read_text())
        config = TrainConfig.from_yaml(path / CONFIG)
        model_config = json.loads((path / MODEL).read_text())
        return cls(
            path=path,
            config=config,
            classes=list(classes["classes"]),
            positive_class=classes.get("positive"),
            preprocess=load_preprocess(path / PREPROCESS),
            model_config=model_config,
            task=model_config.get("task") or _known_task(config.task),
        )

    @property
    def dims(self) -> int:
        """2 for an image model, 3 for a volume model (``model.json``'s ``dims``)."""
        return int(self.model_config.get("dims", 2))

    def load_model(self, weights: str = WEIGHTS):
        """The trained network in eval mode, exactly as saved (for a 3-D run, a
        :class:`~medsight.models.transfer.MedsightClassifier` taking ``(B, C, X, Y, Z)``)."""
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
        return read_csv(self.path / SPLITS, dtype={"sample_id": str, "patient_id": str})

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


#: The files of a run whose temporary files (older versions' names) :func:`clean_stale` knows.
_RUN_FILES = frozenset(
    (CONFIG, WEIGHTS, MODEL, PREPROCESS, CLASSES, HISTORY, SPLITS, VERSIONS, CALIBRATION)
    + (METRICS, PREDICTIONS, REPORT, LOCALISATION, EXPLANATIONS, ENSEMBLE, "last.pt")
    + (CV_JSON, CV_HTML, CV_OOF, TUNE_JSON, TUNE_HTML, "model.onnx", "model.torchscript.pt")
)
