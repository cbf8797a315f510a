"""Images with boxes: the detection SampleTable and the readers that build it.

A detection table has one row per image (an image without a box is kept: a negative) and,
beside the standard columns,

* ``boxes``: JSON text, a list of ``[x1, y1, x2, y2, "class"]`` in original-image pixel corners
  (x to the right, y down, ``x2 > x1``, ``y2 > y1``); ``"[]"`` for an image without boxes;
* ``width``, ``height``: the original image size in pixels, from the annotation when it says
  it, else from the image header;
* ``label``: the classes present, in class order, joined by ``|`` (``"RBC|WBC"``), or
  ``"no finding"``: the text multi-label code reads, so splits stratify by the classes present.

``table.attrs["task"] == "detect"`` and ``table.attrs["classes"]`` lists the box classes in
order (a COCO file's categories, a YOLO ``classes.txt`` / ``data.yaml``; else sorted names).

Readers: :func:`read_coco` (a COCO ``.json``), :func:`read_yolo` (``images/`` + ``labels/``,
one ``.txt`` per image of normalised ``class cx cy w h``), :func:`read_voc` (Pascal VOC
``Annotations/*.xml`` + ``JPEGImages/``), :func:`read_box_csv` (one row per box,
``path,x1,y1,x2,y2,label`` or ``filename,class,xmin,xmax,ymin,ymax``), and
:func:`boxes_from_masks` (one box per connected component of each mask). Coordinates are taken
as written (VOC's 1-based corners too, as torchvision and most tools do).

What a reader does with a box people may have got wrong, and why:

================================ ============================================================
a coordinate that is not a number refused, naming the file and line (object, annotation id):
                                 a box cannot be guessed
x2 < x1 or y2 < y1               refused, naming the file and line: swapped corners or
                                 ``x, y, w, h`` read as corners; which one cannot be guessed
zero area (x2 == x1 or y2 == y1) dropped, counted in ``table.attrs["notes"]``: a labelling
                                 tool's stray click (BCCD has two); nothing to learn from
partly outside the image         clipped to the image, counted in the notes (boxes drawn to
                                 the border and a pixel beyond are common)
wholly outside the image         refused, naming the file and line: the box belongs to
                                 another image or another size
a class id beyond the class list refused, naming the file and line and the classes
an annotated image that is absent refused, naming the annotation and the path looked at
================================ ============================================================

>>> table = load_samples("BCCD")                 # a VOC folder    # doctest: +SKIP
>>> parse_boxes(table.loc[0, "boxes"])[0]                          # doctest: +SKIP
[260.0, 177.0, 491.0, 376.0, 'WBC']
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from xml.etree import ElementTree

import numpy as np
import pandas as pd

from medsight.data import imaging
from medsight.data.findings import NO_FINDING, SEPARATOR, UNCERTAIN
from medsight.errors import DataError

#: The task name a detection table and run carry.
DETECT = "detect"
#: The columns a detection table adds to the standard ones.
BOX_COLUMNS = ("boxes", "width", "height")
#: Corner column spellings of a box CSV: ours, and BCCD's ``test.csv``.
CSV_CORNERS = (("x1", "y1", "x2", "y2"), ("xmin", "ymin", "xmax", "ymax"))
#: Column names a box CSV may give its image paths and box classes under (first found wins).
CSV_PATH_COLUMNS = ("path", "filename", "file", "image", "image_path")
CSV_CLASS_COLUMNS = ("label", "class", "class_name", "cell_type", "category")
#: Dropping smaller components keeps a mask's stray pixels from becoming boxes.
MIN_COMPONENT_PIXELS = 4

_YOLO_SPLIT_DIRS = ("images", "labels")


def is_detection(table: pd.DataFrame) -> bool:
    """Whether ``table`` holds boxes (see the module docstring)."""
    return table.attrs.get("task") == DETECT


def mark_detection(table: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Record on ``table`` that it holds boxes of these classes, in this order; returns it."""
    table.attrs["task"] = DETECT
    table.attrs["classes"] = list(classes)
    return table


