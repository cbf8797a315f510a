"""Readers that turn any labelled image collection into one SampleTable (a validated DataFrame).

Every reader returns the same schema, so nothing downstream knows where images came from:

========== ==================================================================================
sample_id  unique, human-readable id (the path relative to the dataset root, or ``split-index``)
source     what :func:`medsight.data.imaging.decode` reads: a path, or a zip/npz/NIfTI address
label      class name (string); missing for unlabelled collections
patient_id optional; grouping key for splits and leakage checks (pseudonymised when from DICOM)
split      optional; ``train``, ``val`` or ``test``
...        any metadata columns (sex, age, site, modality, mask, ...)
========== ==================================================================================

Supported layouts, chosen from the path (``format=`` overrides): class folders
(``root/<class>/*``, optionally ``root/<split>/<class>/*``, also inside a ``.zip``), a CSV manifest,
a MedMNIST ``.npz``, DICOM files or folders, NIfTI files or folders.

Several findings per image (a multi-label table, see :mod:`medsight.data.findings`) come from a
CSV with one 0/1 column per finding (``labels="a,b"`` or ``labels="all"``), a CSV with a column
of findings joined by ``|`` (NIH ChestX-ray14's ``Finding Labels``, found by its name when there
is no ``label`` column), or a MedMNIST ``.npz`` with multi-hot labels (ChestMNIST). What a reader
normalised on the way (finding names, delimiters, the columns it took) is listed in
``table.attrs["notes"]``, which the trainer prints.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from pydantic import ValidationError

from medsight.config import READ_FORMATS, ReadOptions, explain_validation
from medsight.data import imaging
from medsight.data.boxes import box_csv_columns, is_detection
from medsight.data.findings import (
    NO_FINDING,
    SEPARATOR,
    UNCERTAIN,
    encode_rows,
    is_multilabel,
    mark_multilabel,
)
from medsight.data.privacy import pseudonym_salt, pseudonymise
from medsight.errors import ConfigError, DataError, ImageDecodeError

REQUIRED_COLUMNS = ("sample_id", "source", "label")
OPTIONAL_COLUMNS = ("patient_id", "split")
SPLITS = ("train", "val", "test")
FORMATS = READ_FORMATS  # the list lives in config, where the CLI reads it without pandas

#: Split names as people write them (folder names, manifest values) → the canonical name.
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "trn": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
    "tst": "test",
}

#: Class names of the MedMNIST v2 sets whose label indices are documented (by file name prefix).
MEDMNIST_CLASSES = {
    "pneumoniamnist": ("normal", "pneumonia"),
    "breastmnist": ("malignant", "normal_benign"),
    "octmnist": ("choroidal_neovascularization", "diabetic_macular_edema", "drusen", "normal"),
    "dermamnist": (
        "actinic_keratoses",
        "basal_cell_carcinoma",
        "benign_keratosis",
        "dermatofibroma",
        "melanoma",
        "melanocytic_nevi",
        "vascular_lesions",
    ),
    "bloodmnist": (
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature_granulocyte",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ),
    "adrenalmnist3d": ("normal", "hyperplasia"),
    # ChestMNIST is multi-label: its 14 multi-hot columns are these findings, in this order.
    "chestmnist": (
        "atelectasis",
        "cardiomegaly",
        "effusion",
        "infiltration",
        "mass",
        "nodule",
        "pneumonia",
        "pneumothorax",
        "consolidation",
        "edema",
        "emphysema",
        "fibrosis",
        "pleural",
        "hernia",
    ),
}

#: Columns a manifest may carry that describe the image or patient rather than a finding:
#: ``--labels all`` never takes them (compared in lower case, spaces as underscores). DICOM
#: headers give modality/sex/age/view/study; the phantoms sex/age/site; NIH and CheXpert CSVs
#: the rest.
METADATA_COLUMNS = frozenset(
    {
        "sex",
        "gender",
        "age",
        "site",
        "modality",
        "view",
        "study",
        "patient_age",
        "patient_sex",
        "patient_gender",
        "view_position",
        "frontal/lateral",
        "ap/pa",
        "follow-up_#",
        "fold",
    }
)
#: The NIH ChestX-ray14 name of a column of findings joined by ``|``.
FINDINGS_COLUMN = "Finding Labels"

_JUNK_NAMES = {"thumbs.db", "desktop.ini"}
MANIFEST_NAME = "manifest.csv"


def python_strings():
    """Inside this block pandas keeps text as Python strings: its Arrow-backed strings (pandas
    3 with pyarrow installed) hold UTF-8 only, and a file name that is not UTF-8 keeps its
    bytes as surrogates (``os.fsdecode``) through every table of a run."""
    return pd.option_context("mode.string_storage", "python")


def load_samples(
    path: str | Path,
    format: str | None = None,
    *,
    options: ReadOptions | None = None,
    salt: bytes | None = None,
    **kwargs,
) -> pd.DataFrame:
    """Read the collection at ``path`` into a validated SampleTable.

    ``format`` is one of ``folder, zip, csv, npz, dicom, nifti`` or, for images with boxes
    (:mod:`medsight.data.boxes`), ``coco, yolo, voc, boxes`` (detected when omitted: a
    ``.json`` is COCO, a folder with ``Annotations/`` and ``JPEGImages/`` VOC, one with
    ``images/`` and ``labels/`` YOLO, a CSV whose header names x1,y1,x2,y2 or xmin..ymax a box
    CSV).
    Other options: ``allow_outside`` (manifest paths may leave the manifest's folder),
    ``path_column``/``label_column``/``patient_column``/``split_column`` (manifest column names),
    ``nifti_axis``/``nifti_slice`` (which slice of 3-D volumes), as keywords or as one
    :class:`~medsight.config.ReadOptions` (a run's ``DataConfig`` is one); ``salt`` is the
    pseudonym key (default: the machine's).

    >>> table = load_samples("data/pneumoniamnist.npz")            # doctest: +SKIP
    >>> table.groupby("split").size().to_dict()                    # doctest: +SKIP
    {'test': 624, 'train': 3882, 'val': 524}
    """
    opts = _read_options(options, format, kwargs)
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; check the path (it is read as given)")
    fmt = opts.format or detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    readers = {
        "coco": _read_boxes,
        "yolo": _read_boxes,
        "voc": _read_boxes,
        "boxes": _read_boxes,
        "folder": _read_tree,
        "zip": _read_tree,
        "dicom": _read_tree,
        "nifti": _read_tree,
        "csv": _read_manifest,
        "npz": _read_medmnist,
    }
    dicom_tree = fmt in ("folder", "dicom") and path.is_dir() and opts.dims != "2"
    if dicom_tree and _holds_dicom(path) and (opts.dims == "3" or _holds_slice_series(path)):
        readers[fmt] = _read_dicom_series_tree
    with python_strings():
        table = readers[fmt](path, fmt, opts, salt)
        table = validate_table(table, origin=str(path))
        _mark_dims(table, fmt, opts, str(path))
    table.attrs.setdefault("format", fmt)
    table.attrs["root"] = str(path.resolve())
    return table


def detect_format(path: Path) -> str:
    """Pick a reader from the path: extension for files, contents for folders."""
    name = path.name.lower()
    if path.is_dir():
        if (path / "Annotations").is_dir() and (path / "JPEGImages").is_dir():
            return "voc"
        if (path / "images").is_dir() and (path / "labels").is_dir():
            return "yolo"
        if (path / MANIFEST_NAME).is_file():
            return "boxes" if _has_box_columns(path / MANIFEST_NAME) else "csv"
        return "folder"
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(".json"):
        return "coco"
    if name.endswith(".csv"):
        return "boxes" if _has_box_columns(path) else "csv"
    if name.endswith(".npz"):
        return "npz"
    if imaging.has_extension(name, imaging.NIFTI_EXTENSIONS):
        return "nifti"
    if imaging.is_dicom_file(path):
        return "dicom"
    if imaging.has_extension(name, imaging.RASTER_EXTENSIONS):
        return "folder"
    raise DataError(
        f"{path}: cannot tell what kind of dataset this is (extension {path.suffix or 'none'!r}); "
        "give a folder, .zip, .csv, .npz, COCO .json, DICOM or NIfTI file, or pass --format"
    )


def _has_box_columns(csv: Path) -> bool:
    """Whether a CSV's header names box corners (x1..y2 or xmin..ymax): a box CSV."""
    try:
        with csv.open(newline="", encoding="utf-8-sig") as f:
            header = f.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return box_csv_columns(part.strip().strip('"') for part in header.split(",")) is not None


def _read_boxes(path: Path, fmt: str, opts: ReadOptions, salt: bytes | None = None) -> pd.DataFrame:
    """The box formats (:mod:`medsight.data.boxes`): COCO, YOLO, Pascal VOC, a box CSV."""
    from medsight.data import boxes

    _refuse_multilabel_options(path, fmt, opts)
    if fmt == "coco":
        if path.is_dir():
            raise DataError(f"{path}: --format coco reads a COCO .json file, not a folder")
        return boxes.read_coco(path)
    if fmt in ("yolo", "voc"):
        if not path.is_dir():
            raise DataError(f"{path}: --format {fmt} reads a folder, not a file")
        return boxes.read_yolo(path) if fmt == "yolo" else boxes.read_voc(path)
    return boxes.read_box_csv(
        path / MANIFEST_NAME if path.is_dir() else path,
        allow_outside=opts.allow_outside,
        path_column=opts.path_column if opts.path_column != "path" else None,
        label_column=opts.label_column if opts.label_column != "label" else None,
    )


def validate_table(table: pd.DataFrame, origin: str = "table") -> pd.DataFrame:
    """Check the SampleTable schema once, at the boundary; return it with canonical dtypes."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{origin}: SampleTable lacks column(s) {', '.join(missing)}")
    if table.empty:
        raise DataError(f"{origin}: no images found")
    table = table.copy()
    for column in ("sample_id", "source"):
        table[column] = table[column].astype(str)
    dupes = table["sample_id"][table["sample_id"].duplicated()].unique()
    if len(dupes):
        shown = ", ".join(map(str, dupes[:3]))
        raise DataError(f"{origin}: sample_id must be unique; repeated: {shown}")
    table["label"] = _optional_text(table["label"])
    _refuse_number_spellings(table["label"], f"{origin}: column 'label'")
    for column in OPTIONAL_COLUMNS:
        table[column] = _optional_text(table[column]) if column in table.columns else pd.NA
    split_values = set(table["split"].dropna().unique())
    unknown = split_values - set(SPLITS)
    if unknown:
        raise DataError(
            f"{origin}: unknown split value(s) {sorted(unknown)}; use train, val or test"
        )
    ordered = list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
    ordered += [c for c in table.columns if c not in ordered]
    return table[ordered].reset_index(drop=True)


def class_names(table: pd.DataFrame) -> list[str]:
    """Ordered class names: the reader's order when it knows one, else sorted; a multi-label
    table's findings, all of them, in its order."""
    if is_multilabel(table) or is_detection(table):
        return list(table.attrs["classes"])
    present = set(table["label"].dropna().unique())
    known = [c for c in table.attrs.get("classes", []) if c in present]
    return known + sorted(present - set(known))


# --------------------------------------------------------------------------- folders and zips


def _read_tree(path: Path, fmt: str, opts: ReadOptions, salt: bytes | None = None) -> pd.DataFrame:
    """Class folders (optionally under split folders), in a directory or a zip, or single files."""
    _refuse_multilabel_options(path, fmt, opts)
    if path.is_file() and fmt != "zip" and not path.name.lower().endswith(".zip"):
        files = [path.name]
        root: Path | None = path.parent
        archive = None
    elif path.is_file():
        archive = imaging.open_zip(path)
        files = [i.filename for i in archive.infolist() if not i.is_dir()]
        root = None
    else:
        root, archive = path, None
        files = _walk(path)
    wanted = _extensions_for(fmt)
    images, ignored = [], Counter()
    for rel in files:
        parts = PurePosixPath(rel).parts
        if (
            any(p.startswith(".") or p == "__MACOSX" for p in parts)
            or parts[-1].lower() in _JUNK_NAMES
        ):
            continue
        if imaging.has_extension(rel, wanted):
            images.append(rel)
        elif (
            root is not None
            and "." not in parts[-1]
            and fmt in ("folder", "dicom")
            and (imaging.is_dicom_file(root / rel))
        ):
            images.append(rel)  # DICOM files often have no extension
        else:
            ignored[PurePosixPath(rel).suffix.lower() or "(no extension)"] += 1
    if not images:
        what = "files" if files else "files at all"
        raise DataError(
            f"{path}: no recognised images ({len(files)} {what}); expected "
            f"{', '.join(wanted)} in class folders such as {path.name}/<class>/image.png"
        )
    rows = _layout(images, str(path))
    records = []
    for rel, stripped, label, split in rows:
        if archive is not None:
            source = imaging.zip_source(path, rel)
        else:
            source = str((root / rel).resolve())
        records.append({"sample_id": stripped, "source": source, "label": label, "split": split})
    table = pd.DataFrame.from_records(records)
    table = _add_medical_metadata(table, opts, salt)
    table.attrs["ignored"] = dict(ignored)
    return table


def _refuse_multilabel_options(path: Path, fmt: str, opts: ReadOptions) -> None:
    """Class folders, DICOM, NIfTI and .npz collections say their labels themselves: the
    multi-label options read a CSV manifest's columns, so asking for them elsewhere is a
    mistake better named than ignored."""
    given = [
        flag
        for flag, value in (("--labels", opts.labels), ("--findings-column", opts.findings_column))
        if value is not None
    ]
    if not given:
        return
    if fmt == "npz":
        why = "a MedMNIST .npz carries its own labels (multi-hot labels are read as findings)"
    elif fmt in ("coco", "yolo", "voc", "boxes"):
        why = f"a {fmt} collection has boxes, whose classes are its labels"
    else:
        why = f"a {fmt} collection has one label per image (its class folder), not findings"
    raise DataError(
        f"{path}: {' and '.join(given)} read(s) the finding columns of a CSV manifest, but "
        f"{why}; drop {' and '.join(given)} or give a manifest.csv with one 0/1 column per "
        f"finding or a {FINDINGS_COLUMN!r} column"
    )


def _walk(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        found.extend((rel_dir / f).as_posix() for f in sorted(filenames))
    return found


def _extensions_for(fmt: str) -> tuple[str, ...]:
    if fmt == "dicom":
        return imaging.DICOM_EXTENSIONS
    if fmt == "nifti":
        return imaging.NIFTI_EXTENSIONS
    return imaging.IMAGE_EXTENSIONS


def _layout(images: list[str], origin: str) -> list[tuple[str, str, str | None, str | None]]:
    """Map relative paths to (path, sample_id, label, split) by the folder layout.

    Single wrapper folders (``dataset-v2/``) are skipped; a first level whose folder names are
    all split names (train/val/test and their aliases) gives the split; the next level is the
    class. Files that sit directly in the root make an unlabelled collection.
    """
    split_parts = [PurePosixPath(p).parts for p in images]
    depth = 0
    while True:
        level = {parts[depth] for parts in split_parts if len(parts) > depth + 1}
        if (
            len(level) == 1
            and all(len(parts) >= depth + 3 for parts in split_parts)
            and next(iter(level)).lower() not in SPLIT_ALIASES
        ):
            depth += 1
            continue
        break
    rest = [parts[depth:] for parts in split_parts]
    loose = sum(len(parts) == 1 for parts in rest)
    if loose * 2 > len(rest):
        # Mostly loose files (a DICOM export, a folder of scans to score): an unlabelled set.
        return [(img, "/".join(r), None, None) for img, r in zip(images, rest)]
    first = {r[0].lower() for r in rest if len(r) > 1}
    has_splits = bool(first) and first <= set(SPLIT_ALIASES)
    rows, misplaced = [], []
    for img, parts in zip(images, rest):
        sample_id = "/".join(parts)
        if has_splits:
            if len(parts) < 3:
                misplaced.append(img)
                continue
            rows.append((img, sample_id, parts[1], SPLIT_ALIASES[parts[0].lower()]))
        else:
            if len(parts) < 2:
                misplaced.append(img)
                continue
            rows.append((img, sample_id, parts[0], None))
    if not rows:
        raise DataError(f"{origin}: images found but none inside class folders (<class>/image)")
    if misplaced:
        # Loose files beside class folders are ambiguous: keep the labelled ones, say so once.
        import warnings

        warnings.warn(
            f"{origin}: {len(misplaced)} image(s) outside class folders were skipped, "
            f"e.g. {misplaced[0]}",
            stacklevel=3,
        )
    return rows


def _read_options(options: ReadOptions | None, format: str | None, kwargs: dict) -> ReadOptions:
    given = {} if options is None else options.model_dump(include=set(ReadOptions.model_fields))
    if format is not None:
        given["format"] = format
    try:
        return ReadOptions.model_validate({**given, **kwargs})
    except ValidationError as exc:
        raise ConfigError(f"reader options: {explain_validation(exc)}") from None


def _add_medical_metadata(
    table: pd.DataFrame, opts: ReadOptions, salt: bytes | None = None
) -> pd.DataFrame:
    """Header metadata for DICOM rows (pseudonymised ids) and slice addresses for NIfTI rows."""
    is_dicom = [
        imaging.has_extension(imaging.source_name(s), imaging.DICOM_EXTENSIONS)
        or "." not in imaging.source_name(s)
        for s in table["source"]
    ]
    if any(is_dicom):
        salt = salt if salt is not None else pseudonym_salt()
        meta = [
            _dicom_fields(source, salt) if flag else {}
            for source, flag in zip(table["source"], is_dicom)
        ]
        extra = pd.DataFrame.from_records(meta, index=table.index)
        for column in extra.columns:
            table[column] = extra[column]
    if opts.nifti_slice is not None or opts.nifti_axis != 2:
        sources = []
        for source in table["source"]:
            if imaging.has_extension(source, imaging.NIFTI_EXTENSIONS) and "://" not in source:
                shape = imaging.nifti_shape(source)
                if len(shape) >= 3:
                    index = opts.nifti_slice
                    if index is None:
                        index = shape[opts.nifti_axis] // 2
                    source = imaging.nifti_slice_source(source, opts.nifti_axis, index)
            sources.append(source)
        table["source"] = sources
    return table


def _dicom_fields(source: str, salt: bytes) -> dict:
    """Patient grouping and subgroup metadata from a DICOM header; never a raw identifier."""
    try:
        if source.startswith("zip://"):
            ds = imaging.dicom_header(imaging._read_zip_member(source), name=source)
        else:
            ds = imaging.dicom_header(source)
    except Exception:  # noqa: BLE001 - unreadable files are reported by check
        return {}
    fields = {
        "patient_id": pseudonymise(str(ds.get("PatientID", "") or ""), salt) or None,
        "study": pseudonymise(str(ds.get("StudyInstanceUID", "") or ""), salt) or None,
        "modality": str(ds.get("Modality", "") or "") or None,
        "sex": str(ds.get("PatientSex", "") or "") or None,
        "age": _dicom_age(str(ds.get("PatientAge", "") or "")),
        "view": str(ds.get("ViewPosition", "") or "") or None,
    }
    return fields


def _dicom_age(text: str) -> float | None:
    """DICOM AS ('045Y', '006M') → years; ages over 89 are capped at 90 (HIPAA Safe Harbor)."""
    text = text.strip().upper()
    if len(text) != 4 or not text[:3].isdigit():
        return None
    value = int(text[:3])
    years = {"Y": value, "M": value / 12, "W": value / 52, "D": value / 365}.get(text[3])
    return None if years is None else round(min(years, 90.0), 2)


# --------------------------------------------------------------------------- CSV manifest


def _read_manifest(
    path: Path, fmt: str, opts: ReadOptions, salt: bytes | None = None
) -> pd.DataFrame:
    manifest = path / MANIFEST_NAME if path.is_dir() else path
    try:
        frame = pd.read_csv(manifest, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(
            f"{manifest}: the manifest is empty; it needs a header path,label"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{manifest}: not a readable CSV ({exc})") from None
    if not isinstance(frame.index, pd.RangeIndex):
        # pandas reads a first row with one field more than the header as an index, which
        # shifts every column silently: most often an unquoted comma in a cell.
        raise DataError(
            f"{manifest}: line 2 has more fields than the header ({len(frame.columns)}); "
            'quote cells that hold a comma ("effusion, mass") or fix the header'
        )
    frame.columns = [c.strip() for c in frame.columns]
    available = ", ".join(frame.columns) or "none"
    notes: list[str] = []
    patient_column = opts.patient_column or _patient_column(frame, notes)
    findings_column = _findings_column(opts, frame, manifest)
    findings = (
        None
        if findings_column
        else _finding_columns(opts, frame, manifest, notes, reserved={patient_column})
    )
    roles = [("path", opts.path_column, "path")]
    if findings is None and findings_column is None:
        roles.append(("label", opts.label_column, "label"))
    for role, column, default in roles:
        if column not in frame.columns:
            hint = f"name a column '{default}'" if column == default else "check the column name"
            raise DataError(
                f"{manifest}: no {role} column {column!r} (columns are: {available}); "
                f"{hint} or pass --{role}-column"
            )
    for role, column in (("patient", opts.patient_column), ("split", opts.split_column)):
        if column is not None and column not in frame.columns:
            raise DataError(
                f"{manifest}: --{role}-column {column!r} is not a column (columns are: {available})"
            )
    if frame.empty:
        raise DataError(f"{manifest}: the manifest has a header but no rows")
    base = manifest.parent.resolve()
    raw_paths = frame[opts.path_column].str.strip()
    empty = raw_paths.index[raw_paths == ""]
    if len(empty):
        raise DataError(f"{manifest}: line {empty[0] + 2} has an empty path")
    sources = [_resolve_manifest_path(p, base) for p in raw_paths]
    if not opts.allow_outside:
        _refuse_outside(manifest, "path", raw_paths, sources, base)
    if findings_column is not None:
        labels, findings = _findings_from_cells(frame[findings_column], findings_column, manifest)
        notes += _cell_notes(frame[findings_column], findings_column, findings)
    elif findings is None:
        labels = frame[opts.label_column].str.strip()
        _refuse_number_spellings(labels, f"{manifest}: label column {opts.label_column!r}")
    else:
        matrix = _finding_matrix(
            frame, findings, opts.uncertain, manifest, every=_takes_all(opts.labels)
        )
        labels = pd.Series(encode_rows(matrix, findings), index=frame.index)
    table = pd.DataFrame(
        {
            "sample_id": frame["sample_id"] if "sample_id" in frame.columns else raw_paths,
            "source": [str(s) for s in sources],
            "label": labels,
        }
    )
    split_column = opts.split_column or ("split" if "split" in frame else None)
    if patient_column:
        table["patient_id"] = frame[patient_column].str.strip()
    if split_column:
        table["split"] = _canonical_splits(frame[split_column], manifest)
    used = {opts.path_column, opts.label_column, patient_column, split_column, "sample_id"}
    used |= set(findings or ()) if findings_column is None else {findings_column}
    for column in frame.columns:
        if column in used:
            continue
        values = frame[column]
        if column == "mask" or column.endswith("_path"):
            resolved = [_resolve_manifest_path(v, base) if v else None for v in values]
            if not opts.allow_outside:
                _refuse_outside(manifest, column, values, resolved, base)
            values = pd.Series(
                [str(r) if r else v for r, v in zip(resolved, values)], index=values.index
            )
        table[column] = _maybe_numeric(values)
    table.attrs["manifest"] = str(manifest.resolve())
    if findings is not None:
        mark_multilabel(table, findings)
    if notes:
        table.attrs["notes"] = notes
    return table


#: How multi-label cells are written: present, absent, uncertain.
_FINDING_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": -1.0}


def _patient_column(frame: pd.DataFrame, notes: list[str]) -> str | None:
    """``patient_id``, else a column spelled like it (NIH's ``Patient ID``): grouping by
    patient is what keeps a patient's images out of two splits."""
    if "patient_id" in frame.columns:
        return "patient_id"
    found = next((c for c in frame.columns if _finding_key(c) == "patient_id"), None)
    if found is not None:
        notes.append(f"patients are grouped by column {found!r}")
    return found


def _takes_all(labels: str | None) -> bool:
    return labels is not None and labels.strip().lower() == "all"


def _finding_key(name: str) -> str:
    """How finding and metadata names are compared: lower case, runs of spaces and underscores
    as one underscore (``"Pleural Thickening"`` and ``"pleural_thickening"`` are one)."""
    return re.sub(r"[\s_]+", "_", name.strip().lower())


def _is_no_finding(name: str) -> bool:
    return _finding_key(name) == _finding_key(NO_FINDING)


def _finding_columns(
    opts: ReadOptions,
    frame: pd.DataFrame,
    manifest: Path,
    notes: list[str],
    reserved: set[str | None] = frozenset(),
) -> list[str] | None:
    """``--labels A,B`` → the finding columns, each checked to exist; ``--labels all`` → every
    column that is not a path, id, split, label or known metadata column (said in ``notes``);
    None: single-label."""
    if opts.labels is None:
        return None
    if _takes_all(opts.labels):
        return _all_finding_columns(opts, frame, manifest, notes, reserved)
    findings = [name.strip() for name in opts.labels.split(",") if name.strip()]
    if not findings:
        raise DataError("--labels names no column; give the finding columns, e.g. --labels a,b")
    missing = [name for name in findings if name not in frame.columns]
    if missing:
        raise DataError(
            f"{manifest}: --labels names column(s) {missing} that are not in the manifest "
            f"(columns are: {', '.join(frame.columns)})"
        )
    nothing = [name for name in findings if _is_no_finding(name)]
    if nothing:
        raise DataError(
            f"--labels names {nothing[0]!r}, which means an image without findings, so it "
            "cannot be one; leave it out of --labels (an image with 0 in every finding column "
            f"is read as {NO_FINDING!r})"
        )
    repeated = sorted({name for name in findings if findings.count(name) > 1})
    if repeated:
        raise DataError(f"--labels names column(s) {repeated} more than once; name each once")
    return findings


def _all_finding_columns(
    opts: ReadOptions,
    frame: pd.DataFrame,
    manifest: Path,
    notes: list[str],
    reserved: set[str | None],
) -> list[str]:
    reserved = {*reserved, opts.path_column, opts.label_column, "sample_id", "split", "mask"}
    reserved |= {opts.split_column}
    findings, metadata, no_finding = [], [], []
    for column in frame.columns:
        if column in reserved or column.endswith("_path"):
            continue
        if _finding_key(column) in METADATA_COLUMNS:
            metadata.append(column)
        elif _is_no_finding(column):
            no_finding.append(column)
        else:
            findings.append(column)
    if not findings:
        raise DataError(
            f"{manifest}: --labels all found no finding column (columns are: "
            f"{', '.join(frame.columns)}); add one 0/1 column per finding"
        )
    notes.append(f"--labels all: {len(findings)} finding column(s): {', '.join(findings)}")
    if metadata:
        notes.append(f"--labels all: kept as metadata, not findings: {', '.join(metadata)}")
    if no_finding:
        notes.append(
            f"--labels all: left out column {no_finding[0]!r}: it says an image has no "
            "finding, which the finding columns already say"
        )
    return findings


def _finding_matrix(
    frame: pd.DataFrame, findings: list[str], uncertain: str, manifest: Path, every: bool = False
) -> np.ndarray:
    """The 0/1 finding columns → an ``(N, K)`` matrix of 1 / 0 / NaN (ignored), uncertain
    entries (−1, blank) resolved by the ``uncertain`` policy; any other value is refused,
    naming its line and column."""
    matrix = np.zeros((len(frame), len(findings)), dtype=np.float64)
    for k, name in enumerate(findings):
        cells = frame[name].str.strip()
        bad = ~cells.isin(list(_FINDING_VALUES))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            hint = (
                "; --labels all read it as a finding: name the finding columns instead "
                "(--labels a,b)"
                if every
                else ""
            )
            raise DataError(
                f"{manifest}: line {row + 2}, column {name!r} holds {cells.iloc[row]!r}; a "
                f"finding column holds 1 (present), 0 (absent), -1 or blank (uncertain){hint}"
            )
        matrix[:, k] = cells.map(_FINDING_VALUES).to_numpy()
    replacement = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[uncertain]
    matrix[matrix == -1.0] = replacement
    return matrix


#: Besides ``|``, what people separate findings in one cell with.
_CELL_DELIMITERS = re.compile(r"[|;,]")


def _findings_column(opts: ReadOptions, frame: pd.DataFrame, manifest: Path) -> str | None:
    """The column of delimited findings: ``--findings-column``, else NIH's ``Finding Labels``
    when neither ``--labels`` nor a label column is there."""
    if opts.findings_column is not None:
        if opts.labels is not None:
            raise DataError(
                "--labels (0/1 finding columns) and --findings-column (one column of findings) "
                "are two ways to read findings; give one"
            )
        if opts.findings_column not in frame.columns:
            raise DataError(
                f"{manifest}: --findings-column {opts.findings_column!r} is not a column "
                f"(columns are: {', '.join(frame.columns)})"
            )
        return opts.findings_column
    if opts.labels is not None or opts.label_column in frame.columns:
        return None
    wanted = _finding_key(FINDINGS_COLUMN)
    return next((c for c in frame.columns if _finding_key(c) == wanted), None)


def _findings_from_cells(
    cells: pd.Series, column: str, manifest: Path
) -> tuple[pd.Series, list[str]]:
    """``"Effusion|Cardiomegaly"`` cells → label texts and the sorted findings. Names are
    compared in lower case with underscores for spaces (the spelling kept); ``;`` and ``,``
    separate like ``|``; "No Finding" (any case) means none; a blank cell is unlabelled."""
    parsed: list[set[str] | None] = []
    for line, cell in enumerate(cells.str.strip(), start=2):
        if not cell:
            parsed.append(None)
            continue
        names = {_finding_key(part) for part in _CELL_DELIMITERS.split(cell) if part.strip()}
        if _finding_key(NO_FINDING) in names and len(names) > 1:
            raise DataError(
                f"{manifest}: line {line}, column {column!r} holds {cell!r}: 'No Finding' "
                "together with findings; write the findings or 'No Finding', not both"
            )
        odd = sorted(n for n in names if n.startswith(UNCERTAIN))
        if odd:
            raise DataError(
                f"{manifest}: line {line}, column {column!r} names {odd[0]!r}; a finding name "
                f"may not start with {UNCERTAIN!r}"
            )
        parsed.append(names - {_finding_key(NO_FINDING)})
    findings = sorted(set().union(*(p for p in parsed if p is not None)))
    if not findings:
        raise DataError(
            f"{manifest}: column {column!r} names no finding (every row is blank or says "
            "'No Finding'); a multi-label set needs at least one finding"
        )
    labels = [
        None if names is None else SEPARATOR.join(f for f in findings if f in names) or NO_FINDING
        for names in parsed
    ]
    return pd.Series(labels, index=cells.index, dtype=object), findings


def _cell_notes(cells: pd.Series, column: str, findings: list[str]) -> list[str]:
    """What :func:`_findings_from_cells` normalised, for people to check."""
    notes = [f"findings read from column {column!r}: {', '.join(findings)}"]
    spellings: dict[str, set[str]] = defaultdict(set)
    delimiters: set[str] = set()
    for cell in cells.str.strip():
        delimiters |= set(cell) & {";", ","}
        for part in _CELL_DELIMITERS.split(cell):
            if part.strip() and not _is_no_finding(part):
                spellings[_finding_key(part)].add(part.strip())
    renamed = sorted((sorted(raw), key) for key, raw in spellings.items() if raw != {key} and raw)
    if renamed:
        shown = "; ".join(
            f"{' and '.join(repr(r) for r in raw)} → {key!r}" for raw, key in renamed[:4]
        )
        more = f" and {len(renamed) - 4} more" if len(renamed) > 4 else ""
        notes.append(
            f"finding names are written in lower case with underscores for spaces, spellings "
            f"that differ only so are one finding: {shown}{more}"
        )
    if delimiters:
        shown = " and ".join(repr(d) for d in sorted(delimiters))
        notes.append(f"column {column!r} separates findings with {shown}, read like '|'")
    return notes


def _refuse_outside(manifest: Path, column: str, raw, resolved, base: Path) -> None:
    """A path column (the images', a mask, ``*_path``) may not leave the manifest's folder:
    masks too are read and shown (explanation scoring, the report), so none may reach other
    files."""
    outside = [(i, r) for i, (r, p) in enumerate(zip(raw, resolved)) if p and not _inside(p, base)]
    if outside:
        line, shown = outside[0][0] + 2, outside[0][1]
        raise DataError(
            f"{manifest}: line {line}: {column} {shown!r} points outside the manifest's folder "
            f"{base} ({len(outside)} such row(s)); move the files under it or pass "
            "--allow-outside"
        )


def _refuse_number_spellings(labels: pd.Series, where: str) -> None:
    """Refuse one number written several ways (``1``, ``1.0``, ``01``): they would silently
    become separate classes, and which spelling is meant cannot be guessed safely."""
    spellings: dict[float, set[str]] = {}
    for text in labels.dropna().unique():
        try:
            value = float(text)
        except (TypeError, ValueError):
            continue
        if value == value:  # not NaN
            spellings.setdefault(value, set()).add(str(text))
    clashes = [sorted(texts) for texts in spellings.values() if len(texts) > 1]
    if clashes:
        shown = "; ".join(", ".join(repr(t) for t in texts) for texts in clashes[:3])
        raise DataError(
            f"{where} writes the same class in several ways ({shown}), which would make "
            "separate classes; write each class one way"
        )


def _resolve_manifest_path(raw: str, base: Path) -> Path:
    candidate = Path(raw.replace("\\", "/")).expanduser()
    if not candidate.is_absolute():
        candidate = base / candidate
    return Path(os.path.normpath(candidate))


def _inside(path: Path, base: Path) -> bool:
    try:
        path.resolve().relative_to(base)
        return True
    except ValueError:
        return False


def _canonical_splits(values: pd.Series, origin: Path) -> pd.Series:
    lowered = values.str.strip().str.lower()
    unknown = sorted(set(lowered) - set(SPLIT_ALIASES) - {""})
    if unknown:
        raise DataError(
            f"{origin}: unknown split value(s) {unknown}; use train, val or test "
            "(or leave the cell empty to have medsight assign it)"
        )
    return lowered.map(lambda v: SPLIT_ALIASES.get(v) if v else None)


def _maybe_numeric(values: pd.Series) -> pd.Series:
    converted = pd.to_numeric(values.replace("", np.nan), errors="coerce")
    if converted.notna().sum() == (values != "").sum():
        return converted
    return values.replace("", None)


def _optional_text(values: pd.Series) -> pd.Series:
    def clean(value):
        if value is None or (not isinstance(value, str) and pd.isna(value)):
            return None
        text = str(value).strip()
        return text or None

    # Built as object dtype so a missing value is always None (pandas 3 would coerce to NaN).
    return pd.Series([clean(v) for v in values], index=values.index, dtype=object)


# --------------------------------------------------------------------------- MedMNIST npz


# --------------------------------------------------------------------------- volumes


def _mark_dims(table: pd.DataFrame, fmt: str, opts: ReadOptions, origin: str) -> None:
    """``table.attrs["dims"] = 3`` when its rows are volumes (:mod:`medsight.data.volumes`):
    DICOM series, MedMNIST3D entries, or NIfTI volumes read whole (``--dims 3``, or ``auto``
    without a slice chosen)."""
    from medsight.data import volumes

    if table.attrs.get("dims") == 3:
        return
    first = str(table["source"].iloc[0])
    if first.startswith(volumes.DICOM_SERIES_SCHEME):
        table.attrs["dims"] = 3
        return
    if first.startswith("nifti://") or opts.nifti_slice is not None or opts.nifti_axis != 2:
        if opts.dims == "3":
            raise ConfigError(
                "--dims 3 reads whole volumes; leave out --slice/--axis, which pick 2-D slices"
            )
        return
    if "://" in first or not imaging.has_extension(first, imaging.NIFTI_EXTENSIONS):
        if opts.dims == "3":
            raise DataError(
                f"{origin}: --dims 3 needs volumes (NIfTI files, DICOM series, MedMNIST3D), "
                f"but {imaging.source_name(first)} is a 2-D image; leave out --dims"
            )
        return
    if opts.dims == "2":
        return
    try:
        shape = imaging.nifti_shape(first)
    except Exception:  # noqa: BLE001 - an unreadable file is data check's to report
        return
    if len(shape) >= 3 and sorted(shape[:3])[0] > 1:
        table.attrs["dims"] = 3
        if opts.volume is not None:
            table.attrs["volume"] = int(opts.volume)


#: DICOM files whose headers ``--dims auto`` reads to tell CT/MR slices from 2-D images.
_SERIES_SAMPLE = 64


def _holds_slice_series(root: Path) -> bool:
    """Whether most of the first DICOM files of ``root`` are slices of volumes: in series of
    three or more positions in space (ImagePositionPatient), as CT and MR series are. Radiographs
    carry no position and come one image per series; a folder mixing single images with a
    short series stays a folder of images."""
    from medsight.data.volumes import dicom_files

    if not root.is_dir():
        return False
    files: Counter = Counter()
    positions: defaultdict = defaultdict(set)
    sampled = 0
    for _, (_, header) in zip(range(_SERIES_SAMPLE), dicom_files(root)):
        sampled += 1
        uid = str(header.get("SeriesInstanceUID", "") or "")
        where = header.get("ImagePositionPatient")
        if uid and where is not None:
            files[uid] += 1
            positions[uid].add(tuple(round(float(v), 2) for v in where))
    in_series = sum(files[uid] for uid, seen in positions.items() if len(seen) >= 3)
    return sampled > 0 and 2 * in_series > sampled


def _holds_dicom(root: Path) -> bool:
    for _, rel in zip(range(2000), _walk(root)):
        candidate = root / rel
        if imaging.has_extension(rel, imaging.DICOM_EXTENSIONS) or (
            "." not in PurePosixPath(rel).name and imaging.is_dicom_file(candidate)
        ):
            return True
    return False


def _read_dicom_series_tree(
    path: Path, fmt: str, opts: ReadOptions, salt: bytes | None = None
) -> pd.DataFrame:
    """A DICOM tree read as volumes: one row per SeriesInstanceUID, labelled by the class
    folder holding the series' folder (``<class>/<case>/*.dcm``, optionally under split
    folders); patient and modality from its first slice's header (pseudonymised)."""
    from medsight.data import volumes

    _refuse_multilabel_options(path, fmt, opts)
    found = volumes.find_dicom_series(path)
    if not found:
        raise DataError(f"{path}: no DICOM series found (files with a SeriesInstanceUID)")
    root = path.resolve()
    rels = []
    for source in found:
        folder = Path(source[len(volumes.DICOM_SERIES_SCHEME) :].rpartition("#")[0])
        rel = folder.relative_to(root).as_posix() if folder != root else "series"
        rels.append(rel)
    counts = Counter(rels)
    # A folder holding several series gives each its UID's tail as the file part.
    names = [
        f"{rel}/{source.rpartition('#')[2][-12:]}" if counts[rel] > 1 else rel
        for rel, source in zip(rels, found)
    ]
    layout = _layout(names, str(path))
    by_name = dict(zip(names, found))
    salt = salt if salt is not None else pseudonym_salt()
    records = []
    for name, sample_id, label, split in layout:
        source = by_name[name]
        first = next(iter(volumes.series_files(source)), None)
        fields = _dicom_fields(str(first), salt) if first is not None else {}
        fields.pop("view", None)
        records.append(
            {"sample_id": sample_id, "source": source, "label": label, "split": split, **fields}
        )
    table = pd.DataFrame.from_records(records)
    table.attrs["dims"] = 3
    return table


def _read_medmnist(
    path: Path, fmt: str, opts: ReadOptions, salt: bytes | None = None
) -> pd.DataFrame:
    _refuse_multilabel_options(path, fmt, opts)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    with npz:
        keys = set(npz.files)
        splits = [s for s in SPLITS if f"{s}_images" in keys and f"{s}_labels" in keys]
        if not splits:
            raise DataError(
                f"{path}: not a MedMNIST file: expected arrays train_images/train_labels, "
                f"val_images/val_labels, test_images/test_labels; found {sorted(keys) or 'none'}"
            )
        labels = {s: np.asarray(npz[f"{s}_labels"]) for s in splits}
        counts = {s: len(npz[f"{s}_images"]) for s in splits}
    for split, y in labels.items():
        if len(y) != counts[split]:
            raise DataError(
                f"{path}: {split}_images has {counts[split]} images but {len(y)} labels"
            )
    widths = {s: 1 if y.ndim == 1 else int(np.prod(y.shape[1:])) for s, y in labels.items()}
    if len(set(widths.values())) > 1:
        shown = ", ".join(f"{s}_labels {w}" for s, w in widths.items())
        raise DataError(
            f"{path}: the splits have different numbers of labels per image ({shown}); every "
            "split of one set needs the same labels"
        )
    if max(widths.values()) > 1:
        return _read_multihot(path, {s: y.reshape(len(y), -1) for s, y in labels.items()})
    shapes = {s: imaging.npz_images(path, s).shape for s in splits}
    names = _medmnist_names(path, max(int(y.max()) for y in labels.values()) + 1)
    records = []
    for split in splits:
        for index, value in enumerate(labels[split].reshape(-1)):
            records.append(
                {
                    "sample_id": f"{split}-{index:05d}",
                    "source": imaging.npz_source(path, split, index),
                    "label": names[int(value)],
                    "split": split,
                }
            )
    table = pd.DataFrame.from_records(records)
    table.attrs["classes"] = list(names)
    from medsight.data.volumes import _npz_is_3d

    if all(_npz_is_3d(shape) for shape in shapes.values()):
        if opts.dims == "2":
            raise DataError(
                f"{path}: its images are volumes ({'x'.join(map(str, shapes[splits[0]][1:]))}); "
                "--dims 2 cannot read them as images: leave out --dims"
            )
        table.attrs["dims"] = 3
    return table


def _read_multihot(path: Path, labels: dict[str, np.ndarray]) -> pd.DataFrame:
    """Multi-hot ``(N, K)`` labels (ChestMNIST) → a multi-label table: 1 present, 0 absent."""
    for split, y in labels.items():
        bad = ~np.isin(y, (0, 1))
        if bad.any():
            row, column = (int(i) for i in np.argwhere(bad)[0])
            value = y[row, column].item()
            raise DataError(
                f"{path}: {split}_labels row {row}, column {column} holds {value!r}; "
                "multi-hot labels are 0 (absent) or 1 (present)"
            )
    width = next(iter(labels.values())).shape[1]
    stem = path.name.lower()
    known = [n for p, n in MEDMNIST_CLASSES.items() if stem.startswith(p) and len(n) == width]
    findings = list(known[0]) if known else [f"finding_{k}" for k in range(width)]
    records = []
    for split, y in labels.items():
        for index, label in enumerate(encode_rows(y, findings)):
            records.append(
                {
                    "sample_id": f"{split}-{index:05d}",
                    "source": imaging.npz_source(path, split, index),
                    "label": label,
                    "split": split,
                }
            )
    table = pd.DataFrame.from_records(records)
    return mark_multilabel(table, findings)


def _medmnist_names(path: Path, n_classes: int) -> tuple[str, ...]:
    stem = path.name.lower()
    for prefix, names in MEDMNIST_CLASSES.items():
        if stem.startswith(prefix) and len(names) >= n_classes:
            return names
    return tuple(str(i) for i in range(n_classes))


def iter_decoded(
    table: pd.DataFrame, **decode_options
) -> Iterable[tuple[str, imaging.DecodedImage | ImageDecodeError]]:
    """Yield ``(sample_id, image or its error)`` per row: one bad file loses nothing."""
    for sample_id, source in zip(table["sample_id"], table["source"]):
        try:
            yield sample_id, imaging.decode(source, **decode_options)
        except ImageDecodeError as exc:
            yield sample_id, exc
