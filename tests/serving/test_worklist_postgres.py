"""The worklist on a real PostgreSQL server: a restart keeps studies and their history,
concurrent reviews (threads, two stores, two processes) let exactly one change through, and
bad credentials are one line without the password."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from medsight.errors import ConfigError
from medsight.serving.api import ServeSettings, create_app
from medsight.serving.worklist import TRANSITIONS, ReviewStateError, WorklistStore
from tests.serving.conftest import local_client, png_bytes
from tests.serving.test_worklist import queued

pytest_plugins = ["tests.postgres"]

#: Review races: every contender asks for the same next status, so exactly one may win each.
ROUNDS = ["reviewed", "in_review", "pending", "in_review", "reviewed"]


def wrong_password(url: str) -> str:
    return make_url(url).set(password="Not-The-Password-93").render_as_string(hide_password=False)


def assert_consistent_history(store: WorklistStore, study: int, expected: list[str]) -> None:
    """The audit trail is exactly ``expected``, each step allowed from the one before it, and
    the study's status and label are those of the last step."""
    events = store.events(study)
    assert [e.status for e in events] == expected
    previous = "pending"
    for event in events:
        assert event.status in TRANSITIONS[previous], (previous, event.status)
        assert event.at.tzinfo is not None
        previous = event.status
    current = store.get(study)
    assert current.status == previous
    assert current.reviewer_label == (events[-1].reviewer_label if events else None)


def test_studies_and_their_history_survive_a_restart_on_postgresql(
    served_run, tmp_path, postgres_url
):
    data_dir = tmp_path / "serve"
    settings = ServeSettings(run=served_run, data_dir=data_dir, db=postgres_url)
    first = local_client(create_app(settings))
    ids = []
    for i, value in enumerate((210, 50, 130)):
        response = first.post("/v1/studies", files={"file": ("s.png", png_bytes(value, seed=i))})
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    assert first.patch(f"/v1/studies/{ids[1]}", json={"status": "in_review"}).status_code == 200
    done = {"status": "reviewed", "reviewer_label": "normal"}
    assert first.patch(f"/v1/studies/{ids[1]}", json=done).status_code == 200
    before = first.get("/v1/worklist").json()["items"]
    before_events = [
        (e.status, e.reviewer_label, e.at) for e in first.app.state.worklist.events(ids[1])
    ]
    assert all(item["received_at"].endswith("Z") for item in before)
    first.app.state.worklist.close()

    second = local_client(create_app(settings))  # a new server process would do exactly this
    assert second.get("/v1/worklist").json()["items"] == before
    store: WorklistStore = second.app.state.worklist
    after_events = [(e.status, e.reviewer_label, e.at) for e in store.events(ids[1])]
    assert after_events == before_events
    assert [s for s, _, _ in after_events] == ["in_review", "reviewed"]
    pending = second.get("/v1/worklist", params={"status": "pending"}).json()["items"]
    assert sorted(item["id"] for item in pending) == sorted([ids[0], ids[2]])
    added = second.post("/v1/studies", files={"file": ("s.png", png_bytes(90, seed=7))}).json()
    assert added["id"] > max(ids)
    assert second.get("/ready").json()["database"] == "ok"
    store.close()


def test_a_database_from_an_older_release_gains_the_new_columns(tmp_path, postgres_url):
    store = WorklistStore(postgres_url, tmp_path)
    study = queued(store)
    with store.engine.begin() as connection:
        from sqlalchemy import text

        connection.execute(text("ALTER TABLE studies DROP COLUMN urgency_finding"))
        connection.execute(text("ALTER TABLE studies DROP COLUMN boxes"))
    store.close()
    reopened = WorklistStore(postgres_url, tmp_path)
    kept = reopened.get(study)
    assert kept.urgency_finding is None and kept.boxes is None
    assert reopened.update(study, "reviewed", "lesion").status == "reviewed"
    reopened.close()


def test_servers_starting_together_on_an_empty_database_share_one_schema(tmp_path, postgres_url):
    barrier = threading.Barrier(4)
    opened: list[WorklistStore] = []
    errors: list[Exception] = []

    def open_store() -> None:
        barrier.wait()
        try:
            opened.append(WorklistStore(postgres_url, tmp_path))
        except Exception as exc:  # noqa: BLE001 - collected and shown below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and len(opened) == 4
    study = queued(opened[0])
    assert [s.id for s in opened[3].list()] == [study]
    for store in opened:
        store.close()


