"""The triage worklist: scored studies queued by urgency, persisted with SQLAlchemy.

A study is an uploaded image kept on disk under its content hash inside the data folder
(never under the client's file name) and a database row holding the model's answer, its
status and the reviewer's label. DICOM uploads are de-identified before anything is stored:
person names, dates, the patient module and private tags are removed and the patient ID is
replaced by a salted pseudonym (:mod:`medsight.data.privacy`). SQLite by default, any
SQLAlchemy URL (PostgreSQL) otherwise; the schema is created on start, so a restart keeps all.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, create_engine, select
from sqlalchemy import text as sql_text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from medsight.data.privacy import pseudonymise
from medsight.errors import ConfigError

#: DICOM attributes (besides every person name, date, time and the patient module) that can
#: identify a patient, a clinician or an institution, after DICOM PS3.15's basic profile.
_IDENTIFYING = frozenset(
    {
        "AccessionNumber",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "StationName",
        "StudyID",
        "DeviceSerialNumber",
        "RequestAttributesSequence",
        "ReferencedPatientSequence",
        "OtherPatientIDsSequence",
        "AdmissionID",
        "IssuerOfAdmissionID",
        "CurrentPatientLocation",
        "PatientInstitutionResidence",
        "RequestingService",
        "ImageComments",
        "StudyDescription",
        "SeriesDescription",
        "AdditionalPatientHistory",
    }
)
_DATE_VRS = frozenset({"DA", "DT", "TM"})


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
    flag: Mapped[str | None] = mapped_column(String(64), nullable=True)
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


def deidentify_dicom(data: bytes, salt: bytes | None = None) -> tuple[bytes, dict[str, Any]]:
    """A DICOM file without patient-identifying data, and the harmless metadata kept from it.

    Removes every person name (any depth), every date and time, the whole patient module
    (group 0010), private tags and the attributes in ``_IDENTIFYING``; the patient ID becomes a
    salted pseudonym, stored as PatientID so one patient's studies still group together.

    >>> clean, meta = deidentify_dicom(open("scan.dcm", "rb").read())   # doctest: +SKIP
    >>> meta["patient"]                                                  # doctest: +SKIP
    'p-3f9a0c...'
    """
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    raw_id = str(ds.get("PatientID", "") or "")
    meta = {
        "modality": str(ds.get("Modality", "")) or None,
        "body_part": str(ds.get("BodyPartExamined", "")) or None,
        "view": str(ds.get("ViewPosition", "")) or None,
        "photometric": str(ds.get("PhotometricInterpretation", "")) or None,
        "rows": int(ds.get("Rows", 0) or 0),
        "columns": int(ds.get("Columns", 0) or 0),
    }

    def scrub(dataset, element) -> None:
        if (
            element.VR == "PN"
            or element.VR in _DATE_VRS
            or element.tag.group == 0x0010
            or element.keyword in _IDENTIFYING
        ):
            del dataset[element.tag]

    ds.remove_private_tags()
    ds.walk(scrub)
    patient = pseudonymise(raw_id, salt) if raw_id else None
    if patient:
        ds.PatientID = patient
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "medsight: names, dates, patient module, private tags removed"
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue(), {**meta, "patient": patient}


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
            self.engine = create_engine(url, **kwargs)
            Base.metadata.create_all(self.engine)
        except Exception as exc:  # noqa: BLE001 - a bad URL or driver is a user error
            raise ConfigError(
                f"worklist database {_safe_url(url)!r} cannot be opened ({exc}); pass --db "
                "sqlite:///path/worklist.db or a reachable postgresql:// URL"
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
    ) -> Study:
        """Store the (already de-identified) file and queue a pending study."""
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
        """Set the status (and the reviewer's label); every change is kept in the audit trail."""
        with self.sessions.begin() as session:
            study = session.get(Study, study_id)
            if study is None:
                return None
            now = datetime.now(timezone.utc)
            study.status = status
            if reviewer_label is not None:
                study.reviewer_label = reviewer_label
            study.reviewed_at = now if status == "reviewed" else study.reviewed_at
            session.add(
                ReviewEvent(
                    study_id=study.id,
                    at=now,
                    status=status,
                    reviewer_label=reviewer_label,
                    model_label=study.label,
                )
            )
        return study

    def events(self, study_id: int) -> list[ReviewEvent]:
        """The audit trail of one study, oldest first."""
        query = select(ReviewEvent).where(ReviewEvent.study_id == study_id)
        with self.sessions() as session:
            return list(session.scalars(query.order_by(ReviewEvent.id)))

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


def _safe_url(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return "<unparseable URL>"
