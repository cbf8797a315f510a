"""The DICOM node: a C-STORE SCP (pynetdicom) that takes the images a modality or a PACS sends,
groups them into studies, and queues each study on the worklist once no new instance has
arrived for ``series_timeout`` seconds.

>>> node = DicomNode(model, store, port=11112, calling_aets=["ORTHANC"])   # doctest: +SKIP
>>> node.start()                                                            # doctest: +SKIP

What it does with what arrives:

* **Who may send.** With ``calling_aets`` only those AE titles may associate; any other is
  rejected at association ("calling AE title not recognised", permanent) and logged with its
  AE title and address (no patient data is known at that point). C-ECHO is answered.
* **What is accepted.** Every storage SOP class, in the transfer syntaxes the installed pydicom
  decoders can read (uncompressed, JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE where their plug-ins are
  installed), so a sender holding something else (MPEG video, JPEG 2000 Part 2) transcodes or is
  told at association; the refused contexts are logged, naming SOP class and transfer syntax.
  Each instance is then checked on its own: one without pixel data (a structured report, a
  presentation state, medsight's own SR coming back) is ignored with a log line and answered
  with success, so a whole study can be pushed; one whose pixels cannot be decoded is refused
  (status 0xC000) with a log line. The node keeps running either way.
* **Spool.** Accepted instances are written to the spool folder (``spool``; by default a private
  temporary folder, never inside the worklist's data folder) under hashes of their Study and
  Series Instance UIDs. They are identifiable until scored; the study's spool folder is deleted
  as soon as it has been scored. An association that aborts keeps what arrived; a study that
  never completes is scored when the timeout passes anyway; a spool given with ``spool`` that
  still holds studies at start (a restart) has them scored.
* **Scoring.** A study already on the worklist (the same StudyInstanceUID sent again, or
  instances arriving after it was scored) is logged and not queued twice. One representative
  image per study: the middle instance (by Instance Number,
  then file order) of the series with the most instances; if it cannot be scored, the next
  nearest to the middle is tried. It goes through :func:`medsight.serving.intake.queue_study`,
  which de-identifies it before anything is stored, with the clinical context read from the
  DICOM header (:func:`context_from_dicom`) and the original StudyInstanceUID for routing.
* **Results.** With a :class:`medsight.integration.results.ResultSender`, each scored study's
  SR (and optionally the heat-map overlay) is queued for the PACS.

Log lines name a study by its pseudonymous UID (as stored) or its worklist id, never by a
patient's name or ID.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID, AllTransferSyntaxes
from sqlalchemy import select

from medsight.data.privacy import pseudonymous_uid
from medsight.errors import DataError
from medsight.serving.intake import queue_study
from medsight.serving.service import ModelService
from medsight.serving.triage import DICOM_PRIORITY, check_context
from medsight.serving.worklist import Study, WorklistStore

log = logging.getLogger("medsight.pacs")

#: C-STORE statuses (PS3.4 B.2.3).
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700


def quiet_dicom_libraries() -> None:
    """Keep pynetdicom's own log at INFO or above (its DEBUG dumps print every DIMSE message,
    UIDs and C-FIND identifiers, patient names included) and highdicom's at WARNING (its INFO
    lines name the SOP Instance UIDs it copies patient and study attributes from)."""
    for name, lowest in (("pynetdicom", logging.INFO), ("highdicom", logging.WARNING)):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < lowest or logger.level < lowest:
            logger.setLevel(lowest)


def decodable_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes whose pixel data the installed pydicom decoders can read."""
    from pydicom.pixels import get_decoder

    usable = []
    for uid in AllTransferSyntaxes:
        try:
            if get_decoder(uid).is_available:
                usable.append(str(uid))
        except NotImplementedError:  # pydicom has no decoder for it at all (video)
            continue
    return usable


def _age_years(text: str) -> float:
    """DICOM Age String ``nnnD|W|M|Y`` in years (``"045Y"`` → 45, ``"006M"`` → 0.5)."""
    text = text.strip().upper()
    per_year = {"Y": 1, "M": 12, "W": 52.1775, "D": 365.25}
    if len(text) != 4 or not text[:3].isdigit() or text[3] not in per_year:
        raise DataError(f"PatientAge {text!r} is not a DICOM age (nnnY, nnnM, nnnW or nnnD)")
    return round(int(text[:3]) / per_year[text[3]], 2)


