"""Fault matrix for conversion, planning and preprocessing (issue 16: items 6, 7, 8, 10, 12).

One test per fault: the bad input, the expected one-line error, the inputs
unchanged (by hash), and the state afterwards.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

from conftest import REPO, PreprocessedSmall
from wldm_auto.cli.convert import main_paired
from wldm_auto.cli.plan_and_preprocess import main as plan_main
from wldm_auto.dataset_conversion.paired import convert_paired
from wldm_auto.io.files import hash_file
from wldm_auto.io.raw_dataset import RawDataset
from wldm_auto.planners.fingerprint import hash_case
from wldm_auto.planners.schema import Plans
from wldm_auto.preprocessing import pipeline, preprocessor

CONFIG = "3d_wldm"
WAIT = 180.0  # upper bound for a subprocess to reach the state a test waits for (loaded CI machines)


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# planning: options are checked before anything is moved; plans.json is only ever replaced by a complete plan


@pytest.fixture
def planned(preprocessed_small: PreprocessedSmall, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A private copy of the small preprocessed dataset (valid plans.json); env vars point at it."""
    pre = tmp_path / "pre"
    shutil.copytree(preprocessed_small.preprocessed, pre)
    monkeypatch.setenv("wldm_raw", str(preprocessed_small.raw))
    monkeypatch.setenv("wldm_preprocessed", str(pre))
    folder = pre / preprocessed_small.dataset
    return {"dataset": preprocessed_small.dataset, "raw": preprocessed_small.raw / preprocessed_small.dataset,
            "folder": folder, "raw_hash": hash_file(preprocessed_small.raw / preprocessed_small.dataset),
            "pre_hash": hash_file(folder), "plans_hash": hash_file(folder / "plans.json")}


