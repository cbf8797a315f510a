"""Train a classifier from a :class:`~medsight.config.TrainConfig` into a run directory.

:func:`train` reads and splits the data, builds the model in the chosen transfer mode, plans
the run (``training.budget``: the epochs that follow from the training-set size or fit a time
budget, and when to validate) and runs a short loop of training steps and validations. What
happens around it lives in handlers (``handlers.py``): best weights and early stopping on a
validation metric, the time budget, an atomic checkpoint after every epoch
(``checkpoints/last.pt``, so a stopped run resumes where it was), the history, the experiment
logger and the events a user sees. Randomness is re-seeded per epoch, which makes a resumed CPU
run end with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Subset,
    TensorDataset,
    WeightedRandomSampler,
)

from medsight import runs
from medsight.config import TrainConfig, parse_duration
from medsight.data import imaging
from medsight.data.datasets import ImageDataset
from medsight.data.imaging import decode
from medsight.data.sources import load_samples
from medsight.data.splits import assign_splits, fold_splits
from medsight.data.transforms import (
    Preprocess,
    augmentation,
    box_augmentation,
    volume_augmentation,
)
from medsight.data.volumes import VolumePreprocess
from medsight.devices import autocast, describe, grad_scaler, resolve_device, resolve_precision
from medsight.errors import ConfigError, DataError, ImageDecodeError, TrainingError
from medsight.events import Note, ProgressAdvance, ProgressEnd, ProgressStart, Reporter, silent
from medsight.tasks import Task, get_task, task_for
from medsight.training import distributed
from medsight.training.budget import (
    BUDGET_STRETCH,
    Pace,
    Plan,
    auto_epochs,
    cadence,
    fit_budget,
    format_duration,
    steps_per_epoch,
)
from medsight.training.features import extract_features
from medsight.training.handlers import (
    LAST_CHECKPOINT,
    Checkpoint,
    CommitRun,
    EarlyStopping,
    Engine,
    EpochCallback,
    ExperimentLog,
    Handler,
    History,
    ReportEvents,
    TimeBudget,
    TrainState,
    WeightAverage,
    fire,
    weight_average,
)
from medsight.training.optim import build_optimizer, build_scheduler
from medsight.training.recipe import PRETRAINED_CNN, choose_model

#: The batch size ``batch_size: auto`` takes, unless the training set is smaller.
AUTO_BATCH_SIZE = 64
#: A time budget is planned on this share of what is left, for throughput that varies.
BUDGET_MARGIN = 0.95
#: Steps timed before a budget is planned (fewer when they take more than a tenth of it).
MEASURED_STEPS = 12

#: The clock of time budgets (tests replace it with a fake one).
_clock: Callable[[], float] = time.monotonic


def history_columns(task: Task) -> list[str]:
    """The columns of ``history.csv``, one row per validation: where training stood (epoch,
    passes done, optimiser steps, training images seen, validation images used), the training
    loss since the previous validation, the task's validation scores, and timing."""
    metrics = [f"val_{name}" for name in task.validation_metrics]
    where = ["epoch", "epoch_fraction", "step", "images_seen", "val_images"]
    return [*where, "train_loss", "val_loss", *metrics, "lr", "train_seconds", "seconds"]


