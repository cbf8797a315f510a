"""Score an archive of any size with a run: in this process, or on Ray.

``score_archive(RUN, SOURCE, "preds.parquet")`` lists the images of SOURCE (a folder or DICOM
tree, a ``.zip``, a CSV manifest with a ``path`` column), decodes and preprocesses them as the
run's ``preprocess.json`` says, scores them with the run's model (ONNX Runtime by default) and
writes a Parquet dataset: a folder of part files, one per batch, each written under a temporary
name and renamed, so a part is either whole or absent. Each row is one file: ``file`` (its
path or zip address, as :func:`text` shows it), the
task's single-valued fields (``label``, ``confidence``...), a detector's boxes as JSON text,
``p_<class>...``, ``error`` (empty when scored), ``model`` (run name @ short sha256 of its
weights) and ``scored_at`` (UTC).

The same two steps (:func:`decode_batch`, then a :class:`Scorer`) run on both engines, so the
local engine and Ray give the same probabilities. On Ray, files are read and decoded by Ray
Data tasks in parallel and scored by a pool of model actors (``workers``, each with
``gpus_per_worker`` GPUs); every actor writes its own parts. SOURCE and OUT must be on a
filesystem every Ray node sees (a local disk for a local Ray, NFS or similar on a cluster),
and medsight must be installed on every node.

**Resumable.** Before scoring, the files already in OUT are read: a file with a prediction is
skipped; a file whose row holds an error is tried again (its old row is dropped first, so a
file has one row), since an unreadable file may have been fixed or a worker may have died on
it. Part names come from the files they hold, so a batch that Ray retries after a worker died
replaces its own part instead of adding a second one. A stopped job therefore loses at most
the batches in flight: running the same command again fills the gap. Unreadable files, and
files whose outputs hold NaN or infinity, are rows with their reason in ``error``; they never
stop the job. One OUT holds the predictions of one model: another run's OUT is refused.

>>> summary = score_archive("runs/phantom", "scans/", "preds.parquet")   # doctest: +SKIP
>>> summary["scored"], summary["skipped"], summary["errors"]            # doctest: +SKIP
(998, 0, 2)
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from medsight import runs
from medsight.data import imaging
from medsight.data.volumes import find_dicom_series, read_volume
from medsight.errors import ConfigError, DataError, MedsightError
from medsight.events import Note, ProgressAdvance, ProgressEnd, ProgressStart, Reporter, silent

#: Names accepted by ``score_archive(..., engine=)``.
ENGINES: tuple[str, ...] = ("local", "ray")
#: Columns of a manifest that may hold the image paths, in the order they are looked for.
PATH_COLUMNS: tuple[str, ...] = ("path", "file", "source")
#: What ``pip`` installs for the Ray engine.
RAY_INSTALL = 'pip install "medsight[ray]"'
#: Seconds an address given to ``--address`` has to answer before it is called unreachable.
CONNECT_TIMEOUT_S = 5.0
_PART_PREFIX = "part-"
_JUNK = {"thumbs.db", "desktop.ini"}


# --------------------------------------------------------------------------- listing SOURCE


def list_images(source: str | Path, *, path_column: str | None = None) -> list[str]:
    """The images of ``source``, as the addresses :func:`medsight.data.imaging.decode` reads:
    a folder or DICOM tree (recursively: PNG, JPEG, BMP, TIFF, DICOM, NIfTI by extension, and
    DICOM files without one), a ``.zip`` (its members, read in place), a CSV manifest (its
    ``path`` column, else ``file`` or ``source``; relative paths are read from the manifest's
    folder), or one image file. Hidden files and folders are left out; order is kept and
    duplicates removed. Files that are listed but cannot be read are not refused here: they
    become rows with an error.

    Raises :class:`~medsight.errors.DataError` naming ``source`` and what was looked for when
    it holds no image.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{source}: no such file or folder; give a folder, .zip or .csv of images")
    name = path.name.lower()
    if path.is_dir():
        found = _list_folder(path)
        looked_for = _wanted("(or DICOM files without one) in it and its subfolders")
    elif name.endswith(".zip"):
        found, looked_for = _list_zip(path), _wanted("among the zip's members")
    elif name.endswith(".csv"):
        found = _list_manifest(path, path_column)
        looked_for = "rows in its path column"
    elif imaging.has_extension(name, imaging.IMAGE_EXTENSIONS) or imaging.is_dicom_file(path):
        found, looked_for = [str(path.resolve())], ""
    else:
        raise DataError(
            f"{source}: not a folder, .zip, .csv manifest or image file "
            f"(extension {path.suffix or 'none'!r})"
        )
    if not found:
        raise DataError(f"{source}: no images to score; looked for {looked_for}")
    return list(dict.fromkeys(found))