def parse_boxes(text) -> list[list]:
    """A ``boxes`` cell → ``[[x1, y1, x2, y2, "class"], ...]`` (floats and a str); a missing
    cell is no box.

    >>> parse_boxes('[[1, 2, 5, 6, "a"]]')
    [[1.0, 2.0, 5.0, 6.0, 'a']]
    """
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return []
    if isinstance(text, str):
        try:
            value = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as exc:
            raise DataError(f"boxes {text[:60]!r} are not JSON ({exc.msg})") from None
    else:
        value = text
    boxes = []
    for box in value:
        if not isinstance(box, (list, tuple)) or len(box) != 5:
            raise DataError(f"box {box!r} is not [x1, y1, x2, y2, class]")
        boxes.append([float(v) for v in box[:4]] + [str(box[4])])
    return boxes


def boxes_json(boxes: Iterable[Sequence]) -> str:
    """``[[x1, y1, x2, y2, "class"], ...]`` → the ``boxes`` cell text (compact JSON).

    >>> boxes_json([[1, 2, 5, 6, "a"]])
    '[[1.0,2.0,5.0,6.0,"a"]]'
    """
    return json.dumps(
        [[float(b[0]), float(b[1]), float(b[2]), float(b[3]), str(b[4])] for b in boxes],
        separators=(",", ":"),
    )


def max_box_count(table: pd.DataFrame) -> int:
    """The most boxes any image of ``table`` has (at least 1): a ``max_boxes`` that fits all."""
    return max([1, *(len(parse_boxes(b)) for b in table["boxes"])])


def box_targets(rows, classes: Sequence[str], max_boxes: int) -> np.ndarray:
    """Ground truth for a batch: ``(N, max_boxes, 5)`` float32 rows of
    ``[x1/width, y1/height, x2/width, y2/height, class_index]``, padded with
    ``[0, 0, 0, 0, -1]``.

    ``rows`` is a DataFrame or an iterable of mappings with ``boxes``, ``width`` and
    ``height``. An image with more boxes than ``max_boxes`` or a class not in ``classes`` is a
    DataError (nothing is dropped silently).

    >>> box_targets([{"boxes": '[[0, 0, 32, 16, "a"]]', "width": 64, "height": 64}], ["a"], 2)
    array([[[ 0.  ,  0.  ,  0.5 ,  0.25,  0.  ],
            [ 0.  ,  0.  ,  0.  ,  0.  , -1.  ]]], dtype=float32)
    """
    if max_boxes < 1:
        raise DataError(f"max_boxes must be at least 1, got {max_boxes}")
    if isinstance(rows, pd.DataFrame):
        records = rows[list(BOX_COLUMNS)].to_dict("records")
    else:
        records = list(rows)
    index = {name: k for k, name in enumerate(classes)}
    out = np.zeros((len(records), max_boxes, 5), dtype=np.float32)
    out[..., 4] = -1.0
    for i, row in enumerate(records):
        boxes = parse_boxes(row["boxes"])
        if len(boxes) > max_boxes:
            raise DataError(
                f"an image has {len(boxes)} boxes, more than max_boxes={max_boxes}; raise "
                "max_boxes (max_box_count(table) gives the most any image has)"
            )
        width, height = float(row["width"]), float(row["height"])
        for j, (x1, y1, x2, y2, name) in enumerate(boxes):
            if name not in index:
                raise DataError(f"box class {name!r} is not a class of this run: {list(classes)}")
            out[i, j] = (x1 / width, y1 / height, x2 / width, y2 / height, index[name])
    return out


# --------------------------------------------------------------------------- no boxes


def no_boxes_error(origin: str = "this dataset") -> DataError:
    """The error for ``--task detect`` on a set without boxes, saying how to give them."""
    return DataError(
        f"{origin} has no boxes, and --task detect learns from boxes. Give one of: a COCO "
        "annotation file (.json with images, annotations, categories); a YOLO folder "
        "(images/ and labels/ with one 'class cx cy w h' .txt per image, and classes.txt or "
        "data.yaml naming the classes); a Pascal VOC folder (Annotations/*.xml and "
        "JPEGImages/); or a CSV with one row per box, columns path,x1,y1,x2,y2,label (a row "
        "with empty coordinates is an image without boxes). A CSV with a 'mask' column gets one "
        "box per connected region of each mask (medsight data synth --detect writes an example)"
    )


