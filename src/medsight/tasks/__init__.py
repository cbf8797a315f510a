"""Tasks: one object per kind of problem (see :mod:`medsight.tasks.base`).

The registry is explicit and small: a run names its task in ``model.json`` (runs written before
tasks existed are classification runs), and :func:`get_task` returns the object. Trainer,
evaluator, report, predictor, API and worklist ask that object and never branch on its kind.

To add a task: write tasks/<name>.py (a Task subclass), register it in TASKS, give it its metric
set and report sections and its prediction schema (decode), and a test that runs train →
evaluate → predict → serve on tiny generated data.

>>> get_task("classify").name
'classify'
"""

from __future__ import annotations

import difflib

from medsight.errors import ConfigError
from medsight.tasks.base import Task
from medsight.tasks.classify import ClassifyTask
from medsight.tasks.detect import DetectTask
from medsight.tasks.multilabel import MultiLabelTask

__all__ = ["DEFAULT_TASK", "TASKS", "Task", "get_task", "task_for"]

DEFAULT_TASK = "classify"

#: Every task medsight knows, by the name runs record.
TASKS: dict[str, type[Task]] = {
    ClassifyTask.name: ClassifyTask,
    MultiLabelTask.name: MultiLabelTask,
    DetectTask.name: DetectTask,
}


def get_task(name: str | None = None) -> Task:
    """The task called ``name`` (None or ``auto``: the default, single-label classification;
    the trainer resolves ``auto`` from the data first, see :func:`task_for`)."""
    name = DEFAULT_TASK if name in (None, "auto") else name
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ConfigError(f"task={name!r} is not known{hint} Known tasks: {sorted(TASKS)}")
    return TASKS[name]()


def task_for(requested: str, table) -> str:
    """The task a run trains: ``requested``, or with ``auto`` the one the data say
    (a table of boxes: ``detect``; a multi-label table: ``multilabel``; else ``classify``).
    A single-label table given ``--task multilabel`` is refused, and the other way round;
    ``--task detect`` takes boxes, or masks (made boxes), and says how to provide them."""
    from medsight.data.boxes import DETECT, is_detection
    from medsight.data.findings import MULTILABEL, is_multilabel

    if is_detection(table):
        if requested not in ("auto", DETECT):
            get_task(requested)
            raise ConfigError(
                f"--task {requested}: these data are boxes (a detection set); train a detector "
                "with --task detect (or leave --task out)"
            )
        return DETECT
    found = MULTILABEL if is_multilabel(table) else DEFAULT_TASK
    if requested == "auto":
        return found
    get_task(requested)  # a name that is no task is refused by name
    if requested == DETECT:
        return DETECT  # masks become boxes, or the task says how to provide them
    if requested == MULTILABEL and found != MULTILABEL:
        raise ConfigError(
            "--task multilabel needs multi-label data: a CSV with one 0/1 column per finding "
            "(--labels A,B,...), a findings column such as 'Finding Labels' (A|B), or a "
            "MedMNIST npz with (N, K) labels; class folders hold one class per image"
        )
    if requested != MULTILABEL and found == MULTILABEL:
        raise ConfigError(
            f"--task {requested} is single-label, but these data have several findings per "
            "image; use --task multilabel (or leave --task out)"
        )
    return requested
