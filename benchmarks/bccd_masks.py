"""A real set with weak lesion masks from the BCCD blood smears, and its localisation table.

``build`` cuts square crops from the 640 × 480 smears (Pascal VOC boxes for RBC, WBC and
platelets) into a two-class set: ``wbc`` when a white-cell box lies wholly inside the crop,
``no_wbc`` when no white-cell box touches it (crops a box only cuts are skipped). The mask of a
``wbc`` crop is its filled white-cell box(es), a weak lesion mask; ``no_wbc`` crops have none.
``--target platelets`` makes the harder variant: ``platelets`` / ``no_platelets`` crops, none
touching a white cell, with the much smaller platelet boxes as masks. ``patient_id`` is the
source smear and ``split`` its official VOC split, so crops of one smear never cross splits.

``score`` scores a run's maps against those masks: every method the model supports on its
default layer, and each CAM method also on the stage before the last and on all stages fused
(the layers ``score_localisation(..., search_layers=True)`` tries), one call per layer so each
row has its box IoU, and prints one markdown table.

    python benchmarks/bccd_masks.py build --bccd ../shared/data/bccd/BCCD --out /tmp/bccd/wbc
    medsight train --data /tmp/bccd/wbc/manifest.csv --out /tmp/bccd/run
    python benchmarks/bccd_masks.py score /tmp/bccd/run --limit 100
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image

#: The box name in the VOC files for each target, and what the two classes are called.
TARGETS = {"wbc": ("WBC", "wbc", "no_wbc"), "platelets": ("Platelets", "platelets", "no_platelets")}
#: Default crop side in pixels of the 640 × 480 smear, per target: a white cell's box is about
#: 200 × 180 px (median), so only about a third of the smears hold one inside 192 px.
SIZES = {"wbc": 224, "platelets": 160}
STEP = 8  # crop positions are tried on this grid
SPLITS = ("train", "val", "test")
CAM_FAMILY = ("gradcam", "gradcam++", "scorecam", "eigencam", "layercam")

Box = tuple[int, int, int, int]  # xmin, ymin, xmax, ymax (pixel corners)


def read_voc(path: Path) -> list[tuple[str, Box]]:
    """``[(name, box)]`` of one VOC annotation file; degenerate boxes (no area) are dropped."""
    boxes = []
    for obj in ET.parse(path).getroot().iter("object"):
        b = obj.find("bndbox")
        box = tuple(int(float(b.find(k).text)) for k in ("xmin", "ymin", "xmax", "ymax"))
        if box[2] > box[0] and box[3] > box[1]:
            boxes.append((obj.find("name").text.strip(), box))
    return boxes


def _inside(box: Box, x: int, y: int, size: int) -> bool:
    return box[0] >= x and box[1] >= y and box[2] <= x + size and box[3] <= y + size


def _touches(box: Box, x: int, y: int, size: int) -> bool:
    return box[0] < x + size and box[2] > x and box[1] < y + size and box[3] > y


def crop_positions(
    boxes: list[tuple[str, Box]], target: str, width: int, height: int, size: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The crop corners on the grid that make a positive (a target box wholly inside, none cut)
    and a negative (no target box touching); for platelets neither may touch a white cell."""
    name = TARGETS[target][0]
    targets = [b for n, b in boxes if n == name]
    avoid = [b for n, b in boxes if n == "WBC"] if target == "platelets" else []
    positive, negative = [], []
    for y in range(0, height - size + 1, STEP):
        for x in range(0, width - size + 1, STEP):
            if any(_touches(b, x, y, size) for b in avoid):
                continue
            touching = [b for b in targets if _touches(b, x, y, size)]
            if not touching:
                negative.append((x, y))
            elif all(_inside(b, x, y, size) for b in touching):
                positive.append((x, y))
    return positive, negative


def _spread(rng: np.random.Generator, positions: list, k: int, apart: int) -> list:
    """Up to ``k`` positions at random, each at least ``apart`` px (Chebyshev) from the others."""
    chosen = []
    for i in rng.permutation(len(positions)):
        x, y = positions[i]
        if all(max(abs(x - a), abs(y - b)) >= apart for a, b in chosen):
            chosen.append((x, y))
        if len(chosen) == k:
            break
    return chosen


