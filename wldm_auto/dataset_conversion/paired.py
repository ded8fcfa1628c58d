"""Convert two (or three) folders of paired MR / CT (/ mask) images into a raw dataset.

    mr_dir/CASE.nii.gz     or mr_dir/CASE/  (a DICOM series folder)
    ct_dir/CASE.mha        or ct_dir/CASE/
    mask_dir/CASE.nrrd     optional

Images are matched by name without the file ending; any supported ending
may be mixed. Files of another kind are skipped with a warning.
"""
from __future__ import annotations

import logging
from pathlib import Path

from wldm_auto.dataset_conversion.common import SourceCase, build_dataset, normalise_ending, output_folder
from wldm_auto.io.files import check_distinct_folders
from wldm_auto.io.images import file_ending, is_dicom_folder, strip_ending
from wldm_auto.io.raw_validation import DETACHED_DATA_ENDINGS

log = logging.getLogger(__name__)

# a format with a detached header is written as its single-file sibling
_SINGLE_FILE = {".mhd": ".mha", ".nhdr": ".nrrd"}


def collect_images(folder: str | Path) -> dict[str, Path]:
    """Map name -> image file or DICOM series folder in ``folder`` (not recursive)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    found: dict[str, list[Path]] = {}
    skipped = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if not is_dicom_folder(path):
                skipped.append(path.name + "/")
                continue
            name = path.name
        elif file_ending(path):
            name = strip_ending(path)
        else:
            if not path.name.lower().endswith(DETACHED_DATA_ENDINGS):
                skipped.append(path.name)
            continue
        found.setdefault(name, []).append(path)
    if skipped:
        log.warning("%s: skipping %d entr(y/ies) that are neither images nor DICOM folders: %s",
                    folder, len(skipped), ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    clashes = {n: ps for n, ps in found.items() if len(ps) > 1}
    if clashes:
        listed = "; ".join(f"{n}: {', '.join(p.name for p in ps)}" for n, ps in sorted(clashes.items()))
        raise ValueError(f"{folder}: several inputs share a name: {listed}")
    return {name: paths[0] for name, paths in found.items()}


def default_file_ending(sources: list[Path]) -> str:
    """The MR files' ending if they all share one, else ``.nii.gz`` (DICOM counts as ``.nii.gz``)."""
    endings = {".nii.gz" if p.is_dir() else file_ending(p) for p in sources}
    if len(endings) != 1:
        return ".nii.gz"
    ending = endings.pop()
    return _SINGLE_FILE.get(ending, ending)


def convert_paired(
    mr_dir: str | Path,
    ct_dir: str | Path,
    dataset_id: int,
    name: str,
    mask_dir: str | Path | None = None,
    link: bool = False,
    overwrite: bool = False,
    file_ending: str | None = None,
    allow_unmatched: bool = False,
) -> Path:
    """Convert paired MR/CT(/mask) folders into ``$wldm_raw/DatasetXXX_Name``; returns its folder.

    Names present in some folders only are an error listing them, unless
    ``allow_unmatched`` (then they are skipped with a warning).
    """
    folders = {"MR": Path(mr_dir), "CT": Path(ct_dir)}
    if mask_dir is not None:
        folders["mask"] = Path(mask_dir)
    check_distinct_folders(folders)
    output_folder(dataset_id, name, overwrite)  # fail fast, before scanning the inputs
    images = {kind: collect_images(folder) for kind, folder in folders.items()}
    names = set().union(*images.values())
    matched = sorted(n for n in names if all(n in found for found in images.values()))
    unmatched = sorted(names - set(matched))
    if unmatched:
        listed = ", ".join(f"{n} (no {'/'.join(k for k in images if n not in images[k])})" for n in unmatched)
        if not allow_unmatched:
            raise ValueError(f"{len(unmatched)} name(s) not found in every input folder: {listed}; "
                             f"rename them, or pass --allow-unmatched / allow_unmatched=True to skip them")
        log.warning("skipping %d unmatched name(s): %s", len(unmatched), listed)
    if not matched:
        raise ValueError(f"no case found in all of {', '.join(str(f) for f in folders.values())} "
                         f"(images are matched by file name without ending)")
    cases = [SourceCase(n, [images["MR"][n]], images["CT"][n], images.get("mask", {}).get(n)) for n in matched]
    ending = normalise_ending(file_ending) if file_ending else default_file_ending([c.images[0] for c in cases])
    log.info("%d paired case(s), writing %s files", len(cases), ending)
    return build_dataset(
        cases, dataset_id, name, ending, link=link, overwrite=overwrite, inputs=list(folders.values()),
        description=f"Paired MR/CT converted from {folders['MR']} and {folders['CT']}",
        licence="see the source of the data",
    )
