"""Check a raw dataset folder against the layout of DESIGN.md section 3.

:func:`validate_raw_dataset` collects every problem at once, one line each,
naming the case and the file, so a user can fix a dataset in one pass.
Hidden files (names starting with ``.``) are ignored.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from wldm_auto.io.files import read_json
from wldm_auto.io.geometry import Geometry
from wldm_auto.io.images import FILE_ENDINGS, ImageReadError, check_complete, error_reason, file_ending, itk_path
from wldm_auto.io.raw_dataset import CHANNEL_RE, REQUIRED_KEYS, RawDataset

log = logging.getLogger(__name__)

CASE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
CASE_NAME_RULE = "letters, digits, '.', '-' and '_', starting with a letter or digit"
GEOMETRY_TOLERANCE = 1e-4
# data files that sit beside a detached header (.mhd/.nhdr) under the header's name
DETACHED_DATA_ENDINGS = (".raw", ".zraw", ".raw.gz")


class DatasetInvalidError(ValueError):
    """A raw dataset breaks the layout; the message lists every problem, one per line."""

    def __init__(self, folder: str | Path, problems: list[str]):
        self.folder = Path(folder)
        self.problems = list(problems)
        header = f"{self.folder}: {len(self.problems)} problem(s) in the raw dataset"
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))


def _channel_count(channels: Any) -> int | None:
    """Number of channels if ``channel_names`` maps '0'..'n-1' to names, else None."""
    if not isinstance(channels, dict) or not channels or not all(str(k).isdigit() for k in channels):
        return None
    return len(channels) if sorted(int(k) for k in channels) == list(range(len(channels))) else None


def _check_meta(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """Parse dataset.json; return the usable metadata (or None) and all its problems."""
    if not path.is_file():
        return None, [f"{path}: missing (every raw dataset needs a dataset.json)"]
    try:
        meta = read_json(path)
    except ValueError as exc:
        return None, [str(exc).replace("\n", " ")]
    if not isinstance(meta, dict):
        return None, [f"{path}: must hold a JSON object, got {type(meta).__name__}"]
    problems = []
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        problems.append(f"{path}: missing key(s) {', '.join(missing)}")
    ending = meta.get("file_ending")
    if "file_ending" in meta and ending not in FILE_ENDINGS:
        problems.append(f"{path}: file_ending {ending!r} is not one of {', '.join(FILE_ENDINGS)}")
    channels = meta.get("channel_names")
    if "channel_names" in meta and _channel_count(channels) is None:
        problems.append(f"{path}: channel_names must map '0', '1', ... to names, got {channels!r}")
    count = meta.get("numTraining")
    if "numTraining" in meta and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        problems.append(f"{path}: numTraining must be a non-negative integer, got {count!r}")
    return meta, problems


def _scan(folder: Path, ending: str, channel_files: bool, problems: list[str]) -> dict[str, dict[int, Path]] | dict[str, Path]:
    """Map case -> {channel: path} (``channel_files``) or case -> path; report odd entries."""
    found: dict[str, Any] = defaultdict(dict) if channel_files else {}
    if not folder.is_dir():
        return found
    headers = {p.name[: -len(ending)] for p in folder.iterdir() if p.name.endswith(ending)}
    pattern = f"CASE_XXXX{ending} (XXXX = channel, 4 digits)" if channel_files else f"CASE{ending}"
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith("."):
            continue
        where = f"{folder.name}/{name}"
        if path.is_dir():
            problems.append(f"{where}: is a folder; expected image files named {pattern}")
            continue
        if not name.endswith(ending):
            other = file_ending(name)
            if ending in (".mhd", ".nhdr") and any(name.endswith(d) and name[: -len(d)] in headers for d in DETACHED_DATA_ENDINGS):
                continue
            reason = f"has ending {other}" if other else "has an unknown file ending"
            problems.append(f"{where}: {reason}, but dataset.json says file_ending {ending}")
            continue
        stem = name[: -len(ending)]
        if channel_files:
            match = CHANNEL_RE.match(stem)
            if not match:
                problems.append(f"{where}: name does not match {pattern}")
                continue
            case, channel = match.group("case"), int(match.group("channel"))
        else:
            case, channel = stem, None
        if not CASE_NAME_RE.match(case):
            problems.append(f"{where}: case name {case!r} must hold only {CASE_NAME_RULE}")
            continue
        if channel_files:
            found[case][channel] = path
        else:
            found[case] = path
    return found


def _guess_ending(folder: Path) -> str | None:
    """The most common supported file ending in ``folder``, or None."""
    endings = [file_ending(p) for p in folder.iterdir()] if folder.is_dir() else []
    endings = [e for e in endings if e]
    return max(set(endings), key=endings.count) if endings else None


def read_header(path: Path) -> tuple[Geometry | None, str | None]:
    """Geometry from the image header only, or the reason it cannot be used."""
    reader = sitk.ImageFileReader()
    try:
        reader.SetFileName(itk_path(path))
    except ImageReadError as exc:
        return None, str(exc).split(": ", 1)[-1]
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        return None, f"cannot be read as an image ({error_reason(exc, 160)})"
    if reader.GetDimension() != 3:
        return None, f"expected a 3D image, got {reader.GetDimension()}D of size {reader.GetSize()}"
    if reader.GetNumberOfComponents() != 1:
        return None, f"expected one value per voxel, got {reader.GetNumberOfComponents()} (vector/RGB image)"
    geometry = Geometry(tuple(reader.GetSize()), tuple(reader.GetSpacing()),
                        tuple(reader.GetOrigin()), tuple(reader.GetDirection()))
    if min(geometry.size) < 2:
        return None, f"image is empty or flat (size {geometry.size})"
    try:
        check_complete(path)  # a truncated file has a valid header: compare its voxel payload with it
    except ImageReadError as exc:
        return None, str(exc).split(": ", 1)[-1]
    return geometry, None


def _differences(reference: Geometry, other: Geometry) -> str:
    """Which of size/spacing/origin/direction differ, with both values."""
    parts = []
    for key in ("size", "spacing", "origin", "direction"):
        ref, val = getattr(reference, key), getattr(other, key)
        if ref != val and (key == "size" or not np.allclose(ref, val, atol=GEOMETRY_TOLERANCE)):
            parts.append(f"{key} {tuple(round(v, 4) for v in val)} vs {tuple(round(v, 4) for v in ref)}")
    return "; ".join(parts)


def _check_headers(case: str, channels: dict[int, Path], others: dict[str, Path | None], split: str) -> list[str]:
    problems = []
    reference = None
    for channel in sorted(channels):
        path = channels[channel]
        geometry, reason = read_header(path)
        if reason:
            problems.append(f"case {case}: images{split}/{path.name}: {reason}")
        elif reference is None and channel == 0:
            reference = geometry
        elif reference is not None and not geometry.is_close(reference, GEOMETRY_TOLERANCE):
            problems.append(f"case {case}: images{split}/{path.name}: geometry differs from channel 0 "
                            f"({_differences(reference, geometry)})")
    for kind, path in others.items():
        if path is None:
            continue
        geometry, reason = read_header(path)
        if reason:
            problems.append(f"case {case}: {path.parent.name}/{path.name}: {reason}")
        elif kind == "mask" and reference is not None and not geometry.is_close(reference, GEOMETRY_TOLERANCE):
            problems.append(f"case {case}: {path.parent.name}/{path.name}: mask geometry differs from MR channel 0 "
                            f"({_differences(reference, geometry)})")
    return problems


def _check_channels(case: str, channels: dict[int, Path], count: int, ending: str, split: str) -> list[str]:
    problems = []
    missing = [c for c in range(count) if c not in channels]
    extra = sorted(c for c in channels if c >= count)
    if missing:
        names = ", ".join(f"{case}_{c:04d}{ending}" for c in missing)
        problems.append(f"case {case}: images{split} lacks channel file(s) {names} "
                        f"(dataset.json lists {count} channel(s))")
    if extra:
        names = ", ".join(channels[c].name for c in extra)
        problems.append(f"case {case}: images{split}/{names}: extra channel(s) not in dataset.json "
                        f"channel_names ({count} channel(s))")
    return problems


def validate_raw_dataset(folder: str | Path, check_images: bool = True) -> list[str]:
    """Every problem of the raw dataset in ``folder``, one line each; empty if valid.

    With ``check_images`` the image headers are read (not the voxels): files
    must be readable 3D scalar images, MR channels and the mask of a case must
    share MR channel 0's grid (the CT may have any geometry).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: not a folder"]
    meta, problems = _check_meta(folder / "dataset.json")
    ending = meta.get("file_ending") if meta else None
    if ending not in FILE_ENDINGS:
        ending = _guess_ending(folder / "imagesTr")
        if ending is None:
            return problems + [f"{folder}: file checks skipped (no valid file_ending in dataset.json, "
                               f"no image files in imagesTr to guess it from)"]
        log.info("%s: checking files as %s (the most common ending in imagesTr)", folder, ending)
    meta = meta or {}
    num_channels = _channel_count(meta.get("channel_names"))

    images = _scan(folder / "imagesTr", ending, True, problems)
    targets = _scan(folder / "targetsTr", ending, False, problems)
    masks = _scan(folder / "masksTr", ending, False, problems)
    cases = sorted(images)
    for case in cases:
        if case not in targets:
            problems.append(f"case {case}: missing target targetsTr/{case}{ending} (CT for imagesTr/{case}_0000{ending})")
        if masks and case not in masks:
            problems.append(f"case {case}: missing mask masksTr/{case}{ending} (masksTr holds masks for other cases; "
                            f"give every case a mask or none)")
        if num_channels is not None:
            problems.extend(_check_channels(case, images[case], num_channels, ending, "Tr"))
    for case in sorted(set(targets) - set(images)):
        problems.append(f"case {case}: orphan target targetsTr/{case}{ending} has no image imagesTr/{case}_0000{ending}")
    for case in sorted(set(masks) - set(images)):
        problems.append(f"case {case}: orphan mask masksTr/{case}{ending} has no image imagesTr/{case}_0000{ending}")
    if not cases:
        problems.append(f"{folder}: no training cases (imagesTr/CASE_0000{ending} files)")
    count = meta.get("numTraining")
    if isinstance(count, int) and not isinstance(count, bool) and count != len(cases):
        problems.append(f"{folder / 'dataset.json'}: numTraining is {count} but imagesTr holds {len(cases)} case(s)")

    tests = _scan(folder / "imagesTs", ending, True, problems)
    if num_channels is not None:
        for case in sorted(tests):
            problems.extend(_check_channels(case, tests[case], num_channels, ending, "Ts"))

    if check_images:
        for case in cases:
            problems.extend(_check_headers(case, images[case], {"target": targets.get(case), "mask": masks.get(case)}, "Tr"))
        for case in sorted(tests):
            problems.extend(_check_headers(case, tests[case], {}, "Ts"))
    return problems


def ensure_valid(folder: str | Path, check_images: bool = True) -> RawDataset:
    """Load the raw dataset in ``folder``; raise :class:`DatasetInvalidError` listing all problems."""
    problems = validate_raw_dataset(folder, check_images)
    if problems:
        raise DatasetInvalidError(folder, problems)
    return RawDataset.load(folder)
