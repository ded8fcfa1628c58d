"""Convert the SynthRAD2025 Task 1 (MR -> CT) training data into a raw dataset.

    Task1/AB/1ABA005/mr.mha, ct.mha, mask.mha     (AB abdomen, HN head-neck, TH thorax)

``input_dir`` may be the folder holding ``Task1/``, ``Task1/`` itself, or one
region folder. Case names are the patient folder names; the ``.mha`` format is
kept; masks go to masksTr.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from wldm_auto.dataset_conversion.common import build_dataset, output_folder, synthrad_cases

log = logging.getLogger(__name__)

REGIONS = ("AB", "HN", "TH")
REFERENCE = ("Thummerer A, van der Bijl E, Galapon A Jr, et al. SynthRAD2025 Grand Challenge dataset: "
             "generating synthetic CTs for radiotherapy. Medical Physics 2025, doi:10.1002/mp.17981")
LICENCE = "CC BY-NC 4.0 (https://creativecommons.org/licenses/by-nc/4.0/)"


def convert_synthrad2025(
    input_dir: str | Path,
    dataset_id: int,
    name: str,
    link: bool = False,
    overwrite: bool = False,
    regions: Sequence[str] | None = None,
) -> Path:
    """Convert SynthRAD2025 Task 1 into ``$wldm_raw/DatasetXXX_Name`` (.mha); returns its folder."""
    output_folder(dataset_id, name, overwrite)  # fail fast, before scanning the inputs
    cases, case_regions = synthrad_cases(input_dir, REGIONS, regions, "Task1/AB/1ABA005/mr.mha")
    found = list(dict.fromkeys(case_regions.values()))
    log.info("SynthRAD2025 Task 1: %d case(s) in %s", len(cases), ", ".join(found))
    return build_dataset(
        cases, dataset_id, name, ".mha", link=link, overwrite=overwrite, inputs=[Path(input_dir)],
        description=f"SynthRAD2025 Task 1 (MR -> CT), regions: {', '.join(found)}",
        licence=LICENCE, reference=REFERENCE, source="SynthRAD2025 Task 1",
        regions=found, case_regions=case_regions,
    )
