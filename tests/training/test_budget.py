"""How much a run trains and when it validates: the epochs-auto rule, the validation cadence,
time budgets (parsing, planning, stopping in time, resuming), and the batch size of small sets.
Numbers, not timings: time is a fake clock or a made-up throughput."""

from __future__ import annotations

import os

import pytest
import torch
from tests.conftest import tiny_train_config

from medsight import runs
from medsight.config import OptimConfig, TrainConfig, parse_duration
from medsight.errors import ConfigError
from medsight.events import BudgetReached, Note, TrainingPlan
from medsight.training import trainer
from medsight.training.budget import (
    Pace,
    Plan,
    auto_epochs,
    cadence,
    fit_budget,
    steps_per_epoch,
)
from medsight.training.handlers import Engine, TimeBudget
from medsight.training.trainer import train

pytest.importorskip("medsight.models.zoo")


# --------------------------------------------------------------------------- epochs: auto


@pytest.mark.parametrize(
    ("n_train", "epochs"),
    [
        (3_882, 15),  # PneumoniaMNIST: as many passes as the old default
        (840, 20),  # the 1,200-image phantom set: capped
        (41_000, 1),  # Medical MNIST: one pass is 41,000 images
        (6_000, 10),
        (12, 20),
        (500_000, 1),  # never less than one pass
    ],
)
def test_auto_epochs_aim_at_60000_images_in_1_to_20_passes(n_train, epochs):
    assert auto_epochs(n_train) == epochs


def test_steps_per_epoch_count_full_batches_or_one_small_set():
    assert steps_per_epoch(3_882, 64) == 60  # the last, partial batch is dropped
    assert steps_per_epoch(64, 64) == 1
    assert steps_per_epoch(42, 42) == 1


# --------------------------------------------------------------------------- cadence


def test_small_sets_validate_once_per_epoch():
    plan = cadence(3_882, 500, 60, 15 * 60)
    assert (plan.val_every, plan.subsample) == (None, None)
    assert plan.checks(0, plan.total_steps) == (15, 0)


def test_large_sets_validate_8_times_a_run_on_a_subsample_and_each_epoch_end_on_all():
    plan = cadence(41_000, 4_000, 640, 640)
    assert (plan.val_every, plan.subsample) == (80, 2_000)
    assert [plan.check_at(s) for s in (80, 81, 560, 640)] == ["mid", None, "mid", "end"]
    assert plan.checks(0, 640) == (1, 7)
    two = cadence(41_000, 1_500, 640, 1_280)  # a smaller validation split: used whole
    assert (two.val_every, two.subsample) == (160, None) and two.checks(0, 1_280) == (2, 6)


def test_short_runs_of_small_sets_validate_within_epochs_too():
    plan = cadence(840, 180, 13, 26)  # --epochs 2
    assert plan.val_every == 4 and plan.checks(0, 26) == (2, 6)  # 8 in all
    tiny = cadence(12, 6, 1, 2)  # one step per epoch: epoch ends are all there is
    assert tiny.val_every is None


def test_a_run_that_ends_within_an_epoch_ends_on_a_whole_validation():
    plan = Plan(total_steps=25, steps_per_epoch=10, val_every=4)
    assert plan.epochs == 2.5 and plan.check_at(25) == "end" and plan.check_at(24) == "mid"
    assert plan.checks(0, 25) == (3, 5)  # ends at 10, 20, 25; mid at 4, 8, 12, 16, 24
    assert plan.checks(10, 20) == (1, 2)


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("1.5h", 5_400), ("1h30m", 5_400), (" 2 m ", 120), (".5m", 30)],
)
def test_durations_are_read_with_their_unit(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "'0' is not a positive duration"),
        ("0s", "'0s' is not a positive duration"),
        ("-5m", "'-5m' is not a positive duration"),
        ("10", r"'10' is not a duration; add a unit \(s, m or h\)"),
        ("ten minutes", "'ten minutes' is not a duration"),
        ("5m-", "'5m-' is not a duration"),
    ],
)
def test_bad_durations_are_refused_naming_the_value(text, message):
    with pytest.raises(ValueError, match=message):
        parse_duration(text)
    with pytest.raises(ConfigError, match=rf"optim\.time: .*{message}"):
        TrainConfig.parse({"data": {"path": "a"}, "optim": {"time": text}})


def test_epochs_and_batch_size_take_a_number_or_auto():
    assert OptimConfig(epochs="12", batch_size="auto").epochs == 12
    for bad in ("many", 0, 2.5, True):
        with pytest.raises(ConfigError, match=r"optim\.epochs: .*whole number .* or 'auto'"):
            TrainConfig.parse({"data": {"path": "a"}, "optim": {"epochs": bad}})


