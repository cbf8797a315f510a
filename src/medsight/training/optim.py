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
    ``epoch``, or after every epoch on the validation ``metric`` (higher is better)."""

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


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float,
) -> Schedule | None:
    """The :class:`Schedule` ``name`` describes, or None for a fixed learning rate.

    ``onecycle`` and ``cosine`` step every batch (cosine after a linear warm-up); ``plateau``
    steps on the validation metric; ``none`` keeps the learning rate fixed.
    """
    total = max(1, epochs * steps_per_epoch)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if name == "none":
        return None
    if name == "onecycle":
        max_lr = [g["lr"] for g in optimizer.param_groups]
        pct = min(0.45, max(0.05, warmup / total)) if total > 1 else 0.3
        return Schedule(
            "batch",
            torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=max_lr, total_steps=total, pct_start=pct
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
