"""``medsight tune``: hyperparameter search with Optuna (TPE sampling, median or Hyperband pruning).

A *search space* maps dotted :class:`~medsight.config.TrainConfig` fields to ranges or choices;
:data:`DEFAULT_SPACE` covers learning rate, weight decay, batch size, the model among a short
list, transfer mode and frozen stages, attention, augmentation strength and label smoothing.
A YAML file replaces it::

    optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a float range (log scale)
    optim.batch_size: [32, 64, 128]                     # choices
    model.freeze_stages: {low: 1, high: 3}              # an int range
    optim.epochs: 10                                    # a fixed value

Every trial is an ordinary training run (``<out>-trials/<study>/trial_NNNN``) that reports its
validation metric each epoch, so unpromising trials are pruned early. With ``storage`` (any
SQLAlchemy URL: ``sqlite:///tune.db``, ``postgresql://…``) the study survives the process:
the same command resumes it, and several processes — on one machine or many — tune it
together. The best trial's run is copied (or retrained, when it ran elsewhere) to ``out``,
with ``tune.json`` and ``tune.html`` (optimisation history, parameter importances) beside it.
"""

from __future__ import annotations

import difflib
import math
import os
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsight import runs
from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, read_yaml
from medsight.data.sources import load_samples
from medsight.databases import driver_url, error_reason, masked_url
from medsight.errors import ConfigError, MedsightError, TrainingError
from medsight.events import (
    BestTrialRetrained,
    Reporter,
    StudyResumed,
    TrialFailed,
    TrialRow,
    TrialsTable,
    TuningEnd,
    silent,
)
from medsight.stats import format_number

METRICS = ("auroc", "accuracy", "balanced_accuracy", "loss")
PRUNERS = ("median", "hyperband", "none")

#: The search space used when no ``--space`` file is given.
DEFAULT_SPACE: dict[str, Any] = {
    "model.name": ["medcnn_lite", "medcnn_s", "medcnn_m", "mobilenet_v2", "tf_efficientnet_lite0"],
    "optim.mode": ["full", "finetune"],
    "optim.freeze_stages": {"low": 1, "high": 3},
    "model.attention": ["none", "se", "cbam", "diff"],
    "optim.lr": {"low": 3.0e-4, "high": 1.0e-2, "log": True},
    "optim.weight_decay": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
    "optim.batch_size": [32, 64, 128],
    "optim.augment_strength": {"low": 0.0, "high": 2.0},
    "optim.label_smoothing": {"low": 0.0, "high": 0.2},
}

#: Fields a search may not change: where the data is and where runs go.
_NOT_TUNABLE = {"data.path", "out", "data.folds", "data.fold", "optim.monitor", "optim.log"}
#: Parameters that only mean something for a network that starts from pretrained weights.
_TRANSFER_ONLY = {"optim.mode", "optim.freeze_stages"}
_SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig}


# --------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class Param:
    """One dimension of the search: ``kind`` is float, int, categorical or fixed."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    value: Any = None

    def suggest(self, trial):
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            step = int(self.step or 1)
            low, high = int(self.low), int(self.high)
            return trial.suggest_int(self.name, low, high, step=step, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def contains(self, value) -> bool:
        if self.kind == "fixed":
            return value == self.value
        if self.kind == "categorical":
            return value in self.choices
        return isinstance(value, (int, float)) and self.low <= value <= self.high


class SearchSpace:
    """An ordered set of :class:`Param`; build it with :meth:`from_dict` or :meth:`from_yaml`."""

    def __init__(self, params: list[Param]):
        if not params:
            raise ConfigError("the search space is empty: give at least one parameter")
        self.params = params

    @classmethod
    def default(cls) -> SearchSpace:
        return cls.from_dict(DEFAULT_SPACE, origin="default search space")

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        return cls.from_dict(read_yaml(path, "search space file"), origin=str(path))

    @classmethod
    def from_dict(cls, data: Mapping, origin: str = "search space") -> SearchSpace:
        """Validate every entry: known field, non-empty range, values the config accepts."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{origin}: expected a mapping of parameter: range, got {type(data).__name__}"
            )
        params = [_parse_param(str(name), spec, origin) for name, spec in data.items()]
        return cls(params)

    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def sample(self, trial, base: TrainConfig) -> TrainConfig:
        """The config of one trial: ``base`` with this space's values suggested by ``trial``."""
        from medsight.models import get_spec

        values: dict[str, Any] = {}
        by_name = {p.name: p for p in self.params}
        model_param = by_name.get("model.name")
        model = model_param.suggest(trial) if model_param else base.model.name
        values["model.name"] = model
        auto = model == "auto"  # the recipe picks the network (and its weights) from the data
        transfer = not auto and get_spec(model).family != "custom"
        if transfer and "model.pretrained" not in by_name:
            values["model.pretrained"] = True  # the listed ImageNet CNNs are meant to transfer
        for param in self.params:
            if param.name == "model.name" or (param.name in _TRANSFER_ONLY and not transfer):
                continue
            if param.name == "optim.freeze_stages" and values.get("optim.mode") != "finetune":
                continue
            values[param.name] = param.suggest(trial)
        if not transfer and not auto:
            values["optim.mode"] = "full" if base.optim.mode in ("features", "finetune") else None
            values["model.pretrained"] = False
        return base.with_overrides(values)

    def defaults_from(self, base: TrainConfig) -> dict[str, Any]:
        """The base config's values of this space's parameters, where the space allows them
        (the first trial runs them, so tuning starts from the recipe it should beat)."""
        data = base.model_dump(mode="json")
        chosen = {}
        for param in self.params:
            if param.kind == "fixed":
                continue
            section, _, field = param.name.partition(".")
            value = data.get(section, {}).get(field) if field else data.get(section)
            if param.name == "optim.lr" and value == "auto":
                from medsight.tasks import get_task

                value = get_task(base.task).default_lr  # the rate training would take
            if value is not None and param.contains(value):
                chosen[param.name] = value
        return chosen


