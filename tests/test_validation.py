"""The raw-dataset validator reports every problem, naming case and file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import SimpleITK as sitk

from wldm_auto.cli.convert import main_validate
from wldm_auto.io.raw_dataset import write_dataset_json
from wldm_auto.io.raw_validation import DatasetInvalidError, ensure_valid, validate_raw_dataset

CASES = ("alpha", "beta")


def make_dataset(folder: Path, phantom, ending: str = ".nii.gz") -> Path:
    """A valid dataset: two cases with MR, CT (other grid) and mask, from the small phantom."""
    mr, ct = phantom
    for sub in ("imagesTr", "targetsTr", "masksTr"):
        (folder / sub).mkdir(parents=True)
    for case in CASES:
        sitk.WriteImage(mr, str(folder / "imagesTr" / f"{case}_0000{ending}"))
        sitk.WriteImage(ct, str(folder / "targetsTr" / f"{case}{ending}"))
        sitk.WriteImage(sitk.BinaryThreshold(mr, 500, 1e6, 1, 0), str(folder / "masksTr" / f"{case}{ending}"))
    write_dataset_json(folder, "Test", len(CASES), ending)
    return folder


def edit_json(folder: Path, **changes) -> None:
    path = folder / "dataset.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def shifted(image: sitk.Image, **geometry) -> sitk.Image:
    out = sitk.Image(image)
    if "spacing" in geometry:
        out.SetSpacing(geometry["spacing"])
    if "origin" in geometry:
        out.SetOrigin(geometry["origin"])
    return out


def break_dataset(kind: str, folder: Path, phantom) -> None:
    """Introduce one problem of ``kind`` into a valid dataset."""
    mr, ct = phantom
    tr = {sub: folder / sub for sub in ("imagesTr", "targetsTr", "masksTr")}
    actions = {
        "missing_json": lambda: (folder / "dataset.json").unlink(),
        "invalid_json": lambda: (folder / "dataset.json").write_text("{\"name\": "),
        "missing_key": lambda: edit_json(folder, target=None, channel_names=None),
        "unknown_file_ending": lambda: edit_json(folder, file_ending=".png"),
        "missing_target": lambda: (tr["targetsTr"] / "beta.nii.gz").unlink(),
        "orphan_target": lambda: sitk.WriteImage(ct, str(tr["targetsTr"] / "gamma.nii.gz")),
        "orphan_mask": lambda: sitk.WriteImage(mr, str(tr["masksTr"] / "gamma.nii.gz")),
        "unknown_ending_file": lambda: (tr["imagesTr"] / "beta_0000.png").write_bytes(b"x"),
        "other_ending_file": lambda: sitk.WriteImage(ct, str(tr["targetsTr"] / "beta.mha")),
        "bad_image_name": lambda: sitk.WriteImage(mr, str(tr["imagesTr"] / "beta.nii.gz")),
        "folder_in_images": lambda: (tr["imagesTr"] / "beta_0001").mkdir(),
        "missing_channel": lambda: edit_json(folder, channel_names={"0": "T1", "1": "T2"}),
        "extra_channel": lambda: sitk.WriteImage(mr, str(tr["imagesTr"] / "beta_0002.nii.gz")),
        "num_training": lambda: edit_json(folder, numTraining=5),
        "partial_masks": lambda: (tr["masksTr"] / "beta.nii.gz").unlink(),
        "not_3d": lambda: sitk.WriteImage(mr[:, :, 0], str(tr["imagesTr"] / "beta_0000.nii.gz")),
        "unreadable": lambda: (tr["targetsTr"] / "beta.nii.gz").write_bytes(b"not an image at all" * 10),
        "truncated": lambda: _cut_in_half(tr["imagesTr"] / "alpha_0000.nii.gz"),
        "channel_geometry": lambda: (
            edit_json(folder, channel_names={"0": "T1", "1": "T2"}),
            sitk.WriteImage(shifted(mr, spacing=(2.0, 2.0, 2.0)), str(tr["imagesTr"] / "alpha_0001.nii.gz")),
            sitk.WriteImage(mr, str(tr["imagesTr"] / "beta_0001.nii.gz")),
        ),
        "mask_geometry": lambda: sitk.WriteImage(shifted(mr, origin=(0.0, 0.0, 0.0)),
                                                 str(tr["masksTr"] / "beta.nii.gz")),
    }
    actions[kind]()


# kind -> words every one of which must appear in one single problem line
PROBLEMS = {
    "missing_json": ["dataset.json", "missing"],
    "invalid_json": ["dataset.json", "invalid JSON"],
    "missing_key": ["dataset.json", "missing key(s) channel_names, target"],
    "unknown_file_ending": ["dataset.json", "'.png'"],
    "missing_target": ["beta", "missing target", "targetsTr/beta.nii.gz"],
    "orphan_target": ["gamma", "orphan target", "targetsTr/gamma.nii.gz"],
    "orphan_mask": ["gamma", "orphan mask", "masksTr/gamma.nii.gz"],
    "unknown_ending_file": ["imagesTr/beta_0000.png", "unknown file ending"],
    "other_ending_file": ["targetsTr/beta.mha", "has ending .mha"],
    "bad_image_name": ["imagesTr/beta.nii.gz", "does not match"],
    "folder_in_images": ["imagesTr/beta_0001", "is a folder"],
    "missing_channel": ["case alpha", "alpha_0001.nii.gz", "2 channel(s)"],
    "extra_channel": ["case beta", "beta_0002.nii.gz", "extra channel"],
    "num_training": ["numTraining is 5", "2 case(s)"],
    "partial_masks": ["case beta", "missing mask", "masksTr/beta.nii.gz"],
    "not_3d": ["case beta", "imagesTr/beta_0000.nii.gz", "3D"],
    "unreadable": ["case beta", "targetsTr/beta.nii.gz", "cannot be read"],
    "truncated": ["case alpha", "imagesTr/alpha_0000.nii.gz", "truncated"],
    "channel_geometry": ["case alpha", "alpha_0001.nii.gz", "differs from channel 0", "spacing"],
    "mask_geometry": ["case beta", "masksTr/beta.nii.gz", "mask geometry differs", "origin"],
}


def _cut_in_half(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header survives; half the voxels do not


def test_valid_dataset_has_no_problems(tmp_path, small_phantom):
    folder = make_dataset(tmp_path / "Dataset001_Test", small_phantom)
    assert validate_raw_dataset(folder) == []
    assert ensure_valid(folder).case_names() == list(CASES)


@pytest.mark.parametrize("kind", sorted(PROBLEMS))
def test_each_problem_is_reported(tmp_path, small_phantom, kind):
    folder = make_dataset(tmp_path / "Dataset001_Test", small_phantom)
    break_dataset(kind, folder, small_phantom)
    problems = validate_raw_dataset(folder)
    assert problems, kind
    assert all("\n" not in p for p in problems)
    assert any(all(word in p for word in PROBLEMS[kind]) for p in problems), problems


def test_no_cases(tmp_path, small_phantom):
    folder = make_dataset(tmp_path / "Dataset001_Test", small_phantom)
    for sub in ("imagesTr", "targetsTr", "masksTr"):
        for path in (folder / sub).iterdir():
            path.unlink()
    edit_json(folder, numTraining=0)
    assert validate_raw_dataset(folder) == [f"{folder}: no training cases (imagesTr/CASE_0000.nii.gz files)"]


def test_several_problems_at_once(tmp_path, small_phantom):
    folder = make_dataset(tmp_path / "Dataset001_Test", small_phantom)
    for kind in ("missing_target", "orphan_mask", "num_training", "extra_channel", "mask_geometry"):
        break_dataset(kind, folder, small_phantom)
    problems = validate_raw_dataset(folder)
    for kind in ("missing_target", "orphan_mask", "num_training", "extra_channel", "mask_geometry"):
        assert any(all(word in p for word in PROBLEMS[kind]) for p in problems), kind
    with pytest.raises(DatasetInvalidError) as info:
        ensure_valid(folder)
    lines = str(info.value).splitlines()
    assert lines[0].endswith(f"{len(problems)} problem(s) in the raw dataset")
    assert len(lines) == len(problems) + 1
    assert info.value.problems == problems


def test_header_checks_can_be_skipped(tmp_path, small_phantom):
    folder = make_dataset(tmp_path / "Dataset001_Test", small_phantom)
    break_dataset("unreadable", folder, small_phantom)
    assert validate_raw_dataset(folder, check_images=False) == []
    assert validate_raw_dataset(folder)


def test_ct_may_have_any_geometry_and_mha_works(tmp_path, small_phantom):
    mr, ct = small_phantom
    folder = make_dataset(tmp_path / "Dataset001_Test", (mr, ct), ending=".mha")
    sitk.WriteImage(shifted(ct, spacing=(3.0, 3.0, 3.0)), str(folder / "targetsTr" / "alpha.mha"))
    assert validate_raw_dataset(folder) == []


def test_cli_validate(tmp_path, small_phantom, monkeypatch, capsys):
    monkeypatch.setenv("wldm_raw", str(tmp_path))
    folder = make_dataset(tmp_path / "Dataset001_Test", small_phantom)
    assert main_validate(["-d", "1"]) == 0
    assert "OK: 2 cases" in capsys.readouterr().out
    break_dataset("missing_target", folder, small_phantom)
    break_dataset("orphan_mask", folder, small_phantom)
    assert main_validate(["-d", "Dataset001_Test"]) == 1
    out = capsys.readouterr().out
    assert "2 problem(s)" in out and "beta" in out and "gamma" in out
    assert main_validate(["-d", "9"]) == 1
    assert capsys.readouterr().err.startswith("error: no dataset with id 009")


def test_files_checked_even_without_dataset_json(tmp_path, small_phantom):
    folder = make_dataset(tmp_path / "Dataset001_Test", small_phantom)
    break_dataset("missing_json", folder, small_phantom)
    break_dataset("orphan_target", folder, small_phantom)
    problems = validate_raw_dataset(folder)
    assert len(problems) == 2 and "dataset.json: missing" in problems[0] and "case gamma" in problems[1]
