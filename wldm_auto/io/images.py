"""Read and write 3D images with SimpleITK, geometry preserved.

``read_image`` accepts NIfTI, MHA/MHD, NRRD files and folders holding a DICOM
series, and rejects with an :class:`ImageReadError` naming the file anything
that would poison later stages: unreadable, truncated, not 3D, empty, NaN or
inf. SimpleITK zero-fills a truncated NIfTI without a word, so the voxel
payload is checked against what the header promises (``check_complete``).
``write_image`` writes atomically and reads the size of what it wrote back.
"""
from __future__ import annotations

import gzip
import logging
import os
import re
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk

from wldm_auto.io.files import WriteError, atomic_path, write_error

log = logging.getLogger(__name__)

FILE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


class ImageReadError(ValueError):
    """An input image cannot be used; the message names the file and the reason."""


class ImageWriteError(WriteError, RuntimeError):
    """An image could not be written completely (an OSError; a RuntimeError too, as SimpleITK's errors are)."""


def itk_path(path: str | os.PathLike, writing: bool = False) -> str:
    """``path`` as the string SimpleITK takes. An ImageReadError (ImageWriteError when ``writing``) naming it when
    it is not valid UTF-8 (a name with bytes of another encoding, e.g. from an archive made on Windows): SimpleITK
    cannot take such a name and aborts the whole process."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        name = os.fsencode(text).decode("utf-8", "backslashreplace")
        reason = ("the name holds bytes that are not UTF-8 (made on a system with another encoding?), which the "
                  "image library cannot open; rename it")
        if writing:
            raise ImageWriteError(name, reason) from None
        raise ImageReadError(f"{name}: {reason}") from None
    return text


def error_reason(exc: BaseException, limit: int = 200) -> str:
    """One line of at most ``limit`` characters for an error raised inside a library: ITK's ``ERROR:`` detail (its
    messages are several lines of C++ context), else the last line of the message, else the error's type."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    details = [line.split("ERROR:", 1)[-1].strip() for line in lines if "ERROR:" in line]
    return ((details or lines or [type(exc).__name__])[-1])[:limit]


def file_ending(path: str | os.PathLike) -> str | None:
    """The supported ending of ``path`` (``.nii.gz`` counts as one), or None."""
    name = Path(path).name.lower()
    return next((e for e in FILE_ENDINGS if name.endswith(e)), None)


def strip_ending(path: str | os.PathLike) -> str:
    """File name without its supported ending (``a.nii.gz`` -> ``a``)."""
    name = Path(path).name
    ending = file_ending(name)
    return name[: -len(ending)] if ending else name


NOT_DICOM_ENDINGS = (*FILE_ENDINGS, ".log", ".txt", ".json", ".csv", ".png", ".jpg", ".jpeg", ".pdf", ".md",
                     ".html", ".pt", ".npy", ".npz", ".pkl", ".yaml", ".yml", ".zip", ".tar", ".gz")


def _may_hold_dicom(folder: Path, probe: int = 32) -> bool:
    """Cheap pre-check: False for folders whose files are all something else (logs, JSON, images, ...).

    Files with the DICOM magic ``DICM`` at byte 128, or a ``.dcm``/``.ima``
    ending, or no telling ending (old DICOM without preamble) count as maybe.
    """
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return False
    for path in entries[: probe * 4]:
        name = path.name.lower()
        if name.startswith(".") or not path.is_file():
            continue
        if name.endswith((".dcm", ".ima", ".dicom")) or not name.endswith(NOT_DICOM_ENDINGS):
            return True
    return False


