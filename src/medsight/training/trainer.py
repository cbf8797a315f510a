"""Train a classifier from a :class:`~medsight.config.TrainConfig` into a run directory.

:func:`train` reads and splits the data, builds the model in the chosen transfer mode, and runs
a short loop of training and validation epochs. What happens around it lives in handlers
(``handlers.py``): best weights and early stopping on a validation metric, an atomic checkpoint
after every epoch (``checkpoints/last.pt``, so a stopped run resumes where it was), the
history, the experiment logger and the events a user sees. Randomness is re-seeded per epoch,
which makes a resumed CPU run end with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset, WeightedRandomSampler

from medsight import runs
from medsight.config import TrainConfig
from medsight.data.datasets import ImageDataset
from medsight.data.imaging import decode
from medsight.data.sources import class_names, load_samples
from medsight.data.splits import assign_splits, fold_splits
from medsight.data.transforms import Preprocess, augmentation
from medsight.errors import ConfigError, DataError, ImageDecodeError, TrainingError
from medsight.events import (
    Note,
    ProgressAdvance,
    ProgressEnd,
    ProgressStart,
    Reporter,
    silent,
)
from medsight.tasks import Task, get_task
from medsight.training.features import extract_features
from medsight.training.handlers import (
    LAST_CHECKPOINT,
    Checkpoint,
    EarlyStopping,
    Engine,
    EpochCallback,
    ExperimentLog,
    Handler,
    History,
    ReportEvents,
    fire,
)
from medsight.training.optim import build_optimizer, build_scheduler
from medsight.training.recipe import PRETRAINED_CNN, choose_model


def history_columns(task: Task) -> list[str]:
    """The columns of ``history.csv``: the task's validation metrics between loss and timing."""
    metrics = [f"val_{name}" for name in task.validation_metrics]
    return ["epoch", "train_loss", "val_loss", *metrics, "lr", "train_seconds", "seconds"]


