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


def check_input_folder(folder: str | Path) -> Path:
    """``folder`` if it is an existing folder; ValueError saying what it is otherwise."""
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"{folder}: is a file; the input must be a folder of MR images "
                         "(put the file in a folder of its own)")
    if not folder.is_dir():
        raise ValueError(f"{folder}: input folder not found")
    return folder


def check_output_folder(input_dir: str | Path, output_dir: str | Path) -> None:
    """ValueError if ``output_dir`` is ``input_dir`` or lies inside it (symlinks resolved).

    Predictions (and anything else written) there would become inputs of the
    next run, and with ``--overwrite`` could replace an input MR.
    """
    source, target = Path(input_dir).resolve(), Path(output_dir).resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{output_dir}: is a file, not a folder; give a folder for the output")
    if target == source:
        raise ValueError(f"{output_dir}: the output folder is the input folder; choose another output folder")
    if source in target.parents:
        raise ValueError(f"{output_dir}: the output folder lies inside the input folder {input_dir}; "
                         "choose one outside it")


def input_files(cases: list[InputCase]) -> set[Path]:
    """Resolved paths of every input file and DICOM folder of ``cases`` (never to be written to)."""
    return {Path(p).resolve() for case in cases for p in case.channels.values()}


def find_cases(folder: str | Path) -> list[InputCase]:
    """All cases in ``folder`` sorted by name; ValueError if the folder holds none."""
    folder = check_input_folder(folder)
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


def select_part(cases: list[InputCase], part_id: int = 0, num_parts: int = 1) -> list[InputCase]:
    """Part ``part_id`` of ``num_parts``: ``cases[part_id::num_parts]`` of the cases sorted by name.

    The parts are disjoint and together hold every case, so jobs predicting
    parts 0 .. N-1 into one folder write each case exactly once (a part may be
    empty when there are more parts than cases). ValueError for a bad share.
    """
    for name, value in (("num_parts", num_parts), ("part_id", part_id)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(f"part {part_id} of {num_parts}: need num_parts >= 1 and 0 <= part_id < num_parts")
    chosen = sorted(cases, key=lambda c: c.name)[part_id::num_parts]
    if num_parts > 1:
        log.info("part %d of %d: %d of %d case(s)%s", part_id, num_parts, len(chosen), len(cases),
                 f" ({', '.join(c.name for c in chosen[:5])}{' ...' if len(chosen) > 5 else ''})" if chosen else "")
    return chosen