def is_dicom_folder(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder holding at least one DICOM series (probed quietly: no ITK warnings)."""
    path = Path(path)
    if not path.is_dir() or not _may_hold_dicom(path):
        return False
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found" for every non-DICOM folder
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)


def dicom_series_files(folder: str | os.PathLike, quiet: bool = False) -> list[str]:
    """The files of the DICOM series with the most files in ``folder``, in the slice order SimpleITK reads
    them (file k is slice k of the volume); ImageReadError if there is none. ``quiet``: do not log the choice."""
    folder = str(folder)
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not series_ids:
        raise ImageReadError(f"{folder}: no DICOM series found")
    files_per_series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid) for sid in series_ids}
    chosen = max(series_ids, key=lambda sid: len(files_per_series[sid]))
    if len(series_ids) > 1 and not quiet:
        log.info("%s: %d DICOM series, reading the largest (%s, %d files)",
                 folder, len(series_ids), chosen, len(files_per_series[chosen]))
    return list(files_per_series[chosen])


SLICE_GAP_TOLERANCE = 0.05  # a slice step this far (relative) from the series' median step is a gap


def read_dicom_series(folder: str | os.PathLike) -> sitk.Image:
    """Read the DICOM series with the most files in ``folder`` (logging which). ImageReadError when its slices
    are not evenly spaced (missing slices): the volume's grid would put every slice after a gap in the wrong
    place."""
    reader = sitk.ImageSeriesReader()
    files = dicom_series_files(folder)
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    check_slice_steps(reader, len(files), folder)
    return image


def check_slice_steps(reader: sitk.ImageSeriesReader, count: int, folder: str | os.PathLike) -> None:
    """ImageReadError naming the largest gap when the slice positions (0020,0032) along the slice normal
    (0020,0037) do not step evenly; nothing when there are fewer than 3 slices or the tags are missing."""
    if count < 3:
        return
    try:
        cosines = [float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")]
        positions = np.array([[float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\")]
                              for k in range(count)])
    except (RuntimeError, ValueError):  # a tag absent or malformed: nothing to check with
        return
    if len(cosines) != 6 or positions.shape[1] != 3:
        return
    normal = np.cross(cosines[:3], cosines[3:])
    steps = np.diff(positions @ normal)
    median = float(np.median(np.abs(steps)))
    if median <= 0:
        return
    worst = int(np.argmax(np.abs(np.abs(steps) - median)))
    if abs(abs(steps[worst]) - median) > max(SLICE_GAP_TOLERANCE * median, 0.01):
        raise ImageReadError(f"{folder}: slices are not evenly spaced: {abs(steps[worst]):.2f} mm between slices "
                             f"{worst + 1} and {worst + 2} of {count} where the others are {median:.2f} mm apart "
                             "(missing slices?); the volume would misplace every slice after the gap")


def read_image(path: str | os.PathLike, pixel_type: int | None = None, check_values: bool = True) -> sitk.Image:
    """Read a 3D image file or DICOM series folder; validate it.

    ``pixel_type`` casts on read (e.g. ``sitk.sitkFloat32``). With
    ``check_values`` the voxels are checked for NaN/inf. A file holding
    fewer voxel bytes than its header promises (truncated copy, full disk)
    is an ImageReadError "truncated or corrupt".
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    itk_path(path)
    try:
        if path.is_dir():
            image = read_dicom_series(path)
        else:
            image = sitk.ReadImage(str(path))
    except ImageReadError:
        raise
    except RuntimeError as exc:
        if path.is_file():
            check_complete(path)  # a truncated file gets that said rather than ITK's reason
        raise ImageReadError(f"{path}: cannot be read as an image ({error_reason(exc)})") from None
    nonfinite = 0
    if path.is_file():
        # ITK's NIfTI reader zero-fills missing voxels and silently turns NaN/inf into 0: one pass checks both
        count = check_values and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64)
        nonfinite = check_complete(path, count_nonfinite=count)
    check_image(image, path, check_values)
    if nonfinite:
        raise ImageReadError(f"{path}: holds {nonfinite} NaN/inf voxels")
    if pixel_type is not None and image.GetPixelID() != pixel_type:
        image = sitk.Cast(image, pixel_type)
    return image


