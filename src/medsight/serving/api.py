"""The REST API, web page and triage worklist of a trained run (``medsight serve RUN``).

``create_app(settings)`` builds a FastAPI application; the loaded model
(:class:`~medsight.serving.service.ModelService`) and the worklist
(:class:`~medsight.serving.worklist.WorklistStore`) are shared through dependency injection,
so tests swap them with ``app.dependency_overrides``. Every ``/v1`` route needs the bearer
token when one is configured, and one is required whenever the server listens beyond
loopback (at least 16 characters). Without a token, state-changing requests (POST, PATCH,
DELETE) must carry ``X-Requested-With: medsight``, which the page sends and a cross-site form
cannot. Uploads are judged by their content, limited in size and in how many are decoded at
once (:class:`~medsight.serving.service.DecodeSlots`: 503 with ``Retry-After`` beyond it), and
never cause a 500; anything unexpected is a logged 500 with an error id
(:mod:`medsight.serving.security`, which also sets the security headers and trusted hosts).
The worklist is listed in the order of a triage policy (:mod:`medsight.serving.triage`,
``ServeSettings.policy``), each study with its rank and the reasons for its place; an upload
may carry the clinical context the policy weighs as form fields beside the image.

Per-request budget: the body is at most ``max_upload_bytes`` (413 above, counted while it
streams in); the decoded image at most ``max_pixels`` (400 above); its decoding and scoring
hold one decode slot, budgeted ``BYTES_PER_PIXEL × max_pixels`` bytes of memory (512 MiB at the
server's default of 4096² pixels, ``SERVE_MAX_PIXELS``; about 2 s for the largest image on one
core); a request waits at most
``decode_wait_s`` for a slot. :func:`serve` listens before the model is loaded: ``/health``
answers at once, ``/ready`` and the model's routes answer 503 until it is.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    File,
    Form,
    HTTPException,
    Query,
    Request,
    Response,
    UploadFile,
)
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, field_validator
from starlette.middleware.trustedhost import TrustedHostMiddleware

from medsight import __version__
from medsight.errors import ConfigError, DataError
from medsight.serving import schemas
from medsight.serving.intake import queue_study, rounded
from medsight.serving.security import (
    SAFE_METHODS,
    SAME_ORIGIN_HEADER,
    SAME_ORIGIN_VALUE,
    CatchAll,
    SecurityHeaders,
    TrackedSend,
    allowed_hosts,
    is_loopback,
    same_origin_proven,
    script_hash_csp,
    token_problem,
)
from medsight.serving.service import (
    SERVE_MAX_PIXELS,
    BadImage,
    Busy,
    DecodeSlots,
    ExplanationsUnavailable,
    ModelService,
    UnknownTarget,
    UnsupportedImage,
    decode_slots_for,
)
from medsight.serving.triage import (
    CONTEXT_FIELDS,
    Policy,
    check_context,
    check_points,
    load_policy,
    order_studies,
)
from medsight.serving.worklist import ReviewStateError, Study, WorklistStore, utc

if TYPE_CHECKING:  # torch comes with the task: imported once the server listens
    from medsight.tasks import Task

__all__ = ["ServeSettings", "check_exposure", "create_app", "is_loopback", "serve"]

TOKEN_ENV = "MEDSIGHT_TOKEN"
WEB_DIR = Path(__file__).parent / "web"
DEFAULT_MAX_UPLOAD = 50 * 1024 * 1024

log = logging.getLogger("medsight.serving")


class ServeSettings(BaseModel):
    """Everything ``medsight serve`` is configured with; validated once, here."""

    run: Path
    backend: Literal["torch", "onnx"] = "torch"
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps (medsight.devices)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    db: str | None = Field(None, description="SQLAlchemy URL (default: SQLite in data_dir).")
    data_dir: Path | None = Field(None, description="Uploads and the SQLite file (RUN/worklist).")
    token: str | None = None
    max_upload_bytes: int = Field(DEFAULT_MAX_UPLOAD, gt=0)
    max_pixels: int = Field(SERVE_MAX_PIXELS, gt=0)
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the server answers besides those of its bind address "
        "(--allowed-host, e.g. behind a reverse proxy).",
    )
    decode_slots: int | None = Field(
        None, ge=1, description="Uploads decoded at once (default: from the available memory)."
    )
    decode_wait_s: float = Field(
        5.0, ge=0, description="How long a request waits for a decode slot before its 503."
    )
    urgent: list[str] | None = Field(
        None,
        description="The findings that order a multi-label run's worklist (--urgent a,b; "
        "default: classes.json 'urgent', else every finding); for a classification run, its "
        "one urgent class (default: classes.json 'positive').",
    )
    point: str = Field(
        "youden",
        description="Multi-label: the evaluated operating point (metrics.json thresholds) each "
        "finding is decided at (--point; 0.5 when the run was not evaluated).",
    )
    policy: Path | None = Field(
        None,
        description="The triage policy (YAML) the worklist is ordered by (--policy; default: "
        "medsight/serving/policies/default.yaml).",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            name = host.strip()
            if not name or "/" in name or "*" in name[1:] or (name[0] == "*" and name[:2] != "*."):
                raise ValueError(
                    f"--allowed-host {host!r} is not a host name; give a name or address as "
                    "browsers send it in Host (scanner.example.org, 10.0.0.5, *.example.org)"
                )
        return [h.strip() for h in value]

    @field_validator("token")
    @classmethod
    def _strip_token(cls, value: str | None) -> str | None:
        # A token pasted with a newline or spaces must not become part of the secret, and an
        # all-blank one is no token at all.
        return (value or "").strip() or None

    def resolved_data_dir(self) -> Path:
        return self.data_dir or self.run / "worklist"

    def resolved_db(self) -> str:
        return self.db or f"sqlite:///{self.resolved_data_dir().resolve() / 'worklist.db'}"

    def resolved_token(self) -> str | None:
        return self.token or (os.environ.get(TOKEN_ENV) or "").strip() or None

    def resolved_allowed_hosts(self) -> list[str]:
        return allowed_hosts(self.host, self.allowed_hosts)


def check_exposure(settings: ServeSettings) -> None:
    """Refuse to listen beyond loopback without a strong token: patient images would be open
    to all."""
    problem = token_problem(settings.resolved_token(), settings.host)
    if problem:
        raise ConfigError(
            f"--host {settings.host} is reachable from other machines, so {problem}; pass "
            f"--token TOKEN or set {TOKEN_ENV} (or bind to 127.0.0.1)"
        )


# --------------------------------------------------------------------------- dependencies


def get_model(request: Request) -> ModelService:
    """The loaded model, shared by every request."""
    return request.app.state.model


def get_worklist(request: Request) -> WorklistStore:
    """The worklist store, shared by every request."""
    return request.app.state.worklist


def get_policy(request: Request) -> Policy:
    """The triage policy the worklist is ordered by."""
    return request.app.state.policy


_bearer = HTTPBearer(auto_error=False, description="Needed when the server has a token.")


def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 unless the request carries the configured bearer token; without a token, 403 for a
    state-changing request that does not prove it comes from this origin's page."""
    expected = request.app.state.token
    if expected is None:
        if request.method not in SAFE_METHODS and not same_origin_proven(request.headers):
            raise HTTPException(
                403,
                f"{request.method} needs the header '{SAME_ORIGIN_HEADER}: {SAME_ORIGIN_VALUE}' "
                "when the server has no token (it proves the request is not a cross-site form)",
            )
        return
    given = credentials.credentials if credentials else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(
            401,
            "missing or wrong bearer token; send the header 'Authorization: Bearer TOKEN'",
            headers={"WWW-Authenticate": "Bearer"},
        )


