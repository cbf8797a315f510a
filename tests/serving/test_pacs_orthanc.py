"""End to end with a real Orthanc (tests/orthanc.py): Orthanc sends studies to the medsight node
by C-STORE, they appear on the worklist, medsight's SR comes back into the same study in
Orthanc; results wait when Orthanc is unreachable; the DICOMweb poll fetches from Orthanc's
DICOMweb plugin, once, and says which URL refused the credentials."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medsight.integration import DicomNode, ResultSender, StoreDestination, pending_results
from medsight.integration.dicomweb import DicomWebClient, DicomWebError, poll
from medsight.integration.results import NOT_FOR_DIAGNOSIS
from medsight.serving.service import ModelService
from medsight.serving.worklist import WorklistStore
from tests.conftest import wait_for, write_dicom
from tests.orthanc import free_port, orthanc  # noqa: F401 - the fixture

FAKE_NAME, FAKE_ID = "Zzyzx^Quillonfake", "QFAKE-81723"


@pytest.fixture(scope="module")
def model(served_run):
    from medsight.inference import Predictor

    return ModelService(Predictor.from_run(served_run))


def store_for(folder: Path) -> WorklistStore:
    return WorklistStore(f"sqlite:///{folder / 'worklist.db'}", folder)


def make_study(folder: Path, n: int = 3, value: int = 900, **tags) -> list[Path]:
    """``n`` CT slices of one study with known pixels (bright: the run's "lesion") and the
    recognisable fake patient."""
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        pixels = np.full((16, 16), value, dtype=np.int16) + np.arange(16, dtype=np.int16) * i
        paths.append(
            write_dicom(
                folder / f"{study[-6:]}-{i}.dcm",
                pixels,
                PatientName=FAKE_NAME,
                PatientID=FAKE_ID,
                PatientBirthDate="19610302",
                PatientSex="F",
                StudyInstanceUID=study,
                SeriesInstanceUID=series,
                InstanceNumber=i + 1,
                StudyDate="20260315",
                StudyTime="101500",
                PatientAge="065Y",
                RequestedProcedurePriority="STAT",
                AccessionNumber="ACC-QF-1",
                **tags,
            )
        )
    return paths


def upload(orthanc, paths) -> dict:  # noqa: F811
    with orthanc.client() as client:
        answers = [client.post("/instances", content=Path(p).read_bytes()) for p in paths]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return answers[0].json()


def orthanc_instances(orthanc, study_id: str) -> list[dict]:  # noqa: F811
    with orthanc.client() as client:
        return client.get(f"/studies/{study_id}/instances").json()


def test_orthanc_round_trip_worklist_and_sr_back_without_patient_data(
    orthanc,  # noqa: F811
    model,
    served_run,
    tmp_path,
    caplog,
):
    from pydicom.data import get_testdata_file

    data_dir = tmp_path / "data"
    store = store_for(data_dir)
    sender = ResultSender(
        StoreDestination("ORTHANC", "127.0.0.1", orthanc.dicom_port, calling_aet="MEDSIGHT"),
        data_dir / "outbox",
        first_retry=0.2,
    )
    node = DicomNode(
        model,
        store,
        port=orthanc.node_port,
        host="127.0.0.1",
        calling_aets=[orthanc.aet],
        series_timeout=1,
        results=sender,
    )
    paths = make_study(tmp_path / "in")
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in paths}
    ct_small = get_testdata_file("CT_small.dcm")
    secrets = [FAKE_NAME.encode(), b"Quillonfake", FAKE_ID.encode(), b"ACC-QF-1", b"19610302"]
    if ct_small:
        ct = pydicom.dcmread(ct_small)
        secrets += [str(ct.PatientName).encode(), str(ct.PatientID).encode()]
    with caplog.at_level(logging.DEBUG):
        node.start()
        sender.start(every=0.2)
        try:
            ours = upload(orthanc, paths)
            studies = [ours["ParentStudy"]]
            if ct_small:
                studies.append(upload(orthanc, [ct_small])["ParentStudy"])
            with orthanc.client() as client:
                for study_id in studies:
                    answer = client.post(
                        "/modalities/medsight/store",
                        json={"Resources": [study_id], "Synchronous": True},
                        timeout=60,
                    )
                    assert answer.status_code == 200, answer.text
            queued = wait_for(
                lambda: len(store.list()) == len(studies) and store.list(), what="the worklist"
            )
            wait_for(lambda: pending_results() == 0 and sender.pending() == 0, what="delivery")
        finally:
            node.stop()
            sender.stop()
    uid = next(iter(sent.values())).StudyInstanceUID
    ours_on_list = [s for s in queued if s.study_uid == uid]
    assert len(ours_on_list) == 1
    study = ours_on_list[0]
    assert study.context == {"priority": "stat", "age_years": 65.0}

    # medsight's SR is in Orthanc, in the very study of the images (same patient, same UID).
    listing = orthanc_instances(orthanc, ours["ParentStudy"])
    srs = [i for i in listing if i["MainDicomTags"].get("SOPInstanceUID") not in sent]
    assert len(listing) == len(paths) + 1 and len(srs) == 1
    with orthanc.client() as client:
        sr = pydicom.dcmread(io.BytesIO(client.get(f"/instances/{srs[0]['ID']}/file").content))
    assert sr.Modality == "SR" and sr.SOPClassUID.name == "Comprehensive SR Storage"
    assert sr.StudyInstanceUID == uid and sr.PatientID == FAKE_ID
    items = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in sr.ContentSequence}
    assert items["Finding"].TextValue == study.label  # what the worklist shows
    finding = study.urgency_finding  # the run's urgent class
    probability = items[f"Model probability of {finding}"].MeasuredValueSequence[0].NumericValue
    assert float(probability) == pytest.approx(study.probabilities[finding], abs=1e-4)
    assert items["Algorithm Name"].TextValue == "medcnn_s"
    assert items["Algorithm Version"].TextValue.startswith(study.model_version)
    assert items["Comment"].TextValue == NOT_FOR_DIAGNOSIS
    reference = items["Source"].ReferencedSOPSequence[0]
    middle = [ds for ds in sent.values() if ds.InstanceNumber == 2][0]
    assert reference.ReferencedSOPInstanceUID == middle.SOPInstanceUID

    # The worklist `medsight serve` shows puts the STAT referral first, and says why.
    from medsight.serving.api import ServeSettings, create_app
    from tests.serving.conftest import local_client

    settings = ServeSettings(run=served_run, data_dir=data_dir)
    with local_client(create_app(settings, model=model, worklist=store)) as client:
        listed = client.get("/v1/worklist").json()
    assert len(listed["items"]) == len(studies) == 2  # ours (STAT) and CT_small (no priority)
    first = listed["items"][0]
    assert first["id"] == study.id and first["rank"] == 1
    assert first["why"].startswith("stat referral")

    # Nothing identifying in medsight's folder, database or log.
    store.engine.dispose()
    places = {str(p): p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    assert any(name.endswith("worklist.db") for name in places)
    places["log"] = caplog.text.encode()
    assert b"result delivered" in places["log"]
    leaks = {(where, s) for where, text in places.items() for s in secrets if s in text}
    assert leaks == set()
    # Nor the source UIDs, outside the database (which keeps the study's, to route the result
    # back): stored files carry remapped UIDs, and the log names studies by pseudonyms.
    uids = {str(uid).encode() for uid in sent} | {str(uid).encode()}
    found = {
        (where, u) for where, text in places.items() for u in uids if u in text
        if not where.endswith("worklist.db")
    }  # fmt: skip
    assert found == set()


def test_results_wait_while_the_pacs_is_down_and_arrive_after_a_restart(
    orthanc,  # noqa: F811
    model,
    served_run,
    tmp_path,
    caplog,
):
    data_dir = tmp_path / "data"
    store = store_for(data_dir)
    down = StoreDestination("ORTHANC", "127.0.0.1", free_port(), timeout=2)
    sender = ResultSender(down, data_dir / "outbox", first_retry=0.2, max_retry=0.4)
    node = DicomNode(model, store, port=0, host="127.0.0.1", series_timeout=1, results=sender)
    paths = make_study(tmp_path / "in", n=2)
    ours = upload(orthanc, paths)  # the PACS holds the images; a modality sends them to us
    with caplog.at_level(logging.INFO, logger="medsight.pacs"):
        node.start()
        try:
            from pynetdicom import AE
            from pynetdicom.sop_class import CTImageStorage

            ae = AE("MODALITY")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", node.port, ae_title="MEDSIGHT")
            assert [assoc.send_c_store(pydicom.dcmread(p)).Status for p in paths] == [0, 0]
            assoc.release()
            wait_for(lambda: store.list(), what="the worklist")
        finally:
            node.stop()
        for _ in range(3):
            sender.deliver(force=True)
    assert sender.pending() == 1 and pending_results() >= 1
    assert "not delivered to ORTHANC@127.0.0.1" in caplog.text and "retry 3" in caplog.text
    # `medsight serve` on the same worklist shows the waiting result on /ready
    from medsight.serving.api import ServeSettings, create_app
    from tests.serving.conftest import local_client

    settings = ServeSettings(run=served_run, data_dir=data_dir)
    with local_client(create_app(settings, model=model, worklist=store)) as client:
        ready = client.get("/ready").json()
    assert ready["ready"] is True and ready["results_pending"] == 1
    assert len(orthanc_instances(orthanc, ours["ParentStudy"])) == 2

    # A restart: a new sender on the same outbox, Orthanc reachable now. It knows the study
    # only by its UID (no patient data was kept) and asks Orthanc whose it is.
    up = StoreDestination("ORTHANC", "127.0.0.1", orthanc.dicom_port, calling_aet="MEDSIGHT")
    restarted = ResultSender(up, data_dir / "outbox")
    assert restarted.pending() == 1
    assert restarted.deliver(force=True) == 1 and restarted.pending() == 0
    listing = orthanc_instances(orthanc, ours["ParentStudy"])
    assert len(listing) == 3  # the SR joined the same study (same patient ID, same UID)
    store.engine.dispose()


def test_dicomweb_poll_queues_each_study_once(orthanc, model, tmp_path):  # noqa: F811
    store = store_for(tmp_path / "data")
    paths = make_study(tmp_path / "in", n=3, StudyDescription="poll")
    upload(orthanc, paths)
    uid = pydicom.dcmread(paths[0]).StudyInstanceUID
    client = DicomWebClient(orthanc.dicomweb, auth=orthanc.auth)
    first = poll(model, store, client, since="20260315")
    assert first.queued >= 1 and first.failed == 0
    ours = [s for s in store.list() if s.study_uid == uid]
    assert len(ours) == 1
    assert ours[0].context == {"priority": "stat", "age_years": 65.0}
    stored = pydicom.dcmread(store.data_dir / ours[0].stored_as)
    assert stored.InstanceNumber == 2 and stored.PatientIdentityRemoved == "YES"
    again = poll(model, store, client, since="20260315")
    assert again.queued == 0 and again.known == first.found
    assert len(store.list()) == first.queued
    # A later --since excludes the study (its date is 2026-03-15 10:15).
    later = poll(model, store, client, since="20260315-101600")
    assert later.found == 0
    store.engine.dispose()


def test_dicomweb_wrong_password_is_one_error_naming_the_url(orthanc, tmp_path):  # noqa: F811
    client = DicomWebClient(orthanc.dicomweb, auth=(orthanc.user, "not-the-password"))
    with pytest.raises(DicomWebError) as caught:
        client.studies("20000101")
    message = str(caught.value)
    assert orthanc.dicomweb in message and "HTTP 401" in message
    assert "not-the-password" not in message


def test_dicomweb_server_that_does_not_answer_is_one_error_naming_the_url():
    import socket

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        with pytest.raises(DicomWebError, match=f"{url} did not answer within 1 s"):
            DicomWebClient(url, timeout=1).studies("20000101")


def test_listen_command_sends_sr_and_overlay_back_to_orthanc(
    orthanc,  # noqa: F811
    served_run,
    tmp_path,
):
    import os
    import signal
    import subprocess
    import sys

    import medsight

    data_dir = tmp_path / "listen"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(medsight.__file__).parents[1]), os.getcwd()])
    command = [
        sys.executable, "-m", "medsight", "listen", str(served_run),
        "--ae-title", "MEDSIGHT", "--port", str(orthanc.node_port), "--host", "127.0.0.1",
        "--calling-aets", f"{orthanc.aet},OTHER", "--series-timeout", "1",
        "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--overlay",
        "--data-dir", str(data_dir), "--device", "cpu",
    ]  # fmt: skip
    log = tmp_path / "listen.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        with orthanc.client() as client:
            wait_for(
                lambda: client.post("/modalities/medsight/echo", json={}).status_code == 200,
                what="C-ECHO from Orthanc to medsight listen",
            )
            paths = make_study(tmp_path / "in", n=3)
            ours = upload(orthanc, paths)
            answer = client.post(
                "/modalities/medsight/store",
                json={"Resources": [ours["ParentStudy"]], "Synchronous": True},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
            listing = wait_for(
                lambda: (
                    len(found := orthanc_instances(orthanc, ours["ParentStudy"])) == 5 and found
                ),
                what="the SR and the overlay in Orthanc",
            )
            series = client.get(f"/studies/{ours['ParentStudy']}/series").json()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    text = log.read_bytes()
    assert process.returncode == 0, text.decode(errors="replace")[-2000:]
    modalities = sorted(s["MainDicomTags"]["Modality"] for s in series)
    assert modalities == ["CT", "OT", "SR"]  # the images, medsight's heat map, medsight's SR
    descriptions = {s["MainDicomTags"].get("SeriesDescription", "") for s in series}
    assert "medsight AI triage - not for diagnosis" in descriptions
    assert "medsight heat map - not for diagnosis" in descriptions
    assert len(listing) == 5
    assert b"result delivered" in text
    places = {str(p): p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    places["listen log"] = text
    secrets = [FAKE_NAME.encode(), b"Quillonfake", FAKE_ID.encode(), b"ACC-QF-1"]
    assert {
        (where, s) for where, content in places.items() for s in secrets if s in content
    } == set()


def test_pacs_poll_command_refused_credentials_is_one_error_line(
    orthanc,  # noqa: F811
    served_run,
    tmp_path,
    monkeypatch,
):
    from typer.testing import CliRunner

    from medsight.cli.main import app

    credentials = tmp_path / "dicomweb.txt"
    credentials.write_text(f"{orthanc.user}:wrong-password-123\n")
    args = ["pacs", "poll", str(served_run), "--url", orthanc.dicomweb, "--since", "20260101"]
    args += ["--once", "--credentials-file", str(credentials), "--data-dir", str(tmp_path / "d")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: DICOMweb server {orthanc.dicomweb} refused")
    assert "wrong-password-123" not in result.output

    credentials.write_text(f"{orthanc.user}:{orthanc.password}\n")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"{orthanc.dicomweb}: " in said and "already on the worklist, 0 failed" in said


def test_results_by_stow_rs_join_the_study_also_after_a_restart(
    orthanc,  # noqa: F811
    model,
    tmp_path,
):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from medsight.integration import StowDestination

    data_dir = tmp_path / "data"
    store = store_for(data_dir)
    stow = StowDestination(orthanc.dicomweb, auth=orthanc.auth)
    sender = ResultSender(stow, data_dir / "outbox")
    node = DicomNode(model, store, port=0, host="127.0.0.1", series_timeout=1, results=sender)
    first, second = make_study(tmp_path / "a", n=1), make_study(tmp_path / "b", n=1)
    studies = [upload(orthanc, paths)["ParentStudy"] for paths in (first, second)]
    node.start()
    try:
        ae = AE("MODALITY")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MEDSIGHT")
        assert [assoc.send_c_store(pydicom.dcmread(p[0])).Status for p in (first, second)] == [0, 0]
        assoc.release()
        wait_for(lambda: len(store.list()) == 2, what="the worklist")
    finally:
        node.stop()
    assert sender.pending() == 2
    # One delivered by this sender (patient attributes in memory) ...
    outbox = sorted((data_dir / "outbox").glob("*.json"))
    held = outbox[1].read_bytes()
    outbox[1].unlink()
    assert sender.deliver(force=True) == 1
    # ... one after a restart: looked up by QIDO-RS, then stored by STOW-RS.
    outbox[1].write_bytes(held)
    assert ResultSender(stow, data_dir / "outbox").deliver(force=True) == 1
    assert [len(orthanc_instances(orthanc, s)) for s in studies] == [2, 2]
    store.engine.dispose()