class Payload(NamedTuple):
    """Voxel bytes a file's header promises and those present (``reason``: a decompression error)."""

    expected: int | None
    found: int
    reason: str = ""
    nonfinite: int = 0
    what: str = "voxel data"

    @property
    def complete(self) -> bool:
        return not self.reason and (self.expected is None or self.found >= self.expected)


def check_complete(path: str | os.PathLike, count_nonfinite: bool = False) -> int:
    """Raise ImageReadError if the image file at ``path`` holds less voxel data than its header says.

    Cheap: a size comparison for uncompressed files, one streaming
    decompression for compressed ones (during which float NIfTI voxels are
    counted for NaN/inf when ``count_nonfinite``; the count is returned).
    Files whose layout is not understood (and DICOM folders) pass.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: truncated or corrupt: the file is empty (0 bytes)")
    payload = payload_of(path, count_nonfinite)
    if payload is None or payload.complete:
        return payload.nonfinite if payload is not None else 0
    if payload.expected is None:
        raise ImageReadError(f"{path}: truncated or corrupt ({payload.reason})")
    detail = f" ({payload.reason})" if payload.reason else ""
    raise ImageReadError(f"{path}: truncated or corrupt: expected {payload.expected} bytes of {payload.what}, "
                         f"found {payload.found}{detail}")


def payload_of(path: Path, count_nonfinite: bool = False) -> Payload | None:
    """What :func:`check_complete` compares, or None when the format or layout is not understood."""
    ending = file_ending(path)
    try:
        if ending in (".nii", ".nii.gz"):
            return _nifti_payload(path, ending == ".nii.gz", count_nonfinite)
        if ending in (".mha", ".mhd"):
            return _meta_payload(path)
        if ending in (".nrrd", ".nhdr"):
            return _nrrd_payload(path)
    except (OSError, ValueError, IndexError, OverflowError):
        return None  # an unreadable header: the image reader says what is wrong
    return None


def _reason(exc: BaseException) -> str:
    """One short line for a decompression error."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, EOFError):
        return f"compressed data ends early: {text}"[:200]
    return f"{type(exc).__name__}: {text}"[:200]


NIFTI_ITEMSIZE = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                  1536: 16, 1792: 16, 2048: 32, 2304: 4}


def _nifti_payload(path: Path, gz: bool, count_nonfinite: bool, chunk: int = 1 << 24) -> Payload | None:
    """NIfTI-1/2: vox_offset + prod(dim) * bytes per voxel against the (decompressed) file size."""
    opener = gzip.open if gz else open
    with opener(path, "rb") as handle:
        try:
            header = handle.read(540)
        except (EOFError, zlib.error, gzip.BadGzipFile):
            return None  # not even a header: the image reader reports it
        order = next((o for o in "<>" if len(header) >= 348 and np.frombuffer(header, o + "i4", 1)[0] in (348, 540)),
                     None)
        if order is None:
            return None
        if np.frombuffer(header, order + "i4", 1)[0] == 348:  # NIfTI-1
            dims = np.frombuffer(header, order + "i2", 8, 40).astype(np.int64)
            code = int(np.frombuffer(header, order + "i2", 1, 70)[0])
            bitpix = int(np.frombuffer(header, order + "i2", 1, 72)[0])
            offset = max(int(np.frombuffer(header, order + "f4", 1, 108)[0]), 352)
        elif len(header) >= 540:  # NIfTI-2
            dims = np.frombuffer(header, order + "i8", 8, 16).astype(np.int64)
            code = int(np.frombuffer(header, order + "i2", 1, 12)[0])
            bitpix = int(np.frombuffer(header, order + "i2", 1, 14)[0])
            offset = max(int(np.frombuffer(header, order + "i8", 1, 168)[0]), 544)
        else:
            return None
        ndim = int(dims[0])
        itemsize = NIFTI_ITEMSIZE.get(code, bitpix // 8 if bitpix > 0 and bitpix % 8 == 0 else 0)
        if not 1 <= ndim <= 7 or (dims[1:ndim + 1] < 1).any() or itemsize <= 0:
            return None
        expected = int(np.prod(dims[1:ndim + 1], dtype=np.int64)) * itemsize
        dtype = {16: np.dtype(order + "f4"), 64: np.dtype(order + "f8")}.get(code) if count_nonfinite else None
        if not gz and dtype is None:
            return Payload(expected, max(0, path.stat().st_size - offset))
        found, bad, carry = 0, 0, b""
        try:
            handle.seek(offset)
            while block := handle.read(chunk):  # to the very end: gzip checks its length and CRC there
                if dtype is not None and found < expected:
                    data = carry + block[: max(0, expected - found)]
                    usable = len(data) - len(data) % dtype.itemsize
                    bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:usable], dtype))))
                    carry = data[usable:]
                found += len(block)
        except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
            return Payload(expected, found, _reason(exc))
        return Payload(expected, found, nonfinite=bad)


