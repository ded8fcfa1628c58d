"""Install the bundled example (one paired MR/CT porcine phantom) as a raw dataset."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import SimpleITK as sitk

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


DERIVED_NAME = "MRIDIRPhantomTwoSeq"
DERIVED_NOTE = ("channel 0001 is NOT a scan: it is derived from the T2 (square root of the intensities, Gaussian "
                "blur of 1.5 mm) to exercise multi-sequence training and missing sequences; it adds no information")


def derived_sequence(mr: sitk.Image) -> sitk.Image:
    """A stand-in second 'sequence' of ``mr``: another contrast (square root) and blur (1.5 mm), same grid, int16."""
    image = sitk.Sqrt(sitk.Maximum(sitk.Cast(mr, sitk.sitkFloat32), 0.0)) * 20.0
    return sitk.Cast(sitk.SmoothingRecursiveGaussian(image, 1.5), sitk.sitkInt16)


def install_example(dataset_id: int, overwrite: bool = False, link: bool = False,
                    derived_second_sequence: bool = False) -> Path:
    """Install the phantom as ``$wldm_raw/Dataset<ID>_MRIDIRPhantom`` (case ``phantom``); returns its folder.

    ``derived_second_sequence``: ``Dataset<ID>_MRIDIRPhantomTwoSeq`` with a second MR channel made by
    :func:`derived_sequence` (for trying the multi-sequence path; it is not a second scan).
    """
    mr, ct, readme = EXAMPLE_DIR / "mr_t2.nii.gz", EXAMPLE_DIR / "ct.nii.gz", EXAMPLE_DIR / "README.md"
    missing = [str(p) for p in (mr, ct, readme) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"bundled example data missing (broken install?): {', '.join(missing)}")
    meta = dict(description=DESCRIPTION, licence=LICENCE, reference=REFERENCE,
                source="TCIA MRI-DIR, doi:10.7937/K9/TCIA.2018.3f08iejt")
    if not derived_second_sequence:
        return build_dataset([SourceCase("phantom", [mr], ct)], dataset_id, EXAMPLE_NAME, ".nii.gz", link=link,
                             overwrite=overwrite, inputs=[EXAMPLE_DIR], extra_files={"README.md": readme}, **meta)
    with tempfile.TemporaryDirectory(prefix="wldm_example_") as tmp:
        second = Path(tmp) / "mr_t2_derived.nii.gz"
        sitk.WriteImage(derived_sequence(sitk.ReadImage(str(mr))), str(second), True)
        meta["description"] = f"{DESCRIPTION} {DERIVED_NOTE}"
        return build_dataset([SourceCase("phantom", [mr, second], ct)], dataset_id, DERIVED_NAME, ".nii.gz",
                             overwrite=overwrite, inputs=[EXAMPLE_DIR], extra_files={"README.md": readme},
                             channel_names={"0": "T2", "1": "T2_derived"}, **meta)