def _age_from_dates(ds: pydicom.Dataset) -> float | None:
    born, seen = str(ds.get("PatientBirthDate", "")), str(ds.get("StudyDate", ""))
    if len(born) != 8 or len(seen) != 8 or not (born + seen).isdigit():
        return None
    try:
        days = (
            date(int(seen[:4]), int(seen[4:6]), int(seen[6:]))
            - date(int(born[:4]), int(born[4:6]), int(born[6:]))
        ).days
    except ValueError:
        return None
    return math.floor(days / 365.25 * 100) / 100


def context_from_dicom(ds: pydicom.Dataset) -> dict[str, Any]:
    """The clinical context a DICOM header tells reliably, checked by
    :func:`medsight.serving.triage.check_context`: ``priority`` from RequestedProcedurePriority
    (0040,1003; also inside RequestAttributesSequence), ``age_years`` from PatientAge (or from
    PatientBirthDate and StudyDate when the age is absent). A value that is impossible or
    unknown is dropped with a warning naming the tag; it never stops the study.

    >>> context_from_dicom(pydicom.Dataset({...}))                      # doctest: +SKIP
    {'priority': 'stat', 'age_years': 45.0}
    """
    found: dict[str, tuple[str, Any]] = {}
    priority = ds.get("RequestedProcedurePriority")
    if not priority:
        for item in ds.get("RequestAttributesSequence", []) or []:
            priority = item.get("RequestedProcedurePriority") or priority
    if priority:
        text = str(priority).strip().upper()
        found["priority"] = (
            "RequestedProcedurePriority (0040,1003)",
            DICOM_PRIORITY.get(text, text),
        )
    age = str(ds.get("PatientAge", "") or "").strip()
    if age:
        try:
            found["age_years"] = ("PatientAge (0010,1010)", _age_years(age))
        except DataError as exc:
            log.warning("DICOM context dropped: %s", exc)
    else:
        years = _age_from_dates(ds)
        if years is not None:
            found["age_years"] = ("PatientBirthDate (0010,0030) and StudyDate (0008,0020)", years)
    context: dict[str, Any] = {}
    for name, (tag, value) in found.items():
        try:
            context.update(check_context({name: value}))
        except DataError as exc:
            log.warning("DICOM context from %s dropped: %s", tag, exc)
    return context


def known_study(store: WorklistStore, study_uid: str) -> Study | None:
    """The worklist's study with this source StudyInstanceUID, if there is one."""
    with store.sessions() as session:
        query = select(Study).where(Study.study_uid == study_uid).order_by(Study.id).limit(1)
        return session.scalar(query)


def _digest(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:24]


@dataclass
class _Arrival:
    """What the node remembers of a study still arriving (its instances are in the spool)."""

    folder: Path
    last: float
    instances: int = 0
    series: set[str] = field(default_factory=set)


