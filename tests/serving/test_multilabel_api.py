"""The API of a multi-label run: findings with their thresholds in /v1/predict (and its
OpenAPI schema), a map per finding from /v1/explain?class=, the worklist's triage by urgent
findings (which one drove each study), and reviewer labels made of findings."""

from __future__ import annotations

import json

import pytest

from medsight.errors import ConfigError
from medsight.serving.api import ServeSettings, create_app
from medsight.tasks.multilabel import threshold_scaled
from tests.serving.conftest import local_client
from tests.serving.multilabel import THRESHOLDS, copy_run, write_finding_images


@pytest.fixture
def ml_served(multilabel_run):
    return multilabel_run


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    paths = write_finding_images(tmp_path_factory.mktemp("ml-uploads"))
    return {name: path.read_bytes() for name, path in paths.items()}


def _client(run, tmp_path, **settings):
    return local_client(create_app(ServeSettings(run=run, data_dir=tmp_path / "d", **settings)))


def _file(data: bytes) -> dict:
    return {"file": ("upload.png", data, "application/octet-stream")}


def test_predict_lists_each_finding_against_its_threshold(ml_served, uploads, tmp_path):
    client = _client(ml_served, tmp_path)
    for data in uploads.values():
        body = client.post("/v1/predict", files=_file(data)).json()
        findings = body["findings"]
        assert [f["name"] for f in findings] == ["a", "b"]
        for f in findings:
            assert f["threshold"] == THRESHOLDS[f["name"]]
            assert f["probability"] == body["probabilities"][f["name"]]
            assert f["above_threshold"] == (f["probability"] >= f["threshold"])
        above = [f["name"] for f in findings if f["above_threshold"]]
        assert body["label"] == ("|".join(above) or "no finding")
        assert body["confidence"] == pytest.approx(max(body["probabilities"].values()))
        # Each finding's evaluated operating points, flagged against its own probability.
        flags = {(f["class_name"], f["operating_point"]): f for f in body["threshold_flags"]}
        assert set(flags) == {(n, p) for n in "ab" for p in ("youden", "sensitivity_0.90")}
        for (name, _), flag in flags.items():
            assert flag["flagged"] == (body["probabilities"][name] >= flag["threshold"])


def test_the_openapi_schema_documents_the_findings(ml_served, tmp_path):
    spec = _client(ml_served, tmp_path).get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert schemas["Prediction"]["properties"]["findings"]["items"]["$ref"].endswith(
        "/FindingScore"
    )
    assert set(schemas["FindingScore"]["required"]) == {
        "name",
        "probability",
        "above_threshold",
        "threshold",
    }
    params = spec["paths"]["/v1/explain"]["post"]["parameters"]
    assert any(p["name"] == "class" and p["in"] == "query" for p in params)


def test_model_info_names_the_task_urgent_findings_and_thresholds(ml_served, tmp_path):
    info = _client(ml_served, tmp_path).get("/v1/model").json()
    assert info["task"] == "multilabel" and info["positive_class"] is None
    assert info["urgent"] == ["a", "b"]
    assert info["decision_point"] == "youden"
    assert info["decision_thresholds"] == THRESHOLDS


def test_explain_maps_the_finding_asked_for(ml_served, uploads, tmp_path):
    client = _client(ml_served, tmp_path)
    maps = {}
    for finding in ("a", "b"):
        response = client.post(f"/v1/explain?class={finding}", files=_file(uploads["ab"]))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["target"] == finding and body["findings"]
        maps[finding] = body["overlay_png"]
    assert maps["a"] != maps["b"]
    default = client.post("/v1/explain", files=_file(uploads["ab"])).json()
    above = sorted(
        (f for f in default["findings"] if f["above_threshold"]), key=lambda f: -f["probability"]
    )
    top = max(default["findings"], key=lambda f: f["probability"])
    assert default["target"] == (above[0] if above else top)["name"]
    refused = client.post("/v1/explain?class=c", files=_file(uploads["ab"]))
    assert refused.status_code == 422
    assert refused.json()["detail"] == "class 'c' is not an output of this model; use one of: a, b"


def _expected_triage(body: dict, urgent: list[str]) -> tuple[float, str]:
    scores = {n: threshold_scaled(body["probabilities"][n], THRESHOLDS[n]) for n in urgent}
    driver = max(urgent, key=lambda n: (scores[n], -urgent.index(n)))
    return scores[driver], driver


