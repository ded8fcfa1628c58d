"""bench/gpu_check.py on CPU (--quick): every check it runs here is ok, its JSON has every key, and
--device cuda without CUDA is one clear line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.py"
TRAINERS = ("VAETrainer", "DiffusionTrainer", "WaveletDiffusionTrainer", "RegressionTrainer")


def test_quick_cpu_run_passes_every_check(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--threads", "1",
                           "--out", str(out)], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          encoding="utf-8", errors="replace", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == report
    checks = report["checks"]
    assert set(checks) == {"dataset", *(f"train_{t}" for t in TRAINERS), "torchrun_train", "predict",
                           "predict_precision", "sampler"}
    assert report["all_ok"] and report["failed"] == [] and all(c["ok"] for c in checks.values()), checks
    assert {"environment", "settings", "not_run", "amp", "seconds_total", "budget_seconds"} <= set(report)
    for trainer in TRAINERS:
        check = checks[f"train_{trainer}"]
        assert (check["amp"], check["grad_scaler"], check["compiled"]) == ("off", False, False)
        assert check["samples_per_s"] > 0 and check["check_seconds"] > 0
        assert f"train_{trainer}_compiled" in report["not_run"]
    assert (checks["torchrun_train"]["backend"], checks["torchrun_train"]["world_size"]) == ("gloo", 1)
    predict = checks["predict"]
    assert predict["seconds"] > 0 and (predict["ddim_steps"], predict["samples"]) == (2, 2)
    half = checks["predict_precision"]["bfloat16"]  # CPU: bfloat16 only (float16 runs, but 19x slower)
    assert half["autocast_dtype"] == "bfloat16" and half["seconds"] > 0, half
    assert 0 <= half["mean_abs_diff_body_hu"] <= half["max_abs_diff_hu"] <= 4095, half
    assert "float16" in checks["predict_precision"]["not_run"] and "float16" not in checks["predict_precision"]
    assert checks["sampler"]["ours"]["seconds"] > 0 and checks["sampler"]["naive_over_ours_seconds"] > 0
    assert {"train_VAETrainer_fp16", "predict_split_case"} <= set(report["not_run"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_clear_error(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(tmp_path / "x.json")],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert done.returncode == 2 and not (tmp_path / "x.json").exists()
    assert "--device cuda: CUDA is not available" in done.stderr.strip().splitlines()[-1]