def _inflated_size(path: Path, start: int, wbits: int, chunk: int = 1 << 22) -> tuple[int, str]:
    """Bytes a zlib/gzip stream at ``start`` of ``path`` inflates to, and an error (empty if it ends properly)."""
    inflater = zlib.decompressobj(wbits)
    found = 0
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            while not inflater.eof and (block := handle.read(chunk)):
                found += len(inflater.decompress(block, chunk))
                while inflater.unconsumed_tail and not inflater.eof:
                    found += len(inflater.decompress(inflater.unconsumed_tail, chunk))
    except zlib.error as exc:
        return found, _reason(exc)
    return found, "" if inflater.eof else "compressed data ends early"


def _text_header(path: Path, limit: int = 1 << 16) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(limit)


META_ITEMSIZE = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                 "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                 "MET_DOUBLE": 8}


def _meta_payload(path: Path) -> Payload | None:
    """MetaImage (.mha data after the header, .mhd with a data file): raw or compressed payload size."""
    head = _text_header(path)
    fields: dict[str, str] = {}
    position = 0
    for line in head.split(b"\n"):
        position += len(line) + 1
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            return None
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    else:
        return None
    if int(fields.get("HeaderSize", "0") or 0) != 0:
        return None
    item = META_ITEMSIZE.get(fields.get("ElementType", ""))
    sizes = [int(v) for v in fields.get("DimSize", "").split()]
    data_file = fields["ElementDataFile"]
    if item is None or not sizes or " " in data_file or "%" in data_file or data_file.upper().startswith("LIST"):
        return None
    expected = int(np.prod(sizes, dtype=np.int64)) * item * int(fields.get("ElementNumberOfChannels", "1"))
    if data_file.upper() == "LOCAL":
        data, start = path, position
    else:
        data, start = path.parent / data_file, 0
        if not data.is_file():
            return Payload(expected, 0, f"data file {data} missing")
    available = max(0, data.stat().st_size - start)
    if fields.get("CompressedData", "False").lower() != "true":
        return Payload(expected, available)
    if fields.get("CompressedDataSize", "").isdigit():
        return Payload(int(fields["CompressedDataSize"]), available, what="compressed voxel data")
    found, reason = _inflated_size(data, start, 47)
    return Payload(expected, found, reason)


