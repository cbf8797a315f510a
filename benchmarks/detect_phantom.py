"""Detection: the default detector on the detection phantoms (and BCCD), against the boxes a
classifier's Grad-CAM maps give on the same test images.

1. `medsight data synth --detect` (1,200 slices, 64 px, 0–3 nodules or cysts each), `medsight
   train --task detect` with no other flag, `medsight evaluate`: mAP, lesion sensitivity at the
   7 FROC rates, median IoU of found lesions, image-level AUROC, with 95 % bootstrap intervals
   over the test images; training img/s (from history.csv) and inference img/s (torch, ONNX
   Runtime; one image per call, as a server scores uploads).
2. The Grad-CAM box baseline on the same split: the default multi-label recipe trained on the
   same images (a finding per box class, present when the image has a box of it), a Grad-CAM
   map per finding (the run's default layer and stages 1-3 fused), one box per connected region
   of the map at half its peak, scored by the finding's probability × the region's peak;
   then the same metrics.
3. With --bccd: the detector on BCCD (blood-smear microscopy, Pascal VOC, its own splits).

Prints markdown tables. Usage:
    python benchmarks/detect_phantom.py [--work /tmp/detb] [--seed 0] [--bccd PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from medsight import runs
from medsight.config import DataConfig, TrainConfig
from medsight.data.synth import write_detection_phantoms
from medsight.evaluation.evaluate import evaluate_run
from medsight.stats import format_value_ci
from medsight.tasks import get_task
from medsight.tasks.detect_metrics import detection_metrics
from medsight.training.trainer import train

FUSED = "backbone.stage1,backbone.stage2,backbone.stage3"
ROWS = (
    ("map50", "mAP @ IoU 0.5"),
    ("map", "mAP @ IoU 0.5:0.95"),
    ("sensitivity_at_1fp", "lesion sensitivity at 1 FP/image"),
    ("froc_score", "FROC score (mean of 7 rates)"),
    ("median_iou", "median IoU of found lesions"),
    ("auroc_macro", "image-level AUROC (macro)"),
)


def _train_detector(data: Path, out: Path) -> tuple[runs.Run, float]:
    started = time.perf_counter()
    run = train(TrainConfig(task="detect", data=DataConfig(path=str(data)), out=str(out)),
                overwrite=True)  # fmt: skip
    return run, time.perf_counter() - started


def _throughput(run: runs.Run) -> dict:
    """Training img/s from history.csv; inference img/s, torch and ONNX, one image per call."""
    from medsight.inference import Predictor

    history = run.history()
    train_rate = history["images_seen"].iloc[-1] / history["train_seconds"].sum()
    x = np.random.default_rng(0).normal(size=(32, run.preprocess.channels, *run.preprocess.size))
    x = x.astype(np.float32)
    rates = {"train": float(train_rate)}
    for backend in ("torch", "onnx"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            predictor = Predictor.from_run(run.path, backend=backend)
        predictor.predict_array(x[:2])  # warm up
        started = time.perf_counter()
        for image in x:
            predictor.predict_array(image[None])
        rates[backend] = len(x) / (time.perf_counter() - started)
    return rates


def _detector_best_iou(run: runs.Run) -> float:
    from medsight.inference import Predictor

    task = get_task("detect")
    table = task.prepare_table(run.load_data())
    test = table[table["split"] == "test"]
    pred = Predictor.from_run(run.path).predict_table(test)
    return best_iou_per_lesion(task.table_targets(test, run.classes), pred)


def _metrics_table(columns: dict[str, dict]) -> str:
    names = list(columns)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label in ROWS:
        cells = [format_value_ci(columns[n].get(key)) if columns[n].get(key) else "—"
                 for n in names]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if all("best_iou" in columns[n] for n in names):
        cells = [f"{columns[n]['best_iou']:.3f}" for n in names]
        lines.append("| median best IoU per lesion (any score) | " + " | ".join(cells) + " |")
    for i, rate in enumerate(("0.125", "0.25", "0.5", "1", "2", "4", "8")):
        cells = [format_value_ci(columns[n]["froc"]["sensitivity"][i]) for n in names]
        lines.append(f"| sensitivity at {rate} FP/image | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cam_boxes(run_path: Path, rows: pd.DataFrame, classes: list[str], layer: str | None):
    """The Grad-CAM box baseline's ``(N, D, 6)`` outputs for ``rows`` (normalised corners)."""
    from scipy import ndimage

    from medsight.data.imaging import decode
    from medsight.explain.cam import Explainer

    explainer = Explainer.from_run(run_path, method="gradcam", layer=layer)
    run = runs.Run.load(run_path)
    findings = list(run.classes)
    out = np.zeros((len(rows), 100, 6), np.float32)
    out[:, :, 5] = -1
    for i, source in enumerate(rows["source"]):
        x = run.preprocess(decode(source))[None]
        probs = explainer.predict(x)[0]
        found = []
        for k, name in enumerate(findings):
            cam = explainer.explain(x, target=name)
            regions, count = ndimage.label(cam >= 0.5)
            h, w = cam.shape
            for r, box in enumerate(ndimage.find_objects(regions), start=1):
                ys, xs = box
                peak = float(cam[regions == r].max())
                found.append((xs.start / w, ys.start / h, xs.stop / w, ys.stop / h,
                              float(probs[k]) * peak, classes.index(name)))  # fmt: skip
        found.sort(key=lambda b: -b[4])
        for j, det in enumerate(found[:100]):
            out[i, j] = det
    return out