def train(
    config: TrainConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    events: Reporter | None = None,
    show_progress: bool = True,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> runs.Run:
    """Train as ``config`` says and return the finished :class:`~medsight.runs.Run`.

    ``events`` receives what a user would want to see (:mod:`medsight.events`: progress, each
    epoch's scores, early stopping, the best epoch); by default nothing is reported, and
    ``show_progress=False`` leaves out the per-batch progress events.
    ``on_epoch(epoch, row)`` is called after each epoch with its history row (``val_auroc``…);
    an exception it raises (a tuning trial being pruned) stops training there, with the best
    weights and the checkpoint already saved.

    >>> from medsight.config import TrainConfig, DataConfig
    >>> run = train(TrainConfig(data=DataConfig(path="phantom/"), out="runs/p"))  # doctest: +SKIP
    """
    out = runs.prepare_run_dir(config.out, overwrite=overwrite, resume=resume)
    if resume:
        # The run continues where it lies, also when its folder was moved or copied.
        config = TrainConfig.from_yaml(out / runs.CONFIG).with_overrides({"out": str(out)})
    events = events or silent
    setup = _Setup.build(config, out)
    for note in setup.notes:
        events(Note(note))
    if not resume:
        setup.write_run_files()
    return _fit(
        setup,
        resume=resume,
        events=events,
        show_progress=show_progress,
        on_epoch=on_epoch,
    )


# --------------------------------------------------------------------------- set-up


@dataclass
class _Setup:
    config: TrainConfig
    out: Path
    task: Task
    table: pd.DataFrame
    classes: list[str]
    positive: str
    preprocess: Preprocess
    model: torch.nn.Module
    train_set: ImageDataset
    val_set: ImageDataset
    device: torch.device
    notes: list[str] = field(default_factory=list)  # choices made for the user, with reasons

    @classmethod
    def build(cls, config: TrainConfig, out: Path) -> _Setup:
        from medsight.models import create_model, get_spec

        _seed(config.seed)
        task = get_task(config.task)
        d = config.data
        table = load_samples(d.path, options=d)
        table = assign_splits(table, ratios=d.ratios, seed=config.seed)
        if d.folds is not None:
            table = fold_splits(table, d.folds, d.fold, seed=config.seed)
        classes = _check_table(table, config.optim.batch_size)
        positive = d.positive_class or runs.guess_positive_class(classes)
        if positive not in classes:
            raise ConfigError(f"positive_class {positive!r} is not a class; classes: {classes}")

        native_channels, native_side = _probe(table[table["split"] == "train"])
        notes = []
        if config.model.name == "auto":
            config, note = _resolve_auto_model(config, native_side, table)
            notes.append(note)
        spec = get_spec(config.model.name)
        mode = config.optim.mode
        pretrained = config.model.pretrained and mode != "scratch"
        if mode in ("features", "finetune") and not (pretrained or config.model.weights):
            raise ConfigError(
                f"--mode {mode} trains on top of learned features: add --pretrained or "
                "--weights FILE|RUN (or use --mode full / scratch to train from random weights)"
            )
        d = config.data
        side = d.image_size or (native_side if native_side <= 128 else spec.default_size)
        if spec.family != "custom":
            side = max(side, 32)  # ImageNet CNNs downsample 32x: smaller inputs vanish
        in_chans = _input_channels(d.channels, native_channels, pretrained, config.model.weights)
        if pretrained or config.model.weights:
            mean = tuple(spec.mean) if in_chans == 3 else (float(np.mean(spec.mean)),)
            std = tuple(spec.std) if in_chans == 3 else (float(np.mean(spec.std)),)
        else:
            mean, std = (0.5,) * in_chans, (0.5,) * in_chans
        preprocess = Preprocess(
            size=(side, side), channels=in_chans, mean=mean, std=std, window=d.window
        )

        model = create_model(
            config.model.name,
            len(classes),
            in_chans=in_chans,
            pretrained=pretrained,
            weights=config.model.weights,
            attention=config.model.attention,
            drop_rate=config.model.drop_rate,
        )
        n_stages = len(model.stage_names())
        if mode == "features":
            if spec.family == "custom" and config.model.attention != "none":
                raise ConfigError(
                    "--mode features freezes the whole backbone, but a custom CNN's --attention "
                    "sits inside it and would never train; use --mode full, or a timm/torchvision "
                    "backbone where attention is added on top of the frozen features"
                )
            model.freeze_stages(n_stages)
        elif mode == "finetune":
            k = (
                config.optim.freeze_stages
                if config.optim.freeze_stages is not None
                else n_stages - 1
            )
            model.freeze_stages(k)
        elif config.optim.freeze_stages:
            model.freeze_stages(config.optim.freeze_stages)

        augment = (
            augmentation(config.optim.augment, in_chans, config.optim.augment_strength)
            if mode != "features"
            else None
        )
        train_rows = table[table["split"] == "train"]
        cache_side = 128 if config.data.cache else 0
        val_rows = table[table["split"] == "val"]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(
            config=config,
            out=out,
            task=task,
            table=table,
            classes=classes,
            positive=positive,
            preprocess=preprocess,
            model=model.to(device),
            train_set=ImageDataset(
                train_rows, preprocess, classes, augment=augment, cache_max_side=cache_side
            ),
            val_set=ImageDataset(val_rows, preprocess, classes, cache_max_side=cache_side),
            device=device,
            notes=notes,
        )

    def write_run_files(self) -> None:
        out = self.out
        runs.write_text(out / runs.CONFIG, self.config.to_yaml())
        model_info = {
            "task": self.task.name,
            **self.model.config(),
            "image_size": list(self.preprocess.size),
            "mode": self.config.optim.mode,
            "frozen_stages": self.model.frozen_stages(),
            "pretrained_source": self.model.pretrained_source,
        }
        runs.write_json(out / runs.MODEL, model_info)
        self.preprocess.save(out / runs.PREPROCESS)
        runs.write_json(out / runs.CLASSES, {"classes": self.classes, "positive": self.positive})
        runs.write_json(out / runs.VERSIONS, runs.library_versions())
        columns = [c for c in ("sample_id", "label", "patient_id", "split") if c in self.table]
        runs.write_text(out / runs.SPLITS, self.table[columns].to_csv(index=False))


def _resolve_auto_model(
    config: TrainConfig, native_side: int, table: pd.DataFrame
) -> tuple[TrainConfig, str]:
    """``--model auto`` → the network the recipe picks for these data, written into the config
    (so ``config.yaml`` names it and reproduces the run), and the reason to report."""
    from medsight.models.weights import package_weights_file

    choice = choose_model(
        native_side=native_side,
        n_train=int((table["split"] == "train").sum()),
        pretrained=config.model.pretrained,
        mode=config.optim.mode,
        weights=config.model.weights,
        image_size=config.data.image_size,
        pretrained_available=package_weights_file(PRETRAINED_CNN) is not None,
        gpu=torch.cuda.is_available(),
    )
    resolved = config.with_overrides(
        {
            "model.name": choice.name,
            "model.pretrained": choice.pretrained,
            "data.image_size": choice.image_size,
        }
    )
    return resolved, f"--model auto chose {choice.name}: {choice.reason}"


def _check_table(table: pd.DataFrame, batch_size: int) -> list[str]:
    """Refuse data that cannot train a classifier, naming the class and split at fault."""
    development = table[table["split"].isin(["train", "val"])]
    unlabelled = development["label"].isna().sum()
    if unlabelled:
        raise DataError(
            f"{unlabelled} training/validation images have no label; training needs labelled data"
        )
    classes = class_names(table)
    if len(classes) < 2:
        raise DataError(f"training needs at least 2 classes, found {classes}")
    for split, minimum in (("train", 2), ("val", 1)):
        counts = development[development["split"] == split]["label"].value_counts()
        if counts.sum() == 0:
            raise DataError(f"the {split} split is empty; check the split ratios or split column")
        for name in classes:
            if counts.get(name, 0) < minimum:
                raise DataError(
                    f"class {name!r} has {counts.get(name, 0)} image(s) in the {split} split; "
                    f"at least {minimum} needed (add images or merge the class)"
                )
    n_train = int((table["split"] == "train").sum())
    if batch_size > n_train:
        raise ConfigError(
            f"batch_size={batch_size} is larger than the training set ({n_train} images); "
            "lower --batch-size"
        )
    return classes


def _probe(table: pd.DataFrame, n: int = 16) -> tuple[int, int]:
    """(channels, typical side) of the training images, from the first readable few."""
    channels, sides = set(), []
    for source in table["source"].head(n * 2):
        try:
            image = decode(source)
        except ImageDecodeError:
            continue
        channels.add(image.pixels.shape[0])
        sides.append(max(image.size))
        if len(sides) == n:
            break
    if not sides:
        raise DataError("none of the first training images can be read; run `medsight data check`")
    return (3 if 3 in channels else 1), int(np.median(sides))


def _input_channels(requested, native: int, pretrained: bool, weights: str | None) -> int:
    """Gray images feed pretrained colour backbones by replication: exact for per-channel
    ImageNet normalisation, which a summed first conv can only approximate."""
    if requested != "auto":
        return int(requested)
    if weights and (Path(weights) / runs.MODEL).exists():
        return int(json.loads((Path(weights) / runs.MODEL).read_text())["in_chans"])
    if pretrained or weights:
        return 3
    return native


def _seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- the loop


def _fit(
    setup: _Setup,
    *,
    resume: bool,
    events: Reporter,
    show_progress: bool,
    on_epoch: Callable[[int, dict], None] | None,
) -> runs.Run:
    """Train and validate, epoch after epoch; everything else is a handler's job."""
    optim_cfg, model = setup.config.optim, setup.model
    train_set, val_set, forward = _inputs(setup, events if show_progress else silent)
    engine, loss_fn = _engine(setup, len(train_set))
    handlers = _handlers(setup, resume, events, show_progress, on_epoch)
    workers = _workers(optim_cfg.workers, setup.train_set.caches, optim_cfg.mode == "features")
    val_loader = DataLoader(val_set, batch_size=max(optim_cfg.batch_size, 128), num_workers=0)
    positive_index = setup.classes.index(setup.positive)
    error = None
    try:
        fire(handlers, "on_fit_start", engine)
        for epoch in range(engine.state.epoch + 1, optim_cfg.epochs + 1):
            started = time.perf_counter()
            engine.epoch = epoch
            loader = _train_loader(train_set, setup, epoch, workers)
            train_loss = _train_epoch(engine, forward, loader, loss_fn, setup, handlers)
            train_seconds = time.perf_counter() - started
            metrics = _validate(forward, model, val_loader, setup, positive_index)
            engine.score = setup.task.monitor_score(optim_cfg.monitor, metrics)
            if engine.schedule is not None:
                engine.schedule.after_epoch(engine.score)
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                **{f"val_{k}": v for k, v in metrics.items()},
                "lr": engine.optimizer.param_groups[-1]["lr"],
                "train_seconds": round(train_seconds, 3),
                "seconds": round(time.perf_counter() - started, 3),
            }
            engine.state.epoch = epoch
            engine.state.history.append(row)
            fire(handlers, "on_epoch_end", engine, row)
            if engine.stop:
                break
    except BaseException as exc:
        error = exc
        raise
    finally:
        fire(handlers, "on_fit_end", engine, error)
    return runs.Run.load(setup.out)