def train(
    config: TrainConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    time_budget: str | None = None,
    events: Reporter | None = None,
    show_progress: bool = True,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> runs.Run | None:
    """Train as ``config`` says and return the finished :class:`~medsight.runs.Run` (None in
    the processes other than rank 0 when ``torchrun`` started several: rank 0 writes the run).

    ``events`` receives what a user would want to see (:mod:`medsight.events`: the plan,
    progress, each validation's scores, early stopping, the best epoch); by default nothing is
    reported, and ``show_progress=False`` leaves out the per-batch progress events.
    ``on_epoch(epoch, row)`` is called after each epoch with the history row of its last
    validation (``val_auroc``…); an exception it raises (a tuning trial being pruned) stops
    training there, with the best weights and the checkpoint already saved.
    With ``resume``, ``config`` gives the run's folder (``out``) and the ``device`` and
    ``precision`` to go on with; the rest comes from the run's own ``config.yaml``.
    ``time_budget`` (``"10m"``): for a new run, the same as ``config.optim.time``; with
    ``resume``, that much more time (else the run continues with what is left of its budget).
    A new run's folder appears at ``config.out`` with its first checkpoint (replacing an old
    one only then, with ``overwrite``); a start that fails before leaves nothing there.

    >>> from medsight.config import TrainConfig, DataConfig
    >>> run = train(TrainConfig(data=DataConfig(path="phantom/"), out="runs/p"))  # doctest: +SKIP
    """
    started = _clock()
    if time_budget is not None:
        _seconds(time_budget)  # refused before anything starts
    context, device = distributed.start(config.device)
    try:
        new_run, scratch = None, None
        if resume:
            out = runs.prepare_run_dir(config.out, resume=True)
            # The run continues where it lies, also when its folder was moved or copied, and on
            # the hardware ``config`` names (a run begun on a GPU goes on on a CPU, or vice versa).
            hardware = {"out": str(out), "device": config.device, "precision": config.precision}
            config = TrainConfig.from_yaml(out / runs.CONFIG).with_overrides(hardware)
        elif time_budget is not None:
            config = config.with_overrides({"optim.time": time_budget})
        if not resume and context.main:
            # Built beside its place and moved there at the first checkpoint: a start that fails
            # (bad data, a budget too short, an interrupt) leaves no run folder behind.
            new_run = runs.NewRun(config.out, overwrite=overwrite)
            out = new_run.path
        elif not resume:
            # Only rank 0 writes the run; the others keep what they must not share here.
            scratch = tempfile.TemporaryDirectory(prefix=f"medsight-rank{context.rank}-")
            out = Path(scratch.name)
        with new_run or nullcontext(), scratch or nullcontext():
            setup = _Setup.build(config, out, context, device)
            return _fit(
                setup,
                resume=resume,
                new_run=new_run,
                events=(events or silent) if context.main else silent,
                show_progress=show_progress and context.main,
                on_epoch=on_epoch,
                started=started,
                time_budget=time_budget,
            )
    finally:
        distributed.stop(context)


# --------------------------------------------------------------------------- set-up


@dataclass
class _Setup:
    config: TrainConfig
    out: Path
    task: Task
    table: pd.DataFrame
    classes: list[str]
    positive: str | None  # None: a task without one urgent class (multi-label findings)
    preprocess: Preprocess
    model: torch.nn.Module
    train_set: ImageDataset
    val_set: ImageDataset
    device: torch.device
    notes: list[str] = field(default_factory=list)  # what the set-up chose that a user should know
    #: The training processes (one, unless torchrun started several).
    context: distributed.Context = field(default_factory=distributed.Context)

    @property
    def process_batch(self) -> int:
        """Images each process takes per step (the global batch split over the processes)."""
        return self.batch_size // self.context.world_size

    @property
    def batch_size(self) -> int:
        """The resolved batch size (``auto`` became a number in :meth:`build`)."""
        return int(self.config.optim.batch_size)

    @classmethod
    def build(
        cls,
        config: TrainConfig,
        out: Path,
        context: distributed.Context | None = None,
        device: torch.device | None = None,
    ) -> _Setup:
        from medsight.models import create_model, get_spec

        context = context or distributed.Context()
        device = device if device is not None else resolve_device(config.device)
        config = config.with_overrides({"precision": resolve_precision(config.precision, device)})
        _seed(config.seed)
        d = config.data
        table = load_samples(d.path, options=d)
        config = config.with_overrides({"task": task_for(config.task, table)})
        task = get_task(config.task)
        table = task.prepare_table(table)
        monitor = config.optim.monitor
        if monitor != "loss" and monitor not in task.validation_metrics:
            config = config.with_overrides({"optim.monitor": task.validation_metrics[-1]})
        table = assign_splits(table, ratios=d.ratios, seed=config.seed)
        if d.folds is not None:
            table = fold_splits(table, d.folds, d.fold, seed=config.seed)
        classes, notes = task.check_training_table(table)
        notes = [*table.attrs.get("notes", []), *notes]  # what the reader normalised
        n_train = int((table["split"] == "train").sum())
        config, batch_notes = _resolve_batch_size(config, n_train, task.default_batch_size)
        if config.optim.lr == "auto":  # the number config.yaml records
            config = config.with_overrides({"optim.lr": task.default_lr})
        if context.active:
            config, more = _distributed_batch(config, context)
            batch_notes += more
        notes += batch_notes
        positive = task.positive_class(classes, d.positive_class)
        if config.optim.balanced_sampler and not task.samples_by_class:
            raise ConfigError(f"--balanced samples by class; a {task.name} run has none to use")

        dims = int(table.attrs.get("dims", 2))
        slices = d.slices
        if slices is not None and dims != 3:
            raise ConfigError(
                f"--slices {slices} feeds adjacent slices of volumes to a 2-D network; these data "
                "are 2-D images: leave --slices out"
            )
        if slices is not None and slices % 2 == 0:
            raise ConfigError(f"--slices must be odd (slices around the middle one), got {slices}")
        model_dims = 2 if slices is not None else dims
        if dims == 3:
            native_channels, native_side, intensity = _probe_volumes(
                table[table["split"] == "train"], table.attrs.get("volume")
            )
        else:
            native_channels, native_side = _probe(table[table["split"] == "train"])
        if config.model.name == "auto" and model_dims == 3:
            config, note = _resolve_auto_model_3d(config, native_side)
            notes.append(note)
        elif config.model.name == "auto":
            config, note = _resolve_auto_model(config, native_side, table, task)
            notes.append(note)
        spec = get_spec(config.model.name)
        _check_dims(spec, model_dims, slices)
        task.check_model(spec)
        mode = config.optim.mode
        pretrained = config.model.pretrained and mode != "scratch"
        if mode in ("features", "finetune") and not (pretrained or config.model.weights):
            raise ConfigError(
                f"--mode {mode} trains on top of learned features: add --pretrained or "
                "--weights FILE|RUN (or use --mode full / scratch to train from random weights)"
            )
        d = config.data
        side = d.image_size or task.input_side(native_side, spec.default_size)
        if model_dims == 3 and not d.image_size:
            side = min(native_side, AUTO_SIDE_3D)
        if spec.family != "custom":
            side = max(side, 32)  # ImageNet CNNs downsample 32x: smaller inputs vanish
        in_chans = _input_channels(d.channels, native_channels, pretrained, config.model.weights)
        if slices is not None:
            in_chans = slices
        if pretrained or config.model.weights:
            mean = tuple(spec.mean) if in_chans == 3 else (float(np.mean(spec.mean)),)
            std = tuple(spec.std) if in_chans == 3 else (float(np.mean(spec.std)),)
        else:
            mean, std = (0.5,) * in_chans, (0.5,) * in_chans
        if dims == 3:
            if d.intensity != "auto":
                intensity = d.intensity
            preprocess = VolumePreprocess.build(
                side,
                intensity=intensity,
                spacing=d.spacing,
                channels=in_chans,
                mean=mean,
                std=std,
                slices=slices,
                tilt=d.tilt,
            )
            shape = f"{side}³ voxels" if slices is None else f"{slices} axial slices at {side} px"
            notes.append(
                f"volumes: {shape}, intensity {intensity}, "
                + (f"resampled to {d.spacing} mm" if d.spacing else "resized to the input size")
            )
        else:
            preprocess = Preprocess(
                size=(side, side),
                channels=in_chans,
                mean=mean,
                std=std,
                window=d.window,
                volume_slice=_volume_slice(table, d),
            )

        model = create_model(
            config.model.name,
            len(classes),
            in_chans=in_chans,
            pretrained=pretrained,
            weights=config.model.weights,
            attention=config.model.attention,
            drop_rate=config.model.drop_rate,
            image_size=side,
            pool=config.model.pool,
        )
        n_stages = len(model.stage_names())
        if mode == "features" and context.active:
            raise ConfigError(
                "--mode features trains a head on cached embeddings, which one process does in "
                "seconds; run it without torchrun (or --nproc), or use --mode finetune / full"
            )
        if mode == "features" and not hasattr(model, "forward_head"):
            raise ConfigError(
                f"--mode features trains a classifier head on cached embeddings; {spec.name} "
                "has no such head: use --mode finetune (frozen early stages) or full"
            )
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

        make_augment = box_augmentation if task.augments_boxes else augmentation
        augment = (
            make_augment(config.optim.augment, in_chans, config.optim.augment_strength)
            if mode != "features" and model_dims == 2
            else None
        )
        if model_dims == 3 and mode != "features":
            augment = volume_augmentation(config.optim.augment, config.optim.augment_strength)
        train_rows = table[table["split"] == "train"]
        cache_side = 128 if config.data.cache else 0
        val_rows = table[table["split"] == "val"]
        precision = config.precision if config.precision != "fp32" else "fp32 (no autocast)"
        notes.append(f"training on {describe(device)}, {precision}")
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
                train_rows,
                preprocess,
                classes,
                augment=augment,
                cache_max_side=cache_side,
                targets=task.table_targets(train_rows, classes),
            ),
            val_set=ImageDataset(
                val_rows,
                preprocess,
                classes,
                cache_max_side=cache_side,
                targets=task.table_targets(val_rows, classes),
            ),
            device=device,
            notes=notes,
            context=context,
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
            "trained_on": self.hardware(),
        }
        runs.write_json(out / runs.MODEL, model_info)
        self.preprocess.save(out / runs.PREPROCESS)
        runs.write_json(out / runs.CLASSES, {"classes": self.classes, "positive": self.positive})
        runs.write_json(out / runs.VERSIONS, runs.library_versions())
        columns = [c for c in ("sample_id", "label", "patient_id", "split") if c in self.table]
        runs.write_text(out / runs.SPLITS, self.table[columns].to_csv(index=False))

    def hardware(self) -> dict:
        """Where and how the run trains, as ``model.json`` records it."""
        context = self.context
        found = {
            "device": describe(self.device),
            "precision": self.config.precision,
            "processes": context.world_size,
        }
        if context.active:
            found.update(
                backend=context.backend,
                batch_per_process=self.process_batch,
                effective_batch=self.batch_size,
                lr_scaling="none: --batch-size is the global batch, which the lr is for",
            )
        return found


