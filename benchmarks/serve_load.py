"""Load test of `medsight serve`: latency and throughput under concurrent uploads, with bad ones.

Starts the server in a second process on loopback (torch, then ONNX Runtime), sends N predict
requests at concurrency C (httpx async) with ~10 % bad uploads mixed in (text, truncated PNG,
empty), and reports 5xx count (must be 0), p50/p99 latency and requests/s, next to the p50 of a
raw in-process ``predict_array`` on the same backend. Without --run it first trains a quick
1-epoch resnet18 at 64 px on generated phantom data. Prints markdown.
Usage: python benchmarks/serve_load.py [--run RUN] [--requests 1000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np


def train_quick_run(root: Path) -> Path:
    """1 epoch of resnet18 (random init) at 64 px on 400 phantom images: a realistic network."""
    from medsight.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
    from medsight.data.synth import write_phantom_dataset
    from medsight.evaluation.evaluate import evaluate_run
    from medsight.training.trainer import train

    manifest = write_phantom_dataset(root / "data", n=400, size=64, seed=0)
    config = TrainConfig(
        data=DataConfig(path=str(manifest), image_size=64),
        model=ModelConfig(name="resnet18"),
        optim=OptimConfig(epochs=1, batch_size=32),
        out=str(root / "run"),
    )
    run = train(config, show_progress=False)
    evaluate_run(run.path, n_bootstrap=50)  # operating points for the threshold flags
    return run.path


def payloads(run: Path, n_good: int = 32) -> tuple[list[bytes], list[bytes]]:
    """Good uploads (images of the run's own data) and bad ones (not images, broken images)."""
    from medsight.runs import Run

    data = Path(Run.load(run).config.data.path)
    base = data if data.is_dir() else data.parent
    files = [p for p in sorted(base.rglob("*.png")) if "mask" not in p.as_posix().lower()]
    good = [p.read_bytes() for p in files[:n_good]]
    if not good:
        raise SystemExit(f"no PNG images found under {base} to upload")
    bad = [
        b"patient_id,label\n1,0\n" * 20,
        good[0][: len(good[0]) // 3],
        b"",
        b"GIF89a" + b"0" * 64,
    ]
    return good, bad


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, backend: str, data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "medsight", "serve", str(run), "--port", str(port)]
    command += ["--backend", backend, "--data-dir", str(data_dir)]
    log = open(data_dir / f"server-{backend}.log", "wb")  # noqa: SIM115 - lives with the process
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited early; see {log.name}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.terminate()
    raise SystemExit(f"the server did not become ready in 120 s; see {log.name}")


async def load(url: str, good, bad, n: int, concurrency: int, bad_share: float, budget: float):
    """Send n requests at the given concurrency; (latencies s, statuses, wall s)."""
    rng = random.Random(0)
    plan = [rng.choice(bad) if rng.random() < bad_share else rng.choice(good) for _ in range(n)]
    latencies: list[float] = []
    statuses: list[int] = []
    queue: asyncio.Queue = asyncio.Queue()
    for body in plan:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            start = time.perf_counter()
            try:
                response = await client.post(url + "/v1/predict", files={"file": ("x", body)})
                statuses.append(response.status_code)
            except httpx.HTTPError:
                statuses.append(599)  # a dropped connection counts as a server failure
            latencies.append(time.perf_counter() - start)

    # Without a token the server takes POSTs only with the page's same-origin header.
    headers = {"X-Requested-With": "medsight"}
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=headers) as client:
        start = time.perf_counter()
        workers = [asyncio.create_task(worker(client)) for _ in range(concurrency)]
        try:
            await asyncio.wait_for(asyncio.gather(*workers), timeout=budget)
        except asyncio.TimeoutError:
            print(f"  time budget of {budget:.0f} s reached after {len(statuses)} requests")
        wall = time.perf_counter() - start
    return np.array(latencies), np.array(statuses), wall


def in_process_p50(run: Path, backend: str, good: list[bytes], repeats: int = 300) -> float:
    """p50 of Predictor.predict_array on one preprocessed image, same backend, no HTTP."""
    from medsight.data.imaging import decode_bytes
    from medsight.inference import Predictor

    predictor = Predictor.from_run(run, backend=backend)
    x = predictor.preprocess(decode_bytes(good[0]))[None]
    for _ in range(20):
        predictor.predict_array(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict_array(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="Run to serve (default: train a quick one).")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bad", type=float, default=0.10, help="Share of bad uploads.")
    parser.add_argument("--budget", type=float, default=300, help="Seconds per backend at most.")
    parser.add_argument("--backends", default="torch,onnx")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="medsight-serve-load-"))
    os.environ.setdefault("MEDSIGHT_SALT", "benchmark")  # no salt file in the user's home
    run = args.run
    if run is None:
        print("training a quick 1-epoch resnet18 at 64 px on phantom data ...")
        run = train_quick_run(workdir)
    good, bad = payloads(run)
    rows = []
    for backend in args.backends.split(","):
        data_dir = workdir / f"serve-{backend}"
        data_dir.mkdir()
        process, url = start_server(run, backend, data_dir)
        try:
            asyncio.run(load(url, good, bad, 30, 4, 0.0, 60))  # warm-up: threads, caches, JIT
            latencies, statuses, wall = asyncio.run(
                load(url, good, bad, args.requests, args.concurrency, args.bad, args.budget)
            )
            # One request at a time: the HTTP + decode overhead without queueing behind others.
            single, _, _ = asyncio.run(load(url, good, bad, 100, 1, 0.0, 60))
        finally:
            process.terminate()
            process.wait(30)
        raw = in_process_p50(run, backend, good)
        done = len(statuses)
        ok = latencies[statuses == 200]
        rows.append(
            {
                "backend": backend,
                "requests": done,
                "2xx": int((statuses == 200).sum()),
                "4xx": int(((statuses >= 400) & (statuses < 500)).sum()),
                "5xx": int((statuses >= 500).sum()),
                "p50": 1000 * float(np.median(ok)),
                "p99": 1000 * float(np.percentile(ok, 99)),
                "rps": done / wall,
                "single": 1000 * float(np.median(single)),
                "raw": 1000 * raw,
            }
        )
    from medsight.runs import Run

    model = Run.load(run).model_config
    print(
        f"\n{model['name']} at {model['image_size'][0]} px, {args.requests} requests at "
        f"concurrency {args.concurrency}, {args.bad:.0%} bad uploads, {os.cpu_count()} CPU cores "
        f"(load average {os.getloadavg()[0]:.1f} at the end: other work shares them)\n"
    )
    print(
        "| backend | requests | 200 | 4xx (bad uploads) | 5xx | p50 ms (200s) | p99 ms (200s) "
        "| requests/s | p50 ms, one at a time | in-process predict_array p50 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['requests']} | {r['2xx']} | {r['4xx']} | {r['5xx']} "
            f"| {r['p50']:.1f} | {r['p99']:.1f} | {r['rps']:.1f} | {r['single']:.1f} "
            f"| {r['raw']:.2f} |"
        )
    if any(r["5xx"] for r in rows):
        raise SystemExit("server errors (5xx) under load: see the server logs in " + str(workdir))


if __name__ == "__main__":
    main()