def require_boxes(table: pd.DataFrame, origin: str | None = None) -> pd.DataFrame:
    """``table`` when it holds boxes; boxes derived from its masks when it has a ``mask`` (or
    ``<class>_mask_path``) column (:func:`boxes_from_masks`, said in the notes); else the
    :func:`no_boxes_error`."""
    if is_detection(table):
        return table
    if _mask_columns(table, None):
        return boxes_from_masks(table)
    raise no_boxes_error(origin or table.attrs.get("root", "this dataset"))


# --------------------------------------------------------------------------- building a table


@dataclass
class _Image:
    """One image as a reader found it, before its boxes are checked."""

    sample_id: str
    source: Path
    where: str  # the annotation that names the image, for messages
    boxes: list[tuple] = field(default_factory=list)  # (x1, y1, x2, y2, class, where)
    width: int | None = None
    height: int | None = None
    split: str | None = None
    extra: dict = field(default_factory=dict)


def _image_size(source: Path, where: str) -> tuple[int, int]:
    """``(width, height)`` from the image header (PIL opens lazily; DICOM's Rows/Columns)."""
    from PIL import Image, UnidentifiedImageError

    name = source.name.lower()
    try:
        if imaging.has_extension(name, imaging.RASTER_EXTENSIONS):
            with Image.open(source) as image:
                return int(image.width), int(image.height)
        if imaging.has_extension(name, imaging.DICOM_EXTENSIONS) or "." not in name:
            header = imaging.dicom_header(source)
            return int(header.Columns), int(header.Rows)
        height, width = imaging.decode(str(source)).size
        return width, height
    except (OSError, UnidentifiedImageError, AttributeError, ValueError) as exc:
        raise DataError(f"{where}: cannot read the size of image {source} ({exc})") from None


def _check_class_name(name: str, where: str) -> str:
    name = str(name).strip()
    if not name:
        raise DataError(f"{where}: a box has no class name; give each box its class")
    if SEPARATOR in name or name.startswith(UNCERTAIN) or name.lower() == NO_FINDING:
        raise DataError(
            f"{where}: box class {name!r} cannot be used: a class name may not contain "
            f"{SEPARATOR!r}, start with {UNCERTAIN!r} or be {NO_FINDING!r}; rename it"
        )
    return name


def _clean_boxes(image: _Image, fixes: dict) -> list[list]:
    """Check one image's boxes against the rules of the module docstring."""
    width, height = image.width, image.height
    kept = []
    for x1, y1, x2, y2, name, where in image.boxes:
        corners = (x1, y1, x2, y2)
        shown = ", ".join(f"{v:g}" for v in corners)
        if not all(math.isfinite(v) for v in corners):
            raise DataError(
                f"{where}: box ({shown}) of class {name!r} has a coordinate that is not a "
                "number; every box needs four finite numbers"
            )
        if x2 < x1 or y2 < y1:
            axis = "x2 < x1" if x2 < x1 else "y2 < y1"
            raise DataError(
                f"{where}: box ({shown}) of class {name!r} has {axis}; boxes are corners x1,y1 "
                "(top left) and x2,y2 (bottom right): swapped corners, or width/height written "
                "as corners?"
            )
        if x2 == x1 or y2 == y1:
            fixes["zero_area"].append(f"{where} ({shown})")
            continue
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            raise DataError(
                f"{where}: box ({shown}) of class {name!r} lies wholly outside the "
                f"{width}x{height} image {image.source}; check the image it belongs to and its "
                "size"
            )
        clipped = (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))
        if clipped != corners:
            fixes["clipped"].append(f"{where} ({shown})")
        kept.append([*clipped, name])
    return kept