def _parse_param(name: str, spec: Any, origin: str) -> Param:
    _check_name(name, origin)
    where = f"{origin}: {name}"
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, Mapping):
        param = Param(name, "fixed", value=spec)
    elif "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where} has no choices (an empty list); give at least one value")
        param = Param(name, "categorical", choices=tuple(choices))
    elif "value" in spec:
        param = Param(name, "fixed", value=spec["value"])
    elif "low" in spec and "high" in spec:
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise ConfigError(f"{where}: low and high must be numbers, got {low!r}, {high!r}")
        if low > high:
            raise ConfigError(f"{where} has an empty range: low {low} is above high {high}")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
        unknown = set(spec) - {"low", "high", "log", "step"}
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {sorted(unknown)}; use low, high, log, step"
            )
        is_int = isinstance(low, int) and isinstance(high, int) and _field_is_int(name)
        param = Param(
            name, "int" if is_int else "float", float(low), float(high), log, spec.get("step")
        )
    else:
        raise ConfigError(
            f"{where}: give a list of choices, {{low: …, high: …}} or a single fixed value"
        )
    _check_values(param, where)
    return param


def _check_name(name: str, origin: str) -> None:
    known = sorted(_tunable_fields())
    if name in _NOT_TUNABLE:
        raise ConfigError(f"{origin}: {name} cannot be tuned (it says where data and runs are)")
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(
            f"{origin}: unknown parameter {name!r}; {hint}parameters are TrainConfig fields "
            f"such as {', '.join(known[:6])}, …"
        )


def _tunable_fields() -> set[str]:
    fields = {"seed"}
    for section, model in _SECTIONS.items():
        fields |= {f"{section}.{name}" for name in model.model_fields}
    return fields - _NOT_TUNABLE


def _field_is_int(name: str) -> bool:
    section, _, field = name.partition(".")
    if section not in _SECTIONS:
        return True  # seed
    annotation = str(_SECTIONS[section].model_fields[field].annotation)
    return "int" in annotation and "float" not in annotation


def _check_values(param: Param, where: str) -> None:
    """Refuse values the config would refuse, now rather than in trial 17."""
    from medsight.models import get_spec

    base = TrainConfig(data=DataConfig(path="."))
    if param.kind in ("categorical", "fixed"):
        values = list(param.choices) if param.kind == "categorical" else [param.value]
    else:
        values = [param.low, param.high]
        if param.kind == "int":
            values = [int(v) for v in values]
    for value in values:
        try:
            base.with_overrides({param.name: value})
            if param.name == "model.name":
                get_spec(str(value))
        except ConfigError as exc:
            raise ConfigError(f"{where}: value {value!r} is not accepted ({exc})") from None


# --------------------------------------------------------------------------- storage