class DicomNode:
    """A C-STORE SCP queueing the studies it receives (see the module's docstring).

    ``results``: a :class:`~medsight.integration.results.ResultSender` (or anything with
    ``enqueue(study, source, data)``) told of every scored study. ``on_scored``: called with
    each queued :class:`Study` (tests, the CLI's progress lines).
    """

    def __init__(
        self,
        model: ModelService,
        store: WorklistStore,
        *,
        ae_title: str = "MEDSIGHT",
        port: int = 11112,
        host: str = "0.0.0.0",
        calling_aets: Iterable[str] | None = None,
        series_timeout: float = 10.0,
        spool: str | Path | None = None,
        results: Any = None,
        on_scored: Callable[[Study], None] | None = None,
    ):
        if series_timeout <= 0:
            raise DataError(
                f"series timeout {series_timeout!r} must be a positive number of seconds"
            )
        self.model = model
        self.store = store
        self.ae_title = ae_title
        self.port = port
        self.host = host
        self.calling_aets = [a.strip() for a in calling_aets or [] if a.strip()]
        self.series_timeout = float(series_timeout)
        self._own_spool = spool is None
        self.spool = Path(spool or tempfile.mkdtemp(prefix="medsight-spool-"))
        self.spool.mkdir(parents=True, exist_ok=True)
        self.spool.chmod(0o700)
        self.results = results
        self.on_scored = on_scored
        self.transfer_syntaxes = decodable_transfer_syntaxes()
        self._arrivals: dict[str, _Arrival] = {}
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._server = None
        self._watcher: threading.Thread | None = None
        #: Counters for logs and tests: stored, ignored (non-image), refused (undecodable).
        self.counts = dict.fromkeys(
            ("stored", "ignored", "refused", "scored", "repeated", "failed"), 0
        )

    # ------------------------------------------------------------------ life cycle

    def application_entity(self):
        """The pynetdicom AE: Verification plus every storage SOP class in decodable syntaxes."""
        from pynetdicom import AE, AllStoragePresentationContexts
        from pynetdicom.sop_class import Verification

        quiet_dicom_libraries()
        ae = AE(self.ae_title)
        ae.require_calling_aet = self.calling_aets
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, self.transfer_syntaxes)
        return ae

    def start(self) -> None:
        """Listen (in background threads) and score studies as they complete."""
        from pynetdicom import evt

        self._recover()
        handlers = [
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        self._server = self.application_entity().start_server(
            (self.host, self.port), block=False, evt_handlers=handlers
        )
        self.port = self._server.server_address[1]
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="medsight-node", daemon=True)
        self._watcher.start()
        allowed = ", ".join(self.calling_aets) if self.calling_aets else "any calling AE title"
        if not self.calling_aets and self.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "no calling AE titles listed: any DICOM peer that reaches %s:%d may send "
                "studies; give --calling-aets to refuse the others",
                self.host,
                self.port,
            )
        log.info(
            "DICOM node %s listening on %s:%d (accepts %s; a study is scored %.3g s after its "
            "last instance)",
            self.ae_title,
            self.host,
            self.port,
            allowed,
            self.series_timeout,
        )

    def stop(self) -> None:
        """Stop listening, score what has arrived, and remove a temporary spool."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        self.flush(force=True)
        if self._own_spool:
            shutil.rmtree(self.spool, ignore_errors=True)

    def __enter__(self) -> DicomNode:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _count(self, what: str) -> None:
        with self._count_lock:  # association threads count concurrently
            self.counts[what] += 1

    def pending_studies(self) -> int:
        """Studies received and not yet scored."""
        with self._lock:
            return len(self._arrivals)

    # ------------------------------------------------------------------ events

    def _on_rejected(self, event) -> None:
        requestor = event.assoc.requestor
        log.warning(
            "association from %r at %s refused: calling AE title not in the allowed list (%s)",
            requestor.ae_title,
            requestor.address,
            ", ".join(self.calling_aets),
        )

    def _on_accepted(self, event) -> None:
        requestor = event.assoc.requestor
        for context in event.assoc.rejected_contexts:
            syntaxes = ", ".join(UID(ts).name for ts in context.transfer_syntax)
            log.warning(
                "association from %r: %s in %s refused (no decoder for that transfer syntax "
                "here; send it uncompressed or in one of the syntaxes pydicom can decode)",
                requestor.ae_title,
                UID(context.abstract_syntax).name,
                syntaxes,
            )

    def _on_aborted(self, event) -> None:
        log.warning(
            "association from %r aborted; the instances received so far are kept",
            event.assoc.requestor.ae_title,
        )

    def _on_store(self, event) -> int:
        """One instance: check it, spool it under its study and series, note the arrival."""
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as exc:  # noqa: BLE001 - a data set that cannot be parsed is refused
            log.warning("instance refused: its data set cannot be read (%s)", type(exc).__name__)
            self._count("refused")
            return CANNOT_UNDERSTAND
        sop_class = UID(str(ds.get("SOPClassUID", event.request.AffectedSOPClassUID)))
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        where = f"study {pseudonymous_uid(study_uid)}" if study_uid else "an instance"
        if "PixelData" not in ds:
            log.info(
                "%s: a %s instance ignored (not an image; only images are scored)",
                where,
                sop_class.name,
            )
            self._count("ignored")
            return SUCCESS
        if not study_uid:
            log.warning("a %s instance refused: it has no StudyInstanceUID", sop_class.name)
            self._count("refused")
            return CANNOT_UNDERSTAND
        syntax = UID(str(ds.file_meta.TransferSyntaxUID))
        try:
            ds.pixel_array  # noqa: B018 - decoding is the check
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this instance's alone
            log.warning(
                "%s: a %s instance in %s refused: its pixel data cannot be decoded (%s)",
                where,
                sop_class.name,
                syntax.name,
                _reason(exc),
            )
            self._count("refused")
            return CANNOT_UNDERSTAND
        series_uid = str(ds.get("SeriesInstanceUID", "") or "unknown")
        sop_uid = str(ds.get("SOPInstanceUID", "") or pydicom.uid.generate_uid())
        try:
            with self._lock:
                arrival = self._arrivals.get(study_uid)
                if arrival is None:
                    arrival = _Arrival(self.spool / _digest(study_uid), time.monotonic())
                    self._arrivals[study_uid] = arrival
                target = arrival.folder / _digest(series_uid) / f"{_digest(sop_uid)}.dcm"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(event.encoded_dataset())
                arrival.last = time.monotonic()
                arrival.instances += 1
                arrival.series.add(series_uid)
        except OSError as exc:
            log.error("%s: an instance could not be spooled (%s)", where, exc.strerror)
            return OUT_OF_RESOURCES
        self._count("stored")
        return SUCCESS

    # ------------------------------------------------------------------ scoring

    def _watch(self) -> None:
        step = min(0.25, self.series_timeout / 4)
        while not self._stop.wait(step):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one study
                log.exception("scoring the completed studies failed")

    def _recover(self) -> None:
        """Studies left in a given spool (a restart): scored after the timeout from now."""
        for folder in sorted(p for p in self.spool.iterdir() if p.is_dir()):
            files = sorted(folder.rglob("*.dcm"))
            if not files:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            except Exception:  # noqa: BLE001
                log.warning("spool folder %s cannot be read; left in place", folder.name)
                continue
            self._arrivals[uid] = _Arrival(folder, time.monotonic(), len(files))
            log.info(
                "study %s found in the spool (%d instances): will be scored",
                pseudonymous_uid(uid),
                len(files),
            )

    def flush(self, force: bool = False) -> list[Study]:
        """Score every study idle for the series timeout (every study with ``force``)."""
        now = time.monotonic()
        with self._lock:
            due = [
                uid
                for uid, arrival in self._arrivals.items()
                if force or now - arrival.last >= self.series_timeout
            ]
            batches = []
            for uid in due:
                arrival = self._arrivals.pop(uid)
                if not arrival.folder.is_dir():  # nothing could be written (a full disk)
                    continue
                # A late instance starts a new folder rather than joining one being scored.
                taken = arrival.folder.with_name(f"{arrival.folder.name}.{time.time_ns()}.scoring")
                arrival.folder.rename(taken)
                batches.append((uid, taken, arrival.instances))
        scored = []
        for uid, folder, count in batches:
            try:
                study = self._score(uid, folder, count)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            if study is not None:
                scored.append(study)
        return scored

    def _score(self, study_uid: str, folder: Path, count: int) -> Study | None:
        name = f"study {pseudonymous_uid(study_uid)}"
        earlier = known_study(self.store, study_uid)
        if earlier is not None:  # sent again, or late instances: one worklist entry per study
            log.info(
                "%s (%d instances) is already worklist study %d; not scored again",
                name,
                count,
                earlier.id,
            )
            self._count("repeated")
            return None
        for path, ds in representatives(folder):
            data = path.read_bytes()
            try:
                study = queue_study(
                    self.model,
                    self.store,
                    data,
                    context=context_from_dicom(ds),
                    study_uid=study_uid,
                )
            except Exception as exc:  # noqa: BLE001 - try the next instance; never stop the node
                log.warning(
                    "%s: an instance could not be scored (%s); trying another", name, _reason(exc)
                )
                continue
            self._count("scored")
            log.info(
                "%s (%d instances) scored as worklist study %d: %s",
                name,
                count,
                study.id,
                study.label,
            )
            if self.results is not None:
                try:
                    self.results.enqueue(study, ds, data)
                except Exception as exc:  # noqa: BLE001 - the worklist entry stands regardless
                    log.error(
                        "worklist study %d: its result could not be queued for the PACS (%s)",
                        study.id,
                        _reason(exc),
                    )
            if self.on_scored is not None:
                self.on_scored(study)
            return study
        self._count("failed")
        log.error("%s (%d instances): no instance could be scored; nothing queued", name, count)
        return None


def representatives(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """The instances of the study spooled in ``folder``, best representative first: the series
    with the most instances, its instances ordered by distance from its middle (by Instance
    Number, then file name), headers read without pixels."""
    series: list[list[tuple[Path, pydicom.Dataset]]] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        members = []
        for path in sorted(sub.glob("*.dcm")):
            try:
                members.append((path, pydicom.dcmread(path, stop_before_pixels=True)))
            except Exception:  # noqa: BLE001 - an unreadable file is skipped
                continue
        if members:
            series.append(members)
    if not series:
        return []
    largest = max(series, key=len)
    largest.sort(key=lambda item: (_number(item[1].get("InstanceNumber")), item[0].name))
    middle = (len(largest) - 1) / 2
    order = sorted(range(len(largest)), key=lambda i: (abs(i - middle), i))
    return [largest[i] for i in order]


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.inf


def _reason(exc: BaseException) -> str:
    """An exception's message without its traceback, one line, for a log."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
