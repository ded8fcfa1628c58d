"""Helpers shared by the converters: case lists, placing files, building a dataset safely.

A dataset is assembled in a hidden temporary folder beside its final name
(``$wldm_raw/.DatasetXXX_Name.partial-*``), validated, and renamed into place
only when complete, so an interrupted conversion never leaves a half dataset
under the final name. Inputs are only read: files are copied, symlinked
(``link=True``) or, when their format differs from the dataset's file ending
(a DICOM folder, ``.mha`` into a ``.nii.gz`` dataset), read and re-written
with the same voxels and geometry.
"""
from __future__ import annotations

import filecmp
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from wldm_auto.io.geometry import Geometry
from wldm_auto.io.images import FILE_ENDINGS, file_ending, read_image, strip_ending, write_image
from wldm_auto.io.raw_dataset import write_dataset_json
from wldm_auto.io.raw_validation import (
    CASE_NAME_RE, CASE_NAME_RULE, GEOMETRY_TOLERANCE, DatasetInvalidError, read_header, validate_raw_dataset,
)
from wldm_auto.paths import dataset_folder_name, parse_dataset_id, raw_root

log = logging.getLogger(__name__)

DETACHED_HEADERS = (".mhd", ".nhdr")  # header and voxels in two files: never copied or linked


@dataclass
class SourceCase:
    """Where one case's inputs are: MR channel files/DICOM folders, CT, optional mask."""

    name: str
    images: list[Path]
    target: Path
    mask: Path | None = None

    def inputs(self) -> list[Path]:
        return [*self.images, self.target, *([self.mask] if self.mask else [])]


def normalise_ending(ending: str) -> str:
    """``nii.gz`` or ``.NII.GZ`` -> ``.nii.gz``; ValueError for an unsupported ending."""
    text = ending.strip().lower()
    text = text if text.startswith(".") else "." + text
    if text not in FILE_ENDINGS:
        raise ValueError(f"file ending {ending!r} is not supported (use one of {', '.join(FILE_ENDINGS)})")
    return text


def check_case_names(names: Iterable[str], where: str) -> None:
    """Raise a ValueError listing case names the raw layout cannot hold."""
    bad = sorted(n for n in names if not CASE_NAME_RE.match(n))
    if bad:
        raise ValueError(f"{where}: {len(bad)} case name(s) with characters the dataset layout does not allow "
                         f"(use {CASE_NAME_RULE}): {', '.join(repr(n) for n in bad)}")


def find_image(folder: Path, stem: str) -> Path | None:
    """The image file ``folder/<stem><any supported ending>`` (stem case-insensitive), or None."""
    matches = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                     and file_ending(p) and strip_ending(p).lower() == stem.lower())
    if len(matches) > 1:
        raise ValueError(f"{folder}: several files named {stem!r}: {', '.join(p.name for p in matches)}")
    return matches[0] if matches else None


def needs_conversion(source: Path, ending: str) -> bool:
    """True unless ``source`` is a single file already in format ``ending``."""
    if source.is_dir():
        return True
    source_ending = file_ending(source)
    return source_ending != ending or source_ending in DETACHED_HEADERS


def place_image(source: Path, destination: Path, link: bool = False) -> str:
    """Put ``source`` at ``destination``: copy, symlink or convert. Returns which was done.

    Conversion (format differs, DICOM folder, detached header) reads the image
    and writes it with the same voxels and geometry; the written header is
    checked against the source.
    """
    source = Path(source)
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    ending = file_ending(destination)
    if ending is None:
        raise ValueError(f"{destination}: unsupported file ending")
    if not needs_conversion(source, ending):
        _, reason = read_header(source)  # fail on the user's file, not later on its copy in the staging folder
        if reason:
            raise ValueError(f"{source}: {reason}")
        if link:
            destination.symlink_to(source.resolve())
            return "linked"
        shutil.copyfile(source, destination)
        return "copied"
    image = read_image(source)
    write_image(image, destination)
    written, reason = read_header(destination)
    if written is None or not written.is_close(Geometry.of(image), GEOMETRY_TOLERANCE):
        raise ValueError(f"{source}: geometry changed when written as {ending} "
                         f"({Geometry.of(image)} -> {written or reason}); choose another file ending")
    return "converted"


