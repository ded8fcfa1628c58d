"""Install the bundled example (one paired MR/CT porcine phantom) as a raw dataset."""
from __future__ import annotations

import logging
from pathlib import Path

from wldm_auto.dataset_conversion.common import SourceCase, build_dataset

log = logging.getLogger(__name__)

EXAMPLE_NAME = "MRIDIRPhantom"
EXAMPLE_DIR = Path(__file__).parent / "example_data" / "mri_dir_porcine_phantom"
LICENCE = "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/)"
REFERENCE = ("Ger RB, Yang J, Ding Y, et al. Accuracy of deformable image registration on magnetic resonance "
             "images in digital and physical phantoms. Medical Physics 2017/2018, doi:10.1002/mp.13090. "
             "Data: The Cancer Imaging Archive (TCIA), collection MRI-DIR, doi:10.7937/K9/TCIA.2018.3f08iejt, "
             "PatientID MRI-DIR-zzmeatphantom. We acknowledge The Cancer Imaging Archive as the repository of these data.")
DESCRIPTION = ("MRI-DIR porcine phantom: a block of pork with a long bone and gold fiducials in a container; "
               "3 T T2 spin-echo MR and 120 kV CT in HU, scanned on different days, NOT aligned.")


def install_example(dataset_id: int, overwrite: bool = False, link: bool = False) -> Path:
    """Install the phantom as ``$wldm_raw/Dataset<ID>_MRIDIRPhantom`` (case ``phantom``); returns its folder."""
    mr, ct, readme = EXAMPLE_DIR / "mr_t2.nii.gz", EXAMPLE_DIR / "ct.nii.gz", EXAMPLE_DIR / "README.md"
    missing = [str(p) for p in (mr, ct, readme) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"bundled example data missing (broken install?): {', '.join(missing)}")
    return build_dataset(
        [SourceCase("phantom", [mr], ct)], dataset_id, EXAMPLE_NAME, ".nii.gz", link=link, overwrite=overwrite,
        inputs=[EXAMPLE_DIR], extra_files={"README.md": readme},
        description=DESCRIPTION, licence=LICENCE, reference=REFERENCE,
        source="TCIA MRI-DIR, doi:10.7937/K9/TCIA.2018.3f08iejt",
    )
