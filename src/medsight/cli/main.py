"""The ``medsight`` command line: each command is a thin call into the library.

Errors meant for people (:class:`medsight.errors.MedsightError`) are printed on one line and
end the command with exit status 2. So are :class:`OSError` s (a full disk, a read-only or
missing folder, a file that cannot be opened): they come from the machine, not from medsight,
and the line names the file, what failed and the system's reason. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import warnings
from contextlib import contextmanager, suppress
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from medsight import __version__
from medsight.cli.options import train_config as _train_config
from medsight.cli.options import with_train_options
from medsight.config import READ_FORMATS
from medsight.data.imaging import DEFAULT_MAX_PIXELS
from medsight.errors import MedsightError
from medsight.serving.service import SERVE_MAX_PIXELS

app = typer.Typer(
    name="medsight",
    help="Train, evaluate, explain and serve medical image classifiers.",
    no_args_is_help=True,
    add_completion=False,
)
data_app = typer.Typer(
    help="Read, audit, split and preview image collections.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)


DataFormat = Enum("DataFormat", {name: name for name in READ_FORMATS}, type=str)


class Backend(str, Enum):
    torch = "torch"
    onnx = "onnx"


class Tta(str, Enum):
    flip = "flip"
    rot = "rot"


TtaOption = Annotated[
    Tta | None,
    typer.Option(
        "--tta",
        help="Test-time augmentation: average over mirrored (flip) or rotated (rot) views; "
        "refused where the modality forbids it (flip on chest X-rays).",
    ),
]

DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        help="Where the network runs: auto (CUDA when a GPU is present, else CPU), cpu, cuda, "
        "cuda:N or mps.",
    ),
]

WorklistDbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Worklist database URL (default: the SQLite file in the worklist's folder, the "
        "one `medsight serve RUN` uses).",
        show_default=False,
    ),
]
WorklistDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="The worklist's folder: stored images, the outbox, the SQLite file (default "
        "RUN/worklist).",
        show_default=False,
    ),
]

PointOption = Annotated[
    str,
    typer.Option(
        "--point",
        help="Multi-label: the evaluated operating point (metrics.json thresholds) each finding "
        "is decided at: youden, sensitivity_0.90, sensitivity_0.95 (0.5 when not evaluated). "
        "Detection: the false-positive rate boxes are kept at: fp_1 (youden means fp_1), "
        "fp_0.125 ... fp_8.",
    ),
]

FormatOption = Annotated[
    DataFormat | None, typer.Option("--format", help="Reader to use (detected from the path).")
]
AllowOutsideOption = Annotated[
    bool,
    typer.Option("--allow-outside", help="Let manifest paths point outside the CSV's folder."),
]
MaxPixelsOption = Annotated[
    int, typer.Option("--max-pixels", help="Refuse images with more pixels (decompression bombs).")
]
SliceOption = Annotated[
    int | None, typer.Option("--slice", help="Slice index of 3-D NIfTI volumes (default: middle).")
]
AxisOption = Annotated[int, typer.Option("--axis", help="Slice axis of 3-D NIfTI volumes (RAS+).")]
DimsOption = Annotated[
    str,
    typer.Option(
        "--dims",
        help="2: images (a slice of each volume); 3: whole volumes (NIfTI, DICOM series, "
        "MedMNIST3D); auto: 3 for MedMNIST3D and 3-D NIfTI without --slice/--axis.",
    ),
]
VolumeOption = Annotated[
    int | None,
    typer.Option("--volume", help="Which volume of 4-D NIfTI files (default: the first)."),
]


def _version(value: bool) -> None:
    if value:
        console.print(f"medsight {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Train, evaluate, explain and serve medical image classifiers."""


def _shown(value) -> str:
    """``value`` as text safe to print: file names that are not UTF-8 (surrogate escapes) show
    their bytes as ``\\xff``, and brackets are not taken for Rich markup."""
    text = str(value).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return escape(text)


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: the file(s), the system's reason and its errno name."""
    name = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
    reason = exc.strerror or str(exc)
    if name:
        reason = f"{reason} ({name})"
    where = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{' -> '.join(where)}: {reason}" if where else reason