def list_volumes(source: str | Path, *, path_column: str | None = None) -> list[str]:
    """The volumes of ``source`` for a 3-D run, as :func:`~medsight.data.volumes.read_volume`
    reads them: a folder or DICOM tree (recursively: NIfTI files by extension, and each DICOM
    series as one ``dicomseries://`` address), a CSV manifest (its path column; a folder there
    stands for the series under it), or one NIfTI file. Order is kept, duplicates removed.

    Raises :class:`~medsight.errors.DataError` naming ``source`` when it holds no volume, or
    when it is a ``.zip`` (volumes are scored from a folder: unzip it first).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"{source}: no such file or folder; give a folder of NIfTI files or DICOM series, "
            "or a .csv of them"
        )
    name = path.name.lower()
    if name.endswith(".zip"):
        raise DataError(
            f"{source}: a 3-D run scores volumes from a folder, a DICOM tree or a CSV manifest; "
            "unzip it first (the REST API takes a .zip of one series)"
        )
    entries = _list_manifest(path, path_column) if name.endswith(".csv") else [str(path.resolve())]
    found: list[str] = []
    for entry in entries:
        if "://" in entry or not Path(entry).is_dir():
            found.append(entry)
            continue
        for dirpath, dirnames, filenames in os.walk(entry):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(
                str((Path(dirpath) / f).resolve())
                for f in sorted(filenames)
                if not _hidden([f]) and imaging.has_extension(f, imaging.NIFTI_EXTENSIONS)
            )
        found.extend(find_dicom_series(entry))
    if not found:
        raise DataError(
            f"{source}: no volumes to score; looked for NIfTI files "
            f"({', '.join(imaging.NIFTI_EXTENSIONS)}) and DICOM series in it and its subfolders"
        )
    return list(dict.fromkeys(found))


def _wanted(where: str) -> str:
    return f"files ending {', '.join(imaging.IMAGE_EXTENSIONS)} {where}"


def _hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[-1].lower() in _JUNK


def _list_folder(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if _hidden([filename]):
                continue
            path = Path(dirpath) / filename
            if imaging.has_extension(filename, imaging.IMAGE_EXTENSIONS) or (
                "." not in filename and imaging.is_dicom_file(path)
            ):
                found.append(str(path.resolve()))
    return found


def _list_zip(archive: Path) -> list[str]:
    handle = imaging.open_zip(archive)
    return [
        imaging.zip_source(archive, info.filename)
        for info in handle.infolist()
        if not info.is_dir()
        and not _hidden(PurePosixPath(info.filename).parts)
        and imaging.has_extension(info.filename, imaging.IMAGE_EXTENSIONS)
    ]


def _list_manifest(manifest: Path, column: str | None) -> list[str]:
    try:
        frame = pd.read_csv(manifest, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        return []
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{manifest}: not a readable CSV ({exc})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    candidates = [column] if column else list(PATH_COLUMNS)
    found = next((c for c in candidates if c in frame.columns), None)
    if found is None:
        raise DataError(
            f"{manifest}: no {' or '.join(repr(c) for c in candidates)} column with the image "
            f"paths (columns are: {', '.join(frame.columns) or 'none'})"
        )
    base = manifest.parent.resolve()
    paths = []
    for raw in frame[found].str.strip():
        if not raw:
            continue
        if "://" in raw:  # an address medsight reads (zip://archive!member)
            paths.append(raw)
            continue
        candidate = Path(raw.replace("\\", "/")).expanduser()
        paths.append(os.path.normpath(candidate if candidate.is_absolute() else base / candidate))
    return paths


# --------------------------------------------------------------------------- the two steps


def text(value: str) -> str:
    """``value`` as UTF-8 text, which Parquet and Arrow need: the bytes of a file name that is
    not UTF-8 (surrogate escapes) are shown as ``\\xff``. The ``file`` column holds this form of
    each path (it is also what a re-run matches on)."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def decode_batch(
    files: Sequence[str], preprocess, shape: tuple[int, int, int], max_pixels: int
) -> dict[str, np.ndarray]:
    """Read and preprocess ``files`` as the run does (volumes for a 3-D run): ``{"file", "x"
    (N, *shape) float32, "height", "width", "error"}``; a file that cannot be read has its
    reason in ``error`` and zeros in ``x``."""
    volumes = getattr(preprocess, "dims", 2) == 3
    xs = np.zeros((len(files), *shape), np.float32)
    heights = np.zeros(len(files), np.int64)
    widths = np.zeros(len(files), np.int64)
    errors = []
    for i, file in enumerate(files):
        error = ""
        try:
            if volumes:
                image = read_volume(str(file), max_pixels=max_pixels)
                heights[i], widths[i] = image.shape[:2]
            else:
                image = imaging.decode(
                    str(file), max_pixels=max_pixels, **preprocess.decode_options()
                )
                heights[i], widths[i] = image.size
            xs[i] = preprocess(image)
        except MedsightError as exc:
            error = str(exc)
        except OSError as exc:  # e.g. a file that is not readable by this user
            error = f"{file}: cannot read it: {exc.strerror or exc}"
        except Exception as exc:  # noqa: BLE001 - one bad file never stops an archive
            error = f"{file}: cannot prepare it ({type(exc).__name__}: {exc})"
        errors.append(error)
    return {
        "file": np.array([text(str(f)) for f in files], dtype=object),
        "x": xs,
        "height": heights,
        "width": widths,
        "error": np.array([text(e) for e in errors], dtype=object),
    }