def _handlers(
    setup: _Setup,
    resume: bool,
    events: Reporter,
    show_progress: bool,
    on_epoch: Callable[[int, dict], None] | None,
) -> list[Handler]:
    """In the order they run: the best weights and the stop decision first, so the checkpoint
    and the events that follow see them."""
    config, out = setup.config, setup.out
    handlers = [
        EarlyStopping(out / runs.WEIGHTS, patience=config.optim.patience),
        Checkpoint(out / LAST_CHECKPOINT, resume=resume, map_location=setup.device),
        History(out / runs.HISTORY, history_columns(setup.task)),
        ExperimentLog(config.optim.log, out, config.model_dump(mode="json")),
        ReportEvents(
            events,
            monitor=config.optim.monitor,
            patience=config.optim.patience,
            progress=show_progress,
            shown=setup.task.progress_metrics,
        ),
    ]
    if on_epoch is not None:
        handlers.append(EpochCallback(on_epoch))
    return handlers


def _inputs(setup: _Setup, events: Reporter):
    """(train set, validation set, forward): in features mode, the backbone's embeddings
    (computed once, cached) and the head alone; else the images and the whole model."""
    if setup.config.optim.mode != "features":
        return setup.train_set, setup.val_set, setup.model
    total = len(setup.train_set) + len(setup.val_set)
    events(ProgressStart("embedding images (once)", total=total))
    try:
        kw = {"cache_dir": setup.out / "features", "device": setup.device}
        kw["progress"] = lambda k: events(ProgressAdvance(k))
        train_set = TensorDataset(*extract_features(setup.model, setup.train_set, **kw))
        val_set = TensorDataset(*extract_features(setup.model, setup.val_set, **kw))
    finally:
        events(ProgressEnd())
    return train_set, val_set, setup.model.forward_head