@contextmanager
def _user_errors():
    """Turn a MedsightError or an OSError into one red line and exit status 2; show library
    warnings plainly."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except MedsightError as exc:
            _error_line(str(exc))
            raise typer.Exit(2) from None
        except OSError as exc:  # the machine's refusal (disk full, permissions), not a bug
            _error_line(os_error_line(exc))
            raise typer.Exit(2) from None
        finally:
            for warning in caught:
                if issubclass(warning.category, UserWarning):
                    err_console.print(
                        f"[yellow]warning:[/] {_shown(warning.message)}", highlight=False
                    )


def _error_line(message: str) -> None:
    # soft_wrap: one line however long, so scripts and people read it whole
    err_console.print(f"[bold red]error:[/] {_shown(message)}", highlight=False, soft_wrap=True)


def _events():
    """A reporter that draws what the library reports (its events) on stderr; a ``with``
    block around it ends any progress bar or live table it still shows."""
    from medsight.cli.render import Renderer

    return Renderer(err_console)


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


def _load(
    path: Path,
    fmt: DataFormat | None,
    allow_outside: bool,
    axis: int,
    index: int | None,
    dims: str = "auto",
    volume: int | None = None,
    **findings,
):
    """Read ``path``; ``findings`` are the multi-label reader options (labels,
    findings_column, uncertain) of the commands that take them."""
    from medsight.data.sources import load_samples

    return load_samples(
        path,
        format=fmt.value if fmt else None,
        allow_outside=allow_outside,
        nifti_axis=axis,
        nifti_slice=index,
        dims=dims,
        volume=volume,
        **{k: v for k, v in findings.items() if v is not None},
    )


class Uncertain(str, Enum):
    ignore = "ignore"
    zeros = "zeros"
    ones = "ones"


LabelsOption = Annotated[
    str | None,
    typer.Option(
        "--labels",
        help="Multi-label CSV: its 0/1 finding columns, comma-separated, or 'all' (every column "
        "that is not a path, id, split or known metadata column).",
    ),
]
FindingsColumnOption = Annotated[
    str | None,
    typer.Option(
        "--findings-column",
        help="Multi-label CSV: a column of findings joined by | ('Finding Labels' is found "
        "without this flag when there is no label column).",
    ),
]
UncertainOption = Annotated[
    Uncertain,
    typer.Option(
        "--uncertain",
        help="Uncertain multi-label entries (-1, blank): ignored, or counted as absent (zeros) "
        "or present (ones).",
    ),
]


# --------------------------------------------------------------------------- data check


@data_app.command("check")
def data_check(
    path: Annotated[
        Path, typer.Argument(help="Folder, .zip, .csv manifest, .npz, DICOM or NIfTI.")
    ],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON to this file.")
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 on any unreadable file, duplicate or leak.")
    ] = False,
    fmt: FormatOption = None,
    allow_outside: AllowOutsideOption = False,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    axis: AxisOption = 2,
    index: SliceOption = None,
    dims: DimsOption = "auto",
    volume: VolumeOption = None,
    labels: LabelsOption = None,
    findings_column: FindingsColumnOption = None,
    uncertain: UncertainOption = Uncertain.ignore,
) -> None:
    """Audit a collection: counts per class (or finding) and split, unreadable files,
    duplicates, leakage; for volumes, shapes, spacings and orientations per split and the
    series that cannot be stacked (missing or duplicated slices, mixed orientations, tilt).

    Exit status: 0 usable; 1 with --strict when a problem was found; 2 when nothing is readable.
    """
    from medsight.data.checks import check_samples

    with _user_errors():
        table = _load(
            path,
            fmt,
            allow_outside,
            axis,
            index,
            dims=dims,
            volume=volume,
            labels=labels,
            findings_column=findings_column,
            uncertain=uncertain.value,
        )
        for note in table.attrs.get("notes", []):
            console.print(f"[dim]note:[/] {_shown(note)}", highlight=False)
        with _progress() as bar:
            task = bar.add_task("decoding images", total=len(table))
            report = check_samples(
                table, max_pixels=max_pixels, progress=lambda n: bar.advance(task, n)
            )
        document = {
            "path": str(path),
            "format": table.attrs.get("format"),
            "notes": list(table.attrs.get("notes", [])),
            **report.to_dict(),
        }
        if json_out is not None:
            from medsight.runs import write_json

            write_json(json_out, document)
        if not report.usable:
            raise MedsightError(
                f"{path}: none of the {report.n_images} images could be read "
                f"(first reason: {report.unreadable[0]['reason']})"
            )
        _print_check(document)
    if strict and not report.clean:
        raise typer.Exit(1)


def _print_volumes(summary: dict) -> None:
    table = Table(title="Volumes per split (shape in voxels X×Y×Z, spacing in mm)")
    for column in ("split", "shapes", "spacings", "orientations"):
        table.add_column(column)

    def top(counts: dict) -> str:
        shown = ", ".join(f"{k} ({v:,})" for k, v in list(counts.items())[:3])
        return shown + (f" +{len(counts) - 3} more" if len(counts) > 3 else "")

    for split, found in summary["per_split"].items():
        table.add_row(split, top(found["shape"]), top(found["spacing"]), top(found["orientation"]))
    console.print(table)
    if summary["mixed"]:
        console.print(
            f"[yellow]mixed {', '.join(summary['mixed'])} across the volumes:[/] training "
            "resamples them (set data.spacing for one physical scale; orientation becomes RAS)"
        )


def _print_check(doc: dict) -> None:
    console.print(
        f"[bold]{_shown(doc['path'])}[/]  format [cyan]{doc['format']}[/]  "
        f"{doc['n_images']:,} images, {doc['n_readable']:,} readable",
        highlight=False,
    )
    if doc.get("detection"):
        _print_boxes(doc["detection"])
    elif doc.get("multilabel"):
        _print_findings(doc["multilabel"])
    else:
        _print_classes(doc)
    if doc["unlabelled"]:
        console.print(f"{doc['unlabelled']:,} images have no label (an unlabelled collection)")
    sizes = ", ".join(f"{k} ({v:,})" for k, v in list(doc["sizes"].items())[:5])
    more = f" and {len(doc['sizes']) - 5} more" if len(doc["sizes"]) > 5 else ""
    modes = ", ".join(f"{k} ({v:,})" for k, v in doc["channels"].items())
    console.print(f"sizes: {sizes or '-'}{more}\nchannels: {modes or '-'}", highlight=False)
    if doc.get("volumes"):
        _print_volumes(doc["volumes"])
    if doc["imbalance_ratio"] is not None:
        console.print(f"class imbalance (largest / smallest class): {doc['imbalance_ratio']:g}")
    if doc["ignored_files"]:
        ignored = ", ".join(f"{k} ({v})" for k, v in doc["ignored_files"].items())
        console.print(f"ignored files (not images): {ignored}", highlight=False)
    _print_problems(doc)


def _print_findings(summary: dict, pairs: int = 10) -> None:
    """A multi-label report: prevalence per finding and split, co-occurrence, gaps."""
    # an "unassigned" column that is every image would only repeat "all"
    splits = [
        s
        for s in summary["images"]
        if s != "unassigned" or summary["images"][s] != summary["images"]["all"]
    ]
    table = Table(title="Images per finding and split", title_justify="left")
    table.add_column("finding")
    for split in splits:
        table.add_column(split, justify="right", style="bold" if split == "all" else None)
    findings = summary["findings"]
    for name in findings:
        table.add_row(
            _shown(name),
            *(_count_cell(summary["prevalence"][s][name]) for s in splits),
            end_section=name == findings[-1],
        )
    table.add_row("no finding", *(_count_cell(summary["no_finding"][s]) for s in splits))
    table.add_row("images", *(f"{summary['images'][s]:,}" for s in splits), style="bold")
    console.print(table)
    if summary["uncertain"]:
        shown = ", ".join(f"{_shown(f)} ({n:,})" for f, n in summary["uncertain"].items())
        console.print(f"uncertain (ignored) entries: {shown}", highlight=False)
    if summary["co_occurrence"]:
        total = len(summary["co_occurrence"])
        shown = f" (top {pairs} of {total} pairs)" if total > pairs else ""
        together = Table(title=f"Findings seen together{shown}", title_justify="left")
        together.add_column("findings")
        together.add_column("images", justify="right")
        for pair in summary["co_occurrence"][:pairs]:
            together.add_row(_shown(" + ".join(pair["findings"])), _count_cell(pair))
        console.print(together)
    else:
        console.print("no image has two findings together")
    if summary["missing"]:
        by_split: dict[str, list[str]] = {}
        for gap in summary["missing"]:
            by_split.setdefault(gap["split"], []).append(gap["finding"])
        for split, names in by_split.items():
            where = "any image" if split == "all" else f"split {split}"
            console.print(
                f"[yellow]warning:[/] {len(names)} finding(s) never occur in {where}: "
                f"{_shown(', '.join(names))} (their metrics there cannot be computed)",
                highlight=False,
            )


def _print_boxes(summary: dict, limit: int = 10) -> None:
    """A detection report: boxes per class and split, per image, and boxes drawn wrong."""
    splits = [s for s in summary["boxes_per_class"] if s != "all"] + ["all"]
    table = Table(title="Boxes per class and split", title_justify="left")
    table.add_column("class")
    for split in splits:
        table.add_column(split, justify="right", style="bold" if split == "all" else None)
    table.add_column("images with one", justify="right")
    names = list(summary["boxes_per_class"]["all"])
    for name in names:
        table.add_row(
            _shown(name),
            *(f"{summary['boxes_per_class'][s].get(name, 0):,}" for s in splits),
            f"{summary['images_per_class'].get(name, 0):,}",
            end_section=name == names[-1],
        )
    table.add_row(
        "boxes",
        *(f"{sum(summary['boxes_per_class'][s].values()):,}" for s in splits),
        "",
        style="bold",
    )
    console.print(table)
    per_image = summary["boxes_per_image"]
    console.print(
        f"boxes per image: mean {per_image['mean']:g}, max {per_image['max']:,}; "
        f"{summary['images_without_boxes']:,} of {summary['images']:,} images without boxes",
        highlight=False,
    )
    fixes = summary.get("reader_fixes") or {}
    done = [
        f"{fixes[k]} {what}"
        for k, what in (
            ("zero_area", "of zero area dropped"),
            ("clipped", "partly outside clipped"),
        )
        if fixes.get(k)
    ]
    if done:
        console.print(f"[dim]the reader fixed boxes:[/] {', '.join(done)}", highlight=False)
    if summary["unknown_classes"]:
        console.print(
            f"[yellow]warning:[/] box classes not in the class list: "
            f"{_shown(', '.join(summary['unknown_classes']))}",
            highlight=False,
        )
    for key, title in (
        ("outside", "Boxes outside their image"),
        ("zero_area", "Boxes of zero area"),
        ("duplicate_boxes", "Duplicate boxes (same image and class, IoU > 0.95)"),
    ):
        found = summary[key]
        if not found:
            continue
        problems = Table(title=f"{title} ({len(found)})", title_justify="left")
        problems.add_column("sample")
        problems.add_column("box(es)", overflow="fold")
        for item in found[:limit]:
            shown = item.get("boxes") or [item["box"]]
            text = "; ".join(f"{b[4]} ({b[0]:g}, {b[1]:g}, {b[2]:g}, {b[3]:g})" for b in shown)
            if "size" in item:
                text += f" in {item['size']}"
            if "iou" in item:
                text += f", IoU {item['iou']:g}"
            problems.add_row(_shown(item["sample_id"]), _shown(text))
        console.print(problems)
        if len(found) > limit:
            console.print(f"({len(found) - limit} more in the --json report)")


def _count_cell(entry: dict) -> str:
    return f"{entry['count']:,} ({entry['percent']:.1f}%)"


def _print_classes(doc: dict) -> None:
    classes = list(doc["classes"])
    splits = list(doc["splits"])
    total = sum(doc["classes"].values())
    table = Table(title="Images per class and split", title_justify="left")
    table.add_column("class")
    for split in splits:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right", style="bold")
    table.add_column("share", justify="right")
    for name in classes:
        table.add_row(
            _shown(name),
            *(f"{doc['splits'][s].get(name, 0):,}" for s in splits),
            f"{doc['classes'][name]:,}",
            f"{doc['classes'][name] / total:.1%}",
            end_section=name == classes[-1],
        )
    table.add_row(
        "all",
        *(f"{sum(doc['splits'][s].values()):,}" for s in splits),
        f"{total:,}",
        "",
        style="bold",
    )
    if classes:
        console.print(table)


#: The lists of a ``data check`` report that make it unclean, in the order they are shown.
PROBLEM_KINDS = ("unreadable", "too_small", "duplicates", "leakage")


def _print_problems(doc: dict, limit: int = 20) -> None:
    if doc["unreadable"]:
        table = Table(title=f"Unreadable files ({len(doc['unreadable'])})", title_justify="left")
        table.add_column("sample")
        table.add_column("reason", overflow="fold")
        for item in doc["unreadable"][:limit]:
            table.add_row(_shown(item["sample_id"]), _shown(item["reason"]))
        console.print(table)
    if doc.get("too_small"):
        table = Table(
            title=f"Images too small to train on ({len(doc['too_small'])})",
            title_justify="left",
            min_width=40,
        )
        table.add_column("sample")
        table.add_column("size")
        for item in doc["too_small"][:limit]:
            table.add_row(_shown(item["sample_id"]), item["size"])
        console.print(table)
    if doc["duplicates"]:
        table = Table(
            title=f"Exact duplicates ({len(doc['duplicates'])} groups)", title_justify="left"
        )
        table.add_column("samples", overflow="fold")
        table.add_column("labels")
        table.add_column("splits")
        for group in doc["duplicates"][:limit]:
            table.add_row(
                _shown(", ".join(group["sample_ids"])),
                _shown(", ".join(group["labels"])),
                ", ".join(group["splits"]),
            )
        console.print(table)
    if doc["leakage"]:
        table = Table(title=f"Leakage across splits ({len(doc['leakage'])})", title_justify="left")
        table.add_column("kind")
        table.add_column("what", overflow="fold")
        table.add_column("splits")
        for leak in doc["leakage"][:limit]:
            if leak["kind"] == "patient":
                what = f"patient {leak['patient_id']}"
                where = ", ".join(f"{s} ({n})" for s, n in leak["splits"].items())
            else:
                what = "same image: " + ", ".join(leak["sample_ids"])
                where = ", ".join(leak["splits"])
            table.add_row(leak["kind"], _shown(what), where)
        console.print(table)
    hidden = [
        f"{len(doc[k]) - limit} more {k}" for k in PROBLEM_KINDS if len(doc.get(k, ())) > limit
    ]
    if hidden:
        console.print(f"({'; '.join(hidden)} in the --json report)")
    problems = [f"{len(doc[k])} {k.replace('_', ' ')}" for k in PROBLEM_KINDS if doc.get(k)]
    boxes = doc.get("detection") or {}
    problems += [
        f"{len(boxes[k])} {what}"
        for k, what in (
            ("outside", "box(es) outside the image"),
            ("zero_area", "box(es) of zero area"),
            ("duplicate_boxes", "duplicate box pair(s)"),
        )
        if boxes.get(k)
    ]
    if problems:
        console.print(f"[yellow]problems:[/] {', '.join(problems)}")
    else:
        console.print("[green]no unreadable or too-small images, duplicates or leakage found[/]")


# --------------------------------------------------------------------------- data synth


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the phantom dataset into.")],
    n: Annotated[
        int | None, typer.Option("--n", help="Number of images (default 1200; --3d: 120).")
    ] = None,
    size: Annotated[
        int | None,
        typer.Option("--size", help="Image side in pixels (default 64; --3d: 32 voxels)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same files).")] = 0,
    volumes: Annotated[
        bool,
        typer.Option(
            "--3d",
            help="NIfTI volumes (normal, or one spherical lesion with its mask volume) instead "
            "of slices.",
        ),
    ] = False,
    multilabel: Annotated[
        bool,
        typer.Option(
            "--multilabel",
            help="Several findings per image (nodule, cyst, calcification; a mask each) with a "
            "NIH-style 'Finding Labels' manifest, instead of three classes.",
        ),
    ] = False,
    detect: Annotated[
        bool,
        typer.Option(
            "--detect",
            help="Boxes: 0-3 lesions per slice (nodule, cyst) with masks and a box CSV "
            "(path,x1,y1,x2,y2,label; one row per box), instead of three classes.",
        ),
    ] = False,
    with_splits: Annotated[
        bool,
        typer.Option(
            "--splits", help="With --detect: fill the CSV's split column (70/15/15 by patient)."
        ),
    ] = False,
) -> None:
    """Write the embedded default dataset: phantom slices in three classes, with lesion masks
    (with --multilabel: none, one or several findings per slice; with --detect: lesions with
    boxes)."""
    from functools import partial

    from medsight.data.synth import (
        DETECT_CLASSES,
        FINDINGS,
        write_detection_phantoms,
        write_multilabel_phantoms,
        write_phantom_dataset,
    )

    if sum((multilabel, detect, volumes)) > 1:
        _error_line("--multilabel, --detect and --3d draw different datasets; give one")
        raise typer.Exit(2)
    if with_splits and not detect:
        _error_line("--splits fills the box CSV's split column; it goes with --detect")
        raise typer.Exit(2)
    if volumes:
        _data_synth_3d(out, 120 if n is None else n, 32 if size is None else size, seed)
        return
    n = 1200 if n is None else n
    size = 64 if size is None else size
    if detect:
        write = partial(write_detection_phantoms, splits=with_splits)
    else:
        write = write_multilabel_phantoms if multilabel else write_phantom_dataset
    with _user_errors():
        with _progress() as bar:
            task = bar.add_task("drawing phantoms", total=n)
            manifest = write(
                out, n=n, size=size, seed=seed, progress=lambda k: bar.advance(task, k)
            )
        what = f"findings {', '.join(FINDINGS)}, " if multilabel else ""
        if detect:
            what = f"boxes of {', '.join(DETECT_CLASSES)}, "
        console.print(
            f"wrote {n:,} images of {size}x{size} px ({what}with masks); manifest: {manifest}"
        )


def _data_synth_3d(out: Path, n: int, size: int, seed: int) -> None:
    from medsight.data.synth import VOLUME_CLASSES, write_phantom_volumes

    with _user_errors():
        with _progress() as bar:
            task = bar.add_task("drawing phantom volumes", total=n)
            manifest = write_phantom_volumes(
                out, n=n, size=size, seed=seed, progress=lambda k: bar.advance(task, k)
            )
        console.print(
            escape(
                f"wrote {n:,} volumes of {size}x{size}x{size} voxels (.nii.gz; "
                f"{', '.join(VOLUME_CLASSES)}, a mask per lesion); manifest: {manifest}"
            ),
            highlight=False,
            soft_wrap=True,
        )
        console.print(
            "voxels are Hounsfield-like units (air -1024): medsight train reads them through "
            "the CT soft-tissue window (--intensity ct-soft-tissue)",
            highlight=False,
        )


# --------------------------------------------------------------------------- data split


@data_app.command("split")
def data_split(
    path: Annotated[
        Path, typer.Argument(help="Folder, .zip, .csv manifest, .npz, DICOM or NIfTI.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="CSV to write: sample_id, label, patient_id, split.")
    ],
    ratios: Annotated[
        tuple[float, float, float],
        typer.Option("--ratios", help="Train, val and test fractions (summing to 1)."),
    ] = (0.7, 0.15, 0.15),
    folds: Annotated[
        int, typer.Option("--folds", help="Also add a k-fold column over train+val (0: none).")
    ] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    fmt: FormatOption = None,
    allow_outside: AllowOutsideOption = False,
    labels: LabelsOption = None,
    findings_column: FindingsColumnOption = None,
    uncertain: UncertainOption = Uncertain.ignore,
) -> None:
    """Assign patient-grouped, stratified train/val/test splits (a given split is kept);
    several findings per image are stratified iteratively."""
    from medsight.data.splits import assign_splits, kfold_assignments

    with _user_errors():
        table = _load(
            path,
            fmt,
            allow_outside,
            2,
            None,
            labels=labels,
            findings_column=findings_column,
            uncertain=uncertain.value,
        )
        table = assign_splits(table, ratios=ratios, seed=seed)
        columns = ["sample_id", "label", "patient_id", "split"]
        result = table[columns].copy()
        if folds:
            development = table["split"] != "test"
            result.loc[development, "fold"] = kfold_assignments(table[development], folds, seed)
            result["fold"] = result["fold"].astype("Int64")
        from medsight.runs import write_text

        write_text(out, result.to_csv(index=False))
        counts = result.groupby("split").size().to_dict()
        console.print(f"wrote {out}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))


# --------------------------------------------------------------------------- data preview


@data_app.command("preview")
def data_preview(
    path: Annotated[
        Path, typer.Argument(help="Folder, .zip, .csv manifest, .npz, DICOM or NIfTI.")
    ],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path("grid.png"),
    per_class: Annotated[int, typer.Option("--per-class", help="Images per class.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Which images are picked.")] = 0,
    fmt: FormatOption = None,
    allow_outside: AllowOutsideOption = False,
    axis: AxisOption = 2,
    index: SliceOption = None,
    labels: LabelsOption = None,
    findings_column: FindingsColumnOption = None,
) -> None:
    """Save a labelled montage of a few images per class (or combination of findings)."""
    from medsight.data.preview import make_montage

    with _user_errors():
        table = _load(
            path, fmt, allow_outside, axis, index, labels=labels, findings_column=findings_column
        )
        shown = make_montage(table, out, per_class=per_class, seed=seed)
        console.print(f"wrote {out} ({shown} images)")


# --------------------------------------------------------------------------- models


@app.command("models")
def models_command(
    pattern: Annotated[str, typer.Argument(help="Wildcard filter, e.g. 'res*'.")] = "*",
) -> None:
    """List the supported models: parameters, default input size, freezable stages."""
    import fnmatch

    from medsight.models import model_table

    with _user_errors():
        rows = [r for r in model_table() if fnmatch.fnmatch(r["name"], pattern)]
        table = Table(title="Models (any other timm name also works)", title_justify="left")
        table.add_column("name", no_wrap=True)
        table.add_column("params", justify="right", no_wrap=True)
        table.add_column("size", justify="right")
        table.add_column("offline", justify="center")
        table.add_column("freezable stages, in order", overflow="fold")
        for r in rows:
            table.add_row(
                r["name"],
                f"{r['params'] / 1e6:.2f} M",
                str(r["default_size"]),
                "yes" if r["offline_weights"] else "",
                " | ".join(r["stages"]),
            )
        console.print(table)
        console.print(
            "offline = genuine ImageNet weights installed here (requirements-weights.txt); "
            "the others need --weights FILE, or a reachable hub or cache, for --pretrained",
            style="dim",
        )


# --------------------------------------------------------------------------- train


@app.command("train")
@with_train_options
def train_command(
    resume: Annotated[
        str | None, typer.Option("--resume", help="Continue the stopped run in this folder.")
    ] = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc",
            help="Train with N data-parallel processes on this machine (one per GPU, else "
            "CPU processes with gloo), started by torchrun.",
            show_default=False,
        ),
    ] = None,
    **options,
) -> None:
    """Train a model; writes a run directory (weights, config, preprocessing, history).

    Every option sets a field of the run's config.yaml (medsight.config.TrainConfig); --set
    reaches the fields without a flag of their own. With --resume, --time gives the run that
    much more time (else it continues with what is left of its budget), and --device and
    --precision where it goes on (a run begun on a GPU can go on on a CPU). Under torchrun
    (`torchrun --nproc-per-node N -m medsight train ...`, or --nproc N) the processes train
    one run together and rank 0 writes it; --batch-size is the global batch.
    """
    from medsight.config import TrainConfig
    from medsight.runs import CONFIG
    from medsight.training.trainer import train

    with _user_errors():
        if nproc is not None and "WORLD_SIZE" not in os.environ:
            from medsight.training.distributed import launch

            argv = sys.argv[sys.argv.index("train") + 1 :]
            raise typer.Exit(launch(nproc, ["train", *_without_nproc(argv)]))
        if resume:
            config = TrainConfig.from_yaml(Path(resume) / CONFIG)
            more = options.get("time")
            # where to go on: as given now, else as the run began
            hardware = {
                key: getattr(options[key], "value", options[key])
                for key in ("device", "precision")
                if options.get(key) is not None
            }
            train(
                config.with_overrides({"out": resume, **hardware}),
                resume=True,
                time_budget=more,
                events=_events(),
            )
            return
        train(_train_config(options), overwrite=options["overwrite"], events=_events())


def _without_nproc(argv: list[str]) -> list[str]:
    """The train command's arguments, less ``--nproc N`` (torchrun's processes must not
    launch again)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


