"""Find the MR cases in a prediction input folder.

Accepted: files ``CASE_0000<ending>`` (+ ``_0001`` ... for more channels),
files ``CASE<ending>`` (one channel), and DICOM series sub-folders
``CASE/`` (one channel). Anything else is ignored with a warning.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from wldm_auto.io.images import file_ending, is_dicom_folder, strip_ending

log = logging.getLogger(__name__)

CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class InputCase:
    name: str
    channels: dict[int, Path]  # channel index -> file or DICOM folder


def find_cases(folder: str | Path) -> list[InputCase]:
    """All cases in ``folder`` sorted by name; ValueError if the folder holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: input folder not found")
    cases: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and file_ending(path):
            stem = strip_ending(path)
            match = CHANNEL.match(stem)
            name, channel = (match.group("case"), int(match.group("channel"))) if match else (stem, 0)
        elif path.is_dir() and is_dicom_folder(path):
            name, channel = path.name, 0
        else:
            log.warning("%s: not an image file or DICOM series folder, ignored", path)
            continue
        if channel in cases.setdefault(name, {}):
            raise ValueError(f"{path}: case {name} has two inputs for channel {channel} "
                             f"({cases[name][channel].name} and {path.name})")
        cases[name][channel] = path
    if not cases:
        raise ValueError(f"{folder}: no MR images found (expected CASE_0000.nii.gz, CASE.mha, DICOM folders, ...)")
    return [InputCase(name, dict(sorted(ch.items()))) for name, ch in sorted(cases.items())]