class Scorer:
    """A run's :class:`~medsight.inference.Predictor` turning decoded batches into table rows
    (:meth:`__call__`), tagged with :attr:`model`."""

    def __init__(self, predictor, model: str):
        self.predictor = predictor
        self.model = model
        task = predictor.task
        schema = task.prediction_schema.model_fields
        #: Single-valued fields of the task's prediction, one column each (label, confidence).
        self.fields = {
            name: field.annotation
            for name, field in schema.items()
            if field.annotation in (str, float, int, bool)
        }
        #: List fields written as JSON text (a detector's boxes).
        self.as_json = [
            name
            for name, field in schema.items()
            if (field.json_schema_extra or {}).get("table") == "json"
        ]
        self.columns = task.prediction_columns(predictor.classes_)

    @property
    def schema(self) -> list[str]:
        """The output columns, in order."""
        return ["file", *self.fields, *self.as_json, *self.columns, "error", "model", "scored_at"]

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        """One decoded batch (:func:`decode_batch`) → one row per file."""
        predictor = self.predictor
        files = [str(f) for f in batch["file"]]
        errors = [str(e) for e in batch["error"]]
        values: dict[str, list] = {name: [] for name in self.schema}
        ready = [i for i, e in enumerate(errors) if not e]
        probs = _probabilities(predictor, np.asarray(batch["x"], np.float32)[ready], files, ready)
        scored = dict(zip(ready, probs))
        for i, file in enumerate(files):
            result = scored.get(i)
            if isinstance(result, str):
                errors[i], result = result, None
            decoded = None
            if result is not None:
                size = (int(batch["height"][i]), int(batch["width"][i]))
                decoded = predictor.decode(result[None], sizes=[size])[0]
                cells = predictor.task.column_values(result[None], predictor.classes_)[0]
            for name, kind in self.fields.items():
                empty = "" if kind is str else np.nan
                values[name].append(empty if decoded is None else decoded[name])
            for name in self.as_json:
                values[name].append("" if decoded is None else json.dumps(decoded[name]))
            for k, name in enumerate(self.columns):
                values[name].append(np.nan if decoded is None else float(cells[k]))
            values["file"].append(file)
            values["error"].append(errors[i])
        values["model"] = [self.model] * len(files)
        values["scored_at"] = [_now()] * len(files)
        table = pd.DataFrame(values, columns=self.schema)
        for name, kind in self.fields.items():
            if kind is not str:
                table[name] = table[name].astype("float64")
        return table