# --------------------------------------------------------------------------- tune, cv, ensemble


class Pruner(str, Enum):
    median = "median"
    hyperband = "hyperband"
    none = "none"


class TuneMetric(str, Enum):
    auroc = "auroc"
    accuracy = "accuracy"
    balanced_accuracy = "balanced_accuracy"
    loss = "loss"


@app.command("tune")
@with_train_options
def tune_command(
    trials: Annotated[
        int, typer.Option("--trials", help="Finished trials the study should hold.")
    ] = 20,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Stop starting trials after MIN minutes.")
    ] = None,
    space: Annotated[
        Path | None, typer.Option("--space", help="YAML search space (default: built in).")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage", help="Study database: sqlite:///tune.db, postgresql://… (resumable)."
        ),
    ] = None,
    study: Annotated[
        str | None, typer.Option("--study", help="Study name (default: medsight-<data>).")
    ] = None,
    metric: Annotated[
        TuneMetric, typer.Option("--metric", help="Validation metric to optimise.")
    ] = TuneMetric.auroc,
    pruner: Annotated[
        Pruner, typer.Option("--pruner", help="Stop weak trials early: median | hyperband | none.")
    ] = Pruner.median,
    **options,
) -> None:
    """Search hyperparameters with Optuna; the best trial becomes the run at --out (with
    tune.html). Start the same command in several processes on one --storage to tune in
    parallel; run it again to resume."""
    from medsight.workflows.tune import SearchSpace, tune

    with _user_errors(), _events() as events:
        base = _train_config(options, default_out="runs/{stem}-tuned")
        tune(
            base,
            trials=trials,
            timeout_min=timeout,
            space=SearchSpace.from_yaml(space) if space else None,
            storage=storage,
            study_name=study,
            metric=metric.value,
            pruner=pruner.value,
            out=base.out,
            overwrite=options.get("overwrite", False),
            events=events,
        )


