"""Reliability under hostile input: memory per bad file, mixed load, kill -9 of server and trainer.

Reproduces the figures of issue 14 on loopback only (127.0.0.1, nothing else is contacted):

1. **Memory per bad input** — a deflated DICOM whose pixel data inflate to ~1 GiB, a zip with
   one 1 GiB member of zeros, a 7745² one-colour RGB PNG, float32 TIFFs holding NaN and +inf,
   a truncated PNG: peak RSS, exit code and wall time of ``medsight data check FILE``, and the
   HTTP status and RSS increase of a running ``medsight serve`` for ``POST /v1/predict`` and
   ``POST /v1/studies`` with that file.
2. **Mixed load** — N requests at concurrency C: valid PNG uploads to ``/v1/predict`` and
   ``/v1/studies``, ``GET /v1/worklist``, and a share of adversarial requests (small variants of
   the files above, study ids beyond 64 bits); 5xx count, p50/p99 latency, and whether every
   acknowledged study is on the worklist afterwards.
3. **kill -9** — the server killed mid-load, restarted on the same database (SQLite
   ``PRAGMA integrity_check``, every study acknowledged with 201 still there); ``medsight train``
   killed at three seeded random points, each followed by ``--resume``, then the final weights
   compared with an uninterrupted run and ``medsight evaluate`` run on the result.

Any process whose resident memory passes ``--max-rss-gb`` (default 6, lowered when the machine
has less free memory) is killed and reported as "> LIMIT (killed)": the code before the
hardening needs more than 10 GB for some of these files. Prints markdown tables; about
6–8 minutes on a 2-core CPU.
Usage: python benchmarks/reliability.py [--work DIR] [--sections rss,load,kill]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

# Sent with every request: the hardened server may require it on state-changing routes.
HEADERS = {"X-Requested-With": "medsight"}
HUGE_ID = "9223372036854775808"  # 2**63: one past SQLite's largest integer
MIB = 1024 * 1024
GIB = 1024 * MIB
POLL_S = 0.02


# --------------------------------------------------------------------------- processes


def env() -> dict[str, str]:
    """The environment of every medsight subprocess: this checkout's sources, a fixed salt."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    extra = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": src + (os.pathsep + extra if extra else ""),
        "MEDSIGHT_SALT": os.environ.get("MEDSIGHT_SALT", "benchmark"),  # no salt file in ~
        "PYTHONUNBUFFERED": "1",  # progress lines as they happen (the trainer's kill points)
    }


_CHILDREN: list[subprocess.Popen] = []


def spawn(command: list[str], log) -> subprocess.Popen:
    """Start ``command`` with its output to ``log``; killed at exit if still running."""
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env())
    _CHILDREN.append(process)
    return process


@atexit.register
def _kill_children() -> None:
    # An interrupted benchmark must not leave a server or a bomb decoding behind.
    for process in _CHILDREN:
        if process.poll() is None:
            process.kill()
            process.wait()


def medsight(*args: str) -> list[str]:
    return [sys.executable, "-m", "medsight", *args]


def proc_kib(pid: int, key: str) -> int | None:
    """A ``/proc/PID/status`` field in KiB (VmRSS, VmHWM); None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def reset_peak(pid: int) -> None:
    """Make VmHWM start again from the current RSS (Linux ``clear_refs`` 5)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def gb(n_bytes: float) -> str:
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.2f} GB"
    return f"{n_bytes / 1e6:.0f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:.0f} kB"


@dataclass
class Measured:
    """One subprocess run to its end (or killed): exit code, peak RSS, wall time."""

    rc: int | None
    peak: int
    wall: float
    killed: str = ""  # "memory" or "time" when this script killed it
    output: str = ""

    def rss(self, limit: int) -> str:
        return f"> {gb(limit)} (killed)" if self.killed == "memory" else gb(self.peak)


