"""The DICOM node on its own, driven by a pynetdicom SCU as a modality would: who may associate,
what it keeps, ignores and refuses, when a study is scored, and that nothing identifying
reaches the worklist's folder, database or the log."""

from __future__ import annotations

import io
import logging

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medsight.integration import DicomNode, context_from_dicom
from medsight.integration.dicom_node import CANNOT_UNDERSTAND, SUCCESS
from medsight.serving.service import ModelService
from medsight.serving.worklist import WorklistStore
from tests.conftest import wait_for
from tests.data.identifying_dicom import identifying_dicom

SCU_AET = "TESTSCU"


@pytest.fixture(scope="module")
def model(served_run):
    from medsight.inference import Predictor

    return ModelService(Predictor.from_run(served_run))


@pytest.fixture
def node(model, tmp_path):
    store = WorklistStore(f"sqlite:///{tmp_path / 'data' / 'worklist.db'}", tmp_path / "data")
    node = DicomNode(
        model,
        store,
        ae_title="MEDSIGHT",
        port=0,
        host="127.0.0.1",
        calling_aets=[SCU_AET, "ORTHANC"],
        series_timeout=1,
        spool=tmp_path / "spool",
    )
    node.start()
    yield node
    node.stop()
    store.engine.dispose()


def associate(node: DicomNode, aet: str = SCU_AET, contexts=None):
    from pynetdicom import AE
    from pynetdicom.sop_class import ComprehensiveSRStorage, Verification

    ae = AE(aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for context in contexts or [
        (Verification,),
        (CTImageStorage, [ExplicitVRLittleEndian]),
        (ComprehensiveSRStorage, [ExplicitVRLittleEndian]),
    ]:
        ae.add_requested_context(*context)
    return ae.associate("127.0.0.1", node.port, ae_title="MEDSIGHT")


def echo_ok(node: DicomNode) -> bool:
    assoc = associate(node)
    try:
        return assoc.is_established and assoc.send_c_echo().Status == SUCCESS
    finally:
        assoc.release()


def instance(study: str, series: str, number: int, value: int = 700) -> pydicom.Dataset:
    planted = identifying_dicom(study, series, generate_uid(), value)
    planted.dataset.InstanceNumber = number
    return planted


def test_only_listed_calling_ae_titles_may_associate(node, caplog):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE("STRANGER")
    ae.add_requested_context(Verification)
    with caplog.at_level(logging.INFO, logger="medsight.pacs"):
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MEDSIGHT")
    assert assoc.is_rejected
    rejection = assoc.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, 3)
    assert "'STRANGER'" in caplog.text and "refused" in caplog.text
    assert echo_ok(node)  # a listed AE title is still served


def test_an_aborted_study_is_scored_from_what_arrived_without_identifying_data(node, caplog):
    study, series = generate_uid(), generate_uid()
    sent = [instance(study, series, n, 700 + 10 * n) for n in (1, 2, 3)]
    with caplog.at_level(logging.DEBUG):
        assoc = associate(node)
        statuses = [assoc.send_c_store(p.dataset).Status for p in sent]
        assoc.abort()  # mid-study: the modality never says it is done
        queued = wait_for(lambda: node.store.list())
        assert node.pending_studies() == 0
    assert statuses == [SUCCESS] * 3
    assert len(queued) == 1 and queued[0].study_uid == study
    assert "aborted" in caplog.text and "3 instances" in caplog.text
    # The middle instance (InstanceNumber 2) was the one scored: its de-identified copy is stored.
    stored = pydicom.dcmread(node.store.data_dir / queued[0].stored_as)
    assert stored.InstanceNumber == 2 and stored.PatientIdentityRemoved == "YES"
    # Nothing identifying anywhere medsight keeps things, the spool already emptied.
    assert not any(p.is_file() for p in node.spool.rglob("*"))
    node.store.engine.dispose()
    places = {str(p): p.read_bytes() for p in node.store.data_dir.rglob("*") if p.is_file()}
    places["log"] = caplog.text.encode()
    secrets = {}
    for planted in sent:
        secrets.update(planted.secrets)
    # The source StudyInstanceUID is kept, by design, to route the result back.
    secrets = {name: value for name, value in secrets.items() if value != study.encode()}
    leaks = {
        (where, name) for where, text in places.items() for name, s in secrets.items() if s in text
    }
    assert leaks == set()


