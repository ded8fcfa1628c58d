"""Fixtures shared by the test files."""
from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from wldm_auto.dataset_conversion.example import derived_sequence

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


@dataclass(frozen=True)
class PreprocessedSmall:
    """Where the ``preprocessed_small`` fixture put its dataset."""

    raw: Path  # value for $wldm_raw
    preprocessed: Path  # value for $wldm_preprocessed
    dataset: str  # DatasetXXX_Name
    folder: Path  # $wldm_preprocessed/DatasetXXX_Name/<data_identifier>, holding the arrays
    cases: list[str]


SMALL_DATASET = "Dataset901_LoaderSmall"
TWO_SEQUENCE_DATASET = "Dataset902_TwoSequences"
# (x, y, z) crop size and offset of the crop centre from the MR centre, one per case: three different patients
SMALL_CROPS = {"caseA": ((96, 96, 40), (0, 0, 0)), "caseB": ((96, 88, 36), (20, -12, 8)),
               "caseC": ((80, 96, 40), (-24, 16, -10))}


def _offset_crop(image: sitk.Image, size: tuple[int, int, int], shift: tuple[int, int, int]) -> sitk.Image:
    index = [(n - s) // 2 + d for n, s, d in zip(image.GetSize(), size, shift)]
    return sitk.RegionOfInterest(image, list(size), index)


def build_small_dataset(root: Path, dataset: str, two_sequences: bool = False) -> PreprocessedSmall:
    """Three different crops of the phantom (optionally with a second sequence), planned and preprocessed
    at 4 mm without registration. The environment variables are set only while preprocessing."""
    from wldm_auto.planners.schema import Plans
    from wldm_auto.preprocessing.pipeline import plan_and_preprocess

    raw, pre = root / "raw", root / "pre"
    folder = raw / dataset
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "targetsTr").mkdir()
    mr = sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz"))
    ct = sitk.ReadImage(str(PHANTOM_DIR / "ct.nii.gz"))
    for name, (size, shift) in SMALL_CROPS.items():
        crop = _offset_crop(mr, size, shift)
        sitk.WriteImage(crop, str(folder / "imagesTr" / f"{name}_0000.nii.gz"))
        if two_sequences:
            sitk.WriteImage(derived_sequence(crop), str(folder / "imagesTr" / f"{name}_0001.nii.gz"))
        sitk.WriteImage(ct, str(folder / "targetsTr" / f"{name}.nii.gz"))
    channels = {"0": "T2", "1": "T2sqrt"} if two_sequences else {"0": "MR"}
    (folder / "dataset.json").write_text(json.dumps({
        "name": dataset, "channel_names": channels, "target": "CT", "file_ending": ".nii.gz",
        "numTraining": len(SMALL_CROPS)}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("wldm_raw", str(raw))
        mp.setenv("wldm_preprocessed", str(pre))
        summary = plan_and_preprocess(dataset, registration=False, spacing=[4.0])
    assert not summary.failed, [o.message for o in summary.failed]
    plans = Plans.load(pre / dataset / "plans.json")
    arrays = pre / dataset / plans.configuration("3d_wldm").data_identifier
    return PreprocessedSmall(raw, pre, dataset, arrays, sorted(SMALL_CROPS))


@pytest.fixture(scope="session")
def preprocessed_small(tmp_path_factory: pytest.TempPathFactory) -> PreprocessedSmall:
    """Three different crops of the phantom, planned and preprocessed at 4 mm without registration (~3 s).

    The environment variables are set only while preprocessing; tests that need them set them from the result.
    """
    return build_small_dataset(tmp_path_factory.mktemp("preprocessed_small"), SMALL_DATASET)


@pytest.fixture(scope="session")
def preprocessed_two_sequences(tmp_path_factory: pytest.TempPathFactory) -> PreprocessedSmall:
    """As ``preprocessed_small`` with two MR sequences per case (``_0000`` T2, ``_0001`` a derived contrast)."""
    return build_small_dataset(tmp_path_factory.mktemp("preprocessed_two"), TWO_SEQUENCE_DATASET, True)


TINY_VAE = {"channels": [8, 16], "group_width": 4, "latent_channels": 4, "downsampling_factor": 2,
            "discriminator_channels": 8, "discriminator_layers": 2, "adv_start_step": 2, "kl_weight": 1e-6,
            "training": {"learning_rate": 2e-3, "warmup_steps": 0, "steps_per_epoch": 4, "num_epochs": 2,
                         "checkpoint_every_steps": 2, "grad_clip": 1.0, "weight_decay": 0.0}}


TINY_DIFFUSION = {"unet_channels": [16, 32], "timesteps": 100, "validation_ddim_steps": 3, "ema_decay": 0.9}


TINY_WAVELET = {"unet_channels": [16, 32], "timesteps": 100, "validation_ddim_steps": 3, "ema_decay": 0.9}


TINY_REGRESSION = {"unet_channels": [8, 16], "group_width": 4, "blocks_per_level": 1, "error_head": False}


def oblique(image: sitk.Image) -> sitk.Image:
    """A copy of ``image`` whose direction is rotated 17 degrees about z and x (an oblique scan)."""
    angle = np.deg2rad(17.0)
    rz = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    out = sitk.Image(image)
    out.SetDirection(tuple((rz @ rx).ravel()))
    return out


def tiny_copy(preprocessed_small: "PreprocessedSmall", tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
              **vae_changes) -> str:
    """A private copy of the small preprocessed dataset with tiny VAE/diffusion/regression plans; env vars point at it."""
    pre = tmp_path / "pre"
    shutil.copytree(preprocessed_small.preprocessed, pre)
    monkeypatch.setenv("wldm_preprocessed", str(pre))
    monkeypatch.setenv("wldm_results", str(tmp_path / "results"))
    plans_path = pre / preprocessed_small.dataset / "plans.json"
    plans = json.loads(plans_path.read_text())
    config = plans["configurations"]["3d_wldm"]
    config["patch_size"] = [16, 16, 16]
    config["batch_size"] = 2
    vae = dict(TINY_VAE, **vae_changes)
    training = dict(config["vae"]["training"], **vae.pop("training"))
    config["vae"].update(vae, training=training)
    config["diffusion"].update(TINY_DIFFUSION, training=dict(config["diffusion"]["training"], **TINY_VAE["training"]))
    config["wavelet_diffusion"].update(TINY_WAVELET, training=dict(config["wavelet_diffusion"]["training"],
                                                                   **TINY_VAE["training"]))
    config["residual_diffusion"].update(TINY_WAVELET, training=dict(config["residual_diffusion"]["training"],
                                                                    **TINY_VAE["training"]))
    config["regression"].update(TINY_REGRESSION,
                                training=dict(config["regression"]["training"], **TINY_VAE["training"]))
    config["inference"]["ddim_steps"] = 4
    plans_path.write_text(json.dumps(plans))
    return preprocessed_small.dataset


@contextlib.contextmanager
def tiny_models(preprocessed_small: "PreprocessedSmall", root: Path, stages: tuple[str, ...]) -> Iterator[dict[str, Path]]:
    """Fold 0 of each of ``stages`` trained in order on a :func:`tiny_copy` under ``root`` (regression 4 steps,
    the others 8); yields stage -> model folder, with the env vars pointing at the copy until exit."""
    from wldm_auto.trainers.base import TrainerOptions
    from wldm_auto.trainers.run import run_training

    monkeypatch = pytest.MonkeyPatch()
    try:
        dataset = tiny_copy(preprocessed_small, root, monkeypatch)
        folders = {}
        for stage in stages:
            steps = 4 if stage == "regression" else 8
            options = TrainerOptions(device="cpu", num_workers=0, num_steps=steps, steps_per_epoch=steps // 2)
            folders[stage] = run_training(dataset, stage, 0, options=options).parent.parent
        yield folders
    finally:
        monkeypatch.undo()
