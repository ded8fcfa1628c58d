"""Several MR sequences as input, any of them possibly missing: data, networks, training and prediction."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import PHANTOM_DIR, tiny_copy
from wldm_auto.cli.convert import main_example
from wldm_auto.cli.predict import main as predict_main
from wldm_auto.dataset_conversion.example import derived_sequence
from wldm_auto.io.geometry import Geometry
from wldm_auto.models.checkpoint import load_checkpoint
from wldm_auto.networks.channels import network_channels, with_flags
from wldm_auto.planners.schema import Plans
from wldm_auto.trainers.base import TrainerOptions
from wldm_auto.trainers.data import PreprocessedDataset, StepBatches, drop_channels
from wldm_auto.trainers.run import run_training


def test_drop_channels_keeps_a_non_empty_proper_subset_and_zeroes_the_rest():
    rng = np.random.default_rng(0)
    mr = np.ones((400, 3, 2, 2, 2), dtype=np.float32)
    available = drop_channels(mr, 1.0, rng)
    kept = available.sum(axis=1)
    assert kept.min() == 1 and kept.max() == 2  # never none, never all three with probability 1
    assert len({tuple(a) for a in available}) == 6  # all 2**3 - 2 proper subsets occur
    assert np.array_equal(mr[:, :, 0, 0, 0], available)  # dropped sequences are zeros
    half = drop_channels(np.ones((2000, 2, 1, 1, 1), dtype=np.float32), 0.5, np.random.default_rng(1))
    assert 0.45 < (half.sum(axis=1) < 2).mean() < 0.55


def test_no_dropout_draws_nothing():
    for mr, p in ((np.ones((4, 1, 2, 2, 2), np.float32), 1.0), (np.ones((4, 2, 2, 2, 2), np.float32), 0.0)):
        rng = np.random.default_rng(3)
        assert np.array_equal(drop_channels(mr, p, rng), np.ones(mr.shape[:2], np.float32))
        assert rng.random() == np.random.default_rng(3).random()
        assert mr.min() == 1


def test_flags_are_appended_for_several_sequences_only():
    assert network_channels(1) == 1 and network_channels(3) == 6
    mr = torch.rand(2, 2, 4, 4, 4)
    x = with_flags(mr, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert x.shape == (2, 4, 4, 4, 4)
    assert torch.equal(x[0, 1], torch.zeros(4, 4, 4)) and torch.equal(x[0, 0], mr[0, 0])
    assert torch.equal(x[0, 3], torch.zeros(4, 4, 4)) and torch.equal(x[1, 2:], torch.ones(2, 4, 4, 4))
    one = torch.rand(1, 1, 2, 2, 2)
    assert with_flags(one) is one
    with pytest.raises(ValueError, match="only MR channel"):
        with_flags(one, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="availability must be"):
        with_flags(mr, torch.ones(3))


def test_two_sequences_are_planned_and_normalised_separately(preprocessed_two_sequences):
    small = preprocessed_two_sequences
    plans = Plans.load(small.preprocessed / small.dataset / "plans.json")
    config = plans.configuration("3d_wldm")
    assert plans.channel_names == {"0": "T2", "1": "T2sqrt"}
    assert config.mr_channel_dropout == 0.5 and "subset" in config.notes["mr_channel_dropout"]
    data = PreprocessedDataset(small.folder, small.cases)
    assert data.num_mr_channels == 2
    mr = np.asarray(data.arrays("caseA")[0])
    assert mr.shape[0] == 2 and mr.min() >= -1 and mr.max() <= 1
    ranges = data.properties("caseA")["mr_normalisation"]["ranges"]
    assert len(ranges) == 2 and ranges[1][1] < 0.7 * ranges[0][1]  # each sequence has its own intensity range
    batches = StepBatches(data, [16, 16, 16], 4, seed=1, augment=False, channel_dropout=1.0)
    flags = np.concatenate([batches[k]["available"].numpy() for k in range(6)])
    assert set(map(tuple, flags)) == {(1.0, 0.0), (0.0, 1.0)}
    batch = batches[0]
    dropped = batch["available"] == 0
    assert float(batch["mr"][dropped].abs().max()) == 0.0
    assert torch.equal(batches[2]["available"], batches[2]["available"])  # a pure function of the step


@pytest.fixture(scope="module")
def trained(preprocessed_two_sequences, tmp_path_factory):
    """VAE, latent and wavelet-domain diffusion and the regression baseline, 8 steps each, on two sequences."""
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("two_sequences")
    dataset = tiny_copy(preprocessed_two_sequences, root, monkeypatch)
    options = TrainerOptions(device="cpu", num_workers=0, num_steps=8, steps_per_epoch=4)
    for stage in ("vae", "diffusion", "wavelet_diffusion", "regression"):
        run_training(dataset, stage, 0, options=options)
    yield {"root": root, "dataset": dataset, "results": root / "results" / dataset, "mp": monkeypatch}
    monkeypatch.undo()


def test_networks_take_images_and_flags(trained):
    vae = load_checkpoint(trained["results"] / "VAETrainer__wldmPlans__3d_wldm" / "fold_0" / "checkpoint_final.pt")
    assert vae["mr_channels"] == 2
    assert vae["networks"]["vae"]["stems.mr.weight"].shape[1] == 4  # 2 sequences + 2 availability flags
    assert vae["networks"]["vae"]["heads.mr.weight"].shape[0] == 2  # reconstructs the 2 sequences
    net = load_checkpoint(trained["results"] / "RegressionTrainer__wldmPlans__3d_wldm" / "fold_0"
                          / "checkpoint_final.pt")
    assert net["networks"]["net"]["stem.weight"].shape[1] == 4
    wavelet = load_checkpoint(trained["results"] / "WaveletDiffusionTrainer__wldmPlans__3d_wldm" / "fold_0"
                              / "checkpoint_final.pt")
    # 8 noisy CT sub-bands + 2 x 8 MR sub-bands + 2 flags
    assert wavelet["networks"]["unet"]["stem.weight"].shape[1] == 26


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Cases with both sequences, each alone, and one with a sequence the model never saw."""
    folder = tmp_path_factory.mktemp("two_in")
    mr = sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz"))
    crop = sitk.RegionOfInterest(mr, [97, 91, 41], [80, 80, 26])
    second = derived_sequence(crop)
    for name, channels in (("both", (crop, second)), ("t2only", (crop, None)), ("sqrtonly", (None, second)),
                           ("extra", (crop, second, crop))):
        for index, image in enumerate(channels):
            if image is not None:
                sitk.WriteImage(image, str(folder / f"{name}_{index:04d}.nii.gz"))
    return folder, crop


