"""Stage-1 trainer machinery on tiny real networks and real (phantom) data, CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wldm_auto.models.checkpoint import CheckpointError, load_checkpoint
from wldm_auto.trainers.base import TrainerOptions
from wldm_auto.trainers.run import run_training

from conftest import tiny_copy

def fold_dir(tmp_path: Path, dataset: str, trainer: str = "VAETrainer") -> Path:
    return tmp_path / "results" / dataset / f"{trainer}__wldmPlans__3d_wldm" / "fold_0"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["networks"]["vae"]


def test_short_run_writes_self_contained_results(preprocessed_small, tmp_path, monkeypatch):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    final = run_training(dataset, "vae", 0, options=TrainerOptions(device="cpu", num_workers=0))
    folder = fold_dir(tmp_path, dataset)
    assert final == folder / "checkpoint_final.pt"
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt", "progress.png", "history.json"):
        assert (folder / name).is_file(), name
    assert list(folder.glob("training_log_*.txt"))
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        assert (folder.parent / name).is_file(), name
    history = json.loads((folder / "history.json").read_text())
    assert [h["step"] for h in history] == [4, 8]
    for record in history:
        assert np.isfinite(record["val_psnr_ct"]) and np.isfinite(record["val_mae_ct_hu"]) and np.isfinite(record["val_psnr_mr"])
        assert record["train_rec"] > 0 and "train_smd_stru" in record
    assert "train_g_adv" in history[-1] and "train_d" in history[-1]  # adversarial loss switched on at step 2
    state = torch.load(folder / "checkpoint_final.pt", weights_only=True)
    assert state["step"] == 8 and state["trainer"] == "VAETrainer"
    assert state["plans"]["configurations"]["3d_wldm"]["vae"]["channels"] == [8, 16]


def test_progress_png_is_drawn_at_the_end_and_at_most_every_interval(preprocessed_small, tmp_path, monkeypatch):
    """progress.png: after the run's last epoch (a stop too) and at most every PROGRESS_EVERY_SECONDS in between;
    history.json every epoch."""
    from wldm_auto.trainers import base

    drawn: list[int] = []
    original = base.draw_progress
    monkeypatch.setattr(base, "draw_progress", lambda history, path, title: (drawn.append(history[-1]["step"]),
                                                                             original(history, path, title)))
    dataset = tiny_copy(preprocessed_small, tmp_path / "a", monkeypatch)
    options = TrainerOptions(device="cpu", num_workers=0, num_steps=3, steps_per_epoch=1, stop_at_step=2)
    run_training(dataset, "regression", 0, options=options)
    folder = fold_dir(tmp_path / "a", dataset, "RegressionTrainer")
    assert drawn == [2] and (folder / "progress.png").stat().st_size > 1000  # stopped at 2: drawn there only
    assert [h["step"] for h in json.loads((folder / "history.json").read_text())] == [1, 2]
    run_training(dataset, "regression", 0, options=TrainerOptions(device="cpu", num_workers=0, num_steps=3,
                                                                  steps_per_epoch=1), resume=True)
    assert drawn == [2, 2, 3]  # resuming redraws the state it continues from, then the last epoch
    monkeypatch.setattr(base, "PROGRESS_EVERY_SECONDS", 0.0)
    dataset = tiny_copy(preprocessed_small, tmp_path / "b", monkeypatch)
    drawn.clear()
    run_training(dataset, "regression", 0, options=TrainerOptions(device="cpu", num_workers=0, num_steps=3,
                                                                  steps_per_epoch=1))
    assert drawn == [1, 2, 3]


def test_existing_results_are_not_overwritten(preprocessed_small, tmp_path, monkeypatch):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    options = TrainerOptions(device="cpu", num_workers=0, num_steps=2, steps_per_epoch=2)
    run_training(dataset, "vae", 0, options=options)
    with pytest.raises(FileExistsError, match="--c"):
        run_training(dataset, "vae", 0, options=options)


def test_resume_gives_identical_weights(preprocessed_small, tmp_path, monkeypatch):
    dataset = tiny_copy(preprocessed_small, tmp_path / "a", monkeypatch)
    straight = run_training(dataset, "vae", 0, options=TrainerOptions(device="cpu", num_workers=0, num_steps=6,
                                                                     steps_per_epoch=3))
    dataset = tiny_copy(preprocessed_small, tmp_path / "b", monkeypatch)
    half = run_training(dataset, "vae", 0, options=TrainerOptions(device="cpu", num_workers=1, num_steps=6,
                                                                 steps_per_epoch=3, stop_at_step=4))
    assert half.name == "checkpoint_latest.pt" and load_checkpoint(half)["step"] == 4
    resumed = run_training(dataset, "vae", 0, resume=True,
                           options=TrainerOptions(device="cpu", num_workers=0, num_steps=6, steps_per_epoch=3))
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert load_checkpoint(straight)["history"] == load_checkpoint(resumed)["history"][:0] + load_checkpoint(straight)["history"]


def test_corrupted_checkpoint_gives_a_clear_error(tmp_path):
    bad = tmp_path / "checkpoint_latest.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(CheckpointError, match=str(bad)):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"just": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a wldm_auto checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_ablation_trainers_change_the_model(preprocessed_small, tmp_path, monkeypatch):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    options = TrainerOptions(device="cpu", num_workers=0, num_steps=2, steps_per_epoch=2)
    full = load_checkpoint(run_training(dataset, "vae", 0, options=options))
    no_wrm = load_checkpoint(run_training(dataset, "vae", 0, "VAETrainer_noWRM", options=options))
    no_smd = load_checkpoint(run_training(dataset, "vae", 0, "VAETrainer_noSMD", options=options))
    assert no_wrm["plans"]["configurations"]["3d_wldm"]["vae"]["wrm"] is False
    assert set(full["networks"]["vae"]) != set(no_wrm["networks"]["vae"])
    assert "train_smd_stru" in full["history"][0] and "train_smd_stru" not in no_smd["history"][0]
    vanilla = load_checkpoint(run_training(dataset, "vae", 0, "VAETrainer_noWRM_noSMD", options=options))
    vae_plan = vanilla["plans"]["configurations"]["3d_wldm"]["vae"]
    assert vae_plan["wrm"] is False and vae_plan["smd_weight"] == 0.0 and "train_smd_stru" not in vanilla["history"][0]
    # the losses are recorded per modality
    assert {"train_rec_ct", "train_rec_mr", "train_kl"} <= set(full["history"][0])
    with pytest.raises(ValueError, match="unknown trainer"):
        run_training(dataset, "vae", 0, "NoSuchTrainer", options=options)


def test_validation_psnr_rises(preprocessed_small, tmp_path, monkeypatch):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch, adv_start_step=10_000)
    run_training(dataset, "vae", 0, options=TrainerOptions(device="cpu", num_workers=0, num_steps=100,
                                                           steps_per_epoch=5))
    history = json.loads((fold_dir(tmp_path, dataset) / "history.json").read_text())
    psnr = [h["val_psnr_ct"] for h in history]
    rec = [h["train_rec"] for h in history]
    assert psnr[-1] > psnr[0] + 1.0, psnr
    assert rec[-1] < 0.5 * rec[0], rec


def test_ddp_two_gloo_processes(preprocessed_small, tmp_path, monkeypatch):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "wldm_auto.cli.train", dataset, "vae", "--device", "cpu", "--steps", "4",
           "--steps-per-epoch", "2", "--num-workers", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = fold_dir(tmp_path, dataset)
    assert sorted(p.name for p in folder.glob("checkpoint_*.pt")) == [
        "checkpoint_best.pt", "checkpoint_final.pt", "checkpoint_latest.pt"]
    assert load_checkpoint(folder / "checkpoint_final.pt")["step"] == 4


def test_validation_uses_a_bounded_crop(preprocessed_small, tmp_path, monkeypatch, caplog):
    """training.validation_max_voxels: each epoch validates the same centred crop of at most that many voxels."""
    from wldm_auto.trainers import base

    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    plans_path = Path(os.environ["wldm_preprocessed"]) / dataset / "plans.json"
    plans = json.loads(plans_path.read_text())
    plans["configurations"]["3d_wldm"]["regression"]["training"]["validation_max_voxels"] = 4000
    plans_path.write_text(json.dumps(plans))
    shapes: list[tuple[int, ...]] = []
    original = base.BaseTrainer.validation_arrays

    def recorded(self, case):
        arrays = original(self, case)
        shapes.append(arrays[0].shape[1:])
        return arrays

    monkeypatch.setattr(base.BaseTrainer, "validation_arrays", recorded)
    with caplog.at_level("INFO"):
        run_training(dataset, "regression", 0, options=TrainerOptions(device="cpu", num_workers=0, num_steps=4,
                                                                      steps_per_epoch=2))
    assert shapes and all(np.prod(s) <= 4000 for s in shapes) and len(set(shapes)) == len(set(shapes[:len(shapes) // 2]))
    assert "training.validation_max_voxels" in caplog.text
    history = json.loads((fold_dir(tmp_path, dataset, "RegressionTrainer") / "history.json").read_text())
    assert all(np.isfinite(h["val_mae_ct_hu"]) for h in history)


def test_deterministic_sets_the_cublas_workspace(preprocessed_small, tmp_path, monkeypatch):
    """--deterministic: cuBLAS is deterministic only with a fixed workspace, read when its handle is made."""
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: None)  # not for the whole session
    run_training(dataset, "regression", 0, options=TrainerOptions(device="cpu", num_workers=0, num_steps=1,
                                                                  steps_per_epoch=1, deterministic=True))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