Model = Annotated[ModelService, Depends(get_model)]
Store = Annotated[WorklistStore, Depends(get_worklist)]
TriagePolicy = Annotated[Policy, Depends(get_policy)]
Upload = Annotated[UploadFile, File(description="PNG, JPEG, TIFF, BMP or DICOM image.")]

_ERRORS = {
    400: {"model": schemas.ErrorBody, "description": "Corrupt or unusable image"},
    401: {"model": schemas.ErrorBody, "description": "Missing or wrong bearer token"},
    403: {
        "model": schemas.ErrorBody,
        "description": f"No token configured and no '{SAME_ORIGIN_HEADER}: {SAME_ORIGIN_VALUE}' "
        "header on a state-changing request",
    },
    413: {"model": schemas.ErrorBody, "description": "Upload above the size limit"},
    415: {"model": schemas.ErrorBody, "description": "Not an image format medsight reads"},
    422: {"model": schemas.ValidationErrorBody, "description": "A parameter or field is invalid"},
    500: {"model": schemas.InternalErrorBody, "description": "Unexpected; logged under error_id"},
}
_BUSY = {503: {"model": schemas.ErrorBody, "description": "Every decode slot is taken"}}

_NO_STUDY = {404: {"model": schemas.ErrorBody, "description": "No study with this id"}}

