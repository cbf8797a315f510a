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
    Note,
    ProgressAdvance,
    ProgressEnd,
    ProgressStart,
    TrainingEnd,
    TrainingPlan,
    TrainingProgress,
    ValidationEnd,
)
from medsight.tasks.base import Task
from medsight.training.budget import Plan
from medsight.training.handlers import (
    Checkpoint,
    EarlyStopping,
    Engine,
    WeightAverage,
    weight_average,
)
from medsight.training.optim import build_scheduler
from medsight.training.trainer import train

pytest.importorskip("medsight.models.zoo")

_config = tiny_train_config


def _engine(tmp_path, schedule="cosine", plan=None) -> Engine:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = plan or Plan(total_steps=8, steps_per_epoch=2)
    sched = build_scheduler(schedule, optimizer, total_steps=plan.total_steps, warmup_steps=0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return Engine(model, optimizer, sched, scaler, tmp_path, plan)


def _validate(engine: Engine, score: float, handlers, *, ending: bool, loss=None) -> dict:
    engine.score = score
    row = {"epoch": engine.epoch, "step": engine.state.step, "score": score, "val_loss": loss}
    engine.state.history.append(row)
    engine.epoch_ending = ending
    for handler in handlers:
        handler.on_validation(engine, row)
    return row


def _finish_epoch(engine: Engine, epoch: int, score: float, handlers, loss=None) -> None:
    engine.epoch = epoch
    engine.state.step = epoch * engine.plan.steps_per_epoch
    row = _validate(engine, score, handlers, ending=True, loss=loss)
    engine.state.epoch = epoch
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


def test_a_tied_score_keeps_the_epoch_with_the_lower_validation_loss(tmp_path):
    engine = _engine(tmp_path)
    stopping = EarlyStopping(tmp_path / runs.WEIGHTS, patience=3)
    # validation AUROC saturates at once; the loss keeps falling, then rises
    for epoch, loss in enumerate([0.69, 0.30, 0.05, 0.08], start=1):
        with torch.no_grad():
            engine.model.weight.fill_(epoch)
        _finish_epoch(engine, epoch, 1.0, [stopping], loss=loss)
    assert (engine.state.best_epoch, engine.state.best_loss) == (3, 0.05)
    assert engine.state.bad_epochs == 1 and not engine.stop
    assert torch.all(load_file(tmp_path / runs.WEIGHTS)["weight"] == 3)


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
    scores = iter([0.5, 0.4, 0.4, 0.4, 0.4, 0.4])  # below the first, whatever the loss does
    monkeypatch.setattr(Task, "monitor_score", lambda self, monitor, metrics: next(scores))
    seen = []
    run = train(_config(data, tmp_path / "run", epochs=6, patience=2), events=seen.append)
    assert list(run.history()["epoch"]) == [1, 2, 3]  # epoch 1 is the best; 2 and 3 are not
    assert EarlyStopped("auroc", 2) in seen
    assert [e.best for e in seen if isinstance(e, EpochEnd)] == [True, False, False]


def test_training_reports_progress_epochs_and_the_best_epoch(tmp_path, helpers):
    data = helpers.make_two_class_manifest(tmp_path / "data", 12, 2, 16)
    seen = []
    run = train(_config(data, tmp_path / "run"), events=seen.append)
    device = seen.pop(0)  # where it trains, said first
    assert isinstance(device, Note) and device.text.startswith("training on cpu")
    kinds = [type(e) for e in seen if not isinstance(e, ProgressAdvance)]
    assert kinds == [TrainingPlan, ProgressStart, EpochEnd, EpochEnd, ProgressEnd, TrainingEnd]
    plan, start = seen[0], seen[1]
    assert (plan.steps, plan.epochs, plan.basis, plan.val_every) == (2, 2, "epochs", None)
    assert start.description == "training" and start.completed == 0 and start.total == 2
    progress = [e for e in seen if isinstance(e, TrainingProgress)]
    assert [e.step for e in progress] == [1, 2] and sum(e.advance for e in progress) == 2
    assert progress[-1].run_left_s == 0 and progress[-1].images_per_s > 0
    assert progress[-1].budget_left_s is None  # no time budget
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


def test_the_cli_prints_the_plan_progress_and_validations_within_epochs():
    import datetime

    from rich.console import Console

    from medsight.cli.render import Renderer, plan_line, progress_info

    eta = datetime.datetime(2026, 1, 2, 11, 52).timestamp()
    plan = TrainingPlan(
        steps=2_180, steps_per_epoch=640, batch_size=64, n_train=41_000, n_val=9_000,
        basis="time", val_every=400, subsample=2_000, budget_s=600, images_per_s=312.4,
        finish_at=eta,
    )  # fmt: skip
    assert plan_line(plan) == (
        "plan: 3.41 epochs (2,180 steps of 64 images) in 10m at 312 img/s, ETA 11:52, "
        "validating every 400 steps on 2,000 of 9,000 images, all at each epoch end"
    )
    auto = TrainingPlan(900, 60, 64, 3_882, 500, "auto")
    assert plan_line(auto) == (
        "plan: 15 epochs (900 steps of 64 images; auto for 3,882 training images), "
        "validating once per epoch"
    )
    step = TrainingProgress(
        1, None, step=10, total=2_180, epoch=1, epochs=3.41, images_per_s=312.4,
        epoch_left_s=41, run_left_s=370, budget_left_s=3_722,
    )  # fmt: skip
    assert progress_info(step) == "312 img/s · epoch 0:41 · run 6:10 · budget 1:02:02 left"
    assert progress_info(TrainingProgress(1)) == ""  # nothing known yet: nothing shown

    file = io.StringIO()
    row = {"train_loss": 0.5, "val_loss": 0.25, "val_auroc": 0.875, "val_images": 2_000}
    event = ValidationEnd(1.5, 3.41, {**row, "seconds": 2.0}, True, ("auroc",), subsample=True)
    Renderer(Console(file=file, width=200))(event)
    assert file.getvalue() == (
        "epoch 1.50/3.41  loss 0.5000  val loss 0.2500  auroc 0.8750  on 2,000 images  "
        "(2.0s)  best\n"
    )


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


def test_the_weight_average_starts_at_the_first_step_and_warms_up_to_its_horizon(tmp_path):
    engine = _engine(tmp_path, plan=Plan(total_steps=40, steps_per_epoch=10))
    engine.average = weight_average(engine.model, horizon_steps=10)  # decay 0.9 at most
    averaging = WeightAverage()
    expected = None
    for step in range(1, 41):
        with torch.no_grad():
            engine.model.weight.fill_(0.0 if step == 1 else 1.0)
        engine.state.step = step
        averaging.on_batch_end(engine)
        # timm's warm-up: decay 0 at step 1, then 1 - (1 + s)^(-2/3) for s = step - 1, at most 0.9
        decay = 0.0 if step == 1 else min(0.9, 1 - (step) ** (-2 / 3))
        weight = 0.0 if step == 1 else 1.0
        expected = weight if expected is None else decay * expected + (1 - decay) * weight
        assert engine.average.module.weight[0, 0].item() == pytest.approx(expected, abs=1e-6)
    assert 0.99 < expected < 1.0  # it has nearly forgotten the first step's weights
    assert engine.evaluated is engine.average.module


def test_the_weight_average_works_with_a_timm_without_stochastic_rounding(monkeypatch):
    # timm releases before stochastic rounding (the device machine's, for one) take no such
    # argument, and always average exactly
    import timm.utils

    from medsight.training import handlers

    class OlderModelEmaV3(timm.utils.ModelEmaV3):
        def __init__(self, model, decay=0.9999, use_warmup=False):
            super().__init__(model, decay=decay, use_warmup=use_warmup, stochastic_rounding=False)

    monkeypatch.setattr(handlers, "ModelEmaV3", OlderModelEmaV3)
    average = handlers.weight_average(torch.nn.Linear(2, 2), horizon_steps=10)
    assert isinstance(average, OlderModelEmaV3) and not average.module.training
