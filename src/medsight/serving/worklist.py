"""The triage worklist: scored studies queued by urgency, persisted with SQLAlchemy.

A study is an uploaded image kept on disk under its content hash inside the data folder
(never under the client's file name) and a database row holding the model's answer, its
status and the reviewer's label. DICOM uploads are de-identified before anything is stored
(:func:`medsight.data.privacy.deidentify_dicom`: the DICOM PS3.15 Basic Profile, the patient ID
as a salted pseudonym). SQLite by default, any SQLAlchemy URL (PostgreSQL) otherwise; the schema
is created on start, so a restart keeps all.

Review follows a small state machine (:data:`TRANSITIONS`)::

    pending   -> in_review | reviewed
    in_review -> pending (released) | reviewed
    reviewed  -> in_review (reopened: reviewer_label and reviewed_at are cleared)

Any other change (``reviewed → pending``, a repeat of the current status, a reviewer label
with a status other than ``reviewed``) raises :class:`ReviewStateError`, which the API answers
with 409 and the allowed next statuses. Reopening clears the review fields rather than keeping
a stale label beside an open status; the audit trail keeps every earlier review with its time.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    create_engine,
    inspect,
    select,
    update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from medsight.databases import driver_url, error_reason, masked_url
from medsight.errors import ConfigError

#: The review state machine: the statuses each status may move to. Reopening a reviewed study
#: (reviewed → in_review) clears its reviewer label and review time; the earlier review stays in
#: the audit trail (``review_events``), which thereby versions every review.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "pending": ("in_review", "reviewed"),
    "in_review": ("pending", "reviewed"),
    "reviewed": ("in_review",),
}


class ReviewStateError(ValueError):
    """A review change the state machine refuses; ``allowed`` lists the statuses allowed next."""

    def __init__(self, message: str, current: str, allowed: tuple[str, ...]):
        super().__init__(message)
        self.current = current
        self.allowed = allowed


class Base(DeclarativeBase):
    pass


class Study(Base):
    """One uploaded, scored study. No patient identifier is stored: a pseudonym at most."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    stored_as: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    patient: Mapped[str | None] = mapped_column(String(40), nullable=True)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    label: Mapped[str] = mapped_column(String(200))
    probabilities: Mapped[dict] = mapped_column(JSON)
    urgency: Mapped[float] = mapped_column(Float, index=True)
    #: The class or finding whose probability set the urgency (null: studies queued before
    #: it was recorded).
    urgency_finding: Mapped[str | None] = mapped_column(String(200), nullable=True)
    flag: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: A detection run's boxes at or above threshold, in the stored image's pixels (null for
    #: other tasks and studies queued before boxes were kept).
    boxes: Mapped[list | None] = mapped_column(JSON, nullable=True)
    #: The clinical context triage weighs (priority, age, prior findings, setting; null: none
    #: given). No identifier: the fields are checked when they are received.
    context: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    #: The source StudyInstanceUID, kept only to send results back to the PACS (null: an
    #: upload that did not come from one).
    study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default="pending")
    reviewer_label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    model_name: Mapped[str] = mapped_column(String(200))
    model_run: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(64))


class ReviewEvent(Base):
    """Audit trail: every status change, with the reviewer's and the model's labels."""

    __tablename__ = "review_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(16))
    reviewer_label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    model_label: Mapped[str] = mapped_column(String(200))


