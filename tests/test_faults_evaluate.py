"""Bad inputs to wldm_evaluate and wldm_calibrate_std found by a sweep (2026-12-07): each refused or warned about
in words, never a crash, a silently wrong score or an earlier run mixed into a new one."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from wldm_auto.cli.calibrate import main as calibrate_main
from wldm_auto.cli.evaluate import main as evaluate_main
from wldm_auto.io.files import hash_file
from wldm_auto.io.images import ImageReadError, ImageWriteError, itk_path, read_image, write_image


def one_error(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def folders(tmp_path: Path, small_phantom) -> tuple[Path, Path, Path]:
    """ct/, sct/ (CT + 10 HU) and mr/ with cases a and b, on the phantom's 40 x 40 x 20 crop."""
    mr, ct = small_phantom
    dirs = tuple(tmp_path / name for name in ("ct", "sct", "mr"))
    for folder in dirs:
        folder.mkdir()
    for case in ("a", "b"):
        sitk.WriteImage(ct, str(dirs[0] / f"{case}.nii.gz"))
        sitk.WriteImage(sitk.Cast(ct + 10, sitk.sitkInt16), str(dirs[1] / f"{case}.nii.gz"))
        sitk.WriteImage(mr, str(dirs[2] / f"{case}.nii.gz"))
    return dirs


def test_a_name_that_is_not_utf8_is_refused_in_words_not_by_an_abort(folders, tmp_path, capsys):
    ct_dir, sct_dir, _ = folders
    odd = "M\udcfcller"  # the byte 0xFC (Latin-1 u-umlaut) as Python keeps an undecodable name
    for folder in (ct_dir, sct_dir):
        os.rename(folder / "b.nii.gz", folder / f"{odd}.nii.gz")
    with pytest.raises(ImageReadError, match="not UTF-8"):
        itk_path(ct_dir / f"{odd}.nii.gz")
    with pytest.raises(ImageReadError, match=r"M\\xfcller.nii.gz: the name holds bytes that are not UTF-8"):
        read_image(ct_dir / f"{odd}.nii.gz")
    with pytest.raises(ImageWriteError, match="not UTF-8"):
        write_image(read_image(ct_dir / "a.nii.gz"), tmp_path / f"{odd}_out.nii.gz")
    assert not list(tmp_path.glob("*_out*"))
    # evaluation and calibration name the file before anything is written (SimpleITK aborted the process before)
    out = tmp_path / "report"
    assert evaluate_main(["-r", str(ct_dir), "-p", str(sct_dir), "-o", str(out), "--no-figures"]) == 1
    assert r"M\xfcller.nii.gz: the name holds bytes that are not UTF-8" in one_error(capsys.readouterr().err)
    assert not (out / "metrics.csv").exists()
    model = tmp_path / "model"
    (model / "fold_0").mkdir(parents=True)
    assert calibrate_main(["-m", str(model), "-ct", str(ct_dir), "-s", str(sct_dir)]) == 1
    assert "not UTF-8" in one_error(capsys.readouterr().err)
    assert not (model / "std_scale.json").exists()