def _race(stores: list[WorklistStore], study: int, contenders: int) -> list[dict[str, list[str]]]:
    """Threads spread over ``stores`` race for each of :data:`ROUNDS`; per round, the labels
    of the winners and of the refused."""
    barrier = threading.Barrier(contenders)
    results: list[dict[str, list[str]]] = [{"ok": [], "refused": []} for _ in ROUNDS]
    lock = threading.Lock()

    def contender(k: int) -> None:
        store = stores[k % len(stores)]
        for i, status in enumerate(ROUNDS):
            label = f"reader{k}" if status == "reviewed" else None
            barrier.wait()
            try:
                store.update(study, status, label)
                outcome = "ok"
            except ReviewStateError:
                outcome = "refused"
            with lock:
                results[i][outcome].append(label or f"reader{k}")
            barrier.wait()  # everyone has tried before the next round starts

    threads = [threading.Thread(target=contender, args=(k,)) for k in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_concurrent_reviews_on_two_stores_let_exactly_one_through_each_race(tmp_path, postgres_url):
    stores = [WorklistStore(postgres_url, tmp_path) for _ in range(2)]  # two servers, one db
    study = queued(stores[0])
    results = _race(stores, study, contenders=8)
    for outcome in results:
        assert len(outcome["ok"]) == 1 and len(outcome["refused"]) == 7, outcome
    assert_consistent_history(stores[1], study, ROUNDS)
    winners = [r["ok"][0] for r in results]
    labels = [e.reviewer_label for e in stores[0].events(study)]
    assert labels == [w if s == "reviewed" else None for w, s in zip(winners, ROUNDS)]
    for store in stores:
        store.close()


def _process_contender(url: str, data_dir: str, study: int, barrier, results, k: int) -> None:
    store = WorklistStore(url, data_dir)
    for i, status in enumerate(ROUNDS):
        barrier.wait()
        try:
            store.update(study, status, f"proc{k}" if status == "reviewed" else None)
            results.put((i, "ok"))
        except ReviewStateError:
            results.put((i, "refused"))
        barrier.wait()
    store.close()


def test_concurrent_reviews_from_two_processes_keep_one_history(tmp_path, postgres_url):
    store = WorklistStore(postgres_url, tmp_path)
    study = queued(store)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    workers = [
        context.Process(
            target=_process_contender,
            args=(postgres_url, str(tmp_path), study, barrier, results, k),
        )
        for k in range(2)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in range(2 * len(ROUNDS))]
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]
    for i in range(len(ROUNDS)):
        assert sorted(o for r, o in outcomes if r == i) == ["ok", "refused"]
    assert_consistent_history(store, study, ROUNDS)
    store.close()


def test_concurrent_patches_through_the_api_answer_one_200_and_409s(
    served_run, tmp_path, postgres_url
):
    settings = ServeSettings(run=served_run, data_dir=tmp_path / "serve", db=postgres_url)
    clients = [local_client(create_app(settings)) for _ in range(2)]
    posted = clients[0].post("/v1/studies", files={"file": ("s.png", png_bytes(200))})
    study = posted.json()["id"]
    barrier = threading.Barrier(6)
    codes: list[int] = []

    def patch(k: int) -> None:
        barrier.wait()
        body = {"status": "reviewed", "reviewer_label": "lesion" if k % 2 else "normal"}
        codes.append(clients[k % 2].patch(f"/v1/studies/{study}", json=body).status_code)

    threads = [threading.Thread(target=patch, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(codes) == [200] + [409] * 5
    store: WorklistStore = clients[1].app.state.worklist
    assert_consistent_history(store, study, ["reviewed"])
    for client in clients:
        client.app.state.worklist.close()


def test_bad_credentials_are_one_line_without_the_password(tmp_path, postgres_url):
    bad = wrong_password(postgres_url)
    with pytest.raises(ConfigError) as refused:
        WorklistStore(bad, tmp_path)
    message = str(refused.value)
    assert "\n" not in message and "Not-The-Password-93" not in message
    assert "worklist database" in message and "***" in message


def test_a_database_holding_a_tuning_study_is_refused_by_name(tmp_path, postgres_url):
    from medsight.workflows.tune import open_storage

    open_storage(postgres_url)  # Optuna's tables include one named "studies" too
    with pytest.raises(ConfigError, match="give the worklist a database of its own") as refused:
        WorklistStore(postgres_url, tmp_path)
    assert "\n" not in str(refused.value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_with_bad_credentials_prints_one_line_without_the_password(
    served_run, tmp_path, postgres_url
):
    bad = wrong_password(postgres_url)
    command = [sys.executable, "-m", "medsight", "serve", str(served_run), "--db", bad]
    command += ["--data-dir", str(tmp_path / "serve"), "--port", str(_free_port())]
    src = Path(__file__).resolve().parents[2] / "src"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert "Not-The-Password-93" not in done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "worklist database" in errors[0], done.stderr
    # the line is complete: it names what to pass next, nothing continues on the next line
    assert errors[0].rstrip().endswith("URL"), done.stderr
