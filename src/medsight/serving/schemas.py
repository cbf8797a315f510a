"""Typed request and response bodies of the REST API; they also write its OpenAPI (``/docs``).

A prediction's own fields are the run's task's (:attr:`~medsight.tasks.Task.prediction_schema`,
what its ``decode`` returns): :func:`prediction_models` builds the response bodies around them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, create_model

#: The states a study moves through on the worklist.
StudyStatus = Literal["pending", "in_review", "reviewed"]
STATUSES: tuple[str, ...] = ("pending", "in_review", "reviewed")


class ModelRef(BaseModel):
    """Which model answered: architecture, run folder name and a short hash of its weights."""

    name: str = Field(examples=["resnet18"])
    run: str = Field(examples=["phantom-resnet18"])
    version: str = Field(description="First 12 hex digits of SHA-256(model.safetensors).")


class ThresholdFlag(BaseModel):
    """One operating point from evaluation (metrics.json) and whether this image reaches it."""

    class_name: str
    operating_point: str = Field(examples=["sensitivity_0.90"])
    threshold: float
    flagged: bool = Field(description="The class probability is at or above the threshold.")
    sensitivity: float | None = None
    specificity: float | None = None


class Served(BaseModel):
    """What serving adds to the task's decoded prediction of one image."""

    threshold_flags: list[ThresholdFlag] = Field(
        description="Operating points of the evaluated run (empty when it was never evaluated)."
    )
    model: ModelRef
    latency_ms: float = Field(description="Decode, preprocess and inference time on the server.")


class Explained(BaseModel):
    """The heat map of the pixels that drove a prediction."""

    method: str = Field(examples=["gradcam"])
    layer: str | None = None
    overlay_png: str = Field(description="Heat map over the image, a base64-encoded PNG.")
    target: str | None = Field(
        default=None,
        description="The class or finding the map explains (the 'class' query parameter, else "
        "the predicted class; multi-label: the most probable finding above its threshold).",
    )
    sanity_rho: float | None = Field(
        default=None,
        description="Spearman ρ between this method's maps and those with random weights, from "
        "the run's `medsight explain --masks` (None: not checked). Near 0 the map depends on "
        "the model; 0.5 or more fails the check.",
    )
    passes_sanity: bool | None = Field(
        default=None, description="Whether the method passes the randomisation check."
    )
    chosen_by: str | None = Field(
        default=None,
        description="Why this method and layer: 'scored' (the best sanity-passing map of the "
        "run's `medsight explain --masks`) or 'default' (not scored against masks: the default "
        "that localised best among sanity-passing maps in medsight's benchmarks).",
    )


def _fields(model: type[BaseModel]) -> dict[str, Any]:
    return {name: (field.annotation, field) for name, field in model.model_fields.items()}


def prediction_models(decoded: type[BaseModel]) -> tuple[type[BaseModel], type[BaseModel]]:
    """The API's ``Prediction`` and ``Explanation`` bodies around a task's decoded prediction:
    its ``label``, the ``probabilities``, its other fields, then :class:`Served`'s (and for
    ``Explanation`` :class:`Explained`'s)."""
    fields = _fields(decoded)
    probabilities = (
        dict[str, float],
        Field(description="Probability of each class (detection: the top score of its boxes)."),
    )
    ordered = {"label": fields.pop("label"), "probabilities": probabilities, **fields}
    prediction = create_model(
        "Prediction",
        __doc__="The model's answer for one image.",
        **ordered,
        **_fields(Served),
    )
    explanation = create_model(
        "Explanation",
        __doc__="A prediction with the heat map of the pixels that drove it.",
        __base__=prediction,
        **_fields(Explained),
    )
    return prediction, explanation


def __getattr__(name: str):
    # ``Prediction`` and ``Explanation``, the bodies of the default task (classification):
    # ``label``, ``probabilities``, ``confidence``, ``threshold_flags``, ``model``,
    # ``latency_ms``. Built on first use because the task registry imports torch, and the server
    # must answer /health before that import is done.
    if name in ("Prediction", "Explanation"):
        from medsight.tasks import get_task

        prediction, explanation = prediction_models(get_task().prediction_schema)
        globals().update(Prediction=prediction, Explanation=explanation)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class InputSpec(BaseModel):
    """What the network takes: every upload is turned into this by the run's preprocessing."""

    channels: int
    height: int
    width: int
    mean: list[float]
    std: list[float]
    window: list[float] | None = None
    formats: list[str] = ["PNG", "JPEG", "TIFF", "BMP", "DICOM"]
    dims: int = Field(2, description="2: the model takes images; 3: volumes")
    depth: int | None = Field(None, description="A 3-D model's voxels along the third axis")


class MetricValue(BaseModel):
    """A headline metric on the evaluated split, with its bootstrap 95 % interval."""

    value: float | None
    ci: list[float] | None = None


