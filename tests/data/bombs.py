"""Decompression bombs built in memory from a stream of zeros (nothing large is allocated).

Shared by the decoding tests and the memory measurements: each builder returns the file's bytes.
"""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib

import numpy as np

MiB = 1024 * 1024


def _zeros_deflated(n: int, compressor) -> bytes:
    block = bytes(MiB)
    parts = []
    for start in range(0, n, MiB):
        parts.append(compressor.compress(block[: min(MiB, n - start)]))
    return b"".join(parts)


def deflated_dicom(
    pixel_bytes: int,
    *,
    rows: int,
    cols: int,
    samples: int = 1,
    bits: int = 8,
    declared_length: int | None = None,
) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM whose pixel data are ``pixel_bytes`` zeros.

    The header says ``rows`` x ``cols`` x ``samples`` at ``bits``; the pixel element declares
    ``declared_length`` (default: the true length), so header and data can be made to disagree.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    length = pixel_bytes if declared_length is None else declared_length
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, length)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = compressor.compress(body.getvalue() + element)
    stream += _zeros_deflated(pixel_bytes, compressor) + compressor.flush()
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + stream


def zip_with_member(size: int, name: str = "normal/bomb.dcm") -> bytes:
    """A zip holding one deflated member of ``size`` zeros."""
    buffer = io.BytesIO()
    block = bytes(MiB)
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open(name, "w", force_zip64=True) as member,
    ):
        for start in range(0, size, MiB):
            member.write(block[: min(MiB, size - start)])
    return buffer.getvalue()


def nifti_gz(shape: tuple[int, ...], dtype=np.uint8) -> bytes:
    """A gzip NIfTI-1 volume of zeros with the given shape, built without allocating it."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), code=1)
    header.set_qform(np.eye(4), code=1)
    head = io.BytesIO()
    header.write_to(head)
    raw = head.getvalue()
    raw += bytes(int(header.get_data_offset()) - len(raw))
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return compressor.compress(raw) + _zeros_deflated(n, compressor) + compressor.flush()


def check_gzip(data: bytes) -> bytes:
    """The first bytes of a gzip stream (a sanity check for the builders)."""
    return gzip.GzipFile(fileobj=io.BytesIO(data)).read(400)


def write_all(folder, size: int = 1024 * MiB) -> dict[str, str]:
    """Write one of each bomb at ``size`` bytes inflated into ``folder`` (for measurements)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    side = int(np.sqrt(size))
    files = {
        # header and pixel element disagree (what the issue measured: 11.4 GB before)
        "dicom_mismatch.dcm": deflated_dicom(size, rows=4096, cols=4096, samples=3),
        # pixel element honest and small, a stream of zeros after it
        "dicom_trailer.dcm": deflated_dicom(size, rows=64, cols=64, declared_length=4096),
        # header, element and data all agree, at the pixel limit: stopped by the ratio
        "dicom_honest.dcm": deflated_dicom(
            min(side, 7744) ** 2, rows=min(side, 7744), cols=min(side, 7744)
        ),
        # more voxels than allowed, and (below) as many as allowed, all zeros
        "volume.nii.gz": nifti_gz((512, 512, max(1, size // (512 * 512)))),
        "volume_honest.nii.gz": nifti_gz((512, 512, 900)),
    }
    paths = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths[name] = str(folder / name)
    archive = folder / "bomb.zip"
    archive.write_bytes(zip_with_member(size))
    paths["bomb.zip"] = str(archive)
    return paths


if __name__ == "__main__":  # python -m tests.data.bombs OUT_FOLDER
    import sys

    for name, path in write_all(sys.argv[1]).items():
        print(name, path)