#: Where a queued study leads (OpenAPI links: clients and Schemathesis follow them).
_STUDY_LINKS = {
    name: {"operationId": operation, "parameters": {"study_id": "$response.body#/id"}}
    for name, operation in (
        ("GetStudy", "get_study"),
        ("GetStudyImage", "study_image"),
        ("ReviewStudy", "update_study"),
    )
}

#: A study's id: SQLite's (and SQL's BIGINT) integer range; larger ones are 422, not overflow.
StudyId = Annotated[int, PathParam(ge=1, le=2**63 - 1, description="The study's id.")]


# --------------------------------------------------------------------------- routes

v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], responses=_ERRORS)


async def _read(file: Upload) -> bytes:
    """The uploaded bytes; the client's file name is deliberately ignored."""
    return await file.read()


def _prediction(model: ModelService, scored) -> dict:
    """The task's decoded prediction (numbers to 6 decimals) with what serving adds."""
    probs = scored.probabilities
    decoded = rounded(model.prediction(probs, scored.image.size))
    return {
        **decoded,
        "probabilities": model.probabilities(probs),
        "threshold_flags": model.threshold_flags(probs),
        "model": model.model_ref,
        "latency_ms": round(scored.seconds * 1000, 2),
    }


def predict(model: Model, data: Annotated[bytes, Depends(_read)]) -> dict:
    """Class probabilities for one uploaded image (format judged from the content)."""
    with model.slots.hold():
        scored = model.score(data)
    result = _prediction(model, scored)
    log.info("predict label=%s latency_ms=%.1f", result["label"], result["latency_ms"])
    return result


ExplainTarget = Annotated[
    str | None,
    Query(
        alias="class",
        description="The class or finding to explain (default: the predicted class; for a "
        "multi-label run the most probable finding above its threshold, else the most "
        "probable finding). Each finding has its own map.",
    ),
]


def explain(
    model: Model, data: Annotated[bytes, Depends(_read)], target: ExplainTarget = None
) -> dict:
    """The prediction plus a heat map of the regions that drove it, over the image (PNG)."""
    start = time.perf_counter()
    model.check_target(target)  # 422 before any decoding
    with model.slots.hold():
        scored = model.score(data)
        method, layer, png, explained = model.explain(scored, target)
    scored.seconds = time.perf_counter() - start
    log.info("explain method=%s latency_ms=%.1f", method, scored.seconds * 1000)
    return {
        **_prediction(model, scored),
        "method": method,
        "layer": layer,
        "overlay_png": png,
        "target": explained,
        **model.sanity(method),
    }


