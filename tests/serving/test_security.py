"""The server against a hostile client and a hostile web page: ids out of range, unexpected
errors, foreign Host headers, cross-site forms, missing security headers, weak tokens, floods
of large uploads, and probes while the model is still loading."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from medsight.cli import app as cli
from medsight.errors import ConfigError, MedsightError
from medsight.serving.api import ServeSettings, StartingApp, create_app, get_worklist, serve
from medsight.serving.security import CSP, allowed_hosts
from medsight.serving.service import Busy, DecodeSlots, decode_slots_for
from tests.serving.conftest import PAGE_HEADERS, local_client, png_bytes

TOO_BIG = 2**63  # one past SQLite's largest integer: OverflowError (a 500) before the fix
STRONG = "a-strong-token-0123456789"


def upload(data: bytes) -> dict:
    return {"file": ("x.png", data, "application/octet-stream")}


@pytest.fixture(scope="module")
def app(served_run, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("security")
    return create_app(ServeSettings(run=served_run, data_dir=data_dir))


@pytest.fixture
def client(app):
    return local_client(app)


# --------------------------------------------------------------------------- no 500


@pytest.mark.parametrize("study_id", [TOO_BIG, 10**30, 0, -1])
def test_study_ids_out_of_range_are_422_not_500(client, study_id):
    for method, path, kwargs in [
        ("get", f"/v1/studies/{study_id}", {}),
        ("get", f"/v1/studies/{study_id}/image", {}),
        ("patch", f"/v1/studies/{study_id}", {"json": {"status": "reviewed"}}),
    ]:
        response = getattr(client, method)(path, **kwargs)
        assert response.status_code == 422, (method, path, response.text)
        assert "study_id" in response.json()["detail"]


def test_the_largest_study_id_is_a_plain_404(client):
    response = client.get(f"/v1/studies/{TOO_BIG - 1}")
    assert response.status_code == 404
    assert f"study {TOO_BIG - 1} does not exist" in response.json()["detail"]


def test_unexpected_errors_are_a_json_500_with_an_error_id_in_the_log(app, caplog):
    class Broken:
        def list(self, status=None):
            raise RuntimeError("the disk holding patient-7 went away")

    app.dependency_overrides[get_worklist] = lambda: Broken()
    try:
        with caplog.at_level(logging.ERROR, logger="medsight.serving"):
            response = local_client(app).get("/v1/worklist")
    finally:
        app.dependency_overrides.clear()
    assert response.status_code == 500
    body = response.json()
    assert re.fullmatch(r"[0-9a-f]{12}", body["error_id"])
    assert body["detail"] == (
        f"internal error; the server's log holds the details under {body['error_id']}"
    )
    assert "patient-7" not in response.text and "Traceback" not in response.text
    logged = [r.getMessage() for r in caplog.records if body["error_id"] in r.getMessage()]
    assert len(logged) == 1
    assert "GET /v1/worklist failed: RuntimeError" in logged[0] and "Traceback" in logged[0]
    assert response.headers["x-content-type-options"] == "nosniff"  # headers on a 500 too


def _float_tiff(value: float) -> bytes:
    pixels = np.full((16, 16), 0.5, dtype=np.float32)
    pixels[4:8, 4:8] = value
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_pixels_are_a_400_not_a_500(client, value):
    for route in ("/v1/predict", "/v1/studies"):
        response = client.post(route, files=upload(_float_tiff(value)))
        assert response.status_code == 400, (route, response.text)
        assert "NaN" in response.json()["detail"] or "nan" in response.json()["detail"].lower()
    assert client.get("/v1/worklist").json()["items"] == []


# --------------------------------------------------------------------------- hosts


def test_a_foreign_host_header_is_refused_dns_rebinding(app):
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        response = local_client(app, base_url=f"http://{host}").get("/v1/worklist")
        assert response.status_code == 400, host
        assert "Invalid host header" in response.text
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        response = local_client(app, base_url=f"http://{host}").get("/v1/worklist")
        assert response.status_code == 200, host


def test_allowed_hosts_follow_the_bind_address_and_the_option():
    assert allowed_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "[::1]"]
    assert allowed_hosts("::1") == ["localhost", "127.0.0.1", "[::1]"]
    assert allowed_hosts("127.0.0.1", ["Scanner.local"]) == [
        "scanner.local",
        "localhost",
        "127.0.0.1",
        "[::1]",
    ]
    assert allowed_hosts("10.1.2.3") == ["10.1.2.3"]
    assert allowed_hosts("0.0.0.0") == ["*"]  # any name, but a token is required there
    assert allowed_hosts("0.0.0.0", ["ai.example.org"])[0] == "ai.example.org"
    assert "*" not in allowed_hosts("0.0.0.0", ["ai.example.org"])


@pytest.mark.parametrize("bad", ["", "evil*.example", "*", "http://a.example/"])
def test_allowed_host_values_are_checked(served_run, bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"--allowed-host .* is not a host name"):
        ServeSettings(run=served_run, allowed_hosts=[bad])


def test_allowed_host_option_reaches_the_app(served_run, tmp_path):
    settings = ServeSettings(run=served_run, data_dir=tmp_path, allowed_hosts=["ai.example.org"])
    app = create_app(settings)
    assert local_client(app, base_url="http://ai.example.org").get("/health").status_code == 200
    assert local_client(app, base_url="http://other.example").get("/health").status_code == 400


def test_serve_command_takes_repeatable_allowed_host(served_run, monkeypatch):
    seen = {}
    monkeypatch.setattr("medsight.serving.api.serve", lambda settings: seen.update(s=settings))
    result = CliRunner().invoke(
        cli, ["serve", str(served_run), "--allowed-host", "a.example", "--allowed-host", "b.local"]
    )
    assert result.exit_code == 0, result.output
    assert seen["s"].allowed_hosts == ["a.example", "b.local"]


# --------------------------------------------------------------------------- cross-site requests


def test_a_cross_site_form_post_is_refused_without_a_token(app):
    # What a form on another site sends: a browser adds Origin, and no custom header.
    hostile = TestClient(app, base_url="http://localhost")
    headers = {"Origin": "http://evil.example"}
    response = hostile.post("/v1/studies", files=upload(png_bytes(200)), headers=headers)
    assert response.status_code == 403
    assert response.json()["detail"] == (
        "POST needs the header 'X-Requested-With: medsight' when the server has no token "
        "(it proves the request is not a cross-site form)"
    )
    assert hostile.post("/v1/predict", files=upload(png_bytes())).status_code == 403
    patch = hostile.patch("/v1/studies/1", json={"status": "reviewed"})
    assert patch.status_code == 403
    assert hostile.get("/v1/worklist").json()["items"] == []  # reading stays open on loopback
    page = hostile.post("/v1/studies", files=upload(png_bytes(200)), headers=PAGE_HEADERS)
    assert page.status_code == 201


def test_with_a_token_the_bearer_header_is_the_proof(served_run, tmp_path):
    app = create_app(ServeSettings(run=served_run, data_dir=tmp_path, token=STRONG))
    client = TestClient(app, base_url="http://localhost")
    good = {"Authorization": f"Bearer {STRONG}"}
    assert client.post("/v1/predict", files=upload(png_bytes()), headers=good).status_code == 200
    assert (
        client.post("/v1/predict", files=upload(png_bytes()), headers=PAGE_HEADERS).status_code
        == 401
    )


# --------------------------------------------------------------------------- headers and CSP


def test_every_response_carries_the_security_headers(client, served_run, tmp_path):
    small = local_client(
        create_app(ServeSettings(run=served_run, data_dir=tmp_path, **{"max_upload_bytes": 100}))
    )
    responses = {
        "page": client.get("/"),
        "script": client.get("/static/app.js"),
        "api": client.get("/v1/model"),
        "404": client.get("/nowhere"),
        "422": client.get("/v1/studies/abc"),
        "400 host": local_client(client.app, base_url="http://evil.example").get("/"),
        "413": small.post("/v1/predict", files=upload(png_bytes(size=64))),
        "health": client.get("/health"),
    }
    for name, response in responses.items():
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff", name
        assert headers["x-frame-options"] == "DENY", name
        assert headers["referrer-policy"] == "no-referrer", name
        assert headers["content-security-policy"] == CSP, name
    assert "frame-ancestors 'none'" in CSP and "unsafe-inline" not in CSP
    assert "script-src 'self';" in CSP


def test_the_page_has_no_inline_script_or_style(client):
    html = client.get("/").text
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []
    assert "<style" not in html and " style=" not in html
    assert re.findall(r"\son[a-z]+=", html) == []  # no inline event handlers either
    assert "javascript:" not in html and "data:" not in html


def test_api_docs_allow_exactly_their_inline_script(client):
    for path in ("/docs", "/redoc"):
        response = client.get(path)
        assert response.status_code == 200
        csp = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp.split("style")[0]
        for body in re.findall(r"<script>(.*?)</script>", response.text, flags=re.S):
            digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in csp


# --------------------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    ("token", "words"),
    [
        ("   ", "a bearer token is required"),
        ("\n", "a bearer token is required"),
        ("short-token", "the bearer token has 11 characters, fewer than the 16 needed"),
    ],
)
def test_weak_tokens_are_refused_beyond_loopback(served_run, tmp_path, monkeypatch, token, words):
    monkeypatch.delenv("MEDSIGHT_TOKEN", raising=False)
    settings = ServeSettings(run=served_run, host="0.0.0.0", data_dir=tmp_path, token=token)
    with pytest.raises(ConfigError, match=re.escape(words)):
        create_app(settings)
    result = CliRunner().invoke(
        cli, ["serve", str(served_run), "--host", "0.0.0.0", "--token", token]
    )
    assert result.exit_code == 2 and words in result.output
    monkeypatch.setenv("MEDSIGHT_TOKEN", token)
    with pytest.raises(ConfigError, match=re.escape(words)):
        create_app(ServeSettings(run=served_run, host="0.0.0.0", data_dir=tmp_path))


def test_tokens_are_stripped(served_run, tmp_path):
    app = create_app(
        ServeSettings(run=served_run, host="0.0.0.0", data_dir=tmp_path, token=f"  {STRONG}\n")
    )
    client = TestClient(app, base_url="http://localhost")
    assert client.get("/v1/model", headers={"Authorization": f"Bearer {STRONG}"}).status_code == 200
    assert ServeSettings(run=served_run, token=" \t").token is None


# --------------------------------------------------------------------------- decode slots


def test_decode_slots_are_sized_from_memory():
    gib = 1024**3
    assert decode_slots_for(60_000_000, memory=8 * gib, cpus=8) == 2  # 1.92 GB each, half of 8
    assert decode_slots_for(60_000_000, memory=1 * gib, cpus=8) == 1  # never fewer than one
    assert decode_slots_for(60_000_000, memory=256 * gib, cpus=8) == 8  # never more than CPUs
    assert decode_slots_for(1_000_000, memory=4 * gib, cpus=64) == 64


def test_a_full_decode_slot_is_a_503_with_retry_after(served_run, tmp_path):
    app = create_app(
        ServeSettings(run=served_run, data_dir=tmp_path, decode_slots=1, decode_wait_s=0)
    )
    client = local_client(app)
    slots = app.state.model.slots
    assert slots.slots == 1
    with slots.hold():  # another upload is being decoded
        for route in ("/v1/predict", "/v1/studies", "/v1/explain"):
            response = client.post(route, files=upload(png_bytes()))
            assert response.status_code == 503, (route, response.text)
            assert response.headers["retry-after"] == "1"
            assert "already decoding 1 upload(s)" in response.json()["detail"]
    assert client.post("/v1/predict", files=upload(png_bytes())).status_code == 200
    assert client.get("/v1/worklist").json()["items"] == []


def test_decode_slots_wait_then_refuse():
    slots = DecodeSlots(2, wait=0.05)
    with slots.hold(), slots.hold(), pytest.raises(Busy, match="already decoding 2 upload"):
        slots.hold().__enter__()
    with slots.hold():  # released again
        pass
    with pytest.raises(ValueError, match="slots must be at least 1, got 0"):
        DecodeSlots(0)


# --------------------------------------------------------------------------- liveness


def test_health_answers_while_the_model_loads_and_ready_after(served_run, tmp_path):
    loaded = threading.Event()
    release = threading.Event()
    settings = ServeSettings(run=served_run, data_dir=tmp_path)

    def build():
        release.wait(30)
        app = create_app(settings)
        loaded.set()
        return app

    starting = StartingApp(build, settings)
    with local_client(starting) as client:  # the lifespan starts the build
        assert client.get("/health").json() == {"status": "ok"}
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "2"
        assert ready.json()["detail"] == "the model is loading"
        for method, path in [("get", "/v1/model"), ("post", "/v1/predict"), ("get", "/")]:
            response = getattr(client, method)(path)
            assert response.status_code == 503, path
            assert response.headers["retry-after"] == "2"
            assert response.headers["content-security-policy"] == CSP
        assert (
            local_client(starting, base_url="http://evil.example").get("/health").status_code == 400
        )
        release.set()
        assert loaded.wait(60)
        starting._thread.join(10)
        assert client.get("/ready").status_code == 200
        assert client.get("/v1/model").json()["classes"] == ["lesion", "normal"]


def test_a_run_that_cannot_load_stops_the_server_with_its_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServeSettings(run=tmp_path / "not-a-run", port=port, data_dir=tmp_path)
    with pytest.raises(MedsightError, match="not-a-run"):
        serve(settings)


def test_the_serve_command_listens_before_importing_torch():
    # torch (with the task and the model) is most of the seconds before a model is ready; the
    # server's modules must not need it to open the socket and answer /health.
    code = (
        "import sys, medsight.cli.main, medsight.serving.api; "
        "print(sorted(m for m in ('torch', 'medsight.tasks', 'medsight.inference') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
