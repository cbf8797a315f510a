"""A DICOM file with a distinct identifying value in every attribute of DICOM PS3.15 Table E.1-1.

Shared by the de-identification unit tests (tests/data/test_privacy.py) and the upload test
(tests/serving/test_deid_upload.py), which grep everything medsight stored for these values.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import date, timedelta

import numpy as np
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from medsight.data.privacy import profile_actions

#: Repeating-group attributes of the table (curve data, overlay comments, overlay data) as
#: planted here: one concrete tag each, with its VR.
REPEATING = {0x50003000: "OB", 0x60004000: "LT", 0x60003000: "OW"}
NUMBER_VRS = {"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"}
PRIVATE_VALUE = "PrivateSecret77"


@dataclass
class Planted:
    """The dataset, what was planted where, and the byte strings that must never be stored."""

    dataset: Dataset
    values: dict[int, object] = field(default_factory=dict)  # tag -> planted value
    nested_uids: dict[int, str] = field(default_factory=dict)  # U* sequence -> item's UID
    secrets: dict[str, bytes] = field(default_factory=dict)  # description -> bytes to grep

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.dataset.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()


def _uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.10.9999.{1000 + n}"


def _value(vr: str, n: int):
    """A value of ``vr`` unique to attribute number ``n`` (greppable where it is text)."""
    day = date(1931, 1, 1) + timedelta(days=37 * n)
    time = f"{n % 24:02d}{7 * n % 60:02d}{13 * n % 60:02d}.{n:06d}"
    if vr == "PN":
        return f"Secret{n:03d}^Person"
    if vr in {"AE", "CS", "SH", "LO", "LT", "ST", "UT", "UC"}:
        return f"IDV{n:04d}X"
    if vr == "DA":
        return day.strftime("%Y%m%d")
    if vr == "TM":
        return time
    if vr == "DT":
        return day.strftime("%Y%m%d") + time
    if vr == "DS":
        return f"{n}.987654"
    if vr == "IS":
        return str(900_000_000 + n)
    if vr == "AS":
        return f"{n % 1000:03d}Y"
    if vr == "UI":
        return _uid(n)
    if vr == "UR":
        return f"http://secret{n}.example.org/"
    if vr in NUMBER_VRS:
        return 4242 + n
    if vr == "AT":
        return 0x00100010
    return f"SECRETBYTES{n:05d}".encode()  # OB, OW, OF, OD, OL, OV, UN: 16 bytes


def identifying_dicom(
    study_uid: str = "1.2.826.0.1.3680043.10.9999.1",
    series_uid: str = "1.2.826.0.1.3680043.10.9999.2",
    instance_uid: str = "1.2.826.0.1.3680043.10.9999.3",
    pixel_value: int = 700,
) -> Planted:
    """A small CT instance holding an identifying value in every Table E.1-1 attribute.

    The study, series and SOP instance UIDs are the given ones, so two instances of one study
    can be built; every other attribute's value depends only on its place in the table.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    planted = Planted(ds)

    single, masked = profile_actions()
    tags = sorted(single)
    fixed = {0x0020000D: study_uid, 0x0020000E: series_uid, 0x00080018: instance_uid}
    for n, tag in enumerate(tags, start=10):
        group = tag >> 16
        if group in (0x0000, 0x0002):  # command and file meta groups: not dataset attributes
            continue
        try:
            vr = dictionary_VR(tag).split(" ")[0]
        except KeyError:  # newer than pydicom's dictionary: stored with an unknown VR
            vr = "UN"
        if vr == "SQ":
            item = Dataset()
            if single[tag] == "U*":
                item.ReferencedSOPClassUID = CTImageStorage
                item.ReferencedSOPInstanceUID = _uid(n)
                planted.nested_uids[tag] = _uid(n)
            else:
                item.CodeValue = f"SQV{n:04d}"
                item.CodeMeaning = f"Nested secret {n}"
            ds.add_new(tag, "SQ", [item])
            planted.values[tag] = item
            continue
        value = fixed.get(tag, _value(vr, n))
        ds.add_new(tag, vr, value)
        planted.values[tag] = value
    for tag, vr in REPEATING.items():
        value = _value(vr, tag & 0xFFFF)
        ds.add_new(tag, vr, value)
        planted.values[tag] = value
    block = ds.private_block(0x0011, "ACME Secret Creator", create=True)
    block.add_new(0x01, "LO", PRIVATE_VALUE)

    # The image itself: what a scanner would write, none of it in the table.
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    pixels = np.full((16, 16), pixel_value, dtype=np.int16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = pixels.tobytes()

    for tag, value in planted.values.items():
        if isinstance(value, Dataset):
            for element in value:
                if element.VR != "UI" or element.keyword == "ReferencedSOPInstanceUID":
                    planted.secrets[f"{tag:08X}/{element.keyword}"] = str(element.value).encode()
        elif isinstance(value, bytes):
            planted.secrets[f"{tag:08X}"] = value
        elif isinstance(value, str):
            planted.secrets[f"{tag:08X}"] = value.encode()
            if "^" in value:  # a name is searched for by its parts too
                planted.secrets[f"{tag:08X} family name"] = value.split("^")[0].encode()
    planted.secrets["private"] = PRIVATE_VALUE.encode()
    planted.secrets["private creator"] = b"ACME Secret Creator"
    return planted