def looks_like_dataset(folder: Path) -> bool:
    """True for an empty folder or one holding a dataset.json or imagesTr (safe to replace)."""
    if folder.is_symlink():
        return True  # only the link is removed
    if not folder.is_dir():
        return False
    entries = [p.name for p in folder.iterdir()]
    return not entries or "dataset.json" in entries or "imagesTr" in entries


def datasets_with_id(raw: Path, dataset_id: int) -> list[Path]:
    """Folders ``DatasetXXX_*`` in ``raw`` with this numeric id."""
    if not raw.is_dir():
        return []
    return sorted(p for p in raw.iterdir() if p.name.startswith("Dataset")
                  and parse_dataset_id(p.name) == dataset_id and (p.is_dir() or p.is_symlink()))


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


LINKED_SUBFOLDERS = ("imagesTr", "targetsTr", "masksTr")


def links_into(folder: Path, raw: Path, limit: int = 3) -> list[Path]:
    """Up to ``limit`` symlinks in the other raw datasets under ``raw`` (made by ``--link``) whose target lies
    inside ``folder``: replacing ``folder`` would leave them dangling."""
    if folder.is_symlink() or not folder.is_dir():
        return []  # replacing a link removes only the link, not what it points to
    target = folder.resolve()
    found: list[Path] = []
    for other in sorted(raw.iterdir()):
        if other == folder or not other.name.startswith("Dataset") or not other.is_dir():
            continue
        for sub in LINKED_SUBFOLDERS:
            if not (other / sub).is_dir():
                continue
            for entry in sorted((other / sub).iterdir()):
                if entry.is_symlink() and _is_inside(entry, target):
                    found.append(entry)
                    if len(found) >= limit:
                        return found
    return found


def output_folder(dataset_id: int, name: str, overwrite: bool, inputs: Sequence[Path] = ()) -> tuple[Path, list[Path]]:
    """The final dataset folder and the existing ones it replaces; refuse unsafe cases.

    Raises FileExistsError if a dataset with this id exists and ``overwrite``
    is False, or if one to be replaced does not look like a dataset; raises a
    ValueError if an input lies inside a folder that would be removed.
    """
    dataset_id = int(dataset_id)
    final = raw_root() / dataset_folder_name(dataset_id, name)
    existing = datasets_with_id(final.parent, dataset_id)
    if final.exists() and final not in existing:
        existing.append(final)
    if existing and not overwrite:
        raise FileExistsError(f"dataset id {dataset_id:03d} already exists: {', '.join(map(str, existing))} "
                              f"(use --overwrite / overwrite=True to replace it)")
    for folder in existing:
        if not looks_like_dataset(folder):
            raise FileExistsError(f"{folder}: refusing to replace it, it does not look like a raw dataset "
                                  f"(no dataset.json or imagesTr); move it away yourself")
        if not folder.is_symlink():
            inside = [str(p) for p in inputs if _is_inside(Path(p), folder)]
            if inside:
                raise ValueError(f"{folder}: cannot be replaced, the input(s) {', '.join(inside)} lie inside it")
        linked = links_into(folder, final.parent)
        if linked:
            raise ValueError(f"{folder}: cannot be replaced, another dataset links into it (made with --link), e.g. "
                             f"{', '.join(map(str, linked))}: those links would break; convert that dataset "
                             f"again without --link (or remove it) first")
    return final, existing


def _check_masks(cases: Sequence[SourceCase]) -> None:
    with_mask = [c.name for c in cases if c.mask is not None]
    if with_mask and len(with_mask) != len(cases):
        missing = sorted(c.name for c in cases if c.mask is None)
        raise ValueError(f"{len(with_mask)} case(s) have a mask but {len(missing)} do not (give every case a mask "
                         f"or none): no mask for {', '.join(missing)}")


def _swap_in(staging: Path, final: Path, replaced: list[Path]) -> None:
    """Move replaced datasets aside, rename ``staging`` to ``final``, then delete the old ones."""
    trash = []
    for folder in replaced:
        aside = folder.parent / f".{folder.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.replace(folder, aside)
        trash.append(aside)
        log.info("replacing existing dataset %s", folder)
    os.replace(staging, final)
    for folder in trash:
        if folder.is_symlink() or not folder.is_dir():
            folder.unlink()
        else:
            shutil.rmtree(folder)


