"""Fault matrix of training (issue 16): each case is a bad input or a crash point, the one-line error
it must give, and the state it must leave (continuable with --c, or a fresh start accepted).

Tiny regression trainings on the small phantom dataset, CPU; the progress figure is replaced by a
small file so that the many short runs stay fast.
"""
from __future__ import annotations

import errno
import fractions
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

import wldm_auto.trainers.base as base
from conftest import tiny_copy
from wldm_auto.cli.train import main as train_main
from wldm_auto.io.files import read_json, write_json
from wldm_auto.models.checkpoint import CheckpointError, DiskFullError, load_checkpoint, save_checkpoint
from wldm_auto.trainers.base import RESUMABLE, TrainerOptions
from wldm_auto.trainers.regression_trainer import RegressionTrainer
from wldm_auto.trainers.run import run_training

TRAINER = "RegressionTrainer"


class Crash(BaseException):
    """Stands for kill -9: nothing after it runs (no except/cleanup of the trainer catches a BaseException)."""


def model_dir(tmp_path: Path, dataset: str, trainer: str = TRAINER) -> Path:
    return tmp_path / "results" / dataset / f"{trainer}__wldmPlans__3d_wldm"


def options(**changes) -> TrainerOptions:
    settings = dict(device="cpu", num_workers=0, num_steps=2, steps_per_epoch=1)
    settings.update(changes)
    return TrainerOptions(**settings)


def error_lines(err: str) -> list[str]:
    """The ``error: ...`` lines of a CLI's stderr (tqdm bars share stderr)."""
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture
def fast_progress(monkeypatch):
    """progress.png as a small file written atomically (matplotlib is slow and not what is tested here)."""
    monkeypatch.setattr(base, "draw_progress", lambda history, path, title: write_json({"epochs": len(history)}, path))


# -- item 2: disk full ------------------------------------------------------------------------------------------

