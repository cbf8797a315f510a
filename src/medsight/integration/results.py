"""Results back into the PACS: for each scored study a Comprehensive SR (highdicom) in the source
study (its original StudyInstanceUID, the scored instance referenced) with the finding, the
probability, the model's name and version and the statement that it is not for diagnosis, and
optionally a Secondary Capture of the heat-map overlay; sent by C-STORE or STOW-RS.

>>> pacs = StoreDestination.parse("ORTHANC@pacs:4242")
>>> sender = ResultSender(pacs, "serve/outbox")                     # doctest: +SKIP
>>> sender.start()                                                  # doctest: +SKIP

Nothing is lost when the destination is down: every result waits in the outbox folder (one JSON
file per study, holding no patient data: the worklist's answer, the source UIDs and the UIDs the
SR will carry, so a retry sends the same objects) and is retried with exponential backoff
(2 s, 4 s, 8 s ... at most 10 min) until it is delivered, across restarts. The patient and study
attributes the SR needs to join the source study in the PACS (patient name and ID among them)
are held in memory only; after a restart they are asked of the destination itself (C-FIND at
study level, or QIDO-RS) by StudyInstanceUID. :func:`pending_results` counts what waits.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from medsight.errors import ConfigError, MedsightError
from medsight.serving.worklist import Study

log = logging.getLogger("medsight.pacs")

#: The statement every result carries, in the SR and its series description.
NOT_FOR_DIAGNOSIS = (
    "medsight AI triage result: NOT FOR DIAGNOSIS. A prioritisation aid only; the images must "
    "be read by a radiologist."
)
SERIES_DESCRIPTION = "medsight AI triage - not for diagnosis"
MANUFACTURER = "medsight"
#: The patient and study attributes copied from the source so the SR joins its study.
STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)
_SENDERS: weakref.WeakSet = weakref.WeakSet()


class DeliveryError(MedsightError):
    """A result could not be delivered (destination down, refused, or the study unknown)."""


def pending_results() -> int:
    """Results waiting for their destination, across the running senders (what ``/ready``
    should show as its PACS queue length)."""
    return sum(sender.pending() for sender in list(_SENDERS))


# ---------------------------------------------------------------------- the objects


def _code(value: str, scheme: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, scheme, meaning)


def build_sr(item: dict[str, Any], header: pydicom.Dataset) -> pydicom.Dataset:
    """The Comprehensive SR of one outbox ``item`` (see :meth:`ResultSender.enqueue`) in the
    study described by ``header`` (patient and study attributes of the source)."""
    import highdicom as hd
    from highdicom.sr import (
        ContainerContentItem,
        ImageContentItem,
        NumContentItem,
        RelationshipTypeValues,
        TextContentItem,
    )

    contains = RelationshipTypeValues.CONTAINS
    finding = item.get("urgency_finding") or item["label"]
    probabilities = item["probabilities"]
    items = [
        TextContentItem(
            _code("121071", "DCM", "Finding"), item["label"], relationship_type=contains
        ),
        NumContentItem(
            _code("PROB", "99MEDSIGHT", f"Model probability of {finding}"[:64]),
            float(probabilities.get(finding, max(probabilities.values()))),
            unit=_code("1", "UCUM", "no units"),
            relationship_type=contains,
        ),
        TextContentItem(
            _code("PROBS", "99MEDSIGHT", "Model probabilities"),
            "; ".join(f"{name} {value:.4f}" for name, value in probabilities.items()),
            relationship_type=contains,
        ),
        TextContentItem(
            _code("111001", "DCM", "Algorithm Name"),
            item["model"]["name"],
            relationship_type=contains,
        ),
        TextContentItem(
            _code("111003", "DCM", "Algorithm Version"),
            f"{item['model']['version']} (run {item['model']['run']})",
            relationship_type=contains,
        ),
        TextContentItem(
            _code("121106", "DCM", "Comment"), NOT_FOR_DIAGNOSIS, relationship_type=contains
        ),
        ImageContentItem(
            _code("260753009", "SCT", "Source"),
            referenced_sop_class_uid=item["source"]["sop_class"],
            referenced_sop_instance_uid=item["source"]["sop_instance"],
            relationship_type=contains,
        ),
    ]
    root = ContainerContentItem(_code("18748-4", "LN", "Diagnostic imaging report"))
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.ComprehensiveSR(
        evidence=[_evidence(item, header)],
        content=root,
        series_instance_uid=item["sr"]["series"],
        series_number=9901,
        sop_instance_uid=item["sr"]["instance"],
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = SERIES_DESCRIPTION
    return sr


def build_overlay(item: dict[str, Any], header: pydicom.Dataset, png: bytes) -> pydicom.Dataset:
    """A Secondary Capture (RGB) of the heat-map overlay picture ``png``, in the same study."""
    import highdicom as hd
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=_evidence(item, header),
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=item["overlay"]["series"],
        series_number=9902,
        sop_instance_uid=item["overlay"]["instance"],
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    sc.SeriesDescription = "medsight heat map - not for diagnosis"
    sc.BurnedInAnnotation = "YES"
    return sc


def _evidence(item: dict[str, Any], header: pydicom.Dataset) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for keyword in STUDY_KEYWORDS:
        if keyword in header:
            setattr(ds, keyword, header.data_element(keyword).value)
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        if keyword not in ds:
            setattr(ds, keyword, "")
    if str(ds.PatientSex).upper() not in ("M", "F", "O"):
        ds.PatientSex = ""  # highdicom refuses anything else; an SR without it still files
    ds.StudyInstanceUID = item["study_uid"]
    ds.SeriesInstanceUID = item["source"]["series"]
    ds.SOPClassUID = item["source"]["sop_class"]
    ds.SOPInstanceUID = item["source"]["sop_instance"]
    ds.Modality = item["source"].get("modality") or "OT"
    return ds


# ---------------------------------------------------------------------- destinations


@dataclass
class StoreDestination:
    """A DICOM C-STORE SCP (``AE@host:port``), called as ``calling_aet``."""

    ae_title: str
    host: str
    port: int
    calling_aet: str = "MEDSIGHT"
    timeout: float = 10.0

    @classmethod
    def parse(cls, text: str, calling_aet: str = "MEDSIGHT") -> StoreDestination:
        """``AE@host:port`` → a destination; a :class:`ConfigError` naming the text otherwise."""
        try:
            ae_title, address = text.split("@", 1)
            host, port = address.rsplit(":", 1)
            if not ae_title or not host or not 0 < int(port) < 65536:
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"--send-to {text!r} is not AE@host:port (e.g. ORTHANC@pacs.example.org:4242)"
            ) from None
        return cls(ae_title, host, int(port), calling_aet)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def _associate(self, contexts):
        from pynetdicom import AE

        from medsight.integration.dicom_node import quiet_dicom_libraries

        quiet_dicom_libraries()
        ae = AE(self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for context in contexts:
            ae.add_requested_context(*context)
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            raise DeliveryError(f"{self} did not accept an association (down or refusing)")
        return assoc

    def send(self, datasets: list[pydicom.Dataset]) -> None:
        contexts = {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}
        assoc = self._associate(sorted(contexts))
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None or code not in (0x0000, 0xB000, 0xB006, 0xB007):
                    raise DeliveryError(
                        f"{self} answered C-STORE of the {ds.SOPClassUID.name} with status "
                        f"{'none' if code is None else f'0x{code:04X}'}"
                    )
        finally:
            assoc.release()

    def lookup(self, study_uid: str) -> pydicom.Dataset | None:
        """The study's patient and study attributes, by C-FIND (study root, STUDY level)."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as find

        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        for keyword in STUDY_KEYWORDS:
            setattr(query, keyword, "")
        query.StudyInstanceUID = study_uid
        assoc = self._associate([(find,)])
        try:
            for status, identifier in assoc.send_c_find(query, find):
                if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
                    return identifier
        finally:
            assoc.release()
        return None


