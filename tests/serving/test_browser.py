"""The web page in a real browser: Debian's Chromium driven by Playwright, against a live server.

Skipped (with the reason) when Playwright or Chromium cannot start here; never passed silently.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from medsight.serving.api import ServeSettings, create_app
from tests.serving.conftest import png_bytes

CHROMIUM = "/usr/bin/chromium"
#: Where the page's pictures go (set it to keep them; by default the test's own tmp folder).
SCREENSHOTS_ENV = "MEDSIGHT_SCREENSHOTS"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_thread(app):
    """Run ``app`` under uvicorn in a background thread on a free loopback port; yields its
    URL, and stops it after."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the test server did not start within 20 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def live_server(served_run, tmp_path_factory):
    """The real app under uvicorn in a background thread, on a free loopback port."""
    data_dir = tmp_path_factory.mktemp("browser-serve")
    app = create_app(ServeSettings(run=served_run, data_dir=data_dir))
    for url in serve_in_thread(app):
        yield url, app


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        reason = f"playwright is not installed ({exc}); pip install -e '.[dev]'"
        print(reason)
        pytest.skip(reason)
    manager = sync_playwright().start()
    try:
        chromium = manager.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
    except Exception as exc:  # noqa: BLE001 - any launch failure means "no browser here"
        manager.stop()
        reason = f"Chromium cannot start from {CHROMIUM}: {str(exc).splitlines()[0]}"
        print(reason)
        pytest.skip(reason)
    yield chromium
    chromium.close()
    manager.stop()


def _explanations_available() -> bool:
    try:
        from medsight.explain import Explainer, overlay  # noqa: F401
    except ImportError:
        return False
    return True


def test_upload_shows_prediction_and_heat_map_then_review_from_the_worklist(
    live_server, browser, tmp_path
):
    url, app = live_server
    image = tmp_path / "chest.png"
    image.write_bytes(png_bytes(200, size=64, seed=7))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # A Content-Security-Policy violation is reported on the console ("Refused to ...").
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    response = page.goto(url + "/")
    assert "script-src 'self'" in response.headers["content-security-policy"]

    page.wait_for_function("() => document.getElementById('intended-use').textContent.length > 20")
    assert "Not for diagnosis" in page.text_content("#intended-use")
    page.set_input_files("#file-input", str(image))
    page.wait_for_selector("#result:not([hidden])")
    label = page.text_content("#result-label").strip()
    assert label in ("lesion", "normal")
    bars = page.locator("#bars .bar")
    assert bars.count() == 2
    assert "%" in bars.first.text_content()
    if _explanations_available():
        page.wait_for_selector("#overlay-img:not([hidden])", timeout=30_000)
        src = page.get_attribute("#overlay-img", "src")
        assert src.startswith("data:image/png;base64,")
        width = page.evaluate("document.getElementById('overlay-img').naturalWidth")
        assert width >= 64
        # never scored against masks: the caption says the map is the default one
        caption = page.text_content("#overlay-caption")
        assert "the default map (this run was not scored against lesion masks)" in caption
    else:  # the page says so plainly rather than showing a broken image
        page.wait_for_function(
            "() => document.getElementById('overlay-note').textContent.includes('not available')"
        )
    page.wait_for_timeout(500)  # let the bars finish their transition for the picture
    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "serve-predict.png"), full_page=True)

    page.click("#queue-btn")
    page.wait_for_function(
        "() => document.getElementById('queue-btn').textContent.includes('study #')"
    )
    page.click("#tab-worklist")
    page.wait_for_selector(".wl-row")
    rows = page.locator(".wl-row")
    assert rows.count() == 1
    rows.first.click()
    page.wait_for_selector("#study:not([hidden])")
    page.wait_for_selector("#study-img:not([hidden])")
    page.select_option("#reviewer-label", label)
    page.screenshot(path=str(shots / "serve-worklist.png"), full_page=True)
    page.click("#mark-reviewed")
    page.wait_for_function(
        "() => document.getElementById('banner').textContent.includes('reviewed')"
    )
    page.wait_for_selector("#worklist-empty:not([hidden])")  # gone from the pending list

    items = app.state.worklist.list("reviewed")
    assert len(items) == 1 and items[0].reviewer_label == label
    assert errors == []
    assert console == []
    page.close()