def run_measured(command: list[str], *, limit: int, timeout: float, log: Path) -> Measured:
    """Run ``command`` polling its RSS every 20 ms; SIGKILL it above ``limit`` bytes or ``timeout``.

    The peak is the last VmHWM read (the kernel's own high-water mark of this process), not
    ``wait4``'s ``ru_maxrss``: Linux carries the parent's peak into a forked child's.
    """
    with open(log, "wb") as out:
        process = spawn(command, out)
    start = time.monotonic()
    killed = ""
    peak = 0
    while process.poll() is None:
        rss = (proc_kib(process.pid, "VmRSS") or 0) * 1024
        peak = max(peak, rss, (proc_kib(process.pid, "VmHWM") or 0) * 1024)
        if not killed and rss > limit:
            killed = "memory"
        elif not killed and time.monotonic() - start > timeout:
            killed = "time"
        if killed:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
        time.sleep(POLL_S)
    wall = time.monotonic() - start
    text = log.read_text(errors="replace")
    return Measured(process.returncode, peak, wall, killed, text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``medsight serve RUN`` on a free loopback port, with an RSS watchdog while it runs."""

    def __init__(self, run: Path, data_dir: Path, log: Path, limit: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.limit = limit
        self.killed_for_memory = False
        command = medsight("serve", str(run), "--port", str(self.port))
        command += ["--data-dir", str(data_dir)]
        with open(log, "ab") as out:
            self.process = spawn(command, out)
        self.pid = self.process.pid
        self._peak = 0
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watchdog, daemon=True)
        self._watch.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited early ({self.process.returncode}); see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/ready", timeout=2, headers=HEADERS).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"the server was not ready after 120 s; see {log}")

    def _watchdog(self) -> None:
        while not self._stop.is_set():
            rss = (proc_kib(self.pid, "VmRSS") or 0) * 1024
            self._peak = max(self._peak, rss)
            if rss > self.limit and self.process.poll() is None:
                self.killed_for_memory = True
                self.kill()
            self._stop.wait(POLL_S)

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss(self) -> int:
        return (proc_kib(self.pid, "VmRSS") or 0) * 1024

    def start_peak(self) -> int:
        """Start a new peak measurement; returns the RSS it starts from."""
        reset_peak(self.pid)
        self._peak = self.rss()
        return self._peak

    def peak(self) -> int:
        hwm = (proc_kib(self.pid, "VmHWM") or 0) * 1024
        return max(self._peak, hwm)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)

    def stop(self) -> None:
        self._stop.set()
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process.wait()


# --------------------------------------------------------------------------- inputs


def deflated_dicom(path: Path, *, side: int, frames: int) -> Path:
    """A Deflated Explicit VR Little Endian DICOM of ``side``² RGB × ``frames`` of zeros.

    The header is consistent (rows × columns × samples × frames × bits = the pixel data's
    length), so only the inflated size gives the bomb away; written as a stream, never held.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientName = "BOMB^DEFLATE"
    ds.PatientID = "RELIAB-0001"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = frames
    ds.Rows = side
    ds.Columns = side
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    length = side * side * 3 * frames
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    # Pixel Data (7FE0,0010), OB: tag, VR, two reserved bytes, 32-bit length.
    header = buffer.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, length)
    file_meta = DicomBytesIO()
    file_meta.is_little_endian, file_meta.is_implicit_VR = True, False
    write_file_meta_info(file_meta, meta, enforce_standard=True)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as PS3.5 A.5 asks
    zeros = bytes(16 * MIB)
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM" + file_meta.getvalue())
        fh.write(deflate.compress(header))
        left = length
        while left:
            n = min(left, len(zeros))
            fh.write(deflate.compress(zeros[:n]))
            left -= n
        fh.write(deflate.flush())
    return path


