"""Decode one image, whatever its container, into float32 pixels with a recorded channel convention.

This is the only module that touches pixel formats. Every decoder returns a :class:`DecodedImage`
whose ``pixels`` are float32, shaped ``(C, H, W)`` with ``C = 1`` (grayscale, ``"L"``) or ``C = 3``
(colour, ``"RGB"``), scaled to ``[0, 1]``; ``meta`` records how the values were obtained (DICOM
rescale and window, MONOCHROME1 inversion, NIfTI slice, ...), so preprocessing can be reproduced.

A *source* is a string: a file path, or one of the addresses built by :func:`zip_source`,
:func:`npz_source` and :func:`nifti_slice_source` for images that are not files of their own.

Resource bounds (decompression bombs): nothing is allocated from a size the file merely claims.
``max_pixels`` bounds the pixels a decode produces — all frames of a multi-frame DICOM, and
:data:`VOLUME_FACTOR` times it for the voxels of a NIfTI volume. A DICOM's pixel data length
must equal rows × columns × samples × frames × bits allocated from its header, checked before
the data are read. Compressed streams (Deflated DICOM, ``.nii.gz``, zip members) are inflated
in steps, never past the size their header declares (at most :func:`max_inflated_bytes`), and
refused as soon as they inflate more than :data:`MAX_RATIO`:1 once past
:data:`RATIO_FREE_BYTES`. Float pixels holding NaN or infinity are refused.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from medsight.errors import DataError, ImageDecodeError

#: Images above this many pixels are refused as a possible decompression bomb (configurable).
DEFAULT_MAX_PIXELS = 60_000_000

#: A NIfTI volume may hold this many times ``max_pixels`` voxels (a 512x512x900 CT by default).
VOLUME_FACTOR = 4

#: Compressed data inflating more than this ratio are refused once past RATIO_FREE_BYTES:
#: medical images compress 2-20:1; only near-constant data (a bomb) compress 100:1 and more.
MAX_RATIO = 100
RATIO_FREE_BYTES = 8 * 1024 * 1024

#: Room for everything in a file that is not pixel data (DICOM header elements, NIfTI extensions).
METADATA_ALLOWANCE = 16 * 1024 * 1024

#: Images smaller than this on either side carry too little to learn from; training refuses them.
MIN_SIDE = 8

_CHUNK = 1024 * 1024

RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
IMAGE_EXTENSIONS = RASTER_EXTENSIONS + DICOM_EXTENSIONS + NIFTI_EXTENSIONS

_ZIP_SCHEME = "zip://"
_NPZ_SCHEME = "npz://"
_NIFTI_SCHEME = "nifti://"


@dataclass(frozen=True)
class DecodedImage:
    """Pixels as float32 ``(C, H, W)`` in ``[0, 1]``; ``meta`` says how they were obtained."""

    pixels: np.ndarray
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> str:
        """``"L"`` for one channel, ``"RGB"`` for three."""
        return "L" if self.pixels.shape[0] == 1 else "RGB"

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])


# --------------------------------------------------------------------------- source addresses


def zip_source(archive: str | Path, member: str) -> str:
    """Address of ``member`` inside the zip file ``archive`` (read in place, never unpacked)."""
    return f"{_ZIP_SCHEME}{Path(archive).resolve()}!{member}"


def npz_source(npz: str | Path, split: str, index: int) -> str:
    """Address of image ``index`` of ``{split}_images`` in a MedMNIST ``.npz`` file."""
    return f"{_NPZ_SCHEME}{Path(npz).resolve()}!{split}/{index}"


def nifti_slice_source(path: str | Path, axis: int, index: int) -> str:
    """Address of slice ``index`` along ``axis`` (0, 1 or 2, in RAS+ orientation) of a volume."""
    return f"{_NIFTI_SCHEME}{Path(path).resolve()}!{axis}:{index}"


def source_file(source: str) -> Path:
    """The file on disk that holds ``source`` (the archive for zip/npz addresses)."""
    for scheme in (_ZIP_SCHEME, _NPZ_SCHEME, _NIFTI_SCHEME):
        if source.startswith(scheme):
            return Path(source[len(scheme) :].rsplit("!", 1)[0])
    return Path(source)


def source_name(source: str) -> str:
    """The file name (or zip member name) of a source, for display and extension checks."""
    if source.startswith(_ZIP_SCHEME):
        return source.rsplit("!", 1)[1]
    return source_file(source).name


def has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    lower = name.lower()
    return any(lower.endswith(ext) for ext in extensions)


# --------------------------------------------------------------------------- entry points


def decode(
    source: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    window: tuple[float, float] | None = None,
    nifti_slice: tuple[int, int | None] | None = None,
) -> DecodedImage:
    """Decode ``source`` (a path or an address from this module) to a :class:`DecodedImage`.

    ``window`` = ``(centre, width)`` overrides a DICOM file's own VOI window (e.g. a lung window
    for CT) and replaces the percentile scaling of NIfTI volumes. ``nifti_slice`` =
    ``(axis, index)`` is the slice taken of a 3-D NIfTI file (``index`` None, or no
    ``nifti_slice``: the middle one along axis 2; ``meta["sliced_from"]`` then holds the
    volume's shape, so a 2-D run can refuse a volume it was not trained on).

    Raises :class:`ImageDecodeError` naming the source and the reason when it cannot be read.

    >>> img = decode("chest.png")            # doctest: +SKIP
    >>> img.pixels.shape, img.channels       # doctest: +SKIP
    ((1, 512, 512), 'L')
    """
    try:
        if source.startswith(_NPZ_SCHEME):
            return _decode_npz(source)
        if source.startswith(_NIFTI_SCHEME):
            path, _, where = source[len(_NIFTI_SCHEME) :].rpartition("!")
            axis, index = (int(part) for part in where.split(":"))
            return _decode_nifti(
                path, source, axis=axis, index=index, window=window, max_pixels=max_pixels
            )
        if source.startswith(_ZIP_SCHEME):
            data = _read_zip_member(source, max_pixels=max_pixels)
            return decode_bytes(data, name=source, max_pixels=max_pixels, window=window)
        path = Path(source)
        if not path.exists():
            raise ImageDecodeError(source, "file not found")
        if path.is_dir():
            raise ImageDecodeError(source, "is a folder, not an image file")
        axis, index = nifti_slice or (2, None)
        if has_extension(path.name, NIFTI_EXTENSIONS):
            return _decode_nifti(
                str(path), source, axis=axis, index=index, window=window, max_pixels=max_pixels
            )
        if has_extension(path.name, DICOM_EXTENSIONS):
            with open(path, "rb") as fh:
                return _decode_dicom(fh, source, max_pixels=max_pixels, window=window)
        with open(path, "rb") as fh:
            head = fh.read(512)
        kind = sniff(head)
        if kind == "dicom":
            with open(path, "rb") as fh:
                return _decode_dicom(fh, source, max_pixels=max_pixels, window=window)
        if kind == "raster":
            with open(path, "rb") as fh:
                return _decode_raster(fh, source, max_pixels=max_pixels)
        if kind in ("nifti", "gzip"):
            return _decode_nifti(
                str(path), source, axis=axis, index=index, window=window, max_pixels=max_pixels
            )
        raise ImageDecodeError(
            source,
            f"unrecognised image format (extension {path.suffix or 'none'!r}); "
            f"supported: {', '.join(IMAGE_EXTENSIONS)}",
        )
    except ImageDecodeError:
        raise
    except MemoryError:
        raise ImageDecodeError(source, "image too large to decode in memory") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure becomes one message
        raise ImageDecodeError(source, _describe(exc)) from exc


def decode_bytes(
    data: bytes,
    *,
    name: str = "upload",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    window: tuple[float, float] | None = None,
    nifti_slice: tuple[int, int | None] | None = None,
) -> DecodedImage:
    """Decode an in-memory file (an upload, a zip member); the format comes from the content.
    ``window`` and ``nifti_slice`` as for :func:`decode`."""
    kind = sniff(data[:512])
    try:
        if kind == "raster":
            return _decode_raster(io.BytesIO(data), name, max_pixels=max_pixels)
        if kind == "dicom":
            return _decode_dicom(io.BytesIO(data), name, max_pixels=max_pixels, window=window)
        if kind in ("gzip", "nifti"):
            image = _nifti_from_stream(io.BytesIO(data).read, name, max_pixels=max_pixels)
            axis, index = nifti_slice or (2, None)
            return _nifti_to_image(image, name, axis=axis, index=index, window=window)
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageDecodeError(name, _describe(exc)) from exc
    raise ImageDecodeError(name, "content is not a PNG, JPEG, BMP, TIFF, DICOM or NIfTI image")


def sniff(head: bytes) -> str | None:
    """Guess the container from the first bytes: ``raster``, ``dicom``, ``nifti``, ``gzip``."""
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")):
        return "raster"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"n+2\x00"):
        return "nifti"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    return None


# --------------------------------------------------------------------------- raster


def _decode_raster(fh, source: str, *, max_pixels: int) -> DecodedImage:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fh)
            _check_pixels(source, image.width, image.height, max_pixels)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError(
            source, "image is larger than the decoder's safety limit (possible decompression bomb)"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(source, "not a readable PNG/JPEG/BMP/TIFF image") from None
    except OSError as exc:
        raise ImageDecodeError(source, f"corrupt or truncated image ({exc})") from None

    meta: dict[str, Any] = {"format": (image.format or "raster").lower(), "mode": image.mode}
    if getattr(image, "n_frames", 1) > 1:
        meta["frames"] = image.n_frames  # the first frame is used
    mode = image.mode
    if mode in ("1", "L", "LA") or (mode in ("P", "PA") and _palette_is_gray(image)):
        array = np.asarray(image.convert("L"), dtype=np.float32)[None] / 255.0
        meta["scaling"] = "/255"
    elif mode.startswith("I;16") or mode in ("I", "F"):
        raw = np.asarray(image).astype(np.float32)
        _require_finite(source, raw)
        array = _minmax(raw)[None]
        meta["scaling"] = "minmax"
        meta["dtype"] = str(np.asarray(image).dtype)
    else:
        rgb = np.asarray(image.convert("RGB"))
        image.close()  # the decoded original is not needed beside its RGB copy
        # Channel by channel into one float array, scaled in place: at most one float copy of
        # the image exists (a 60 M-pixel RGB image: 0.7 GB, where whole-array arithmetic
        # made three).
        array = np.empty((3, *rgb.shape[:2]), dtype=np.float32)
        for channel in range(3):
            array[channel] = rgb[..., channel]
        del rgb
        array *= np.float32(1 / 255.0)
        meta["scaling"] = "/255"
    return DecodedImage(np.ascontiguousarray(array, dtype=np.float32), source, meta)


def _palette_is_gray(image) -> bool:
    rgb = np.asarray(image.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


# --------------------------------------------------------------------------- DICOM


def window_linear(
    values: np.ndarray, centre: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """Apply a DICOM VOI window (PS3.3 C.11.2.1.2) and return values in ``[0, 1]``.

    ``function`` is the VOI LUT Function: ``LINEAR`` (the default), ``LINEAR_EXACT`` or
    ``SIGMOID``.

    >>> window_linear(np.array([-1000.0, 40.0, 1000.0]), centre=40, width=400).round(3)
    array([0.   , 0.501, 1.   ])
    """
    values = values.astype(np.float64, copy=False)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for LINEAR_EXACT, got {width}")
        out = (values - centre) / width + 0.5
    else:
        if width < 1:
            raise ValueError(f"window width must be >= 1 for LINEAR, got {width}")
        if width == 1:
            return (values > centre - 0.5).astype(np.float32)
        out = (values - (centre - 0.5)) / (width - 1) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _decode_dicom(fh, source: str, *, max_pixels: int, window) -> DecodedImage:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

    ds = _read_dicom(fh, source, max_pixels)
    tag = _pixel_tag(ds)
    if tag is None:
        raise ImageDecodeError(
            source, "DICOM object has no pixel data (a report or structured document?)"
        )
    element = ds.get_item(tag, keep_deferred=True)  # its length, without reading the data
    length = getattr(element, "length", None)
    if length is None:
        length = len(element.value or b"")
    _check_dicom_pixel_bytes(ds, source, max_pixels, tag, length)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    meta: dict[str, Any] = {
        "format": "dicom",
        "modality": str(ds.get("Modality", "")),
        "photometric": photometric,
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")) if ds.file_meta else "",
    }
    try:
        arr = pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for bad pixel data
        syntax = getattr(ds.file_meta.get("TransferSyntaxUID", None), "name", "unknown")
        raise ImageDecodeError(
            source,
            f"DICOM pixel data ({syntax}) cannot be decoded: {_describe(exc)}",
        ) from None
    if frames > 1:
        meta["frames"] = frames  # multi-frame: the first frame is used
    if arr.dtype.kind == "f":
        _require_finite(source, arr)

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        bits = 16 if rgb.dtype.itemsize > 1 else 8
        pixels = rgb.astype(np.float32).transpose(2, 0, 1) / float(2**bits - 1)
        meta["scaling"] = "palette"
    elif arr.ndim == 3:  # colour: pydicom already converted YBR to RGB
        bits = int(ds.get("BitsStored", 8))
        pixels = arr.astype(np.float32).transpose(2, 0, 1) / float(2**bits - 1)
        meta["scaling"] = f"/{2**bits - 1}"
    else:
        values = apply_modality_lut(arr, ds).astype(np.float64)
        _require_finite(source, values)  # a NaN rescale slope poisons every pixel
        if window is not None:
            centre, width = window
            pixels = window_linear(values, centre, width)
            meta["window"] = [float(centre), float(width)]
        elif "VOILUTSequence" in ds:
            lut_out = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float64)
            descriptor = ds.VOILUTSequence[0].LUTDescriptor
            pixels = np.clip(lut_out / float(2 ** int(descriptor[2]) - 1), 0.0, 1.0)
            meta["window"] = "voi_lut"
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            centre = float(_first(ds.WindowCenter))
            width = float(_first(ds.WindowWidth))
            function = str(ds.get("VOILUTFunction", "LINEAR"))
            pixels = window_linear(values, centre, width, function)
            meta["window"] = [centre, width]
        else:
            pixels = _minmax(values)
            meta["window"] = "minmax"
        if photometric == "MONOCHROME1":  # low values are white: invert so bright means dense
            pixels = 1.0 - pixels
            meta["inverted"] = True
        pixels = pixels[None]
    return DecodedImage(np.ascontiguousarray(pixels, dtype=np.float32), source, meta)


_PIXEL_TAGS = {0x7FE00010: 0, 0x7FE00008: 32, 0x7FE00009: 64}  # PixelData, Float, DoubleFloat
_UNDEFINED_LENGTH = 0xFFFFFFFF
#: Elements after the pixel data (trailing padding, signatures) a Deflated file may carry.
_TRAILER_ALLOWANCE = 1024 * 1024
#: Elements above this size are left on disk until needed, so a length check comes first.
_DEFER_SIZE = 1024 * 1024
#: Bytes of padding tolerated after native pixel data (seen in real files).
_PADDING_ALLOWANCE = 64 * 1024


def _pixel_tag(ds) -> int | None:
    return next((tag for tag in _PIXEL_TAGS if tag in ds), None)


def _read_dicom(fh, source: str, max_pixels: int, *, header_only: bool = False):
    """The dataset, with large values (pixel data) not yet read; Deflated files inflated with a
    cap derived from their header, never by pydicom in one unbounded piece. ``header_only``
    stops before the pixel data."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    start = fh.tell()
    try:
        preamble = read_preamble(fh, False)
    except InvalidDicomError:
        raise ImageDecodeError(source, "not a DICOM file (no DICM preamble)") from None
    file_meta = _read_file_meta_info(fh)
    if file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return _read_deflated_dicom(fh, source, max_pixels, preamble, file_meta, header_only)
    fh.seek(start)
    if header_only:
        return pydicom.dcmread(fh, stop_before_pixels=True)
    return pydicom.dcmread(fh, defer_size=_DEFER_SIZE)


def _read_deflated_dicom(
    fh, source: str, max_pixels: int, preamble, file_meta, header_only: bool = False
):
    """Inflate the header first, check its pixel data size, then inflate only that much more."""
    from pydicom.dataset import FileDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    inflater = _Inflater(fh.read, source, gzip=False)
    want = 64 * 1024
    while True:
        head = bytes(inflater.fill(want))
        stream = DicomBytesIO(head)
        found: dict[str, int] = {}

        def at_pixels(tag, vr, length, stream=stream, found=found) -> bool:
            if int(tag) in _PIXEL_TAGS:
                found.update(tag=int(tag), length=int(length), value_at=stream.tell())
                return True
            return False

        try:
            header = read_dataset(stream, False, True, stop_when=at_pixels)
        except EOFError:
            header = None  # cut mid-element: inflate more
        if found or inflater.done:
            break
        if want >= METADATA_ALLOWANCE:
            raise ImageDecodeError(
                source,
                f"Deflated DICOM header inflates past {METADATA_ALLOWANCE:,} bytes without "
                "reaching pixel data (corrupt, or a decompression bomb)",
            )
        want *= 4
    if header_only and header is not None:
        dataset = header
    elif found and header is not None:
        _check_dicom_pixel_bytes(header, source, max_pixels, found["tag"], found["length"])
        cap = found["value_at"] + found["length"] + _TRAILER_ALLOWANCE
        body = inflater.fill(cap + 1)
        if len(body) > cap:
            raise ImageDecodeError(
                source,
                f"Deflated DICOM data inflate past the {cap:,} bytes its header declares "
                "(a possible decompression bomb)",
            )
        dataset = read_dataset(DicomBytesIO(bytes(body)), False, True)
    else:
        dataset = read_dataset(DicomBytesIO(head), False, True)
    ds = FileDataset(source, dataset, preamble, file_meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


def _check_dicom_pixel_bytes(ds, source: str, max_pixels: int, tag: int, length: int) -> None:
    """Refuse pixel data that the header's size does not account for, before reading it.

    Native data must hold rows x columns x samples x frames x bits allocated (plus padding
    shorter than a frame and than :data:`_PADDING_ALLOWANCE`);
    encapsulated (compressed) data are sized by their decoder from the header, so the pixel
    count of all frames is what is bounded.
    """
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise ImageDecodeError(
            source,
            f"DICOM header gives {cols}x{rows} pixels and {frames} frame(s); all must be positive",
        )
    _check_pixels(source, cols, rows, max_pixels, frames=frames)
    if length == _UNDEFINED_LENGTH:
        return
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "YBR_FULL_422":
        samples = 2  # chroma subsampled: two values per pixel on average
    bits = _PIXEL_TAGS[tag] or int(ds.get("BitsAllocated", 0) or 0)
    if bits not in (1, 8, 16, 32, 64):
        raise ImageDecodeError(source, f"DICOM BitsAllocated is {bits}; 1, 8, 16, 32 or 64 allowed")
    expected = -(-rows * cols * samples * frames * bits // 8)
    # Some writers pad the pixel data past its size; less than a frame is ignored (pydicom would
    # read whole extra frames as more frames, or a 2-frame image as colour).
    padding = min(_PADDING_ALLOWANCE, expected // frames - 1)
    if not expected <= length <= expected + padding:
        raise ImageDecodeError(
            source,
            f"DICOM pixel data hold {length:,} bytes but the header's {cols}x{rows} pixels x "
            f"{samples} sample(s) x {frames} frame(s) x {bits} bits need {expected:,} "
            "(corrupt, or a decompression bomb)",
        )


def dicom_header(path: str | Path | bytes, *, name: str | None = None) -> Any:
    """Read a DICOM header without pixel data (fast, and bounded for Deflated files) from a path
    or from bytes; raises ImageDecodeError when unreadable."""
    source = name or ("upload" if isinstance(path, bytes) else str(path))
    try:
        if isinstance(path, bytes):
            return _read_dicom(io.BytesIO(path), source, DEFAULT_MAX_PIXELS, header_only=True)
        with open(path, "rb") as fh:
            return _read_dicom(fh, source, DEFAULT_MAX_PIXELS, header_only=True)
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageDecodeError(source, f"DICOM header unreadable ({_describe(exc)})") from None


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` has a DICOM extension or the DICM magic at byte 128."""
    if has_extension(path.name, DICOM_EXTENSIONS):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return sniff(head) == "dicom"


def _first(value):
    try:
        return value[0]
    except (TypeError, IndexError):
        return value


# --------------------------------------------------------------------------- NIfTI


def nifti_shape(path: str | Path) -> tuple[int, ...]:
    """Shape of a NIfTI volume in RAS+ orientation, read from the header only."""
    import nibabel as nib

    image = nib.load(str(path))
    shape = [int(s) for s in image.shape]
    if len(shape) >= 3:
        # Reorienting permutes the first three axes; computed so no voxel is read.
        ornt = nib.orientations.io_orientation(image.affine)
        spatial = [0, 0, 0]
        for axis, (target, _) in enumerate(ornt[:3]):
            spatial[int(target)] = shape[axis]
        shape[:3] = spatial
    return tuple(shape)


def load_nifti(path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, source: str | None = None):
    """The nibabel image of a NIfTI file, its voxel count checked against ``max_pixels`` ×
    :data:`VOLUME_FACTOR` and a ``.nii.gz`` inflated with the same caps as :func:`decode`.
    Errors name ``source`` (default: ``path``)."""
    import nibabel as nib

    source = path if source is None else source
    try:
        with open(path, "rb") as fh:
            if fh.read(2) == b"\x1f\x8b":  # inflated here, with caps, not by nibabel unbounded
                fh.seek(0)
                return _nifti_from_stream(fh.read, source, max_pixels=max_pixels)
        image = nib.load(path)
        _check_volume(source, image.header, max_pixels)
        return image
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(source, "file not found") from None
    except Exception as exc:  # noqa: BLE001
        raise ImageDecodeError(source, f"not a readable NIfTI file ({_describe(exc)})") from None


def _decode_nifti(
    path: str,
    source: str,
    *,
    axis: int = 2,
    index: int | None = None,
    window=None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
):
    image = load_nifti(path, max_pixels=max_pixels, source=source)
    return _nifti_to_image(image, source, axis=axis, index=index, window=window)


def _nifti_from_stream(read, source: str, *, max_pixels: int):
    """A NIfTI image from raw or gzip bytes, inflating no more than its header declares."""
    import nibabel as nib

    first = read(2)
    compressed = first == b"\x1f\x8b"
    if compressed:
        inflater = _Inflater(_prepend(first, read), source, gzip=True)
        fill = inflater.fill
    else:
        buffer = bytearray(first)

        def fill(limit: int) -> bytearray:
            while len(buffer) < limit:
                chunk = read(min(_CHUNK, limit - len(buffer)))
                if not chunk:
                    break
                buffer.extend(chunk)
            return buffer

    head = bytes(fill(540))
    if sniff(head) != "nifti":
        what = "gzip data hold" if compressed else "data are"
        raise ImageDecodeError(source, f"{what} no NIfTI image (only .nii.gz is read compressed)")
    two = head[344:348] == b"n+2\x00"
    header_class, image_class = (
        (nib.Nifti2Header, nib.Nifti2Image) if two else (nib.Nifti1Header, nib.Nifti1Image)
    )
    header = header_class.from_fileobj(io.BytesIO(head))
    data_bytes = _check_volume(source, header, max_pixels)
    offset = int(header.get_data_offset())
    if offset > METADATA_ALLOWANCE:
        raise ImageDecodeError(
            source, f"NIfTI voxel offset {offset:,} is above {METADATA_ALLOWANCE:,} bytes"
        )
    data = bytes(fill(offset + data_bytes))  # anything after the voxels is never inflated
    return image_class.from_bytes(data)


def _check_volume(source: str, header, max_pixels: int) -> int:
    """Refuse a NIfTI volume whose header declares too many voxels; return its data bytes."""
    shape = [int(s) for s in header.get_data_shape()]
    voxels = int(np.prod(shape, dtype=np.int64)) if shape else 0
    limit = max_pixels * VOLUME_FACTOR
    if voxels > limit:
        dims = "x".join(map(str, shape))
        raise ImageDecodeError(
            source,
            f"NIfTI volume of {dims} = {voxels:,} voxels is above the limit of {limit:,} "
            f"({VOLUME_FACTOR} x max_pixels; a possible decompression bomb); raise max_pixels "
            "(--max-pixels) if it is genuine",
        )
    return voxels * header.get_data_dtype().itemsize


def _nifti_to_image(image, source: str, *, axis: int = 2, index: int | None = None, window=None):
    import nibabel as nib

    image = nib.as_closest_canonical(image)
    data = np.asanyarray(image.dataobj)
    meta: dict[str, Any] = {"format": "nifti", "shape": [int(s) for s in data.shape]}
    if data.ndim == 4:  # a time series: the first volume is used
        data = data[..., 0]
        meta["volumes"] = int(meta["shape"][3])
    data = np.squeeze(data) if data.ndim == 3 and 1 in data.shape else data
    if data.ndim == 3:
        if axis not in (0, 1, 2):
            raise ImageDecodeError(source, f"slice axis must be 0, 1 or 2, got {axis}")
        n = data.shape[axis]
        if index is None:
            index = n // 2
            meta["sliced_from"] = [int(v) for v in data.shape]
        if not 0 <= index < n:
            raise ImageDecodeError(source, f"slice {index} is outside 0..{n - 1} along axis {axis}")
        data = np.take(data, index, axis=axis)
        meta["slice"] = [axis, int(index)]
    elif data.ndim != 2:
        raise ImageDecodeError(
            source, f"NIfTI data of shape {meta['shape']} is not 2-D, 3-D or 4-D"
        )
    # Voxel axes are (x, y) in RAS+: transpose and flip so rows run top to bottom as displayed.
    plane = np.flipud(data.T).astype(np.float64)
    _require_finite(source, plane)
    if window is not None:
        pixels = window_linear(plane, *window)
        meta["window"] = [float(window[0]), float(window[1])]
    else:
        lo, hi = np.percentile(plane, [0.5, 99.5])
        pixels = np.clip((plane - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(plane)
        meta["scaling"] = "percentile_0.5_99.5"
    return DecodedImage(np.ascontiguousarray(pixels[None], dtype=np.float32), source, meta)


# --------------------------------------------------------------------------- zip and npz


_zip_lock = threading.Lock()
_zip_handles: dict[tuple[str, int], zipfile.ZipFile] = {}


def open_zip(archive: str | Path) -> zipfile.ZipFile:
    """A cached ZipFile per (archive, process): handles must not cross DataLoader worker forks."""
    key = (str(archive), os.getpid())
    with _zip_lock:
        handle = _zip_handles.get(key)
        if handle is None:
            try:
                handle = zipfile.ZipFile(archive)
            except FileNotFoundError:
                raise DataError(f"{archive}: zip file not found") from None
            except zipfile.BadZipFile:
                raise DataError(f"{archive}: not a valid zip file (truncated download?)") from None
            _zip_handles[key] = handle
        return handle


def read_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, *, max_pixels: int
) -> bytes:
    """One member of an open zip (an upload), with :func:`_read_zip_member`'s bomb checks."""
    source = f"{name}!{info.filename}"
    cap = max_inflated_bytes(max_pixels)
    try:
        _check_inflation(source, info.file_size, info.compress_size, cap)
        with archive.open(info) as fh:
            data = fh.read(cap + 1)
    except (zipfile.BadZipFile, OSError, zlib.error) as exc:
        raise ImageDecodeError(source, f"corrupt zip member ({exc})") from None
    _check_inflation(source, len(data), info.compress_size, cap)
    return data


def _read_zip_member(source: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """A member's bytes, refused before reading when its declared size or compression ratio is
    a bomb's; what is read never exceeds :func:`max_inflated_bytes`."""
    archive, _, member = source[len(_ZIP_SCHEME) :].rpartition("!")
    handle = open_zip(archive)
    cap = max_inflated_bytes(max_pixels)
    with _zip_lock:  # ZipFile reads share one file position
        try:
            info = handle.getinfo(member)
            _check_inflation(source, info.file_size, info.compress_size, cap)
            with handle.open(info) as fh:
                data = fh.read(cap + 1)
        except KeyError:
            raise ImageDecodeError(source, f"no member {member!r} in {archive}") from None
        except (zipfile.BadZipFile, OSError, zlib.error) as exc:
            raise ImageDecodeError(source, f"corrupt zip member ({exc})") from None
    _check_inflation(source, len(data), info.compress_size, cap)
    return data


@lru_cache(maxsize=4)
def _npz_arrays(path: str, mtime: float) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files if key.endswith("_images")}


def npz_images(path: str | Path, split: str) -> np.ndarray:
    """The ``{split}_images`` array of a MedMNIST ``.npz`` file (cached per process)."""
    path = str(Path(path).resolve())
    arrays = _npz_arrays(path, os.path.getmtime(path))
    key = f"{split}_images"
    if key not in arrays:
        raise DataError(f"{path}: no array {key!r} (found {', '.join(sorted(arrays)) or 'none'})")
    return arrays[key]


def _decode_npz(source: str) -> DecodedImage:
    path, _, where = source[len(_NPZ_SCHEME) :].rpartition("!")
    split, _, index = where.partition("/")
    if not Path(path).exists():
        raise ImageDecodeError(source, "npz file not found")
    images = npz_images(path, split)
    raw = images[int(index)]
    if raw.ndim == 2:
        array = raw[None]
    elif raw.ndim == 3 and raw.shape[-1] in (1, 3):
        array = raw.transpose(2, 0, 1)
    elif raw.ndim == 3:
        raise ImageDecodeError(
            source,
            f"is a 3-D volume ({'x'.join(map(str, raw.shape))}), but this run takes 2-D images; "
            "use a 3-D run (medsight train reads MedMNIST3D as volumes)",
        )
    else:
        raise ImageDecodeError(source, f"unexpected image shape {raw.shape} in npz")
    scale = 255.0 if raw.dtype == np.uint8 else None
    _require_finite(source, raw)
    pixels = array.astype(np.float32) / scale if scale else _minmax(array.astype(np.float32))
    meta = {"format": "npz", "scaling": "/255" if scale else "minmax"}
    return DecodedImage(np.ascontiguousarray(pixels, dtype=np.float32), source, meta)


# --------------------------------------------------------------------------- helpers


def max_inflated_bytes(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The most bytes one compressed file (a zip member) may inflate to: ``max_pixels`` pixels at
    8 bytes (double-float DICOM, the widest sample) plus :data:`METADATA_ALLOWANCE`."""
    return max_pixels * 8 + METADATA_ALLOWANCE


def _check_pixels(source: str, width: int, height: int, max_pixels: int, frames: int = 1) -> None:
    total = width * height * frames
    if total > max_pixels:
        what = f"{width}x{height}" + (f" x {frames} frames" if frames > 1 else "")
        raise ImageDecodeError(
            source,
            f"{what} = {total:,} pixels is above the limit of {max_pixels:,} "
            "(a possible decompression bomb); raise max_pixels (--max-pixels) if it is genuine",
        )


def _check_inflation(source: str, inflated: int, compressed: int, cap: int) -> None:
    if inflated > RATIO_FREE_BYTES and inflated > MAX_RATIO * max(compressed, 1):
        raise ImageDecodeError(
            source,
            f"{compressed:,} compressed bytes inflate to {inflated:,} or more, a ratio above "
            f"the limit of {MAX_RATIO}:1 for data over {RATIO_FREE_BYTES:,} bytes "
            "(a possible decompression bomb)",
        )
    if inflated > cap:
        raise ImageDecodeError(
            source,
            f"inflates to more than {cap:,} bytes, the limit for max_pixels "
            "(a possible decompression bomb); raise max_pixels (--max-pixels) if it is genuine",
        )


class _Inflater:
    """A raw-deflate or gzip stream inflated in steps up to a requested size, with the ratio of
    inflated to consumed bytes checked as it goes, so a bomb stops a few MiB in."""

    def __init__(self, read, source: str, *, gzip: bool):
        self._read = read
        self._source = source
        self._wbits = 16 + zlib.MAX_WBITS if gzip else -zlib.MAX_WBITS
        self._gzip = gzip
        self._inflate = zlib.decompressobj(self._wbits)
        self._pending = b""
        self._consumed = 0
        self.out = bytearray()
        self.done = False  # the compressed stream is used up

    def fill(self, limit: int) -> bytearray:
        """Inflate until ``limit`` bytes are out or the stream ends; return all bytes out."""
        out = self.out
        while len(out) < limit and not self.done:
            if self._inflate.eof:
                # Another gzip member may follow (bgzip, concatenated files); a Deflated DICOM's
                # stream is one, and whatever follows it is ignored.
                rest = self._inflate.unused_data if self._gzip else b""
                if self._gzip and not rest:
                    rest = self._take()
                if not rest.startswith(b"\x1f\x8b"):
                    self.done = True
                    break
                self._inflate = zlib.decompressobj(self._wbits)
                self._pending = rest
            data = self._pending or self._take()
            if not data:
                self.done = True  # truncated: the decoder reports what is missing
                break
            # Output per step is bounded too, so the ratio check runs every few MiB.
            out += self._inflate.decompress(data, min(limit - len(out), 4 * _CHUNK))
            self._pending = self._inflate.unconsumed_tail
            used = self._consumed - len(self._pending) - len(self._inflate.unused_data)
            _check_inflation(self._source, len(out), used, len(out))
        return out

    def _take(self) -> bytes:
        data = self._read(_CHUNK)
        self._consumed += len(data)
        return data


def _prepend(first: bytes, read):
    """``read`` with ``first`` (already read) given back on the first call."""
    pending = [first]

    def again(n: int = -1) -> bytes:
        if pending:
            return pending.pop()
        return read(n)

    return again


def _require_finite(source: str, values: np.ndarray) -> None:
    """Refuse float pixels holding NaN or infinity (min/max propagate them; no copy made)."""
    if values.dtype.kind != "f" or values.size == 0:
        return
    if not (np.isfinite(values.min()) and np.isfinite(values.max())):
        raise ImageDecodeError(
            source,
            "pixel values include NaN or infinity; medsight needs finite numbers "
            "(fix the image, or leave it out)",
        )


def _minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(values)), float(np.max(values))
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def _describe(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " ".join(lines)
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
