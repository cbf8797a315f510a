"""Triage that weighs clinical context: the fields a study may carry besides its image, checked
once where they are received (upload, DICOM node, DICOMweb, sidecar).

>>> check_context({"priority": "STAT", "age_years": "67"})
{'priority': 'stat', 'age_years': 67.0}
"""

from __future__ import annotations

import math
from typing import Any

from medsight.errors import DataError

#: Referral priorities, most urgent first.
PRIORITIES = ("stat", "urgent", "routine")
#: Where the patient is.
SETTINGS = ("emergency", "inpatient", "outpatient")
#: The context fields a study may carry, and what each holds.
CONTEXT_FIELDS = {
    "priority": "referral priority: stat, urgent or routine",
    "age_years": "the patient's age in years (0-130)",
    "prior_findings": "known prior positive findings (a list of names; [] for none)",
    "setting": "emergency, inpatient or outpatient",
}
#: DICOM RequestedProcedurePriority (0040,1003) → priority.
DICOM_PRIORITY = {"STAT": "stat", "HIGH": "urgent", "MEDIUM": "routine", "ROUTINE": "routine"}
DICOM_PRIORITY["LOW"] = "routine"


def check_context(raw: dict[str, Any] | None) -> dict[str, Any]:
    """The context fields of ``raw``, normalised (empty values dropped); a field that is not
    known, or a value that is impossible (age −3, priority "soon"), is a :class:`DataError`
    naming the field, the value and what is accepted."""
    if not raw:
        return {}
    unknown = sorted(set(raw) - set(CONTEXT_FIELDS))
    if unknown:
        known = ", ".join(CONTEXT_FIELDS)
        raise DataError(f"unknown context field(s) {', '.join(unknown)}; known: {known}")
    context: dict[str, Any] = {}
    for name, value in raw.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        context[name] = _CHECKS[name](value)
    return context


def _choice(name: str, choices: tuple[str, ...]):
    def check(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise DataError(f"context {name} {value!r} is not one of {', '.join(choices)}")
        return text

    return check


def _age(value: Any) -> float:
    try:
        age = float(value)
    except (TypeError, ValueError):
        age = math.nan
    if isinstance(value, bool) or not 0 <= age <= 130:
        raise DataError(f"context age_years {value!r} is not an age in years (0-130)")
    return age


def _findings(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [part for part in value.replace(";", ",").replace("|", ",").split(",")]
    if isinstance(value, bool) or not isinstance(value, list | tuple):
        raise DataError(
            f"context prior_findings {value!r} is not a list of finding names "
            '(e.g. ["nodule"], or "nodule,effusion")'
        )
    return [str(item).strip() for item in value if str(item).strip()]


_CHECKS = {
    "priority": _choice("priority", PRIORITIES),
    "age_years": _age,
    "prior_findings": _findings,
    "setting": _choice("setting", SETTINGS),
}