def build(
    bccd: Path, out: Path, target: str = "wbc", size: int | None = None, per_image: int = 2
) -> Path:
    """Write the crops, their masks and ``manifest.csv`` (``path,label,mask,patient_id,split``,
    paths relative to ``out``) and return the manifest's path. Classes are balanced per split
    by dropping negatives at random (seed 0)."""
    size = size or SIZES[target]
    _, positive_name, negative_name = TARGETS[target]
    split_of = {}
    for split in SPLITS:
        for stem in (bccd / "ImageSets" / "Main" / f"{split}.txt").read_text().split():
            split_of[stem] = split
    rng = np.random.default_rng(0)
    candidates = {split: {positive_name: [], negative_name: []} for split in SPLITS}
    for xml in sorted((bccd / "Annotations").glob("*.xml")):
        if xml.stem not in split_of:
            continue
        boxes = read_voc(xml)
        with Image.open(bccd / "JPEGImages" / f"{xml.stem}.jpg") as image:
            width, height = image.size
        positive, negative = crop_positions(boxes, target, width, height, size)
        apart = size // 4
        for label, positions in ((positive_name, positive), (negative_name, negative)):
            for x, y in _spread(rng, positions, per_image, apart):
                candidates[split_of[xml.stem]][label].append((xml.stem, x, y))
    for label in (positive_name, negative_name):
        (out / label).mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    rows = []
    name = TARGETS[target][0]
    for split in SPLITS:
        pos, neg = candidates[split][positive_name], candidates[split][negative_name]
        n = min(len(pos), len(neg))
        keep = {
            positive_name: [pos[i] for i in sorted(rng.permutation(len(pos))[:n])],
            negative_name: [neg[i] for i in sorted(rng.permutation(len(neg))[:n])],
        }
        for label, crops in keep.items():
            for stem, x, y in crops:
                file = f"{label}/{stem}_{x:03d}_{y:03d}.png"
                with Image.open(bccd / "JPEGImages" / f"{stem}.jpg") as image:
                    image.convert("RGB").crop((x, y, x + size, y + size)).save(out / file)
                mask_file = ""
                if label == positive_name:
                    mask = np.zeros((size, size), np.uint8)
                    for n_, b in read_voc(bccd / "Annotations" / f"{stem}.xml"):
                        if n_ == name and _inside(b, x, y, size):
                            mask[b[1] - y : b[3] - y, b[0] - x : b[2] - x] = 255
                    mask_file = f"masks/{stem}_{x:03d}_{y:03d}.png"
                    Image.fromarray(mask).save(out / mask_file)
                rows.append((file, label, mask_file, stem, split))
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("path", "label", "mask", "patient_id", "split"))
        writer.writerows(rows)
    return manifest