def zip_bomb(path: Path, size: int, good_png: bytes) -> Path:
    """A zip of two good PNGs and one member of ``size`` zero bytes named like an image."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("normal/a.png", good_png)
        zf.writestr("benign/b.png", good_png)
        zeros = bytes(16 * MIB)
        with zf.open("malignant/bomb.png", "w", force_zip64=True) as fh:
            left = size
            while left:
                n = min(left, len(zeros))
                fh.write(zeros[:n])
                left -= n
    return path


def rgb_png(path: Path, side: int) -> Path:
    from PIL import Image

    Image.new("RGB", (side, side), (180, 90, 40)).save(path, optimize=True)
    return path


def float_tiff(path: Path, value: float) -> Path:
    """A 64² float32 TIFF of noise with one pixel set to ``value`` (NaN, inf)."""
    from PIL import Image

    array = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    array[10, 10] = value
    Image.fromarray(array, mode="F").save(path)
    return path


@dataclass
class Inputs:
    big: dict[str, Path] = field(default_factory=dict)  # section 1: name → file
    small: dict[str, bytes] = field(default_factory=dict)  # section 2: name → upload
    good: list[bytes] = field(default_factory=list)


def build_inputs(folder: Path, data: Path) -> Inputs:
    """The adversarial files (kept in ``folder`` between runs: the bombs take a while)."""
    folder.mkdir(parents=True, exist_ok=True)
    pngs = [p for p in sorted(data.rglob("*.png")) if "mask" not in p.as_posix().lower()]
    good = [p.read_bytes() for p in pngs[:32]]
    made = Inputs(good=good)

    def once(name: str, make) -> Path:
        path = folder / name
        if not path.exists():
            partial = folder / ("partial-" + name)
            make(partial)
            partial.rename(path)
        return path

    made.big = {
        "deflated DICOM 4096² RGB × 21 frames (inflates to 1.06 GB)": once(
            "bomb.dcm", lambda p: deflated_dicom(p, side=4096, frames=21)
        ),
        "zip with one 1 GiB member of zeros": once("bomb.zip", lambda p: zip_bomb(p, GIB, good[0])),
        "RGB PNG 7745², one colour": once("rgb7745.png", lambda p: rgb_png(p, 7745)),
        "float32 TIFF holding NaN": once("nan.tif", lambda p: float_tiff(p, np.nan)),
        "float32 TIFF holding +inf": once("inf.tif", lambda p: float_tiff(p, np.inf)),
        "truncated PNG": once("truncated.png", lambda p: p.write_bytes(good[0][:300])),
    }
    made.small = {
        "deflated DICOM 1024² RGB × 5 frames (16 MB)": once(
            "small-bomb.dcm", lambda p: deflated_dicom(p, side=1024, frames=5)
        ).read_bytes(),
        "zip with a 16 MiB member": once(
            "small-bomb.zip", lambda p: zip_bomb(p, 16 * MIB, good[0])
        ).read_bytes(),
        "RGB PNG 2048²": once("rgb2048.png", lambda p: rgb_png(p, 2048)).read_bytes(),
        "NaN TIFF": made.big["float32 TIFF holding NaN"].read_bytes(),
        "inf TIFF": made.big["float32 TIFF holding +inf"].read_bytes(),
        "truncated PNG": good[1][: len(good[1]) // 2],
    }
    return made


# --------------------------------------------------------------------------- 1. RSS per input


def first_line(text: str, limit: int = 90) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    line = line.replace("|", "/")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def post_measured(server: Server, route: str, path: Path, timeout: float) -> dict:
    """POST ``path`` to ``route``; status, RSS increase over the request, wall time."""
    base = server.start_peak()
    start = time.monotonic()
    try:
        with open(path, "rb") as fh:
            response = httpx.post(
                server.url + route,
                files={"file": (path.name, fh)},
                headers=HEADERS,
                timeout=timeout,
            )
        status, detail = str(response.status_code), _detail(response)
    except httpx.HTTPError as exc:
        status, detail = "no response", type(exc).__name__
    wall = time.monotonic() - start
    time.sleep(0.1)  # one more watchdog sample after the answer
    killed = server.killed_for_memory
    increase = server.peak() - base
    if killed:
        status = "no response (server killed)"
    return {
        "status": status,
        "detail": detail,
        "increase": increase,
        "wall": wall,
        "killed": killed,
    }


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:80]
    if isinstance(body, dict) and "detail" in body:
        return first_line(str(body["detail"]))
    return ""


def section_rss(run: Path, inputs: Inputs, work: Path, limit: int, timeout: float) -> list[dict]:
    rows = []
    server = None
    for name, path in inputs.big.items():
        print(f"  data check: {name} ...", flush=True)
        checked = run_measured(
            medsight("data", "check", str(path)),
            limit=limit,
            timeout=timeout,
            log=work / f"check-{path.stem}.log",
        )
        row = {"input": name, "file": path.stat().st_size, "check": checked}
        for route in ("/v1/predict", "/v1/studies"):
            if server is not None and not server.alive():
                server.stop()  # killed for its memory: reap it, then start another
                server = None
            if server is None:
                server = Server(run, work / "serve-rss", work / "serve-rss.log", limit)
                # the first request pays for lazy start-up work; not this input's cost
                httpx.post(
                    server.url + "/v1/predict",
                    files={"file": ("warm.png", inputs.good[0])},
                    headers=HEADERS,
                    timeout=60,
                )
            print(f"  POST {route}: {name} ...", flush=True)
            row[route] = post_measured(server, route, path, timeout)
            # Freed memory the allocator keeps would hide the next request's cost: start afresh.
            if row[route]["increase"] > 100 * MIB:
                server.stop()
                server = None
        rows.append(row)
    if server is not None:
        server.stop()
    shutil.rmtree(work / "serve-rss", ignore_errors=True)  # stored uploads: up to a GB each
    return rows


def print_rss(rows: list[dict], limit: int) -> None:
    print(f"\n### Memory per bad input (kill above {gb(limit)})\n")
    print("| input | file | `data check`: peak RSS · exit · s | `data check` says |")
    print("|---|---:|---|---|")
    for r in rows:
        c: Measured = r["check"]
        exit_code = "killed" if c.killed else str(c.rc)
        said = "—" if c.killed else first_line(c.output)
        print(
            f"| {r['input']} | {gb(r['file'])} | {c.rss(limit)} · {exit_code} · {c.wall:.1f} "
            f"| {said} |"
        )
    print("\n| input | route | status | server RSS increase | s | detail |")
    print("|---|---|---|---:|---:|---|")
    for r in rows:
        for route in ("/v1/predict", "/v1/studies"):
            m = r[route]
            increase = f"> {gb(limit)} (killed)" if m["killed"] else gb(max(m["increase"], 0))
            print(
                f"| {r['input']} | `{route}` | {m['status']} | {increase} | {m['wall']:.1f} "
                f"| {m['detail'] or '—'} |"
            )


# --------------------------------------------------------------------------- 2. mixed load


@dataclass
class Result:
    kind: str
    valid: bool
    status: int  # 599: no response (connection dropped, timeout)
    seconds: float
    study: int | None = None
    error: str = ""  # the client's exception when there was no response
    retry_after: bool = False  # a 503 that tells the client when to retry (load shedding)


def plan_requests(inputs: Inputs, n: int, bad_share: float, seed: int) -> list[tuple]:
    """``(kind, valid, method, path, body)``: 90 % valid traffic, ``bad_share`` adversarial."""
    rng = random.Random(seed)
    adversarial = [
        (f"{name} → {route}", "POST", route, body)
        for name, body in inputs.small.items()
        for route in ("/v1/predict", "/v1/studies")
    ]
    adversarial += [
        (f"GET /v1/studies/{HUGE_ID}", "GET", f"/v1/studies/{HUGE_ID}", None),
        (f"GET /v1/studies/{HUGE_ID}/image", "GET", f"/v1/studies/{HUGE_ID}/image", None),
        (f"PATCH /v1/studies/{HUGE_ID}", "PATCH", f"/v1/studies/{HUGE_ID}", {"status": "reviewed"}),
        ("GET /v1/studies/-1", "GET", "/v1/studies/-1", None),
    ]
    plan = []
    for _ in range(n):
        r = rng.random()
        if r < bad_share:
            kind, method, path, body = rng.choice(adversarial)
            plan.append((kind, False, method, path, body))
            continue
        r = rng.random()
        if r < 4 / 9:
            plan.append(
                ("valid PNG → /v1/predict", True, "POST", "/v1/predict", rng.choice(inputs.good))
            )
        elif r < 8 / 9:
            plan.append(
                ("valid PNG → /v1/studies", True, "POST", "/v1/studies", rng.choice(inputs.good))
            )
        else:
            plan.append(("GET /v1/worklist", True, "GET", "/v1/worklist", None))
    return plan


def send(client: httpx.Client, url: str, item: tuple) -> Result:
    kind, valid, method, path, body = item
    start = time.perf_counter()
    try:
        if method == "POST":
            response = client.post(url + path, files={"file": ("upload", body)})
        elif method == "PATCH":
            response = client.patch(url + path, json=body)
        else:
            response = client.get(url + path)
        status = response.status_code
    except httpx.HTTPError as exc:
        return Result(kind, valid, 599, time.perf_counter() - start, error=type(exc).__name__)
    seconds = time.perf_counter() - start
    study = None
    if status == 201 and path == "/v1/studies":
        with contextlib.suppress(ValueError, KeyError, TypeError):
            study = int(response.json()["id"])
    shed = status == 503 and "retry-after" in response.headers
    return Result(kind, valid, status, seconds, study, retry_after=shed)


def run_load(url: str, plan: list[tuple], concurrency: int, stop: threading.Event | None = None):
    """Send ``plan`` with ``concurrency`` threads; (results, wall s)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: list[Result] = []
    lock = threading.Lock()
    queue = list(reversed(plan))

    def worker(client: httpx.Client) -> None:
        while not (stop and stop.is_set()):
            with lock:
                if not queue:
                    return
                item = queue.pop()
            result = send(client, url, item)
            with lock:
                results.append(result)

    with httpx.Client(timeout=120, limits=limits, headers=HEADERS) as client:
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            for _ in range(concurrency):
                pool.submit(worker, client)
        wall = time.perf_counter() - start
    return results, wall