@app.command("cv")
@with_train_options
def cv_command(
    folds: Annotated[int, typer.Option("--folds", help="Number of folds (k).")] = 5,
    ensemble: Annotated[
        bool,
        typer.Option("--ensemble/--no-ensemble", help="Combine the fold models and test them."),
    ] = True,
    weighted: Annotated[
        bool, typer.Option("--weighted", help="Weight the fold models by validation AUROC.")
    ] = False,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", help="Bootstrap resamples for 95 % CIs.")
    ] = 1000,
    resume: Annotated[
        bool, typer.Option("--resume", help="Keep the folds already finished in --out.")
    ] = False,
    **options,
) -> None:
    """Cross-validate a training recipe: patient-grouped stratified k-fold over train+val, one
    run per fold under --out, cv.json + cv.html (mean ± sd, pooled out-of-fold metrics)."""
    from medsight.runs import CV_HTML
    from medsight.workflows.cv import cross_validate

    with _user_errors(), _events() as events:
        config = _train_config(options, default_out="runs/{stem}-cv")
        summary = cross_validate(
            config,
            folds,
            ensemble=ensemble,
            weighted=weighted,
            n_bootstrap=bootstrap,
            overwrite=options.get("overwrite", False),
            resume=resume,
            events=events,
        )
        table = Table(title=f"{folds}-fold cross-validation", title_justify="left")
        for column in ("metric", "folds: mean ± sd (val)", "pooled OOF (95 % CI)", "ensemble"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for name in ("auroc", "accuracy", "balanced_accuracy", "f1_macro"):
            ms = summary["mean_sd"]["val"][name]
            mean_sd = "–" if ms["mean"] is None else f"{ms['mean']:.3f} ± {ms['sd']:.3f}"
            ens = summary["ensemble"] or {}
            table.add_row(
                name,
                mean_sd,
                _value_ci(summary["oof"][name], compact=True),
                _value_ci(ens[name], compact=True) if name in ens else "–",
            )
        console.print(table)
        console.print(f"wrote {config.out}/cv.json and {config.out}/{CV_HTML}")


@app.command("ensemble")
def ensemble_command(
    runs_: Annotated[list[Path], typer.Argument(metavar="RUN...", help="Runs of one task.")],
    out: Annotated[Path, typer.Option("--out", help="Ensemble run directory to create.")],
    weighted: Annotated[
        bool, typer.Option("--weighted", help="Weight members by validation AUROC above chance.")
    ] = False,
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate/--no-calibrate", help="Temperature-scale each member on its val split."
        ),
    ] = True,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing run.")
    ] = False,
) -> None:
    """Combine runs into one that averages their calibrated probabilities; evaluate, report,
    explain, export, predict and serve it like any run."""
    from medsight.workflows.ensemble import build_ensemble

    with _user_errors(), _events() as events:
        build_ensemble(
            runs_,
            out,
            weighted=weighted,
            calibrate=calibrate,
            overwrite=overwrite,
            events=events,
        )
        console.print(f"next: medsight evaluate {out}")


# --------------------------------------------------------------------------- evaluate, compare


