"""Pseudonymise identifiers and de-identify DICOM files, so no patient identifier is ever stored.

A pseudonym is a keyed hash (HMAC-SHA256) of the raw value with a secret salt: the same patient
always gets the same pseudonym on one installation (so splits stay grouped by patient), and the
raw ID cannot be recovered from it without the salt. DICOM instance UIDs are remapped with the
same keyed hash, so the instances of one study or series stay grouped after de-identification.

:func:`deidentify_dicom` applies the DICOM PS3.15 Basic Application Level Confidentiality
Profile (Table E.1-1). The table is not kept by hand here: it is the one generated from the
standard that ``dicom-anonymizer`` ships (``dicomfields_2026c``). Of the maintained options:

- ``deid`` (pydicom/deid): a recipe language; its default recipe is a curated best-effort list
  (it keeps ProtocolName, for one) and it pulls in matplotlib for pixel filters.
- ``dicognito``: realistic fake names, date shifting and seeded UID hashing, but driven by its
  own keyword lists and VRs rather than Table E.1-1 (free-text descriptions survive).
- ``dicom-anonymizer`` (Kitware): Table E.1-1 parsed from the standard (2023, 2024b, 2026c) with
  every action (X, Z, D, U and the compound ones); its engine, however, applies single tags at
  the top level only and maps UIDs randomly per process.

So medsight uses dicom-anonymizer's table with its own small engine: every action at every
sequence depth, UIDs remapped with the installation's salted keyed hash (the same source UID
always maps to the same new UID), the patient ID replaced by its salted pseudonym.

No option of the profile is applied, so nothing is retained: private attributes are all removed
(no Retain Safe Private), dates and times are emptied or dummied (no Retain Longitudinal
Temporal Information), and so are device, institution and patient characteristics. Pixel data
are not cleaned (no Clean Pixel Data), which is why a file flagged BurnedInAnnotation = YES is
refused rather than stored.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import secrets
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

from medsight.errors import DataError

SALT_ENV = "MEDSIGHT_SALT"

#: The Table E.1-1 release (a module of dicom-anonymizer) that :func:`deidentify_dicom` applies.
PROFILE_TABLE = "dicomfields_2026c"

#: What medsight does for each action of Table E.1-1. Whether an attribute is Type 1, 2 or 3
#: depends on the IOD, which a generic de-identifier does not know; so a compound action keeps
#: the attribute whenever the standard allows keeping it, with no original content: an empty
#: value (Z) where that is allowed, else a dummy (D). Nothing identifying survives either way.
_APPLIED = {
    "X_TAGS": "X",
    "Z_TAGS": "Z",
    "D_TAGS": "D",
    "U_TAGS": "U",
    "Z_D_TAGS": "D",
    "X_Z_TAGS": "Z",
    "X_D_TAGS": "D",
    "X_Z_D_TAGS": "D",
    "X_Z_U_STAR_TAGS": "U*",
}

_DUMMY_TEXT = "ANONYMIZED"
_DUMMIES: dict[str, Any] = {
    "AS": "000Y",
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
    "UR": "http://anonymized.invalid",
}
_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT"})

#: The Basic Application Level Confidentiality Profile, as DeidentificationMethodCodeSequence
#: names it (CID 7050). No option of the profile is applied: nothing is retained.
PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")


class DeidentificationError(DataError):
    """A DICOM file that cannot be de-identified safely (the message says why and what to do)."""


def salt_file() -> Path:
    """Where the installation's salt lives (``$XDG_CONFIG_HOME/medsight/salt``)."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "medsight" / "salt"


def pseudonym_salt() -> bytes:
    """The salt: ``$MEDSIGHT_SALT`` when set, else a random one created once and kept private."""
    from_env = os.environ.get(SALT_ENV)
    if from_env:
        return from_env.encode()
    path = salt_file()
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(salt)
    return salt