def _distributed_batch(config: TrainConfig, context: distributed.Context):
    """The global batch split over ``context.world_size`` processes; a batch that does not
    split evenly becomes the nearest smaller one that does (said in a note)."""
    world = context.world_size
    batch = int(config.optim.batch_size)
    if batch < world:
        raise ConfigError(
            f"batch size {batch} is smaller than the {world} training processes; each process "
            f"needs at least one image a step: give --batch-size {world} or more"
        )
    per_process = batch // world
    notes = [
        f"{world} processes ({context.backend}): effective batch {per_process * world} = "
        f"{world} × {per_process} a process; the learning rate is the config's "
        f"({config.optim.lr}), unscaled, since --batch-size is the global batch"
    ]
    if per_process * world != batch:
        notes.append(
            f"batch size {batch} does not split over {world} processes; using {per_process * world}"
        )
        config = config.with_overrides({"optim.batch_size": per_process * world})
    return config, notes


def _resolve_auto_model(
    config: TrainConfig, native_side: int, table: pd.DataFrame, task: Task
) -> tuple[TrainConfig, str]:
    """``--model auto`` → the network the recipe picks for these data (or the task's own, for
    a task with one kind of network), written into the config (so ``config.yaml`` names it and
    reproduces the run), and the reason to report."""
    from medsight.models.weights import package_weights_file

    if task.default_model is not None:
        from medsight.models import get_spec

        spec = get_spec(task.default_model)
        pretrained = config.optim.mode != "scratch" and spec.offline_weights
        resolved = config.with_overrides({"model.name": spec.name, "model.pretrained": pretrained})
        start = "ImageNet weights" if pretrained else "random weights"
        return resolved, f"--model auto chose {spec.name} for --task {task.name}, from {start}"

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