BAD_OPTIONS = {
    "spacing_zero": (["--spacing", "0"], "--spacing"),
    "spacing_nan": (["--spacing", "nan"], "--spacing"),
    "spacing_inf": (["--spacing", "inf"], "--spacing"),
    "spacing_negative": (["--spacing", "4", "-4", "4"], "--spacing"),
    "spacing_two_values": (["--spacing", "4", "4"], "--spacing"),
    "clean_spacing_zero": (["--clean", "--spacing", "0"], "--spacing"),
    "gpu_memory_zero": (["--spacing", "4", "--gpu-memory-gb", "0"], "--gpu-memory-gb"),
    "gpu_memory_nan": (["--spacing", "4", "--gpu-memory-gb", "nan"], "--gpu-memory-gb"),
    "gpu_memory_inf": (["--spacing", "4", "--gpu-memory-gb", "inf"], "--gpu-memory-gb"),
    "processes_zero": (["--spacing", "4", "-np", "0"], "-np"),
    "processes_negative": (["--spacing", "4", "-np", "-2"], "-np"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_numeric_option_is_refused_before_anything_moves(planned, capsys, case):
    args, option = BAD_OPTIONS[case]
    code = plan_main(["-d", planned["dataset"], "--no-registration", *args])
    line = one_line_error(capsys.readouterr().err)
    assert code == 1
    assert option in line
    assert hash_file(planned["raw"]) == planned["raw_hash"]
    # nothing moved, backed up, logged or replaced: the valid plan still trains
    assert hash_file(planned["folder"]) == planned["pre_hash"]
    assert not list(planned["folder"].glob("*.bak"))
    assert Plans.load(planned["folder"] / "plans.json").configuration(CONFIG).spacing == [4.0, 4.0, 4.0]


@pytest.mark.parametrize("kwargs", [{"spacing": [float("inf")]}, {"spacing": [float("nan"), 4.0, 4.0]},
                                    {"spacing": [0.0]}, {"gpu_memory_gb": float("inf")}, {"num_processes": 0}],
                         ids=["spacing_inf", "spacing_nan", "spacing_zero", "gpu_memory_inf", "processes_zero"])
def test_api_checks_options_first(planned, kwargs):
    with pytest.raises(ValueError) as info:
        pipeline.plan_and_preprocess(planned["dataset"], registration=False, **{"spacing": [4.0], **kwargs})
    assert "\n" not in str(info.value)
    assert hash_file(planned["folder"]) == planned["pre_hash"]
    assert hash_file(planned["raw"]) == planned["raw_hash"]


@pytest.mark.parametrize("clean", [False, True], ids=["replan", "clean"])
def test_failed_planning_keeps_the_previous_plan(planned, monkeypatch, clean):
    def broken(*args, **kwargs):
        raise ValueError("planner broke")

    monkeypatch.setattr(pipeline, "plan_dataset", broken)
    with pytest.raises(ValueError, match="planner broke"):
        pipeline.plan_and_preprocess(planned["dataset"], registration=False, spacing=[5.0], clean=clean)
    assert hash_file(planned["folder"] / "plans.json") == planned["plans_hash"]
    assert not list(planned["folder"].glob("*.bak"))  # a .bak only once a new plan is complete
    assert hash_file(planned["raw"]) == planned["raw_hash"]


# ---------------------------------------------------------------------------------------------------------------
# preprocessing: a case interrupted while rewriting its arrays is not finished under its old key


def test_case_interrupted_while_rewriting_is_not_finished(planned, monkeypatch):
    output = planned["folder"] / "wldmPlans_3d_wldm"
    dataset = RawDataset.load(planned["raw"])
    case = next(c for c in dataset.cases("Tr") if c.name == "caseA")
    hashes = hash_case(case)
    plans = Plans.load(planned["folder"] / "plans.json")
    old_key = preprocessor.case_key(hashes, plans, CONFIG)
    assert preprocessor.is_finished(output, "caseA", old_key)
    plans.preprocessing.crop_margin_mm += 10.0  # new settings: the arrays get rewritten
    calls = []
    real_save = preprocessor.save_npy

    def killed_after_one_array(array, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C / kill between two array files
        real_save(array, path)

    monkeypatch.setattr(preprocessor, "save_npy", killed_after_one_array)
    with pytest.raises(KeyboardInterrupt):
        preprocessor.preprocess_case(case, hashes, plans, CONFIG, output, planned["folder"] / "registration")
    # caseA_mr.npy now holds the new settings' array: the old JSON must not vouch for it
    assert not preprocessor.is_finished(output, "caseA", old_key)
    assert hash_file(planned["raw"]) == planned["raw_hash"]


# ---------------------------------------------------------------------------------------------------------------
# worker processes (-np 2): kill -9, Ctrl-C, log lines. A driver script slows every case down inside the workers.

DRIVER = '''
import logging, os, signal, sys, time
from pathlib import Path
from wldm_auto.preprocessing import preprocessor

# a test run started in the background (`cmd &`, nohup) hands its children SIGINT ignored, as shells do
# for background jobs, and Python then keeps ignoring it; a terminal's foreground job, which these tests
# play, receives Ctrl-C: restore Python's handler
signal.signal(signal.SIGINT, signal.default_int_handler)

_real = preprocessor.preprocess_case


def slow_case(case, *args):
    (Path(os.environ["FAKE_MARKERS"]) / f"{case.name}.{os.getpid()}").write_text("")
    logging.getLogger("wldm_auto.preprocessing.preprocessor").info("fake worker %d starts case %s",
                                                                   os.getpid(), case.name)
    time.sleep(float(os.environ["FAKE_CASE_SECONDS"]))
    return _real(case, *args)


preprocessor.preprocess_case = slow_case  # runs again in every spawned worker (it imports this file)

if __name__ == "__main__":
    from wldm_auto.cli.plan_and_preprocess import main
    sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture
def driver(planned, tmp_path: Path) -> dict:
    """The planned dataset with its arrays removed (3 cases to preprocess) and a slow-case driver script."""
    shutil.rmtree(planned["folder"] / "wldmPlans_3d_wldm")
    script = tmp_path / "slow_driver.py"
    script.write_text(DRIVER)
    markers = tmp_path / "markers"
    markers.mkdir()
    env = dict(os.environ, FAKE_MARKERS=str(markers), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(script), "-d", planned["dataset"], "--no-registration", "--spacing", "4", "-np", "2"]
    return dict(planned, cmd=cmd, env=env, markers=markers, script=script, logs=tmp_path)


def _start(driver: dict, seconds: float) -> subprocess.Popen:
    with open(driver["logs"] / "stdout.txt", "w") as out, open(driver["logs"] / "stderr.txt", "w") as err:
        return subprocess.Popen(driver["cmd"], env=dict(driver["env"], FAKE_CASE_SECONDS=str(seconds)), stdout=out,
                                stderr=err, start_new_session=True, cwd=driver["logs"])


def _worker_pids(driver: dict, proc: subprocess.Popen, count: int) -> list[int]:
    deadline = time.time() + WAIT
    while time.time() < deadline:
        pids = sorted({int(p.suffix[1:]) for p in driver["markers"].iterdir()})
        if len(pids) >= count:
            return pids
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"workers did not start: {(driver['logs'] / 'stderr.txt').read_text()[-2000:]}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _cleanup(proc: subprocess.Popen, pids: list[int]) -> None:
    for pid in [proc.pid, *pids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_the_parent_ends_its_workers(driver):
    proc = _start(driver, 120.0)
    pids: list[int] = []
    try:
        pids = _worker_pids(driver, proc, 2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        survivors = _wait_gone(pids, 15.0)
        assert not survivors, f"workers {survivors} outlived their killed parent"
    finally:
        _cleanup(proc, pids)
    assert not list((driver["folder"] / "wldmPlans_3d_wldm").glob("*.json"))  # nothing counts as finished
    assert hash_file(driver["raw"]) == driver["raw_hash"]


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
                    reason="reads /proc; tgkill's syscall number is x86_64's")
def test_ctrl_c_taken_by_a_helper_thread_still_stops_promptly(driver):
    """The kernel hands a process-directed SIGINT to any thread that does not block it; when that is one
    of the pool's helper threads, the main thread must still notice it (it waits in short slices)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    proc = _start(driver, 120.0)
    pids: list[int] = []
    try:
        pids = _worker_pids(driver, proc, 2)
        helpers = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]
        assert helpers, "the driver runs no helper thread"
        assert libc.syscall(234, proc.pid, helpers[-1], int(signal.SIGINT)) == 0  # tgkill(tgid, tid, SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("a SIGINT taken by a helper thread did not stop wldm_plan_and_preprocess within 30 s")
        survivors = _wait_gone(pids, 10.0)
    finally:
        _cleanup(proc, pids)
    assert code == 130 and not survivors, (driver["logs"] / "stderr.txt").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_promptly_and_a_rerun_continues(driver):
    proc = _start(driver, 120.0)
    pids: list[int] = []
    try:
        pids = _worker_pids(driver, proc, 2)
        start = time.time()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("Ctrl-C did not stop wldm_plan_and_preprocess -np 2 within 30 s")
        seconds = time.time() - start
        survivors = _wait_gone(pids, 10.0)
    finally:
        _cleanup(proc, pids)
    err = (driver["logs"] / "stderr.txt").read_text()
    assert code == 130, err
    assert seconds < 30
    assert not survivors
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert "interrupted" in last and "rerun" in last, err
    assert sum(1 for line in err.splitlines() if "interrupted" in line) == 1, err
    assert len(list(driver["markers"].iterdir())) == 2  # the queued third case never started
    assert not list((driver["folder"] / "wldmPlans_3d_wldm").glob("*.json"))
    assert hash_file(driver["raw"]) == driver["raw_hash"]

    again = subprocess.run(driver["cmd"], env=dict(driver["env"], FAKE_CASE_SECONDS="0"), capture_output=True,
                           encoding="utf-8", errors="replace", timeout=WAIT, cwd=driver["logs"])
    assert again.returncode == 0, again.stderr
    assert "3 preprocessed" in again.stdout


def test_worker_log_lines_reach_console_and_log_file(driver):
    done = subprocess.run(driver["cmd"], env=dict(driver["env"], FAKE_CASE_SECONDS="0"), capture_output=True,
                          encoding="utf-8", errors="replace", timeout=WAIT, cwd=driver["logs"])
    assert done.returncode == 0, done.stderr
    (log_file,) = (driver["folder"] / "logs").glob("plan_and_preprocess_*.log")
    text = log_file.read_text()
    for case in ("caseA", "caseB", "caseC"):
        assert f"starts case {case}" in done.stderr, done.stderr
        assert f"starts case {case}" in text, text
    assert hash_file(driver["raw"]) == driver["raw_hash"]


# ---------------------------------------------------------------------------------------------------------------
# conversion: MR and CT from the same folder; errors name the user's file, not the staging folder


@pytest.fixture
def pair(tmp_path: Path, small_phantom) -> dict:
    mr, ct = small_phantom
    for folder in ("mr", "ct"):
        (tmp_path / folder).mkdir()
    sitk.WriteImage(mr, str(tmp_path / "mr" / "c1.nii.gz"))
    sitk.WriteImage(ct, str(tmp_path / "ct" / "c1.nii.gz"))
    sitk.WriteImage(sitk.Cast(mr + 7, mr.GetPixelID()), str(tmp_path / "mr" / "c2.nii.gz"))
    sitk.WriteImage(sitk.Cast(ct + 7, ct.GetPixelID()), str(tmp_path / "ct" / "c2.nii.gz"))
    return {"mr": tmp_path / "mr", "ct": tmp_path / "ct", "root": tmp_path}


def _input_hash(pair: dict) -> dict[str, str]:
    return {k: hash_file(pair[k]) for k in ("mr", "ct") if pair[k].exists()}


@pytest.mark.parametrize("how", ["same_path", "symlink", "dot_segments"])
def test_paired_same_folder_for_mr_and_ct_is_refused(raw_dir, pair, capsys, how):
    mr = pair["mr"]
    ct = {"same_path": mr, "symlink": pair["root"] / "ct_link", "dot_segments": mr / ".." / "mr"}[how]
    if how == "symlink":
        ct.symlink_to(mr, target_is_directory=True)
    before = _input_hash(pair)
    code = main_paired(["-mr", str(mr), "-ct", str(ct), "-d", "7", "-n", "Same"])
    line = one_line_error(capsys.readouterr().err)
    assert code == 1
    assert str(mr) in line and "MR" in line and "CT" in line
    assert list(raw_dir.iterdir()) == []
    assert _input_hash(pair) == before


def test_paired_mr_and_ct_with_the_same_content_warn(raw_dir, pair, caplog):
    shutil.copyfile(pair["mr"] / "c1.nii.gz", pair["ct"] / "c1.nii.gz")  # the CT of c1 is its MR
    before = _input_hash(pair)
    with caplog.at_level(logging.WARNING):
        out = convert_paired(pair["mr"], pair["ct"], 8, "Dup")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("case c1" in w and "same content" in w for w in warnings), warnings
    assert not any("case c2" in w for w in warnings), warnings
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
    assert _input_hash(pair) == before


@pytest.mark.parametrize("link", [False, True], ids=["copy", "link"])
def test_unreadable_source_is_named_not_the_staging_folder(raw_dir, pair, capsys, link):
    bad = pair["mr"] / "c2.nii.gz"
    bad.write_bytes(b"this is not an image")
    before = _input_hash(pair)
    code = main_paired(["-mr", str(pair["mr"]), "-ct", str(pair["ct"]), "-d", "9", "-n", "Bad",
                        *(["--link"] if link else [])])
    line = one_line_error(capsys.readouterr().err)
    assert code == 1
    assert str(bad) in line and "c2" in line
    assert ".partial-" not in line
    assert list(raw_dir.iterdir()) == []  # the staging folder is gone, no dataset
    assert _input_hash(pair) == before


def test_validation_problem_names_the_source_file(raw_dir, pair, small_phantom):
    mr, _ = small_phantom
    (pair["root"] / "mask").mkdir()
    for name in ("c1", "c2"):
        mask = sitk.Cast(mr > 0, sitk.sitkUInt8)
        if name == "c2":
            mask.SetOrigin([o + 50.0 for o in mask.GetOrigin()])  # not on the MR grid
        sitk.WriteImage(mask, str(pair["root"] / "mask" / f"{name}.nii.gz"))
    before = _input_hash(pair)
    with pytest.raises(ValueError) as info:
        convert_paired(pair["mr"], pair["ct"], 10, "Masks", mask_dir=pair["root"] / "mask")
    message = str(info.value)
    assert str(pair["root"] / "mask" / "c2.nii.gz") in message, message
    assert ".partial-" not in message
    assert list(raw_dir.iterdir()) == []
    assert _input_hash(pair) == before


def test_fingerprint_warns_about_a_ct_without_its_offset_or_with_one_value(small_phantom, tmp_path, caplog):
    """A CT stored as raw scanner values (0..4095, no -1024 offset) or a blank CT goes through conversion and
    preprocessing (they are valid images) but would train on wrong HU: the fingerprint says so by case."""
    from wldm_auto.io.raw_dataset import RawCase
    from wldm_auto.planners.fingerprint import compute_fingerprint

    mr, ct = small_phantom
    sitk.WriteImage(mr, str(tmp_path / "mr.nii.gz"))
    cts = {"good": ct, "offset": sitk.Cast(sitk.Cast(ct, sitk.sitkInt32) + 1024, sitk.sitkUInt16),
           "blank": sitk.Cast(ct * 0 - 1024, sitk.sitkInt16)}
    cases = []
    for name, image in cts.items():
        sitk.WriteImage(image, str(tmp_path / f"{name}_ct.nii.gz"))
        cases.append(RawCase(name, [tmp_path / "mr.nii.gz"], tmp_path / f"{name}_ct.nii.gz"))
    with caplog.at_level(logging.WARNING, logger="wldm_auto.planners.fingerprint"):
        result = compute_fingerprint(cases, {c.name: {} for c in cases})
    warned = {r.getMessage().split(":")[0]: r.getMessage() for r in caplog.records}
    assert sorted(result["cases"]) == ["blank", "good", "offset"]  # warnings, not failures
    assert set(warned) == {"case offset", "case blank"}
    assert "without the -1024 HU offset" in warned["case offset"] and "one value everywhere" in warned["case blank"]


def test_an_empty_provided_mask_is_named_as_the_problem(small_phantom):
    from wldm_auto.planners.schema import Plans, PreprocessingPlan, RegistrationPlan
    from wldm_auto.preprocessing.case import CaseError, body_mask

    mr = sitk.Cast(small_phantom[0], sitk.sitkFloat32)
    empty = sitk.Image(mr.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(mr)
    plans = Plans("x", "wldmPlans", {"0": "MR"}, RegistrationPlan(), PreprocessingPlan(), {})
    with pytest.raises(CaseError, match=r"provided body mask \(masksTr\) is empty"):
        body_mask(mr, plans, empty)
