"""CPU inference speed: torch eager vs ONNX Runtime (and torch.compile), with peak memory.

For each model and input size a 1-epoch run is trained on a small phantom set (the weights do not
matter for speed), exported with `medsight export`, and then timed in a fresh process:
`Predictor.predict_array` with the torch backend, with the ONNX backend, the bare
`InferenceSession.run` of that backend's own session (the limit: medsight's overhead is the rest)
and,
with --compile, `torch.compile` of the same module. Calls are interleaved round by round and the
median is kept, so the ratios hold on a shared, noisy machine. Peak RSS is measured per backend in
separate processes. Prints markdown tables.

Usage: python benchmarks/inference_speed.py [--models a,b] [--sizes 64,224] [--compile]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ("resnet18", "mobilenetv3_small_100", "efficientnet_b0", "medcnn_s")
SIZES = (64, 224)
BATCHES = (1, 64)


def make_runs(root: Path, models, sizes) -> dict[tuple[str, int], Path]:
    from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
    from medsight.data.synth import write_phantom_dataset
    from medsight.export import export_run
    from medsight.training.trainer import train

    data = write_phantom_dataset(root / "phantom", n=60, size=64, seed=0).parent
    made = {}
    for size in sizes:
        for name in models:
            out = root / f"{name}_{size}"
            config = TrainConfig(
                data=DataConfig(path=str(data), image_size=size),
                model=ModelConfig(name=name),
                optim=OptimConfig(epochs=1, batch_size=16, augment="none"),
                out=str(out),
            )
            train(config, show_progress=False)
            export_run(out)
            made[name, size] = out
    return made


def _median_seconds(fns: dict, budget_s: float, rounds: int = 3) -> dict[str, float]:
    """Median seconds per call of each function.

    Functions take turns in blocks (``rounds`` each, ``budget_s`` in all), not call by call:
    ONNX Runtime's and OpenMP's worker threads keep spinning for a while after a call, and a
    call of the other engine right after would pay for it. The first call of a block is not
    counted for the same reason.
    """
    block_s = budget_s / (rounds * len(fns))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            block_start = time.perf_counter()
            calls = 0
            while calls < 3 or time.perf_counter() - block_start < block_s:
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
                calls += 1
    return {name: float(np.median(values)) for name, values in samples.items()}


def child_speed(run: str, compile_: bool, budget_s: float) -> dict:
    import torch

    from medsight.inference import Predictor

    eager = Predictor.from_run(run)
    onnx = Predictor.from_run(run, backend="onnx")
    # medsight's overhead is what predict_array adds around the very session it wraps
    raw, raw_name = onnx.backend.session, onnx.backend.input_name
    compiled = torch.compile(eager.model) if compile_ else None
    rng = np.random.default_rng(0)
    result = {}
    for batch in BATCHES:
        x = rng.normal(size=(batch, *eager.input_shape[1:])).astype(np.float32)
        xt = torch.from_numpy(x)
        fns = {
            "eager": lambda x=x: eager.predict_array(x),
            "onnx": lambda x=x: onnx.predict_array(x),
            "raw_onnx": lambda x=x: raw.run(None, {raw_name: x}),
        }
        if compiled is not None:

            def run_compiled(xt=xt):
                with torch.no_grad():
                    return compiled(xt)

            fns["compile"] = run_compiled
        seconds = _median_seconds(fns, budget_s=budget_s)
        result[str(batch)] = {name: batch / s for name, s in seconds.items()}  # images/s
    return result


def child_rss(run: str, backend: str) -> dict:
    from medsight.inference import Predictor

    predictor = Predictor.from_run(run, backend=backend)
    x = np.zeros((64, *predictor.input_shape[1:]), dtype=np.float32)
    for _ in range(3):
        predictor.predict_array(x)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) parent process
    status = Path("/proc/self/status").read_text().splitlines()
    kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return {"rss_mib": kib / 1024}


def _child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--budget", type=float, default=6.0, help="seconds per batch size")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, run, *rest = args.child
        if kind == "speed":
            print(json.dumps(child_speed(run, rest[0] == "1", float(rest[1]))))
        else:
            print(json.dumps(child_rss(run, rest[0])))
        return

    models = args.models.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        print("training 1-epoch runs to time...", file=sys.stderr)
        made = make_runs(Path(tmp), models, sizes)
        speed, rss = {}, {}
        for key, run in made.items():
            print(f"timing {key[0]} @ {key[1]} px", file=sys.stderr)
            speed[key] = _child("speed", str(run), "1" if args.compile else "0", str(args.budget))
            rss[key] = {b: _child("rss", str(run), b)["rss_mib"] for b in ("torch", "onnx")}

    header = "| model | px | batch | torch eager img/s | ONNX Runtime img/s | ONNX / eager |"
    rule = "|---|---|---|---|---|---|"
    if args.compile:
        header += " torch.compile / eager |"
        rule += "---|"
    print(header + "\n" + rule)
    for (name, size), result in speed.items():
        for batch in map(str, BATCHES):
            r = result[batch]
            row = (
                f"| {name} | {size} | {batch} | {r['eager']:.0f} | {r['onnx']:.0f} "
                f"| {r['onnx'] / r['eager']:.2f} |"
            )
            if args.compile:
                row += f" {r['compile'] / r['eager']:.2f} |"
            print(row)
    print(
        "\n| model | px | ONNX `predict_array` time / bare `session.run` time, batch 1 "
        "| batch 64 | peak RSS torch MiB | peak RSS ONNX MiB |"
    )
    print("|---|---|---|---|---|---|")
    for (name, size), result in speed.items():
        over1 = result["1"]["raw_onnx"] / result["1"]["onnx"]
        over64 = result["64"]["raw_onnx"] / result["64"]["onnx"]
        print(
            f"| {name} | {size} | {over1:.2f} | {over64:.2f} "
            f"| {rss[name, size]['torch']:.0f} | {rss[name, size]['onnx']:.0f} |"
        )


if __name__ == "__main__":
    main()
