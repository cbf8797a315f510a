"""CUDA smoke check of the training loop: mixed precision on a GPU, the run loaded back on the CPU.

Trains the default recipe (medcnn_s) and the demo's (medcnn_s + differential attention) on a
phantom set with the GPU and AMP, then loads each run on the CPU and checks that the CPU's
probabilities match the GPU model's on the test split. Prints one table; not part of CI.

    python benchmarks/gpu_smoke.py --work /tmp/gpu --n 1200 --epochs 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from medsight.data.imaging import decode
from medsight.data.synth import write_phantom_dataset
from medsight.inference import Predictor
from medsight.runs import Run
from medsight.training.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/medsight-gpu"))
    parser.add_argument("--n", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    data = write_phantom_dataset(args.work / "phantom", n=args.n, size=64, seed=0)
    rows = []
    for attention in ("none", "diff"):
        config = TrainConfig(
            data=DataConfig(path=str(data)),
            model=ModelConfig(name="medcnn_s", attention=attention),
            optim=OptimConfig(epochs=args.epochs, patience=args.epochs),
            out=str(args.work / f"run-{attention}"),
        )
        started = time.perf_counter()
        run = train(config, overwrite=True, show_progress=False)
        seconds = time.perf_counter() - started
        history = run.history()
        table = run.load_data()
        test = table[table["split"] == "test"].reset_index(drop=True)
        cpu = Predictor.from_run(run.path)  # CPU torch backend, weights from safetensors
        p_cpu = cpu.predict_table(test)
        x = np.stack([cpu.preprocess(decode(s)) for s in test["source"]])
        gpu_model = Run.load(run.path).load_model().cuda().eval()
        with torch.no_grad():
            logits = gpu_model(torch.from_numpy(x).cuda()).float().cpu().numpy()
        p_gpu = cpu.task.probabilities(logits, cpu.calibration)
        y = np.array([run.classes.index(v) for v in test["label"]])
        rows.append(
            {
                "attention": attention,
                "epochs": int(history["epoch"].max()),
                "train_s": round(seconds, 1),
                "s_per_epoch": round(float(history["seconds"].median()), 2),
                "best_val_auroc": round(float(history["val_auroc"].max()), 4),
                "test_acc_cpu": round(float((p_cpu.argmax(1) == y).mean()), 4),
                "max_abs_diff_cpu_vs_gpu": float(np.abs(p_cpu - p_gpu).max()),
                "amp": bool(config.optim.amp),
                "device_recorded": json.loads((run.path / "versions.json").read_text()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
