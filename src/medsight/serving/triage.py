"""Triage that weighs clinical context: the fields a study may carry besides its image, checked
once where they are received (upload, DICOM node, DICOMweb, sidecar), and the worklist policy
that orders studies by them and by the model's risk, saying for each study why it sits where
it does.

A policy is a YAML file of rules, most important first (``policies/default.yaml`` is the
default; ``medsight serve RUN --policy FILE`` another). Studies are sorted by the first rule;
those it cannot tell apart by the next, and so on; studies no rule tells apart are taken in
order of arrival (then by id), so the order is always the same for the same studies.

>>> check_context({"priority": "STAT", "age_years": "67"})
{'priority': 'stat', 'age_years': 67.0}
>>> load_policy(None).describe()[0]
'STAT referrals'
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from medsight.errors import ConfigError, DataError

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


# --------------------------------------------------------------------------- the policy

#: The policy medsight orders the worklist by unless ``--policy`` names another.
DEFAULT_POLICY = Path(__file__).parent / "policies" / "default.yaml"

Priority = Literal["stat", "urgent", "routine"]
Setting = Literal["emergency", "inpatient", "outpatient"]


class Rule(BaseModel):
    """One rule of a policy: exactly one of its fields, e.g. ``{"priority": ["stat"]}``."""

    model_config = ConfigDict(extra="forbid")

    priority: list[Priority] | None = None
    risk_above: str | None = None
    prior_findings: Literal[True] | list[str] | None = None
    setting: list[Setting] | None = None
    age_at_least: float | None = None
    age_below: float | None = None
    risk: Literal["highest"] | None = None
    waiting: Literal["longest"] | None = None
    waiting_over: timedelta | None = None

    @field_validator("priority", "setting", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        values = [value] if isinstance(value, str) else value
        return [str(v).strip().lower() for v in values] if isinstance(values, list) else values

    @field_validator("age_at_least", "age_below")
    @classmethod
    def _an_age(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value <= 130:
            raise ValueError(f"{value:g} is not an age in years (0-130)")
        return value

    @field_validator("waiting_over", mode="before")
    @classmethod
    def _a_duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> Rule:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            what = ", ".join(given) if given else "nothing"
            raise ValueError(
                f"a rule is exactly one of {', '.join(RULES)}; this one gives {what} (write one "
                "rule per '- ' line)"
            )
        return self

    @property
    def kind(self) -> str:
        return next(name for name in RULES if getattr(self, name) is not None)

    @property
    def value(self) -> Any:
        return getattr(self, self.kind)

    def describe(self) -> str:
        """What the rule puts first, in words: ``"STAT referrals"``."""
        kind, value = self.kind, self.value
        if kind == "priority":
            return _then([p.upper() if p == "stat" else p for p in value]) + " referrals"
        if kind == "setting":
            return _then([_SETTING_WORDS[s] + "s" for s in value])
        if kind == "risk_above":
            return f"model risk at or above the {point_words(value)}"
        if kind == "prior_findings":
            named = "" if value is True else " of " + " or ".join(value)
            return f"known prior findings{named}"
        if kind == "age_at_least":
            return f"patients aged {value:g} or over"
        if kind == "age_below":
            return f"patients under {value:g}"
        if kind == "risk":
            return "higher model risk"
        if kind == "waiting":
            return "the longest waiting"
        return f"waiting over {duration_words(value)}"


#: The rules a policy may use, in the order they are documented.
RULES = tuple(Rule.model_fields)


class Policy(BaseModel):
    """A worklist order: ``order``, a list of :class:`Rule`, most important first."""

    model_config = ConfigDict(extra="forbid")

    order: list[Rule]
    #: Where the policy was read from (for messages); not a field of the file.
    _source: str = PrivateAttr("<policy>")

    @property
    def source(self) -> str:
        return self._source

    @field_validator("order")
    @classmethod
    def _some(cls, value: list[Rule]) -> list[Rule]:
        if not value:
            raise ValueError("the order is empty; give at least one rule")
        return value

    def describe(self) -> list[str]:
        """What each rule puts first, in words, most important rule first."""
        return [rule.describe() for rule in self.order]

    def points(self) -> list[str]:
        """The operating points the policy's ``risk_above`` rules name."""
        return [rule.risk_above for rule in self.order if rule.risk_above is not None]