NRRD_ITEMSIZE = {1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
                 2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"),
                 4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
                 8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double")}
NRRD_TYPES = {name: size for size, names in NRRD_ITEMSIZE.items() for name in names}


def _nrrd_payload(path: Path) -> Payload | None:
    """NRRD (.nrrd attached or .nhdr detached data): raw size, or the inflated size of gzip data."""
    head = _text_header(path)
    if not head.startswith(b"NRRD"):
        return None
    end = head.find(b"\n\n")
    if end < 0:
        if file_ending(path) != ".nhdr":
            return None
        end = len(head)
    fields: dict[str, str] = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":=" in line:
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields[re.sub(r"\s+", " ", key.strip().lower())] = value.strip()
    item = NRRD_TYPES.get(fields.get("type", "").lower())
    encoding = fields.get("encoding", "").lower()
    data_file = fields.get("data file", fields.get("datafile"))
    if (item is None or "sizes" not in fields or encoding not in ("raw", "gzip", "gz")
            or int(fields.get("byte skip", "0")) != 0 or int(fields.get("line skip", "0")) != 0):
        return None
    expected = int(np.prod([int(v) for v in fields["sizes"].split()], dtype=np.int64)) * item
    if data_file is None:
        data, start = path, end + 2
    elif " " in data_file or "%" in data_file or data_file.upper().startswith("LIST"):
        return None
    else:
        data, start = path.parent / data_file, 0
        if not data.is_file():
            return Payload(expected, 0, f"data file {data} missing")
    if encoding == "raw":
        return Payload(expected, max(0, data.stat().st_size - start))
    found, reason = _inflated_size(data, start, 47)
    return Payload(expected, found, reason)


def check_image(image: sitk.Image, name: str | os.PathLike, check_values: bool = True) -> None:
    """Raise ImageReadError unless ``image`` is a non-empty, finite, scalar 3D image."""
    size = image.GetSize()
    if image.GetDimension() != 3:
        # a 4D image whose last axis is 1 is a 3D volume in disguise (common in NIfTI)
        raise ImageReadError(f"{name}: expected a 3D image, got {image.GetDimension()}D of size {size}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{name}: expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()} (vector/RGB image)")
    if "complex" in image.GetPixelIDTypeAsString().lower():
        raise ImageReadError(f"{name}: expected real voxel values, got {image.GetPixelIDTypeAsString()} (take the "
                             "magnitude image)")
    if min(size) < 2:
        raise ImageReadError(f"{name}: image is empty or flat (size {size}); a 3D volume needs at least 2 voxels per axis")
    if check_values:
        array = sitk.GetArrayViewFromImage(image)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise ImageReadError(f"{name}: holds {bad} NaN/inf voxels")


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write ``image`` atomically; the format follows the file ending.

    The file is checked after writing (its voxel payload against its
    header), so a full disk or a short write is an :class:`ImageWriteError`
    (an OSError naming ``path``, saying when the disk is full) rather than
    a silently truncated image; whatever was at ``path`` before is kept.
    """
    path = Path(path)
    ending = file_ending(path)
    if ending is None:
        raise ValueError(f"{path}: unsupported file ending (use one of {', '.join(FILE_ENDINGS)})")
    itk_path(path, writing=True)
    if ending in (".mhd", ".nhdr"):
        # header + separate data file: atomic rename of one file is not enough
        try:
            _write_checked(image, path, path, compress)
        except OSError:
            path.unlink(missing_ok=True)  # no header, no image that looks finished
            raise
        return
    try:
        with atomic_path(path, suffix=ending) as tmp:
            _write_checked(image, tmp, path, compress)
    except ImageWriteError:
        raise
    except OSError as exc:  # flushing or renaming the temporary file
        raise write_error(path, exc, ImageWriteError) from exc


def _write_checked(image: sitk.Image, target: Path, final: Path, compress: bool) -> None:
    """SimpleITK write of ``target``, then a size check; errors name ``final``."""
    try:
        sitk.WriteImage(image, str(target), compress)
    except (RuntimeError, OSError) as exc:
        raise write_error(final, exc, ImageWriteError) from exc
    payload = payload_of(target)
    if payload is not None and not payload.complete:
        short = f"expected {payload.expected} bytes of {payload.what}, found {payload.found}"
        raise write_error(final, OSError(f"the written file is incomplete: {short}"), ImageWriteError)


def image_from_array(array: np.ndarray, reference: sitk.Image | None = None) -> sitk.Image:
    """Numpy (z, y, x) array -> SimpleITK image with ``reference``'s geometry."""
    image = sitk.GetImageFromArray(array)
    if reference is not None:
        image.CopyInformation(reference)
    return image
