"""``medsight demo``: the main job on the embedded phantom set, offline, in a few minutes.

Generates the phantom set (or takes the user's data), checks it, trains a small CNN with
differential attention, evaluates it with confidence intervals and a subgroup audit, and writes
the HTML report. Each step is the same library call the individual commands make.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from medsight.errors import ConfigError, DataError
from medsight.events import Reporter, Step, StepDetail, silent
from medsight.stats import format_value_ci

DEMO_SUBGROUPS = ("sex", "site")
DEMO_TASKS = ("classify", "multilabel", "detect")
#: The detection demo's phantom set: 600 slices train the detector in about 2 minutes.
DEMO_DETECT_IMAGES = 600
#: The explain step's sample: enough for a rough pointing game, well under 30 s on 2 cores.
DEMO_EXPLAIN_IMAGES = 24
DEMO_FAITHFULNESS_IMAGES = 8  # the sanity check decides the default map: more than a handful
DEMO_EXPLAIN_METHODS = ("gradcam", "gradcam++", "attention")
#: The default recipe's network has no attention block to read a map from.
DEMO_FINDING_METHODS = ("gradcam", "gradcam++", "layercam")


@dataclass
class DemoResult:
    data: Path
    run: Path
    report: Path
    seconds: float


def run_demo(
    out: str | Path = "medsight-demo",
    *,
    data: str | Path | None = None,
    epochs: int = 12,
    task: str = "classify",
    overwrite: bool = False,
    events: Reporter | None = None,
) -> DemoResult:
    """Synthesise (or read), check, train, evaluate and report; returns where everything is.
    ``task="multilabel"`` draws the multi-label phantoms (nodule, cyst, calcification; none,
    one or several per slice) and trains the default recipe on them; ``task="detect"`` draws
    the detection phantoms (0–3 nodules or cysts per slice, with boxes) and trains the
    detector (FROC and mAP in the report; its boxes are its explanation, so no heat maps).
    ``events`` hears of each step, what it found, and the training (:mod:`medsight.events`)."""
    from medsight.data.checks import check_samples
    from medsight.data.sources import load_samples
    from medsight.data.synth import (
        write_detection_phantoms,
        write_multilabel_phantoms,
        write_phantom_dataset,
    )
    from medsight.evaluation.evaluate import evaluate_run
    from medsight.evaluation.report import write_report
    from medsight.training.trainer import train

    if task not in DEMO_TASKS:
        raise ConfigError(f"task={task!r}: the demo runs {' or '.join(DEMO_TASKS)}")
    multilabel, detect = task == "multilabel", task == "detect"
    n_steps = 5 if detect else 6
    events = events or silent
    started = time.perf_counter()
    out = Path(out)
    if data is None:
        data = out / {"multilabel": "findings", "detect": "lesions"}.get(task, "phantom")
        what = {"multilabel": "multi-label ", "detect": "detection "}.get(task, "")
        events(Step(1, n_steps, f"drawing the {what}phantom set into {data}"))
        if multilabel:
            write_multilabel_phantoms(data, n=1200, size=64, seed=0)
        elif detect:
            write_detection_phantoms(data, n=DEMO_DETECT_IMAGES, size=64, seed=0)
        else:
            write_phantom_dataset(data, n=1200, size=64, seed=0)
    data = Path(data)
    events(Step(2, n_steps, f"checking {data}"))
    table = load_samples(data)
    report = check_samples(table)
    if not report.usable:
        raise DataError(f"{data}: no image could be read; run `medsight data check {data}`")
    kind = {"multilabel": "findings", "detect": "box classes"}.get(task, "classes")
    events(
        StepDetail(
            f"{report.n_readable:,} readable images, {kind} {report.classes}, "
            f"{len(report.duplicates)} duplicate groups, {len(report.leakage)} leaks"
        )
    )
    run_dir = out / "run"
    if detect:
        events(Step(3, n_steps, f"training the detector (FCOS, MobileNetV2) into {run_dir}"))
        config = TrainConfig(task="detect", data=DataConfig(path=str(data)), out=str(run_dir))
    elif multilabel:
        # the default recipe: the network and the epochs follow from the data
        events(Step(3, 6, f"training the default recipe on the findings into {run_dir}"))
        config = TrainConfig(data=DataConfig(path=str(data)), out=str(run_dir))
    else:
        events(Step(3, 6, f"training medcnn_s with differential attention into {run_dir}"))
        config = TrainConfig(
            data=DataConfig(path=str(data)),
            model=ModelConfig(name="medcnn_s", attention="diff"),
            optim=OptimConfig(epochs=epochs),
            out=str(run_dir),
        )
    train(config, overwrite=overwrite, events=events)
    by = [c for c in DEMO_SUBGROUPS if c in table.columns]
    events(Step(4, n_steps, f"evaluating on the held-out test split (subgroups: {by or 'none'})"))
    metrics = evaluate_run(run_dir, by=by)
    events(StepDetail(_headline(metrics)))
    if detect:
        events(Step(5, 5, "writing the report"))
        report_path = write_report(run_dir)
        return DemoResult(data, run_dir, report_path, time.perf_counter() - started)
    events(
        Step(
            5,
            6,
            f"explaining: saliency maps of {DEMO_EXPLAIN_IMAGES} test lesions scored"
            " against their masks",
        )
    )
    _explain_step(run_dir, events, DEMO_FINDING_METHODS if multilabel else DEMO_EXPLAIN_METHODS)
    events(Step(6, 6, "writing the report"))
    report_path = write_report(run_dir)
    return DemoResult(data, run_dir, report_path, time.perf_counter() - started)


def _headline(metrics: dict) -> str:
    """The evaluation in one line: AUROC and accuracy, each finding's AUROC, or a detector's
    mAP, lesion sensitivity at 1 false positive per image and median IoU."""
    if "froc" in metrics:
        return (
            f"test mAP@0.5 {format_value_ci(metrics['map50'])}, lesion sensitivity at 1 FP/image "
            f"{format_value_ci(metrics['sensitivity_at_1fp'])}, median IoU "
            f"{format_value_ci(metrics['median_iou'])} (n={metrics['n']} images)"
        )
    if "per_finding" in metrics:
        each = ", ".join(
            f"{name} {format_value_ci(entry['auroc'])}"
            for name, entry in metrics["per_finding"].items()
        )
        return f"test AUROC per finding: {each} (n={metrics['n']})"
    return (
        f"test AUROC {format_value_ci(metrics['auroc'])}, accuracy "
        f"{format_value_ci(metrics['accuracy'])} (n={metrics['n']})"
    )


def _explain_step(run_dir: Path, events: Reporter, methods: tuple[str, ...]) -> dict | None:
    """Score a few methods on a small sample of test lesions (RUN/localisation.json), so the
    report shows the localisation table and heat-map gallery; skipped when the data has no
    masks (the user's own data)."""
    import torch

    from medsight.errors import MedsightError
    from medsight.explain.localisation import score_localisation

    threads = torch.get_num_threads()
    # One thread: for a small CNN and one image at a time, a second thread only adds
    # synchronisation (several times slower backward passes on busy cores).
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            result = score_localisation(
                run_dir,
                methods=methods,
                search_layers=True,
                limit=DEMO_EXPLAIN_IMAGES,
                faithfulness=DEMO_FAITHFULNESS_IMAGES,
                n_bootstrap=500,
            )
    except MedsightError as exc:
        events(StepDetail(f"skipped: {exc}"))
        return None
    finally:
        torch.set_num_threads(threads)
    best = result["best_method"]
    pointing = result["methods"][best]["pointing_game"]
    layer = result["methods"][best].get("layer")
    detail = (
        f"best map: {best} on {layer}, pointing game {format_value_ci(pointing)} "
        f"(n={result['n_images']})"
    )
    per_finding = result["methods"][best].get("per_finding")
    if per_finding:
        detail += "; per finding: " + ", ".join(
            f"{name} {format_value_ci(entry['pointing_game'])}"
            for name, entry in per_finding.items()
        )
    events(StepDetail(detail))
    return result