def worklist_ids(url: str) -> set[int]:
    response = httpx.get(url + "/v1/worklist", headers=HEADERS, timeout=120)
    response.raise_for_status()
    return {int(item["id"]) for item in response.json()["items"]}


def section_load(run: Path, inputs: Inputs, work: Path, args, limit: int) -> dict:
    shutil.rmtree(work / "serve-load", ignore_errors=True)  # a fresh worklist each time
    server = Server(run, work / "serve-load", work / "serve-load.log", limit)
    try:
        warm = [("warm", True, "POST", "/v1/predict", inputs.good[0])] * 8
        run_load(server.url, warm, 4)
        base = server.start_peak()
        plan = plan_requests(inputs, args.requests, args.bad, args.seed)
        results, wall = run_load(server.url, plan, args.concurrency)
        peak = server.peak()
        killed = server.killed_for_memory
        acked = {r.study for r in results if r.study is not None and r.valid}
        listed = worklist_ids(server.url) if server.alive() else set()
    finally:
        server.stop()
    return {
        "results": results,
        "wall": wall,
        "increase": peak - base,
        "killed": killed,
        "acked": acked,
        "lost": acked - listed,
    }


def pct(values: list[float], q: float) -> str:
    return f"{1000 * float(np.percentile(values, q)):.0f}" if values else "—"