def same_content(a: Path, b: Path) -> bool:
    """True if files (or DICOM folders) ``a`` and ``b`` hold the same bytes."""
    a, b = Path(a), Path(b)
    if a.is_file() and b.is_file():
        return filecmp.cmp(a, b, shallow=False)  # the same file, or byte-for-byte equal (stops at the first difference)
    if a.is_dir() and b.is_dir():
        files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)
    return False


def warn_identical_inputs(cases: Sequence[SourceCase]) -> None:
    """Warn (naming the case) when an MR image of a case has the same content as its CT."""
    for case in cases:
        for image in case.images:
            if same_content(image, case.target):
                log.warning("case %s: the MR %s and the CT %s have the same content (is the CT folder the MR "
                            "folder?); the MR would become the CT target", case.name, image, case.target)


def _staging_paths(text: str, staging: Path, sources: Mapping[str, Path], final: Path) -> str:
    """``text`` with every path inside the (soon deleted) staging folder replaced by the user's source file."""
    def replace(match: re.Match) -> str:
        relative = match.group(1)
        for name, source in sources.items():
            if relative == name or f".{Path(name).name}." in relative:  # the file or its temporary sibling
                return str(source)
        return str(final / relative)

    return re.sub(re.escape(str(staging)) + r"/([^\s'\":,()]+)", replace, text).replace(str(staging), str(final))


def _place_cases(cases: Sequence[SourceCase], staging: Path, ending: str, link: bool, done: dict[str, int],
                 desc: str, sources: dict[str, Path], final: Path) -> None:
    """Place every case's files in ``staging``, counting copies/links/conversions in ``done``.

    ``sources`` collects staging-relative name -> the user's file. Errors name
    the case and the user's file, never the staging folder.
    """
    for case in tqdm(cases, desc=desc, unit="case", disable=None):
        places = [(src, staging / "imagesTr" / f"{case.name}_{i:04d}{ending}") for i, src in enumerate(case.images)]
        places.append((case.target, staging / "targetsTr" / f"{case.name}{ending}"))
        if case.mask is not None:
            places.append((case.mask, staging / "masksTr" / f"{case.name}{ending}"))
        for source, destination in places:
            relative = str(destination.relative_to(staging))
            sources[relative] = Path(source)
            try:
                how = place_image(source, destination, link)
            except (ValueError, OSError, RuntimeError) as exc:
                text = _staging_paths(" ".join(str(exc).split()), staging, {relative: Path(source)}, final)
                if str(source) not in text:
                    text = f"{source}: {text}"
                raise ValueError(f"case {case.name}: {text}") from None
            done[how] = done.get(how, 0) + 1
            if link and how == "converted":
                log.warning("%s: format differs from %s, converted instead of linked", source, ending)


def build_dataset(
    cases: Sequence[SourceCase],
    dataset_id: int,
    name: str,
    file_ending: str = ".nii.gz",
    link: bool = False,
    overwrite: bool = False,
    inputs: Sequence[Path] = (),
    extra_files: Mapping[str, Path] | None = None,
    **meta: Any,
) -> Path:
    """Write ``cases`` as raw dataset ``$wldm_raw/DatasetXXX_Name``; returns its folder.

    ``meta`` goes to dataset.json (description, licence, reference, extra keys).
    ``inputs`` are the source folders: refused if they lie in a dataset to be
    replaced. ``extra_files`` (name -> source) are copied beside dataset.json,
    e.g. a README with the data's attribution. The result is validated
    (headers) before it is moved into place.
    """
    ending = normalise_ending(file_ending)
    if not cases:
        raise ValueError(f"no cases to convert for dataset {name}")
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate case name(s): {', '.join(duplicates)}")
    check_case_names(names, "input")
    channel_counts = {len(c.images) for c in cases}
    if len(channel_counts) != 1:
        raise ValueError(f"cases differ in their number of MR channels: {sorted(channel_counts)}")
    _check_masks(cases)
    inputs = [*inputs, *(p for c in cases for p in c.inputs())]
    final, replaced = output_folder(dataset_id, name, overwrite, inputs)
    warn_identical_inputs(cases)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        done: dict[str, int] = {}
        sources: dict[str, Path] = {}
        with logging_redirect_tqdm():
            _place_cases(cases, staging, ending, link, done, final.name, sources, final)
        for file_name, source in (extra_files or {}).items():
            shutil.copyfile(source, staging / file_name)
        channels = meta.pop("channel_names", None) or {str(i): "MR" if i == 0 else f"MR{i}"
                                                        for i in range(len(cases[0].images))}
        write_dataset_json(staging, name, len(cases), ending, channels, **meta)
        problems = validate_raw_dataset(staging)
        if problems:  # name the user's files, not their copies in the staging folder that is about to go
            problems = [_staging_paths(_with_sources(p, sources), staging, sources, final) for p in problems]
            raise DatasetInvalidError(final, problems)
        _swap_in(staging, final, replaced)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("wrote %s: %d case(s) (%s)", final, len(cases), ", ".join(f"{v} {k}" for k, v in sorted(done.items())))
    return final