def test_a_non_image_instance_is_ignored_and_the_node_keeps_serving(node, caplog):
    from highdicom.sr import (
        CodedConcept,
        ComprehensiveSR,
        ContainerContentItem,
        ContentSequence,
        TextContentItem,
    )

    evidence = instance(generate_uid(), generate_uid(), 1).dataset
    evidence.PatientSex = "O"
    root = ContainerContentItem(CodedConcept("18748-4", "LN", "Diagnostic imaging report"))
    comment = CodedConcept("121106", "DCM", "Comment")
    root.ContentSequence = ContentSequence([TextContentItem(comment, "a report", "CONTAINS")])
    report = ComprehensiveSR(
        evidence=[evidence],
        content=root,
        series_instance_uid=generate_uid(),
        series_number=1,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="elsewhere",
    )
    with caplog.at_level(logging.INFO, logger="medsight.pacs"):
        assoc = associate(node)
        status = assoc.send_c_store(report).Status
        assoc.release()
        node.flush(force=True)  # had it been kept, it would be scored now
    assert status == SUCCESS
    assert "Comprehensive SR Storage instance ignored (not an image" in caplog.text
    assert node.counts["ignored"] == 1 and node.store.list() == []
    assert echo_ok(node)


def test_undecodable_transfer_syntax_and_pixel_data_are_reported_and_the_node_lives(node, caplog):
    from pynetdicom.sop_class import Verification

    mpeg4 = "1.2.840.10008.1.2.4.102"
    broken = instance(generate_uid(), generate_uid(), 1).dataset
    broken.PixelData = broken.PixelData[:100]  # 16x16x2 bytes expected: truncated
    with caplog.at_level(logging.INFO, logger="medsight.pacs"):
        video = associate(node, contexts=[(Verification,), (CTImageStorage, [mpeg4])])
        assert video.is_established and not video.accepted_contexts[1:]
        video.release()
        assoc = associate(node)
        status = assoc.send_c_store(broken).Status
        assoc.release()
    assert "CT Image Storage in MPEG-4 AVC/H.264 High Profile / Level 4.1 refused" in caplog.text
    assert status == CANNOT_UNDERSTAND
    assert "pixel data cannot be decoded" in caplog.text
    assert node.counts["refused"] == 1
    assert echo_ok(node)
    # ... and it still takes a good study.
    good = instance(generate_uid(), generate_uid(), 1).dataset
    assoc = associate(node)
    assert assoc.send_c_store(good).Status == SUCCESS
    assoc.release()
    assert wait_for(lambda: node.store.list())[0].study_uid == good.StudyInstanceUID


def test_a_restarted_node_scores_the_studies_left_in_its_spool(model, tmp_path):
    store = WorklistStore(f"sqlite:///{tmp_path / 'worklist.db'}", tmp_path / "data")
    left = instance(generate_uid(), generate_uid(), 1)
    folder = tmp_path / "spool" / "some-study" / "some-series"
    folder.mkdir(parents=True)
    (folder / "one.dcm").write_bytes(left.to_bytes())
    node = DicomNode(
        model, store, port=0, host="127.0.0.1", series_timeout=1, spool=tmp_path / "spool"
    )
    node.start()
    try:
        queued = wait_for(lambda: store.list())
    finally:
        node.stop()
        store.engine.dispose()
    assert [s.study_uid for s in queued] == [left.dataset.StudyInstanceUID]
    assert list((tmp_path / "spool").iterdir()) == []


