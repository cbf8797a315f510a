"""Property-based tests of the whole API: no request, however hostile, gets a 5xx or an answer
its OpenAPI schema does not describe.

Schemathesis generates requests for every route from the app's own OpenAPI (without a token,
with the page's same-origin header, and with a token) and follows the OpenAPI links of a
queued study (get it, fetch its image, review it) as a state machine. Hypothesis strategies
feed the upload routes with broken images: truncations and bit flips of a valid PNG, TIFF and
DICOM, headers declaring huge images, NaN and infinite float TIFFs, and odd DICOM modalities.
Budgets are fixed (``max_examples``), so the suite runs in the normal ``pytest`` in about a
minute.
"""

from __future__ import annotations

import io
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from medsight.serving.api import ServeSettings, create_app
from tests.conftest import write_dicom
from tests.serving.conftest import PAGE_HEADERS, local_client, png_bytes

#: Odd DICOM values are the point here: pydicom's warnings about them are expected.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

TOKEN = "fuzzing-token-0123456789"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
#: The example budgets: together about a minute on two shared cores.
API_EXAMPLES = 25
UPLOAD_EXAMPLES = 60
STATEFUL_STEPS = 8

FUZZ = settings(
    max_examples=API_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples on every run: a failure is reproducible
)


def _app(run: Path, data_dir: Path, **extra):
    # Schemathesis' ASGI client names the host "testserver": allowed the way --allowed-host
    # allows a reverse proxy's name.
    settings_ = ServeSettings(run=run, data_dir=data_dir, allowed_hosts=["testserver"], **extra)
    return create_app(settings_)


@pytest.fixture(scope="module")
def open_app(served_run, tmp_path_factory):
    return _app(served_run, tmp_path_factory.mktemp("fuzz-open"))


@pytest.fixture(scope="module")
def token_app(served_run, tmp_path_factory):
    return _app(served_run, tmp_path_factory.mktemp("fuzz-token"), token=TOKEN)


@pytest.fixture(scope="module")
def open_schema(open_app):
    return schemathesis.openapi.from_asgi("/openapi.json", open_app)


@pytest.fixture(scope="module")
def token_schema(token_app):
    return schemathesis.openapi.from_asgi("/openapi.json", token_app)


open_api = schemathesis.pytest.from_fixture("open_schema")
token_api = schemathesis.pytest.from_fixture("token_schema")


@open_api.parametrize()
@FUZZ
def test_no_route_answers_5xx_or_off_schema_without_a_token(case):
    case.call_and_validate(headers=PAGE_HEADERS, checks=CHECKS)


@open_api.parametrize()
@FUZZ
def test_cross_site_requests_get_documented_refusals(case):
    response = case.call_and_validate(checks=CHECKS)  # no same-origin header
    if case.method.upper() not in ("GET", "HEAD", "OPTIONS") and case.path.startswith("/v1/"):
        # Never carried out: refused (403), or unusable before it gets that far (400, 405, 422).
        assert response.status_code in (400, 403, 405, 422), (case.path, response.text)


@token_api.parametrize()
@FUZZ
def test_no_route_answers_5xx_or_off_schema_with_a_token(case):
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)


@token_api.parametrize()
@FUZZ
def test_without_the_token_every_v1_route_is_401(case):
    response = case.call_and_validate(checks=CHECKS)
    if case.path.startswith("/v1/"):
        assert response.status_code in (400, 401, 405, 422), (case.path, response.text)


def test_studies_stay_consistent_through_their_links(open_schema):
    """Queue studies, then follow the links to read, fetch and review them in random orders."""
    machine = open_schema.as_state_machine()

    followed: list[tuple[str, str, int]] = []

    class Studies(machine):
        def before_call(self, case):
            # Random bytes are never an image: queue real ones so that the links lead on.
            if case.method.upper() == "POST" and case.path == "/v1/studies":
                case.body = {"file": png_bytes(100 + len(followed) % 100, seed=len(followed))}

        def after_call(self, response, case):
            followed.append((case.method.upper(), case.path, response.status_code))

        def get_call_kwargs(self, case):
            return {"headers": PAGE_HEADERS}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    Studies.run(
        settings=settings(
            max_examples=4,
            stateful_step_count=STATEFUL_STEPS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
        )
    )
    # The links were followed: a queued study was read back or reviewed by its id.
    linked = {
        (m, p) for m, p, status in followed if p == "/v1/studies/{study_id}" and status == 200
    }
    assert linked, followed


# --------------------------------------------------------------------------- broken uploads


def _png() -> bytes:
    return png_bytes(180, size=16, seed=1)


def _rgb_png() -> bytes:
    pixels = np.random.default_rng(2).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _float_tiff(values: list[float]) -> bytes:
    pixels = np.resize(np.asarray(values, dtype=np.float32), (8, 8))
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


def _dicom(**tags) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        pixels = np.arange(256, dtype=np.int16).reshape(16, 16)
        return write_dicom(Path(folder) / "x.dcm", pixels, **tags).read_bytes()


def _png_declaring(width: int, height: int) -> bytes:
    """A valid PNG whose IHDR (with a correct CRC) declares ``width`` × ``height``."""
    data = bytearray(_png())
    ihdr = bytearray(data[12:29])  # type + 13 bytes of header
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


VALID = {"png": _png(), "rgb_png": _rgb_png(), "dicom": _dicom(), "tiff": _float_tiff([0.5])}


@st.composite
def broken_uploads(draw) -> bytes:
    base = VALID[draw(st.sampled_from(sorted(VALID)))]
    kind = draw(st.sampled_from(["truncate", "flip", "huge_png", "float_tiff", "dicom_tags"]))
    if kind == "truncate":
        return base[: draw(st.integers(0, len(base) - 1))]
    if kind == "flip":
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "huge_png":
        side = st.integers(1, 2**31 - 1)
        return _png_declaring(draw(side), draw(side))
    if kind == "float_tiff":
        special = st.sampled_from([float("nan"), float("inf"), float("-inf"), 3.4e38, -3.4e38])
        return _float_tiff(draw(st.lists(st.floats() | special, min_size=1, max_size=64)))
    tags = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "Modality": st.text(
                    st.characters(min_codepoint=32, max_codepoint=126), max_size=16
                ),
                "PhotometricInterpretation": st.sampled_from(
                    ["MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL", "", "NONSENSE"]
                ),
                "Rows": st.integers(0, 65535),
                "Columns": st.integers(0, 65535),
                "BitsStored": st.integers(1, 16),
                "SamplesPerPixel": st.sampled_from([1, 3, 4]),
                "RescaleSlope": st.sampled_from(["0", "1e308", "-1", "nan"]),
                "WindowWidth": st.sampled_from(["0", "-5", "1e-30"]),
                "NumberOfFrames": st.sampled_from(["0", "1", "1000000"]),
            },
        )
    )
    return _dicom(**tags)


@pytest.fixture(scope="module")
def upload_client(open_app):
    return local_client(open_app)


@settings(
    max_examples=UPLOAD_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
@given(data=broken_uploads(), route=st.sampled_from(["/v1/predict", "/v1/studies"]))
def test_broken_uploads_get_a_4xx_with_a_reason_never_a_5xx(upload_client, data, route):
    response = upload_client.post(
        route, files={"file": ("upload", data, "application/octet-stream")}
    )
    event(f"{route} {response.status_code}")
    assert response.status_code < 500, (route, response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    if response.status_code >= 400:
        assert response.status_code in (400, 413, 415), response.text
        detail = response.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and len(detail) > 10
