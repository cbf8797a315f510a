"""How a study joins the worklist, whoever brings it (an upload, the DICOM node, a DICOMweb
poll): scored, de-identified when it is DICOM, stored and queued with its clinical context.

>>> study = queue_study(model, store, open("scan.dcm", "rb").read(),
...                     context={"priority": "stat"})                  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

from medsight.data.privacy import DeidentificationError, deidentify_dicom
from medsight.serving.service import BadImage, ModelService
from medsight.serving.worklist import Study, WorklistStore

log = logging.getLogger("medsight.serving")


def rounded(value):
    """Floats to 6 decimals, inside lists and dicts too (a multi-label run's findings)."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def raster_kind(data: bytes) -> tuple[str, str]:
    """(format, extension) of a raster image by its first bytes."""
    head = data[:8]
    if head.startswith(b"\x89PNG"):
        return "png", ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg", ".jpg"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff", ".tif"
    return "bmp", ".bmp"


def queue_study(
    model: ModelService,
    store: WorklistStore,
    data: bytes,
    *,
    context: dict[str, Any] | None = None,
    study_uid: str | None = None,
) -> Study:
    """Score ``data`` (one image file's bytes) and queue it as a pending study.

    DICOM is de-identified before anything is stored (a file that cannot be is refused with
    :class:`BadImage`). ``context`` holds the clinical context triage weighs (priority, age,
    prior findings, setting; see ``medsight.serving.triage``); ``study_uid`` the source
    study's StudyInstanceUID, kept only to route results back to the PACS.
    """
    scored = model.score(data)
    fmt = scored.image.meta.get("format", "raster")
    if fmt in ("nifti", "dicom-series", "npz"):
        # A series zip would be stored with its headers: the worklist keeps 2-D images only.
        raise BadImage(
            "the worklist queues 2-D images; score volumes with POST /v1/predict (nothing of "
            "this upload was stored)"
        )
    if fmt == "dicom":
        try:
            data, meta = deidentify_dicom(data)
        except DeidentificationError as exc:
            raise BadImage(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - decodable yet not re-writable: refuse it
            raise BadImage(
                f"the DICOM file cannot be de-identified: {type(exc).__name__}"
            ) from None
        extension = ".dcm"
    else:
        fmt, extension = raster_kind(data)
        meta = {}
    probs = scored.probabilities
    urgency, driver = model.triage(probs)
    study = store.add(
        data=data,
        extension=extension,
        format=fmt,
        meta=meta,
        label=model.label(probs),
        probabilities=model.probabilities(probs),
        urgency=round(urgency, 6),
        urgency_finding=driver,
        flag=model.flag(probs, driver),
        boxes=rounded(model.prediction(probs, scored.image.size).get("boxes")),
        model=model.model_ref.model_dump(),
        context=context,
        study_uid=study_uid,
    )
    log.info(
        "study %d queued urgency=%.3f by=%s flag=%s",
        study.id,
        study.urgency,
        study.urgency_finding,
        study.flag,
    )
    return study