def _with_sources(problem: str, sources: Mapping[str, Path]) -> str:
    """A validation problem about ``imagesTr/CASE_0000.nii.gz`` etc., with the user's file it came from."""
    for relative, source in sources.items():
        if f" {relative}:" in problem:
            return problem.replace(f" {relative}:", f" {relative} (from {source}):", 1)
    return problem


def _region_folders(input_dir: Path, known: Sequence[str], example: str) -> dict[str, Path]:
    """Region name -> folder; accepts the root, a ``Task1/`` wrapper, or one region folder."""
    if not input_dir.is_dir():
        raise ValueError(f"{input_dir}: not a folder")
    lookup = {r.lower(): r for r in known}
    task = [p for p in input_dir.iterdir() if p.is_dir() and p.name.lower() == "task1"]
    base = task[0] if task else input_dir
    found = {lookup[p.name.lower()]: p for p in sorted(base.iterdir()) if p.is_dir() and p.name.lower() in lookup}
    if not found and input_dir.name.lower() in lookup:
        found = {lookup[input_dir.name.lower()]: input_dir}
    if not found:
        raise ValueError(f"{input_dir}: no region folder ({', '.join(known)}) found; expected a layout like {example}")
    return found


def synthrad_cases(
    input_dir: str | Path,
    known_regions: Sequence[str],
    regions: Sequence[str] | None,
    example: str,
) -> tuple[list[SourceCase], dict[str, str]]:
    """Cases of a SynthRAD Task 1 tree (region/patient/{mr,ct,mask}.*) and each case's region.

    ``regions`` restricts to some regions (case-insensitive). Overview folders
    and loose files are skipped with a warning; a patient folder without mr or
    ct is an error listing every such folder.
    """
    input_dir = Path(input_dir)
    folders = _region_folders(input_dir, known_regions, example)
    if regions:
        lookup = {r.lower(): r for r in known_regions}
        unknown = [r for r in regions if r.lower() not in lookup]
        if unknown:
            raise ValueError(f"unknown region(s) {', '.join(unknown)} (known: {', '.join(known_regions)})")
        wanted = [lookup[r.lower()] for r in regions]
        absent = [r for r in wanted if r not in folders]
        if absent:
            raise ValueError(f"{input_dir}: region folder(s) {', '.join(absent)} not found "
                             f"(found: {', '.join(folders)})")
        folders = {r: folders[r] for r in dict.fromkeys(wanted)}
    cases: list[SourceCase] = []
    case_regions: dict[str, str] = {}
    incomplete: list[str] = []
    for region, folder in folders.items():
        skipped = []
        for patient in sorted(folder.iterdir()):
            if patient.name.startswith("."):
                continue
            if not patient.is_dir() or patient.name.lower().startswith("overview"):
                skipped.append(patient.name + ("/" if patient.is_dir() else ""))
                continue
            files = {stem: find_image(patient, stem) for stem in ("mr", "ct", "mask")}
            missing = [stem for stem in ("mr", "ct") if files[stem] is None]
            if missing:
                incomplete.append(f"{patient} (no {' or '.join(missing)})")
                continue
            cases.append(SourceCase(patient.name, [files["mr"]], files["ct"], files["mask"]))
            case_regions[patient.name] = region
        if skipped:
            log.warning("%s: skipping %s (not patient folders)", folder, ", ".join(skipped))
    if incomplete:
        raise ValueError(f"{len(incomplete)} patient folder(s) lack an image: {'; '.join(incomplete)}")
    if not cases:
        raise ValueError(f"{input_dir}: no patient folders found in {', '.join(map(str, folders.values()))}")
    return cases, case_regions