def utc(value: datetime | None) -> datetime | None:
    """SQLite forgets time zones: every stored time is UTC, so say so again on the way out."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


#: The folder in a worklist's data folder where results wait for the PACS
#: (:class:`medsight.integration.results.ResultSender`), whichever process queued them.
OUTBOX = "outbox"


class WorklistStore:
    """Studies in a database plus their images in ``data_dir``; safe to share across threads.

    >>> store = WorklistStore("sqlite:///work/worklist.db", "work")    # doctest: +SKIP
    >>> [s.id for s in store.list("pending")]                           # doctest: +SKIP
    """

    def __init__(self, url: str, data_dir: str | Path):
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            # Request threads share the engine; SQLite's own lock keeps writes safe.
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        try:
            self.engine = create_engine(driver_url(url), **kwargs)
            _create_schema(self.engine)
        except Exception as exc:  # noqa: BLE001 - a bad URL or driver is a user error
            shown = masked_url(url, "<unparseable URL>")
            raise ConfigError(
                f"worklist database {shown!r} cannot be opened ({error_reason(exc, url)}); "
                "pass --db sqlite:///path/worklist.db or a reachable postgresql:// URL"
            ) from exc
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    # ------------------------------------------------------------------ storage

    def store_file(self, data: bytes, extension: str) -> tuple[str, str]:
        """Write ``data`` under its SHA-256 inside the data folder; ``(hash, relative path)``.

        The name is built from the hash alone, so no client-chosen name ever reaches the disk.
        """
        digest = hashlib.sha256(data).hexdigest()
        relative = Path("studies") / digest[:2] / f"{digest}{extension}"
        target = self.data_dir / relative
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".upload.", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return digest, relative.as_posix()

    def add(
        self,
        *,
        data: bytes,
        extension: str,
        format: str,
        meta: dict[str, Any],
        label: str,
        probabilities: dict[str, float],
        urgency: float,
        flag: str | None,
        model: dict[str, str],
        urgency_finding: str | None = None,
        boxes: list[dict] | None = None,
        context: dict[str, Any] | None = None,
        study_uid: str | None = None,
    ) -> Study:
        """Store the (already de-identified) file and queue a pending study; ``urgency_finding``
        is the class or finding whose probability set ``urgency``; ``boxes``, a detection
        run's boxes (``{x1, y1, x2, y2, label, score}`` in the image's pixels)."""
        digest, relative = self.store_file(data, extension)
        meta = dict(meta)
        study = Study(
            content_hash=digest,
            stored_as=relative,
            format=format,
            modality=meta.pop("modality", None),
            patient=meta.pop("patient", None),
            meta=meta,
            received_at=datetime.now(timezone.utc),
            label=label,
            probabilities=probabilities,
            urgency=urgency,
            urgency_finding=urgency_finding,
            boxes=boxes,
            context=context,
            study_uid=study_uid,
            flag=flag,
            status="pending",
            model_name=model["name"],
            model_run=model["run"],
            model_version=model["version"],
        )
        with self.sessions.begin() as session:
            session.add(study)
        return study

    # ------------------------------------------------------------------ queries

    def list(self, status: str | None = None) -> list[Study]:
        """Studies by urgency (most urgent first), ties by arrival (oldest first)."""
        query = select(Study).order_by(Study.urgency.desc(), Study.received_at, Study.id)
        if status is not None:
            query = query.where(Study.status == status)
        with self.sessions() as session:
            return list(session.scalars(query))

    def get(self, study_id: int) -> Study | None:
        with self.sessions() as session:
            return session.get(Study, study_id)

    def update(self, study_id: int, status: str, reviewer_label: str | None) -> Study | None:
        """Move a study to ``status`` as :data:`TRANSITIONS` allows; None when it does not exist.

        ``reviewer_label`` is accepted with ``reviewed`` only. Reopening (reviewed → in_review)
        clears the reviewer label and review time. Every change is kept in the audit trail.
        Raises :class:`ReviewStateError` for a transition the state machine refuses.
        """
        with self.sessions.begin() as session:
            study = session.get(Study, study_id)
            if study is None:
                return None
            current = study.status
            allowed = TRANSITIONS.get(current, ())
            if status not in allowed:
                raise ReviewStateError(
                    f"study {study_id} is {current!r} and cannot move to {status!r}; "
                    f"allowed next statuses: {', '.join(allowed) or 'none'}",
                    current,
                    allowed,
                )
            if reviewer_label is not None and status != "reviewed":
                raise ReviewStateError(
                    f"reviewer_label {reviewer_label!r} is accepted only with status 'reviewed', "
                    f"not {status!r}; send the label when the review is done",
                    current,
                    allowed,
                )
            now = datetime.now(timezone.utc)
            reviewed = status == "reviewed"
            label = reviewer_label if reviewed else None
            # Compare-and-set on the status, so two concurrent changes cannot both pass the
            # check above: the loser changes no row and is refused like any bad transition.
            changed = session.execute(
                update(Study)
                .where(Study.id == study_id, Study.status == current)
                .values(status=status, reviewer_label=label, reviewed_at=now if reviewed else None)
                .execution_options(synchronize_session=False)
            ).rowcount
            if changed != 1:
                raise ReviewStateError(
                    f"study {study_id} changed status while {status!r} was being set; "
                    "reload it and try again",
                    current,
                    allowed,
                )
            session.add(
                ReviewEvent(
                    study_id=study_id,
                    at=now,
                    status=status,
                    reviewer_label=label,
                    model_label=study.label,
                )
            )
        return self.get(study_id)

    def merge_context(
        self, context: dict[str, Any], *, study_id: int | None = None, study_uid: str | None = None
    ) -> list[int]:
        """Add (already checked) clinical ``context`` fields to the study ``study_id``, or to every
        study of the source StudyInstanceUID ``study_uid``; a field given replaces the one
        stored, the others stay. Returns the ids of the studies changed (none: no such study)."""
        query = select(Study)
        if study_id is not None:
            query = query.where(Study.id == study_id)
        else:
            query = query.where(Study.study_uid == study_uid)
        with self.sessions.begin() as session:
            studies = list(session.scalars(query))
            for study in studies:
                study.context = {**(study.context or {}), **context}  # a new dict: JSON is saved
        return [study.id for study in studies]

    def events(self, study_id: int) -> list[ReviewEvent]:
        """The audit trail of one study, oldest first."""
        query = select(ReviewEvent).where(ReviewEvent.study_id == study_id)
        with self.sessions() as session:
            return list(session.scalars(query.order_by(ReviewEvent.id)))

    def results_pending(self) -> int:
        """Results waiting in the outbox for the PACS (``medsight listen`` / ``pacs poll``
        beside ``medsight serve`` on this worklist)."""
        return sum(1 for _ in (self.data_dir / OUTBOX).glob("*.json"))

    def ping(self) -> bool:
        """True when the database answers."""
        try:
            with self.engine.connect() as connection:
                connection.execute(sql_text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - readiness is a yes/no question
            return False

    def close(self) -> None:
        self.engine.dispose()


#: Columns added to ``studies`` after its first release: ``create_all`` makes new tables only,
#: so a worklist database from an older medsight gains them here (as NULL for its studies).
_NEW_COLUMNS = {
    "urgency_finding": "VARCHAR(200)",
    "boxes": "JSON",
    "context": "JSON",
    "study_uid": "VARCHAR(64)",
}


def _create_schema(engine) -> None:
    """Create the tables and add new columns; servers starting together on one empty
    database (PostgreSQL) may race to create the same table: the loser looks again."""
    import sqlalchemy.exc

    tables = inspect(engine)
    if tables.has_table(Study.__tablename__):
        columns = {column["name"] for column in tables.get_columns(Study.__tablename__)}
        if "content_hash" not in columns:
            raise ConfigError(
                f"it holds a table {Study.__tablename__!r} that is not a worklist's (an Optuna "
                "study's?); give the worklist a database of its own"
            )
    for attempt in range(5):
        try:
            Base.metadata.create_all(engine)
            _add_new_columns(engine)
            return
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            raced = "already exists" in str(exc) or "duplicate key" in str(exc)
            if not raced or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def _add_new_columns(engine) -> None:
    present = {column["name"] for column in inspect(engine).get_columns(Study.__tablename__)}
    missing = {name: kind for name, kind in _NEW_COLUMNS.items() if name not in present}
    if missing:
        with engine.begin() as connection:
            for name, kind in missing.items():
                connection.execute(
                    sql_text(f"ALTER TABLE {Study.__tablename__} ADD COLUMN {name} {kind}")
                )