def _serialise_sqlite(engine) -> None:
    """Every transaction on ``engine`` starts with BEGIN IMMEDIATE (SQLAlchemy's recipe for
    pysqlite). SQLite ignores Optuna's SELECT ... FOR UPDATE, and pysqlite runs the SELECT
    outside any transaction, so two workers could both read an enqueued trial as waiting and
    both run it ("Cannot tell a COMPLETE trial"); taking the write lock first makes the read
    and the update one step."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's BEGIN below, not pysqlite's

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the hooks are not reused


def open_storage(url: str | None):
    """An Optuna storage for ``url`` (None: in memory). Fails with a clear message when the
    database cannot be opened; SQLite waits for a busy database instead of failing, and
    workers creating the tables of an empty database together (PostgreSQL) look again."""
    if url is None:
        return None
    import optuna
    import sqlalchemy.exc

    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    raced = ("locked", "exists", "duplicate key")
    last: Exception | None = None
    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(driver_url(url), engine_kwargs=kwargs)
            if url.startswith("sqlite"):
                _serialise_sqlite(storage.engine)
            return storage
        except sqlalchemy.exc.DBAPIError as exc:  # two workers creating tables at once
            last = exc
            if not any(word in str(exc) for word in raced):
                break
            time.sleep(0.5 * (attempt + 1))
        except Exception as exc:  # noqa: BLE001 - any driver error means "cannot open"
            last = exc
            break
    raise ConfigError(
        f"cannot open the study storage {masked_url(url)!r}: {error_reason(last, url)}. "
        "Give a database URL such as sqlite:///tune.db (a file in an existing folder) or "
        "postgresql://user@host/dbname"
    )


# --------------------------------------------------------------------------- tuning


def tune(
    base: TrainConfig,
    *,
    trials: int = 20,
    timeout_min: float | None = None,
    space: SearchSpace | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    metric: str = "auroc",
    pruner: str = "median",
    out: str | Path | None = None,
    overwrite: bool = False,
    live: bool = True,
    events: Reporter | None = None,
) -> dict:
    """Run (or continue) a study until it holds ``trials`` finished trials or ``timeout_min``
    passes, then put the best trial's run at ``out``; returns the ``tune.json`` summary.

    Trials already finished in ``storage`` count towards ``trials``, whichever process ran them.
    A running trial is not interrupted by the timeout. ``events`` hears of failed trials, the
    best trial and, with ``live``, the study's table after every epoch (:mod:`medsight.events`).
    """
    import optuna

    events = events or silent
    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r} is not known; choose one of: {', '.join(METRICS)}")
    if pruner not in PRUNERS:
        raise ConfigError(f"pruner {pruner!r} is not known; choose one of: {', '.join(PRUNERS)}")
    if trials < 1:
        raise ConfigError(f"trials must be at least 1, got {trials}")
    space = space or SearchSpace.default()
    out = Path(out or base.out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it or choose --out")
    study_name = study_name or f"medsight-{Path(base.data.path).stem}"
    base = base.with_overrides({"optim.monitor": metric})
    _check_data(base)
    trials_dir = out.with_name(out.name + "-trials") / _safe(study_name)
    direction = "minimize" if metric == "loss" else "maximize"

    # failed trials are reported in one line below, not as Optuna's logged tracebacks
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(
        study_name=study_name,
        storage=open_storage(storage),
        direction=direction,
        # parallel workers must not propose the same trials: seed only a private study
        sampler=optuna.samplers.TPESampler(seed=base.seed if storage is None else None),
        pruner=_pruner(pruner, _epochs_hint(base.optim.epochs)),
        load_if_exists=True,
    )
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"study {study_name!r} in {masked_url(storage or '')} optimises in the other "
            "direction; give another --study name"
        )
    if not study.trials:
        study.enqueue_trial(space.defaults_from(base), skip_if_exists=True)
        study.set_user_attr("metric", metric)
        study.set_user_attr("space", [p.name for p in space.params])

    state = {"trial": None, "epoch": 0, "value": None}

    def objective(trial) -> float:
        config = space.sample(trial, base).with_overrides(
            {"out": str(trials_dir / f"trial_{trial.number:04d}")}
        )
        trial.set_user_attr("config", config.model_dump(mode="json"))
        state.update(trial=trial.number, epoch=0, value=None)
        best = -math.inf if direction == "maximize" else math.inf

        def on_epoch(epoch: int, row: dict) -> None:
            nonlocal best
            key = f"val_{metric}"
            if key not in row:  # e.g. accuracy of a multi-label run, which has none
                validated = sorted(k[4:] for k in row if k.startswith("val_") and k != "val_images")
                raise ConfigError(
                    f"--metric {metric} is not validated by this run's task; choose one of: "
                    f"{', '.join(validated)}"
                )
            value = float("nan") if row[key] is None else float(row[key])
            if math.isnan(value):
                value = float(row.get("val_balanced_accuracy", math.nan))
            best = max(best, value) if direction == "maximize" else min(best, value)
            trial.report(value, epoch)
            state.update(epoch=epoch, value=best)
            refresh()
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch} ({metric} {value:.4f})")

        from medsight.training.trainer import train

        try:
            train(config, overwrite=True, show_progress=False, on_epoch=on_epoch)
        except optuna.TrialPruned:
            shutil.rmtree(config.out, ignore_errors=True)  # a pruned run is never used
            raise
        except (TrainingError, ConfigError) as exc:
            trial.set_user_attr("error", str(exc))
            shutil.rmtree(config.out, ignore_errors=True)
            events(TrialFailed(trial.number, str(exc)))
            raise
        return best

    def refresh(final: bool = False) -> None:
        if live and events is not silent:
            events(_trials_table(study, metric, state, trials, final=final))

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    stop_at_total = optuna.study.MaxTrialsCallback(trials, states=finished)
    already = len(study.get_trials(deepcopy=False, states=finished))
    if already:
        events(StudyResumed(study_name, already))
    started = time.perf_counter()
    refresh()
    try:
        if already < trials:
            study.optimize(
                objective,
                n_trials=trials - already,
                timeout=None if timeout_min is None else timeout_min * 60,
                callbacks=[stop_at_total, lambda *_: refresh()],
                catch=(TrainingError, ConfigError),
                gc_after_trial=True,
            )
    finally:
        state["trial"] = None
        refresh(final=True)
    elapsed = time.perf_counter() - started
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        errors = [t.user_attrs.get("error") for t in study.trials if t.user_attrs.get("error")]
        raise MedsightError(
            "no trial finished"
            + (f"; the first failure: {errors[0]}" if errors else " (all were pruned or failed)")
        )
    best_run, best_config = _finalize(study, out, events)
    summary = _summary(study, metric, storage, elapsed, best_run)
    runs.write_json(best_run / runs.TUNE_JSON, summary)
    runs.write_text(best_run / runs.TUNE_HTML, render_html(study, summary))
    best = summary["best"]
    events(
        TuningEnd(
            best["number"],
            metric,
            best["value"],
            best_run,
            best_run / runs.TUNE_HTML,
            best_config.to_yaml(),
        )
    )
    return summary


def _check_data(base: TrainConfig) -> None:
    """Read the data once before any trial, so a wrong path fails now, not in every trial;
    refuse data whose task the search space does not cover (boxes)."""
    from medsight.tasks import task_for

    table = load_samples(base.data.path, options=base.data)
    if task_for(base.task, table) == "detect":
        raise ConfigError(
            "medsight tune searches classifier recipes (networks, modes, learning rates); "
            "these data are boxes, which train one detector: use medsight train --task detect "
            "(its recipe fits the data), with --lr, --batch-size or --image-size to try others"
        )


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "study"


def _epochs_hint(epochs: int | str) -> int:
    """The epochs a trial runs, for the pruner: the number given, or for ``auto`` the most the
    rule makes (a trial's own count follows its training-set size)."""
    from medsight.training.budget import AUTO_MAX_EPOCHS

    return epochs if isinstance(epochs, int) else AUTO_MAX_EPOCHS


def _pruner(name: str, epochs: int):
    import optuna

    if name == "median":
        # the first epochs of a one-cycle schedule say little: judge from a quarter in
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(2, epochs // 4))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=max(epochs, 3))
    return optuna.pruners.NopPruner()


def _finalize(study, out: Path, events: Reporter) -> tuple[Path, TrainConfig]:
    """Copy the best trial's run to ``out`` (retrain it when its folder is not on this
    machine); the swap is a rename, so a concurrent worker never sees half a run.
    Returns ``out`` and the run's config."""
    from medsight.training.trainer import train

    best = study.best_trial
    config = TrainConfig.parse(best.user_attrs["config"], origin=f"trial {best.number}")
    source = Path(config.out)
    staging = out.with_name(f".{out.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    final_config = config.with_overrides({"out": str(out)})
    if (source / runs.WEIGHTS).exists() and (source / runs.CONFIG).exists():
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns("checkpoints", "features"))
    else:
        events(BestTrialRetrained(best.number))
        train(final_config.with_overrides({"out": str(staging)}), overwrite=True, events=events)
    runs.write_text(staging / runs.CONFIG, final_config.to_yaml())
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)
    return out, final_config


def _summary(study, metric: str, storage: str | None, elapsed: float, best_run: Path) -> dict:
    import optuna

    best = study.best_trial
    counts: dict[str, int] = {}
    rows = []
    for t in study.trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
        duration = t.duration.total_seconds() if t.duration is not None else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "epochs": len(t.intermediate_values),
                "seconds": duration,
                "params": t.params,
                "error": t.user_attrs.get("error"),
            }
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "importances will be equal" on tiny studies
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
            )
    except (RuntimeError, ValueError, ZeroDivisionError):  # too few trials or no variation
        importances = {}
    return {
        "study": study.study_name,
        "storage": masked_url(storage) if storage else "in memory",
        "metric": metric,
        "direction": study.direction.name.lower(),
        "counts": counts,
        "seconds_this_process": round(elapsed, 1),
        "best": {"number": best.number, "value": best.value, "params": best.params},
        "best_run": str(best_run),
        "importances": {k: float(v) for k, v in importances.items()},
        "trials": rows,
    }