def _resolve_batch_size(
    config: TrainConfig, n_train: int, default: int = AUTO_BATCH_SIZE
) -> tuple[TrainConfig, list[str]]:
    """``batch_size: auto`` becomes 64, or the training set's size when smaller (said in a
    note); the number is what the run's config.yaml records. A batch size given explicitly
    and larger than the training set is refused."""
    requested = config.optim.batch_size
    if requested != "auto":
        if requested > n_train:
            raise ConfigError(
                f"batch_size={requested} is larger than the training set ({n_train} images); "
                "lower --batch-size, or leave it out: the default adapts to small sets"
            )
        return config, []
    size = min(default, n_train)
    notes = []
    if size < default:
        notes.append(
            f"batch size {size}: the training set has {n_train} images, fewer than the "
            f"default {default}"
        )
    return config.with_overrides({"optim.batch_size": size}), notes


def _volume_slice(table: pd.DataFrame, d) -> tuple[int, int | None] | None:
    """The slice a 2-D run takes of each volume when it learns from NIfTI slices (``--slice``,
    ``--axis``, ``--dims 2``), so prediction takes the same; None when it learns from images."""
    # Python strings, not an Arrow column: file names that are not UTF-8 stay readable.
    from_volumes = any(
        source.startswith("nifti://")
        or ("://" not in source and imaging.has_extension(source, imaging.NIFTI_EXTENSIONS))
        for source in map(str, table["source"])
    )
    return (int(d.nifti_axis), d.nifti_slice) if from_volumes else None


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


def _probe_volumes(table: pd.DataFrame, volume: int | None, n: int = 8) -> tuple[int, int, str]:
    """(channels, typical largest side, intensity preset) of the first readable volumes."""
    from medsight.data.volumes import intensity_for, read_volume

    channels, sides, presets = set(), [], []
    for source in table["source"].head(n * 2):
        try:
            found = read_volume(source, volume=volume)
        except ImageDecodeError:
            continue
        channels.add(found.array.shape[0])
        sides.append(max(found.shape))
        presets.append(intensity_for(found))
        if len(sides) == n:
            break
    if not sides:
        raise DataError("none of the first training volumes can be read; run `medsight data check`")
    return max(channels), int(np.median(sides)), max(set(presets), key=presets.count)


#: The 3-D network ``--model auto`` picks, and the largest side it resizes volumes to.
AUTO_MODEL_3D = "medcnn3d_s"
AUTO_SIDE_3D = 64


def _resolve_auto_model_3d(config: TrainConfig, native_side: int) -> tuple[TrainConfig, str]:
    """``--model auto`` on volumes: the small 3-D CNN from scratch, at the volumes' own side up
    to 64 voxels (MONAI's 3-D ResNets/DenseNets are a choice: ``--model monai_resnet18_3d``)."""
    side = config.data.image_size or min(native_side, AUTO_SIDE_3D)
    resolved = config.with_overrides(
        {"model.name": AUTO_MODEL_3D, "model.pretrained": False, "data.image_size": side}
    )
    return resolved, (
        f"--model auto chose {AUTO_MODEL_3D} for volumes: a small 3-D CNN trained from scratch,"
        f" at {side}³ voxels"
    )