def pseudonymise(raw: str, salt: bytes | None = None) -> str:
    """A stable pseudonym such as ``p-3f9a0c...`` for ``raw`` (empty input stays empty).

    >>> pseudonymise("12345", salt=b"k") == pseudonymise("12345", salt=b"k")
    True
    """
    raw = str(raw).strip()
    if not raw:
        return ""
    key = pseudonym_salt() if salt is None else salt
    return "p-" + hmac.new(key, raw.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def pseudonymous_uid(uid: str, salt: bytes | None = None) -> str:
    """The UID that replaces ``uid`` on this installation: ``2.25.`` and a keyed-hash UUID.

    Deterministic for one salt, so two instances of one study keep one (new) StudyInstanceUID;
    the source UID cannot be recovered without the salt. Empty input stays empty.

    >>> pseudonymous_uid("1.2.3", salt=b"k") == pseudonymous_uid("1.2.3", salt=b"k")
    True
    >>> pseudonymous_uid("1.2.3", salt=b"k").startswith("2.25.")
    True
    """
    uid = str(uid).strip().rstrip("\x00")
    if not uid:
        return ""
    key = pseudonym_salt() if salt is None else salt
    # A domain prefix keeps UID hashes apart from patient pseudonyms made with the same salt.
    digest = hmac.new(key, b"uid:" + uid.encode("ascii", "replace"), hashlib.sha256).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"


@lru_cache(maxsize=1)
def profile_actions() -> tuple[dict[int, str], tuple[tuple[int, int, int, int, str], ...]]:
    """Table E.1-1 as medsight applies it: ``({tag: action}, ((group, element, group mask,
    element mask, action), ...))`` for single tags and repeating groups (curves, overlays)."""
    import importlib

    table = importlib.import_module(
        f"dicomanonymizer.dicom_anonymization_databases.{PROFILE_TABLE}"
    )
    single: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in _APPLIED.items():
        for entry in getattr(table, category):
            if len(entry) == 2:
                single[(entry[0] << 16) | entry[1]] = action
            else:
                masked.append((*entry, action))
    return single, tuple(masked)


def _action(tag: int, single: dict[int, str], masked) -> str | None:
    action = single.get(tag)
    if action is not None:
        return action
    group, element = tag >> 16, tag & 0xFFFF
    for g, e, g_mask, e_mask, masked_action in masked:
        if group & g_mask == g & g_mask and element & e_mask == e & e_mask:
            return masked_action
    return None


def _is_empty(value: Any) -> bool:
    if value is None or isinstance(value, (int, float)):
        return value is None
    return len(value) == 0 if hasattr(value, "__len__") else str(value) == ""


def _vr(element) -> str:
    # An ambiguous VR ("US or SS", "OB or OW") left unresolved: either one is stored alike.
    return str(element.VR).split(" ")[0]


def _remap(value: Any, salt: bytes) -> Any:
    from pydicom.multival import MultiValue

    if isinstance(value, (list, tuple, MultiValue)):
        return [pseudonymous_uid(v, salt) for v in value]
    return pseudonymous_uid(value, salt)


def _empty(element) -> None:
    vr = _vr(element)
    if vr == "SQ":
        element.value = []
    elif vr in _TEXT_VRS or vr in _DUMMIES or vr == "UI":
        element.value = ""
    elif vr in _NUMBER_VRS:
        element.value = None
    else:  # OB, OW, OF, UN and the like
        element.value = b""


def _dummy(element, salt: bytes) -> None:
    vr = _vr(element)
    if _is_empty(element.value):
        return  # Z satisfies Z/D and D for a value that was empty already
    if vr == "SQ":
        # A dummy item would be invented content; the sequences that Table E.1-1 replaces
        # (content, graphic annotation, observers) are not required by image IODs.
        element.value = []
    elif vr == "UI":
        element.value = _remap(element.value, salt)
    elif vr in _DUMMIES:
        element.value = _DUMMIES[vr]
    elif vr in _TEXT_VRS:
        element.value = _DUMMY_TEXT
    elif vr in _NUMBER_VRS:
        element.value = 0
    else:
        element.value = b"\x00\x00"


def _apply_profile(dataset, salt: bytes, single, masked) -> None:
    """Table E.1-1 on ``dataset`` and, recursively, on every item of every sequence kept."""
    for tag in list(dataset.keys()):
        element = dataset[tag]
        action = _action(int(tag), single, masked)
        if action == "X":
            del dataset[tag]
        elif action == "Z":
            _empty(element)
        elif action == "D":
            _dummy(element, salt)
        elif action == "U" or (action == "U*" and element.VR == "UI"):
            if not _is_empty(element.value):
                element.value = _remap(element.value, salt)
        elif action == "U*" and element.VR != "SQ":
            _empty(element)
        elif element.VR == "SQ":  # kept (or U*): its items are de-identified in turn
            for item in element.value:
                _apply_profile(item, salt, single, masked)
        elif element.VR == "PN" and not _is_empty(element.value):
            # Beyond the table: a person's name in any attribute the table keeps is emptied.
            element.value = ""


def deidentify_dicom(data: bytes, salt: bytes | None = None) -> tuple[bytes, dict[str, Any]]:
    """A DICOM file de-identified to the PS3.15 Basic Profile, and the metadata kept from it.

    Every attribute of Table E.1-1 is removed (X), emptied (Z), replaced by a dummy (D) or,
    for UIDs (U), remapped with :func:`pseudonymous_uid`, at any sequence depth; private tags
    are removed; the patient ID becomes its salted pseudonym (so one patient's studies still
    group together), the patient's name is emptied. The result says so the standard way
    (PatientIdentityRemoved, DeidentificationMethod and its code sequence, 113100).

    A file whose BurnedInAnnotation is ``YES`` is refused with :class:`DeidentificationError`:
    the Basic Profile alone does not clean pixel data, and stored pixels would show the text.

    >>> clean, meta = deidentify_dicom(open("scan.dcm", "rb").read())   # doctest: +SKIP
    >>> meta["patient"]                                                  # doctest: +SKIP
    'p-3f9a0c...'
    """
    import pydicom
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(io.BytesIO(data))
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        raise DeidentificationError(
            "DICOM BurnedInAnnotation is 'YES': its pixels may show patient identifiers, which "
            "medsight does not remove; send an image without burned-in text"
        )
    key = pseudonym_salt() if salt is None else salt
    raw_id = str(ds.get("PatientID", "") or "")
    meta = {
        "modality": str(ds.get("Modality", "")) or None,
        "body_part": str(ds.get("BodyPartExamined", "")) or None,
        "view": str(ds.get("ViewPosition", "")) or None,
        "photometric": str(ds.get("PhotometricInterpretation", "")) or None,
        "rows": int(ds.get("Rows", 0) or 0),
        "columns": int(ds.get("Columns", 0) or 0),
    }

    single, masked = profile_actions()
    ds.remove_private_tags()
    _apply_profile(ds, key, single, masked)
    if getattr(ds, "file_meta", None) is not None:
        _apply_profile(ds.file_meta, key, single, masked)
    patient = pseudonymise(raw_id, key) if raw_id.strip() else None
    if patient:
        ds.PatientID = patient
    ds.PatientIdentityRemoved = "YES"
    ds.LongitudinalTemporalInformationModified = "REMOVED"
    ds.DeidentificationMethod = [
        "DICOM PS3.15 Basic Profile (Table E.1-1 2026c)",
        "UIDs remapped by keyed hash; patient ID pseudonymised",
        "private attributes removed",
    ]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = [code]
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue(), {**meta, "patient": patient}