# --------------------------------------------------------------------------- planning


def test_the_plan_fits_steps_and_validations_in_the_budget():
    # 640 img/s in batches of 64: 0.1 s a step; an epoch of 100 steps (10 s) + validation 10 s
    common = {"images_per_s": 640, "batch_size": 64, "val_seconds": 10, "n_val": 1_000}
    plan = fit_budget(600, n_train=6_400, max_steps=10_000, **common)
    assert (plan.total_steps, plan.epochs, plan.val_every) == (3_000, 30, None)
    # 35 s: one epoch (20 s), then 15 s hold 50 steps and the last validation
    assert fit_budget(35, n_train=6_400, max_steps=10_000, **common).total_steps == 150
    # the epochs given are a cap
    assert fit_budget(600, n_train=6_400, max_steps=500, **common).total_steps == 500
    # not even one step and its validation
    assert fit_budget(9, n_train=6_400, max_steps=500, **common).total_steps == 0


def test_a_large_set_budget_counts_its_subsampled_validations():
    # 64,000 images: 1,000 steps an epoch; 10,000 validation images take 50 s, 2,000 take 10 s
    kw = {"images_per_s": 640, "batch_size": 64, "val_seconds": 50, "n_train": 64_000}
    plan = fit_budget(300, n_val=10_000, max_steps=100_000, **kw)
    pace = Pace(step_seconds=0.1, val_seconds=50, mid_seconds=10)
    # two epoch ends (100 s) and, within a quarter of the budget, validations on 2,000 images
    assert (plan.total_steps, plan.subsample, plan.checks(0, plan.total_steps)) == (
        1_400,
        2_000,
        (2, 5),
    )
    assert pace.seconds(plan, 0, plan.total_steps) == 140 + 100 + 50
    # validations within epochs that would take more than a quarter of the budget thin out
    dear = fit_budget(35, n_train=64_000, n_val=1_000, max_steps=100_000, images_per_s=640,
                      batch_size=64, val_seconds=10)  # fmt: skip
    assert dear.val_every is None and dear.total_steps == 250


def test_pace_tells_the_time_left_in_the_epoch_and_the_run():
    plan = Plan(total_steps=20, steps_per_epoch=10)
    pace = Pace(step_seconds=0.5, val_seconds=3)
    assert pace.seconds(plan, 0, 20) == 20 * 0.5 + 2 * 3
    assert pace.seconds(plan, 15, 20) == 5 * 0.5 + 3
    assert Pace().seconds(plan, 0, 20) is None  # nothing timed yet
    assert pace.images_per_second(64) == 128


# --------------------------------------------------------------------------- the handler