@dataclass
class StowDestination:
    """A DICOMweb server's root (``http://pacs/dicom-web``): STOW-RS to send, QIDO-RS to look
    up a study; credentials as for the poll (never on the command line)."""

    url: str
    auth: tuple[str, str] | None = None
    timeout: float = 30.0

    def __str__(self) -> str:
        return self.url

    def send(self, datasets: list[pydicom.Dataset]) -> None:
        import requests

        boundary = f"medsight-{generate_uid()}"
        body = io.BytesIO()
        for ds in datasets:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            body.write(buffer.getvalue())
            body.write(b"\r\n")
        body.write(f"--{boundary}--\r\n".encode())
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        try:
            response = requests.post(
                f"{self.url.rstrip('/')}/studies",
                data=body.getvalue(),
                headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
                auth=self.auth,
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise DeliveryError(f"{self} cannot be reached ({type(exc).__name__})") from None
        if response.status_code not in (200, 202):
            raise DeliveryError(f"{self} answered STOW-RS with HTTP {response.status_code}")

    def lookup(self, study_uid: str) -> pydicom.Dataset | None:
        import requests

        try:
            response = requests.get(
                f"{self.url.rstrip('/')}/studies",
                params={"StudyInstanceUID": study_uid, "includefield": "all"},
                headers={"Accept": "application/dicom+json"},
                auth=self.auth,
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise DeliveryError(f"{self} cannot be reached ({type(exc).__name__})") from None
        if response.status_code != 200 or not response.content:
            return None
        found = response.json()
        return pydicom.Dataset.from_json(found[0]) if found else None


# ---------------------------------------------------------------------- the outbox


class ResultSender:
    """Queues each scored study's result in ``outbox`` and delivers it to ``destination``
    (a :class:`StoreDestination` or :class:`StowDestination`), retrying with exponential
    backoff; ``overlay`` adds the heat-map Secondary Capture (needs ``model``)."""

    def __init__(
        self,
        destination: StoreDestination | StowDestination,
        outbox: str | Path,
        *,
        overlay: bool = False,
        model: Any = None,
        first_retry: float = 2.0,
        max_retry: float = 600.0,
    ):
        self.destination = destination
        self.outbox = Path(outbox)
        self.outbox.mkdir(parents=True, exist_ok=True)
        self.overlay = overlay
        self.model = model
        self.first_retry = first_retry
        self.max_retry = max_retry
        self._headers: dict[int, pydicom.Dataset] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        _SENDERS.add(self)
        if self.pending():
            log.info("%d result(s) waiting in the outbox for %s", self.pending(), destination)

    def pending(self) -> int:
        """Results not yet delivered."""
        return sum(1 for _ in self.outbox.glob("*.json"))

    def enqueue(self, study: Study, source: pydicom.Dataset, data: bytes | None = None) -> None:
        """Queue the result of ``study`` (scored from the instance whose header is ``source``;
        ``data``, its bytes, for the overlay). Only UIDs and the model's answer are written."""
        item = {
            "study_id": study.id,
            "study_uid": study.study_uid or str(source.StudyInstanceUID),
            "source": {
                "series": str(source.get("SeriesInstanceUID", "")),
                "sop_class": str(source.SOPClassUID),
                "sop_instance": str(source.SOPInstanceUID),
                "modality": str(source.get("Modality", "") or ""),
            },
            "label": study.label,
            "urgency_finding": study.urgency_finding,
            "probabilities": study.probabilities,
            "model": {
                "name": study.model_name,
                "run": study.model_run,
                "version": study.model_version,
            },
            "sr": {"series": generate_uid(), "instance": generate_uid()},
            "attempts": 0,
            "next_at": 0.0,
        }
        if self.overlay and self.model is not None and data is not None:
            try:
                scored = self.model.score(data)
                png = base64.b64decode(self.model.explain(scored)[2])
                (self.outbox / f"{study.id}.png").write_bytes(png)
                item["overlay"] = {"series": generate_uid(), "instance": generate_uid()}
            except Exception as exc:  # noqa: BLE001 - the SR goes without its overlay
                log.warning("worklist study %d: no heat-map overlay (%s)", study.id, exc)
        header = pydicom.Dataset()
        for keyword in STUDY_KEYWORDS:
            if keyword in source:
                setattr(header, keyword, source.data_element(keyword).value)
        with self._lock:
            self._headers[study.id] = header
            _write_json(self.outbox / f"{study.id}.json", item)
        log.info("worklist study %d: result queued for %s", study.id, self.destination)

    def deliver(self, force: bool = False) -> int:
        """Try every result that is due (all with ``force``); the number delivered."""
        delivered = 0
        for path in sorted(self.outbox.glob("*.json"), key=lambda p: int(p.stem)):
            item = json.loads(path.read_text())
            if not force and item.get("next_at", 0) > time.time():
                continue
            try:
                self._send(item, path)
            except Exception as exc:  # noqa: BLE001 - kept and retried, whatever went wrong
                item["attempts"] = item.get("attempts", 0) + 1
                delay = min(self.max_retry, self.first_retry * 2 ** (item["attempts"] - 1))
                item["next_at"] = time.time() + delay
                _write_json(path, item)
                log.warning(
                    "worklist study %d: result not delivered to %s (%s); retry %d in %.0f s; "
                    "%d result(s) waiting",
                    item["study_id"],
                    self.destination,
                    exc,
                    item["attempts"],
                    delay,
                    self.pending(),
                )
                continue
            delivered += 1
        return delivered

    def _send(self, item: dict[str, Any], path: Path) -> None:
        study_id = item["study_id"]
        header = self._headers.get(study_id)
        if header is None:  # a restart: ask the destination who the study belongs to
            header = self.destination.lookup(item["study_uid"])
            if header is None:
                raise DeliveryError(f"{self.destination} does not know the source study")
        datasets = [build_sr(item, header)]
        png = path.with_suffix(".png")
        if "overlay" in item and png.exists():
            datasets.append(build_overlay(item, header, png.read_bytes()))
        self.destination.send(datasets)
        path.unlink()
        png.unlink(missing_ok=True)
        with self._lock:
            self._headers.pop(study_id, None)
        log.info(
            "worklist study %d: result delivered to %s (%s); %d result(s) waiting",
            study_id,
            self.destination,
            " + ".join(ds.SOPClassUID.name for ds in datasets),
            self.pending(),
        )

    def start(self, every: float = 0.5) -> None:
        """Deliver in a background thread until :meth:`stop`."""
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(every):
                try:
                    self.deliver()
                except Exception:  # noqa: BLE001 - the loop must outlive any one result
                    log.exception("delivering results failed")

        self._thread = threading.Thread(target=loop, name="medsight-results", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _write_json(path: Path, item: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".result.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(item, fh)
    os.replace(tmp, path)