def test_an_mr_that_cannot_be_drawn_costs_the_figure_its_mr_not_the_case(folders, tmp_path, caplog):
    ct_dir, sct_dir, mr_dir = folders
    far = read_image(mr_dir / "a.nii.gz")
    far.SetOrigin([1000.0, 1000.0, 1000.0])
    sitk.WriteImage(far, str(mr_dir / "a.nii.gz"))
    (mr_dir / "b.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "report"
    with caplog.at_level(logging.WARNING):
        assert evaluate_main(["-r", str(ct_dir), "-p", str(sct_dir), "--mr", str(mr_dir), "-o", str(out)]) == 0
    assert (out / "metrics.csv").read_text().count("\n") == 3  # header + a + b
    assert (out / "a.png").is_file() and (out / "b.png").is_file()
    warnings = [r.getMessage() for r in caplog.records if "figure without the MR" in r.getMessage()]
    assert len(warnings) == 2 and "does not overlap the CT at all" in warnings[0]


def test_evaluate_keeps_an_earlier_run_unless_overwrite_and_then_drops_its_figures(folders, tmp_path, capsys):
    ct_dir, sct_dir, _ = folders
    out = tmp_path / "report"
    assert evaluate_main(["-r", str(ct_dir), "-p", str(sct_dir), "-o", str(out)]) == 0
    first = {name: hash_file(out / name) for name in ("metrics.csv", "summary.json", "a.png", "b.png")}
    (sct_dir / "b.nii.gz").unlink()
    args = ["-r", str(ct_dir), "-p", str(sct_dir), "-o", str(out), "--allow-missing"]
    assert evaluate_main(args) == 1
    assert "holds an earlier evaluation (metrics.csv, summary.json)" in one_error(capsys.readouterr().err)
    assert {name: hash_file(out / name) for name in first} == first  # nothing touched
    assert evaluate_main([*args, "--overwrite"]) == 0
    assert (out / "a.png").is_file() and not (out / "b.png").exists()  # b is not in this run: its figure went
    assert [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()] == ["case", "a"]


def test_evaluate_refuses_one_folder_in_two_roles(folders, tmp_path, capsys):
    ct_dir, sct_dir, _ = folders
    for args, words in ((["-r", str(ct_dir), "-p", str(ct_dir)], "both the CT and the sCT folder"),
                        (["-r", str(ct_dir), "-p", str(sct_dir), "-m", str(ct_dir)], "both the CT and the mask folder")):
        assert evaluate_main([*args, "-o", str(tmp_path / "out"), "--no-figures"]) == 1
        assert words in one_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_resampled_sct_and_std_that_miss_part_of_the_mask_are_named(folders, tmp_path, caplog):
    ct_dir, sct_dir, _ = folders
    ct = read_image(ct_dir / "a.nii.gz")
    part = sitk.Cast(ct + 10, sitk.sitkInt16)[:, :30, :]  # 10 of 40 rows missing
    sitk.WriteImage(part, str(sct_dir / "a.nii.gz"))
    std = sitk.Image(part.GetSize(), sitk.sitkFloat32) + 20.0
    std.CopyInformation(part)
    sitk.WriteImage(std, str(sct_dir / "a_std.nii.gz"))
    mask = sitk.Image(ct.GetSize(), sitk.sitkUInt8) + 1  # the whole grid: 25 % of it outside the sCT
    mask.CopyInformation(ct)
    mask_dir = tmp_path / "mask"
    mask_dir.mkdir()
    for case in ("a", "b"):
        sitk.WriteImage(mask, str(mask_dir / f"{case}.nii.gz"))
    with caplog.at_level(logging.WARNING):
        assert evaluate_main(["-r", str(ct_dir), "-p", str(sct_dir), "-m", str(mask_dir), "-o", str(tmp_path / "o"),
                              "--resample", "--no-figures"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    total = 40 * 40 * 20
    for what, value in (("sCT", -1024), ("std map", 0)):
        assert f"case a: {total // 4} of the {total} voxels inside the mask (25.0 %) lie outside the {what}'s " \
               f"extent and are scored as {value}" in messages
    assert not any("case b" in m and "outside" in m for m in messages)  # b's sCT is on the CT's grid


def test_a_ct_that_is_not_in_hu_is_warned_about(folders, tmp_path, caplog):
    ct_dir, sct_dir, _ = folders
    raw = sitk.Cast(read_image(ct_dir / "a.nii.gz") + 1024, sitk.sitkUInt16)  # stored values, rescale lost
    sitk.WriteImage(raw, str(ct_dir / "a.nii.gz"))
    with caplog.at_level(logging.WARNING):
        assert evaluate_main(["-r", str(ct_dir), "-p", str(sct_dir), "-o", str(tmp_path / "o"), "--no-figures"]) == 0
    flagged = [r.getMessage() for r in caplog.records if "does not look like HU" in r.getMessage()]
    assert len(flagged) == 1 and flagged[0].startswith("case a:")  # b, in HU, is not flagged


def test_a_failed_run_says_why_in_its_log_file(folders, tmp_path, capsys):
    ct_dir, sct_dir, _ = folders
    moved = read_image(sct_dir / "a.nii.gz")
    moved.SetOrigin([o + 50.0 for o in moved.GetOrigin()])
    sitk.WriteImage(moved, str(sct_dir / "a.nii.gz"))
    out = tmp_path / "report"
    assert evaluate_main(["-r", str(ct_dir), "-p", str(sct_dir), "-o", str(out), "--no-figures"]) == 1
    error = one_error(capsys.readouterr().err)
    logs = list((out / "logs").glob("evaluate_*.log"))
    assert len(logs) == 1 and error in logs[0].read_text()


def test_calibrate_refuses_a_folder_that_is_no_model_before_writing_into_it(folders, capsys):
    ct_dir, sct_dir, _ = folders
    before = sorted(p.name for p in ct_dir.iterdir())
    assert calibrate_main(["-m", str(ct_dir), "-ct", str(ct_dir), "-s", str(sct_dir)]) == 1
    assert "not a model folder (it holds no fold_* folder" in one_error(capsys.readouterr().err)
    assert sorted(p.name for p in ct_dir.iterdir()) == before  # no logs/ among the CTs
    assert np.array_equal(sitk.GetArrayFromImage(read_image(ct_dir / "a.nii.gz")),
                          sitk.GetArrayFromImage(read_image(sct_dir / "a.nii.gz")) - 10)