@app.command("evaluate")
def evaluate_command(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    data: Annotated[
        str | None, typer.Option("--data", help="Other data to evaluate (default: the run's).")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="train | val | test")] = "test",
    by: Annotated[
        list[str] | None, typer.Option("--by", help="Subgroup column (repeatable): sex, site...")
    ] = None,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", help="Bootstrap resamples for 95 % CIs (0: none).")
    ] = 1000,
    calibrate: Annotated[
        bool, typer.Option("--calibrate", help="Fit temperature scaling on val; kept in the run.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    backend: Annotated[
        Backend, typer.Option("--backend", help="Run the network with torch or ONNX Runtime.")
    ] = Backend.torch,
    tta: TtaOption = None,
    device: DeviceOption = "auto",
    seismometer: Annotated[
        Path | None,
        typer.Option(
            "--seismometer",
            help="Also write the predictions as a folder seismometer loads (cohorts: --by).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Evaluate a run: metrics with CIs, thresholds, calibration, subgroups → metrics.json."""
    from medsight.cli.render import evaluation_tables
    from medsight.evaluation.evaluate import evaluate_run
    from medsight.runs import Run
    from medsight.tasks import get_task

    with _user_errors():
        task = get_task(Run.load(run).task)
        metrics = evaluate_run(
            run,
            data=data,
            split=split,
            by=by or (),
            n_bootstrap=bootstrap,
            calibrate=calibrate,
            seed=seed,
            backend=backend.value,
            tta=tta.value if tta else None,
            device=device,
        )
        title = f"{run} on {split} (n={metrics['n']:,})" + (f", TTA {tta.value}" if tta else "")
        for table in evaluation_tables(metrics, task.headline_metrics, title):
            console.print(table)
        for warning in [*metrics.get("warnings", []), *metrics.get("notes", [])]:
            err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        for column, result in metrics["subgroups"].items():
            for warning in result.get("warnings", []):
                err_console.print(f"[yellow]warning ({column}):[/] {warning}", highlight=False)
        console.print(f"wrote {run}/metrics.json and {run}/predictions.csv")
        if seismometer is not None:
            from medsight.integration.seismometer import export_evaluation

            _print_seismometer(export_evaluation(run, seismometer, by=by or []))


@app.command("seismometer")
def seismometer_command(
    run: Annotated[Path, typer.Argument(help="An evaluated run directory.")],
    out: Annotated[Path, typer.Argument(help="Folder to write for seismometer.")],
    by: Annotated[
        list[str] | None,
        typer.Option(
            "--by",
            help="Cohort column (repeatable; default: the last evaluate's --by columns).",
            show_default=False,
        ),
    ] = None,
    primary: Annotated[
        str | None,
        typer.Option(
            "--primary",
            help="The class whose score is the primary output (default: the positive class).",
            show_default=False,
        ),
    ] = None,
    worklist: Annotated[
        bool,
        typer.Option(
            "--worklist",
            help="Export the worklist's reviewed studies (reviewer labels as outcomes) instead "
            "of the evaluation.",
        ),
    ] = False,
    db: WorklistDbOption = None,
    data_dir: WorklistDirOption = None,
) -> None:
    """Write an evaluated run's predictions (or the worklist's reviews) as a folder that Epic's
    open-source seismometer loads: Parquet tables, config.yml, usage_config.yml, dictionary."""
    with _user_errors():
        if not worklist:
            if db is not None or data_dir is not None:
                raise MedsightError("--db and --data-dir go with --worklist")
            from medsight.integration.seismometer import export_evaluation

            _print_seismometer(export_evaluation(run, out, by=by, primary=primary))
            return
        if by:
            raise MedsightError(
                "--by is for evaluations; a worklist export's cohorts are the model version, "
                "modality and clinical context"
            )
        from medsight.integration.seismometer import export_worklist
        from medsight.serving.worklist import WorklistStore

        folder = data_dir or run / "worklist"
        if db is None and not (folder / "worklist.db").is_file():
            raise MedsightError(
                f"no worklist at {folder / 'worklist.db'}; pass --db URL (and --data-dir) of "
                f"the worklist `medsight serve {run}` keeps"
            )
        store = WorklistStore(db or f"sqlite:///{(folder / 'worklist.db').resolve()}", folder)
        try:
            _print_seismometer(export_worklist(run, store, out, primary=primary))
        finally:
            store.close()


def _print_seismometer(export) -> None:
    said = (
        f"wrote {export.path}/ for seismometer: {export.predictions:,} predictions, "
        f"{export.events:,} events; primary output {export.primary_output}, target "
        f"'{export.primary_target}'; cohorts: {', '.join(export.cohorts) or 'none'}"
    )
    console.print(escape(said), highlight=False)  # class names may hold [brackets]
    for note in export.notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    console.print(escape(f"open it as {export.path}/README.md says"), highlight=False)


def _value_ci(entry: dict, compact: bool = False):
    from medsight.stats import format_ci, format_number, format_value_ci

    if compact:
        return format_value_ci(entry)
    return format_number(entry.get("value")), format_ci(entry.get("ci")) or ""


@app.command("compare")
def compare_command(
    runs_: Annotated[list[Path], typer.Argument(metavar="RUN...", help="Evaluated runs.")],
    bootstrap: Annotated[int, typer.Option("--bootstrap")] = 1000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Compare evaluated runs: headline metrics with CIs, and a paired bootstrap p-value for
    each run's AUROC against the first run's, on the test samples they share."""
    from medsight.cli.render import comparison_tables
    from medsight.evaluation.compare import compare_runs
    from medsight.runs import Run
    from medsight.tasks import get_task

    with _user_errors():
        result = compare_runs(runs_, n_bootstrap=bootstrap, seed=seed)
        task = get_task(Run.load(runs_[0]).task)
        # a task's subgroup metrics are its few key ones: they fit one row per run
        for table in comparison_tables(result, task.subgroup_metrics):
            console.print(table)


# --------------------------------------------------------------------------- report, demo


@app.command("report")
def report_command(
    run: Annotated[Path, typer.Argument(help="An evaluated run directory.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="HTML file (default RUN/report.html).")
    ] = None,
) -> None:
    """Write the self-contained HTML report of an evaluated run."""
    from medsight.evaluation.report import write_report

    with _user_errors():
        path = write_report(run, out=out)
        console.print(f"wrote {path}")


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for data, run and report.")] = Path(
        "medsight-demo"
    ),
    data: Annotated[
        str | None, typer.Option("--data", help="Your own data instead of the phantom set.")
    ] = None,
    epochs: Annotated[
        int, typer.Option("--epochs", help="Training epochs (classify; multilabel, detect: auto).")
    ] = 12,
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="classify (normal/benign/malignant), multilabel (nodule, cyst, "
            "calcification: several per slice) or detect (boxes around 0-3 nodules or cysts "
            "per slice: FROC and mAP).",
        ),
    ] = "classify",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a previous demo.")
    ] = False,
    serve: Annotated[
        bool, typer.Option("--serve", help="Then serve the model on http://127.0.0.1:PORT.")
    ] = False,
    port: Annotated[int, typer.Option("--port", help="Port for --serve.")] = 8000,
) -> None:
    """The main job on the embedded default: synth → check → train → evaluate → explain → report."""
    from medsight.workflows.demo import run_demo

    with _user_errors(), _events() as events:
        result = run_demo(
            out, data=data, epochs=epochs, task=task, overwrite=overwrite, events=events
        )
        console.print(
            f"\n[bold green]done[/] in {result.seconds:.0f} s\n"
            f"  data    {result.data}\n  run     {result.run}\n  report  {result.report}\n\n"
            f"open the report:  python -m webbrowser file://{result.report.resolve()}",
            highlight=False,
        )
        if serve:
            from medsight.serving.api import ServeSettings
            from medsight.serving.api import serve as serve_app

            console.print(
                f"serving the demo model on http://127.0.0.1:{port}/ (Ctrl-C to stop)",
                highlight=False,
            )
            serve_app(ServeSettings(run=result.run, port=port))


# --------------------------------------------------------------------------- export


class ExportFormat(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"
    monai_bundle = "monai-bundle"


@app.command("export")
def export_command(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    fmt: Annotated[
        ExportFormat, typer.Option("--format", help="onnx | torchscript | monai-bundle")
    ] = ExportFormat.onnx,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="With --format monai-bundle: the bundle folder to write."),
    ] = None,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default: 17).")] = None,
    dynamic_batch: Annotated[
        bool, typer.Option("--dynamic-batch/--static", help="Allow any batch size.")
    ] = True,
) -> None:
    """Export a run's model (ONNX or TorchScript) next to its weights, checking parity; or a
    3-D run as a MONAI Bundle (--format monai-bundle --out DIR) for MONAI's own tools."""
    from medsight.export import export_run

    if fmt is ExportFormat.monai_bundle:
        if out is None:
            _error_line("--format monai-bundle writes a folder; give it with --out DIR")
            raise typer.Exit(2)
        if opset is not None:
            _error_line("--opset applies to ONNX only; leave it out for a MONAI Bundle")
            raise typer.Exit(2)
        _export_bundle(run, out)
        return
    if out is not None:
        _error_line(f"--out is for --format monai-bundle; {fmt.value} is written in the run")
        raise typer.Exit(2)
    with _user_errors():
        result = export_run(run, format=fmt.value, opset=opset, dynamic_batch=dynamic_batch)
        console.print(
            f"wrote {result['path']} ({result['format']}); max |Δprobability| vs PyTorch "
            f"{result['max_abs_diff_prob']:.2e}"
        )


def _export_bundle(run: Path, out: Path) -> None:
    from medsight.evaluation.modelcard import intended_use
    from medsight.export import export_bundle
    from medsight.runs import Run

    with _user_errors():
        loaded = Run.load(run)
        result = export_bundle(loaded, out, intended_use=intended_use(loaded.classes))
        console.print(
            escape(
                f"wrote the MONAI Bundle {result['path']}/ ({', '.join(result['files'])}); "
                f"max |Δprobability| TorchScript vs PyTorch {result['max_abs_diff_prob']:.2e}"
            ),
            highlight=False,
            soft_wrap=True,
        )
        console.print(
            escape(f"run it with MONAI as {result['path']}/docs/README.md says"),
            highlight=False,
            soft_wrap=True,
        )


# --------------------------------------------------------------------------- serve, predict


@app.command("serve")
def serve_command(
    run: Annotated[Path, typer.Argument(help="Run directory to serve.")],
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (beyond loopback needs --token).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    backend: Annotated[Backend, typer.Option("--backend", help="torch | onnx")] = Backend.torch,
    device: DeviceOption = "auto",
    db: WorklistDbOption = None,
    data_dir: WorklistDirOption = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", help="Bearer token for /v1 routes (or $MEDSIGHT_TOKEN).", show_default=False
        ),
    ] = None,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", help="Largest upload accepted (413 above).")
    ] = 50.0,
    max_pixels: Annotated[
        int,
        typer.Option(
            "--max-pixels",
            help="Refuse images with more pixels (decompression bombs; one upload's memory is "
            "about 32 bytes a pixel).",
        ),
    ] = SERVE_MAX_PIXELS,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="A Host name the server answers besides its bind address's (repeatable; "
            "e.g. the name a reverse proxy forwards).",
            show_default=False,
        ),
    ] = None,
    urgent: Annotated[
        str | None,
        typer.Option(
            "--urgent",
            help="Findings that order a multi-label run's worklist, comma-separated (default: "
            "classes.json 'urgent', else every finding); a classification run: its urgent class.",
            show_default=False,
        ),
    ] = None,
    point: PointOption = "youden",
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            help="Triage policy (YAML) that orders the worklist (default: medsight's "
            "serving/policies/default.yaml; see the README, 'Triage policy').",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve a run: REST API (/docs), web page (/) and triage worklist."""
    import logging

    from pydantic import ValidationError

    from medsight.serving.api import ServeSettings, check_exposure, serve

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s %(message)s")
    with _user_errors():
        try:
            settings = ServeSettings(
                run=run,
                backend=backend.value,
                device=device,
                host=host,
                port=port,
                db=db,
                data_dir=data_dir,
                token=token,
                max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                max_pixels=max_pixels,
                allowed_hosts=allowed_host or [],
                urgent=[n.strip() for n in urgent.split(",") if n.strip()] if urgent else None,
                point=point,
                policy=policy,
            )
        except ValidationError as exc:
            problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
            raise MedsightError(f"serve: {problems}") from None
        check_exposure(settings)
        from medsight.serving.triage import load_policy

        load_policy(settings.policy)  # a bad policy: one line naming the field, before listening
        err_console.print(
            f"medsight serving {run} on http://{host}:{port}/  (API docs: /docs)", highlight=False
        )
        serve(settings)


worklist_app = typer.Typer(help="Work on a served run's triage worklist.", no_args_is_help=True)
app.add_typer(worklist_app, name="worklist")


@worklist_app.command("import-context")
def worklist_import_context(
    run: Annotated[Path, typer.Argument(help="The served run (its worklist).")],
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV or JSON: study_id or study_uid (StudyInstanceUID) and context columns "
            "(priority, age_years, prior_findings, setting)."
        ),
    ],
    db: WorklistDbOption = None,
    data_dir: WorklistDirOption = None,
) -> None:
    """Add clinical context from a sidecar file to studies already on the worklist; the
    worklist re-orders by it at once. Rows with impossible values are listed and skipped."""
    from medsight.serving.api import ServeSettings
    from medsight.serving.triage import read_context_file
    from medsight.serving.worklist import WorklistStore

    with _user_errors():
        rows, problems = read_context_file(file)
        settings = ServeSettings(run=run, db=db, data_dir=data_dir)
        sqlite_file = settings.resolved_data_dir() / "worklist.db"
        if db is None and not sqlite_file.exists():  # never make an empty worklist to fill
            raise MedsightError(
                f"no worklist at {sqlite_file}; give the run that was served, or its --data-dir "
                "or --db as given to medsight serve"
            )
        store = WorklistStore(settings.resolved_db(), settings.resolved_data_dir())
        changed: list[int] = []
        try:
            for row in rows:
                ids = store.merge_context(
                    row.context, study_id=row.study_id, study_uid=row.study_uid
                )
                if not ids:
                    problems.append(f"{row.where}: no {row.names} on the worklist")
                changed += ids
        finally:
            store.close()
        for problem in problems:
            err_console.print(f"[red]skipped:[/red] {problem}", highlight=False, soft_wrap=True)
        console.print(
            f"context added to {len(set(changed))} stud{'y' if len(set(changed)) == 1 else 'ies'}"
            f" ({len(problems)} row(s) skipped)",
            highlight=False,
        )
    if problems:
        raise typer.Exit(1)


def _boxes_text(text: str) -> str:
    """A JSON list of boxes as the terminal shows it: ``cyst 0.80 at 39,21–50,32`` per box."""
    import json

    boxes = json.loads(text) if text else []
    return "; ".join(
        f"{_shown(b['label'])} {b['score']:.2f} at {b['x1']:.0f},{b['y1']:.0f}–"
        f"{b['x2']:.0f},{b['y2']:.0f}"
        for b in boxes
    )


def _prediction_file(table, out: Path) -> str:
    """``medsight predict --out``: CSV (JSON-valued cells, a detector's boxes, as JSON text),
    or with a ``.json`` name a list of records (boxes as lists)."""
    import json

    if out.suffix.lower() != ".json":
        return table.to_csv(index=False)
    json_columns = table.attrs.get("json_columns", [])
    records = []
    for record in table.to_dict("records"):
        for key, value in record.items():
            if key in json_columns:
                record[key] = json.loads(value) if value else []
            elif isinstance(value, float) and value != value:
                record[key] = None
        records.append(record)
    return json.dumps(records, indent=1) + "\n"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


#: A single SOURCE with one of these suffixes (or a folder) is scored as an archive.
_ARCHIVE_SUFFIXES = (".zip", ".csv")


def _is_archive(files: list[Path], engine: Engine | None, out: Path | None) -> bool:
    """``medsight predict RUN SOURCE``: a folder, .zip or CSV manifest, or any SOURCE with
    --engine or a .parquet --out, is scored as an archive (:func:`_predict_archive`)."""
    if engine is not None or (out is not None and out.suffix.lower() == ".parquet"):
        return True
    return len(files) == 1 and (files[0].is_dir() or files[0].suffix.lower() in _ARCHIVE_SUFFIXES)


def _series_name(source) -> str:
    """A DICOM series address as a table shows it: its folder (relative to here when below it)
    and the tail of its SeriesInstanceUID; any other file as it is. The --out file keeps the
    whole address."""
    from medsight.data.volumes import DICOM_SERIES_SCHEME

    text = str(source)
    if not text.startswith(DICOM_SERIES_SCHEME):
        return text
    folder, _, uid = text[len(DICOM_SERIES_SCHEME) :].rpartition("#")
    with suppress(ValueError):
        folder = str(Path(folder).relative_to(Path.cwd()))
    return f"{folder} (series …{uid[-8:]})"


def _volume_folders(run: Path, files: list[Path], engine: Engine | None, out: Path | None) -> bool:
    """``medsight predict RUN3D FOLDER...`` without --engine or a .parquet --out: the volumes
    in the folders (a DICOM series, NIfTI files) are predicted and shown like files."""
    from medsight.runs import Run

    if engine is not None or (out is not None and out.suffix.lower() == ".parquet"):
        return False
    return any(f.is_dir() for f in files) and Run.load(run).dims == 3


def _predict_archive(run: Path, files: list[Path], out: Path | None, **options) -> None:
    """Score an archive into a Parquet dataset and print a short summary."""
    from medsight.workflows.batch import score_archive

    if len(files) != 1:
        raise MedsightError(
            f"--engine and .parquet --out score one SOURCE (a folder, .zip or .csv manifest); "
            f"got {len(files)}: put the files in a folder or list them in a CSV"
        )
    if out is None:
        raise MedsightError(
            f"{files[0]}: scoring an archive needs --out, the Parquet dataset to write "
            "(e.g. --out preds.parquet)"
        )
    with _events() as events:
        summary = score_archive(run, files[0], out, events=events, **options)
    shown = Table(title=f"{_shown(run.name)} on {_shown(files[0])}", title_justify="left")
    for column in ("scored", "errors", "skipped (already in --out)", "images/s", "seconds"):
        shown.add_column(column, justify="right")
    shown.add_row(
        str(summary["scored"]),
        str(summary["errors"]),
        str(summary["skipped"]),
        f"{summary['images_per_s']:.1f}",
        f"{summary['seconds']:.1f}",
    )
    console.print(shown)
    engine = summary["engine"]
    if engine == "ray":
        engine += f", {summary['workers']} worker(s)"
    console.print(
        f"model {_shown(summary['model'])} ({engine}); wrote {_shown(summary['out'])}"
        + (f" and {_shown(summary['csv'])}" if summary["csv"] else ""),
        highlight=False,
    )
    if summary["errors"]:
        err_console.print(
            f"[yellow]warning:[/] {summary['errors']} of {summary['scored']} file(s) could not "
            "be predicted; see the error column (a re-run tries them again)"
        )
    if summary["scored"] and summary["errors"] == summary["scored"] and not summary["skipped"]:
        raise MedsightError("none of the files could be predicted; see the error column")


@app.command("predict")
def predict_command(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    files: Annotated[
        list[Path],
        typer.Argument(
            metavar="FILE...|SOURCE",
            help="Images (PNG, JPEG, TIFF, DICOM...), or one SOURCE to score as an archive: a "
            "folder or DICOM tree, a .zip, or a CSV manifest with a path column.",
        ),
    ],
    backend: Annotated[
        Backend | None,
        typer.Option(
            "--backend", help="torch | onnx (default: torch for files, onnx for an archive)"
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="CSV to write: file, label, p_<class>, error (a detector's boxes as JSON); "
            "a .json name writes a list of records instead. For an archive: the Parquet "
            "dataset (a folder of parts) to write or resume, e.g. preds.parquet.",
        ),
    ] = None,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    tta: TtaOption = None,
    point: PointOption = "youden",
    device: Annotated[
        str, typer.Option("--device", help="Where the model runs: auto, cpu, cuda, cuda:N.")
    ] = "auto",
    engine: Annotated[
        Engine | None,
        typer.Option(
            "--engine",
            help="Archive: local (this process, the default) or ray (Ray Data; pip install "
            '"medsight\\[ray]").',
            show_default=False,
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="Ray: the cluster to join (auto, ray://HEAD:10001, HOST:6379); default: start "
            "a local Ray.",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Ray: model actors (default: the cluster's CPUs less one, or its GPUs / "
            "--gpus-per-worker).",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Archive: images per batch (and per part file).")
    ] = 64,
    gpus_per_worker: Annotated[
        float, typer.Option("--gpus-per-worker", help="Ray: GPUs given to each model actor.")
    ] = 0,
    csv: Annotated[
        bool,
        typer.Option("--csv", help="Archive: also write all rows as a CSV beside --out."),
    ] = False,
) -> None:
    """Predict files with a run, or score an archive into Parquet (locally or on Ray),
    preprocessing exactly as serving does.

    A file that cannot be read, or whose outputs hold NaN or infinity, is a row with its reason
    in the error column; every other file is predicted. A multi-label run writes p_<finding>
    columns and, as the label, the findings at or above their thresholds (the evaluated
    --point, else 0.5). Exit status 0 when at least one file was predicted, 2 when none was
    (the --out CSV is written in both cases).

    One SOURCE (a folder, .zip or CSV manifest; or any SOURCE with --engine or a .parquet
    --out) is scored as an archive into a Parquet dataset, in this process or on Ray
    (--engine ray); a re-run skips the files already scored there and retries those that
    failed."""
    from medsight.inference import predict_paths
    from medsight.runs import write_text

    with _user_errors():
        targets: list = list(files)
        if _volume_folders(run, files, engine, out):
            # a 3-D run: each folder stands for the volumes in it (a series, NIfTI files)
            from medsight.workflows.batch import list_volumes

            targets = [v for f in files for v in (list_volumes(f) if f.is_dir() else [f])]
        elif _is_archive(files, engine, out):
            _predict_archive(
                run,
                files,
                out,
                engine=(engine or Engine.local).value,
                address=address,
                workers=workers,
                batch_size=batch_size,
                backend=(backend or Backend.onnx).value,
                gpus_per_worker=gpus_per_worker,
                csv=csv,
                device=device,
                max_pixels=max_pixels,
                tta=tta.value if tta else None,
                point=point,
            )
            return
        table = predict_paths(
            run,
            targets,
            backend=(backend or Backend.torch).value,
            max_pixels=max_pixels,
            tta=tta.value if tta else None,
            point=point,
            device=device,
        )
        if out is not None:
            write_text(out, _prediction_file(table, out))
        shown = Table(title=f"{_shown(run.name)}: {len(table)} file(s)", title_justify="left")
        for column in table.columns:
            shown.add_column(_shown(column), overflow="fold")
        json_columns = set(table.attrs.get("json_columns", []))
        for row in table.itertuples(index=False):
            shown.add_row(
                *(
                    _shown(_series_name(v))
                    if column == "file"
                    else _boxes_text(v)
                    if column in json_columns
                    else ""
                    if v != v or v is None
                    else f"{v:.3f}"
                    if isinstance(v, float)
                    else _shown(v)
                    for column, v in zip(table.columns, row)
                )
            )
        console.print(shown)
        thresholds = table.attrs.get("thresholds")
        if thresholds:
            console.print(
                "thresholds "
                + ", ".join(f"{_shown(name)} {t:.3f}" for name, t in thresholds.items())
                + f" ({table.attrs.get('thresholds_from')})",
                highlight=False,
            )
        failed = table["error"].astype(bool).sum()
        if failed:
            err_console.print(
                f"[yellow]warning:[/] {failed} of {len(table)} file(s) could not be predicted; "
                "see the error column"
            )
        if failed == len(table):
            raise MedsightError("none of the files could be predicted; see the error column")
        if out is not None:
            console.print(f"wrote {out}")


# --------------------------------------------------------------------------- explain


@app.command("explain")
def explain_command(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    images: Annotated[
        list[Path] | None, typer.Argument(help="Image files to explain (PNG, JPEG, DICOM, NIfTI).")
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="auto | gradcam | gradcam++ | scorecam | eigencam | layercam | ig | attention"
            " (auto: the best in RUN/localisation.json, else gradcam).",
        ),
    ] = "auto",
    target: Annotated[
        str | None,
        typer.Option(
            "--class",
            help="Class or finding to explain (default: the predicted class; multi-label: one "
            "map per finding above its threshold, or the most probable finding).",
        ),
    ] = None,
    layer: Annotated[
        str | None, typer.Option("--layer", help="Target layer (default: chosen per model).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for overlays, maps and the JSONL log.")
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Data with masks to score (default: the run's).")
    ] = None,
    masks: Annotated[
        bool,
        typer.Option("--masks", help="Score maps against lesion masks → RUN/localisation.json."),
    ] = False,
    methods: Annotated[
        str | None, typer.Option("--methods", help="With --masks: comma-separated methods.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="With --masks: score a sample of N images.")
    ] = None,
    split: Annotated[
        str, typer.Option("--split", help="With --masks: the run's split to score.")
    ] = "test",
    faithfulness: Annotated[
        int, typer.Option("--faithfulness", help="With --masks: images for deletion/insertion.")
    ] = 16,
    search_layers: Annotated[
        bool,
        typer.Option(
            "--search-layers/--no-search-layers",
            help="With --masks and no --layer: also score each CAM method on the stage before "
            "the last and on all stages fused, keeping its best layer that passes the sanity "
            "check.",
        ),
    ] = True,
    device: DeviceOption = "auto",
) -> None:
    """Explain predictions (overlays + maps), or score maps against lesion masks (--masks)."""
    from medsight.errors import ConfigError

    with _user_errors():
        if masks:
            from medsight.explain.localisation import score_localisation

            chosen = [m for m in (methods or "").split(",") if m.strip()] or None
            if chosen is None and method != "auto":
                chosen = [method]
            with err_console.status("explaining…") as status:
                result = score_localisation(
                    run,
                    data,
                    methods=chosen,
                    limit=limit,
                    split=split,
                    layer=layer,
                    faithfulness=faithfulness,
                    progress=lambda message: status.update(message),
                    search_layers=search_layers,
                    device=device,
                )
            _print_localisation(result)
            console.print(f"wrote {Path(run) / 'localisation.json'}")
            return
        if not images:
            raise ConfigError(
                "give image files to explain (medsight explain RUN scan.png --out DIR), or"
                " --masks to score the maps against lesion masks"
            )
        if out is None:
            raise ConfigError("give --out DIR: the folder for overlays, maps and the JSONL log")
        from medsight.explain.files import explain_files
        from medsight.runs import EXPLANATIONS

        records = explain_files(
            run, images, out, method=method, target=target, layer=layer, device=device,
            note=lambda text: err_console.print(f"note: {text}", highlight=False),
        )  # fmt: skip
        for r in records:
            whose = (
                f" (map: {r['target']} {r['target_probability']:.3f})" if "threshold" in r else ""
            )
            console.print(
                f"{r['image']}: {r['predicted']} {r['probability']:.3f}{whose} → "
                f"{out / r['overlay']}",
                highlight=False,
            )
        console.print(f"wrote {len(records)} explanation(s) to {out / EXPLANATIONS}")


def _short_layer(layer: str) -> str:
    """A layer for a narrow table: ``backbone.`` dropped, fused stages as a range
    (``stage1–3``) when they are numbered alike, else joined by ``+``."""
    parts = [part.replace("backbone.", "") for part in layer.split(",") if part]
    numbered = [re.fullmatch(r"(.*?)(\d+)", part) for part in parts]
    if len(parts) > 1 and all(numbered) and len({m.group(1) for m in numbered}) == 1:
        return f"{numbered[0].group(1)}{numbered[0].group(2)}–{numbered[-1].group(2)}"
    return " + ".join(parts)


def _print_localisation(result: dict) -> None:
    faith, sanity = result.get("faithfulness") or {}, result.get("sanity") or {}
    from rich import box

    table = Table(
        title=f"Localisation on {result['n_images']} lesion images ({result['split']})",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    columns = ["method", "layer", "point", "IoU", "energy"]
    if faith:
        columns += ["del ↓", "ins ↑", "rand ρ"]
    for column in (*columns, "s/img"):
        # Method and layer names wrap; the figures never do (a cut figure reads as another).
        wraps = column in ("method", "layer")
        table.add_column(
            column,
            justify="left" if wraps else "right",
            no_wrap=not wraps,
            overflow="fold" if wraps else "ellipsis",
            min_width={"method": 9, "layer": 9}.get(column, len(column)),
        )
    for name, entry in result["methods"].items():
        entries = [entry[k] for k in ("pointing_game", "box_iou", "energy_in_mask")]
        if faith:
            f = faith.get(name) or {}
            entries += [f.get("deletion_auc"), f.get("insertion_auc")]
            entries.append((sanity.get(name) or {}).get("spearman"))
        cells = [_value_ci(e or {})[0] for e in entries]  # the CIs are in the JSON
        if faith and isinstance(entries[-1], dict) and entries[-1].get("value") is not None:
            cells[-1] = f"{entries[-1]['value']:.2f}"
        passes = (sanity.get(name) or {}).get("passes")
        shown = name + (" *" if name == result.get("best_method") else "")
        shown += " (fails sanity)" if passes is False else ""
        layer = _short_layer(str(entry.get("layer") or ""))
        table.add_row(shown, layer, *(str(c) for c in cells), f"{entry['seconds_per_image']:.3f}")
    console.print(table)
    console.print(
        "point: pointing game · IoU: box IoU · energy: in mask · del/ins: deletion/insertion"
        " AUC · rand ρ: Spearman vs random weights (near 0 is good; 0.5 or more fails the"
        " sanity check) · *: the default (--method auto); CIs in localisation.json",
        highlight=False,
    )
    if result.get("n_missing_masks"):
        err_console.print(f"{result['n_missing_masks']} lesion image(s) had no mask (not scored)")


# ---------------------------------------------------------------------- PACS: DICOM node, DICOMweb


def _pacs_model(run: Path, backend: Backend, device: str, point: str):
    from medsight.inference import Predictor
    from medsight.serving.service import ModelService

    return ModelService(Predictor.from_run(run, backend=backend.value, point=point, device=device))


def _pacs_store(run: Path, db: str | None, data_dir: Path | None):
    """The worklist ``medsight serve RUN`` shows (same defaults), so its page lists the studies."""
    from medsight.serving.worklist import WorklistStore

    folder = data_dir or run / "worklist"
    return WorklistStore(db or f"sqlite:///{folder.resolve() / 'worklist.db'}", folder)


CredentialsOption = Annotated[
    Path | None,
    typer.Option(
        "--credentials-file",
        help="DICOMweb user:password in a file (else $MEDSIGHT_DICOMWEB_USER and "
        "$MEDSIGHT_DICOMWEB_PASSWORD); never a password on the command line.",
        show_default=False,
    ),
]


@app.command("listen")
def listen_command(
    run: Annotated[Path, typer.Argument(help="Run directory whose model scores the studies.")],
    ae_title: Annotated[str, typer.Option("--ae-title", help="This node's AE title.")] = "MEDSIGHT",
    port: Annotated[int, typer.Option("--port", help="DICOM port to listen on.")] = 11112,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "0.0.0.0",
    db: WorklistDbOption = None,
    data_dir: WorklistDirOption = None,
    calling_aets: Annotated[
        str | None,
        typer.Option(
            "--calling-aets",
            help="Only these calling AE titles may send (comma-separated); others are refused.",
            show_default=False,
        ),
    ] = None,
    series_timeout: Annotated[
        float,
        typer.Option(
            "--series-timeout", help="Seconds without a new instance after which a study is scored."
        ),
    ] = 10.0,
    spool: Annotated[
        Path | None,
        typer.Option(
            "--spool",
            help="Folder for instances until their study is scored (default: a private temporary "
            "folder); studies left there are scored at the next start.",
            show_default=False,
        ),
    ] = None,
    send_to: Annotated[
        str | None,
        typer.Option(
            "--send-to",
            help="Send each result (DICOM SR) by C-STORE to AE@host:port.",
            show_default=False,
        ),
    ] = None,
    stow: Annotated[
        str | None,
        typer.Option(
            "--stow",
            help="Send each result by STOW-RS to this DICOMweb root URL.",
            show_default=False,
        ),
    ] = None,
    credentials_file: CredentialsOption = None,
    overlay: Annotated[
        bool,
        typer.Option("--overlay/--no-overlay", help="Also send the heat map (Secondary Capture)."),
    ] = False,
    backend: Annotated[Backend, typer.Option("--backend", help="torch | onnx")] = Backend.torch,
    device: DeviceOption = "auto",
    point: PointOption = "youden",
) -> None:
    """Be a DICOM node: receive studies by C-STORE, queue each on the worklist when complete,
    and send the result back to the PACS as a DICOM SR."""
    import logging
    import signal
    import threading

    from medsight.integration.dicom_node import DicomNode
    from medsight.integration.dicomweb import load_credentials
    from medsight.integration.results import ResultSender, StoreDestination, StowDestination
    from medsight.serving.worklist import OUTBOX

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s %(message)s")
    with _user_errors():
        if send_to and stow:
            raise MedsightError("listen: give --send-to or --stow, not both")
        destination = None
        if send_to:
            destination = StoreDestination.parse(send_to, calling_aet=ae_title)
        elif stow:
            destination = StowDestination(stow, auth=load_credentials(credentials_file))
        model = _pacs_model(run, backend, device, point)
        store = _pacs_store(run, db, data_dir)
        sender = None
        if destination is not None:
            sender = ResultSender(
                destination, store.data_dir / OUTBOX, overlay=overlay, model=model
            )
        node = DicomNode(
            model,
            store,
            ae_title=ae_title,
            port=port,
            host=host,
            calling_aets=calling_aets.split(",") if calling_aets else None,
            series_timeout=series_timeout,
            spool=spool,
            results=sender,
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        if sender is not None:
            sender.start()
        node.start()
        err_console.print(
            f"medsight listening as {ae_title} on {host}:{node.port}"
            + (f"; results to {destination}" if destination else ""),
            highlight=False,
        )
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            node.stop()
            if sender is not None:
                sender.stop()
                sender.deliver()


pacs_app = typer.Typer(help="Fetch studies from a PACS that pushes nothing (DICOMweb).")
app.add_typer(pacs_app, name="pacs")


@pacs_app.command("poll")
def pacs_poll_command(
    run: Annotated[Path, typer.Argument(help="Run directory whose model scores the studies.")],
    url: Annotated[str, typer.Option("--url", help="DICOMweb root, e.g. http://pacs/dicom-web.")],
    since: Annotated[
        str, typer.Option("--since", help="Studies from this date on: YYYYMMDD[-HHMMSS].")
    ],
    db: WorklistDbOption = None,
    data_dir: WorklistDirOption = None,
    once: Annotated[bool, typer.Option("--once", help="Poll once and exit.")] = False,
    every: Annotated[
        float, typer.Option("--every", help="Seconds between polls (without --once).")
    ] = 60.0,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the server per request.")
    ] = 30.0,
    credentials_file: CredentialsOption = None,
    backend: Annotated[Backend, typer.Option("--backend", help="torch | onnx")] = Backend.torch,
    device: DeviceOption = "auto",
    point: PointOption = "youden",
) -> None:
    """Poll a DICOMweb server (QIDO-RS, WADO-RS) and queue the studies not yet on the worklist."""
    import logging
    import time

    from medsight.integration.dicomweb import DicomWebClient, load_credentials, parse_since
    from medsight.integration.dicomweb import poll as poll_studies

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s %(message)s")
    with _user_errors():
        parse_since(since)
        client = DicomWebClient(url, auth=load_credentials(credentials_file), timeout=timeout)
        model = _pacs_model(run, backend, device, point)
        store = _pacs_store(run, db, data_dir)
        while True:
            result = poll_studies(model, store, client, since)
            err_console.print(
                f"{url}: {result.found} studies since {since}, {result.queued} queued, "
                f"{result.known} already on the worklist, {result.failed} failed",
                highlight=False,
            )
            if once:
                return
            time.sleep(every)


if __name__ == "__main__":  # pragma: no cover
    app()