def _build_table(
    images: list[_Image],
    classes: Sequence[str] | None,
    origin: str,
    notes: list[str] | None = None,
    hint: str = "fix the path in the annotation or add the image",
) -> pd.DataFrame:
    """The detection table of ``images``: each image found, sized and its boxes checked."""
    notes = list(notes or [])
    if not images:
        raise DataError(f"{origin}: no images found")
    fixes: dict[str, list[str]] = {"zero_area": [], "clipped": []}
    records = []
    seen: set[str] = set()
    for image in images:
        if not image.source.is_file():
            raise DataError(f"{image.where}: image {image.source} does not exist; {hint}")
        if not image.width or not image.height:
            image.width, image.height = _image_size(image.source, image.where)
        boxes = _clean_boxes(image, fixes)
        seen.update(b[4] for b in boxes)
        records.append((image, boxes))
    if classes is None:
        classes = sorted(seen)
    order = {name: k for k, name in enumerate(classes)}
    rows = []
    for image, boxes in records:
        present = sorted({b[4] for b in boxes}, key=order.__getitem__)
        row = {
            "sample_id": image.sample_id,
            "source": str(image.source.resolve()),
            "label": SEPARATOR.join(present) or NO_FINDING,
            "split": image.split,
            "boxes": boxes_json(boxes),
            "width": int(image.width),
            "height": int(image.height),
        }
        row.update(image.extra)
        rows.append(row)
    table = pd.DataFrame.from_records(rows)
    for kind, what, done in (
        ("zero_area", "box(es) of zero area (x1 == x2 or y1 == y2)", "dropped"),
        ("clipped", "box(es) partly outside their image", "clipped to the image"),
    ):
        if fixes[kind]:
            notes.append(f"{len(fixes[kind])} {what} {done}, e.g. {fixes[kind][0]}")
    table.attrs["box_fixes"] = {kind: len(found) for kind, found in fixes.items()}
    if notes:
        table.attrs["notes"] = notes
    return mark_detection(table, classes)


def _split_of(name: str) -> str | None:
    from medsight.data.sources import SPLIT_ALIASES

    return SPLIT_ALIASES.get(name.lower())


# --------------------------------------------------------------------------- COCO


