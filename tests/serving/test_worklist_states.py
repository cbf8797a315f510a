"""The review state machine through the API: refused changes answer 409 with the allowed next
statuses, and reopening a reviewed study clears its review."""

from __future__ import annotations

from fastapi.testclient import TestClient

from medsight.serving.api import ServeSettings, create_app
from tests.serving.conftest import local_client, png_bytes


def client_with_study(run, tmp_path) -> tuple[TestClient, int]:
    client = local_client(create_app(ServeSettings(run=run, data_dir=tmp_path / "serve")))
    response = client.post("/v1/studies", files={"file": ("s.png", png_bytes(200), "image/png")})
    assert response.status_code == 201, response.text
    return client, response.json()["id"]


def test_a_refused_transition_answers_409_with_the_allowed_next_statuses(served_run, tmp_path):
    client, study = client_with_study(served_run, tmp_path)
    done = client.patch(
        f"/v1/studies/{study}", json={"status": "reviewed", "reviewer_label": "normal"}
    )
    assert done.status_code == 200
    back = client.patch(f"/v1/studies/{study}", json={"status": "pending"})
    assert back.status_code == 409
    assert back.json() == {
        "detail": f"study {study} is 'reviewed' and cannot move to 'pending'; "
        "allowed next statuses: in_review",
        "allowed": ["in_review"],
    }
    again = client.patch(
        f"/v1/studies/{study}", json={"status": "reviewed", "reviewer_label": "lesion"}
    )
    assert again.status_code == 409 and again.json()["allowed"] == ["in_review"]
    item = client.get(f"/v1/studies/{study}").json()
    assert item["status"] == "reviewed" and item["reviewer_label"] == "normal"


def test_reopening_through_the_api_clears_the_review(served_run, tmp_path):
    client, study = client_with_study(served_run, tmp_path)
    client.patch(f"/v1/studies/{study}", json={"status": "reviewed", "reviewer_label": "normal"})
    reopened = client.patch(f"/v1/studies/{study}", json={"status": "in_review"})
    assert reopened.status_code == 200
    body = reopened.json()
    assert body["status"] == "in_review"
    assert body["reviewer_label"] is None and body["reviewed_at"] is None
    assert body["agreement"] is None
    in_review = client.get("/v1/worklist", params={"status": "in_review"}).json()["items"]
    assert [i["id"] for i in in_review] == [study]


def test_a_label_with_an_open_status_answers_409(served_run, tmp_path):
    client, study = client_with_study(served_run, tmp_path)
    response = client.patch(
        f"/v1/studies/{study}", json={"status": "in_review", "reviewer_label": "lesion"}
    )
    assert response.status_code == 409
    assert "accepted only with status 'reviewed'" in response.json()["detail"]
    assert client.get(f"/v1/studies/{study}").json()["status"] == "pending"
