"""How much training a run does, and when it validates: the rules, as pure functions.

- **Epochs** (``epochs: auto``): about :data:`AUTO_IMAGES` training images seen, as whole
  passes over the training set, from 1 to :data:`AUTO_MAX_EPOCHS`
  (:func:`auto_epochs`: 3,882 images → 15 passes, 840 → 20, 41,000 → 1).
- **Validation cadence** (:func:`cadence`): once per epoch; a training set larger than
  ``mid_epoch_above`` images (10,000), or a run of 3 epochs or fewer, also validates within
  epochs, every N steps so that the run has at least ``checks`` (8) validations. Those checks
  use a fixed, seeded subsample of ``subsample`` (2,000) images when the validation split is
  larger; each epoch ends on the whole split.
- **Time budget** (:func:`fit_budget`): the most steps whose training and validations fit in
  the seconds given, at a measured throughput (:class:`Pace`); validations within epochs then
  take at most a quarter of the budget (fewer of them when they would take more).

A :class:`Plan` is what the rules decided: the trainer runs it, the checkpoint keeps it, so a
resumed run follows the same plan.

>>> auto_epochs(3_882), auto_epochs(840), auto_epochs(41_000)
(15, 20, 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

#: ``epochs: auto`` aims at this many training images seen ...
AUTO_IMAGES = 60_000
#: ... in at least one and at most this many passes over the training set.
AUTO_MAX_EPOCHS = 20
#: Fine-tuning pretrained weights converges sooner: a third of the images, at most 10 passes.
AUTO_IMAGES_PRETRAINED = 20_000
AUTO_MAX_EPOCHS_PRETRAINED = 10
#: With ``epochs: auto`` a time budget may stretch a run up to this many times the rule's passes.
BUDGET_STRETCH = 3
#: Under a time budget, validations within epochs take at most this share of it.
MID_SHARE = 0.25


def auto_epochs(n_train: int, pretrained: bool = False) -> int:
    """Passes over ``n_train`` images that ``epochs: auto`` makes: ``round(60,000 / n_train)``
    kept between 1 and 20; a network fine-tuned from pretrained weights needs a third of that
    (``round(20,000 / n_train)``, 1 to 10: on the 128-px phantom set MobileNetV2 from ImageNet
    peaked at epoch 5, ``benchmarks/README.md``).

    >>> auto_epochs(1_000), auto_epochs(100_000), auto_epochs(2_100, pretrained=True)
    (20, 1, 10)
    """
    target, most = (
        (AUTO_IMAGES_PRETRAINED, AUTO_MAX_EPOCHS_PRETRAINED)
        if pretrained
        else (AUTO_IMAGES, AUTO_MAX_EPOCHS)
    )
    return min(most, max(1, round(target / max(1, n_train))))


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimiser steps in one pass: full batches only (a last, smaller batch is dropped), or a
    single batch of the whole set when it is no larger than one batch."""
    return n_train // batch_size if n_train > batch_size else 1


@dataclass(frozen=True)
class Plan:
    """How a run trains: ``total_steps`` optimiser steps, ``steps_per_epoch`` to a pass,
    a validation every ``val_every`` steps within epochs (None: at epoch ends only) on
    ``subsample`` images (None: the whole split), and what set the length: the ``auto`` rule,
    the ``epochs`` given, or the ``time`` budget."""

    total_steps: int
    steps_per_epoch: int
    val_every: int | None = None
    subsample: int | None = None
    basis: Literal["auto", "epochs", "time"] = "epochs"

    @property
    def epochs(self) -> float:
        """Passes over the training set (3.4: three and a part)."""
        return self.total_steps / self.steps_per_epoch

    def check_at(self, step: int) -> Literal["end", "mid"] | None:
        """What validation follows ``step``: ``end`` (an epoch's, or the run's, on the whole
        split), ``mid`` (within an epoch) or none."""
        if step >= self.total_steps or step % self.steps_per_epoch == 0:
            return "end"
        if self.val_every and step % self.val_every == 0:
            return "mid"
        return None

    def checks(self, after: int, upto: int) -> tuple[int, int]:
        """(end, mid) validations after steps ``after + 1`` … ``upto``."""
        upto = min(upto, self.total_steps)
        if upto <= after:
            return 0, 0
        spe = self.steps_per_epoch
        ends = upto // spe - after // spe
        if upto == self.total_steps and upto % spe:
            ends += 1  # the run ends within an epoch: that last check is an end check too
        mid = 0
        if self.val_every:
            every = self.val_every
            multiples = upto // every - after // every
            # multiples of val_every that are also epoch ends (multiples of lcm) or the last step
            both = upto // math.lcm(every, spe) - after // math.lcm(every, spe)
            last = upto == self.total_steps and upto % every == 0 and upto % spe != 0
            mid = multiples - both - int(last)
        return ends, mid

    def to_dict(self) -> dict:
        return {
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "val_every": self.val_every,
            "subsample": self.subsample,
            "basis": self.basis,
        }


