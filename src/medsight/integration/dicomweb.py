"""DICOMweb polling, for a PACS that pushes nothing: QIDO-RS finds the studies since a date,
WADO-RS fetches one representative instance of each new one, and it is queued like any other
study (:func:`medsight.serving.intake.queue_study`: de-identified before it is stored).

>>> client = DicomWebClient("http://pacs/dicom-web", auth=load_credentials())   # doctest: +SKIP
>>> poll(model, store, client, since="20260101")                                # doctest: +SKIP
PollResult(found=3, queued=3, known=0, failed=0)

A study already on the worklist (by its source StudyInstanceUID, ``Study.study_uid``) is not
fetched again, so polling repeatedly never duplicates. The representative is the one the DICOM
node would score: the middle instance (by Instance Number) of the image series with the most
instances. Credentials come from ``MEDSIGHT_DICOMWEB_USER`` / ``MEDSIGHT_DICOMWEB_PASSWORD`` or a
``user:password`` file, never from the command line. A server that times out, cannot be
reached or refuses the credentials is one :class:`DicomWebError` naming the URL (never the
password).
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from medsight.data.privacy import pseudonymous_uid
from medsight.errors import ConfigError, MedsightError
from medsight.integration.dicom_node import context_from_dicom, known_study
from medsight.serving.intake import queue_study
from medsight.serving.service import ModelService
from medsight.serving.worklist import Study, WorklistStore

log = logging.getLogger("medsight.pacs")

USER_ENV, PASSWORD_ENV = "MEDSIGHT_DICOMWEB_USER", "MEDSIGHT_DICOMWEB_PASSWORD"
#: Series that hold no images to score.
NON_IMAGE_MODALITIES = {"SR", "KO", "PR", "DOC", "REG", "RWV", "PLAN", "AU", "ECG"}
_SINCE = re.compile(r"^(\d{8})(?:-(\d{6}))?$")


class DicomWebError(MedsightError):
    """The DICOMweb server could not be used (timeout, unreachable, 401/403, an error)."""


def load_credentials(file: str | Path | None = None) -> tuple[str, str] | None:
    """``(user, password)`` from ``file`` (one line ``user:password``) or from the environment
    (``MEDSIGHT_DICOMWEB_USER`` and ``MEDSIGHT_DICOMWEB_PASSWORD``); None when neither is set."""
    if file is not None:
        try:
            text = Path(file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"credentials file {file} cannot be read ({exc.strerror})") from None
        user, sep, password = text.partition(":")
        if not sep or not user:
            raise ConfigError(f"credentials file {file} must hold one line user:password")
        return user, password
    user, password = os.environ.get(USER_ENV), os.environ.get(PASSWORD_ENV)
    if bool(user) != (password is not None):
        raise ConfigError(f"set both {USER_ENV} and {PASSWORD_ENV}, or neither")
    return (user, password) if user else None


def parse_since(text: str) -> tuple[str, str]:
    """``YYYYMMDD`` or ``YYYYMMDD-HHMMSS`` → ``(date, time)`` (time ``""`` when not given)."""
    match = _SINCE.match(text.strip())
    if not match:
        raise ConfigError(f"--since {text!r} is not YYYYMMDD or YYYYMMDD-HHMMSS (e.g. 20260131)")
    return match.group(1), match.group(2) or ""


def _value(entry: dict[str, Any], tag: str, default: Any = None) -> Any:
    values = (entry.get(tag) or {}).get("Value") or []
    return values[0] if values else default


class DicomWebClient:
    """QIDO-RS and WADO-RS against one DICOMweb root (``http://pacs/dicom-web``)."""

    def __init__(self, url: str, auth: tuple[str, str] | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.auth = auth
        self.timeout = timeout

    def _get(self, path: str, params: dict | None = None, accept: str = "application/dicom+json"):
        import requests

        try:
            response = requests.get(
                f"{self.url}{path}",
                params=params,
                headers={"Accept": accept},
                auth=self.auth,
                timeout=self.timeout,
            )
        except requests.Timeout:
            raise DicomWebError(
                f"DICOMweb server {self.url} did not answer within {self.timeout:g} s"
            ) from None
        except requests.RequestException as exc:
            raise DicomWebError(
                f"DICOMweb server {self.url} cannot be reached ({type(exc).__name__})"
            ) from None
        if response.status_code in (401, 403):
            raise DicomWebError(
                f"DICOMweb server {self.url} refused the credentials (HTTP "
                f"{response.status_code}); set {USER_ENV} and {PASSWORD_ENV} or pass "
                "--credentials-file"
            )
        if response.status_code == 204:
            return None
        if response.status_code != 200:
            raise DicomWebError(
                f"DICOMweb server {self.url} answered HTTP {response.status_code} to {path}"
            )
        return response

    def _json(self, path: str, params: dict | None = None) -> list[dict]:
        response = self._get(path, params)
        return [] if response is None or not response.content else response.json()

    def studies(self, since_date: str) -> list[dict]:
        """QIDO-RS: the studies from ``since_date`` (YYYYMMDD) on."""
        params = {"StudyDate": f"{since_date}-", "includefield": "00080030"}
        return self._json("/studies", params)

    def series(self, study_uid: str) -> list[dict]:
        return self._json(f"/studies/{study_uid}/series", {"includefield": "00201209"})

    def instances(self, study_uid: str, series_uid: str) -> list[dict]:
        path = f"/studies/{study_uid}/series/{series_uid}/instances"
        return self._json(path, {"includefield": "00200013"})

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        """WADO-RS: one instance's DICOM file (the first part of the multipart answer)."""
        path = f"/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
        response = self._get(path, accept='multipart/related; type="application/dicom"')
        parts = multipart_parts(response.content, response.headers.get("Content-Type", ""))
        if not parts:
            raise DicomWebError(f"DICOMweb server {self.url} sent no DICOM part for {path}")
        return parts[0]


def multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of a ``multipart/related`` answer."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        return [body] if body[128:132] == b"DICM" else []
    delimiter = b"--" + match.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        _, sep, content = chunk.partition(b"\r\n\r\n")
        if sep:
            parts.append(content[:-2] if content.endswith(b"\r\n") else content)
    return parts


@dataclass
class PollResult:
    found: int = 0
    queued: int = 0
    known: int = 0
    failed: int = 0


def poll(
    model: ModelService, store: WorklistStore, client: DicomWebClient, since: str
) -> PollResult:
    """Queue every study since ``since`` (YYYYMMDD[-HHMMSS]) not yet on the worklist."""
    since_date, since_time = parse_since(since)
    result = PollResult()
    for entry in client.studies(since_date):
        uid = _value(entry, "0020000D")
        if not uid:
            continue
        when = (str(_value(entry, "00080020", "")), str(_value(entry, "00080030", ""))[:6])
        if since_time and when[0] == since_date and when[1] and when[1] < since_time:
            continue
        result.found += 1
        if known_study(store, uid) is not None:
            result.known += 1
            continue
        name = f"study {pseudonymous_uid(uid)}"
        try:
            study = _queue_one(model, store, client, uid)
        except DicomWebError:
            raise
        except Exception as exc:  # noqa: BLE001 - one study's failure does not stop the poll
            log.warning("%s: not queued (%s)", name, " ".join(str(exc).split())[:300])
            result.failed += 1
            continue
        if study is None:
            log.warning("%s: no image instance could be scored; not queued", name)
            result.failed += 1
        else:
            log.info("%s fetched by DICOMweb and queued as worklist study %d", name, study.id)
            result.queued += 1
    log.info(
        "DICOMweb poll of %s since %s: %d found, %d queued, %d already known, %d failed",
        client.url,
        since,
        result.found,
        result.queued,
        result.known,
        result.failed,
    )
    return result


def _queue_one(
    model: ModelService, store: WorklistStore, client: DicomWebClient, study_uid: str
) -> Study | None:
    series = [
        s
        for s in client.series(study_uid)
        if str(_value(s, "00080060", "")).upper() not in NON_IMAGE_MODALITIES
    ]
    series.sort(key=lambda s: -int(_value(s, "00201209", 0) or 0))
    for entry in series[:3]:
        series_uid = _value(entry, "0020000E")
        members = client.instances(study_uid, series_uid)
        members.sort(key=lambda i: (_number(_value(i, "00200013")), _value(i, "00080018", "")))
        middle = (len(members) - 1) / 2
        order = sorted(range(len(members)), key=lambda i: (abs(i - middle), i))
        for i in order[:3]:
            data = client.retrieve(study_uid, series_uid, _value(members[i], "00080018"))
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            if "PixelData" not in pydicom.dcmread(io.BytesIO(data)):
                break  # not an image series after all
            try:
                return queue_study(
                    model, store, data, context=context_from_dicom(ds), study_uid=study_uid
                )
            except MedsightError as exc:
                log.warning(
                    "study %s: an instance could not be scored (%s); trying another",
                    pseudonymous_uid(study_uid),
                    exc,
                )
    return None


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("inf")