def describe(manifest: Path) -> str:
    """Crops per class and split, smears per split, and what maps that know nothing score on
    the test split's masks: a uniform map's energy in mask (the mask fraction), the pointing game
    of a map peaking at the centre, and the box IoU of a box around the whole crop."""
    import pandas as pd

    from medsight.explain.localisation import box_iou, mask_box

    table = pd.read_csv(manifest, keep_default_na=False)
    counts = table.groupby(["split", "label"]).size().unstack(fill_value=0)
    smears = table.groupby("split")["patient_id"].nunique()
    masks = [
        np.asarray(Image.open(manifest.parent / m)) > 0
        for m in table.loc[table["split"] == "test", "mask"]
        if m
    ]
    fraction = np.mean([m.mean() for m in masks])
    centre = np.mean([m[m.shape[0] // 2, m.shape[1] // 2] for m in masks])
    whole = np.mean([box_iou((0, 0, m.shape[1], m.shape[0]), mask_box(m)) for m in masks])
    return (
        f"{counts.to_string()}\n\nsmears per split: {smears.to_dict()}\n"
        f"test masks ({len(masks)}), what a map that knows nothing scores: energy in mask "
        f"{fraction:.2f} (uniform map), pointing game {centre:.2f} (peak at the centre), "
        f"box IoU {whole:.2f} (box around the whole crop)"
    )


def _fmt(entry: dict | None, digits: int = 2) -> str:
    from medsight.stats import format_value_ci

    return format_value_ci(entry, digits)  # "0.85 (0.78–0.92)", "—" when missing


def _layers(run: Path) -> list[str]:
    """The layers ``search_layers`` tries beside the default: the stage before the last and
    every stage after the stem fused (empty when the model has fewer than two stages). A
    transfer model names its stages by block ranges (``features.2-3``), which ``search_layers``
    does not find as modules; here each such stage is its last block (``features.3``)."""
    from medsight.runs import Run

    model = Run.load(run).load_model()
    modules = dict(model.named_modules())
    stages = []
    for name in getattr(model, "stage_names", lambda: [])():
        if name == "stem":
            continue
        last = re.sub(r"(\d+)-(\d+)$", r"\2", name)
        for candidate in (f"backbone.{name}", f"backbone.{last}"):
            if candidate in modules:
                stages.append(candidate)
                break
    return [stages[-2], ",".join(stages)] if len(stages) >= 2 else []


def score(run: Path, limit: int, faithfulness: int, methods: list[str] | None) -> list[dict]:
    """One row per method · layer: localisation with CIs, sanity ρ, seconds per image."""
    from medsight.explain.faithfulness import passes_sanity
    from medsight.explain.localisation import score_localisation

    first = score_localisation(
        run, methods=methods, limit=limit, faithfulness=faithfulness, write=False
    )
    passes = [(None, first)]
    cams = [m for m in first["methods"] if m in CAM_FAMILY]
    for layer in _layers(run) if cams else []:
        passes.append(
            (
                layer,
                score_localisation(
                    run, methods=cams, limit=limit, layer=layer, faithfulness=faithfulness,
                    write=False,
                ),
            )
        )  # fmt: skip
    rows = []
    for _, result in passes:
        for method, entry in result["methods"].items():
            checked = (result.get("sanity") or {}).get(method)
            rows.append(
                {
                    "method": method,
                    "layer": entry["layer"],
                    "pointing_game": entry["pointing_game"],
                    "box_iou": entry["box_iou"],
                    "energy_in_mask": entry["energy_in_mask"],
                    "rho": (checked or {}).get("spearman"),
                    "passes": passes_sanity(checked) is not False,
                    "seconds_per_image": entry["seconds_per_image"],
                    "n_images": result["n_images"],
                }
            )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="write the crops, masks and manifest.csv")
    make.add_argument("--bccd", type=Path, default=Path("../shared/data/bccd/BCCD"))
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--target", choices=sorted(TARGETS), default="wbc")
    make.add_argument("--size", type=int, default=None, help="crop side in px (default per target)")
    make.add_argument("--per-image", type=int, default=2, help="crops per class and smear")
    rate = commands.add_parser("score", help="score a run's maps against the masks")
    rate.add_argument("run", type=Path)
    rate.add_argument("--limit", type=int, default=100, help="masked test crops to score")
    rate.add_argument("--faithfulness", type=int, default=16, help="images for the sanity check")
    rate.add_argument("--methods", default="", help="comma-separated (default: all supported)")
    rate.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: busy cores)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.command == "build":
        started = time.perf_counter()
        manifest = build(args.bccd, args.out, args.target, args.size, args.per_image)
        print(f"{manifest} in {time.perf_counter() - started:.0f} s\n{describe(manifest)}")
        return
    warnings.simplefilter("ignore", UserWarning)
    started = time.perf_counter()
    rows = score(args.run, args.limit, args.faithfulness, [m for m in args.methods.split(",") if m])
    print(
        f"run {args.run}: {rows[0]['n_images']} masked test crops, {args.faithfulness} for the "
        f"sanity check; {time.perf_counter() - started:.0f} s in all, {args.threads} thread(s)\n"
    )
    print("| method · layer | pointing game | box IoU | energy in mask | sanity ρ | s / image |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        mark = "" if row["passes"] else " ✗"
        print(
            f"| {row['method']} · {row['layer']} | {_fmt(row['pointing_game'])} "
            f"| {_fmt(row['box_iou'])} | {_fmt(row['energy_in_mask'])} "
            f"| {_fmt(row['rho'], 3)}{mark} | {row['seconds_per_image']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