def _engine(setup: _Setup, n_train: int) -> tuple[Engine, torch.nn.Module]:
    """The engine (model, optimiser, schedule, gradient scaler) and the loss."""
    optim_cfg, model = setup.config.optim, setup.model
    counts = setup.train_set.class_counts() if optim_cfg.class_weights == "auto" else None
    loss_fn = setup.task.build_loss(counts, optim_cfg.label_smoothing).to(setup.device)
    backbone_lr = optim_cfg.lr * (optim_cfg.backbone_lr_mult if optim_cfg.mode == "finetune" else 1)
    groups = model.param_groups(optim_cfg.lr, backbone_lr, optim_cfg.weight_decay)
    optimizer = build_optimizer(optim_cfg.optimizer, groups, optim_cfg.lr)
    steps = math.ceil(n_train / optim_cfg.batch_size)
    schedule = build_scheduler(
        optim_cfg.schedule,
        optimizer,
        epochs=optim_cfg.epochs,
        steps_per_epoch=steps,
        warmup_epochs=optim_cfg.warmup_epochs,
    )
    use_amp = optim_cfg.amp and setup.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    engine = Engine(model, optimizer, schedule, scaler, setup.out, optim_cfg.epochs, steps)
    return engine, loss_fn


def _train_loader(dataset, setup: _Setup, epoch: int, workers: int) -> DataLoader:
    # Per-epoch seeds: the order, augmentation and dropout of epoch e never depend on how many
    # epochs ran in this process, which is what makes --resume exact.
    seed = setup.config.seed
    torch.manual_seed(seed * 1_000_003 + epoch)
    generator = torch.Generator().manual_seed(seed * 7_919 + epoch)
    if setup.config.optim.balanced_sampler:
        targets = setup.train_set.targets
        per_class = np.bincount(targets, minlength=len(setup.classes)).astype(float)
        sample_weights = torch.as_tensor(1.0 / per_class[targets], dtype=torch.double)
        sampler = WeightedRandomSampler(sample_weights, len(targets), generator=generator)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(
        dataset,
        batch_size=setup.config.optim.batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=setup.device.type == "cuda",
        drop_last=len(dataset) > setup.config.optim.batch_size,
    )


def _train_epoch(engine: Engine, forward, loader, loss_fn, setup: _Setup, handlers) -> float:
    model, optimizer, scaler = engine.model, engine.optimizer, engine.scaler
    model.train()
    total, seen = 0.0, 0
    autocast = torch.autocast("cuda", dtype=torch.float16) if scaler.is_enabled() else nullcontext()
    for batch_index, (x, y) in enumerate(loader, start=1):
        x, y = x.to(setup.device, non_blocking=True), y.to(setup.device, non_blocking=True)
        with autocast:
            loss = loss_fn(forward(x), y)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss.item()} at epoch {engine.epoch}, batch {batch_index}; "
                f"training stopped and the last good checkpoint is kept in {setup.out}. "
                "Lower --lr, or check the images of that batch with `medsight data check`"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if engine.schedule is not None:
            engine.schedule.after_batch()
        total += loss.item() * len(y)
        seen += len(y)
        engine.batch, engine.loss = batch_index, total / seen
        fire(handlers, "on_batch_end", engine)
    return total / max(seen, 1)


@torch.no_grad()
def _validate(forward, model, loader, setup: _Setup, positive_index: int) -> dict:
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        logits.append(forward(x.to(setup.device)).float().cpu())
        targets.append(y)
    return setup.task.validation_scores(torch.cat(logits), torch.cat(targets), positive_index)


def _workers(requested: int | None, cached: bool, features_mode: bool) -> int:
    """DataLoader workers: none when images come from memory or the machine has ≤ 2 cores
    (there, workers decoding beside torch's compute threads made most epochs 4–30 % slower:
    benchmarks/README.md), else half the cores up to 4."""
    if requested is not None:
        return requested
    cores = os.cpu_count() or 1
    if features_mode or cached or cores <= 2:
        return 0
    return min(4, cores // 2)
