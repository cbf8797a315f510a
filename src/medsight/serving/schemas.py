"""Typed request and response bodies of the REST API; they also write its OpenAPI (``/docs``)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

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


class Prediction(BaseModel):
    """The model's answer for one image."""

    label: str
    probabilities: dict[str, float]
    confidence: float = Field(description="Probability of the predicted label.")
    threshold_flags: list[ThresholdFlag] = Field(
        description="Operating points of the evaluated run (empty when it was never evaluated)."
    )
    model: ModelRef
    latency_ms: float = Field(description="Decode, preprocess and inference time on the server.")


class Explanation(Prediction):
    """A prediction with the heat map of the pixels that drove it."""

    method: str = Field(examples=["gradcam"])
    layer: str | None = None
    overlay_png: str = Field(description="Heat map over the image, a base64-encoded PNG.")


class InputSpec(BaseModel):
    """What the network takes: every upload is turned into this by the run's preprocessing."""

    channels: int
    height: int
    width: int
    mean: list[float]
    std: list[float]
    window: list[float] | None = None
    formats: list[str] = ["PNG", "JPEG", "TIFF", "BMP", "DICOM"]


class MetricValue(BaseModel):
    """A headline metric on the evaluated split, with its bootstrap 95 % interval."""

    value: float | None
    ci: list[float] | None = None


class ModelInfo(BaseModel):
    """The served model: classes, input, evaluation figures and intended use."""

    model: ModelRef
    backend: str
    classes: list[str]
    positive_class: str = Field(description="The urgent class: it orders the triage worklist.")
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
    model: str
    database: str


class StudyItem(BaseModel):
    """One study on the worklist (no patient identifiers: a pseudonym at most)."""

    id: int
    urgency: float = Field(description="Probability of the urgent (positive) class.")
    label: str
    probabilities: dict[str, float]
    flag: str | None = Field(
        description="Strictest operating point reached (e.g. sensitivity_0.90), or null."
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


class Worklist(BaseModel):
    items: list[StudyItem]


class StudyUpdate(BaseModel):
    """A reviewer's change to a study; the label is kept to audit model–reviewer agreement."""

    status: StudyStatus
    reviewer_label: str | None = Field(default=None, description="One of the model's classes.")


class ErrorBody(BaseModel):
    detail: str