def _check_dims(spec, dims: int, slices: int | None = None) -> None:
    """A 2-D network on volumes, or a 3-D one on images: one line naming the way out."""
    if spec.dims == dims:
        return
    if slices is not None:
        raise ConfigError(
            f"--slices {slices} feeds slices to a 2-D network, but {spec.name} is 3-D; choose a "
            "2-D network (or leave out --slices to train it on whole volumes)"
        )
    if dims == 3:
        raise ConfigError(
            f"{spec.name} is a 2-D network but the data are volumes; choose a 3-D network "
            "(medsight models '*3d*', e.g. medcnn3d_s or monai_resnet18_3d) or feed it slices "
            "(--slices 3)"
        )
    raise ConfigError(
        f"{spec.name} is a 3-D network but the data are 2-D images; choose a 2-D network "
        "(medsight models) or give volumes (NIfTI, DICOM series with --dims 3, MedMNIST3D)"
    )


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
    new_run: runs.NewRun | None = None,
    events: Reporter,
    show_progress: bool,
    on_epoch: Callable[[int, dict], None] | None,
    started: float,
    time_budget: str | None,
) -> runs.Run | None:
    """Plan, then train and validate step after step; everything else is a handler's job."""
    optim_cfg = setup.config.optim
    for note in setup.notes:
        events(Note(note))
    train_set, val_set, forward = _inputs(setup, events if show_progress else silent)
    # Relative paths are inside engine.out, which a new run changes when it moves into place.
    where = setup.out / LAST_CHECKPOINT if resume else LAST_CHECKPOINT
    context = setup.context
    checkpoint = Checkpoint(where, resume=resume, map_location=setup.device, write=context.main)
    saved = checkpoint.saved_state
    optimizer, scaler, loss_fn = _optimiser(setup)
    workers = _workers(optim_cfg.workers, setup.train_set.caches, optim_cfg.mode == "features")
    val_loader = _val_loader(val_set, setup)
    timer = TimeBudget(_budget(setup.config, saved, time_budget), started=started, clock=_clock)
    if context.active:
        # Gradients are averaged over the processes in the backward pass; validation and the
        # weights kept use the bare module (identical on every process).
        ddp_devices = [setup.device] if setup.device.type == "cuda" else None
        forward = torch.nn.parallel.DistributedDataParallel(
            setup.model,
            device_ids=ddp_devices,
            broadcast_buffers=False,  # synced after steps
        )
    parts = _Parts(setup, forward, loss_fn, train_set, val_loader, val_loader, workers)
    if saved is not None and saved.plan:
        plan, pace = Plan(**saved.plan), Pace()
    else:
        plan, pace = context.agree(_plan(parts, optimizer, scaler, timer))
    if saved is None and context.main:
        setup.write_run_files()  # once planned: a budget refused as too short leaves no run
    schedule = build_scheduler(
        optim_cfg.schedule,
        optimizer,
        total_steps=plan.total_steps,
        warmup_steps=round(optim_cfg.warmup_epochs * plan.steps_per_epoch),
    )
    engine = Engine(
        setup.model, optimizer, schedule, scaler, setup.out, plan, setup.batch_size, pace=pace
    )
    if optim_cfg.ema > 0:
        engine.average = weight_average(setup.model, optim_cfg.ema * plan.steps_per_epoch)
    parts.mid_loader = _mid_loader(val_set, plan, setup) or val_loader
    handlers = _handlers(
        setup, checkpoint, timer, events, show_progress, on_epoch, len(train_set), len(val_set)
    )
    if new_run is not None:
        handlers.insert(1, CommitRun(new_run))  # right after the first checkpoint is written
    error = None
    try:
        fire(handlers, "on_fit_start", engine)
        _agree_stop(engine, context)
        _Loop(engine, parts, handlers).run()
    except BaseException as exc:
        error = exc
        raise
    finally:
        fire(handlers, "on_fit_end", engine, error)
    if new_run is not None:
        engine.out = new_run.commit()  # a run that ended before any epoch (no checkpoint)
    digests = context.gather(distributed.weights_digest(setup.model))
    if not context.main:
        return None
    if context.active:
        _record_replicas(Path(engine.out), digests)
    return runs.Run.load(engine.out)


def _agree_stop(engine: Engine, context: distributed.Context) -> None:
    """Every process stops where rank 0 does (its clock decides a time budget's end)."""
    if context.active:
        engine.stop, engine.stop_reason = context.agree((engine.stop, engine.stop_reason))


def _record_replicas(out: Path, digests: list[str]) -> None:
    """``model.json``'s ``trained_on`` gains each process's weights digest: equal digests
    show the replicas stayed identical; unequal ones are an error, since the run would depend
    on which process wrote it."""
    info = json.loads((out / runs.MODEL).read_text())
    info["trained_on"]["weights_sha256_by_rank"] = digests
    runs.write_json(out / runs.MODEL, info)
    if len(set(digests)) != 1:
        raise TrainingError(
            f"the {len(digests)} training processes ended with different weights "
            f"({', '.join(d[:12] for d in digests)}); the run in {out} holds rank 0's"
        )


@dataclass
class _Parts:
    """What the loop trains and validates with."""

    setup: _Setup
    forward: Callable
    loss_fn: torch.nn.Module
    train_set: object
    val_loader: DataLoader  # the whole validation split
    mid_loader: DataLoader  # what validations within an epoch use (a subsample, or the same)
    workers: int

    @property
    def features(self) -> bool:
        """Training the head alone on cached embeddings (``--mode features``)."""
        return self.setup.config.optim.mode == "features"


