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

__all__ = ["DEFAULT_TASK", "TASKS", "Task", "get_task"]

DEFAULT_TASK = "classify"

#: Every task medsight knows, by the name runs record.
TASKS: dict[str, type[Task]] = {ClassifyTask.name: ClassifyTask}


def get_task(name: str | None = None) -> Task:
    """The task called ``name`` (None: the default, single-label classification)."""
    name = name or DEFAULT_TASK
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ConfigError(f"task={name!r} is not known{hint} Known tasks: {sorted(TASKS)}")
    return TASKS[name]()
