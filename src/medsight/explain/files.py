"""``medsight explain RUN IMAGE...``: explain image files and write overlays, maps and a log.

For each image: ``<stem>_<method>.png`` (the heat-map over the image, with the predicted class
and its probability written on it), ``<stem>_<method>.npy`` (the raw float32 map at the model's
input size) and one JSON line in ``explanations.jsonl`` (appended, so several methods can share
a folder).

A multi-label run has one map per finding explained, each through that finding's own logit:
the finding named by ``target``, else every finding above its threshold (the most probable one
when none is). Their files carry the finding's name: ``<stem>_<finding>_<method>.png``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsight import runs
from medsight.errors import ConfigError, DataError, MedsightError

__all__ = ["explain_files"]


def _safe_stem(path: Path) -> str:
    stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "image"


def explain_files(
    run: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    method: str = "auto",
    target: str | None = None,
    layer: str | None = None,
    device: str = "cpu",
    note: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Explain each file in ``images`` with the run's model and write the results to ``out``.

    ``target`` is a class name (default: each image's predicted class); for a multi-label run a
    finding (default: one map for each finding above its threshold, or for the most probable
    finding when none is). ``note`` hears, for ``method="auto"``, which method and layer were
    chosen and why (:attr:`Explainer.choice`). Returns the records written to
    ``out/explanations.jsonl``, one per map; a multi-label record also holds the finding's
    ``target_probability``, ``threshold`` and ``above_threshold``. An image the run cannot read
    or preprocess stops with a :class:`~medsight.errors.DataError` naming it, before anything
    is written.

    Example:
        >>> explain_files("runs/phantom", ["scan.png"], "out", method="gradcam")  # doctest: +SKIP
    """
    from medsight.data.imaging import DecodedImage
    from medsight.explain.cam import Explainer
    from medsight.explain.overlay import display_image, overlay, overlay_volume
    from medsight.runs import write_atomic

    if not images:
        raise DataError("no image to explain; give one or more image files after the run")
    from medsight.inference import Predictor

    explainer = Explainer.from_run(run, method=method, layer=layer, device=device)
    if note is not None and explainer.chosen_by != "asked":
        note(explainer.choice)
    # Probabilities exactly as serving reports them (with the run's calibration, if any),
    # from the same network the maps come from.
    predictor = Predictor(explainer.run, explainer.model, explainer.device)
    task, thresholds = predictor.task, predictor.thresholds_
    classes = explainer.classes or []
    if target is not None and target not in classes:
        noun, nouns = ("finding", "findings") if thresholds is not None else ("class", "classes")
        raise ConfigError(
            f"{noun} {target!r} is not one of the run's {nouns}: {', '.join(classes)}"
        )
    prep = explainer.preprocess
    volumes = predictor.dims == 3  # a 3-D run, or a 2.5-D one (slices of a volume)
    slab = getattr(prep, "slices", None)
    decoded, inputs = [], []
    for image in images:
        path = Path(image)
        if not (path.is_file() or (volumes and path.is_dir())):
            raise DataError(f"{path}: no such image file; check the path")
        try:
            picture = predictor.read(path)
            x = prep(picture)
        except MedsightError as exc:
            what = "a NIfTI volume or a DICOM series folder" if volumes else (
                "a PNG, JPEG, DICOM or NIfTI image"
            )  # fmt: skip
            raise DataError(
                f"{path} cannot be explained: the run cannot read or preprocess it ({exc}); "
                f"give {what}"
            ) from None
        if volumes:  # shown on the map's own grid: the preprocessed volume in [0, 1]
            picture = prep.prepare(picture)
            if slab is not None:  # 2.5-D: the middle slice of the slab the map covers
                picture = DecodedImage(picture[slab // 2][None], str(path))
        decoded.append(picture)
        inputs.append(x[None].astype(np.float32))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Outputs with thresholds of their own (findings) get a map each: the names say whose.
    per_output = thresholds is not None
    records, used = [], set()
    for path, picture, x in zip(map(Path, images), decoded, inputs):
        probs = predictor.predict_array(x)[0]
        prediction = predictor.decode(probs[None])[0]
        targets = (
            [target] if target is not None else task.explain_targets(probs, classes, thresholds)
        )
        stem = _safe_stem(path)
        for explained in targets:
            k = classes.index(explained)
            heatmap = explainer.explain(x, target=explained)
            tag = f"_{_safe_stem(Path(explained))}" if per_output else ""
            name, n = f"{stem}{tag}_{explainer.method}", 1
            while name in used:  # two files with one stem (different folders) keep both results
                n += 1
                name = f"{stem}-{n}{tag}_{explainer.method}"
            used.add(name)
            if per_output:
                label = f"{prediction['label']} | map: {explained} {probs[k]:.2f}"
            else:
                label = f"{prediction['label']} {prediction['confidence']:.2f}"
                if explained != prediction["label"]:
                    label += f" | map: {explained}"
            if volumes and slab is None:
                picture_out = overlay_volume(picture, heatmap, label=label)
            else:
                picture_out = overlay(display_image(picture.pixels), heatmap, label=label)
            png, npy = out / f"{name}.png", out / f"{name}.npy"
            write_atomic(png, lambda tmp, im=picture_out: im.save(tmp, format="PNG"))
            write_atomic(npy, lambda tmp, m=heatmap: np.save(tmp.open("wb"), m))
            record = {
                "image": str(path),
                "predicted": prediction["label"],
                "probability": float(prediction["confidence"]),
                "probabilities": {c: float(p) for c, p in zip(classes, probs)},
                "target": explained,
                "method": explainer.method,
                "layer": explainer.layer,
                "chosen_by": explainer.chosen_by,
                "overlay": png.name,
                "map": npy.name,
            }
            if per_output:
                record.update(
                    target_probability=float(probs[k]),
                    threshold=float(thresholds[k]),
                    above_threshold=bool(probs[k] >= thresholds[k]),
                )
            records.append(record)
    explainer.close()
    with (out / runs.EXPLANATIONS).open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return records