class _Loop:
    """Steps and validations as the plan says: within an epoch every ``plan.val_every`` steps,
    and at its end (or the run's) on the whole split."""

    def __init__(self, engine: Engine, parts: _Parts, handlers: list[Handler]):
        self.engine, self.parts, self.handlers = engine, parts, handlers
        setup = parts.setup
        positive = setup.positive
        self.positive_index = setup.classes.index(positive) if positive is not None else -1
        self.n_val = len(parts.val_loader.dataset)
        self._window()

    def _window(self) -> None:
        """Start counting the training loss and time up to the next validation."""
        self.loss_sum, self.seen, self.train_seconds = 0.0, 0, 0.0
        self.window_start = time.perf_counter()

    def run(self) -> None:
        engine, plan = self.engine, self.engine.plan
        while engine.state.step < plan.total_steps and not engine.stop:
            self.epoch()

    def epoch(self) -> None:
        engine, parts, plan, state = self.engine, self.parts, self.engine.plan, self.engine.state
        setup = parts.setup
        epoch = state.step // plan.steps_per_epoch + 1
        engine.epoch, engine.batch = epoch, state.step % plan.steps_per_epoch
        loader = _train_loader(parts.train_set, setup, epoch, parts.workers, skip=engine.batch)
        engine.model.train()
        last = None
        tick = time.perf_counter()
        for x, y in loader:
            loss = _step(engine, parts, x, y)
            if not torch.isfinite(loss):
                raise TrainingError(_nan_loss_message(loss.item(), epoch, engine))
            state.step += 1
            state.images_seen += len(y) * setup.context.world_size  # all processes' images
            engine.batch += 1
            self.loss_sum += loss.item() * len(y)
            self.seen += len(y)
            engine.loss = self.loss_sum / self.seen
            now = time.perf_counter()
            engine.pace.observe_step(now - tick)
            self.train_seconds += now - tick
            fire(self.handlers, "on_batch_end", engine)
            _agree_stop(engine, setup.context)
            check = plan.check_at(state.step)
            if engine.stop or check == "end":
                break
            if check == "mid":
                last = self.validate(ending=False)
                if engine.stop:
                    break
                engine.model.train()
            tick = time.perf_counter()
        # the epoch's (or the run's) last validation is on the whole split, unless one just was
        if last is None or last["step"] != state.step or last["val_images"] < self.n_val:
            last = self.validate(ending=True)
        state.epoch = epoch
        if engine.stop or state.step >= plan.total_steps:
            state.stopped = engine.stop_reason or "done"
        engine.epoch_ending = True
        fire(self.handlers, "on_epoch_end", engine, last)
        engine.epoch_ending = False

    def validate(self, *, ending: bool) -> dict:
        engine, parts, state = self.engine, self.parts, self.engine.state
        loader = parts.val_loader if ending else parts.mid_loader
        started = time.perf_counter()
        model = engine.evaluated
        forward = model.forward_head if parts.features else model
        metrics = _validate(forward, model, loader, parts.setup, self.positive_index)
        loss_sum, seen = parts.setup.context.sum(self.loss_sum, self.seen)
        engine.pace.observe_validation(time.perf_counter() - started, mid=not ending)
        engine.score = parts.setup.task.monitor_score(parts.setup.config.optim.monitor, metrics)
        if ending and engine.schedule is not None:
            engine.schedule.after_epoch(engine.score)
        row = {
            "epoch": engine.epoch,
            "epoch_fraction": round(state.step / engine.plan.steps_per_epoch, 4),
            "step": state.step,
            "images_seen": state.images_seen,
            "val_images": len(loader.dataset),
            "train_loss": loss_sum / seen if seen else float("nan"),
            **{f"val_{k}": v for k, v in metrics.items()},
            "lr": engine.optimizer.param_groups[-1]["lr"],
            "train_seconds": round(self.train_seconds, 3),
            "seconds": round(time.perf_counter() - self.window_start, 3),
        }
        state.history.append(row)
        engine.epoch_ending = ending
        fire(self.handlers, "on_validation", engine, row)
        _agree_stop(engine, parts.setup.context)
        engine.epoch_ending = False
        self._window()
        return row


def _nan_loss_message(loss: float, epoch: int, engine: Engine) -> str:
    where = f"the loss became {loss} at epoch {epoch}, batch {engine.batch + 1}; training stopped"
    fix = "Lower --lr, or check the images of that batch with `medsight data check`"
    checkpoint = engine.out / LAST_CHECKPOINT
    if checkpoint.exists():
        return (
            f"{where}; the last good checkpoint is {checkpoint} (epoch {engine.state.epoch}), "
            f"with the best "
            f"weights in {engine.out / runs.WEIGHTS}. {fix}"
        )
    return f"{where} before its first checkpoint (no checkpoint yet), so no run was kept. {fix}"


def _step(engine: Engine, parts: _Parts, x, y) -> torch.Tensor:
    """One optimiser step (and the schedule's); returns the batch's loss."""
    setup, scaler = parts.setup, engine.scaler
    x, y = x.to(setup.device, non_blocking=True), y.to(setup.device, non_blocking=True)
    with autocast(setup.device, setup.config.precision):
        loss = parts.setup.task.batch_loss(parts.forward, parts.loss_fn, x, y)
    if not torch.isfinite(loss):
        return loss.detach()
    engine.optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(engine.optimizer)
    scaler.update()
    distributed.sync_buffers(setup.context, setup.model)
    if engine.schedule is not None:
        engine.schedule.after_batch()
    return loss.detach()


def _budget(config: TrainConfig, saved: TrainState | None, time_budget: str | None):
    """The time budget in seconds, all calls together: the config's for a new run; for a
    resumed one, the checkpoint's, or what it took so far plus ``time_budget`` when given."""
    if saved is None:
        text = time_budget or config.optim.time
        return _seconds(text) if text else None
    if time_budget is not None:
        return saved.elapsed + _seconds(time_budget)
    return saved.budget


def _seconds(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"--time: {exc}") from None