def best_iou_per_lesion(gt: np.ndarray, pred: np.ndarray) -> float:
    """The median, over lesions, of the best IoU any box of its class reaches (at any score):
    how well the boxes could fit, before any threshold (the IoU the CAM-box figures of
    `explain --masks` report)."""
    import torch
    from torchvision.ops import box_iou

    best = []
    for g, p in zip(gt, pred):
        for box in g[g[:, 4] >= 0]:
            same = p[(p[:, 5] == box[4]) & (p[:, 4] > 0)]
            if not len(same):
                best.append(0.0)
                continue
            iou = box_iou(torch.as_tensor(box[None, :4]), torch.as_tensor(same[:, :4]))
            best.append(float(iou.max()))
    return float(np.median(best))


def _baseline(work: Path, data: Path, det_run: runs.Run, classes: list[str]) -> dict:
    """Train the multi-label default recipe on the detector's own splits; CAM boxes → metrics."""
    task = get_task("detect")
    table = task.prepare_table(det_run.load_data())
    manifest = work / "findings.csv"
    frame = pd.DataFrame({"path": table["source"], "patient_id": table["patient_id"],
                          "split": table["split"]})  # fmt: skip
    targets = task.targets(table["label"], classes)
    for k, name in enumerate(classes):
        frame[name] = targets[:, k].astype(int)
    frame.to_csv(manifest, index=False)
    started = time.perf_counter()
    config = TrainConfig(data=DataConfig(path=str(manifest), labels=",".join(classes)),
                         out=str(work / "cam_run"))  # fmt: skip
    cam_run = train(config, overwrite=True)
    seconds = time.perf_counter() - started
    test = table[table["split"] == "test"].reset_index(drop=True)
    gt = task.table_targets(test, classes)
    results = {}
    for name, layer in (
        ("Grad-CAM box (default layer)", None),
        ("Grad-CAM box (stages 1-3)", FUSED),
    ):
        pred = _cam_boxes(cam_run.path, test, classes, layer)
        results[name] = detection_metrics(gt, pred, classes, n_bootstrap=1000, seed=0)
        results[name]["best_iou"] = best_iou_per_lesion(gt, pred)
    return {"metrics": results, "seconds": seconds, "model": cam_run.config.model.name}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, help="keep data and runs here (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=1200)
    parser.add_argument("--bccd", type=Path, help="a BCCD folder (Pascal VOC) to train on too")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="detb-"))
    data = work / "lesions"
    write_detection_phantoms(data, n=args.n, size=64, seed=args.seed)

    run, seconds = _train_detector(data, work / "det_run")
    metrics = evaluate_run(run.path)
    metrics["best_iou"] = _detector_best_iou(run)
    rates = _throughput(run)
    history = run.history()
    print(f"\n## Detection phantoms: {args.n} slices, seed {args.seed}, test n = {metrics['n']} "
          f"images, {metrics['n_lesions']} lesions\n")  # fmt: skip
    print(f"detector {run.config.model.name} at {run.preprocess.size[0]} px: trained in "
          f"{seconds:.0f} s ({len(history)} validations, best map50 "
          f"{history['val_map50'].max():.3f}); training {rates['train']:.1f} img/s, inference "
          f"torch {rates['torch']:.1f} img/s, ONNX Runtime {rates['onnx']:.1f} img/s "
          "(one image per call)\n")  # fmt: skip
    columns = {"FCOS detector": metrics}
    if not args.no_baseline:
        classes = list(run.classes)
        base = _baseline(work, data, run, classes)
        print(f"CAM baseline: {base['model']} multi-label run trained in {base['seconds']:.0f} s\n")
        columns.update(base["metrics"])
    print(_metrics_table(columns))
    (work / "detect_benchmark.json").write_text(json.dumps(columns, default=float, indent=1))

    if args.bccd:
        run, seconds = _train_detector(args.bccd, work / "bccd_run")
        metrics = evaluate_run(run.path)
        rates = _throughput(run)
        print(f"\n## BCCD (Pascal VOC, its own splits): test n = {metrics['n']} images, "
              f"{metrics['n_lesions']} cells\n")  # fmt: skip
        print(f"detector at {run.preprocess.size[0]} px, trained in {seconds:.0f} s; training "
              f"{rates['train']:.1f} img/s, inference torch {rates['torch']:.1f} img/s, ONNX "
              f"{rates['onnx']:.1f} img/s\n")  # fmt: skip
        print(_metrics_table({"FCOS detector": metrics}))
        per_class = metrics["per_class"]
        print("\n| class | cells | AP @ 0.5 | AP @ 0.5:0.95 |\n|---|---|---|---|")
        for name, entry in per_class.items():
            print(f"| {name} | {entry['n_lesions']} | {format_value_ci(entry['ap50'])} | "
                  f"{format_value_ci(entry['ap'])} |")  # fmt: skip


if __name__ == "__main__":
    main()
