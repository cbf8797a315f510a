"""Triage that weighs clinical context: the worklist policy, read as a clinician would.

Each test builds a few studies by hand: the model's risk (its probability of the urgent
class, "lesion"), how long the study has waited, and what is known about the patient. The run
was evaluated, and its thresholds on the lesion probability are:

    90 % sensitivity  0.62    (sensitivity_0.90: the model finds 90 % of lesions above it)
    95 % sensitivity  0.40
    Youden            0.70

Waiting times are measured to a fixed "now" (noon), so no test depends on the clock.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner

from medsight.cli import app as cli
from medsight.errors import ConfigError
from medsight.serving.api import ServeSettings, create_app
from medsight.serving.triage import (
    DEFAULT_POLICY,
    check_points,
    load_policy,
    order_studies,
    parse_duration,
    read_context_file,
)
from medsight.serving.worklist import Study
from tests.serving.conftest import local_client, png_bytes

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
THRESHOLDS = {"lesion": {"sensitivity_0.90": 0.62, "sensitivity_0.95": 0.40, "youden": 0.70}}
DEFAULT = load_policy()  # medsight's own policy file, as shipped


def study(number: int, risk: float, waiting: str = "10 min", **context) -> Study:
    """Study ``number`` with the model's lesion ``risk``, waiting since ``waiting`` before noon,
    and its clinical ``context`` (priority, age_years, prior_findings, setting)."""
    return Study(
        id=number,
        received_at=NOW - parse_duration(waiting),
        urgency=risk,
        probabilities={"lesion": risk, "normal": round(1 - risk, 6)},
        context=context or None,
    )


def ordered(studies, policy=DEFAULT, thresholds=THRESHOLDS) -> list[int]:
    """The study numbers in the order the policy puts them, most urgent first."""
    return [s.id for s, _ in order_studies(studies, policy, thresholds, NOW)]


def why(one: Study, policy=DEFAULT, thresholds=THRESHOLDS) -> str:
    ((_, sentence),) = order_studies([one], policy, thresholds, NOW)
    return sentence


def policy_file(tmp_path, text: str):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the default order


def test_a_stat_referral_comes_before_a_higher_risk_routine_one():
    routine_high_risk = study(1, 0.95, priority="routine")
    stat_low_risk = study(2, 0.05, priority="stat")
    assert ordered([routine_high_risk, stat_low_risk]) == [2, 1]


def test_risk_above_the_90_sensitivity_threshold_comes_before_prior_findings():
    above_threshold = study(1, 0.65)  # 0.65 ≥ 0.62
    known_prior_nodule = study(2, 0.60, prior_findings=["nodule"])  # just below 0.62
    assert ordered([known_prior_nodule, above_threshold]) == [1, 2]


def test_risk_above_the_threshold_comes_before_an_urgent_referral_below_it():
    # The model's flag outranks "urgent" (not "stat"): a likely finding is read first.
    urgent_below = study(1, 0.30, priority="urgent")
    routine_above = study(2, 0.80, priority="routine")
    assert ordered([urgent_below, routine_above]) == [2, 1]


def test_prior_findings_come_before_setting_and_emergency_before_inpatient():
    outpatient = study(1, 0.50, setting="outpatient")
    inpatient = study(2, 0.20, setting="inpatient")
    emergency = study(3, 0.10, setting="emergency")
    prior = study(4, 0.05, setting="outpatient", prior_findings=["effusion"])
    assert ordered([outpatient, inpatient, emergency, prior]) == [4, 3, 2, 1]


def test_without_context_the_order_is_the_models_risk_highest_first():
    # Studies that carry no context keep the order the worklist always had.
    assert ordered([study(1, 0.30), study(2, 0.90), study(3, 0.50)]) == [2, 3, 1]


def test_longest_waiting_first_among_equals():
    # Same priority, same risk, no other context: whoever has waited longest is read first.
    waited_1_h = study(1, 0.50, "1 h", priority="routine")
    waited_3_h = study(2, 0.50, "3 h", priority="routine")
    waited_20_min = study(3, 0.50, "20 min", priority="routine")
    assert ordered([waited_1_h, waited_3_h, waited_20_min]) == [2, 1, 3]


def test_studies_no_rule_tells_apart_keep_the_order_they_came_in_then_by_number():
    same_time = [study(5, 0.5, "1 h"), study(3, 0.5, "1 h"), study(4, 0.5, "1 h")]
    assert ordered(same_time, load_policy(DEFAULT_POLICY)) == [3, 4, 5]


def test_the_default_policy_file_orders_a_morning_list_exactly_as_this_table_says():
    # study  referral  risk  prior finding  setting     waiting  → place  because
    #   1    routine   0.30  —              outpatient  5 h        8      nothing puts it forward
    #   2    stat      0.10  —              emergency   5 min      1      STAT
    #   3    routine   0.88  —              outpatient  40 min     3      risk above 0.62
    #   4    urgent    0.45  nodule         inpatient   2 h        4      urgent; prior finding
    #   5    routine   0.64  —              inpatient   3 h        2      risk above 0.62; inpatient
    #   6    routine   0.20  nodule         outpatient  1 h        6      prior finding
    #   7    —         0.35  —              emergency   30 min     7      emergency
    #   8    urgent    0.40  —              outpatient  4 h        5      urgent
    # 5 comes before 3 although its risk is lower: both are above the threshold, and the
    # setting rule (inpatient before outpatient) comes before "higher risk first".
    morning = [
        study(1, 0.30, "5 h", priority="routine", setting="outpatient"),
        study(2, 0.10, "5 min", priority="stat", setting="emergency"),
        study(3, 0.88, "40 min", priority="routine", setting="outpatient"),
        study(4, 0.45, "2 h", priority="urgent", prior_findings=["nodule"], setting="inpatient"),
        study(5, 0.64, "3 h", priority="routine", setting="inpatient"),
        study(6, 0.20, "1 h", priority="routine", prior_findings=["nodule"], setting="outpatient"),
        study(7, 0.35, "30 min", setting="emergency"),
        study(8, 0.40, "4 h", priority="urgent", setting="outpatient"),
    ]
    assert ordered(morning) == [2, 5, 3, 4, 8, 6, 7, 1]


# --------------------------------------------------------------------------- why


def test_the_why_sentence_names_each_reason():
    one = study(1, 0.91, "3 h 10 min", priority="stat", prior_findings=["nodule"])
    assert why(one) == (
        "stat referral; risk 0.91 above the 90 %-sensitivity threshold (0.62); "
        "prior finding: nodule; waiting 3 h 10 min"
    )
    # Age is not a rule of the default policy: it is not a reason here.
    other = study(2, 0.12, "25 min", setting="inpatient", age_years=82)
    assert why(other) == (
        "risk 0.12 below the 90 %-sensitivity threshold (0.62); inpatient; waiting 25 min"
    )


def test_a_risk_just_below_its_threshold_is_shown_with_the_decimals_that_tell_them_apart():
    assert why(study(1, 0.6191, "1 h")) == (
        "risk 0.619 below the 90 %-sensitivity threshold (0.620); waiting 1 h"
    )


def test_before_evaluation_the_why_gives_the_risk_and_the_threshold_rule_orders_nothing():
    # A run that was never evaluated has no 90 %-sensitivity threshold yet.
    assert why(study(1, 0.40, "2 h"), thresholds={}) == "risk 0.40; waiting 2 h"
    assert ordered([study(1, 0.4, priority="urgent"), study(2, 0.9)], thresholds={}) == [1, 2]


def test_for_several_urgent_findings_the_why_names_the_finding_above_its_threshold():
    findings = {"effusion": {"sensitivity_0.90": 0.3}, "pneumothorax": {"sensitivity_0.90": 0.5}}
    one = Study(
        id=1,
        received_at=NOW - timedelta(hours=1),
        urgency=0.8,
        urgency_finding="pneumothorax",
        probabilities={"effusion": 0.2, "pneumothorax": 0.74},
        context=None,
    )
    assert why(one, thresholds=findings) == (
        "pneumothorax 0.74 above its 90 %-sensitivity threshold (0.50); waiting 1 h"
    )


# --------------------------------------------------------------------------- other policies


def test_a_policy_of_your_own_orders_by_age_and_time_waited(tmp_path):
    path = policy_file(
        tmp_path,
        "order:\n"
        "  - waiting_over: 4h      # nobody waits more than four hours unseen\n"
        "  - age_at_least: 80\n"
        "  - waiting: longest\n",
    )
    policy = load_policy(path)
    old_patient = study(1, 0.5, "1 h", age_years=85)
    long_wait = study(2, 0.1, "4 h 30 min", age_years=40)
    younger = study(3, 0.9, "2 h", age_years=50)
    assert ordered([old_patient, long_wait, younger], policy) == [2, 1, 3]
    assert why(long_wait, policy) == "waiting 4 h 30 min, over 4 h"
    assert why(old_patient, policy) == "aged 85; waiting 1 h"
    assert policy.describe() == [
        "waiting over 4 h",
        "patients aged 80 or over",
        "the longest waiting",
    ]


def test_unknown_policy_field_is_named(tmp_path):
    path = policy_file(tmp_path, "order:\n  - priority: stat\n  - severity: high\n")
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert str(path) in message
    assert "rule 2: unknown field 'severity'" in message
    assert "priority, risk_above, prior_findings, setting" in message  # what is allowed
    top = policy_file(tmp_path, "ordr:\n  - priority: stat\n")
    with pytest.raises(ConfigError, match="unknown field 'ordr'; allowed fields: order"):
        load_policy(top)


@pytest.mark.parametrize(
    "text, words",
    [
        ("order:\n  - priority: soon\n", "rule 1 (priority): Input should be 'stat', 'urgent'"),
        ("order:\n  - age_at_least: -3\n", "-3 is not an age in years"),
        ("order:\n  - waiting_over: soon\n", "'soon' is not a duration"),
        ("order:\n  - priority: stat\n    risk: highest\n", "a rule is exactly one of"),
        ("order: []\n", "the order is empty"),
        ("order: [priority: stat\n", "not valid YAML"),
    ],
)
def test_a_policy_with_an_impossible_rule_is_refused_saying_which(tmp_path, text, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_policy(policy_file(tmp_path, text))


def test_a_threshold_the_run_was_not_evaluated_at_is_refused_listing_those_it_has(tmp_path):
    policy = load_policy(policy_file(tmp_path, "order:\n  - risk_above: sensitivity_0.99\n"))
    points = {"lesion": {"sensitivity_0.90": {}, "youden": {}}}
    with pytest.raises(ConfigError, match="its evaluated points: sensitivity_0.90, youden"):
        check_points(policy, points)
    # Not evaluated at all: a warning, and the server still starts.
    assert "until the run is evaluated" in check_points(policy, {})[0]
    # The default policy on a detector (evaluated at false-positive rates): a warning.
    (warning,) = check_points(DEFAULT, {"nodule": {"fp_1": {}}}, strict=False)
    assert "'risk_above: sensitivity_0.90' orders nothing: the run was evaluated at fp_1" in warning


def test_serve_stops_at_start_with_one_line_naming_the_unknown_field(tmp_path):
    bad = policy_file(tmp_path, "order:\n  - stat_first: true\n")
    result = CliRunner().invoke(cli, ["serve", str(tmp_path), "--policy", str(bad)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown field 'stat_first'" in lines[0], result.output


# --------------------------------------------------------------------------- the API


@pytest.fixture
def client(served_run, tmp_path):
    app = create_app(ServeSettings(run=served_run, data_dir=tmp_path / "serve"))
    return local_client(app)


def upload(seed: int, value: int = 128, **context) -> dict:
    return {
        "files": {"file": ("scan.png", png_bytes(value, seed=seed), "application/octet-stream")},
        "data": context,
    }


@pytest.mark.parametrize(
    "context, words",
    [
        ({"age_years": "-3"}, "context age_years -3.0 is not an age in years (0-130)"),
        ({"priority": "soon"}, "context priority 'soon' is not one of stat, urgent, routine"),
        ({"setting": "home"}, "context setting 'home' is not one of emergency, inpatient"),
    ],
)
def test_impossible_context_is_refused_with_its_field(client, context, words):
    response = client.post("/v1/studies", **upload(1, **context))
    assert response.status_code == 422
    assert words in response.json()["detail"]
    assert client.get("/v1/worklist").json()["items"] == []  # nothing was queued


def test_the_worklist_lists_studies_in_policy_order_with_rank_why_and_context(client):
    bright = client.post("/v1/studies", **upload(1, 220, priority="routine")).json()
    dark = client.post(
        "/v1/studies", **upload(2, 30, priority="STAT", age_years="67", prior_findings="nodule")
    ).json()
    assert dark["context"] == {"priority": "stat", "age_years": 67.0, "prior_findings": ["nodule"]}
    assert dark["why"].startswith("stat referral; ") and dark["rank"] is None
    body = client.get("/v1/worklist").json()
    assert [i["id"] for i in body["items"]] == [dark["id"], bright["id"]]  # STAT first
    assert [i["rank"] for i in body["items"]] == [1, 2]
    first = body["items"][0]
    assert first["why"].startswith("stat referral; risk ")
    assert "prior finding: nodule; waiting under 1 min" in first["why"]
    assert body["policy"][0] == "STAT referrals"
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    upload_form = next(v for k, v in schema.items() if k.startswith("Body_add_study"))
    assert {"priority", "age_years", "prior_findings", "setting"} <= set(upload_form["properties"])


# --------------------------------------------------------------------------- sidecar files


def test_a_context_sidecar_adds_context_and_reorders_the_worklist(client, tmp_path):
    first = client.post("/v1/studies", **upload(1, 220)).json()
    second = client.post("/v1/studies", **upload(2, 30)).json()
    low, high = sorted([first, second], key=lambda i: i["urgency"])
    assert [i["id"] for i in client.get("/v1/worklist").json()["items"]] == [high["id"], low["id"]]
    sidecar = tmp_path / "context.csv"
    sidecar.write_text(
        "study_id,priority,age_years,prior_findings,setting\n"
        f"{low['id']},stat,71,nodule;effusion,emergency\n"
        f"{high['id']},routine,-3,,\n"  # an impossible age: this row is skipped, said so
        "999,urgent,,,\n"  # no such study
    )
    serve_dir = client.app.state.worklist.data_dir
    result = CliRunner().invoke(
        cli, ["worklist", "import-context", "run", str(sidecar), "--data-dir", str(serve_dir)]
    )
    assert result.exit_code == 1, result.output
    assert "context added to 1 study (2 row(s) skipped)" in result.output
    assert "line 3: context age_years '-3' is not an age in years" in result.output
    assert "line 4: no study 999 on the worklist" in result.output
    nowhere = CliRunner().invoke(cli, ["worklist", "import-context", str(tmp_path), str(sidecar)])
    assert nowhere.exit_code == 2 and "no worklist at" in nowhere.output
    items = client.get("/v1/worklist").json()["items"]
    assert [i["id"] for i in items] == [low["id"], high["id"]]  # the STAT referral now first
    assert items[0]["context"] == {
        "priority": "stat",
        "age_years": 71.0,
        "prior_findings": ["nodule", "effusion"],
        "setting": "emergency",
    }


def test_a_json_sidecar_is_keyed_by_study_instance_uid_and_an_unknown_column_is_named(tmp_path):
    good = tmp_path / "context.json"
    good.write_text('[{"StudyInstanceUID": "1.2.3", "priority": "urgent", "age_years": 4}]')
    (row,), problems = read_context_file(good)
    assert (row.study_uid, row.context, problems) == (
        "1.2.3",
        {"priority": "urgent", "age_years": 4.0},
        [],
    )
    bad = tmp_path / "typo.csv"
    bad.write_text("study_id,priorty\n1,stat\n")
    with pytest.raises(Exception, match="unknown column\\(s\\) priorty; allowed: study_id"):
        read_context_file(bad)