def test_the_policy_blocks_inline_script_so_the_check_above_can_fail(live_server, browser):
    # The console check above must see a violation when there is one: inject an inline script.
    url, _ = live_server
    page = browser.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.goto(url + "/")
    page.evaluate(
        "() => { const s = document.createElement('script');"
        " s.textContent = 'window.injected = 1'; document.body.append(s); }"
    )
    page.wait_for_timeout(200)
    assert page.evaluate("() => window.injected === undefined")
    assert any("Content Security Policy" in text for text in console), console
    page.close()


@pytest.fixture(scope="module")
def live_triage(served_run, tmp_path_factory):
    """A server of its own (the default triage policy) holding three studies with context."""
    import httpx

    data_dir = tmp_path_factory.mktemp("browser-triage")
    app = create_app(ServeSettings(run=served_run, data_dir=data_dir))
    for url in serve_in_thread(app):
        queued = {}
        for name, value, context in (
            ("routine", 220, {"priority": "routine", "setting": "outpatient"}),
            ("stat", 30, {"priority": "stat", "age_years": "67", "setting": "emergency"}),
            ("prior", 40, {"prior_findings": "nodule", "setting": "inpatient"}),
        ):
            response = httpx.post(
                url + "/v1/studies",
                files={"file": ("scan.png", png_bytes(value, size=32, seed=value))},
                data=context,
                headers={"X-Requested-With": "medsight"},
            )
            assert response.status_code == 201, response.text
            queued[name] = response.json()
        yield url, app, queued


def test_the_worklist_shows_each_studys_place_context_and_why_in_policy_order(
    live_triage, browser, tmp_path
):
    url, _, queued = live_triage
    expected = [item["id"] for item in httpx_get(url + "/v1/worklist")["items"]]
    # The STAT referral is read first, whatever the model's risk of the other two.
    assert expected[0] == queued["stat"]["id"]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    page.wait_for_function("() => document.getElementById('intended-use').textContent.length > 20")
    page.click("#tab-worklist")
    page.wait_for_selector(".wl-why-row")
    shown = [
        int(i) for i in page.eval_on_selector_all(".wl-row", "rows => rows.map(r => r.dataset.id)")
    ]
    assert shown == expected
    assert page.locator(".wl-rank").all_text_contents() == ["1", "2", "3"]
    whys = page.locator(".wl-why").all_text_contents()
    assert whys[0].startswith("stat referral; risk ")
    assert any("prior finding: nodule" in why for why in whys)
    first_tags = page.locator(".wl-why-row").first.locator(".tag").all_text_contents()
    assert first_tags == ["STAT", "67 y", "emergency"]
    assert "1. STAT referrals; 2. model risk" in page.text_content("#policy-explainer")
    page.locator(".wl-why-row").first.click()  # the reasons and context in the study too
    page.wait_for_selector("#study:not([hidden])")
    assert whys[0] in page.text_content("#study-facts")
    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "serve-triage-worklist.png"), full_page=True)
    assert errors == []
    page.close()


def httpx_get(url: str) -> dict:
    import httpx

    return httpx.get(url, headers={"X-Requested-With": "medsight"}).json()


@pytest.fixture(scope="module")
def volume_server(served_volume_run, tmp_path_factory):
    """A 3-D run (tiny MedMNIST3D-like volumes) served live."""
    data_dir = tmp_path_factory.mktemp("browser-3d")
    yield from serve_in_thread(create_app(ServeSettings(run=served_volume_run, data_dir=data_dir)))


def test_a_volume_run_takes_a_nifti_upload_and_shows_its_map_on_three_planes(
    volume_server, browser, tmp_path
):
    from tests.volumes import blob_volume, write_nifti

    volume = write_nifti(tmp_path / "scan.nii.gz", blob_volume(5, 12, True))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(volume_server + "/")
    page.wait_for_function("() => document.getElementById('intended-use').textContent.length > 20")
    assert ".nii" in page.get_attribute("#file-input", "accept")  # the file dialog offers volumes
    assert page.text_content("#drop-title") == "Drop a volume here"
    page.set_input_files("#file-input", str(volume))
    page.wait_for_selector("#result:not([hidden])")
    assert page.text_content("#result-label").strip() in ("0", "1")
    assert "three planes" in page.text_content("#preview-note")
    assert page.is_hidden("#queue-btn")  # the worklist takes images only
    if _explanations_available():
        page.wait_for_selector("#overlay-img:not([hidden])", timeout=30_000)
        width, height = page.evaluate(
            "[document.getElementById('overlay-img').naturalWidth, "
            "document.getElementById('overlay-img').naturalHeight]"
        )
        assert width >= 3 * height - 8  # axial, coronal and sagittal side by side
    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "serve-volume.png"), full_page=True)
    assert not errors, errors