def _header(**tags) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (
            {"RequestedProcedurePriority": "STAT", "PatientAge": "045Y"},
            {"priority": "stat", "age_years": 45.0},
        ),
        (
            {"RequestedProcedurePriority": "HIGH", "PatientAge": "006M"},
            {"priority": "urgent", "age_years": 0.5},
        ),
        ({"PatientAge": "014D"}, {"age_years": 0.04}),
        ({"PatientBirthDate": "19800615", "StudyDate": "20250614"}, {"age_years": 44.99}),
        ({}, {}),
    ],
)
def test_context_from_dicom_reads_priority_and_age(tags, expected):
    assert context_from_dicom(_header(**tags)) == expected


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")
def test_context_from_dicom_drops_impossible_values_naming_the_tag(caplog):
    ds = _header(RequestedProcedurePriority="WHENEVER", PatientAge="150Y")
    with caplog.at_level(logging.WARNING, logger="medsight.pacs"):
        assert context_from_dicom(ds) == {}
    assert "RequestedProcedurePriority (0040,1003)" in caplog.text
    assert "PatientAge (0010,1010)" in caplog.text
    with caplog.at_level(logging.WARNING, logger="medsight.pacs"):
        assert context_from_dicom(_header(PatientAge="45 years")) == {}
    assert "PatientAge '45 YEARS' is not a DICOM age" in caplog.text


def test_a_study_arriving_over_a_restart_keeps_its_pixels(node):
    """Known pixel content in, the same pixels stored (de-identified) out."""
    pixels = (np.arange(256, dtype=np.int16).reshape(16, 16) * 3) + 500
    planted = instance(generate_uid(), generate_uid(), 1)
    planted.dataset.PixelData = pixels.tobytes()
    assoc = associate(node)
    assert assoc.send_c_store(planted.dataset).Status == SUCCESS
    assoc.release()
    study = wait_for(lambda: node.store.list())[0]
    stored = pydicom.dcmread(io.BytesIO((node.store.data_dir / study.stored_as).read_bytes()))
    assert np.array_equal(stored.pixel_array, pixels)


def test_a_study_sent_twice_is_queued_once(node, caplog):
    study, series = generate_uid(), generate_uid()
    sent = [instance(study, series, n) for n in (1, 2)]
    for _ in range(2):
        assoc = associate(node)
        assert [assoc.send_c_store(p.dataset).Status for p in sent] == [SUCCESS] * 2
        assoc.release()
        with caplog.at_level(logging.INFO, logger="medsight.pacs"):
            node.flush(force=True)
    assert [s.study_uid for s in node.store.list()] == [study]
    assert "is already worklist study 1; not scored again" in caplog.text
    assert node.counts["scored"] == 1 and node.counts["repeated"] == 1


def test_real_dicom_files_a_series_is_one_study_and_a_truncated_file_is_refused(node, shared_data):
    """pydicom's sample files (../shared/data/dicom-nifti): the 7-slice MR series becomes one
    worklist study scored from its middle slice; single files of other studies (CT, RLE MR, an
    RGB ultrasound) each one study; a file whose pixel data are cut short is refused alone."""
    from pynetdicom import AE

    folder = shared_data / "dicom-nifti" / "dicom"
    series = sorted((folder / "series_MR700").glob("*.dcm"))
    singles = ["CT_small.dcm", "MR_small_RLE.dcm", "examples_rgb_color.dcm"]
    datasets = [pydicom.dcmread(p) for p in series] + [pydicom.dcmread(folder / n) for n in singles]
    truncated = pydicom.dcmread(folder / "MR_truncated.dcm")
    ae = AE(SCU_AET)
    wanted = {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in [*datasets, truncated]}
    for sop_class, syntax in sorted(wanted):
        ae.add_requested_context(sop_class, syntax)  # as each file is encoded
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MEDSIGHT")
    assert assoc.is_established
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    refused = assoc.send_c_store(truncated).Status
    assoc.release()
    assert statuses == [SUCCESS] * len(datasets)
    assert refused != SUCCESS
    studies = {ds.StudyInstanceUID for ds in datasets}
    queued = wait_for(lambda: len(node.store.list()) == len(studies) and node.store.list())
    by_uid = {s.study_uid: s for s in queued}
    mr = by_uid[datasets[0].StudyInstanceUID]
    stored = pydicom.dcmread(node.store.data_dir / mr.stored_as)
    assert stored.InstanceNumber == 4 and stored.PatientIdentityRemoved == "YES"
    assert echo_ok(node)