def read_coco(json_path: str | Path, images_root: str | Path | None = None) -> pd.DataFrame:
    """A COCO detection file → a detection table.

    Boxes are the annotations' ``bbox`` (``[x, y, width, height]``); classes the
    ``categories`` in id order (a category without boxes is still one); ``width``/``height``
    the ``images`` entries' (else the image header). Images are looked up under
    ``images_root``, else beside the file, in an ``images/`` folder beside it, or one level up
    (COCO's ``annotations/`` + ``images/`` layout). Crowd annotations (``iscrowd: 1``) are
    dropped with a note: COCO evaluation ignores them.
    """
    path = Path(json_path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise DataError(
            f"{path}: not a COCO detection file: it needs an 'images' list, an 'annotations' "
            "list and a 'categories' list"
        )
    annotations = document.get("annotations")
    if not isinstance(annotations, list) or not annotations:
        raise DataError(
            f"{path}: the COCO file has no annotations, so no boxes; a COCO detection file lists "
            "its boxes under 'annotations' as {'image_id', 'category_id', 'bbox': [x, y, w, h]}"
        )
    categories = sorted(document.get("categories") or [], key=lambda c: c.get("id", 0))
    if not categories:
        raise DataError(f"{path}: the COCO file has no 'categories'; list the box classes there")
    names = {
        c["id"]: _check_class_name(c.get("name", ""), f"{path}: category {c['id']}")
        for c in categories
    }
    base = _coco_root(path, document["images"], images_root)
    images: dict = {}
    for entry in document["images"]:
        file_name = str(entry.get("file_name", ""))
        if not file_name:
            raise DataError(f"{path}: image id {entry.get('id')!r} has no file_name")
        images[entry["id"]] = _Image(
            sample_id=file_name,
            source=base / file_name,
            where=f"{path}: image id {entry['id']}",
            width=int(entry.get("width") or 0) or None,
            height=int(entry.get("height") or 0) or None,
        )
    crowd = 0
    for number, ann in enumerate(annotations):
        where = f"{path}: annotation id {ann.get('id', f'#{number}')}"
        image = images.get(ann.get("image_id"))
        if image is None:
            raise DataError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in names:
            raise DataError(
                f"{where}: category_id {ann.get('category_id')!r} is not a category; the "
                f"categories are {names}"
            )
        if ann.get("iscrowd"):
            crowd += 1
            continue
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise DataError(f"{where}: bbox {bbox!r} is not [x, y, width, height]")
        x, y, w, h = (_number(v) for v in bbox)
        image.boxes.append((x, y, x + w, y + h, names[ann["category_id"]], where))
    notes = [f"{crowd} crowd annotation(s) (iscrowd) dropped"] if crowd else []
    return _build_table(list(images.values()), list(names.values()), str(path), notes)


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _coco_root(path: Path, entries: list, images_root) -> Path:
    if images_root is not None:
        return Path(images_root)
    candidates = [
        path.parent,
        path.parent / "images",
        path.parent.parent,
        path.parent.parent / "images",
    ]
    first = next((str(e.get("file_name", "")) for e in entries if e.get("file_name")), "")
    for candidate in candidates:
        if first and (candidate / first).is_file():
            return candidate
    return path.parent


# --------------------------------------------------------------------------- YOLO


def read_yolo(root: str | Path) -> pd.DataFrame:
    """A YOLO folder → a detection table.

    Layout: ``images/**/<name>.<ext>`` with ``labels/**/<name>.txt`` mirroring it, one line
    ``class cx cy w h`` per box (class index, centre and size normalised to [0, 1] by the image
    size, read from the image header); an image without a label file, or with an empty one, has
    no boxes. Class names come from ``classes.txt`` (one a line) or ``data.yaml``'s ``names``
    (a list or an index → name mapping). Split folders (``images/train``, ``images/val``,
    ``images/test``) give the split.
    """
    root = Path(root)
    classes = _yolo_classes(root)
    image_dir, label_dir = root / "images", root / "labels"
    files = sorted(
        p
        for p in image_dir.rglob("*")
        if p.is_file()
        and imaging.has_extension(p.name, imaging.IMAGE_EXTENSIONS)
        and not any(part.startswith(".") for part in p.relative_to(image_dir).parts)
    )
    images = []
    for file in files:
        rel = PurePosixPath(file.relative_to(image_dir).as_posix())
        split = _split_of(rel.parts[0]) if len(rel.parts) > 1 else None
        label_file = label_dir / rel.with_suffix(".txt")
        image = _Image(sample_id=str(rel), source=file, where=str(label_file), split=split)
        if label_file.is_file():
            image.width, image.height = _image_size(file, str(label_file))
            image.boxes = _yolo_boxes(label_file, classes, image.width, image.height)
        images.append(image)
    return _build_table(images, classes, str(root))


def _yolo_classes(root: Path) -> list[str]:
    listing = root / "classes.txt"
    if listing.is_file():
        names = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines()]
        where = str(listing)
        names = [n for n in names if n]
    else:
        yaml_file = next(
            (root / n for n in ("data.yaml", "data.yml") if (root / n).is_file()), None
        )
        if yaml_file is None:
            raise DataError(
                f"{root}: a YOLO folder names its classes in classes.txt (one name a line, in "
                "class-index order) or data.yaml ('names: [a, b]'); neither is there"
            )
        import yaml

        try:
            document = yaml.safe_load(yaml_file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise DataError(f"{yaml_file}: not readable YAML ({exc})") from None
        raw = document.get("names") if isinstance(document, dict) else None
        if isinstance(raw, dict):
            raw = [raw[k] for k in sorted(raw, key=int)]
        if not isinstance(raw, list):
            raise DataError(f"{yaml_file}: no 'names' list of classes (names: [a, b])")
        names, where = [str(n) for n in raw], str(yaml_file)
    if not names:
        raise DataError(f"{where}: names no class; list the classes in class-index order")
    return [_check_class_name(n, where) for n in names]


def _yolo_boxes(label_file: Path, classes: list[str], width: int, height: int) -> list[tuple]:
    boxes = []
    for number, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label_file}: line {number}"
        if len(fields) != 5:
            raise DataError(
                f"{where}: {len(fields)} fields ({line.strip()!r}); a YOLO box line has 5: "
                "class cx cy w h (polygons and keypoints are not boxes)"
            )
        try:
            index = int(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError:
            raise DataError(
                f"{where}: {line.strip()!r} is not 'class cx cy w h' (an integer class index and "
                "four numbers)"
            ) from None
        if not 0 <= index < len(classes):
            raise DataError(
                f"{where}: class index {index} is beyond the class list ({len(classes)} "
                f"classes, 0..{len(classes) - 1}: {', '.join(classes)})"
            )
        corners = (
            (cx - w / 2) * width,
            (cy - h / 2) * height,
            (cx + w / 2) * width,
            (cy + h / 2) * height,
        )
        boxes.append((*(round(v, 6) for v in corners), classes[index], where))
    return boxes


# --------------------------------------------------------------------------- Pascal VOC


def read_voc(root: str | Path) -> pd.DataFrame:
    """A Pascal VOC folder → a detection table.

    Layout: ``Annotations/<name>.xml`` (``<size>`` gives width/height, each ``<object>`` a
    ``<name>`` and a ``<bndbox>``), the image ``JPEGImages/<filename>``; an XML without an
    object is an image without boxes. ``ImageSets/Main/{train,val,test}.txt`` (one image id a
    line), when there, give the split (``trainval.txt`` is their union and is not read).
    """
    root = Path(root)
    image_dir = root / "JPEGImages"
    splits: dict[str, str] = {}
    sets = root / "ImageSets" / "Main"
    for split in ("train", "val", "test"):
        listing = sets / f"{split}.txt"
        if listing.is_file():
            for line in listing.read_text(encoding="utf-8").split():
                splits.setdefault(line.strip(), split)
    xml_files = sorted((root / "Annotations").glob("*.xml"))
    if not xml_files:
        raise DataError(f"{root}: no Annotations/*.xml; a Pascal VOC folder has one XML per image")
    images = []
    for xml_file in xml_files:
        try:
            document = ElementTree.parse(xml_file).getroot()
        except ElementTree.ParseError as exc:
            raise DataError(f"{xml_file}: not readable XML ({exc})") from None
        filename = (document.findtext("filename") or "").strip()
        source = image_dir / filename if filename else None
        if source is None or not source.is_file():
            # The <filename> may be stale; an image named like the XML is the one meant.
            near = sorted(
                p
                for p in image_dir.glob(f"{xml_file.stem}.*")
                if imaging.has_extension(p.name, imaging.IMAGE_EXTENSIONS)
            )
            source = near[0] if near else (source or image_dir / f"{xml_file.stem}.jpg")
        image = _Image(
            sample_id=source.name,
            source=source,
            where=str(xml_file),
            width=_xml_int(document.findtext("size/width")),
            height=_xml_int(document.findtext("size/height")),
            split=splits.get(xml_file.stem),
        )
        for number, obj in enumerate(document.findall("object"), start=1):
            where = f"{xml_file}: object {number}"
            name = _check_class_name(obj.findtext("name") or "", where)
            box = obj.find("bndbox")
            if box is None:
                raise DataError(f"{where} ({name}) has no <bndbox>")
            corners = [_number(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            image.boxes.append((*corners, name, where))
        images.append(image)
    notes = []
    if splits:
        unlisted = sum(image.split is None for image in images)
        if unlisted:
            notes.append(f"{unlisted} image(s) are in no ImageSets/Main list (no split)")
    return _build_table(images, None, str(root), notes)


def _xml_int(text: str | None) -> int | None:
    try:
        value = int(float(text)) if text else 0
    except ValueError:
        return None
    return value if value > 0 else None


# --------------------------------------------------------------------------- CSV


def box_csv_columns(columns: Iterable[str]) -> tuple[str, str, str, str] | None:
    """The corner columns of a box CSV (``x1..y2`` or ``xmin..ymax``), or None."""
    present = {c.strip().lower(): c.strip() for c in columns}
    for names in CSV_CORNERS:
        if all(n in present for n in names):
            return tuple(present[n] for n in names)  # type: ignore[return-value]
    return None


def read_box_csv(
    csv: str | Path,
    images_root: str | Path | None = None,
    *,
    allow_outside: bool = False,
    path_column: str | None = None,
    label_column: str | None = None,
) -> pd.DataFrame:
    """A CSV with one row per box → a detection table.

    Columns: the image path (``path``, or ``filename``/``file``/``image``), the corners
    (``x1,y1,x2,y2`` or ``xmin,ymin,xmax,ymax`` in any order) and the class (``label``, or
    ``class``/``cell_type``/``category``). A row with empty corners is an image without boxes.
    Optional per-image columns are kept from an image's first row: ``patient_id``, ``split``,
    ``width``/``height`` (else the image header), ``mask`` and any metadata. Paths are relative
    to ``images_root``, else to the CSV's folder, and may not leave it unless
    ``allow_outside``.
    """
    from medsight.data.sources import _canonical_splits, _refuse_outside, _resolve_manifest_path

    path = Path(csv)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None
    frame.columns = [c.strip() for c in frame.columns]
    available = ", ".join(frame.columns) or "none"
    corners = box_csv_columns(frame.columns)
    if corners is None:
        raise DataError(
            f"{path}: no box columns (columns are: {available}); a box CSV has x1,y1,x2,y2 "
            "(or xmin,ymin,xmax,ymax)"
        )
    path_col = _pick(frame, path_column, CSV_PATH_COLUMNS, path, "image path")
    class_col = _pick(frame, label_column, CSV_CLASS_COLUMNS, path, "box class")
    if frame.empty:
        raise DataError(f"{path}: the CSV has a header but no rows")
    base = Path(images_root) if images_root is not None else path.parent
    base = base.resolve()
    raw_paths = frame[path_col].str.strip()
    empty = raw_paths.index[raw_paths == ""]
    if len(empty):
        raise DataError(f"{path}: line {empty[0] + 2} has an empty {path_col}")
    resolved = {raw: _resolve_manifest_path(raw, base) for raw in dict.fromkeys(raw_paths)}
    if not allow_outside:
        keys = list(resolved)
        _refuse_outside(path, path_col, keys, [resolved[k] for k in keys], base)
    if "split" in frame.columns:
        frame["split"] = _canonical_splits(frame["split"], path)
    per_image = [c for c in frame.columns if c not in {path_col, class_col, *corners, "sample_id"}]
    images: dict[str, _Image] = {}
    for position, row in enumerate(frame.itertuples(index=False)):
        values = dict(zip(frame.columns, row))
        raw = raw_paths.iloc[position]
        where = f"{path}: line {position + 2}"
        image = images.get(raw)
        if image is None:
            extra = {c: values[c] for c in per_image}
            split = extra.pop("split", None) or None
            width = _xml_int(extra.pop("width", None))
            height = _xml_int(extra.pop("height", None))
            for column in extra:
                if column == "mask" or column.endswith("_path"):
                    extra[column] = (
                        str(_resolve_manifest_path(extra[column], base)) if extra[column] else None
                    )
            image = images[raw] = _Image(
                sample_id=raw,
                source=resolved[raw],
                where=where,
                split=split,
                width=width,
                height=height,
                extra=extra,
            )
        cells = [str(values[c]).strip() for c in corners]
        if not any(cells):
            continue  # an image without boxes
        if not all(cells):
            raise DataError(
                f"{where}: some corners are empty ("
                f"{', '.join(f'{c}={v!r}' for c, v in zip(corners, cells))}); "
                "give all four, or none for an image without boxes"
            )
        x1, y1, x2, y2 = (_number(v) for v in cells)
        name = _check_class_name(values[class_col], where)
        image.boxes.append((x1, y1, x2, y2, name, where))
    hint = (
        f"paths are read relative to {base} (images_root, else the CSV's folder); fix the path "
        "or move the CSV beside the images"
    )
    table = _build_table(list(images.values()), None, str(path), hint=hint)
    for column in per_image:
        if column in table.columns and column not in ("split", "width", "height"):
            from medsight.data.sources import _maybe_numeric

            table[column] = _maybe_numeric(table[column].fillna("").astype(str))
    table.attrs["manifest"] = str(path.resolve())
    return table


def _pick(
    frame: pd.DataFrame, given: str | None, names: tuple[str, ...], path: Path, role: str
) -> str:
    if given is not None and given in frame.columns:
        return given
    lowered = {c.lower(): c for c in frame.columns}
    found = next((lowered[n] for n in names if n in lowered), None)
    if found is None:
        raise DataError(
            f"{path}: no {role} column (columns are: {', '.join(frame.columns)}); name one "
            f"{' or '.join(repr(n) for n in names[:2])}"
        )
    return found


# --------------------------------------------------------------------------- masks


def _mask_columns(table: pd.DataFrame, column: str | None) -> dict[str, str | None]:
    """Mask column → the class its components get (None: the row's label)."""
    if column is not None:
        return {column: None}
    if "mask" in table.columns:
        return {"mask": None}
    return {c: c[: -len("_mask_path")] for c in table.columns if c.endswith("_mask_path")}


def boxes_from_masks(
    table: pd.DataFrame,
    column: str | None = None,
    class_name: str | None = None,
    min_pixels: int = MIN_COMPONENT_PIXELS,
) -> pd.DataFrame:
    """A table with masks → a detection table: one box per connected component (8-connected,
    ``scipy.ndimage.label``) of each mask, tight on its pixels (``x2``/``y2`` one past the last
    column/row). A row without a mask, or with an empty one, is an image without boxes.

    The mask column is ``column``, else ``mask`` (class = the row's label, or ``class_name``),
    else every ``<class>_mask_path`` column (the multi-label phantoms': class = its prefix).
    Components under ``min_pixels`` pixels are dropped (counted in the notes). Other columns
    are kept; ``width``/``height`` are the mask's.
    """
    from scipy import ndimage

    columns = _mask_columns(table, column)
    if not columns or any(c not in table.columns for c in columns):
        raise no_boxes_error(table.attrs.get("root", "this dataset"))
    structure = np.ones((3, 3), dtype=bool)
    all_boxes, widths, heights, seen, tiny = [], [], [], set(), 0
    for position in range(len(table)):
        row = table.iloc[position]
        boxes, size = [], None
        for mask_column, fixed in columns.items():
            value = row[mask_column]
            if (
                value is None
                or (isinstance(value, float) and math.isnan(value))
                or not str(value).strip()
            ):
                continue
            name = class_name or fixed or row["label"]
            if name is None or (isinstance(name, float) and math.isnan(name)):
                raise DataError(
                    f"{row['sample_id']}: has a mask but no label to name its boxes; pass "
                    "class_name"
                )
            mask = _read_mask(str(value), str(row["sample_id"]))
            size = mask.shape
            labelled, count = ndimage.label(mask, structure=structure)
            sizes = np.bincount(labelled.ravel(), minlength=count + 1)
            for k, found in enumerate(ndimage.find_objects(labelled), start=1):
                if sizes[k] < min_pixels:
                    tiny += 1
                    continue
                rows, cols = found
                boxes.append(
                    [
                        float(cols.start),
                        float(rows.start),
                        float(cols.stop),
                        float(rows.stop),
                        str(name),
                    ]
                )
                seen.add(str(name))
        if size is None and "://" in str(row["source"]):
            height, width = imaging.decode(str(row["source"])).size
        elif size is None:
            width, height = _image_size(Path(row["source"]), str(row["sample_id"]))
        else:
            height, width = size
        all_boxes.append(boxes)
        widths.append(int(width))
        heights.append(int(height))
    known = [c for c in table.attrs.get("classes", []) if c in seen]
    fixed_names = [c for c in columns.values() if c]
    classes = fixed_names or (known + sorted(seen - set(known)))
    if class_name is not None:
        classes = [class_name]
    order = {name: k for k, name in enumerate(classes)}
    out = table.copy()
    out["label"] = [
        SEPARATOR.join(sorted({b[4] for b in boxes}, key=order.__getitem__)) or NO_FINDING
        for boxes in all_boxes
    ]
    out["boxes"] = [boxes_json(b) for b in all_boxes]
    out["width"], out["height"] = widths, heights
    notes = list(table.attrs.get("notes", []))
    notes.append(
        f"boxes derived from masks ({', '.join(columns)}): one per connected region, "
        f"{sum(map(len, all_boxes))} box(es) in {sum(bool(b) for b in all_boxes)} image(s)"
    )
    if tiny:
        notes.append(f"{tiny} mask region(s) under {min_pixels} pixels dropped (not boxes)")
    out.attrs = {k: v for k, v in table.attrs.items() if k not in ("task", "classes")}
    out.attrs["notes"] = notes
    out.attrs["box_fixes"] = {"zero_area": 0, "clipped": 0}
    return mark_detection(out, classes)


def _read_mask(source: str, sample_id: str) -> np.ndarray:
    from PIL import Image

    if "://" not in source and imaging.has_extension(source, imaging.RASTER_EXTENSIONS):
        try:
            with Image.open(source) as image:
                return np.asarray(image.convert("L")) > 0
        except OSError as exc:
            raise DataError(f"{sample_id}: cannot read mask {source} ({exc})") from None
    try:
        return imaging.decode(source).pixels[0] > 0
    except DataError as exc:
        raise DataError(f"{sample_id}: cannot read mask {source} ({exc})") from None