class ModelInfo(BaseModel):
    """The served model: classes, input, evaluation figures and intended use."""

    model: ModelRef
    backend: str
    task: str = Field(
        default="classify",
        description="The run's task: classify, multilabel (findings) or detect (boxes).",
    )
    classes: list[str]
    positive_class: str | None = Field(
        description="The urgent class: it orders the triage worklist (null for a multi-label "
        "run: see urgent)."
    )
    urgent: list[str] = Field(
        default_factory=list,
        description="The classes or findings triage watches: the urgent class; for a "
        "multi-label run the urgent findings (classes.json 'urgent' or serve --urgent; all "
        "findings when none are named).",
    )
    decision_point: str | None = Field(
        default=None,
        description="Multi-label: the evaluated operating point each finding is decided at; "
        "detection: the point each class's boxes are decided at (fp_1: the score at one false "
        "positive per image); thresholds of 0.5 when the run was not evaluated; null for "
        "classification.",
    )
    decision_thresholds: dict[str, float] | None = Field(
        default=None,
        description="Multi-label: the threshold of each finding (above it: the finding is "
        "reported); detection: each class's box score threshold (boxes at or above it are "
        "shown); null for classification (the most probable class is the label).",
    )
    input: InputSpec
    evaluated: bool
    evaluated_split: str | None = None
    n_evaluated: int | None = None
    metrics: dict[str, MetricValue] = Field(
        description="Headline metrics from metrics.json (empty when the run was not evaluated)."
    )
    operating_points: dict[str, dict[str, float | None]] = Field(
        description="Thresholds on the urgent class probability, by operating point."
    )
    intended_use: str
    explanations: bool = Field(description="Whether /v1/explain is available.")
    max_upload_bytes: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    ready: bool
    model: str | None = Field(description="The run folder's name; null while it loads.")
    database: str
    detail: str | None = Field(default=None, description="Why the server is not ready yet.")
    results_pending: int = Field(
        default=0,
        description="Results waiting to be sent back to the PACS (medsight listen / pacs poll "
        "on this worklist); they are retried with backoff and kept across restarts.",
    )


class StudyItem(BaseModel):
    """One study on the worklist (no patient identifiers: a pseudonym at most)."""

    id: int
    urgency: float = Field(
        description="Triage score from the run's task (classify: probability of the urgent "
        "class; multi-label: the highest urgent-finding probability rescaled so that its "
        "threshold is 0.5, so 0.5 or more means that finding reached its threshold; "
        "detection: the top score of a box of the urgent class)."
    )
    urgency_finding: str | None = Field(
        default=None,
        description="The class or finding whose probability set the urgency (null for studies "
        "queued before it was recorded).",
    )
    label: str = Field(description="The label of the task's prediction.")
    probabilities: dict[str, float]
    flag: str | None = Field(
        description="Strictest operating point reached (e.g. sensitivity_0.90), or null."
    )
    boxes: list[dict[str, float | str]] | None = Field(
        default=None,
        description="Detection runs: the boxes at or above threshold when the study was scored "
        "({x1, y1, x2, y2, label, score} in the image's pixels); null for other tasks.",
    )
    status: StudyStatus
    received_at: datetime
    reviewer_label: str | None = None
    reviewed_at: datetime | None = None
    agreement: bool | None = Field(
        default=None, description="Reviewer label equals the model's label (null: no review)."
    )
    format: str
    modality: str | None = None
    patient: str | None = Field(default=None, description="Salted pseudonym of the patient ID.")
    model: ModelRef
    context: dict[str, Any] = Field(
        default_factory=dict,
        description="The clinical context triage weighs: priority (stat, urgent, routine), "
        "age_years, prior_findings (a list), setting (emergency, inpatient, outpatient); only "
        "the fields known.",
        examples=[{"priority": "stat", "age_years": 67, "prior_findings": ["nodule"]}],
    )
    rank: int | None = Field(
        default=None,
        description="Position on the worklist as listed, 1 = read first (the triage policy's "
        "order); null outside a worklist listing.",
    )
    why: str | None = Field(
        default=None,
        description="Why the study sits where it does, reason by reason in the policy's order.",
        examples=[
            "stat referral; risk 0.91 above the 90 %-sensitivity threshold (0.62); "
            "prior finding: nodule; waiting 3 h 10 min"
        ],
    )


class Worklist(BaseModel):
    """Studies in the triage policy's order, most urgent first."""

    items: list[StudyItem]
    policy: list[str] = Field(
        default_factory=list,
        description="The policy's rules in words, most important first; studies no rule tells "
        "apart are in order of arrival.",
    )


class StudyUpdate(BaseModel):
    """A reviewer's change to a study; the label is kept to audit model–reviewer agreement."""

    status: StudyStatus
    reviewer_label: str | None = Field(
        default=None,
        description="One of the model's classes; multi-label: the findings present joined by "
        "'|' (a|b), or 'no finding'.",
    )


class ErrorBody(BaseModel):
    detail: str


class ValidationErrorBody(BaseModel):
    """A request the API cannot use: ``detail`` says what to fix in words, ``errors`` lists the
    problems field by field (pydantic's format)."""

    detail: str
    errors: list[dict[str, Any]] = Field(default_factory=list)


class ReviewConflictBody(BaseModel):
    """A status change the review state machine does not permit from the study's state."""

    detail: str
    allowed: list[str] = Field(description="The states the study may move to from here.")


class InternalErrorBody(BaseModel):
    """An unexpected failure: the details are in the server's log under ``error_id``."""

    detail: str
    error_id: str = Field(description="Quote it to the server's operator; it is in the log line.")