def _trials_table(study, metric: str, state: dict, target: int, final: bool) -> TrialsTable:
    """The study's latest trials; the running one with its best value so far."""
    trials = study.get_trials(deepcopy=False)
    done = sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    try:
        best_number = study.best_trial.number
    except ValueError:
        best_number = None
    rows = []
    for t in trials[-12:]:
        value, epochs = t.value, len(t.intermediate_values)
        if t.state.name == "RUNNING" and state.get("trial") == t.number:
            value, epochs = state.get("value"), state.get("epoch")
        rows.append(
            TrialRow(
                number=t.number,
                state=t.state.name.lower(),
                value=value,
                epochs=epochs,
                seconds=t.duration.total_seconds() if t.duration is not None else None,
                params=dict(t.params),
                best=t.number == best_number,
            )
        )
    return TrialsTable(study.study_name, metric, done, target, tuple(rows), final=final)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- HTML


def render_html(study, summary: dict) -> str:
    """``tune.html``: optimisation history, parameter importances, best config, all trials,
    from ``templates/tune.html.j2``."""
    from medsight.evaluation.report import render_page

    history, importance = _figures(study, summary)
    best = summary["best"]
    return render_page(
        "tune.html.j2",
        study=summary["study"],
        metric=summary["metric"],
        direction=summary["direction"],
        storage=summary["storage"],
        counts=", ".join(f"{n} {s}" for s, n in summary["counts"].items()),
        best={"number": best["number"], "value": format_number(best["value"], 4)},
        best_run=summary["best_run"],
        history=history,
        importance=importance,
        parameters=[
            {
                "name": name,
                "value": _short(value),
                "importance": format_number(summary["importances"].get(name)),
            }
            for name, value in best["params"].items()
        ],
        trials=[_trial_row(t, best["number"]) for t in summary["trials"]],
    )


