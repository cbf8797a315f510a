"""Optimisers, schedules, class weights and augmentation presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsight.errors import ConfigError
from medsight.tasks.classify import class_weights
from medsight.training.optim import build_optimizer, build_scheduler


def _groups(lr=0.1):
    layer = torch.nn.Linear(4, 2)
    return [{"params": list(layer.parameters()), "lr": lr}]


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop", "sgd"])
def test_each_optimizer_builds_and_steps(name):
    groups = _groups()
    optimizer = build_optimizer(name, groups, lr=0.1)
    before = groups[0]["params"][0].detach().clone()
    groups[0]["params"][0].sum().backward()
    optimizer.step()
    assert not torch.equal(before, groups[0]["params"][0])


def test_unknown_optimizer_and_frozen_model_are_refused():
    with pytest.raises(ConfigError, match="got 'adagrad'"):
        build_optimizer("adagrad", _groups(), lr=0.1)
    frozen = _groups()
    for p in frozen[0]["params"]:
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="every parameter is frozen"):
        build_optimizer("adam", frozen, lr=0.1)


def test_cosine_warms_up_then_decays_to_zero():
    optimizer = build_optimizer("sgd", _groups(1.0), lr=1.0)
    schedule = build_scheduler("cosine", optimizer, total_steps=100, warmup_steps=10)
    assert schedule.step_per == "batch"
    scheduler = schedule.scheduler
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] < 0.01 and max(lrs) == pytest.approx(1.0)


def test_onecycle_peaks_at_the_learning_rate():
    optimizer = build_optimizer("adamw", _groups(0.5), lr=0.5)
    scheduler = build_scheduler("onecycle", optimizer, total_steps=20, warmup_steps=5).scheduler
    lrs = []
    for _ in range(20):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(0.5, rel=0.05) and lrs[-1] < 0.01


@pytest.mark.parametrize("name", ["onecycle", "cosine"])
def test_a_one_epoch_run_warms_up_for_at_most_30_percent_then_anneals(name):
    # warm-up asked for: one epoch, which is the whole run here
    optimizer = build_optimizer("sgd", _groups(1.0), lr=1.0)
    scheduler = build_scheduler(name, optimizer, total_steps=50, warmup_steps=50).scheduler
    lrs = []
    for _ in range(50):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()  # OneCycleLR would raise past its total
    peak = int(np.argmax(lrs))
    assert 5 <= peak <= 15 and max(lrs) == pytest.approx(1.0, rel=0.05)
    assert lrs[-1] < 0.05


def test_class_weights_balance_the_classes():
    weights = class_weights(np.array([90, 10]))
    assert torch.allclose(weights, torch.tensor([100 / 180, 100 / 20]))
    assert (weights * torch.tensor([90.0, 10.0])).tolist() == pytest.approx([50.0, 50.0])
    with pytest.raises(ConfigError, match="every class"):
        class_weights(np.array([5, 0]))
