"""De-identification: salted pseudonyms and UIDs, and the DICOM PS3.15 Basic Profile."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from medsight.data.privacy import (
    DeidentificationError,
    deidentify_dicom,
    profile_actions,
    pseudonymise,
    pseudonymous_uid,
)
from tests.data.identifying_dicom import identifying_dicom

SALT = b"unit-test-salt"


def deidentified(planted, salt: bytes = SALT) -> tuple[Dataset, bytes, dict]:
    clean, meta = deidentify_dicom(planted.to_bytes(), salt=salt)
    return pydicom.dcmread(io.BytesIO(clean)), clean, meta


def test_uids_are_remapped_by_a_keyed_hash_into_valid_2_25_uids():
    uid = "1.2.826.0.1.3680043.10.9999.1"
    new = pseudonymous_uid(uid, SALT)
    assert new == pseudonymous_uid(uid, SALT)  # same installation, same UID
    assert new != pseudonymous_uid(uid, b"another-site")
    assert new != pseudonymous_uid(uid + "0", SALT)
    assert new.startswith("2.25.") and UID(new).is_valid and len(new) <= 64
    assert pseudonymous_uid("", SALT) == ""
    # A UID and a patient ID spelled alike do not share a hash.
    assert new.removeprefix("2.25.") not in pseudonymise(uid, SALT)


def test_the_table_is_the_standard_s_table_e1_1():
    single, masked = profile_actions()
    assert len(single) > 600 and len(masked) == 3
    keyword = pydicom.datadict.tag_for_keyword
    # Known answers from PS3.15 Table E.1-1 (compound actions as medsight applies them).
    expected = {
        "PatientName": "Z",
        "PatientID": "D",  # Z/D
        "PatientBirthDate": "Z",
        "StudyDate": "Z",
        "AccessionNumber": "Z",
        "StudyInstanceUID": "U",
        "SeriesInstanceUID": "U",
        "SOPInstanceUID": "U",
        "FrameOfReferenceUID": "U",
        "ProtocolName": "D",  # X/D
        "RequestedProcedureDescription": "Z",  # X/Z
        "PerformedProcedureStepDescription": "X",
        "StudyDescription": "X",
        "InstitutionName": "D",  # X/Z/D
        "PatientAddress": "X",
        "OtherPatientIDsSequence": "X",
        "ReferencedImageSequence": "U*",
    }
    assert {k: single.get(keyword(k)) for k in expected} == expected
    for kept in ("Modality", "BodyPartExamined", "SOPClassUID", "Rows", "PixelData"):
        assert keyword(kept) not in single


def test_every_attribute_of_the_profile_is_removed_emptied_replaced_or_remapped():
    planted = identifying_dicom()
    out, _, _ = deidentified(planted)
    single, masked = profile_actions()

    def action(tag: int) -> str:
        if tag in single:
            return single[tag]
        group, element = tag >> 16, tag & 0xFFFF
        return next(
            a for g, e, gm, em, a in masked if group & gm == g & gm and element & em == e & em
        )

    checked = {"X": 0, "Z": 0, "D": 0, "U": 0, "U*": 0}
    for tag, original in planted.values.items():
        act = action(tag)
        checked[act] += 1
        name = f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {act}"
        if act == "X":
            assert tag not in out, name
            continue
        element = out[tag]
        if act == "U":
            assert element.value == pseudonymous_uid(original, SALT), name
        elif act == "U*":
            (item,) = element.value
            assert item.ReferencedSOPInstanceUID == pseudonymous_uid(planted.nested_uids[tag], SALT)
            assert item.ReferencedSOPClassUID == pydicom.uid.CTImageStorage
        elif act == "Z" or element.VR == "SQ":
            assert element.is_empty, name
        elif tag == 0x00100020:
            assert element.value == pseudonymise(original, SALT)
        else:  # D: a dummy that shares nothing with the original
            assert not element.is_empty, name
            assert str(original) not in str(element.value), name
    assert all(count > 0 for count in checked.values()), checked
    assert sum(checked.values()) > 600


def test_no_planted_value_is_left_anywhere_in_the_file():
    planted = identifying_dicom()
    original = planted.to_bytes()
    assert all(secret in original for secret in planted.secrets.values())
    _, clean, _ = deidentified(planted)
    left = [name for name, secret in planted.secrets.items() if secret in clean]
    assert left == []


def test_the_file_says_how_it_was_deidentified_and_keeps_the_image():
    planted = identifying_dicom(pixel_value=321)
    out, _, meta = deidentified(planted)
    assert out.PatientIdentityRemoved == "YES"
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert "Basic Profile" in out.DeidentificationMethod[0]
    (code,) = out.DeidentificationMethodCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")
    assert not any(element.tag.is_private for element in out.iterall())
    assert out.Modality == "CT" and out.BodyPartExamined == "CHEST"
    assert out.SOPClassUID == pydicom.uid.CTImageStorage
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    np.testing.assert_array_equal(out.pixel_array, np.full((16, 16), 321))
    assert meta == {
        "modality": "CT",
        "body_part": "CHEST",
        "view": None,
        "photometric": "MONOCHROME2",
        "rows": 16,
        "columns": 16,
        "patient": pseudonymise(planted.values[0x00100020], SALT),
    }


def test_instances_of_one_study_keep_one_new_study_and_series_uid():
    first, _, _ = deidentified(identifying_dicom(instance_uid="1.2.3.10"))
    second, _, _ = deidentified(identifying_dicom(instance_uid="1.2.3.11"))
    assert first.StudyInstanceUID == second.StudyInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.StudyInstanceUID != "1.2.826.0.1.3680043.10.9999.1"
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.FrameOfReferenceUID == second.FrameOfReferenceUID
    other_site, _, _ = deidentified(identifying_dicom(instance_uid="1.2.3.10"), salt=b"other")
    assert other_site.StudyInstanceUID != first.StudyInstanceUID


def test_the_profile_reaches_into_nested_sequences():
    planted = identifying_dicom()
    item = Dataset()
    item.PatientName = "Nested^Patient"
    item.PatientBirthDate = "19400101"
    item.StudyInstanceUID = "1.2.826.0.1.3680043.10.9999.1"
    item.ReferringPhysicianName = "Nested^Doctor"
    item.OperatorsName = "Nested^Operator"
    item.PerformingPhysicianName = "Nested^Performer"  # X in the table
    item.add_new(0x00091001, "LO", "nested private")
    planted.dataset.ReferencedSeriesSequence = [item]  # kept by the profile: items cleaned
    out, clean, _ = deidentified(planted)
    (kept,) = out.ReferencedSeriesSequence
    assert kept.PatientName == "" and kept.PatientBirthDate == ""
    assert kept.StudyInstanceUID == out.StudyInstanceUID
    assert "PerformingPhysicianName" not in kept and 0x00091001 not in kept
    assert b"Nested" not in clean and b"19400101" not in clean


def test_a_person_name_outside_the_table_is_emptied_too():
    planted = identifying_dicom()
    planted.dataset.add_new(0x00142006, "PN", "Evaluator^Tech")  # EvaluatorName: not in E.1-1
    assert 0x00142006 not in profile_actions()[0]
    out, clean, _ = deidentified(planted)
    assert out[0x00142006].value == "" and b"Evaluator" not in clean


def test_burned_in_annotation_is_refused():
    planted = identifying_dicom()
    planted.dataset.BurnedInAnnotation = "YES"
    with pytest.raises(DeidentificationError, match="BurnedInAnnotation is 'YES'"):
        deidentify_dicom(planted.to_bytes(), salt=SALT)
    planted.dataset.BurnedInAnnotation = "NO"
    out, _, _ = deidentified(planted)
    assert out.BurnedInAnnotation == "NO"


def test_without_a_patient_id_no_pseudonym_is_made():
    planted = identifying_dicom()
    del planted.dataset.PatientID
    out, _, meta = deidentified(planted)
    assert meta["patient"] is None and "PatientID" not in out
