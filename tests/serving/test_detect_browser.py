"""The web page of a detection run in Chromium: the boxes drawn over the uploaded image where
the API placed them and listed beside, no heat-map request, the detector's model facts, a
DICOM's boxes listed without a picture, and a review of "no finding" from the worklist.

Skipped (with the reason) when Playwright or Chromium cannot start here, as test_browser.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsight.serving.api import ServeSettings, create_app
from tests.detect_fixtures import box_image, set_box_thresholds, train_detect_run
from tests.serving.test_browser import SCREENSHOTS_ENV, serve_in_thread
from tests.serving.test_browser import browser as browser  # noqa: F401 - the fixture

#: Boxes shown on the PNG: the few best (a tiny detector's scores are all alike).
SHOWN = 3


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> dict[str, Path]:
    """A non-square PNG (a spot and a hole) and a DICOM with a spot."""
    from tests.conftest import write_dicom

    folder = tmp_path_factory.mktemp("detect-uploads")
    boxes = [(12, 14, 26, 28, "spot"), (38, 36, 52, 50, "hole")]
    png = folder / "chest.png"
    Image.fromarray(box_image(boxes, 64, seed=1)).resize((192, 128)).save(png)
    pixels = Image.fromarray(box_image(boxes[:1], 64, seed=5)).resize((120, 80))
    dicom = write_dicom(folder / "scan.dcm", np.asarray(pixels, dtype=np.int16) * 8)
    return {"png": png, "dicom": dicom}


@pytest.fixture(scope="module")
def live_detect(tmp_path_factory, uploads):
    """A tiny detector whose box threshold shows :data:`SHOWN` boxes on the PNG (and at least
    one on the DICOM), evaluated with headline metrics, served on a free port."""
    from medsight.inference import Predictor

    run = train_detect_run(tmp_path_factory.mktemp("detect-browser"))
    predictor = Predictor.from_run(run)
    top = []
    for path in uploads.values():
        out = predictor.predict_files([path])[0]
        top.append(np.sort(out[out[:, 5] >= 0, 4])[::-1])
    threshold = float(min(top[0][SHOWN - 1], top[1][0])) - 1e-6
    set_box_thresholds(run, threshold)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["map50"] = {"value": 0.61, "ci": [0.4, 0.8]}
    metrics["sensitivity_at_1fp"] = {"value": 0.7, "ci": [0.5, 0.9]}
    (run / "metrics.json").write_text(json.dumps(metrics))
    app = create_app(ServeSettings(run=run, data_dir=tmp_path_factory.mktemp("detect-data")))
    for url in serve_in_thread(app):
        yield url, app


def _watched_page(browser, url):
    """A page on ``url`` that records page errors, console errors and every request made."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    seen = {"errors": [], "console": [], "requests": []}
    page.on("pageerror", lambda exc: seen["errors"].append(str(exc)))
    page.on("console", lambda m: seen["console"].append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.goto(url + "/")
    page.wait_for_function("() => document.getElementById('intended-use').textContent.length > 20")
    return page, seen


def _upload(page, path: Path) -> dict:
    """Choose ``path`` in the page's file input; the /v1/predict answer the page received."""
    with page.expect_response(lambda r: r.url.endswith("/v1/predict")) as answer:
        page.set_input_files("#file-input", str(path))
    assert answer.value.status == 200, answer.value.text()
    page.wait_for_selector("#result:not([hidden])")
    return answer.value.json()


def test_boxes_are_drawn_where_the_api_placed_them(live_detect, browser, uploads, tmp_path):
    url, app = live_detect
    page, seen = _watched_page(browser, url)
    facts = page.text_content("#model-facts")
    assert "Box classes" in facts and "hole, spot" in facts
    assert "Box thresholds" in facts and "1 false positive per image" in facts
    assert "mAP@0.5" in facts and "0.610 (95 % CI 0.40–0.80)" in facts
    assert "Sensitivity at 1 FP/image" in facts

    body = _upload(page, uploads["png"])
    boxes = body["boxes"]
    assert len(boxes) >= SHOWN
    page.wait_for_function(
        "(n) => document.querySelectorAll('#boxes-svg rect.box').length === n", arg=len(boxes)
    )
    page.wait_for_selector("#overlay-img:not([hidden])")
    # The SVG spans the image in its own pixels, so a rect's attributes are the box's corners.
    assert page.get_attribute("#boxes-svg", "viewBox") == "0 0 192 128"
    rects = page.locator("#boxes-svg rect.box")
    for i, box in enumerate(boxes):
        x, y, w, h = (float(rects.nth(i).get_attribute(a)) for a in ("x", "y", "width", "height"))
        assert [x, y, x + w, y + h] == pytest.approx(
            [box["x1"], box["y1"], box["x2"], box["y2"]], abs=1e-6
        )
        urgent = "urgent" in rects.nth(i).get_attribute("class").split()
        assert urgent == (box["label"] == "spot")
        assert box["label"] in rects.nth(i).locator("title").text_content()
    items = page.locator("#bars .box-list li")
    assert items.count() == len(boxes)
    for i, box in enumerate(boxes):
        text = items.nth(i).text_content()
        assert text.startswith(box["label"]) and f"x {round(box['x1'])}–" in text
    assert page.text_content("#overlay-caption") == f"{len(boxes)} boxes at or above threshold"
    assert page.text_content("#result-kicker") == "Boxes found"
    assert page.text_content("#confidence-kicker") == "Top box score"
    assert "FP/image" in page.text_content("#flags")
    assert not any("/v1/explain" in request for request in seen["requests"])

    page.wait_for_timeout(500)  # let the bars finish their transition for the picture
    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "serve-detect-predict.png"), full_page=True)

    # Queued, then reviewed as showing no lesion at all: the reviewer's own answer.
    page.click("#queue-btn")
    page.wait_for_function(
        "() => document.getElementById('queue-btn').textContent.includes('study #')"
    )
    page.click("#tab-worklist")
    page.wait_for_selector(".wl-row")
    assert "top score of a box of the urgent class (spot)" in page.text_content(
        "#urgency-explainer"
    )
    page.locator(".wl-row").first.click()
    page.wait_for_selector("#study:not([hidden])")
    # the study shows the boxes it was queued with, over its image
    page.wait_for_selector("#study-boxes rect.box", state="attached")
    study_rects = page.eval_on_selector_all(
        "#study-boxes rect.box", "els => els.map(e => +e.getAttribute('x'))"
    )
    assert study_rects == pytest.approx([b["x1"] for b in body["boxes"]], abs=0.01)
    assert page.is_hidden("#reviewer-label")
    page.check("#reviewer-findings input[value='no finding']")
    page.click("#mark-reviewed")
    page.wait_for_function(
        "() => document.getElementById('banner').textContent.includes('reviewed')"
    )
    (item,) = app.state.worklist.list("reviewed")
    assert item.reviewer_label == "no finding" and item.urgency_finding == "spot"
    assert seen["errors"] == [] and seen["console"] == []
    page.close()


def test_a_dicom_upload_lists_its_boxes_without_a_picture(live_detect, browser, uploads):
    url, _ = live_detect
    page, seen = _watched_page(browser, url)
    body = _upload(page, uploads["dicom"])
    assert body["boxes"], "the threshold was chosen to show a box on the DICOM"
    assert page.is_hidden("#preview-img") and page.is_visible("#preview-note")
    assert "DICOM" in page.text_content("#preview-note")
    assert "heat map" not in page.text_content("#preview-note")
    assert page.is_hidden("#overlay-img")
    assert "boxes are listed" in page.text_content("#overlay-note")
    assert page.locator("#boxes-svg rect.box").count() == 0
    assert page.locator("#bars .box-list li").count() == len(body["boxes"])
    for box in body["boxes"]:
        assert box["x2"] <= 120 and box["y2"] <= 80  # the DICOM's own pixel grid
    assert not any("/v1/explain" in request for request in seen["requests"])
    assert seen["errors"] == [] and seen["console"] == []
    page.close()