def _prediction_routes(task: Task) -> APIRouter:
    """``/v1/predict`` and ``/v1/explain``, whose bodies follow the task's prediction schema."""
    prediction, explanation = schemas.prediction_models(task.prediction_schema)
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], responses=_ERRORS)
    router.add_api_route(
        "/predict",
        predict,
        methods=["POST"],
        response_model=prediction,
        summary="Classify one image",
        responses=_BUSY,
    )
    router.add_api_route(
        "/explain",
        explain,
        methods=["POST"],
        response_model=explanation,
        summary="Classify one image and show why",
        responses={
            501: {"model": schemas.ErrorBody, "description": "Explanations unavailable"},
            **_BUSY,
        },
    )
    return router


@v1.get("/model", response_model=schemas.ModelInfo, summary="The served model")
def model_info(model: Model, request: Request) -> dict:
    """Classes, input, headline metrics with 95 % CIs, operating points and intended use."""
    from medsight.evaluation.modelcard import intended_use

    prep = model.predictor.preprocess
    metrics = model.metrics or {}
    headline = {}
    names = ("auroc", "accuracy", "balanced_accuracy", "average_precision", "f1_macro")
    boxes = ("map50", "map", "sensitivity_at_1fp", "froc_score", "median_iou")
    for name in (*names, "auroc_macro", "average_precision_macro", *boxes):
        entry = metrics.get(name)
        if isinstance(entry, dict) and "value" in entry:
            headline[name] = {"value": entry.get("value"), "ci": entry.get("ci")}
    points = model.operating_points().get(model.positive, {})
    thresholds = model.thresholds
    return {
        "model": model.model_ref,
        "backend": model.backend,
        "task": model.task.name,
        "classes": model.classes,
        "positive_class": model.positive,
        "urgent": model.urgent,
        "decision_point": model.decision_point(),
        "decision_thresholds": (
            None
            if thresholds is None
            else {name: float(t) for name, t in zip(model.classes, thresholds)}
        ),
        "input": {
            "channels": prep.channels,
            "height": prep.size[0],
            "width": prep.size[1],
            "mean": list(prep.mean),
            "std": list(prep.std),
            "window": list(prep.window) if prep.window else None,
            **(
                {
                    "dims": 3,
                    "depth": prep.size[2] if len(prep.size) > 2 else None,
                    "formats": ["NIfTI (.nii, .nii.gz)", "DICOM series (.zip)"],
                }
                if model.predictor.dims == 3
                else {}
            ),
        },
        "evaluated": bool(metrics),
        "evaluated_split": metrics.get("split"),
        "n_evaluated": metrics.get("n"),
        "metrics": headline,
        "operating_points": {
            k: {"threshold": v["threshold"], **_ratios(v)} for k, v in points.items()
        },
        "intended_use": intended_use(model.classes),
        "explanations": model.explanations_available(),
        "max_upload_bytes": request.app.state.max_upload_bytes,
    }


def _ratios(point: dict) -> dict:
    return {k: point.get(k) for k in ("sensitivity", "specificity", "ppv", "npv")}


def _item(study: Study) -> dict:
    return {
        "id": study.id,
        "urgency": study.urgency,
        "urgency_finding": study.urgency_finding,
        "label": study.label,
        "probabilities": study.probabilities,
        "flag": study.flag,
        "boxes": study.boxes,
        "status": study.status,
        "received_at": utc(study.received_at),
        "reviewer_label": study.reviewer_label,
        "reviewed_at": utc(study.reviewed_at),
        "agreement": None if study.reviewer_label is None else study.reviewer_label == study.label,
        "format": study.format,
        "modality": study.modality,
        "patient": study.patient,
        "model": {"name": study.model_name, "run": study.model_run, "version": study.model_version},
        "context": study.context or {},
    }


def watched_thresholds(model: ModelService) -> dict[str, dict[str, float]]:
    """``{output: {operating point: threshold}}`` of the outputs triage watches (the urgent
    class or findings), as the policy's ``risk_above`` rules compare them."""
    points = model.operating_points()
    return {
        name: {point: float(v["threshold"]) for point, v in points[name].items()}
        for name in model.urgent
        if name in points
    }