def _trial_row(trial: dict, best: int) -> dict:
    return {
        "number": trial["number"],
        "best": trial["number"] == best,
        "state": trial["state"],
        "error": trial.get("error"),
        "value": "" if trial["value"] is None else format_number(trial["value"], 4),
        "epochs": trial["epochs"],
        "seconds": "" if trial["seconds"] is None else f"{trial['seconds']:.0f}",
        "params": ", ".join(f"{k}={_short(v)}" for k, v in trial["params"].items()),
    }


def _figures(study, summary: dict) -> tuple[dict, dict | None]:
    """Optimisation history and importances as embedded PNGs (see ``embed_figure``)."""
    from matplotlib.ticker import MaxNLocator

    from medsight.evaluation.report import embed_figure, new_figure

    fig = new_figure(6.4, 3.6)
    ax = fig.add_subplot()
    done = [t for t in summary["trials"] if t["state"] == "complete" and t["value"] is not None]
    pruned = [t for t in study.trials if t.state.name == "PRUNED" and t.intermediate_values]
    if done:
        xs = [t["number"] for t in done]
        ys = [t["value"] for t in done]
        ax.scatter(xs, ys, s=22, color="#1f6f8b", label="finished trial", zorder=3)
        best, line = None, []
        for y in ys:
            better = best is None or (y > best if summary["direction"] == "maximize" else y < best)
            best = y if better else best
            line.append(best)
        ax.step(xs, line, where="post", color="#d9534f", label="best so far")
    if pruned:
        ax.scatter(
            [t.number for t in pruned],
            [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
            s=18,
            marker="x",
            color="grey",
            label="pruned (last value)",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {summary['metric']}")
    ax.legend(loc="lower right")
    history = embed_figure(fig, "Optimisation history")
    importance = None
    if summary["importances"]:
        names = list(summary["importances"])[::-1]
        fig = new_figure(5.6, 0.35 * len(names) + 1)
        ax = fig.add_subplot()
        ax.barh(names, [summary["importances"][n] for n in names], color="#1f6f8b")
        ax.set_xlabel("importance (fANOVA)")
        importance = embed_figure(fig, "Parameter importances")
    return history, importance