class FakeClock:
    def __init__(self, now=0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _engine(plan: Plan, pace: Pace) -> Engine:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return Engine(model, optimizer, None, scaler, None, plan, pace=pace)


def test_the_budget_stops_training_with_time_for_the_last_validation():
    clock = FakeClock()
    engine = _engine(Plan(100, 10), Pace(step_seconds=1, val_seconds=5))
    budget = TimeBudget(30, started=0.0, clock=clock)
    budget.on_fit_start(engine)
    assert engine.budget_left == 30 and not engine.stop
    while not engine.stop:
        clock.now += 1  # a step
        engine.state.step += 1
        budget.on_batch_end(engine)
        if not engine.stop and engine.plan.check_at(engine.state.step):
            clock.now += 5  # a validation
            budget.on_validation(engine, {})
    clock.now += 5  # the last validation, after the stop
    assert engine.stop_reason == "budget" and engine.state.step == 20
    assert clock.now <= 30


def test_a_resumed_budget_is_what_was_left_or_the_new_time_given():
    engine = _engine(Plan(100, 10), Pace(step_seconds=1, val_seconds=5))
    engine.state.elapsed, engine.state.budget = 20.0, 30.0
    kept = TimeBudget(None, started=100.0, clock=FakeClock(100.0))
    kept.on_fit_start(engine)
    assert engine.budget_left == 10 and not engine.stop
    more = TimeBudget(20.0 + 600, started=100.0, clock=FakeClock(100.0))
    more.on_fit_start(engine)
    assert engine.state.budget == 620 and engine.budget_left == 600
    spent = _engine(Plan(100, 10), Pace(step_seconds=1, val_seconds=5))
    spent.state.elapsed, spent.state.budget, spent.state.stopped = 28.0, 30.0, "budget"
    TimeBudget(None, started=0.0, clock=FakeClock()).on_fit_start(spent)
    assert spent.stop and spent.stop_reason == "budget"  # 2 s hold no step and a validation


# --------------------------------------------------------------------------- training


def _data(tmp_path, helpers, n_patients=12):
    return helpers.make_two_class_manifest(tmp_path / "data", n_patients, 2, 16)


def _weights(run_dir):
    return torch.load(run_dir / runs.CHECKPOINTS / "last.pt", weights_only=False)["model"]


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


class Stop(Exception):
    pass


@pytest.mark.parametrize(("n_train", "epochs"), [(100, 10), (2_100, 10), (4_800, 4), (50_000, 1)])
def test_auto_epochs_of_a_pretrained_network_aim_at_a_third_of_the_images(n_train, epochs):
    assert auto_epochs(n_train, pretrained=True) == epochs


def test_auto_epochs_and_a_small_set_batch_size_adapt_to_the_data(tmp_path, helpers):
    data = _data(tmp_path, helpers)
    config = tiny_train_config(data, tmp_path / "run", epochs="auto", batch_size="auto")
    seen = []

    def first_epoch_only(epoch, row):
        raise Stop

    with pytest.raises(Stop):
        train(config, events=seen.append, show_progress=False, on_epoch=first_epoch_only)
    n_train = len(runs.Run.load(tmp_path / "run").splits().query("split == 'train'"))
    notes = [e.text for e in seen if isinstance(e, Note)]
    assert notes == [
        f"batch size {n_train}: the training set has {n_train} images, fewer than the default 64",
        f"training on cpu ({os.cpu_count()} cores), fp32 (no autocast)",
    ]
    plan = next(e for e in seen if isinstance(e, TrainingPlan))
    assert (plan.basis, plan.epochs, plan.steps, plan.batch_size) == ("auto", 20, 20, n_train)
    saved = TrainConfig.from_yaml(tmp_path / "run" / runs.CONFIG)
    assert saved.optim.batch_size == n_train and saved.optim.epochs == "auto"


def _mid_epoch_config(data, out, **optim):
    # 40 training images in batches of 4: 10 steps an epoch; thresholds lowered so that this
    # tiny set validates within epochs, on 8 of its 20 validation images
    settings = {"epochs": 2, "batch_size": 4, "val_mid_epoch_above": 10, "val_subsample": 8}
    return tiny_train_config(data, out, **{**settings, **optim})


def test_large_sets_validate_within_epochs_and_history_says_where(tmp_path, helpers):
    data = _data(tmp_path, helpers, n_patients=40)
    run = train(_mid_epoch_config(data, tmp_path / "run"), show_progress=False)
    history = run.history()
    assert list(history.columns[:6]) == [
        "epoch", "epoch_fraction", "step", "images_seen", "val_images", "train_loss",
    ]  # fmt: skip
    assert {"val_loss", "val_auroc", "lr", "train_seconds", "seconds"} <= set(history.columns)
    assert list(history["step"]) == [3, 6, 9, 10, 12, 15, 18, 20]
    assert list(history["epoch"]) == [1, 1, 1, 1, 2, 2, 2, 2]
    assert list(history["epoch_fraction"]) == [0.3, 0.6, 0.9, 1.0, 1.2, 1.5, 1.8, 2.0]
    assert list(history["images_seen"]) == [4 * s for s in history["step"]]
    assert list(history["val_images"]) == [8, 8, 8, 20, 8, 8, 8, 20]


@pytest.mark.parametrize("where", ["within an epoch", "at an epoch end"])
def test_a_run_validating_within_epochs_resumes_to_the_same_weights(
    tmp_path, helpers, monkeypatch, where
):
    data = _data(tmp_path, helpers, n_patients=40)
    straight = train(_mid_epoch_config(data, tmp_path / "a"), show_progress=False)
    config = _mid_epoch_config(data, tmp_path / "b")
    if where == "within an epoch":
        calls, real = {"n": 0}, trainer._validate

        def interrupted(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 6:  # the second validation of epoch 2, at step 15
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(trainer, "_validate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(config, show_progress=False)
        monkeypatch.setattr(trainer, "_validate", real)
    else:

        def after_epoch_1(epoch, row):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            train(config, show_progress=False, on_epoch=after_epoch_1)
    resumed = train(config, resume=True, show_progress=False)
    assert _same_weights(straight.path, resumed.path)
    timing = ["train_seconds", "seconds"]
    a, b = straight.history().drop(columns=timing), resumed.history().drop(columns=timing)
    assert a.equals(b)


class TickingClock:
    """A fake clock that moves ``tick`` seconds each time it is read."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_a_budget_ends_training_cleanly_and_more_time_continues_it(tmp_path, helpers, monkeypatch):
    data = _data(tmp_path, helpers, n_patients=40)
    monkeypatch.setattr(trainer, "_clock", TickingClock(300))  # five minutes each look
    config = _mid_epoch_config(data, tmp_path / "run", time="1h")
    seen = []
    run = train(config, events=seen.append, show_progress=False)
    plan = next(e for e in seen if isinstance(e, TrainingPlan))
    assert plan.steps == 20 and plan.basis == "epochs"  # 1 h holds the 2 epochs given
    reached = [e for e in seen if isinstance(e, BudgetReached)]
    assert len(reached) == 1 and reached[0].budget_s == 3600
    stopped_at = reached[0].step
    assert 0 < stopped_at < 20
    history = run.history()
    assert history["step"].iloc[-1] == stopped_at
    assert history["val_images"].iloc[-1] == 20  # the last validation is on the whole split
    assert (run.path / runs.WEIGHTS).exists()
    state = torch.load(run.path / runs.CHECKPOINTS / "last.pt", weights_only=False)["state"]
    assert state["stopped"] == "budget" and state["step"] == stopped_at

    # resumed as it is: the budget is spent, nothing more is trained
    again = []
    train(config, resume=True, events=again.append, show_progress=False)
    assert any(isinstance(e, BudgetReached) for e in again)
    assert runs.Run.load(run.path).history().equals(history)

    # given ten more minutes (of a clock that no longer races): it goes on to the plan's end
    monkeypatch.setattr(trainer, "_clock", FakeClock())
    more = []
    train(config, resume=True, time_budget="10m", events=more.append, show_progress=False)
    plan = next(e for e in more if isinstance(e, TrainingPlan))
    assert plan.steps_done == stopped_at and plan.budget_left_s == pytest.approx(600)
    assert plan.budget_s == pytest.approx(state["elapsed"] + 600)
    history = runs.Run.load(run.path).history()
    assert history["step"].iloc[-1] == 20 and history["step"].is_monotonic_increasing


def test_an_interrupted_budgeted_run_resumes_with_what_is_left(tmp_path, helpers, monkeypatch):
    data = _data(tmp_path, helpers)
    monkeypatch.setattr(trainer, "_clock", TickingClock(1))
    config = tiny_train_config(data, tmp_path / "run", epochs=3, time="1h")

    def after_epoch_1(epoch, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, show_progress=False, on_epoch=after_epoch_1)
    saved = torch.load(tmp_path / "run" / runs.CHECKPOINTS / "last.pt", weights_only=False)
    elapsed = saved["state"]["elapsed"]
    assert saved["state"]["budget"] == 3600 and 0 < elapsed < 3600
    seen = []
    train(config, resume=True, events=seen.append, show_progress=False)
    plan = next(e for e in seen if isinstance(e, TrainingPlan))
    assert plan.budget_s == 3600
    assert plan.budget_left_s == pytest.approx(3600 - elapsed, abs=5)  # a few ticks of setup
    assert list(runs.Run.load(tmp_path / "run").history()["epoch"]) == [1, 2, 3]


def test_a_budget_too_short_for_one_validation_is_refused_with_the_minimum(
    tmp_path, helpers, monkeypatch
):
    data = _data(tmp_path, helpers)
    monkeypatch.setattr(trainer, "_measure", lambda *a, **k: Pace(0.5, 30.0, 30.0))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"--time 10s is too short: .* give at least --time \d+s"):
        train(tiny_train_config(data, out, time="10s"), show_progress=False)
    assert not (out / runs.CONFIG).exists()  # nothing half-made: the same --out can be reused
    monkeypatch.undo()
    train(tiny_train_config(data, out, epochs=1), show_progress=False)


def test_the_cli_refuses_a_bad_time_naming_it(tmp_path, helpers):
    from typer.testing import CliRunner

    from medsight.cli import app

    data = _data(tmp_path, helpers)
    for value in ("0", "-5m", "soon"):
        result = CliRunner().invoke(app, ["train", "--data", str(data), "--time", value])
        assert result.exit_code == 2
        assert "optim.time" in result.output and repr(value) in result.output


def test_the_cli_resumes_with_more_time_when_given(tmp_path, helpers, monkeypatch):
    from typer.testing import CliRunner

    from medsight.cli import app

    data = _data(tmp_path, helpers)
    train(tiny_train_config(data, tmp_path / "run", epochs=1), show_progress=False)
    calls = []
    monkeypatch.setattr(trainer, "train", lambda config, **kw: calls.append(kw))
    for extra in ([], ["--time", "10m"]):
        result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "run"), *extra])
        assert result.exit_code == 0, result.output
    assert [(c["resume"], c["time_budget"]) for c in calls] == [(True, None), (True, "10m")]