def _probabilities(predictor, x: np.ndarray, files: list[str], index: list[int]) -> list:
    """Each image's probabilities; for an image whose outputs hold NaN or infinity, or that
    the model fails on, the reason (a string) instead. The batch at once, image by image only
    when the batch is refused."""
    if not len(x):
        return []
    try:
        return list(predictor.predict_array(x))
    except Exception as exc:  # noqa: BLE001 - find the image at fault; the others are scored
        if len(x) > 1:
            return [
                _probabilities(predictor, x[k : k + 1], files, index[k : k + 1])[0]
                for k in range(len(x))
            ]
        file = files[index[0]]
        if isinstance(exc, DataError):  # the task refuses outputs that are not finite
            pixels = "" if np.isfinite(x).all() else "; its pixel values hold NaN or infinity"
            return [f"{file}: the model's outputs hold NaN or infinity{pixels}"]
        return [f"{file}: the model failed on it ({type(exc).__name__}: {exc})"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the output dataset


def part_name(files: Sequence[str]) -> str:
    """A part's file name, from the files it holds: a batch scored twice (a Ray retry after a
    worker died) replaces its own part."""
    digest = hashlib.sha256("\n".join(files).encode("utf-8", "surrogateescape")).hexdigest()
    return f"{_PART_PREFIX}{digest[:20]}.parquet"


def write_part(out: Path, table: pd.DataFrame) -> str:
    """Write ``table`` as one part of the dataset ``out`` (temporary name, then rename)."""
    name = part_name(table["file"].tolist())
    runs.write_atomic(out / name, lambda tmp: table.to_parquet(tmp, index=False))
    return name


def _parts(out: Path) -> list[Path]:
    return sorted(out.glob(f"{_PART_PREFIX}*.parquet"))


def read_scored(out: str | Path) -> pd.DataFrame:
    """Every row of the dataset ``out`` (all parts), sorted by file; empty when there is none."""
    import pyarrow.parquet as pq

    parts = _parts(Path(out))
    if not parts:
        return pd.DataFrame()
    tables = [pq.read_table(p).to_pandas() for p in parts]
    return pd.concat(tables, ignore_index=True).sort_values("file", kind="stable")


def _done(out: Path, todo: list[str], model: str, retry_errors: bool) -> set[str]:
    """The files ``out`` already holds a prediction of; with ``retry_errors``, error rows of
    files about to be scored again are dropped from their parts first."""
    import pyarrow.parquet as pq

    wanted = {text(f) for f in todo}
    done: set[str] = set()
    for part in _parts(out):
        try:
            table = pq.read_table(part, columns=["file", "error", "model"]).to_pandas()
        except Exception as exc:  # noqa: BLE001 - a part another tool broke
            raise DataError(
                f"{part}: not a readable part of the dataset ({exc}); delete it and run again "
                "(its files are scored again)"
            ) from None
        others = sorted(set(table["model"]) - {model})
        if others:
            raise ConfigError(
                f"{out} holds predictions of model {others[0]}, not of {model}; give another "
                "--out, or delete it to score everything again"
            )
        failed = table["error"].astype(str).ne("")
        done.update(table.loc[~failed, "file"])
        if not retry_errors:
            done.update(table.loc[failed, "file"])
            continue
        retried = failed & table["file"].isin(wanted)
        if retried.any():
            kept = pq.read_table(part).to_pandas()[~retried.to_numpy()]
            if kept.empty:
                part.unlink()
            else:
                runs.write_atomic(part, lambda tmp, kept=kept: kept.to_parquet(tmp, index=False))
    return done


def _model_tag(run) -> str:
    """``<run name>@<first 12 hex digits of the sha256 of model.safetensors>``."""
    sha = hashlib.sha256()
    with open(run.path / runs.WEIGHTS, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
    return f"{run.path.resolve().name}@{sha.hexdigest()[:12]}"


def _csv_path(out: Path) -> Path:
    return out.with_suffix(".csv") if out.suffix else out.with_name(out.name + ".csv")


# --------------------------------------------------------------------------- score_archive


def score_archive(
    run: str | Path,
    source: str | Path,
    out: str | Path,
    *,
    engine: str = "local",
    address: str | None = None,
    workers: int | None = None,
    batch_size: int = 64,
    backend: str = "onnx",
    gpus_per_worker: float = 0,
    csv: bool = False,
    device: str = "auto",
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS,
    tta: str | None = None,
    point: str = "youden",
    path_column: str | None = None,
    retry_errors: bool = True,
    events: Reporter = silent,
) -> dict:
    """Score every image of ``source`` with ``run`` into the Parquet dataset ``out`` (a
    folder of part files; see the module's notes), skipping files already scored there.

    ``engine``: ``"local"`` (this process) or ``"ray"`` (Ray Data tasks decode, ``workers``
    model actors score; ``address``: ``auto``, ``ray://head:10001`` or ``host:port`` of a
    running cluster, else a local Ray is started and stopped). ``backend``: ``onnx`` (ONNX
    Runtime) or ``torch``; ``device``: where the model runs (``auto``, ``cpu``, ``cuda``);
    on Ray, ``gpus_per_worker`` GPUs are given to each actor. ``tta``, ``point``,
    ``max_pixels``: as for :func:`~medsight.inference.predict_paths`. ``csv``: also write all rows
    to ``out`` with a ``.csv`` suffix at the end. ``retry_errors``: score files whose row
    holds an error again (default).

    Returns a summary: ``listed``, ``scored``, ``skipped`` (already in ``out``), ``errors``
    (among those scored), ``seconds``, ``images_per_s``, ``out``, ``csv``, ``model``,
    ``engine``, ``workers``.
    """
    from medsight.inference import BACKENDS, Predictor

    name = str(engine).strip().lower()
    if name not in ENGINES:
        raise ConfigError(f"--engine {engine!r} is not known; choose one of: {', '.join(ENGINES)}")
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r} is not known; choose one of: {BACKENDS}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be at least 1")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1")
    if gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker {gpus_per_worker} must be 0 or more")
    if name == "local" and (gpus_per_worker or address):
        given = "--gpus-per-worker" if gpus_per_worker else "--address"
        raise ConfigError(f"{given} is for --engine ray; the local engine runs on --device")
    ray = _import_ray() if name == "ray" else None  # before any work: say how to install it
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--out {out} is a file; the predictions are a Parquet dataset (a folder of parts): "
            "give a new name such as preds.parquet"
        )
    listing = list_volumes if runs.Run.load(run).dims == 3 else list_images
    files = listing(source, path_column=path_column)
    start = time.perf_counter()
    # Loaded here first, also for Ray: the ONNX file is exported once, before any actor reads it.
    predictor = Predictor.from_run(
        run, backend=backend, tta=tta, point=point, device="cpu" if name == "ray" else device
    )
    scorer = Scorer(predictor, _model_tag(predictor.run))
    done: set[str] = set()
    if out.is_dir():
        runs.clean_stale(out)
        done = _done(out, files, scorer.model, retry_errors)
    todo = [f for f in files if text(f) not in done]
    summary = {
        "engine": name,
        "listed": len(files),
        "scored": 0,
        "skipped": len(files) - len(todo),
        "errors": 0,
        "out": str(out),
        "csv": None,
        "model": scorer.model,
        "workers": 1 if name == "local" else workers,
    }
    if todo:
        out.mkdir(parents=True, exist_ok=True)
        if name == "local":
            counts = _score_local(scorer, todo, out, batch_size, max_pixels, events)
        else:
            counts = _score_ray(
                ray,
                predictor,
                scorer,
                todo,
                out,
                run=run,
                backend=backend,
                address=address,
                workers=workers,
                batch_size=batch_size,
                gpus_per_worker=gpus_per_worker,
                device=device,
                tta=tta,
                point=point,
                max_pixels=max_pixels,
                events=events,
            )
            summary["workers"] = counts.pop("workers")
        summary.update(counts)
    seconds = time.perf_counter() - start
    summary["seconds"] = round(seconds, 3)
    summary["images_per_s"] = round(summary["scored"] / seconds, 1) if summary["scored"] else 0.0
    if csv:
        path = _csv_path(out)
        table = read_scored(out) if out.is_dir() else pd.DataFrame(columns=scorer.schema)
        runs.write_text(path, table.to_csv(index=False))
        summary["csv"] = str(path)
    return summary