def test_disk_full_while_saving_gives_one_line_and_keeps_the_previous_checkpoint(
        preprocessed_small, tmp_path, monkeypatch, capsys, fast_progress):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (a device that is always full)")
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    real_save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        """From step 4 on, torch.save really writes to a full device (torch's own errors, whatever ``f`` is)."""
        if isinstance(obj, dict) and obj.get("step") == 4:
            if isinstance(f, (str, os.PathLike)):
                return real_save(obj, "/dev/full", *args, **kwargs)
            with open("/dev/full", "wb") as full:
                return real_save(obj, full, *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    argv = [dataset, "regression", "--device", "cpu", "--steps", "4", "--steps-per-epoch", "2", "--num-workers", "0"]
    assert train_main(argv) == 1
    err = capsys.readouterr().err
    folder = model_dir(tmp_path, dataset) / "fold_0"
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert str(folder / "checkpoint_latest.pt") in lines[0] and "disk full" in lines[0], lines[0]
    assert load_checkpoint(folder / "checkpoint_latest.pt")["step"] == 2  # the older checkpoint is intact
    assert not list(folder.glob(".*tmp*")), "a failed write must not leave its temporary file"
    monkeypatch.setattr(torch, "save", real_save)  # space freed: --c finishes the run
    assert train_main(argv + ["--c"]) == 0
    assert load_checkpoint(folder / "checkpoint_final.pt")["step"] == 4


def test_quota_exceeded_is_reported_as_disk_full(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_latest.pt"
    state = {"trainer": "T", "step": 1, "networks": {}, "plans": {}}
    save_checkpoint(state, path)

    def over_quota(*args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(torch, "save", over_quota)
    with pytest.raises(DiskFullError) as caught:
        save_checkpoint(dict(state, step=2), path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "disk full (disk quota exceeded)" in message
    assert caught.value.errno == errno.EDQUOT
    assert load_checkpoint(path)["step"] == 1


def test_training_log_on_a_full_disk_warns_once(tmp_path, capsys):
    from wldm_auto.trainers.run import _TrainingLog

    handler = _TrainingLog(tmp_path / "training_log.txt")

    def full(text):
        raise OSError(errno.ENOSPC, "No space left on device")

    handler.stream.write = full
    record = logging.LogRecord("wldm", logging.INFO, __file__, 1, "step %d", (1,), None)
    handler.handle(record)
    handler.handle(record)
    handler.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disk full" in err and "training_log.txt" in err, err


# -- item 4: kill -9 at every write of the run ----------------------------------------------------------------

def _count_writes(monkeypatch, crash_at: int | None) -> list[str]:
    """Wrap every write of the training loop; raise Crash before the ``crash_at``-th (1-based)."""
    done: list[str] = []

    def wrap(function, describe):
        def wrapped(*args, **kwargs):
            if crash_at is not None and len(done) + 1 == crash_at:
                raise Crash(describe(*args))
            result = function(*args, **kwargs)
            done.append(describe(*args))
            return result
        return wrapped

    monkeypatch.setattr(base, "save_checkpoint", wrap(base.save_checkpoint, lambda state, path: Path(path).name))
    monkeypatch.setattr(base, "write_json", wrap(base.write_json, lambda data, path: Path(path).name))
    monkeypatch.setattr(base, "draw_progress", wrap(base.draw_progress, lambda history, path, title: Path(path).name))
    return done


def test_a_crash_after_any_write_leaves_a_run_that_continues_or_restarts(
        preprocessed_small, tmp_path, monkeypatch, fast_progress):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    folder = model_dir(tmp_path, dataset) / "fold_0"
    with monkeypatch.context() as mp:
        writes = _count_writes(mp, None)
        run_training(dataset, "regression", 0, options=options())
    assert writes[-1] == "checkpoint_final.pt" and writes.count("checkpoint_latest.pt") == 2, writes
    for k in range(1, len(writes) + 1):
        shutil.rmtree(tmp_path / "results")
        with monkeypatch.context() as mp:
            _count_writes(mp, k)
            with pytest.raises(Crash):
                run_training(dataset, "regression", 0, options=options())
        if folder.is_dir():  # kill -9 inside a write leaves its temporary file
            (folder / ".checkpoint_latest.pt.x1y2z3.tmp.pt").write_bytes(b"half a checkpoint")
        try:
            final = run_training(dataset, "regression", 0, options=options())
            how = "fresh start"
        except FileExistsError as exc:
            assert "--c" in str(exc)
            final = run_training(dataset, "regression", 0, resume=True, options=options())
            how = "--c"
        context = f"crash before write {k} ({writes[k - 1]}), recovered by {how}"
        state = load_checkpoint(final)
        assert final.name == "checkpoint_final.pt" and state["step"] == 2, context
        assert [h["step"] for h in state["history"]] == [1, 2], context
        assert read_json(folder / "history.json") == state["history"], context
        best = load_checkpoint(folder / "checkpoint_best.pt")  # the best epoch's checkpoint, even if written late
        best_epoch = min(state["history"], key=lambda h: h[RegressionTrainer.best_metric])
        assert best["step"] == best_epoch["step"] and best["best_value"] == state["best_value"], context
        assert not list(folder.glob(".*tmp*")), context


def test_any_one_remaining_checkpoint_can_be_continued(preprocessed_small, tmp_path, monkeypatch, fast_progress):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    folder = model_dir(tmp_path, dataset) / "fold_0"
    run_training(dataset, "regression", 0, options=options())
    saved = tmp_path / "saved"
    shutil.copytree(folder, saved)
    for keep in RESUMABLE:
        shutil.rmtree(folder)
        folder.mkdir()
        shutil.copy(saved / keep, folder / keep)
        with pytest.raises(FileExistsError, match="use --c"):
            run_training(dataset, "regression", 0, options=options())
        final = run_training(dataset, "regression", 0, resume=True, options=options())
        assert load_checkpoint(final)["step"] == 2, keep


# -- item 5: numeric options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("--steps", "0"), ("--steps", "-5"), ("--steps", "1.5"), ("--steps", "1e5"), ("--epochs", "0"),
    ("--steps-per-epoch", "0"), ("--steps-per-epoch", "two"), ("-f", "-1"), ("--num-workers", "-1"),
    ("--seed", "-1"),
])
def test_bad_numbers_are_refused_before_anything_is_created(flag, value, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("wldm_results", str(tmp_path / "results"))
    monkeypatch.setenv("wldm_preprocessed", str(tmp_path / "pre"))
    with pytest.raises(SystemExit) as exited:
        train_main(["Dataset999_None", "regression", "--device", "cpu", flag, value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and flag in err and repr(value) in err, err
    assert not (tmp_path / "results").exists()


def test_api_refuses_zero_steps_before_anything_is_created(preprocessed_small, tmp_path, monkeypatch):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    for bad in (dict(num_steps=0), dict(steps_per_epoch=0), dict(num_epochs=-1), dict(num_workers=-2)):
        with pytest.raises(ValueError, match="must be"):
            run_training(dataset, "regression", 0, options=options(**bad))
    with pytest.raises(ValueError, match="--fold"):
        run_training(dataset, "regression", -1, options=options())
    assert not model_dir(tmp_path, dataset).exists()


# -- item 9: a run refused at start leaves no fold folder; prediction skips unfinished folds --------------------

def test_failed_start_leaves_no_fold_and_prediction_skips_unfinished_folds(
        preprocessed_small, tmp_path, monkeypatch, caplog, fast_progress):
    from wldm_auto.inference.folds import load_model

    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    model = model_dir(tmp_path, dataset)
    with pytest.raises(ValueError, match="fold 3 does not exist"):  # 3 cases: folds 0..2
        run_training(dataset, "regression", 3, options=options())
    assert not model.exists()
    with pytest.raises(FileNotFoundError, match="train stage 1 first"):
        run_training(dataset, "diffusion", 0, options=options())
    assert not model_dir(tmp_path, dataset, "DiffusionTrainer").exists()

    run_training(dataset, "regression", 0, options=options(num_steps=1))
    (model / "fold_1").mkdir()  # e.g. a run killed before its first checkpoint, or made by an older version
    (model / "fold_1" / "training_log_x.txt").write_text("started\n")
    with caplog.at_level(logging.WARNING, logger="wldm_auto.inference"):
        folds = load_model(model, None, torch.device("cpu"))
    assert [f.fold for f in folds] == [0]
    assert "fold_1" in caplog.text and "checkpoint_final.pt" in caplog.text
    with pytest.raises(ValueError, match="fold_1"):  # asked for explicitly: still an error
        load_model(model, [0, 1], torch.device("cpu"))
    (model / "fold_0" / "checkpoint_final.pt").unlink()
    with pytest.raises(ValueError, match="not found"):  # no fold finished: the clear error
        load_model(model, None, torch.device("cpu"))


# -- item 12: a checkpoint holding pickled objects ------------------------------------------------------------

def test_pickled_checkpoint_is_refused_without_unsafe_advice(preprocessed_small, tmp_path, monkeypatch, capsys):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    folder = model_dir(tmp_path, dataset) / "fold_0"
    folder.mkdir(parents=True)
    path = folder / "checkpoint_latest.pt"
    torch.save({"trainer": TRAINER, "step": 1, "networks": {}, "plans": {}, "x": fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    assert "not a wldm_auto checkpoint" in message and "pickled objects" in message and "trust" in message
    assert "weights_only" not in message and "\x1b" not in message, message
    code = train_main([dataset, "regression", "--device", "cpu", "--steps", "2", "--num-workers", "0", "--c"])
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1 and "pickled objects" in lines[0] and "weights_only" not in err, err
