"""DICOM uploaded to the worklist: nothing identifying reaches the stored file, the database, the
logs or any response, and the instances of one study stay grouped under new UIDs."""

from __future__ import annotations

import io
import logging

import numpy as np
import pydicom
from fastapi.testclient import TestClient

from medsight.data.privacy import pseudonymise, pseudonymous_uid
from medsight.serving.api import ServeSettings, create_app
from tests.data.identifying_dicom import identifying_dicom
from tests.serving.conftest import local_client

STUDY = "1.2.826.0.1.3680043.10.9999.1"
SERIES = "1.2.826.0.1.3680043.10.9999.2"


def upload(client: TestClient, data: bytes, name: str):
    return client.post("/v1/studies", files={"file": (name, data, "application/dicom")})


def test_no_identifying_value_of_the_profile_is_stored_logged_or_served(
    served_run, tmp_path, caplog
):
    data_dir = tmp_path / "serve"
    client = local_client(create_app(ServeSettings(run=served_run, data_dir=data_dir)))
    instances = [
        identifying_dicom(STUDY, SERIES, f"1.2.826.0.1.3680043.10.9999.{3 + i}", 650 + 40 * i)
        for i in range(2)
    ]
    secrets = dict(instances[0].secrets)
    secrets.update({f"second {k}": v for k, v in instances[1].secrets.items()})
    sent = [planted.to_bytes() for planted in instances]
    assert all(secret in sent[0] + sent[1] for secret in secrets.values())

    responses = []
    with caplog.at_level(logging.DEBUG):
        for i, data in enumerate(sent):
            response = upload(client, data, f"Secret010_Person_{i}.dcm")
            assert response.status_code == 201, response.text
            responses.append(response)
        ids = [r.json()["id"] for r in responses]
        responses.append(client.get("/v1/worklist"))
        responses.extend(client.get(f"/v1/studies/{i}") for i in ids)
        images = [client.get(f"/v1/studies/{i}/image") for i in ids]
        responses.extend(images)
        responses.append(client.patch(f"/v1/studies/{ids[0]}", json={"status": "reviewed"}))
    assert all(r.status_code == 200 for r in responses[2:]), [r.status_code for r in responses]
    patient_id = instances[0].values[0x00100020]
    assert responses[0].json()["patient"] == pseudonymise(patient_id)
    assert responses[0].json()["modality"] == "CT"

    client.app.state.worklist.close()
    stored = [p for p in data_dir.rglob("*") if p.is_file()]
    assert sum(p.suffix == ".dcm" for p in stored) == 2
    assert any(p.name == "worklist.db" for p in stored)
    log_text = caplog.text.encode()
    assert b"queued" in log_text  # the uploads were logged
    places = {str(p.relative_to(data_dir)): p.read_bytes() for p in stored}
    places["logs"] = log_text
    places.update({f"response {i}": r.content for i, r in enumerate(responses)})
    found = {
        (place, name)
        for place, content in places.items()
        for name, secret in secrets.items()
        if secret in content
    }
    assert found == set()

    # Served back de-identified, the two instances still form one study and one series.
    first, second = (pydicom.dcmread(io.BytesIO(r.content)) for r in images)
    assert first.StudyInstanceUID == second.StudyInstanceUID == pseudonymous_uid(STUDY)
    assert first.SeriesInstanceUID == second.SeriesInstanceUID == pseudonymous_uid(SERIES)
    assert first.StudyInstanceUID != STUDY and first.SOPInstanceUID != second.SOPInstanceUID
    assert first.PatientIdentityRemoved == "YES"
    assert first.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert first.PatientID == second.PatientID == pseudonymise(patient_id)


def test_a_dicom_with_burned_in_annotation_is_refused_and_not_stored(served_run, tmp_path):
    data_dir = tmp_path / "serve"
    client = local_client(create_app(ServeSettings(run=served_run, data_dir=data_dir)))
    planted = identifying_dicom()
    planted.dataset.BurnedInAnnotation = "YES"
    response = upload(client, planted.to_bytes(), "scan.dcm")
    assert response.status_code == 400
    assert response.json()["detail"] == (
        "DICOM BurnedInAnnotation is 'YES': its pixels may show patient identifiers, which "
        "medsight does not remove; send an image without burned-in text"
    )
    assert client.get("/v1/worklist").json()["items"] == []
    assert not list(data_dir.rglob("*.dcm"))


def test_a_dicom_study_is_previewed_as_the_model_read_it(served_run, tmp_path):
    """The page cannot show DICOM: the preview is the stored file decoded as the model read it
    (here MONOCHROME1, so the low stored values are the bright ones), at its own size."""
    from PIL import Image

    from tests.conftest import write_dicom

    pixels = np.zeros((24, 32), dtype=np.uint16)
    pixels[:, :16] = 1000  # left half high values: dark in MONOCHROME1
    path = write_dicom(
        tmp_path / "m1.dcm",
        pixels,
        PhotometricInterpretation="MONOCHROME1",
        PixelRepresentation=0,
        BitsStored=16,
        HighBit=15,
    )
    settings = ServeSettings(run=served_run, data_dir=tmp_path / "data")
    client = local_client(create_app(settings))
    study = upload(client, path.read_bytes(), "m1.dcm").json()
    answer = client.get(f"/v1/studies/{study['id']}/preview.png")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    shown = np.asarray(Image.open(io.BytesIO(answer.content)).convert("L"), dtype=float)
    assert shown.shape == (24, 32)
    assert shown[:, 16:].mean() > 200 and shown[:, :16].mean() < 50
    assert client.get("/v1/studies/999/preview.png").status_code == 404