def _score_local(
    scorer: Scorer, todo: list[str], out: Path, batch_size: int, max_pixels: int, events: Reporter
) -> dict:
    """The pipeline in this process: the next batch is decoded (in a thread) while this one is
    scored."""
    predictor = scorer.predictor
    shape = predictor.input_shape[1:]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    scored = errors = 0
    events(ProgressStart("scoring", total=len(todo)))
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            decode = lambda files: decode_batch(files, predictor.preprocess, shape, max_pixels)  # noqa: E731
            pending = pool.submit(decode, batches[0])
            for k in range(len(batches)):
                batch = pending.result()
                if k + 1 < len(batches):
                    pending = pool.submit(decode, batches[k + 1])
                table = scorer(batch)
                write_part(out, table)
                scored += len(table)
                errors += int(table["error"].ne("").sum())
                events(ProgressAdvance(len(table)))
    finally:
        events(ProgressEnd())
    return {"scored": scored, "errors": errors}


# --------------------------------------------------------------------------- Ray


def _import_ray():
    """The ``ray`` module with Ray Data, or a ConfigError saying how to install it."""
    try:
        ray = importlib.import_module("ray")
        importlib.import_module("ray.data")
    except ImportError:
        raise ConfigError(f"the ray engine needs Ray: {RAY_INSTALL}") from None
    return ray