def _plan(parts: _Parts, optimizer, scaler, timer: TimeBudget) -> tuple[Plan, Pace]:
    """The run's :class:`Plan`: epochs given or ``auto`` (``training.budget``); with a time
    budget, as many steps as fit what is left of it at the throughput measured here (with
    ``auto``, up to 3 times the rule's epochs; a number of epochs is a cap)."""
    setup = parts.setup
    optim = setup.config.optim
    n_train, n_val = len(parts.train_set), len(parts.val_loader.dataset)
    spe = steps_per_epoch(_samples_per_process(n_train, setup.context), setup.process_batch)
    auto = optim.epochs == "auto"
    pretrained = bool(setup.config.model.pretrained or setup.config.model.weights)
    epochs = auto_epochs(n_train, pretrained) if auto else int(optim.epochs)
    rule = {
        "checks": optim.val_checks,
        "mid_epoch_above": optim.val_mid_epoch_above,
        "subsample": optim.val_subsample,
    }
    basis = "auto" if auto else "epochs"
    if timer.budget is None:
        return cadence(n_train, n_val, spe, epochs * spe, basis=basis, **rule), Pace()
    left = timer.budget - timer.elapsed()
    pace = _measure(parts, optimizer, scaler, max(left, 0.0))
    max_steps = (BUDGET_STRETCH * epochs if auto else epochs) * spe
    left = timer.budget - timer.elapsed()
    plan = fit_budget(
        left * BUDGET_MARGIN,
        images_per_s=pace.images_per_second(setup.batch_size),
        batch_size=setup.batch_size,
        val_seconds=pace.val_seconds,
        n_train=n_train,
        n_val=n_val,
        max_steps=max_steps,
        **rule,
    )
    least = min(10, spe)
    if plan.total_steps < least:
        spent = timer.elapsed()
        needed = spent + (least * pace.step_seconds + pace.val_seconds) / BUDGET_MARGIN
        raise ConfigError(
            f"--time {format_duration(timer.budget)} is too short: setting up and measuring "
            f"took {spent:.1f}s, {least} training steps take about "
            f"{least * pace.step_seconds:.1f}s and one validation pass about "
            f"{pace.val_seconds:.1f}s; give at least --time {int(needed) + 1}s"
        )
    if plan.total_steps == max_steps and not auto:  # the epochs given, not the budget
        plan = Plan(plan.total_steps, spe, plan.val_every, plan.subsample, "epochs")
    if plan.subsample:
        pace.mid_seconds = pace.val_seconds * plan.subsample / n_val
    return plan, pace