@pytest.mark.parametrize("trainer", ["DiffusionTrainer", "WaveletDiffusionTrainer", "RegressionTrainer"])
def test_prediction_with_any_subset_and_a_clear_error_for_unknown_channels(trained, inputs, trainer, tmp_path,
                                                                          capsys, caplog):
    folder, reference = inputs
    out = tmp_path / "sct"
    with caplog.at_level(logging.INFO):
        code = predict_main(["-i", str(folder), "-o", str(out), "-d", trained["dataset"], "-tr", trainer,
                             "--steps", "3", "--device", "cpu", "--seed", "5"])
    assert code == 1  # "extra" fails, the others finish
    err = capsys.readouterr().err + caplog.text
    assert "extra" in err and "0002 (extra_0002.nii.gz) unknown to the model" in err
    assert "0000 (T2), 0001 (T2sqrt)" in err
    assert "using MR channel(s) 0001 (T2sqrt); missing 0000 (T2)" in caplog.text
    arrays = {}
    for name in ("both", "t2only", "sqrtonly"):
        sct = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        assert Geometry.of(sct).size == Geometry.of(reference).size
        assert Geometry.of(sct).is_close(Geometry.of(reference), 1e-6)
        arrays[name] = sitk.GetArrayFromImage(sct)
        assert arrays[name].min() >= -1024 and (arrays[name] > -1024).any()
    assert not (out / "extra.nii.gz").exists()
    # the flags reach the network: different inputs give different sCTs
    assert not np.array_equal(arrays["both"], arrays["t2only"])
    assert not np.array_equal(arrays["both"], arrays["sqrtonly"])


def test_single_sequence_model_rejects_a_case_without_its_channel(preprocessed_small, tmp_path, monkeypatch, capsys):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch)
    run_training(dataset, "regression", 0, options=TrainerOptions(device="cpu", num_workers=0, num_steps=2))
    folder = tmp_path / "in"
    folder.mkdir()
    mr = sitk.RegionOfInterest(sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz")), [64, 64, 20], [90, 90, 30])
    sitk.WriteImage(mr, str(folder / "case_0001.nii.gz"))
    code = predict_main(["-i", str(folder), "-o", str(tmp_path / "out"), "-d", dataset, "-tr", "RegressionTrainer",
                         "--device", "cpu"])
    assert code == 1
    assert "0001 (case_0001.nii.gz) unknown to the model, which was trained on channel(s) 0000 (MR)" in \
        capsys.readouterr().err


def test_plan_dropout_is_validated(preprocessed_two_sequences, tmp_path, monkeypatch):
    dataset = tiny_copy(preprocessed_two_sequences, tmp_path, monkeypatch)
    path = tmp_path / "pre" / dataset / "plans.json"
    data = json.loads(path.read_text())
    data["configurations"]["3d_wldm"]["mr_channel_dropout"] = 1.5
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="mr_channel_dropout must be in"):
        run_training(dataset, "regression", 0, options=TrainerOptions(device="cpu", num_workers=0, num_steps=2))


def test_example_with_a_derived_second_sequence(raw_dir):
    assert main_example(["-d", "7", "--derived-second-sequence"]) == 0
    folder = raw_dir / "Dataset007_MRIDIRPhantomTwoSeq"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T2", "1": "T2_derived"} and "NOT a scan" in meta["description"]
    t2 = sitk.ReadImage(str(folder / "imagesTr" / "phantom_0000.nii.gz"))
    derived = sitk.ReadImage(str(folder / "imagesTr" / "phantom_0001.nii.gz"))
    assert Geometry.of(derived) == Geometry.of(t2)
    assert (folder / "README.md").is_file() and (folder / "targetsTr" / "phantom.nii.gz").is_file()
    values = sitk.GetArrayViewFromImage(derived)
    assert 0 <= values.min() and values.max() <= 20 * np.sqrt(sitk.GetArrayViewFromImage(t2).max()) + 1