def _check_reachable(address: str) -> None:
    """Refuse, within :data:`CONNECT_TIMEOUT_S`, a ``host:port`` or ``ray://host:port`` that
    nothing answers on (Ray itself would keep trying for much longer)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"--address {address!r} is not an address; give auto, ray://HOST:PORT (Ray Client, "
            "usually port 10001) or HOST:PORT (the head's GCS, usually 6379)"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConfigError(
            f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
            "start one (ray start --head) or check the address"
        ) from None


def _connect(ray, address: str | None, workers: int | None) -> bool:
    """Join the cluster at ``address`` or start a local Ray; True when this call started (and
    must stop) it. An existing connection (``ray.init`` called before) is used as it is."""
    import logging

    if address and address.strip().lower() not in ("auto", "local"):
        _check_reachable(address.strip())
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    try:
        if address:
            ray.init(address=address.strip(), **quiet)
        else:
            cpus = os.cpu_count() or 1
            ray.init(
                num_cpus=max(cpus, (workers or 1) + 1),
                include_dashboard=False,
                **quiet,
            )
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
        where = f"--address {address}" if address else "a local Ray"
        raise ConfigError(f"{where}: cannot connect ({str(exc).splitlines()[0]})") from None
    return True


class _ModelActor:
    """A Ray Data actor: loads the run once, scores decoded batches and writes their parts."""

    def __init__(self, run: str, model: str, out: str, threads: int, **predictor_kwargs):
        from medsight.inference import Predictor

        predictor = Predictor.from_run(run, **predictor_kwargs)
        _limit_threads(predictor, threads)
        self.scorer = Scorer(predictor, model)
        self.out = Path(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        table = self.scorer(batch)
        write_part(self.out, table)
        return {
            "scored": np.array([len(table)]),
            "errors": np.array([int(table["error"].ne("").sum())]),
        }


def _limit_threads(predictor, threads: int) -> None:
    """Give the model ``threads`` CPU threads: Ray runs several actors on one machine, and each
    using every core would make them fight over the cores."""
    import torch

    torch.set_num_threads(threads)
    session = getattr(predictor.backend, "session", None)
    if session is None or session.get_providers()[0] != "CPUExecutionProvider":
        return
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    predictor.backend.session = ort.InferenceSession(
        str(predictor.backend.path), options, providers=session.get_providers()
    )


def _decode_task(batch: dict[str, np.ndarray], preprocess, shape, max_pixels) -> dict:
    files = [os.fsdecode(bytes(path)) for path in batch["path"]]
    return decode_batch(files, preprocess, shape, max_pixels)


def _score_ray(
    ray,
    predictor,
    scorer: Scorer,
    todo: list[str],
    out: Path,
    *,
    run,
    backend: str,
    address: str | None,
    workers: int | None,
    batch_size: int,
    gpus_per_worker: float,
    device: str,
    tta: str | None,
    point: str,
    max_pixels: int,
    events: Reporter,
) -> dict:
    started = _connect(ray, address, workers)
    try:
        resources = ray.cluster_resources()
        cpus = float(resources.get("CPU", 1.0))
        if workers is None:
            if gpus_per_worker:
                workers = max(1, int(resources.get("GPU", 0) // gpus_per_worker))
            else:
                workers = max(1, int(cpus) - 1)
        if gpus_per_worker and resources.get("GPU", 0) < gpus_per_worker:
            raise ConfigError(
                f"--gpus-per-worker {gpus_per_worker}: the Ray cluster has "
                f"{resources.get('GPU', 0):g} GPU(s)"
            )
        # Actors and decoding tasks share the CPUs: each asks for at most one, and for less
        # when there are not enough for every actor and one decoding task at a time.
        share = min(1.0, cpus / (workers + 1))
        threads = max(1, int(cpus // workers)) if address is None else 1
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        context.execution_options.verbose_progress = False
        shape = predictor.input_shape[1:]
        blocks = max(1, min(len(todo) // batch_size + 1, 200))
        dataset = (
            # paths travel as bytes: Arrow strings refuse names that are not UTF-8
            ray.data.from_items(
                [{"path": os.fsencode(f)} for f in todo], override_num_blocks=blocks
            )
            .map_batches(
                _decode_task,
                fn_args=(predictor.preprocess, shape, max_pixels),
                batch_size=batch_size,
                batch_format="numpy",
                num_cpus=share,
            )
            .map_batches(
                _ModelActor,
                fn_constructor_kwargs={
                    "run": str(Path(run).resolve()),
                    "backend": backend,
                    "device": "cuda" if gpus_per_worker else device,
                    "tta": tta,
                    "point": point,
                    "model": scorer.model,
                    "out": str(out.resolve()),
                    "threads": threads,
                },
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=share,
                num_gpus=gpus_per_worker or None,
            )
        )
        scored = errors = 0
        events(ProgressStart(f"scoring on Ray ({workers} worker(s))", total=len(todo)))
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                n = int(np.sum(batch["scored"]))
                scored += n
                errors += int(np.sum(batch["errors"]))
                events(ProgressAdvance(n))
        except Exception as exc:  # noqa: BLE001 - what was written stays; a re-run goes on
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MedsightError(
                f"the Ray job stopped after {scored} of {len(todo)} file(s) ({first}); what was "
                f"scored is in {out}: run the same command again to score the rest"
            ) from None
        finally:
            events(ProgressEnd())
        if scored < len(todo):
            events(Note(f"{len(todo) - scored} file(s) were not scored; run again to fill the gap"))
        return {"scored": scored, "errors": errors, "workers": workers}
    finally:
        if started:
            ray.shutdown()
