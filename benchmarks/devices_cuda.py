"""Training and prediction on a CUDA GPU against the CPU: images/s per precision, and a run
trained on the GPU predicted and resumed on the CPU.

    python benchmarks/devices_cuda.py OUT_DIR [--quick]

On a machine without a GPU it measures the CPU rows only (the same commands), so the two
tables line up. Everything goes through the command line, as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

PY = [sys.executable, "-m", "medsight"]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    done = subprocess.run([*PY, *args], capture_output=True, text=True, check=False)
    took = time.perf_counter() - started
    print(f"$ medsight {' '.join(args)}  [{took:.1f}s rc {done.returncode}]", flush=True)
    if check and done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-4000:], flush=True)
        raise SystemExit(done.returncode)
    return done


def train_rate(run: Path) -> dict:
    """Training images/s (validation excluded) and the final validation AUROC."""
    history = pd.read_csv(run / "history.csv")
    images = history["images_seen"].iloc[-1]
    seconds = history["train_seconds"].sum()
    info = json.loads((run / "model.json").read_text())["trained_on"]
    return {
        "images_per_s": round(images / seconds, 1),
        "val_auroc": round(float(history["val_auroc"].iloc[-1]), 4),
        "device": info["device"],
        "precision": info["precision"],
    }


def predict_rate(run: Path, device: str, rows: pd.DataFrame, backend: str = "torch") -> dict:
    from medsight.inference import Predictor

    predictor = Predictor.from_run(run, backend=backend, device=device)
    predictor.predict_table(rows.head(64))  # warm-up: kernels, caches
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    probs = predictor.predict_table(rows, batch_size=256)
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    note = getattr(predictor.backend, "providers_note", "")
    return {"images_per_s": round(len(rows) / seconds, 1), "probs": probs, "note": note}


def main() -> None:
    out = Path(sys.argv[1]).resolve()
    quick = "--quick" in sys.argv
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    print("torch", torch.__version__, "| GPU:", torch.cuda.get_device_name(0) if gpu else "none")
    print("cores", os.cpu_count(), flush=True)
    data = out / "phantom"
    if not data.exists():
        sh("data", "synth", str(data))
    results: dict = {"gpu": torch.cuda.get_device_name(0) if gpu else None}

    # 1. Training throughput: the demo's network (a small CNN at 64 px) and a transfer
    #    network at 224 px, where the GPU has work enough to show.
    recipes = {
        "medcnn_s_diff_64": ["--model", "medcnn_s", "--attention", "diff"],
        "mobilenet_v2_224": ["--model", "mobilenet_v2", "--pretrained", "--image-size", "224"],
    }
    devices = [("cuda", p) for p in ("fp32", "bf16", "fp16")] if gpu else [("cpu", "fp32")]
    epochs = "1" if not gpu or quick else "3"
    for name, flags in recipes.items():
        for device, precision in devices:
            run = out / f"{name}-{device}-{precision}"
            sh("train", "--data", str(data), "--out", str(run), "--overwrite", *flags,
               "--epochs", epochs, "--device", device, "--precision", precision)  # fmt: skip
            results[f"train {name} {device} {precision}"] = train_rate(run)
            print(results[f"train {name} {device} {precision}"], flush=True)

    # 2. Prediction throughput, the same 2,048 test images on each device and backend.
    from medsight.runs import Run

    base = out / f"mobilenet_v2_224-{devices[0][0]}-{devices[0][1]}"
    run = Run.load(base)
    table = run.splits()
    from medsight.data.sources import load_samples

    samples = load_samples(str(data))
    test = samples[samples["sample_id"].isin(table.query("split == 'test'")["sample_id"])]
    rows = pd.concat([test] * (2048 // len(test) + 1)).head(2048)
    cpu = predict_rate(base, "cpu", rows)
    results["predict cpu torch"] = cpu["images_per_s"]
    onnx = predict_rate(base, "cuda" if gpu else "cpu", rows, backend="onnx")
    results["predict onnx"] = {"images_per_s": onnx["images_per_s"], "note": onnx["note"]}
    if gpu:
        cuda = predict_rate(base, "cuda", rows)
        results["predict cuda torch"] = cuda["images_per_s"]
        # a run trained on the GPU, predicted on the CPU: the same probabilities
        results["gpu vs cpu max |dp|"] = float(np.abs(cuda["probs"] - cpu["probs"]).max())
    print({k: v for k, v in results.items() if k.startswith(("predict", "gpu vs"))}, flush=True)

    # 3. Evaluation and explanations on the device (the CUDA paths of evaluate and explain).
    device = "cuda" if gpu else "cpu"
    demo = out / f"medcnn_s_diff_64-{devices[-1][0]}-{devices[-1][1]}"
    done = sh("evaluate", str(demo), "--device", device, "--bootstrap", "200", check=False)
    results["evaluate rc"] = done.returncode
    done = sh("explain", str(demo), "--masks", "--limit", "64", "--device", device,
              "--faithfulness", "8", "--no-search-layers", check=False)  # fmt: skip
    results["explain rc"] = done.returncode
    print(done.stdout[-1500:], done.stderr[-1500:], flush=True)

    # 4. A run begun on the GPU, stopped by its time budget, goes on on the CPU.
    if gpu:
        resumed = out / "resume-gpu-to-cpu"
        sh("train", "--data", str(data), "--out", str(resumed), "--overwrite", "--model",
           "medcnn_s", "--epochs", "40", "--time", "25s", "--device", "cuda")  # fmt: skip
        before = pd.read_csv(resumed / "history.csv")["step"].iloc[-1]
        sh("train", "--resume", str(resumed), "--device", "cpu", "--precision", "fp32",
           "--time", "15s")  # fmt: skip
        after = pd.read_csv(resumed / "history.csv")["step"].iloc[-1]
        results["resume gpu->cpu steps"] = [int(before), int(after)]
        # two processes on one GPU: refused with the reason
        two = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc-per-node=2", "-m", "medsight", "train", "--data", str(data),
             "--out", str(out / "ddp"), "--epochs", "1"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        said = " ".join((two.stdout + two.stderr).split())
        results["torchrun 2 on 1 GPU"] = "refused" if "has 1 GPU(s)" in said else said[-300:]
    (out / "devices_cuda.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, indent=1, default=str), flush=True)


if __name__ == "__main__":
    main()
