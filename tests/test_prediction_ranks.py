"""Prediction over several processes: --num-parts/--part-id shares, torchrun ranks (Gloo, CPU), --split-case.

A tiny, randomly initialised diffusion model (the voxels need not be good,
only identical) and small phantom crops with several latent tiles each.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import PHANTOM_DIR
from wldm_auto.cli.predict import main as predict_main
from wldm_auto.inference.inputs import InputCase, select_part
from wldm_auto.models.checkpoint import save_checkpoint
from wldm_auto.models.factory import build_denoiser, build_regression_unet, build_vae
from wldm_auto.planners.schema import ConfigurationPlan, InferencePlan, Plans, PreprocessingPlan, RegistrationPlan

# (x, y, z) crop sizes of the phantom MR (1 x 1 x 2.5 mm): three cases, latents of 2-3 tiles per axis at 2 mm
CROPS = {"caseA": (96, 96, 40), "caseB": (80, 96, 36), "caseC": (96, 72, 40)}
ARGS = ["--steps", "2", "--samples", "2", "--save-std", "--device", "cpu", "--seed", "5"]


def diffusion_model(folder: Path, sct_estimate: str = "sample_mean") -> Path:
    """A diffusion model folder: tiny VAE (factor 4) and U-Net, random weights, 16^3 patches, small tiles."""
    config = ConfigurationPlan(data_identifier="ranks", spacing=[2.0, 2.0, 2.0], median_shape=[16, 16, 16],
                               patch_size=[16, 16, 16], batch_size=2, estimated_memory_gb=0.0,
                               inference=InferencePlan(image_tile_scale=2, latent_tile_scale=2))
    config.vae.channels, config.vae.group_width, config.vae.latent_channels = [8, 8, 16], 4, 4
    config.diffusion.unet_channels, config.diffusion.sct_estimate = [8, 16], sct_estimate
    plans = Plans("ranks", "wldmPlans", {"0": "MR"}, RegistrationPlan(), PreprocessingPlan(), {"3d_wldm": config})
    torch.manual_seed(0)
    vae = build_vae(1, config.vae)
    unet = build_denoiser(config.diffusion, vae)
    save_checkpoint({"trainer": "DiffusionTrainer", "stage": "diffusion", "step": 0, "fold": 0, "mr_channels": 1,
                     "configuration": "3d_wldm", "plans": plans.to_dict(), "latent_scale": 1.0,
                     "networks": {"vae": vae.state_dict(), "ema": unet.state_dict(), "unet": unet.state_dict()}},
                    folder / "fold_0" / "checkpoint_final.pt")
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return diffusion_model(tmp_path_factory.mktemp("ranks_model") / "model")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ranks_in")
    mr = sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz"))
    for name, size in CROPS.items():
        index = [(n - s) // 2 for n, s in zip(mr.GetSize(), size)]
        sitk.WriteImage(sitk.RegionOfInterest(mr, list(size), index), str(folder / f"{name}_0000.nii.gz"))
    return folder


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one CPU thread, as every torchrun rank below (another thread count may round differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(model, inputs, tmp_path_factory) -> Path:
    """One process, one thread, all cases."""
    out = tmp_path_factory.mktemp("ranks_ref") / "sct"
    with one_thread():
        assert predict_main(["-i", str(inputs), "-o", str(out), "-m", str(model), *ARGS]) == 0
    return out


def log_names(folder: Path) -> list[str]:
    """Log files of a run without their time stamps."""
    return sorted(re.sub(r"_\d{8}-\d{6}\.log$", "", p.name) for p in folder.iterdir())


def voxels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.iterdir())}


def assert_same_outputs(folder: Path, reference: Path) -> None:
    got, expected = voxels(folder), voxels(reference)
    assert sorted(got) == sorted(expected) == sorted([f"{n}.nii.gz" for n in CROPS] + [f"{n}_std.nii.gz" for n in CROPS])
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name


def torchrun(nproc: int, port: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port), "-m", "wldm_auto.cli.predict", *args]
    return subprocess.run(command, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)


def test_select_part_is_a_partition_of_the_sorted_cases():
    cases = [InputCase(f"c{i}", {0: Path(f"c{i}.nii.gz")}) for i in (3, 0, 4, 1, 2)]
    parts = [[c.name for c in select_part(cases, i, 3)] for i in range(3)]
    assert parts == [["c0", "c3"], ["c1", "c4"], ["c2"]]
    assert select_part(cases, 0, 7)[0].name == "c0" and select_part(cases, 6, 7) == []
    for bad in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="part"):
            select_part(cases, *bad)


def test_num_parts_write_exactly_the_cases_of_one_run(model, inputs, reference, tmp_path, capsys):
    out = tmp_path / "sct"
    for part in ("0", "1"):
        with one_thread():
            assert predict_main(["-i", str(inputs), "-o", str(out), "-m", str(model), *ARGS,
                                 "--num-parts", "2", "--part-id", part]) == 0
    assert_same_outputs(out, reference)
    assert log_names(tmp_path / "sct_logs") == ["predict_part0of2", "predict_part1of2"]
    capsys.readouterr()
    for bad in (["--num-parts", "2", "--part-id", "2"], ["--num-parts", "0"], ["--part-id", "-1"]):
        assert predict_main(["-i", str(inputs), "-o", str(tmp_path / "bad"), "-m", str(model), *ARGS, *bad]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: --") and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()


def test_torchrun_ranks_share_the_cases(model, inputs, reference, tmp_path):
    out = tmp_path / "sct"
    done = torchrun(2, 29531, "-i", str(inputs), "-o", str(out), "-m", str(model), *ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_outputs(out, reference)
    assert log_names(tmp_path / "sct_logs") == ["predict_rank0", "predict_rank1"]


def test_split_case_on_two_gloo_ranks_equals_one_process(model, inputs, reference, tmp_path):
    out = tmp_path / "sct"
    done = torchrun(2, 29533, "-i", str(inputs), "-o", str(out), "-m", str(model), *ARGS, "--split-case")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "over 2 ranks" in done.stderr
    assert_same_outputs(out, reference)


@pytest.fixture(scope="module")
def regression_model(tmp_path_factory) -> Path:
    """A regression U-Net with an error head (random weights, 16^3 patches): its std comes from a second output."""
    config = ConfigurationPlan(data_identifier="ranks", spacing=[2.0, 2.0, 2.0], median_shape=[16, 16, 16],
                               patch_size=[16, 16, 16], batch_size=2, estimated_memory_gb=0.0,
                               inference=InferencePlan(edge_std_mm=4.0))
    config.regression.unet_channels, config.regression.error_head = [8, 16], True
    plans = Plans("ranks", "wldmPlans", {"0": "MR"}, RegistrationPlan(), PreprocessingPlan(), {"3d_wldm": config})
    torch.manual_seed(0)
    net = build_regression_unet(1, config.regression)
    folder = tmp_path_factory.mktemp("ranks_regression") / "model"
    save_checkpoint({"trainer": "RegressionTrainer", "stage": "regression", "step": 0, "fold": 0, "mr_channels": 1,
                     "configuration": "3d_wldm", "plans": plans.to_dict(), "networks": {"net": net.state_dict()}},
                    folder / "fold_0" / "checkpoint_final.pt")
    return folder


@pytest.mark.parametrize(("kind", "port"), [("error_head", 29537), ("posterior_mean", 29539)])
def test_split_case_std_passes_equal_one_process(kind, port, regression_model, inputs, tmp_path):
    """With --save-std, rank 0 runs passes the sCT alone does not need: a regression U-Net's two-output pass
    (error head), or a posterior-mean model's samples. The other ranks must run the same passes (they used to
    run the sCT's only: tiles of another size in the same all_gather, or collectives rank 0 never joined; an
    error under Gloo, undefined or a hang under NCCL)."""
    model = regression_model if kind == "error_head" else diffusion_model(tmp_path / "pm", "posterior_mean")
    args = ["-m", str(model), "--save-std", "--device", "cpu", "--confidence-hu", "150"]
    if kind == "posterior_mean":
        args += ["--steps", "2", "--samples", "2", "--seed", "5"]
    reference = tmp_path / "one"
    with one_thread():
        assert predict_main(["-i", str(inputs), "-o", str(reference), *args]) == 0
    out = tmp_path / "two"
    done = torchrun(2, port, "-i", str(inputs), "-o", str(out), *args, "--split-case")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend gloo, rank 1 of 2" in done.stderr
    got, expected = voxels(out), voxels(reference)
    assert sorted(got) == sorted(expected) and len(expected) == 3 * len(CROPS)  # sCT, std, confidence per case
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name
    if kind == "error_head":  # the head's std: the two-output pass ran
        assert all(got[f"{n}_std.nii.gz"].max() > 0 for n in CROPS)
