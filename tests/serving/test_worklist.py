"""The triage worklist: urgency order, review states, audit, persistence, de-identification."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from medsight.data.privacy import pseudonymise
from medsight.serving.api import ServeSettings, create_app
from medsight.serving.schemas import STATUSES
from medsight.serving.worklist import TRANSITIONS, ReviewStateError, WorklistStore
from tests.conftest import write_dicom
from tests.serving.conftest import local_client, png_bytes


def make_client(run, data_dir) -> TestClient:
    return local_client(create_app(ServeSettings(run=run, data_dir=data_dir)))


def add(client, data: bytes, name: str = "study.png") -> dict:
    response = client.post("/v1/studies", files={"file": (name, data, "image/png")})
    assert response.status_code == 201, response.text
    return response.json()


def test_worklist_is_ordered_by_urgency_then_arrival(served_run, tmp_path):
    client = make_client(served_run, tmp_path / "serve")
    added = [add(client, png_bytes(v, seed=i)) for i, v in enumerate((40, 220, 130, 220))]
    twin = add(client, png_bytes(220, seed=1))  # same image as added[1]: a tie, arrived later
    items = client.get("/v1/worklist", params={"status": "pending"}).json()["items"]
    assert len(items) == 5
    urgencies = [item["urgency"] for item in items]
    assert urgencies == sorted(urgencies, reverse=True)
    ids = [item["id"] for item in items]
    assert ids.index(added[1]["id"]) < ids.index(twin["id"])  # tie: earlier arrival first
    for item in items:
        assert item["urgency"] == pytest.approx(item["probabilities"]["lesion"])
        assert item["status"] == "pending" and item["received_at"].endswith("Z")
    # The flag is the strictest operating point of the urgent class that the urgency reaches.
    points = client.get("/v1/model").json()["operating_points"]
    for item in items:
        reached = [k for k, v in points.items() if item["urgency"] >= v["threshold"]]
        assert (item["flag"] is None) == (not reached)
        if reached:
            assert item["flag"] in reached


def test_review_sets_status_and_keeps_the_reviewer_label_for_audit(served_run, tmp_path):
    client = make_client(served_run, tmp_path / "serve")
    study = add(client, png_bytes(200))
    other = add(client, png_bytes(60, seed=2))
    response = client.patch(f"/v1/studies/{study['id']}", json={"status": "in_review"})
    assert response.status_code == 200 and response.json()["status"] == "in_review"
    disagree = "normal" if study["label"] == "lesion" else "lesion"
    response = client.patch(
        f"/v1/studies/{study['id']}", json={"status": "reviewed", "reviewer_label": disagree}
    )
    body = response.json()
    assert body["status"] == "reviewed" and body["reviewer_label"] == disagree
    assert body["agreement"] is False and body["reviewed_at"] is not None
    pending = client.get("/v1/worklist", params={"status": "pending"}).json()["items"]
    assert [item["id"] for item in pending] == [other["id"]]
    reviewed = client.get("/v1/worklist", params={"status": "reviewed"}).json()["items"]
    assert [item["id"] for item in reviewed] == [study["id"]]
    assert len(client.get("/v1/worklist").json()["items"]) == 2
    assert client.get(f"/v1/studies/{study['id']}").json()["reviewer_label"] == disagree

    store: WorklistStore = client.app.state.worklist
    events = store.events(study["id"])
    assert [e.status for e in events] == ["in_review", "reviewed"]
    assert events[-1].reviewer_label == disagree and events[-1].model_label == study["label"]


def test_review_errors(served_run, tmp_path):
    client = make_client(served_run, tmp_path / "serve")
    study = add(client, png_bytes(200))
    bad_status = client.patch(f"/v1/studies/{study['id']}", json={"status": "done"})
    assert bad_status.status_code == 422 and "status" in bad_status.json()["detail"]
    bad_label = client.patch(
        f"/v1/studies/{study['id']}", json={"status": "reviewed", "reviewer_label": "cat"}
    )
    assert bad_label.status_code == 422 and "lesion, normal" in bad_label.json()["detail"]
    missing = client.patch("/v1/studies/999", json={"status": "reviewed"})
    assert missing.status_code == 404 and "999" in missing.json()["detail"]
    assert client.get("/v1/worklist", params={"status": "nope"}).status_code == 422


def test_a_restart_on_the_same_database_keeps_the_worklist(served_run, tmp_path):
    data_dir = tmp_path / "serve"
    first = make_client(served_run, data_dir)
    a = add(first, png_bytes(210))
    b = add(first, png_bytes(50, seed=4))
    first.patch(f"/v1/studies/{b['id']}", json={"status": "reviewed", "reviewer_label": "normal"})
    before = first.get("/v1/worklist").json()["items"]
    first.app.state.worklist.close()

    second = make_client(served_run, data_dir)  # a new process would do exactly this
    after = second.get("/v1/worklist").json()["items"]
    assert after == before
    assert [i["id"] for i in second.get("/v1/worklist?status=pending").json()["items"]] == [a["id"]]
    c = add(second, png_bytes(120, seed=9))
    assert c["id"] > max(a["id"], b["id"])
    image = second.get(f"/v1/studies/{a['id']}/image")
    assert image.status_code == 200 and image.content == png_bytes(210)


def test_an_explicit_sqlite_url_is_used(served_run, tmp_path):
    db = tmp_path / "elsewhere" / "triage.db"
    db.parent.mkdir()
    settings = ServeSettings(run=served_run, data_dir=tmp_path / "d", db=f"sqlite:///{db}")
    client = local_client(create_app(settings))
    add(client, png_bytes(200))
    assert db.exists() and not (tmp_path / "d" / "worklist.db").exists()


def test_dicom_patient_identifiers_never_reach_the_database_files_or_logs(
    served_run, tmp_path, caplog
):
    data_dir = tmp_path / "serve"
    client = make_client(served_run, data_dir)
    dicom = write_dicom(
        tmp_path / "Doe_Jane.dcm",
        np.full((16, 16), 700),
        PatientName="Doe^Jane",
        PatientID="MRN-778899",
        PatientBirthDate="19610214",
        OtherPatientNames="Roe^Janet",
        InstitutionName="St Elsewhere Hospital",
        ReferringPhysicianName="House^Gregory",
        AccessionNumber="ACC-4455",
    )
    secrets = [b"Doe", b"Jane", b"MRN-778899", b"19610214", b"Elsewhere", b"House", b"ACC-4455"]
    assert all(s in dicom.read_bytes() for s in secrets)

    with caplog.at_level(logging.DEBUG):
        item = add(client, dicom.read_bytes(), name="Doe_Jane_MRN-778899.dcm")
        client.get("/v1/worklist")
        client.patch(f"/v1/studies/{item['id']}", json={"status": "reviewed"})
    assert item["format"] == "dicom" and item["modality"] == "CT"
    assert item["patient"] == pseudonymise("MRN-778899")

    client.app.state.worklist.close()
    stored = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".dcm" for p in stored) and any(p.name == "worklist.db" for p in stored)
    for path in stored:
        content = path.read_bytes()
        for secret in secrets:
            assert secret not in content, f"{secret!r} found in {path}"
    log_text = caplog.text.encode()
    assert log_text  # the requests were logged
    for secret in secrets:
        assert secret not in log_text
    # The kept DICOM still decodes, and says it was de-identified.
    import pydicom

    kept = pydicom.dcmread(next(p for p in stored if p.suffix == ".dcm"))
    assert kept.PatientIdentityRemoved == "YES" and kept.PatientID == item["patient"]
    assert kept.pixel_array.shape == (16, 16)


def test_uploads_are_stored_under_their_hash_inside_the_data_folder(served_run, tmp_path):
    data_dir = tmp_path / "deep" / "serve"
    client = make_client(served_run, data_dir)
    names = ("../../../escape.png", "/etc/passwd", "..\\..\\win.png", "a/../../b.png")
    for i, name in enumerate(names):
        add(client, png_bytes(150, seed=i), name=name)
    everything = {p.name for p in tmp_path.rglob("*")}
    assert not everything & {"escape.png", "passwd", "win.png", "b.png", "..\\..\\win.png"}
    stored = [p for p in (data_dir / "studies").rglob("*") if p.is_file()]
    assert len(stored) == 4
    for path in stored:
        assert path.resolve().is_relative_to(data_dir.resolve())
        assert len(path.stem) == 64 and path.suffix == ".png"


# ---------------------------------------------------------------------- review state machine


def queued(store: WorklistStore, seed: int = 0) -> int:
    study = store.add(
        data=png_bytes(200, seed=seed),
        extension=".png",
        format="png",
        meta={},
        label="lesion",
        probabilities={"lesion": 0.8, "normal": 0.2},
        urgency=0.8,
        flag=None,
        model={"name": "m", "run": "r", "version": "v"},
    )
    return study.id


#: A path from "pending" to each status through allowed transitions.
ROUTE = {"pending": [], "in_review": ["in_review"], "reviewed": ["reviewed"]}


@pytest.mark.parametrize("start", STATUSES)
@pytest.mark.parametrize("target", STATUSES)
def test_review_status_changes_follow_the_state_machine(tmp_path, start, target):
    store = WorklistStore(f"sqlite:///{tmp_path / 'w.db'}", tmp_path)
    study = queued(store)
    for status in ROUTE[start]:
        store.update(study, status, None)
    expected = {
        ("pending", "in_review"),
        ("pending", "reviewed"),
        ("in_review", "pending"),
        ("in_review", "reviewed"),
        ("reviewed", "in_review"),
    }
    if (start, target) in expected:
        assert store.update(study, target, None).status == target
        assert store.events(study)[-1].status == target
        return
    before = len(store.events(study))
    with pytest.raises(ReviewStateError) as refused:
        store.update(study, target, None)
    allowed = TRANSITIONS[start]
    assert str(refused.value) == (
        f"study {study} is {start!r} and cannot move to {target!r}; "
        f"allowed next statuses: {', '.join(allowed)}"
    )
    assert refused.value.allowed == allowed and refused.value.current == start
    assert store.get(study).status == start and len(store.events(study)) == before


def test_reopening_a_reviewed_study_clears_the_review_and_the_audit_keeps_it(tmp_path):
    store = WorklistStore(f"sqlite:///{tmp_path / 'w.db'}", tmp_path)
    study = queued(store)
    reviewed = store.update(study, "reviewed", "normal")
    assert reviewed.reviewer_label == "normal" and reviewed.reviewed_at is not None
    reopened = store.update(study, "in_review", None)
    assert reopened.status == "in_review"
    assert reopened.reviewer_label is None and reopened.reviewed_at is None
    again = store.update(study, "reviewed", "lesion")
    assert again.reviewer_label == "lesion"
    trail = [(e.status, e.reviewer_label) for e in store.events(study)]
    assert trail == [("reviewed", "normal"), ("in_review", None), ("reviewed", "lesion")]


def test_a_reviewer_label_is_accepted_only_when_the_review_is_done(tmp_path):
    store = WorklistStore(f"sqlite:///{tmp_path / 'w.db'}", tmp_path)
    study = queued(store)
    with pytest.raises(ReviewStateError, match="accepted only with status 'reviewed'"):
        store.update(study, "in_review", "lesion")
    assert store.get(study).status == "pending" and store.get(study).reviewer_label is None


def test_concurrent_reviews_of_one_study_let_exactly_one_through(tmp_path):
    store = WorklistStore(f"sqlite:///{tmp_path / 'w.db'}", tmp_path)
    study = queued(store)
    barrier = threading.Barrier(6)
    outcomes: list[str] = []

    def review(label: str) -> None:
        barrier.wait()
        try:
            store.update(study, "reviewed", label)
            outcomes.append("ok")
        except ReviewStateError:
            outcomes.append("refused")

    threads = [threading.Thread(target=review, args=(lab,)) for lab in ["lesion", "normal"] * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["ok"] + ["refused"] * 5
    assert [e.status for e in store.events(study)] == ["reviewed"]
    assert store.get(study).reviewer_label == store.events(study)[0].reviewer_label