def _ranked(
    studies: list[Study], model: ModelService, policy: Policy, ranked: bool = True
) -> list[dict]:
    """Studies as API items in ``policy`` order, each with its ``why`` (and ``rank``)."""
    ordered = order_studies(studies, policy, watched_thresholds(model), datetime.now(timezone.utc))
    return [
        {**_item(study), "why": why, "rank": rank if ranked else None}
        for rank, (study, why) in enumerate(ordered, start=1)
    ]


def _one(study: Study, model: ModelService, policy: Policy) -> dict:
    """One study as an API item with its ``why`` (no rank: that belongs to a listing)."""
    return _ranked([study], model, policy, ranked=False)[0]


def _form_context(
    priority: Annotated[
        str | None, Form(description=f"Referral priority: {CONTEXT_FIELDS['priority']}.")
    ] = None,
    age_years: Annotated[
        float | None, Form(description=f"Age: {CONTEXT_FIELDS['age_years']}.")
    ] = None,
    prior_findings: Annotated[
        str | None,
        Form(
            description="Known prior positive findings, names joined by commas (nodule,effusion)."
        ),
    ] = None,
    setting: Annotated[
        str | None, Form(description=f"Where the patient is: {CONTEXT_FIELDS['setting']}.")
    ] = None,
) -> dict:
    """The clinical context sent with an upload, checked (422 naming the field and value)."""
    raw = {"priority": priority, "age_years": age_years, "prior_findings": prior_findings}
    try:
        return check_context({**raw, "setting": setting})
    except DataError as exc:
        raise HTTPException(422, f"{exc}; see GET /docs for the context fields") from None


@v1.post(
    "/studies",
    response_model=schemas.StudyItem,
    status_code=201,
    summary="Queue a study",
    responses={201: {"description": "The queued study", "links": _STUDY_LINKS}, **_BUSY},
)
def add_study(
    model: Model,
    store: Store,
    policy: TriagePolicy,
    context: Annotated[dict, Depends(_form_context)],
    data: Annotated[bytes, Depends(_read)],
) -> dict:
    """Score an uploaded study and queue it on the worklist (DICOM is de-identified first).

    The clinical context the triage policy weighs may come as form fields beside ``file``:
    ``priority`` (stat, urgent, routine), ``age_years``, ``prior_findings`` (names joined by
    commas) and ``setting`` (emergency, inpatient, outpatient); an impossible value is 422
    naming the field and the value, before the image is read."""
    with model.slots.hold():
        return _add_study(model, store, data, context, policy)


def _add_study(
    model: ModelService, store: WorklistStore, data: bytes, context: dict, policy: Policy
) -> dict:
    return _one(queue_study(model, store, data, context=context or None), model, policy)


@v1.get("/worklist", response_model=schemas.Worklist, summary="Studies in triage order")
def worklist(
    store: Store,
    model: Model,
    policy: TriagePolicy,
    status: Annotated[
        schemas.StudyStatus | None, Query(description="Only studies in this state.")
    ] = None,
) -> dict:
    """Studies in the triage policy's order, most urgent first, each with its ``rank`` and
    the reasons for its place (``why``); studies no rule tells apart by arrival time."""
    return {"items": _ranked(store.list(status), model, policy), "policy": policy.describe()}


@v1.get(
    "/studies/{study_id}",
    response_model=schemas.StudyItem,
    summary="One study",
    operation_id="get_study",
    responses=_NO_STUDY,
)
def get_study(study_id: StudyId, store: Store, model: Model, policy: TriagePolicy) -> dict:
    study = store.get(study_id)
    if study is None:
        raise HTTPException(404, f"study {study_id} does not exist; see GET /v1/worklist")
    return _one(study, model, policy)