@pytest.mark.parametrize("urgent", [None, ["b"]])
def test_the_worklist_is_ordered_by_the_urgent_findings_and_records_the_driver(
    ml_served, uploads, tmp_path, urgent
):
    settings = {"urgent": urgent} if urgent else {}
    client = _client(ml_served, tmp_path, **settings)
    assert client.get("/v1/model").json()["urgent"] == (urgent or ["a", "b"])
    expected = {}
    for data in uploads.values():
        study = client.post("/v1/studies", files=_file(data)).json()
        urgency, driver = _expected_triage(study, urgent or ["a", "b"])
        assert study["urgency"] == pytest.approx(urgency, abs=1e-5)
        assert study["urgency_finding"] == driver
        # The flag is the strictest evaluated point the driving finding reached.
        p, t = study["probabilities"][driver], THRESHOLDS[driver]
        assert study["flag"] == ("youden" if p >= t else "sensitivity_0.90" if p >= t / 2 else None)
        expected[study["id"]] = urgency
    items = client.get("/v1/worklist").json()["items"]
    assert [i["id"] for i in items] == sorted(expected, key=lambda k: (-expected[k], k))
    one = client.get(f"/v1/studies/{items[0]['id']}").json()
    assert one["urgency_finding"] == items[0]["urgency_finding"]


def test_urgent_findings_come_from_classes_json_and_unknown_names_are_refused(ml_served, tmp_path):
    run = copy_run(ml_served, tmp_path / "run")
    classes = json.loads((run / "classes.json").read_text())
    (run / "classes.json").write_text(json.dumps({**classes, "urgent": ["b"]}))
    assert _client(run, tmp_path).get("/v1/model").json()["urgent"] == ["b"]
    assert _client(run, tmp_path, urgent=["a"]).get("/v1/model").json()["urgent"] == ["a"]
    with pytest.raises(ConfigError, match="--urgent names 'c', not outputs .* among: a, b"):
        create_app(ServeSettings(run=run, data_dir=tmp_path / "d", urgent=["a", "c"]))
    (run / "classes.json").write_text(json.dumps({**classes, "urgent": ["x"]}))
    with pytest.raises(ConfigError, match="classes.json 'urgent' names 'x'"):
        create_app(ServeSettings(run=run, data_dir=tmp_path / "d"))


def test_a_reviewer_label_is_findings_joined_in_the_models_order(ml_served, uploads, tmp_path):
    client = _client(ml_served, tmp_path)
    study = client.post("/v1/studies", files=_file(uploads["ab"])).json()
    path = f"/v1/studies/{study['id']}"
    refused = client.patch(path, json={"status": "reviewed", "reviewer_label": "b|c"})
    assert refused.status_code == 422 and "'c'" in refused.json()["detail"]
    assert "no finding" in refused.json()["detail"]
    reviewed = client.patch(path, json={"status": "reviewed", "reviewer_label": "b|a"}).json()
    assert reviewed["reviewer_label"] == "a|b"
    assert reviewed["agreement"] == (study["label"] == "a|b")


def test_an_older_worklist_database_gains_the_urgency_finding_column(tmp_path):
    import sqlite3

    from sqlalchemy import create_engine, inspect

    from medsight.serving.worklist import Base, WorklistStore

    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    engine.dispose()
    with sqlite3.connect(path) as connection:  # the table as medsight made it before
        connection.execute("ALTER TABLE studies DROP COLUMN urgency_finding")
        connection.execute(
            "INSERT INTO studies (content_hash, stored_as, format, meta, received_at, label,"
            " probabilities, urgency, status, model_name, model_run, model_version) VALUES"
            " ('0', 'x.png', 'png', '{}', '2024-01-01 00:00:00', 'a', '{\"a\": 0.9}', 0.9,"
            " 'pending', 'm', 'r', 'v')"
        )
    store = WorklistStore(f"sqlite:///{path}", tmp_path / "data")
    assert "urgency_finding" in {c["name"] for c in inspect(store.engine).get_columns("studies")}
    (study,) = store.list()
    assert study.urgency_finding is None and study.label == "a" and study.urgency == 0.9
    store.close()
