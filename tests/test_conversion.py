"""Converters: SynthRAD2023/2025, paired folders (DICOM, .mha), bundled example, CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import PHANTOM_DIR, TEST_DATA
from wldm_auto.cli.convert import main_example, main_paired, main_synthrad2023, main_synthrad2025, main_validate
from wldm_auto.dataset_conversion import common
from wldm_auto.dataset_conversion.example import install_example
from wldm_auto.dataset_conversion.paired import convert_paired
from wldm_auto.dataset_conversion.synthrad2023 import convert_synthrad2023
from wldm_auto.dataset_conversion.synthrad2025 import convert_synthrad2025
from wldm_auto.io.files import hash_file
from wldm_auto.io.geometry import Geometry
from wldm_auto.io.images import read_image
from wldm_auto.io.raw_validation import validate_raw_dataset

DICOM_DIR = TEST_DATA / "totalsegmentator_examples" / "example_ct_dicom"


def variant(image: sitk.Image, k: int) -> sitk.Image:
    """A copy of ``image`` with values and origin shifted by ``k`` (so cases are distinguishable)."""
    out = sitk.Cast(image + 7 * k, image.GetPixelID())
    out.SetOrigin([o + 1.5 * k for o in image.GetOrigin()])
    return out


def mask_of(mr: sitk.Image) -> sitk.Image:
    return sitk.BinaryThreshold(mr, 500, 1e6, 1, 0)


def write_patient(folder: Path, mr: sitk.Image, ct: sitk.Image, ending: str) -> None:
    folder.mkdir(parents=True)
    sitk.WriteImage(mr, str(folder / f"mr{ending}"), True)
    sitk.WriteImage(ct, str(folder / f"ct{ending}"), True)
    sitk.WriteImage(mask_of(mr), str(folder / f"mask{ending}"), True)


def make_synthrad(root: Path, phantom, patients: dict[str, list[str]], ending: str) -> dict[str, Path]:
    """root/Task1/<region>/<patient>/{mr,ct,mask}<ending>, plus an overview folder and a loose file."""
    mr, ct = phantom
    folders = {}
    for region, names in patients.items():
        for k, name in enumerate(names):
            folders[name] = root / "Task1" / region / name
            write_patient(folders[name], variant(mr, k), variant(ct, k + 3), ending)
        (root / "Task1" / region / "overview").mkdir()
        (root / "Task1" / region / "overview" / "table.csv").write_text("id\n")
    (root / "Task1" / "README.txt").write_text("not a region\n")
    return folders


def assert_same_image(converted: Path, source: Path) -> None:
    a, b = read_image(converted), read_image(source)
    assert Geometry.of(a) == Geometry.of(b), converted
    assert a.GetPixelID() == b.GetPixelID(), converted
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def files_of(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


SYNTHRAD = [
    (convert_synthrad2023, ".nii.gz", {"brain": ["1BA001", "1BA002"], "pelvis": ["1PA001", "1PA002"]},
     "10.1002/mp.16529"),
    (convert_synthrad2025, ".mha", {"AB": ["1ABA005", "1ABA006"], "TH": ["1THA001", "1THB002"]},
     "10.1002/mp.17981"),
]


@pytest.mark.parametrize("convert, ending, patients, doi", SYNTHRAD, ids=["2023", "2025"])
def test_synthrad_layout_values_and_metadata(tmp_path, raw_dir, small_phantom, convert, ending, patients, doi):
    sources = make_synthrad(tmp_path / "in", small_phantom, patients, ending)
    before = hash_file(tmp_path / "in")
    out = convert(tmp_path / "in", 3, "Synth")
    assert out == raw_dir / "Dataset003_Synth"
    cases = sorted(sources)
    expected = {"dataset.json"} | {f"imagesTr/{c}_0000{ending}" for c in cases} \
        | {f"targetsTr/{c}{ending}" for c in cases} | {f"masksTr/{c}{ending}" for c in cases}
    assert files_of(out) == expected
    assert [p.name for p in raw_dir.iterdir()] == ["Dataset003_Synth"]  # no temporary folder left
    for case, folder in sources.items():
        assert_same_image(out / "imagesTr" / f"{case}_0000{ending}", folder / f"mr{ending}")
        assert_same_image(out / "targetsTr" / f"{case}{ending}", folder / f"ct{ending}")
        assert_same_image(out / "masksTr" / f"{case}{ending}", folder / f"mask{ending}")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["file_ending"] == ending and meta["numTraining"] == 4
    assert meta["channel_names"] == {"0": "MR"} and meta["target"] == "CT"
    assert meta["regions"] == list(patients)
    assert meta["case_regions"] == {c: r for r, names in patients.items() for c in names}
    assert doi in meta["reference"] and "Thummerer" in meta["reference"]
    assert "CC BY-NC 4.0" in meta["licence"]
    assert validate_raw_dataset(out) == []
    assert hash_file(tmp_path / "in") == before


@pytest.mark.parametrize("convert, ending, patients, doi", SYNTHRAD, ids=["2023", "2025"])
def test_synthrad_region_choice_and_region_folder_input(tmp_path, raw_dir, small_phantom, convert, ending, patients, doi):
    make_synthrad(tmp_path / "in", small_phantom, patients, ending)
    first, second = list(patients)
    out = convert(tmp_path / "in", 1, "Second", regions=[second.upper()])
    assert sorted(p.name for p in (out / "targetsTr").iterdir()) == [f"{c}{ending}" for c in patients[second]]
    out = convert(tmp_path / "in" / "Task1" / first, 2, "First")
    assert json.loads((out / "dataset.json").read_text())["regions"] == [first]
    assert len(list((out / "imagesTr").iterdir())) == 2
    with pytest.raises(ValueError, match="unknown region"):
        convert(tmp_path / "in", 4, "X", regions=["knee"])


def test_synthrad_missing_images_listed_together(tmp_path, raw_dir, small_phantom):
    folders = make_synthrad(tmp_path / "in", small_phantom, {"brain": ["1BA001", "1BA002"], "pelvis": ["1PA001"]}, ".nii.gz")
    (folders["1BA002"] / "ct.nii.gz").unlink()
    (folders["1PA001"] / "mr.nii.gz").unlink()
    with pytest.raises(ValueError) as info:
        convert_synthrad2023(tmp_path / "in", 1, "Broken")
    assert "1BA002 (no ct)" in str(info.value) and "1PA001 (no mr)" in str(info.value)
    assert list(raw_dir.iterdir()) == []


def test_paired_dicom_and_mha_are_converted_exactly(tmp_path, raw_dir, small_phantom):
    mr, ct = small_phantom
    mr_dir, ct_dir = tmp_path / "mr", tmp_path / "ct"
    mr_dir.mkdir(), ct_dir.mkdir()
    sitk.WriteImage(mr, str(mr_dir / "caseA.nii.gz"), True)
    sitk.WriteImage(ct, str(ct_dir / "caseA.nii.gz"), True)
    sitk.WriteImage(variant(mr, 1), str(mr_dir / "caseB.mha"), True)
    sitk.WriteImage(variant(ct, 1), str(ct_dir / "caseB.mha"), True)
    shutil.copy(TEST_DATA / "totalsegmentator_examples" / "example_mr_sm.nii.gz", mr_dir / "caseD.nii.gz")
    shutil.copytree(DICOM_DIR, ct_dir / "caseD")
    (mr_dir / "notes.txt").write_text("skipped\n")
    before = [hash_file(mr_dir), hash_file(ct_dir)]

    out = convert_paired(mr_dir, ct_dir, 7, "Paired")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["file_ending"] == ".nii.gz" and meta["numTraining"] == 3  # mixed MR endings -> .nii.gz
    assert files_of(out) == {"dataset.json"} | {f"imagesTr/case{c}_0000.nii.gz" for c in "ABD"} \
        | {f"targetsTr/case{c}.nii.gz" for c in "ABD"}
    assert_same_image(out / "imagesTr" / "caseB_0000.nii.gz", mr_dir / "caseB.mha")
    assert_same_image(out / "targetsTr" / "caseB.nii.gz", ct_dir / "caseB.mha")
    assert_same_image(out / "targetsTr" / "caseD.nii.gz", ct_dir / "caseD")
    assert_same_image(out / "targetsTr" / "caseA.nii.gz", ct_dir / "caseA.nii.gz")
    assert [hash_file(mr_dir), hash_file(ct_dir)] == before


def test_paired_ending_follows_mr_and_masks(tmp_path, raw_dir, small_phantom):
    mr, ct = small_phantom
    for folder in ("mr", "ct", "mask"):
        (tmp_path / folder).mkdir()
    for k in range(2):
        sitk.WriteImage(variant(mr, k), str(tmp_path / "mr" / f"p{k}.mha"))
        sitk.WriteImage(variant(ct, k), str(tmp_path / "ct" / f"p{k}.nii.gz"))
        sitk.WriteImage(mask_of(variant(mr, k)), str(tmp_path / "mask" / f"p{k}.nrrd"))
    out = convert_paired(tmp_path / "mr", tmp_path / "ct", 8, "Mha", mask_dir=tmp_path / "mask")
    assert json.loads((out / "dataset.json").read_text())["file_ending"] == ".mha"
    assert files_of(out) == {"dataset.json", "imagesTr/p0_0000.mha", "imagesTr/p1_0000.mha", "targetsTr/p0.mha",
                             "targetsTr/p1.mha", "masksTr/p0.mha", "masksTr/p1.mha"}
    assert_same_image(out / "masksTr" / "p1.mha", tmp_path / "mask" / "p1.nrrd")
    out = convert_paired(tmp_path / "mr", tmp_path / "ct", 9, "Nrrd", file_ending="nrrd")
    assert (out / "targetsTr" / "p0.nrrd").is_file()


def test_paired_unmatched_names(tmp_path, raw_dir, small_phantom):
    mr, ct = small_phantom
    for folder in ("mr", "ct"):
        (tmp_path / folder).mkdir()
    for name in ("a", "b", "only_mr"):
        sitk.WriteImage(mr, str(tmp_path / "mr" / f"{name}.nii.gz"))
    for name in ("a", "b", "only_ct"):
        sitk.WriteImage(ct, str(tmp_path / "ct" / f"{name}.nii.gz"))
    with pytest.raises(ValueError) as info:
        convert_paired(tmp_path / "mr", tmp_path / "ct", 1, "U")
    assert "only_mr (no CT)" in str(info.value) and "only_ct (no MR)" in str(info.value)
    out = convert_paired(tmp_path / "mr", tmp_path / "ct", 1, "U", allow_unmatched=True)
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2


@pytest.fixture
def paired_dirs(tmp_path, small_phantom) -> tuple[Path, Path]:
    mr, ct = small_phantom
    for folder in ("mr", "ct"):
        (tmp_path / folder).mkdir()
    sitk.WriteImage(mr, str(tmp_path / "mr" / "c1.nii.gz"))
    sitk.WriteImage(ct, str(tmp_path / "ct" / "c1.nii.gz"))
    sitk.WriteImage(variant(mr, 2), str(tmp_path / "mr" / "c2.nii.gz"))
    sitk.WriteImage(variant(ct, 2), str(tmp_path / "ct" / "c2.mha"))
    return tmp_path / "mr", tmp_path / "ct"


def test_refuse_existing_id_and_overwrite(raw_dir, paired_dirs):
    mr_dir, ct_dir = paired_dirs
    first = convert_paired(mr_dir, ct_dir, 4, "First")
    with pytest.raises(FileExistsError, match="already exists"):
        convert_paired(mr_dir, ct_dir, 4, "Other")  # same id, other name
    (first / "marker.txt").write_text("old\n")
    second = convert_paired(mr_dir, ct_dir, 4, "Other", overwrite=True)
    assert sorted(p.name for p in raw_dir.iterdir()) == ["Dataset004_Other"]
    assert not (second / "marker.txt").exists()
    foreign = raw_dir / "Dataset005_Thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious\n")
    with pytest.raises(FileExistsError, match="does not look like a raw dataset"):
        convert_paired(mr_dir, ct_dir, 5, "Thesis", overwrite=True)
    assert (foreign / "chapter1.tex").read_text() == "precious\n"


def test_interrupted_conversion_leaves_no_dataset(raw_dir, paired_dirs, monkeypatch):
    calls = []

    def failing(source, destination, link=False):
        calls.append(source)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return place(source, destination, link)

    place = common.place_image
    monkeypatch.setattr(common, "place_image", failing)
    with pytest.raises(KeyboardInterrupt):
        convert_paired(*paired_dirs, 6, "Broken")
    assert list(raw_dir.iterdir()) == []


def test_link_makes_symlinks(raw_dir, paired_dirs):
    mr_dir, ct_dir = paired_dirs
    out = convert_paired(mr_dir, ct_dir, 2, "Linked", link=True)
    image = out / "imagesTr" / "c1_0000.nii.gz"
    assert image.is_symlink() and image.resolve() == (mr_dir / "c1.nii.gz").resolve()
    assert (out / "targetsTr" / "c1.nii.gz").is_symlink()
    converted = out / "targetsTr" / "c2.nii.gz"  # from .mha: cannot be a link
    assert converted.is_file() and not converted.is_symlink()
    assert_same_image(converted, ct_dir / "c2.mha")


def test_overwrite_refuses_a_dataset_another_one_links_into(raw_dir, paired_dirs):
    """--overwrite of dataset A while dataset B holds --link symlinks into A would leave B's links dangling:
    refused, A and B kept as they were; once B no longer links into A, A can be replaced."""
    mr_dir, ct_dir = paired_dirs
    first = convert_paired(mr_dir, ct_dir, 3, "First")
    case = common.SourceCase("c1", [first / "imagesTr" / "c1_0000.nii.gz"], first / "targetsTr" / "c1.nii.gz")
    second = common.build_dataset([case], 7, "Linked", link=True)
    link = second / "imagesTr" / "c1_0000.nii.gz"
    assert link.is_symlink() and link.resolve().parent == first.resolve() / "imagesTr"
    before = hash_file(first / "imagesTr" / "c1_0000.nii.gz")
    with pytest.raises(ValueError, match="another dataset links into it.*c1_0000"):
        convert_paired(mr_dir, ct_dir, 3, "First", overwrite=True)
    assert hash_file(link) == before and hash_file(first / "imagesTr" / "c1_0000.nii.gz") == before
    common.build_dataset([case], 7, "Linked", overwrite=True)  # copies instead of links
    assert not (second / "imagesTr" / "c1_0000.nii.gz").is_symlink()
    assert convert_paired(mr_dir, ct_dir, 3, "First", overwrite=True) == first


def test_install_example(raw_dir):
    out = install_example(12)
    assert out == raw_dir / "Dataset012_MRIDIRPhantom"
    assert files_of(out) == {"dataset.json", "README.md", "imagesTr/phantom_0000.nii.gz", "targetsTr/phantom.nii.gz"}
    assert hash_file(out / "imagesTr" / "phantom_0000.nii.gz") == hash_file(PHANTOM_DIR / "mr_t2.nii.gz")
    assert hash_file(out / "targetsTr" / "phantom.nii.gz") == hash_file(PHANTOM_DIR / "ct.nii.gz")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["name"] == "MRIDIRPhantom" and meta["numTraining"] == 1
    assert "CC BY 4.0" in meta["licence"]
    assert "doi:10.1002/mp.13090" in meta["reference"] and "10.7937/K9/TCIA.2018.3f08iejt" in meta["reference"]
    assert validate_raw_dataset(out) == []
    with pytest.raises(FileExistsError):
        install_example(12)
    assert install_example(12, overwrite=True, link=True) == out
    assert (out / "imagesTr" / "phantom_0000.nii.gz").is_symlink()


# ---------------------------------------------------------------- CLI


def test_cli_missing_wldm_raw(paired_dirs, monkeypatch, capsys):
    monkeypatch.delenv("wldm_raw", raising=False)
    mr_dir, ct_dir = paired_dirs
    assert main_paired(["-mr", str(mr_dir), "-ct", str(ct_dir), "-d", "1", "-n", "X"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: environment variable wldm_raw is not set")


def test_cli_existing_dataset_and_overwrite(raw_dir, paired_dirs, capsys):
    mr_dir, ct_dir = paired_dirs
    args = ["-mr", str(mr_dir), "-ct", str(ct_dir), "-d", "3", "-n", "Cli"]
    assert main_paired(args) == 0
    assert f"dataset written to {raw_dir / 'Dataset003_Cli'}" in capsys.readouterr().out
    assert main_paired(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: dataset id 003 already exists")
    assert main_paired(args + ["--overwrite"]) == 0
    assert main_validate(["-d", "3"]) == 0
    assert "OK: 2 cases" in capsys.readouterr().out


def test_cli_synthrad_and_example(tmp_path, raw_dir, small_phantom, capsys):
    make_synthrad(tmp_path / "in23", small_phantom, {"brain": ["1BA001"], "pelvis": ["1PA001"]}, ".nii.gz")
    make_synthrad(tmp_path / "in25", small_phantom, {"AB": ["1ABA001"], "HN": ["1HNA001"]}, ".mha")
    assert main_synthrad2023(["-i", str(tmp_path / "in23"), "-d", "1", "-n", "S23", "--regions", "brain"]) == 0
    assert main_synthrad2025(["-i", str(tmp_path / "in25"), "-d", "2", "-n", "S25", "--link"]) == 0
    assert main_example(["-d", "3", "--link"]) == 0
    assert sorted(p.name for p in raw_dir.iterdir()) == ["Dataset001_S23", "Dataset002_S25", "Dataset003_MRIDIRPhantom"]
    assert (raw_dir / "Dataset002_S25" / "imagesTr" / "1HNA001_0000.mha").is_symlink()
    capsys.readouterr()
    assert main_synthrad2023(["-i", str(tmp_path / "nowhere"), "-d", "4", "-n", "X"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere: not a folder" in err[0]


@pytest.mark.parametrize("main, words", [(main_paired, "DICOM"), (main_synthrad2023, "brain"),
                                         (main_synthrad2025, "1ABA005"), (main_example, "phantom"),
                                         (main_validate, "imagesTr")])
def test_cli_help(main, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(["-h"])
    assert info.value.code == 0 and words in capsys.readouterr().out