def _measure(parts: _Parts, optimizer, scaler, seconds_left: float) -> Pace:
    """Seconds per training step and per validation pass, timed on a few real steps whose
    effects are then undone (weights, optimiser, scaler and random state put back)."""
    setup, model = parts.setup, parts.setup.model
    saved = (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(optimizer.state_dict()),
        copy.deepcopy(scaler.state_dict()),
        torch.get_rng_state(),
    )
    cuda = setup.device.type == "cuda"
    probe = Engine(model, optimizer, None, scaler, setup.out, Plan(1, 1))
    limit = 0.1 * seconds_left  # measuring takes at most a tenth of the budget (2 steps at least)
    times: list[float] = []
    try:
        model.train()
        epoch = 0
        context = setup.context

        def enough() -> bool:  # rank 0's clock decides for all processes
            return context.agree(
                len(times) >= MEASURED_STEPS or (len(times) >= 2 and sum(times) > limit)
            )

        while not enough():
            loader = _train_loader(parts.train_set, setup, epoch, parts.workers)
            epoch -= 1  # seeds no real epoch uses
            tick = time.perf_counter()
            for x, y in loader:
                _step(probe, parts, x, y)
                if cuda:
                    torch.cuda.synchronize()
                now = time.perf_counter()
                times.append(now - tick)
                tick = now
                if enough():
                    break
        model.eval()
        seen, started = 0, time.perf_counter()
        with torch.no_grad():
            for i, (x, _) in enumerate(parts.val_loader):
                parts.forward(x.to(setup.device)).float().cpu()
                seen += len(x)
                if i >= 1:
                    break
        if cuda:
            torch.cuda.synchronize()
        per_image = (time.perf_counter() - started) / max(seen, 1)
    finally:
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
        scaler.load_state_dict(saved[2])
        torch.set_rng_state(saved[3])
    steady = sorted(times[1:] if len(times) > 2 else times)  # the first one starts the loader
    step_seconds = max(steady[len(steady) // 2], 1e-6)
    val_seconds = per_image * len(parts.val_loader.dataset)
    return Pace(step_seconds, val_seconds, val_seconds)


def _mid_loader(val_set, plan: Plan, setup: _Setup) -> DataLoader | None:
    """The fixed, seeded subsample validations within an epoch use (None: the whole split)."""
    if not plan.subsample or plan.subsample >= len(val_set):
        return None
    rng = np.random.default_rng(setup.config.seed)
    chosen = np.sort(rng.choice(len(val_set), size=plan.subsample, replace=False))
    subset = Subset(val_set, chosen.tolist())
    return DataLoader(subset, batch_size=max(setup.batch_size, 128), num_workers=0)


def _handlers(
    setup: _Setup,
    checkpoint: Checkpoint,
    timer: TimeBudget,
    events: Reporter,
    show_progress: bool,
    on_epoch: Callable[[int, dict], None] | None,
    n_train: int,
    n_val: int,
) -> list[Handler]:
    """In the order they run: the checkpoint first (it restores the state the others read),
    the weight average (updated before it is validated), the best weights, the stop decisions
    and the elapsed time before the history and the events that report them. Processes other
    than rank 0 keep the same state and write nothing."""
    config, out = setup.config, setup.out
    if not setup.context.main:
        best = EarlyStopping(Path(runs.WEIGHTS), patience=config.optim.patience, write=False)
        return [checkpoint, WeightAverage(), best, timer]
    handlers = [
        checkpoint,
        WeightAverage(),
        EarlyStopping(Path(runs.WEIGHTS), patience=config.optim.patience),
        timer,
        History(Path(runs.HISTORY), history_columns(setup.task)),
        ExperimentLog(config.optim.log, out, config.model_dump(mode="json")),
        ReportEvents(
            events,
            monitor=config.optim.monitor,
            patience=config.optim.patience,
            progress=show_progress,
            shown=setup.task.progress_metrics,
            n_train=n_train,
            n_val=n_val,
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


def _optimiser(setup: _Setup):
    """The optimiser, the gradient scaler and the loss (the schedule waits for the plan)."""
    optim_cfg, model = setup.config.optim, setup.model
    counts = setup.train_set.class_counts() if optim_cfg.class_weights == "auto" else None
    loss_fn = setup.task.build_loss(counts, optim_cfg.label_smoothing, optim_cfg.loss)
    loss_fn = loss_fn.to(setup.device)
    backbone_lr = optim_cfg.lr * (optim_cfg.backbone_lr_mult if optim_cfg.mode == "finetune" else 1)
    groups = model.param_groups(optim_cfg.lr, backbone_lr, optim_cfg.weight_decay)
    optimizer = build_optimizer(optim_cfg.optimizer, groups, optim_cfg.lr)
    scaler = grad_scaler(setup.device, setup.config.precision)
    return optimizer, scaler, loss_fn


def _train_loader(dataset, setup: _Setup, epoch: int, workers: int, skip: int = 0) -> DataLoader:
    # Per-epoch seeds: the order, augmentation and dropout of epoch e never depend on how many
    # epochs ran in this process, which is what makes --resume exact. ``skip``: batches of the
    # epoch already done (a run that a time budget ended within an epoch, given more time).
    # Under torchrun every process draws the same global order from the same seed and takes
    # every N-th image of it (DistributedSampler, reseeded each epoch), with a different
    # augmentation and dropout stream per process.
    seed, batch_size, context = setup.config.seed, setup.process_batch, setup.context
    torch.manual_seed(seed * 1_000_003 + epoch + 7_777 * context.rank)
    generator = torch.Generator().manual_seed(seed * 7_919 + epoch)
    if setup.config.optim.balanced_sampler:
        targets = setup.train_set.targets
        per_class = np.bincount(targets, minlength=len(setup.classes)).astype(float)
        sample_weights = torch.as_tensor(1.0 / per_class[targets], dtype=torch.double)
        sampler = WeightedRandomSampler(sample_weights, len(targets), generator=generator)
        if context.active:
            drawn = list(sampler)
            per_rank = len(drawn) // context.world_size
            sampler = drawn[context.rank :: context.world_size][:per_rank]
    elif context.active:
        sampler = DistributedSampler(
            dataset, context.world_size, context.rank, shuffle=True, seed=seed
        )
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    if skip:
        sampler = list(sampler)[skip * batch_size :]
    n = _samples_per_process(len(dataset), context)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=setup.device.type == "cuda",
        drop_last=n > batch_size,
    )


def _samples_per_process(n: int, context: distributed.Context) -> int:
    """Training images each process sees in an epoch (DistributedSampler pads to equal)."""
    return -(-n // context.world_size)


def _val_loader(val_set, setup: _Setup) -> DataLoader:
    return DataLoader(val_set, batch_size=max(setup.batch_size, 128), num_workers=0)


@torch.no_grad()
def _validate(forward, model, loader, setup: _Setup, positive_index: int) -> dict:
    """The task's validation scores on ``loader``'s images; with several processes each
    scores every N-th image and the outputs are gathered, so all score the whole split."""
    model.eval()
    context = setup.context
    if context.active:
        shard = list(range(context.rank, len(loader.dataset), context.world_size))
        loader = DataLoader(Subset(loader.dataset, shard), batch_size=loader.batch_size)
    logits, targets = [], []
    for x, y in loader:
        with autocast(setup.device, setup.config.precision):
            logits.append(forward(x.to(setup.device)).float().cpu())
        targets.append(y)
    logits, targets = torch.cat(logits), torch.cat(targets)
    if context.active:
        logits, targets = _gathered(context, logits, targets)
    return setup.task.validation_scores(logits, targets, positive_index)


def _gathered(context: distributed.Context, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Rows sharded rank::world over the processes, gathered back into their order."""
    parts = context.gather(tensors)
    n = sum(len(p[0]) for p in parts)
    order = torch.cat([torch.arange(r, n, context.world_size) for r in range(len(parts))])
    inverse = torch.argsort(order)
    return [torch.cat([p[i] for p in parts])[inverse] for i in range(len(tensors))]


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