def load_policy(path: str | Path | None = None) -> Policy:
    """The policy in the YAML file ``path`` (None: medsight's default,
    ``medsight/serving/policies/default.yaml``). A field that is not part of the format is a
    :class:`ConfigError` naming the file, the field and the fields allowed.

    >>> [r.kind for r in load_policy().order][:2]
    ['priority', 'risk_above']
    """
    import yaml

    source = Path(path) if path is not None else DEFAULT_POLICY
    try:
        text = source.read_text()
    except OSError as exc:
        raise ConfigError(
            f"policy file {source} cannot be read ({exc.strerror or exc}); give the path of a "
            "YAML policy (medsight/serving/policies/default.yaml shows the format)"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a policy is a mapping with the field 'order' (a list)")
    try:
        policy = Policy(**raw)
    except ValidationError as exc:
        # An unknown field first (the usual slip), then one problem per place in the file.
        errors = sorted(exc.errors(), key=lambda e: e.get("type") != "extra_forbidden")
        seen, problems = set(), []
        for error in errors:
            if tuple(error.get("loc", ()))[:3] not in seen:
                seen.add(tuple(error.get("loc", ()))[:3])
                problems.append(_policy_problem(error))
        raise ConfigError(f"{source}: {'; '.join(problems)}") from None
    policy._source = str(source)
    return policy


def _policy_problem(error: dict) -> str:
    loc = list(error.get("loc", ()))
    where = f"rule {loc[1] + 1}" if len(loc) >= 2 and loc[0] == "order" else ""
    if error.get("type") == "extra_forbidden":
        name = loc[-1]
        if where:
            return f"{where}: unknown field {name!r}; a rule is one of: {', '.join(RULES)}"
        return f"unknown field {name!r}; allowed fields: order"
    if error.get("type") == "missing" and loc == ["order"]:
        return "no field 'order' (the list of rules, most important first)"
    field_name = loc[2] if len(loc) >= 3 and where else ".".join(map(str, loc))
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    label = f"{where} ({field_name})" if where and len(loc) >= 3 else (where or field_name)
    given = error.get("input")
    shown = ""
    if len(loc) >= 3 and not isinstance(given, dict | list) and repr(given) not in message:
        shown = f", got {given!r}"
    return f"{label}: {message}{shown}"


# --------------------------------------------------------------------------- ordering


def order_studies(
    studies: Iterable[Any],
    policy: Policy,
    thresholds: Mapping[str, Mapping[str, float]] | None = None,
    now: datetime | None = None,
) -> list[tuple[Any, str]]:
    """``studies`` in ``policy`` order, each with the sentence saying why it sits there.

    ``thresholds``: ``{output: {operating point: threshold}}`` of the outputs triage watches
    (the run's urgent class, or its urgent findings), from its evaluated operating points
    (``metrics.json``); a ``risk_above`` rule whose point is missing tells no study apart.
    ``now``: the time waiting is measured to (default: now). A study needs ``id``,
    ``received_at``, ``urgency``, ``probabilities`` and ``context`` (``urgency_finding``
    optional): a worklist :class:`~medsight.serving.worklist.Study`.

    >>> [(s.id, why) for s, why in order_studies(studies, load_policy(), thresholds,
    ...                                         now)]                       # doctest: +SKIP
    [(7, 'stat referral; risk 0.91 above the 90 %-sensitivity threshold (0.62); waiting 3 h')]
    """
    now = now or datetime.now(timezone.utc)
    judged = [_Judged.of(study, thresholds or {}, now) for study in studies]
    judged.sort(key=lambda j: (*(j.key(rule) for rule in policy.order), j.arrived, j.study.id))
    return [(j.study, j.why(policy)) for j in judged]


@dataclass
class _Judged:
    """One study with what the rules look at: its context, risk, waiting time."""

    study: Any
    context: dict
    risk: float
    arrived: float
    waited: timedelta
    #: ``{output: probability}`` of the watched outputs.
    scores: dict[str, float]
    thresholds: Mapping[str, Mapping[str, float]]
    stated: set = field(default_factory=set)

    @classmethod
    def of(cls, study, thresholds, now: datetime) -> _Judged:
        received = study.received_at
        if received.tzinfo is None:  # SQLite forgets the zone: stored times are UTC
            received = received.replace(tzinfo=timezone.utc)
        probabilities = study.probabilities or {}
        return cls(
            study=study,
            context=study.context or {},
            risk=float(study.urgency),
            arrived=received.timestamp(),
            waited=max(now - received, timedelta(0)),
            scores={k: float(probabilities[k]) for k in thresholds if k in probabilities},
            thresholds=thresholds,
        )

    def above(self, point: str) -> list[tuple[str, float, float]]:
        """``(output, probability, threshold)`` of each watched output at or above its
        threshold at ``point``."""
        found = []
        for name, p in self.scores.items():
            t = self.thresholds[name].get(point)
            if t is not None and p >= t:
                found.append((name, p, float(t)))
        return found

    def key(self, rule: Rule):
        """Where ``rule`` puts this study: smaller first."""
        kind, value = rule.kind, rule.value
        if kind in ("priority", "setting"):
            mine = self.context.get(kind)
            return value.index(mine) if mine in value else len(value)
        if kind == "risk_above":
            return 0 if self.above(value) else 1
        if kind == "prior_findings":
            return 0 if self.priors(value) else 1
        if kind in ("age_at_least", "age_below"):
            age = self.context.get("age_years")
            if age is None:
                return 1
            return 0 if (age >= value if kind == "age_at_least" else age < value) else 1
        if kind == "risk":
            return -self.risk
        if kind == "waiting":
            return self.arrived
        return 0 if self.waited > value else 1  # waiting_over

    def priors(self, wanted) -> list[str]:
        known = [str(f) for f in self.context.get("prior_findings") or []]
        if wanted is True:
            return known
        wanted = {w.lower() for w in wanted}
        return [f for f in known if f.lower() in wanted]

    def why(self, policy: Policy) -> str:
        """The reasons, one per rule that says something about this study, in policy order."""
        reasons = [self.reason(rule) for rule in policy.order]
        if not any(rule.kind in ("waiting", "waiting_over") for rule in policy.order):
            reasons.append(f"waiting {duration_words(self.waited)}")
        return "; ".join(r for r in reasons if r) or "in order of arrival"

    def reason(self, rule: Rule) -> str | None:
        kind, value = rule.kind, rule.value
        if kind in ("priority", "setting"):
            mine = self.context.get(kind)
            if mine not in value:
                return None
            return f"{mine} referral" if kind == "priority" else _SETTING_WORDS[mine]
        if kind == "risk_above":
            return self.risk_reason(value)
        if kind == "prior_findings":
            found = self.priors(value)
            if not found:
                return None
            return ("prior finding: " if len(found) == 1 else "prior findings: ") + ", ".join(found)
        if kind in ("age_at_least", "age_below"):
            if self.key(rule) or "age" in self.stated:
                return None
            self.stated.add("age")
            return f"aged {self.context['age_years']:g}"
        if kind == "risk":
            if "risk" in self.stated:
                return None
            self.stated.add("risk")
            if len(self.thresholds) > 1:
                finding = getattr(self.study, "urgency_finding", None)
                return f"urgency {self.risk:.2f}" + (f" (set by {finding})" if finding else "")
            return f"risk {self.risk:.2f}"
        if "waiting" in self.stated:
            return None
        if kind == "waiting_over" and self.key(rule):
            return None
        self.stated.add("waiting")
        over = f", over {duration_words(value)}" if kind == "waiting_over" else ""
        return f"waiting {duration_words(self.waited)}{over}"

    def risk_reason(self, point: str) -> str | None:
        known = {name: t[point] for name, t in self.thresholds.items() if t.get(point) is not None}
        if not known or not self.scores:
            return None  # the run was not evaluated at this point: nothing to say
        self.stated.add("risk")
        words = point_words(point)
        hits = self.above(point)
        if len(self.thresholds) == 1:
            name, threshold = next(iter(known.items()))
            p = self.scores.get(name)
            if p is None:
                return None
            side = "above" if hits else "below"
            risk, limit = _apart(p, threshold)
            return f"risk {risk} {side} the {words} ({limit})"
        if not hits:
            return f"no urgent finding at its {words}"
        reasons = []
        for name, p, threshold in hits:
            risk, limit = _apart(p, threshold)
            reasons.append(f"{name} {risk} above its {words} ({limit})")
        return "; ".join(reasons)


#: A setting as the why-sentence says it (plural with "s" in a rule's description).
_SETTING_WORDS = {
    "emergency": "emergency patient",
    "inpatient": "inpatient",
    "outpatient": "outpatient",
}


def _apart(value: float, threshold: float) -> tuple[str, str]:
    """A risk and its threshold to 2 decimals, or as many more (up to 4) as it takes to show
    them apart: "0.501 below (0.502)", never "0.50 below (0.50)"."""
    for digits in (2, 3, 4):
        shown = f"{value:.{digits}f}", f"{threshold:.{digits}f}"
        if shown[0] != shown[1] or value == threshold:
            break
    return shown


def _then(items: list[str]) -> str:
    return ", then ".join(items)


def point_words(point: str) -> str:
    """An evaluated operating point in words: ``sensitivity_0.90`` → ``90 %-sensitivity
    threshold``."""
    match = re.fullmatch(r"(sensitivity|specificity)_(0?\.\d+|1(?:\.0+)?)", point)
    if match:
        return f"{round(100 * float(match[2])):d} %-{match[1]} threshold"
    match = re.fullmatch(r"fp_(\d+(?:\.\d+)?)", point)
    if match:
        return f"{float(match[1]):g}-false-positive-per-image threshold"
    return "Youden threshold" if point == "youden" else f"{point} threshold"


def check_points(
    policy: Policy, operating_points: Mapping[str, Mapping[str, Any]], strict: bool = True
) -> list[str]:
    """Check the points ``risk_above`` rules name against a run's evaluated ``operating_points``
    (``{output: {point: ...}}``). A point the evaluated run does not have is a
    :class:`ConfigError` listing those it has (``strict``; else a warning: the default policy
    on a detection run, evaluated at false-positive rates). Returns warnings for rules that
    cannot act, which order nothing."""
    points = policy.points()
    if not points:
        return []
    available = sorted({point for per in operating_points.values() for point in per})
    if not available:
        return [
            f"{policy.source}: 'risk_above: {point}' orders nothing until the run is evaluated "
            "(medsight evaluate RUN writes its operating points)"
            for point in points
        ]
    missing = [point for point in points if point not in available]
    if missing and strict:
        raise ConfigError(
            f"{policy.source}: risk_above {', '.join(map(repr, missing))} is not an operating "
            f"point of this run; its evaluated points: {', '.join(available)}"
        )
    return [
        f"{policy.source}: 'risk_above: {point}' orders nothing: the run was evaluated at "
        f"{', '.join(available)}; pass --policy with one of those"
        for point in missing
    ]


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(d|days?|h|hours?|min|minutes?|m)\s*", re.I)


def parse_duration(text: str) -> timedelta:
    """``"4h"``, ``"90 min"``, ``"1 h 30 min"``, ``"2d"`` → a :class:`timedelta`."""
    pos, total = 0, timedelta(0)
    text = str(text).strip()
    while pos < len(text):
        match = _DURATION.match(text, pos)
        if not match:
            raise ValueError(f"{text!r} is not a duration; write e.g. 4h, 90 min or 1 h 30 min")
        number, unit = float(match[1]), match[2].lower()
        if unit.startswith("d"):
            total += timedelta(days=number)
        elif unit.startswith("h"):
            total += timedelta(hours=number)
        else:
            total += timedelta(minutes=number)
        pos = match.end()
    if total <= timedelta(0):
        raise ValueError(f"{text!r} is not a duration above zero; write e.g. 4h")
    return total


def duration_words(delta: timedelta) -> str:
    """``3 h 10 min``, ``25 min``, ``2 d 4 h``; under a minute: ``under 1 min``."""
    minutes = int(delta.total_seconds() // 60)
    if minutes < 1:
        return "under 1 min"
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {mins} min" if mins else f"{hours} h"
    return f"{mins} min"


# --------------------------------------------------------------------------- sidecar files

#: Columns that say which study a sidecar row is for: the worklist's study id, or the source
#: StudyInstanceUID (``StudyInstanceUID`` is accepted as the column name too).
KEY_COLUMNS = ("study_id", "study_uid")


@dataclass
class ContextRow:
    """One checked row of a context sidecar: the study it names and its context fields."""

    where: str
    study_id: int | None
    study_uid: str | None
    context: dict[str, Any]

    @property
    def names(self) -> str:
        if self.study_id is not None:
            return f"study {self.study_id}"
        return f"study with StudyInstanceUID {self.study_uid}"


def read_context_file(path: str | Path) -> tuple[list[ContextRow], list[str]]:
    """The rows of a context sidecar (CSV with a header, or JSON: a list of objects), each
    keyed by ``study_id`` or ``study_uid`` (StudyInstanceUID), with context fields as columns
    (:data:`CONTEXT_FIELDS`; in CSV several prior findings are joined by ``;``). Returns the
    rows that pass :func:`check_context` and one message per row that does not; an unknown
    column refuses the whole file (a misspelt column would otherwise be dropped unseen)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"context file {path} cannot be read ({exc.strerror or exc})") from None
    if path.suffix.lower() == ".json":
        try:
            records = json.loads(text)
        except ValueError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise DataError(f"{path}: a JSON context file is a list of objects, one per study")
        first_row = 1
    else:
        records = list(csv.DictReader(text.splitlines()))
        first_row = 2  # the header is line 1
    columns = {c for record in records for c in record}
    columns = {("study_uid" if c == "StudyInstanceUID" else c) for c in columns if c is not None}
    allowed = (*KEY_COLUMNS, *CONTEXT_FIELDS)
    unknown = sorted(columns - set(allowed))
    if unknown:
        raise DataError(
            f"{path}: unknown column(s) {', '.join(unknown)}; allowed: {', '.join(allowed)} "
            "(StudyInstanceUID for study_uid)"
        )
    rows, problems = [], []
    for n, record in enumerate(records, start=first_row):
        record = {("study_uid" if k == "StudyInstanceUID" else k): v for k, v in record.items()}
        where = f"{path} row {n}" if first_row == 1 else f"{path} line {n}"
        study_id, uid = record.pop("study_id", None), record.pop("study_uid", None)
        uid = str(uid).strip() if uid not in (None, "") else None
        try:
            study_id = int(study_id) if study_id not in (None, "") else None
        except (TypeError, ValueError):
            problems.append(f"{where}: study_id {study_id!r} is not a study number")
            continue
        if study_id is None and uid is None:
            problems.append(f"{where}: no study_id or study_uid says which study it is for")
            continue
        try:
            context = check_context(record)
        except DataError as exc:
            problems.append(f"{where}: {exc}")
            continue
        rows.append(ContextRow(where, study_id, uid, context))
    return rows, problems
