"""The web page of a multi-label run in Chromium: findings with threshold-marked bars, a map
per finding on click, the worklist's driving finding and a review by findings.

Skipped (with the reason) when Playwright or Chromium cannot start here, as test_browser.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medsight.serving.api import ServeSettings, create_app
from tests.serving.multilabel import THRESHOLDS, finding_image
from tests.serving.test_browser import SCREENSHOTS_ENV, _explanations_available, serve_in_thread
from tests.serving.test_browser import browser as browser  # noqa: F401 - the fixture


@pytest.fixture(scope="module")
def live_multilabel(multilabel_run, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("browser-multilabel")
    app = create_app(ServeSettings(run=multilabel_run, data_dir=data_dir, urgent=["b"]))
    for url in serve_in_thread(app):
        yield url, app


def test_findings_bars_maps_per_finding_and_the_worklist_driver(live_multilabel, browser, tmp_path):
    from tests.conftest import write_png

    url, app = live_multilabel
    image = write_png(tmp_path / "chest.png", finding_image(True, True, 32, seed=5))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.goto(url + "/")
    page.wait_for_function("() => document.getElementById('intended-use').textContent.length > 20")
    facts = page.text_content("#model-facts")
    assert "Urgent findings" in facts and "a 0.50, b 0.30" in facts

    page.set_input_files("#file-input", str(image))
    page.wait_for_selector("#result:not([hidden])")
    assert page.text_content("#result-kicker") == "Findings above threshold"
    rows = page.locator("#bars .finding")
    assert rows.count() == 2
    prediction = app.state.model.prediction(app.state.model.score(image.read_bytes()).probabilities)
    for i, finding in enumerate(prediction["findings"]):
        row = rows.nth(i)
        assert row.get_attribute("data-class") == finding["name"]
        classes = row.get_attribute("class").split()
        assert ("above" in classes) == finding["above_threshold"]
        # The threshold mark sits at the finding's threshold along the track.
        left = row.locator(".threshold").evaluate("m => parseFloat(m.style.left)")
        assert left == pytest.approx(100 * THRESHOLDS[finding["name"]])
    if _explanations_available():
        page.wait_for_selector("#overlay-img:not([hidden])", timeout=30_000)
        first = page.get_attribute("#overlay-img", "src")
        selected = page.locator("#bars .finding.selected").get_attribute("data-class")
        other = "a" if selected == "b" else "b"
        assert selected in page.text_content("#overlay-caption")
        page.click(f"#bars .finding[data-class='{other}']")
        page.wait_for_function(
            "(n) => document.getElementById('overlay-caption').textContent.includes(n + ' ·')",
            arg=other,
        )
        page.wait_for_selector("#overlay-img:not([hidden])")
        assert page.get_attribute("#overlay-img", "src") != first
        assert page.locator("#bars .finding.selected").get_attribute("data-class") == other
    page.wait_for_timeout(500)  # let the bars finish their transition for the picture
    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "serve-multilabel-predict.png"), full_page=True)

    page.click("#queue-btn")
    page.wait_for_function(
        "() => document.getElementById('queue-btn').textContent.includes('study #')"
    )
    page.click("#tab-worklist")
    page.wait_for_selector(".wl-row")
    assert page.is_visible("#wl-finding-head")
    assert page.text_content(".wl-row .wl-finding") == "b"  # --urgent b: b drives the order
    assert "urgent findings (b)" in page.text_content("#urgency-explainer")
    page.locator(".wl-row").first.click()
    page.wait_for_selector("#study:not([hidden])")
    assert page.locator("#study-bars .finding").count() == 2
    assert "(set by b)" in page.text_content("#study-facts")
    page.check("#reviewer-findings input[value='a']")
    page.check("#reviewer-findings input[value='b']")
    page.screenshot(path=str(shots / "serve-multilabel-worklist.png"), full_page=True)
    page.click("#mark-reviewed")
    page.wait_for_function(
        "() => document.getElementById('banner').textContent.includes('reviewed')"
    )
    (item,) = app.state.worklist.list("reviewed")
    assert item.reviewer_label == "a|b" and item.urgency_finding == "b"
    assert errors == [] and console == []
    page.close()
