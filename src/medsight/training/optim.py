"""Optimisers and learning-rate schedules, built by name from the configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from medsight.errors import ConfigError


def build_optimizer(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """``adam``, ``adamw``, ``rmsprop`` or ``sgd`` (Nesterov momentum 0.9) over param groups."""
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ConfigError("nothing to train: every parameter is frozen")
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=0.9, alpha=0.9)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise ConfigError(f"optimizer must be adam, adamw, rmsprop or sgd, got {name!r}")


@dataclass(frozen=True)
class Schedule:
    """A learning-rate scheduler and when the loop steps it: after every ``batch``, after every
    ``epoch``, or after every epoch on its last validation's ``metric`` (higher is better)."""

    step_per: Literal["batch", "epoch", "metric"]
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau

    def after_batch(self) -> None:
        if self.step_per == "batch":
            self.scheduler.step()

    def after_epoch(self, score: float) -> None:
        if self.step_per == "epoch":
            self.scheduler.step()
        elif self.step_per == "metric":
            self.scheduler.step(score)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


#: Warm-up takes at most this share of a run, however few its epochs.
MAX_WARMUP_SHARE = 0.3


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
) -> Schedule | None:
    """The :class:`Schedule` ``name`` describes over ``total_steps`` optimiser steps, or None
    for a fixed learning rate.

    ``onecycle`` and ``cosine`` step every batch, after a warm-up of ``warmup_steps`` (at most
    30 % of the run, so a run of one or two epochs still anneals; one-cycle warms up over 5 %
    at least); ``plateau`` steps on the validation metric at each epoch end; ``none`` keeps the
    learning rate fixed.
    """
    total = max(1, total_steps)
    warmup = min(max(0, int(warmup_steps)), int(MAX_WARMUP_SHARE * total))
    if name == "none":
        return None
    if name == "onecycle":
        max_lr = [g["lr"] for g in optimizer.param_groups]
        pct = min(MAX_WARMUP_SHARE, max(0.05, warmup / total)) if total > 1 else 0.3
        return Schedule(
            "batch",
            # one step more than the run: the step() after the last batch stays on the curve
            torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=max_lr, total_steps=total + 1, pct_start=pct
            ),
        )
    if name == "cosine":

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        return Schedule("batch", torch.optim.lr_scheduler.LambdaLR(optimizer, factor))
    if name == "plateau":
        return Schedule(
            "metric",
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=0.3, patience=2
            ),
        )
    raise ConfigError(f"schedule must be cosine, onecycle, plateau or none, got {name!r}")