@v1.get(
    "/studies/{study_id}/image",
    summary="The stored (de-identified) image",
    operation_id="study_image",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The file as stored: PNG, JPEG, TIFF, BMP or de-identified DICOM.",
            "content": {
                kind: {"schema": {"type": "string", "format": "binary"}}
                for kind in (
                    "image/png",
                    "image/jpeg",
                    "application/dicom",
                    "application/octet-stream",
                )
            },
        },
        **_NO_STUDY,
    },
)
def study_image(study_id: StudyId, store: Store) -> FileResponse:
    study = store.get(study_id)
    if study is None:
        raise HTTPException(404, f"study {study_id} does not exist; see GET /v1/worklist")
    media = {"dicom": "application/dicom", "png": "image/png", "jpeg": "image/jpeg"}
    path = store.data_dir / study.stored_as
    return FileResponse(path, media_type=media.get(study.format, "application/octet-stream"))


@v1.get(
    "/studies/{study_id}/preview.png",
    summary="The stored image as the page shows it (PNG)",
    operation_id="study_preview",
    response_class=Response,
    responses={
        200: {
            "description": "The stored image decoded as the model read it (a DICOM's rescale, "
            "VOI window and photometric interpretation applied), as an 8-bit PNG of its own "
            "size, so a detection study's boxes fit it.",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        **_NO_STUDY,
        **_BUSY,
    },
)
def study_preview(study_id: StudyId, store: Store, model: Model) -> Response:
    import io

    from PIL import Image

    from medsight.explain.overlay import display_image

    study = store.get(study_id)
    if study is None:
        raise HTTPException(404, f"study {study_id} does not exist; see GET /v1/worklist")
    data = (store.data_dir / study.stored_as).read_bytes()
    with model.slots.hold():
        image = model.decode(data)
    buffer = io.BytesIO()
    Image.fromarray(display_image(image.pixels, min_side=1)).save(buffer, format="PNG")
    return Response(buffer.getvalue(), media_type="image/png")


@v1.patch(
    "/studies/{study_id}",
    response_model=schemas.StudyItem,
    summary="Review a study",
    operation_id="update_study",
    responses={
        **_NO_STUDY,
        409: {"model": schemas.ReviewConflictBody, "description": "Not a permitted transition"},
    },
)
def update_study(
    study_id: StudyId,
    update: schemas.StudyUpdate,
    store: Store,
    model: Model,
    policy: TriagePolicy,
) -> dict:
    """Set the status (pending, in_review, reviewed) and optionally the reviewer's label
    (multi-label: the findings present joined by '|', or 'no finding')."""
    reviewer_label = model.reviewer_label(update.reviewer_label)  # 422 when it is not one
    study = store.update(study_id, update.status, reviewer_label)
    if study is None:
        raise HTTPException(404, f"study {study_id} does not exist; see GET /v1/worklist")
    log.info("study %d status=%s", study.id, study.status)
    return _one(study, model, policy)


# --------------------------------------------------------------------------- plumbing


class _TooLarge(HTTPException):
    # An HTTPException, because FastAPI turns any other error raised while it parses a form
    # into "400 error parsing the body".
    def __init__(self, limit: int):
        mb = limit / 1024 / 1024
        super().__init__(413, f"upload is larger than the limit of {mb:g} MB; send a smaller file")


class BodyLimit:
    """ASGI middleware: 413 for bodies above ``limit`` bytes, declared or streamed.

    Checked before any route reads the body, so an oversized upload is never spooled to disk.
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return message

        tracked = TrackedSend(send)
        try:
            await self.app(scope, limited_receive, tracked)
        except _TooLarge:
            if not tracked.started:
                await self._reject(scope, receive, send)

    async def _reject(self, scope, receive, send):
        response = JSONResponse({"detail": _TooLarge(self.limit).detail}, status_code=413)
        await response(scope, receive, send)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UnsupportedImage)
    async def _unsupported(request: Request, exc: UnsupportedImage):
        return JSONResponse({"detail": str(exc)}, status_code=415)

    @app.exception_handler(BadImage)
    async def _bad(request: Request, exc: BadImage):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy):
        return JSONResponse(
            {"detail": str(exc)},
            status_code=503,
            headers={"Retry-After": str(exc.retry_after)},
        )

    @app.exception_handler(ReviewStateError)
    async def _review_state(request: Request, exc: ReviewStateError):
        return JSONResponse({"detail": str(exc), "allowed": list(exc.allowed)}, status_code=409)

    @app.exception_handler(UnknownTarget)
    async def _unknown_target(request: Request, exc: UnknownTarget):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(ExplanationsUnavailable)
    async def _no_explain(request: Request, exc: ExplanationsUnavailable):
        return JSONResponse({"detail": str(exc)}, status_code=501)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # A missing 'file' field is the usual mistake: say so in words, not only in a list.
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
            problems.append(f"{where or 'request'}: {error.get('msg')}")
        missing_file = any(tuple(e.get("loc", ()))[-1:] == ("file",) for e in exc.errors())
        hint = "; send the image as multipart form field 'file'" if missing_file else ""
        return JSONResponse(
            {"detail": "; ".join(problems) + hint, "errors": jsonable(exc.errors())},
            status_code=422,
        )


def jsonable(value):
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(value, custom_encoder={Exception: str, bytes: lambda b: "<bytes>"})


def create_app(
    settings: ServeSettings,
    *,
    model: ModelService | None = None,
    worklist: WorklistStore | None = None,
) -> FastAPI:
    """Build the application for ``settings``: load the run, open the worklist, mount the page.

    ``model`` and ``worklist`` replace what the settings would load (tests, embedding).
    Raises :class:`ConfigError` when the server would be exposed without a strong token.
    Requests must name a trusted host (``settings.resolved_allowed_hosts()``): a test client
    uses ``TestClient(app, base_url="http://localhost")``.

    >>> app = create_app(ServeSettings(run="runs/phantom"))       # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)             # doctest: +SKIP
    """
    from medsight.evaluation.modelcard import intended_use

    check_exposure(settings)
    if model is None:
        from medsight.inference import Predictor

        slots = settings.decode_slots or decode_slots_for(settings.max_pixels)
        model = ModelService(
            Predictor.from_run(
                settings.run,
                backend=settings.backend,
                point=settings.point,
                device=settings.device,
            ),
            max_pixels=settings.max_pixels,
            slots=DecodeSlots(slots, wait=settings.decode_wait_s),
            urgent=settings.urgent,
        )
    policy = load_policy(settings.policy)
    # The default policy names sensitivity points: a detector's are false-positive rates.
    strict = settings.policy is not None
    for warning in check_points(policy, model.operating_points(), strict=strict):
        log.warning("%s", warning)
    if worklist is None:
        worklist = WorklistStore(settings.resolved_db(), settings.resolved_data_dir())

    app = FastAPI(
        title="medsight",
        version=__version__,
        summary=f"{model.model_ref.name} from run {model.model_ref.run}: research use only.",
        description=intended_use(model.classes),
        docs_url=None,
        redoc_url=None,
    )
    app.state.model = model
    app.state.worklist = worklist
    app.state.policy = policy
    app.state.token = settings.resolved_token()
    app.state.max_upload_bytes = settings.max_upload_bytes
    _secure(app, settings)
    _install_error_handlers(app)
    app.include_router(_prediction_routes(model.task))
    app.include_router(v1)

    @app.get("/health", response_model=schemas.Health, summary="The process is up")
    def health() -> dict:
        return {"status": "ok"}

    @app.get(
        "/ready",
        response_model=schemas.Ready,
        summary="Model and database are usable",
        responses={503: {"model": schemas.Ready, "description": "Not ready (yet)"}},
    )
    def ready(request: Request) -> JSONResponse:
        state = request.app.state
        database = "ok" if state.worklist.ping() else "unreachable"
        body = {"ready": database == "ok", "model": state.model.model_ref.run, "database": database}
        body["results_pending"] = state.worklist.results_pending()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    _docs_routes(app)
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def _secure(app, settings: ServeSettings) -> None:
    """The middleware every answer passes through, outermost first: security headers, the
    last-resort 500, trusted hosts, the body limit (``add_middleware`` wraps, so reversed)."""
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    app.add_middleware(
        TrustedHostMiddleware, allowed_hosts=settings.resolved_allowed_hosts(), www_redirect=False
    )
    app.add_middleware(CatchAll)
    app.add_middleware(SecurityHeaders)


#: Where FastAPI's documentation pages load Swagger UI and ReDoc from.
_DOCS_SOURCES = "https://cdn.jsdelivr.net https://fastapi.tiangolo.com"


def _docs_routes(app: FastAPI) -> None:
    """``/docs`` and ``/redoc`` with a policy of their own: their inline scripts by hash."""

    def with_csp(page):
        csp = script_hash_csp(page.body.decode(), _DOCS_SOURCES)
        page.headers["content-security-policy"] = csp
        return page

    @app.get("/docs", include_in_schema=False)
    def docs():
        return with_csp(get_swagger_ui_html(openapi_url=app.openapi_url, title="medsight API"))

    @app.get("/redoc", include_in_schema=False)
    def redoc():
        return with_csp(get_redoc_html(openapi_url=app.openapi_url, title="medsight API"))


# --------------------------------------------------------------------------- serving


class StartingApp:
    """The ASGI app :func:`serve` listens with while ``build()`` (importing torch, loading the
    model, opening the worklist) runs in a thread: ``/health`` answers 200 from the first
    moment, ``/ready`` and everything else 503 with ``Retry-After`` until the real app is
    built, then every request goes to it. A failed build is kept in ``error`` and
    ``on_failure`` is called (``serve`` stops the server and re-raises it)."""

    RETRY_AFTER = 2

    def __init__(self, build, settings: ServeSettings, on_failure=None):
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.build = build
        self.on_failure = on_failure
        self.app: FastAPI | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        loading = Starlette(
            routes=[
                Route("/health", self._health),
                Route("/ready", self._ready),
                Route("/{path:path}", self._loading, methods=list(_ALL_METHODS)),
            ]
        )
        _secure(loading, settings)
        self._loading_app = loading

    def start(self) -> None:
        """Start building the real app in a background thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._build, name="medsight-load", daemon=True)
            self._thread.start()

    def _build(self) -> None:
        try:
            self.app = self.build()
            log.info("model loaded (%s): ready", self.app.state.model.predictor.runs_on)
        except BaseException as exc:  # noqa: BLE001 - reported by serve(), not lost in a thread
            self.error = exc
            log.error("the service could not start: %s", exc)
            if self.on_failure:
                self.on_failure()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        app = self.app or self._loading_app
        await app(scope, receive, send)

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _health(self, request):
        return JSONResponse({"status": "ok"})

    async def _ready(self, request):
        detail = "the model is loading" if self.error is None else f"failed: {self.error}"
        body = {"ready": False, "model": None, "database": "unknown", "detail": detail}
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(self.RETRY_AFTER)})

    async def _loading(self, request):
        return JSONResponse(
            {"detail": "the model is still loading; retry in a few seconds (see GET /ready)"},
            status_code=503,
            headers={"Retry-After": str(self.RETRY_AFTER)},
        )


_ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def serve(settings: ServeSettings) -> None:
    """Run the app with uvicorn until interrupted (what ``medsight serve`` does).

    The socket is open before the model is loaded (see :class:`StartingApp`); a run that
    cannot be loaded stops the server and its error is raised here.
    """
    import uvicorn

    check_exposure(settings)
    load_policy(settings.policy)  # a bad policy stops here, before the socket opens
    starting = StartingApp(lambda: create_app(settings), settings)
    config = uvicorn.Config(
        starting, host=settings.host, port=settings.port, log_level="info", access_log=False
    )
    server = uvicorn.Server(config)
    starting.on_failure = lambda: setattr(server, "should_exit", True)
    log.info(
        "serving %s (%s) on http://%s:%d",
        settings.run,
        settings.backend,
        settings.host,
        settings.port,
    )
    server.run()
    if starting.error is not None:
        raise starting.error