def cadence(
    n_train: int,
    n_val: int,
    steps_per_epoch: int,
    total_steps: int,
    *,
    checks: int = 8,
    mid_epoch_above: int = 10_000,
    subsample: int = 2_000,
    basis: Literal["auto", "epochs", "time"] = "epochs",
) -> Plan:
    """The :class:`Plan` of ``total_steps`` with its validation cadence (see the module).

    >>> p = cadence(41_000, 4_000, 640, 640)
    >>> p.val_every, p.subsample, p.checks(0, 640)
    (80, 2000, (1, 7))
    """
    epochs = total_steps / steps_per_epoch
    val_every = None
    if n_train > mid_epoch_above or epochs <= 3:
        every = math.ceil(total_steps / checks)
        val_every = every if every < min(steps_per_epoch, total_steps) else None
    sample = subsample if val_every is not None and n_val > subsample else None
    return Plan(total_steps, steps_per_epoch, val_every, sample, basis)


@dataclass
class Pace:
    """How long things take, in seconds: one optimiser step, one validation on the whole split
    (``val_seconds``) and one within-epoch validation (``mid_seconds``). Unknown: None."""

    step_seconds: float | None = None
    val_seconds: float | None = None
    mid_seconds: float | None = None

    def images_per_second(self, batch_size: int) -> float | None:
        return batch_size / self.step_seconds if self.step_seconds else None

    def seconds(self, plan: Plan, after: int, upto: int) -> float | None:
        """Seconds for steps ``after + 1`` … ``upto`` and their validations (a validation not
        yet timed counts as nothing); None while a step's time is unknown."""
        if self.step_seconds is None:
            return None
        upto = min(upto, plan.total_steps)
        ends, mid = plan.checks(after, upto)
        val = self.val_seconds or 0.0
        steps = max(0, upto - after) * self.step_seconds
        return steps + ends * val + mid * (self.mid_seconds or val)

    def observe_step(self, seconds: float) -> None:
        """A step took ``seconds``: a running mean that follows the last ~20 steps."""
        old = self.step_seconds
        self.step_seconds = seconds if old is None else 0.95 * old + 0.05 * seconds

    def observe_validation(self, seconds: float, mid: bool) -> None:
        if mid:
            self.mid_seconds = seconds
        else:
            self.val_seconds = seconds

    def to_dict(self) -> dict:
        return {"step_seconds": self.step_seconds, "val_seconds": self.val_seconds,
                "mid_seconds": self.mid_seconds}  # fmt: skip


def fit_budget(
    seconds: float,
    *,
    images_per_s: float,
    batch_size: int,
    val_seconds: float,
    n_train: int,
    n_val: int,
    max_steps: int,
    checks: int = 8,
    mid_epoch_above: int = 10_000,
    subsample: int = 2_000,
) -> Plan:
    """The longest plan (at most ``max_steps``) whose steps and validations take no more than
    ``seconds``, when training runs at ``images_per_s`` in batches of ``batch_size`` and a
    validation of the whole split (``n_val`` images) takes ``val_seconds`` (a subsample: its
    share of that). ``total_steps`` is 0 when not even one step and its validation fit.

    Each epoch's last validation (on the whole split) is part of every plan; the validations
    :func:`cadence` adds within epochs get at most :data:`MID_SHARE` of the budget (fewer of
    them, further apart, when they would take more).

    >>> p = fit_budget(600, images_per_s=640, batch_size=64, val_seconds=10, n_train=6_400,
    ...                n_val=1_000, max_steps=10_000)
    >>> p.total_steps, p.steps_per_epoch, p.epochs   # an epoch: 100 steps (10 s) + 10 s
    (3000, 100, 30.0)
    """
    spe = steps_per_epoch(n_train, batch_size)
    step = batch_size / images_per_s
    rule = {"checks": checks, "mid_epoch_above": mid_epoch_above, "subsample": subsample}

    def longest(extra: float) -> int:
        """The most steps whose training and epoch-end validations fit with ``extra`` seconds."""
        low, high = 0, max(0, max_steps)
        while low < high:  # the cost grows with the steps: bisect
            middle = (low + high + 1) // 2
            if middle * step + -(-middle // spe) * val_seconds + extra <= seconds:
                low = middle
            else:
                high = middle - 1
        return low

    first = longest(0.0)
    plan = cadence(n_train, n_val, spe, first, basis="time", **rule)
    if first == 0 or plan.val_every is None:
        return plan
    mid_seconds = val_seconds * (plan.subsample / n_val if plan.subsample else 1.0)
    wanted = plan.checks(0, first)[1]
    affordable = int(MID_SHARE * seconds / mid_seconds) if mid_seconds > 0 else wanted
    allowed = min(wanted, affordable)
    total = longest(allowed * mid_seconds)
    if total == 0:  # no room for them after all
        total, allowed = first, 0
    plan = cadence(n_train, n_val, spe, total, basis="time", **rule)
    every = plan.val_every if allowed else None
    while every is not None and Plan(total, spe, every).checks(0, total)[1] > allowed:
        every = every + 1 if every + 1 < min(spe, total) else None  # fewer, further apart
    return Plan(total, spe, every, plan.subsample if every else None, "time")


def format_duration(seconds: float) -> str:
    """``45s``, ``3m20s``, ``1h05m`` (rounded to the second)."""
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