def print_load(out: dict, args, limit: int) -> None:
    results: list[Result] = out["results"]
    statuses = np.array([r.status for r in results])
    all_s = [r.seconds for r in results]
    valid_s = [r.seconds for r in results if r.valid and r.status < 500]
    n_bad = sum(not r.valid for r in results)
    print(
        f"\n### Mixed load: {len(results)} requests at concurrency {args.concurrency}, "
        f"{n_bad} adversarial (seed {args.seed})\n"
    )
    print("| measure | value |")
    print("|---|---|")
    rows = [
        ("requests answered / sent", f"{int((statuses != 599).sum())} / {len(results)}"),
        ("2xx", int(((statuses >= 200) & (statuses < 300)).sum())),
        ("4xx", int(((statuses >= 400) & (statuses < 500)).sum())),
        ("**5xx** (incl. no response)", f"**{int((statuses >= 500).sum())}**"),
        ("of which 503 with Retry-After (load shedding)", sum(r.retry_after for r in results)),
        ("p50 / p99 latency, all requests (ms)", f"{pct(all_s, 50)} / {pct(all_s, 99)}"),
        ("p50 / p99 latency, valid requests (ms)", f"{pct(valid_s, 50)} / {pct(valid_s, 99)}"),
        ("wall s (requests/s)", f"{out['wall']:.1f} ({len(results) / out['wall']:.1f})"),
        (
            "server RSS increase",
            f"> {gb(limit)} (killed)" if out["killed"] else gb(max(out["increase"], 0)),
        ),
        ("valid studies acknowledged (201)", len(out["acked"])),
        ("**of those missing from the worklist**", f"**{len(out['lost'])}**"),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")
    by_kind: dict[str, dict[str, int]] = {}
    for r in results:
        counts = by_kind.setdefault(r.kind, {})
        status = f"no response ({r.error})" if r.status == 599 else str(r.status)
        counts[status] = counts.get(status, 0) + 1
    print("\n| request | n | statuses |")
    print("|---|---:|---|")
    for kind in sorted(by_kind, key=lambda k: (not k.startswith(("valid", "GET /v1/worklist")), k)):
        counts = by_kind[kind]
        text = ", ".join(f"{s} × {c}" for s, c in sorted(counts.items()))
        print(f"| {kind} | {sum(counts.values())} | {text} |")


# --------------------------------------------------------------------------- 3. kill -9


def section_kill_server(run: Path, inputs: Inputs, work: Path, args, limit: int) -> dict:
    """Uploads at full concurrency, SIGKILL after a seeded delay, restart on the same DB."""
    rng = random.Random(args.seed + 1)
    data_dir = work / "serve-kill"
    log = work / "serve-kill.log"
    shutil.rmtree(data_dir, ignore_errors=True)
    server = Server(run, data_dir, log, limit)
    delay = rng.uniform(3.0, 6.0)
    plan = [("upload", True, "POST", "/v1/studies", rng.choice(inputs.good)) for _ in range(5000)]
    stop = threading.Event()

    def killer() -> None:
        time.sleep(delay)
        stop.set()  # no new requests: what fails is what was in flight
        server.kill()

    threading.Thread(target=killer, daemon=True).start()
    results, _ = run_load(server.url, plan, args.concurrency, stop)
    server.stop()
    acked = {r.study for r in results if r.study is not None}
    db = data_dir / "worklist.db"
    with contextlib.closing(sqlite3.connect(db)) as con:
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
        rows = con.execute("SELECT count(*) FROM studies").fetchone()[0]
    server = Server(run, data_dir, log, limit)
    try:
        listed = worklist_ids(server.url)
        images = sum(
            httpx.get(f"{server.url}/v1/studies/{i}/image", headers=HEADERS, timeout=30).status_code
            == 200
            for i in sorted(acked)
        )
    finally:
        server.stop()
    return {
        "delay": delay,
        "acked": len(acked),
        "dropped": sum(r.status == 599 for r in results),
        "integrity": integrity,
        "rows": rows,
        "lost": len(acked - listed),
        "images": images,
    }


def epoch_lines(text: str) -> list[float]:
    """The epoch fractions of the trainer's progress lines ("epoch 1.33/4 ...")."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 1 and parts[0] == "epoch" and "/" in parts[1]:
            with contextlib.suppress(ValueError):
                found.append(float(parts[1].split("/")[0]))
    return found


def train_timed(command: list[str], log: Path, kill_after: float | None) -> dict:
    """Run a training command; SIGKILL it ``kill_after`` seconds after it starts (None: never)."""
    with open(log, "wb") as out:
        process = spawn(command, out)
    start = time.monotonic()
    killed = False
    stamps: list[tuple[float, int]] = []  # (time, number of progress lines so far)
    while process.poll() is None:
        now = time.monotonic() - start
        lines = len(epoch_lines(log.read_text(errors="replace")))
        if not stamps or stamps[-1][1] != lines:
            stamps.append((now, lines))
        if kill_after is not None and now >= kill_after:
            process.send_signal(signal.SIGKILL)
            process.wait()
            killed = True
            break
        if now > 600:
            process.kill()
            process.wait()
            break
        time.sleep(POLL_S)
    text = log.read_text(errors="replace")
    return {
        "rc": process.returncode,
        "killed": killed,
        "wall": time.monotonic() - start,
        "epochs": epoch_lines(text),
        "stamps": stamps,
        "text": text,
    }


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def section_kill_train(data: Path, work: Path, args) -> dict:
    """An uninterrupted reference run, then the same run killed at 3 points and resumed."""
    base = ["train", "--data", str(data), "--epochs", str(args.train_epochs), "--seed", "0"]
    reference, run = work / "train-reference", work / "train-killed"
    for folder in (reference, run):
        shutil.rmtree(folder, ignore_errors=True)
    print("  uninterrupted reference run ...", flush=True)
    ref = train_timed(medsight(*base, "--out", str(reference)), work / "train-ref.log", None)
    if ref["rc"] != 0:
        raise SystemExit(f"the reference training failed; see {work / 'train-ref.log'}")
    # Seconds from process start to each progress line → a start-up time and seconds per epoch.
    line_times = [t for t, n in ref["stamps"] if n > 0]
    fractions = ref["epochs"][: len(line_times)]
    per_epoch, startup = np.polyfit(fractions, line_times, 1)
    startup = max(float(startup), 0.5)
    rng = random.Random(args.seed + 2)
    # one point in each third of the run, so that early, middle and late kills are all tried
    third = args.train_epochs / 3
    points = [rng.uniform(max(i * third, 0.05), (i + 1) * third - 0.05) for i in range(3)]
    steps: list[dict] = []
    done = 0.0  # epochs already in the checkpoint when a process starts
    resume = finished = overwrite = False
    queue = list(points)
    while queue and not finished:
        point = queue[0]
        if resume:
            command = medsight("train", "--resume", str(run))
        else:
            command = medsight(*base, "--out", str(run), *(["--overwrite"] * overwrite))
        kill_after = startup + max(point - done, 0.02) * per_epoch
        what = "--resume" if resume else ("fresh, --overwrite" if overwrite else "fresh")
        print(f"  kill at epoch ≈ {point:.2f} ({what}, {kill_after:.1f} s after start) ...")
        out = train_timed(command, work / f"train-{len(steps) + 1}.log", kill_after)
        step = {
            "point": point,
            "after": kill_after,
            "how": what,
            "rc": out["rc"],
            "killed": out["killed"],
            "last_line": out["epochs"][-1] if out["epochs"] else None,
            "checkpoint": (run / "checkpoints" / "last.pt").exists(),
            "message": "" if out["killed"] or out["rc"] == 0 else first_line(out["text"], 120),
        }
        steps.append(step)
        if out["killed"]:
            queue.pop(0)
            resume = True
            # the checkpoint holds whole epochs: the next process repeats the partial one
            done = float(int(step["last_line"])) if step["last_line"] else 0.0
        elif out["rc"] == 0:
            finished = True
        elif resume:  # --resume refused the folder: start over, as a user would have to
            resume, done = False, 0.0
        elif not overwrite and run.exists():  # the same command refused the half-written folder
            overwrite = True
        else:
            raise SystemExit(f"training failed; see {work / f'train-{len(steps)}.log'}")
    if not finished:
        print("  final --resume ...", flush=True)
        out = train_timed(medsight("train", "--resume", str(run)), work / "train-final.log", None)
        steps.append(
            {
                "how": "final --resume",
                "rc": out["rc"],
                "killed": False,
                "message": "" if out["rc"] == 0 else first_line(out["text"], 120),
            }
        )
        if out["rc"] != 0:
            command = medsight(*base, "--out", str(run), "--overwrite")
            out = train_timed(command, work / "train-final-fresh.log", None)
            steps.append(
                {
                    "how": "final, fresh",
                    "rc": out["rc"],
                    "killed": False,
                    "message": "" if out["rc"] == 0 else first_line(out["text"], 120),
                }
            )
    evaluated = run_measured(
        medsight("evaluate", str(run), "--bootstrap", "50"),
        limit=4 * GIB,
        timeout=300,
        log=work / "evaluate.log",
    )
    return {
        "reference_wall": ref["wall"],
        "per_epoch": per_epoch,
        "startup": startup,
        "steps": steps,
        "identical": sha256(run / "model.safetensors") == sha256(reference / "model.safetensors"),
        "weights": (run / "model.safetensors").exists(),
        "evaluate": evaluated,
    }


def print_kill(server: dict | None, train: dict | None, args) -> None:
    print("\n### kill -9\n")
    print("| check | result |")
    print("|---|---|")
    if server:
        print(
            f"| server SIGKILLed {server['delay']:.1f} s into uploads at concurrency "
            f"{args.concurrency} | {server['acked']} studies acknowledged (201), "
            f"{server['dropped']} requests unanswered |"
        )
        print(f"| `PRAGMA integrity_check` after the kill | {server['integrity']} |")
        print(f"| rows in the database / acknowledged | {server['rows']} / {server['acked']} |")
        print(f"| **acknowledged studies missing after restart** | **{server['lost']}** |")
        print(f"| their images served after restart | {server['images']} / {server['acked']} |")
    if train:
        print(
            f"| trainer: uninterrupted reference ({args.train_epochs} epochs) | "
            f"{train['reference_wall']:.1f} s (start-up ≈ {train['startup']:.1f} s, "
            f"{train['per_epoch']:.1f} s an epoch) |"
        )
        for s in train["steps"]:
            if "point" not in s:
                what = "exit 0" if s["rc"] == 0 else f"exit {s['rc']}: {s['message']}"
                print(f"| trainer: {s['how']} to the end | {what} |")
                continue
            if s["killed"]:
                line = s["last_line"] if s["last_line"] is not None else "none yet"
                state = "present" if s["checkpoint"] else "absent"
                what = (
                    f"killed {s['after']:.1f} s after start (last progress line: epoch {line}; "
                    f"checkpoints/last.pt {state})"
                )
            elif s["rc"] == 0:
                what = "finished before the kill point"
            else:
                what = f"exit {s['rc']}: {s['message']}"
            print(f"| trainer: kill at epoch ≈ {s['point']:.2f}, {s['how']} start | {what} |")
        same = "yes" if train["identical"] else "no"
        print(f"| final weights identical to the uninterrupted run | {same} |")
        e: Measured = train["evaluate"]
        said = "" if e.rc == 0 else f": {first_line(e.output, 120)}"
        print(f"| `medsight evaluate` on the resumed run | exit {e.rc}{said} |")


# --------------------------------------------------------------------------- main


def memory_limit(requested_gb: float) -> int:
    """``requested_gb``, lowered so that at least 3 GB stay free for everything else."""
    available = _mem_available()
    return int(min(requested_gb * 1e9, max(available - 3e9, 1e9)))


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return int(8e9)


def code_version() -> str:
    """The last commit that changed ``src`` (``+``: uncommitted changes there), i.e. the code
    under test, whatever commits to the benchmarks came after it."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "log", "-1", "--format=%h", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="Working folder (default: a new temp folder).")
    parser.add_argument("--sections", default="rss,load,kill", help="Any of rss, load, kill.")
    parser.add_argument("--max-rss-gb", type=float, default=6.0, help="Kill a process above it.")
    parser.add_argument("--timeout", type=float, default=120, help="Seconds per bad-input step.")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bad", type=float, default=0.10, help="Share of adversarial requests.")
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that atexit kills the children

    work = args.work or Path(tempfile.mkdtemp(prefix="medsight-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    limit = memory_limit(args.max_rss_gb)
    started = time.monotonic()
    print(f"working in {work}; processes are killed above {gb(limit)} of RSS", flush=True)

    data, run = work / "data", work / "run"
    if not (data / "manifest.csv").exists():
        subprocess.run(medsight("data", "synth", str(data), "--n", "300"), env=env(), check=True)
    if not (run / "model.safetensors").exists():
        print("training the tiny model (1 epoch) ...", flush=True)
        command = medsight("train", "--data", str(data), "--out", str(run), "--epochs", "1")
        with open(work / "train-tiny.log", "wb") as log:
            subprocess.run([*command, "--overwrite"], env=env(), check=True, stdout=log, stderr=log)
    print("writing the adversarial inputs ...", flush=True)
    inputs = build_inputs(work / "inputs", data)

    rss = load = killed_server = killed_train = None
    if "rss" in sections:
        print("1. memory per bad input", flush=True)
        rss = section_rss(run, inputs, work, limit, args.timeout)
    if "load" in sections:
        print("2. mixed load", flush=True)
        load = section_load(run, inputs, work, args, limit)
    if "kill" in sections:
        print("3. kill -9 of the server, then of the trainer", flush=True)
        killed_server = section_kill_server(run, inputs, work, args, limit)
        killed_train = section_kill_train(data, work, args)

    load_avg = os.getloadavg()[0]
    print(f"\n`python benchmarks/reliability.py {' '.join(sys.argv[1:])}`".replace(" `", "`"))
    print(
        f"{time.strftime('%Y-%m-%d')}, src at {code_version()}, {os.cpu_count()} CPU cores, "
        f"load average {load_avg:.1f} at the end, {time.monotonic() - started:.0f} s in all; "
        f"logs in {work}"
    )
    if rss:
        print_rss(rss, limit)
    if load:
        print_load(load, args, limit)
    if killed_server or killed_train:
        print_kill(killed_server, killed_train, args)


if __name__ == "__main__":
    main()
