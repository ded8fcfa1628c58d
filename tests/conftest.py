"""Fixtures shared by the test files."""
from __future__ import annotations

from pathlib import Path

import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
PHANTOM_DIR = REPO / "wldm_auto" / "dataset_conversion" / "example_data" / "mri_dir_porcine_phantom"
TEST_DATA = REPO / "tests" / "data"


def crop_center(image: sitk.Image, size: tuple[int, int, int]) -> sitk.Image:
    """The central ``size`` (x, y, z) block of ``image``, physical geometry kept."""
    index = [(n - s) // 2 for n, s in zip(image.GetSize(), size)]
    return sitk.RegionOfInterest(image, list(size), index)


@pytest.fixture(scope="session")
def small_phantom() -> tuple[sitk.Image, sitk.Image]:
    """(MR, CT) of the bundled porcine phantom, each cropped to its central 40x40x20 voxels (int16)."""
    mr = sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz"))
    ct = sitk.ReadImage(str(PHANTOM_DIR / "ct.nii.gz"))
    return crop_center(mr, (40, 40, 20)), crop_center(ct, (40, 40, 20))


@pytest.fixture
def raw_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder set as ``$wldm_raw`` for this test."""
    folder = tmp_path / "raw"
    folder.mkdir()
    monkeypatch.setenv("wldm_raw", str(folder))
    return folder
