"""Training handlers: best weights and early stopping, the checkpoint, the per-epoch callback,
the events training reports, and a library that prints nothing."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_train_config

import medsight
from medsight import runs
from medsight.events import (
    EarlyStopped,
    EpochEnd,
    ProgressAdvance,
    ProgressEnd,
    ProgressStart,
    TrainingEnd,
)
from medsight.tasks.base import Task
from medsight.training.handlers import Checkpoint, EarlyStopping, Engine
from medsight.training.optim import build_scheduler
from medsight.training.trainer import train

pytest.importorskip("medsight.models.zoo")

_config = tiny_train_config


def _engine(tmp_path, schedule="cosine") -> Engine:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_scheduler(schedule, optimizer, epochs=4, steps_per_epoch=2, warmup_epochs=0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return Engine(model, optimizer, sched, scaler, tmp_path, epochs=4, steps=2)


def _finish_epoch(engine: Engine, epoch: int, score: float, handlers) -> None:
    engine.score = score
    engine.state.epoch = epoch
    row = {"epoch": epoch, "score": score}
    engine.state.history.append(row)
    for handler in handlers:
        handler.on_epoch_end(engine, row)


def test_early_stopping_keeps_the_best_weights_and_stops_after_patience_bad_epochs(tmp_path):
    engine = _engine(tmp_path)
    stopping = EarlyStopping(tmp_path / runs.WEIGHTS, patience=2)
    stopped_at = None
    for epoch, score in enumerate([0.5, 0.7, 0.6, 0.65, 0.9], start=1):
        with torch.no_grad():
            engine.model.weight.fill_(epoch)  # the weights tell which epoch they are from
        _finish_epoch(engine, epoch, score, [stopping])
        if engine.stop:
            stopped_at = epoch
            break
    assert stopped_at == 4  # epochs 3 and 4 did not beat epoch 2
    assert engine.stopped_early
    assert (engine.state.best_epoch, engine.state.best_score) == (2, 0.7)
    saved = load_file(tmp_path / runs.WEIGHTS)
    assert torch.all(saved["weight"] == 2)


def test_checkpoint_restores_what_it_saved(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    first = _engine(tmp_path)
    first.model(torch.ones(1, 3)).sum().backward()
    first.optimizer.step()
    first.schedule.after_batch()
    _finish_epoch(first, 1, 0.8, [EarlyStopping(tmp_path / runs.WEIGHTS, 3), Checkpoint(path)])

    second = _engine(tmp_path)
    Checkpoint(path, resume=True).on_fit_start(second)
    assert second.resumed and second.state == first.state
    assert torch.equal(second.model.weight, first.model.weight)
    assert second.schedule.state_dict() == first.schedule.state_dict()


def test_checkpoint_is_written_every_epoch_before_the_callback_runs(tmp_path, helpers):
    data = helpers.make_two_class_manifest(tmp_path / "data", 12, 2, 16)
    out = tmp_path / "run"
    checkpointed = []

    def on_epoch(epoch, row):
        saved = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
        checkpointed.append(saved["state"]["epoch"])
        assert (out / runs.WEIGHTS).exists()
        if epoch == 2:
            raise RuntimeError("pruned")

    with pytest.raises(RuntimeError, match="pruned"):
        train(_config(data, out, epochs=3), show_progress=False, on_epoch=on_epoch)
    assert checkpointed == [1, 2]
    assert list(runs.Run.load(out).history()["epoch"]) == [1, 2]


def test_training_stops_early_when_the_monitored_score_stalls(tmp_path, helpers, monkeypatch):
    data = helpers.make_two_class_manifest(tmp_path / "data", 12, 2, 16)
    monkeypatch.setattr(Task, "monitor_score", lambda self, monitor, scores: 0.5)
    seen = []
    run = train(_config(data, tmp_path / "run", epochs=6, patience=2), events=seen.append)
    assert list(run.history()["epoch"]) == [1, 2, 3]  # epoch 1 is the best; 2 and 3 are not
    assert EarlyStopped("auroc", 2) in seen
    assert [e.best for e in seen if isinstance(e, EpochEnd)] == [True, False, False]


def test_training_reports_progress_epochs_and_the_best_epoch(tmp_path, helpers):
    data = helpers.make_two_class_manifest(tmp_path / "data", 12, 2, 16)
    seen = []
    run = train(_config(data, tmp_path / "run"), events=seen.append)
    kinds = [type(e) for e in seen if not isinstance(e, ProgressAdvance)]
    assert kinds == [ProgressStart, EpochEnd, EpochEnd, ProgressEnd, TrainingEnd]
    start = seen[0]
    assert start.description == "training" and start.completed == 0
    batches = sum(e.advance for e in seen if isinstance(e, ProgressAdvance))
    assert 0 < batches <= start.total  # the total counts the last, partial batch dropped
    epochs = [e for e in seen if isinstance(e, EpochEnd)]
    assert [e.row["epoch"] for e in epochs] == [1, 2] and epochs[0].epochs == 2
    end = seen[-1]
    assert end.run == run.path and end.best_epoch in (1, 2) and end.monitor == "auroc"

    quiet = []
    train(_config(data, tmp_path / "quiet"), events=quiet.append, show_progress=False)
    assert not any(isinstance(e, ProgressStart | ProgressAdvance | ProgressEnd) for e in quiet)


def test_the_library_prints_nothing(tmp_path, helpers, capsys):
    data = helpers.make_two_class_manifest(tmp_path / "data", 12, 2, 16)
    train(_config(data, tmp_path / "run"))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_the_cli_draws_the_epoch_line_as_before():
    from rich.console import Console

    from medsight.cli.render import Renderer

    file = io.StringIO()
    row = {"train_loss": 0.5, "val_loss": 0.25, "val_auroc": 0.875, "val_accuracy": None}
    event = EpochEnd(3, 12, {**row, "seconds": 1.24}, best=True, shown=("auroc", "accuracy"))
    Renderer(Console(file=file, width=200))(event)
    assert file.getvalue() == (
        "epoch   3/12  loss 0.5000  val loss 0.2500  auroc 0.8750  acc —  (1.2s)  best\n"
    )
    # a narrow log file still gets one line per epoch
    narrow = io.StringIO()
    Renderer(Console(file=narrow, width=40))(event)
    assert narrow.getvalue().count("\n") == 1


def test_library_code_never_imports_rich():
    # Only the CLI draws; a library module importing Rich is about to print.
    src = Path(medsight.__file__).parent
    offenders = []
    for path in src.rglob("*.py"):
        if path.relative_to(src).parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name.split(".")[0] == "rich" for name in names):
                offenders.append(str(path.relative_to(src)))
    assert offenders == []
