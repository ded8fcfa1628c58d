"""Training data: patches, paired step batches, augmentation and the background loader (CPU, small)."""
from __future__ import annotations

import logging
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from wldm_auto.trainers import loader as loader_module
from wldm_auto.trainers.augmentation import build_augmentation, enlarged_patch_size
from wldm_auto.trainers.data import PreprocessedDataset, StepBatches, sample_patch
from wldm_auto.trainers.loader import default_num_workers, make_loader

PATCH = (16, 16, 16)
NO_SPATIAL = {"p_mirror": 0.0, "p_rotation": 0.0, "p_scale": 0.0}
NO_INTENSITY = {"p_brightness": 0.0, "p_contrast": 0.0, "p_gamma": 0.0}


@pytest.fixture(scope="module")
def dataset(preprocessed_small) -> PreprocessedDataset:
    return PreprocessedDataset(preprocessed_small.folder, preprocessed_small.cases)


def _equal(a: dict, b: dict) -> bool:
    return a["cases"] == b["cases"] and all(torch.equal(a[k], b[k]) for k in ("mr", "ct", "valid", "body"))


def _smooth(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth float32 field in [-1, 1] (so linear interpolation errors stay small)."""
    grids = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    rng = np.random.default_rng(seed)
    field = sum(np.sin(2 * np.pi * (rng.uniform(0.5, 1.5) * g + rng.uniform())) for g in grids) / len(grids)
    return field.astype(np.float32)


def test_dataset_reads_cases_and_pickles_cheaply(dataset, preprocessed_small):
    assert dataset.cases == preprocessed_small.cases and dataset.num_mr_channels == 1
    mr, ct, masks = dataset.arrays("caseB")
    assert isinstance(mr, np.memmap) and mr.shape[1:] == ct.shape[1:] == masks.shape[1:]
    assert list(mr.shape[1:]) == dataset.properties("caseB")["shape_zyx"]
    state = pickle.dumps(dataset)
    assert b"memmap" not in state and len(state) < 200_000
    assert pickle.loads(state).cases == dataset.cases


def test_missing_cases_are_skipped_with_a_warning(preprocessed_small, caplog):
    with caplog.at_level(logging.WARNING):
        ds = PreprocessedDataset(preprocessed_small.folder, ["caseA", "failedcase", "caseC"])
    assert ds.cases == ["caseA", "caseC"]
    assert "failedcase" in caplog.text
    with pytest.raises(ValueError, match="none of the 2"):
        PreprocessedDataset(preprocessed_small.folder, ["ghost1", "ghost2"])


def test_missing_array_of_a_finished_case_is_named(preprocessed_small, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(preprocessed_small.folder, folder)
    (folder / "caseB_masks.npy").unlink()
    with pytest.raises(ValueError, match="caseB_masks.npy"):
        PreprocessedDataset(folder, preprocessed_small.cases)


def test_batch_shapes_and_dtypes(dataset):
    batch = StepBatches(dataset, PATCH, 4, seed=1)[0]
    assert batch["mr"].shape == (4, 1, *PATCH)
    for key in ("ct", "valid", "body"):
        assert batch[key].shape == (4, 1, *PATCH), key
    for key in ("mr", "ct", "valid", "body"):
        assert batch[key].dtype == torch.float32, key
    assert len(batch["cases"]) == 4 and set(batch["cases"]) <= set(dataset.cases)
    assert batch["mr"].min() >= -1 and batch["mr"].max() <= 1 and batch["ct"].min() >= -1 and batch["ct"].max() <= 1
    for key in ("valid", "body"):
        assert set(torch.unique(batch[key]).tolist()) <= {0.0, 1.0}
    assert batch["body"].mean() > 0.3  # patches are centred on the phantom, not on air


def test_padding_when_the_image_is_smaller_than_the_patch(dataset):
    mr = np.full((1, 10, 12, 14), 0.5, np.float32)
    masks = np.ones((2, 10, 12, 14), np.uint8)
    for fraction in (0.0, 1.0):
        mr_p, ct_p, masks_p = sample_patch(mr, mr.copy(), masks, (16, 13, 14), np.random.default_rng(3), fraction)
        assert mr_p.shape == ct_p.shape == (1, 16, 13, 14) and masks_p.shape == (2, 16, 13, 14)
        assert mr_p.dtype == ct_p.dtype == np.float32 and masks_p.dtype == np.uint8
        inside = masks_p[0] == 1
        assert inside.sum() == 10 * 12 * 14  # the whole image lies inside the patch
        assert np.all(mr_p[0][inside] == 0.5) and np.all(mr_p[0][~inside] == -1.0)
        assert np.all(ct_p[0][~inside] == -1.0) and np.all(masks_p[:, ~inside] == 0)
    real = sample_patch(*dataset.arrays("caseA"), (40, 40, 40), np.random.default_rng(0))
    assert real[0].shape == (1, 40, 40, 40) and real[2][0].sum() < 40**3


def test_body_centred_sampling_finds_a_small_body():
    masks = np.zeros((2, 60, 60, 60), np.uint8)
    masks[:, 40:48, 5:13, 30:38] = 1
    mr = np.where(masks[1:] > 0, 0.3, -1.0).astype(np.float32)
    rng = np.random.default_rng(0)

    def body_share(fraction: float) -> float:
        return float(np.mean([sample_patch(mr, mr, masks, (8, 8, 8), rng, fraction)[2][1].mean()
                              for _ in range(40)]))

    assert body_share(1.0) > 0.3  # centred on one of 8^3 body voxels: ~0.42 expected
    assert body_share(0.0) < 0.05  # uniform: the body is 0.24 % of the volume


def test_same_step_is_bit_identical_and_steps_differ(dataset):
    batches = StepBatches(dataset, PATCH, 2, seed=7)
    state = np.random.get_state()[1].copy()
    first, again = batches[5], batches[5]
    assert _equal(first, again)
    assert not torch.equal(first["mr"], batches[6]["mr"])
    assert not torch.equal(first["mr"], StepBatches(dataset, PATCH, 2, seed=8)[5]["mr"])
    assert not torch.equal(first["mr"], StepBatches(dataset, PATCH, 2, seed=7, rank=1, world_size=2)[5]["mr"])
    assert np.array_equal(np.random.get_state()[1], state)  # the global numpy RNG is left as it was


def test_workers_give_the_same_batches_as_the_main_process(dataset):
    batches = StepBatches(dataset, PATCH, 2, seed=3)
    serial = list(make_loader(batches, 4, 9, num_workers=0))
    parallel = list(make_loader(batches, 4, 9, num_workers=2))
    assert len(serial) == len(parallel) == 5
    assert all(_equal(a, b) for a, b in zip(serial, parallel))
    assert _equal(serial[2], batches[6])  # resuming at step 6 sees what step 6 saw


def test_pairs_are_two_different_patients(dataset, preprocessed_small):
    batches = StepBatches(dataset, PATCH, 6, seed=0, augment=False)
    seen = set()
    for step in range(20):
        cases = batches[step]["cases"]
        assert all(a != b for a, b in zip(cases[0::2], cases[1::2]))
        seen.update(cases)
    assert seen == set(dataset.cases)
    single = StepBatches(PreprocessedDataset(preprocessed_small.folder, ["caseA"]), PATCH, 2, seed=0)[0]
    assert single["cases"] == ["caseA", "caseA"] and not torch.equal(single["mr"][0], single["mr"][1])


def test_odd_batch_size_raises(dataset):
    for size in (3, 1, 0):
        with pytest.raises(ValueError, match="even"):
            StepBatches(dataset, PATCH, size, seed=0)


def test_masks_stay_binary_and_follow_the_image_after_spatial_augmentation():
    masks = np.zeros((2, 2, 40, 40, 40), np.uint8)
    masks[:, :, 8:30, 12:34, 5:28] = 1
    masks[:, 0, :, :, 35:] = 0
    image = masks[:, 1:].astype(np.float32) * 1.6 - 1.0  # body 0.6, air -1
    aug = build_augmentation({**NO_INTENSITY, "p_rotation": 1.0, "p_scale": 1.0}, (32, 32, 32))
    np.random.seed(0)
    out = aug({"mr": image, "ct": image.copy(), "masks": masks})
    assert out["masks"].dtype == np.uint8 and set(np.unique(out["masks"])) == {0, 1}
    assert out["mr"].shape == (2, 1, 32, 32, 32) and out["masks"].shape == (2, 2, 32, 32, 32)
    agree = (out["masks"][:, 1] == 1) == (out["mr"][:, 0] > -0.2)
    assert agree.mean() > 0.99
    assert out["mr"].min() >= -1 and out["mr"].max() <= 1
    assert not np.array_equal(out["masks"][:, 1], masks[:, 1, 4:36, 4:36, 4:36])  # something moved
    assert np.array_equal(image, masks[:, 1:].astype(np.float32) * 1.6 - 1.0)  # input untouched


def test_ct_and_masks_are_not_intensity_augmented():
    rng = np.random.default_rng(2)
    mr = np.stack([_smooth((20, 20, 20), s) for s in range(4)]).reshape(2, 2, 20, 20, 20)
    ct = np.stack([_smooth((20, 20, 20), s) for s in (9, 10)])[:, None]
    masks = (rng.random((2, 2, 20, 20, 20)) > 0.3).astype(np.uint8)
    aug = build_augmentation({**NO_SPATIAL, "p_brightness": 1.0, "p_contrast": 1.0, "p_gamma": 1.0})
    np.random.seed(1)
    out = aug({"mr": mr, "ct": ct, "masks": masks})
    assert np.array_equal(out["ct"], ct) and np.array_equal(out["masks"], masks)
    assert np.abs(out["mr"] - mr).max() > 0.01
    assert out["mr"].min() >= -1 and out["mr"].max() <= 1


def test_spatial_transforms_are_identical_across_channels():
    image = np.stack([_smooth((36, 36, 36), 4), _smooth((36, 36, 36), 5)])[:, None]
    masks = np.ones((2, 2, 36, 36, 36), np.uint8)
    aug = build_augmentation({**NO_INTENSITY, "p_mirror": 1.0, "p_rotation": 1.0, "p_scale": 1.0}, (28, 28, 28))
    np.random.seed(2)
    out = aug({"mr": image, "ct": image.copy(), "masks": masks})
    inside = out["masks"][:, :1] == 1
    assert 0.5 < inside.mean() < 1.0  # the rotation brought border in
    assert np.abs(out["mr"] - out["ct"])[inside].max() < 1e-5
    assert np.abs(out["mr"] - image[:, :, 4:32, 4:32, 4:32]).max() > 0.1


def test_augmentation_parameters_are_checked():
    with pytest.raises(ValueError, match="p_rotaton"):
        build_augmentation({"p_rotaton": 0.5})
    with pytest.raises(ValueError, match="p_gamma"):
        build_augmentation({"p_gamma": 2.0})
    assert build_augmentation(None, (64, 64, 64)).input_patch_size == enlarged_patch_size((64, 64, 64), 15.0, 1.15)
    assert build_augmentation(NO_SPATIAL, (64, 64, 64)).input_patch_size == (64, 64, 64)


def test_default_num_workers(monkeypatch):
    expected = max(0, min(8, len(os.sched_getaffinity(0)) - 1))
    assert default_num_workers() == expected
    monkeypatch.setattr(loader_module.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_num_workers() == 8
    monkeypatch.setattr(loader_module.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_num_workers() == 0


def test_the_plans_augmentation_section_drives_the_augmenter(dataset, preprocessed_small, tmp_path):
    """Defaults of the plan section = the augmentation as it was; an edited plan changes it."""
    import json

    from wldm_auto.planners.schema import AugmentationPlan, Plans

    plans = Plans.load(preprocessed_small.folder.parent / "plans.json")
    section = plans.configuration("3d_wldm").augmentation
    assert section == AugmentationPlan()
    default = StepBatches(dataset, PATCH, 2, seed=0, augment_params=section)
    assert default.augmentation.params == build_augmentation(None, PATCH).params
    assert default.augmentation.input_patch_size == enlarged_patch_size(PATCH, 15.0, 1.15)

    data = plans.to_dict()
    data["configurations"]["3d_wldm"]["augmentation"].update(p_rotation=0, p_scale=0, p_gamma=1.0, gamma=[0.5, 2.0])
    (tmp_path / "plans.json").write_text(json.dumps(data))
    edited = Plans.load(tmp_path / "plans.json").configuration("3d_wldm").augmentation
    batches = StepBatches(dataset, PATCH, 2, seed=0, augment_params=edited)
    names = [type(t).__name__ for t in batches.augmentation.transforms]
    assert "AffineTransform" in [type(t).__name__ for t in default.augmentation.transforms]
    assert "AffineTransform" not in names and batches.augmentation.input_patch_size == PATCH
    gamma = next(t for t in batches.augmentation.transforms if type(t).__name__ == "GammaTransform")
    assert tuple(gamma.gamma_range) == (0.5, 2.0) and gamma.p_per_sample == 1.0
    assert not torch.equal(batches[3]["mr"], default[3]["mr"])  # same seed and step, other augmentation
    assert _equal(batches[3], StepBatches(dataset, PATCH, 2, seed=0, augment_params=edited)[3])


def test_validation_box_bounds_voxels_and_centres_on_the_body() -> None:
    """Whole volume when small enough or unlimited; else at most max_voxels, longest side cut first,
    centred on the body's box and inside the volume."""
    from wldm_auto.trainers.data import validation_box

    body = np.zeros((200, 60, 50), np.uint8)
    body[120:190, 10:50, 5:45] = 1
    whole = tuple(slice(0, n) for n in body.shape)
    assert validation_box(body, 0) == whole and validation_box(body, body.size) == whole
    box = validation_box(body, 100_000)
    sizes = [s.stop - s.start for s in box]
    assert 0.7 * 100_000 < np.prod(sizes) <= 100_000 and sizes == [43, 48, 45]  # the longest side is cut first
    assert all(0 <= s.start and s.stop <= n for s, n in zip(box, body.shape))
    assert abs((box[0].start + box[0].stop) / 2 - 155) <= 1  # the body's box centre along z


def test_volume_case_sampling_follows_the_voxel_counts(dataset, preprocessed_small, monkeypatch):
    """``case_sampling: "volume"``: the first case of each pair is drawn in proportion to the voxel counts, the
    second among the other cases likewise (pairs still hold two cases), and "uniform" stays what it was."""
    mr = dataset.arrays("caseA")[0]
    assert dataset.voxel_count("caseA") == int(np.prod(mr.shape[1:]))
    counts = {c: (8 if c == "caseA" else 1) * 1000 for c in dataset.cases}
    monkeypatch.setattr(PreprocessedDataset, "voxel_count", lambda self, case: counts[case])
    batches = StepBatches(dataset, PATCH, 2, seed=0, augment=False, case_sampling="volume")
    rng = np.random.default_rng(0)
    firsts, members = [], []
    for _ in range(4000):
        pair = batches._pairs(rng)
        assert pair[0] != pair[1]
        firsts.append(pair[0])
        members += pair
    expected = counts["caseA"] / sum(counts.values())
    assert abs(firsts.count("caseA") / len(firsts) - expected) < 0.03
    others = [c for c in dataset.cases if c != "caseA"]
    # second member: A with 8/9 when another case came first, so A is in (0.8 + 0.2 * 8/9) of the pairs, the
    # others in about half (uniform: 2/3 each)
    assert abs(members.count("caseA") / len(firsts) - (expected + (1 - expected) * 8 / 9)) < 0.03
    assert all(abs(members.count(c) / len(firsts) - 0.5) < 0.05 for c in others)
    uniform = StepBatches(dataset, PATCH, 2, seed=4, augment=False)
    assert _equal(uniform[3], StepBatches(dataset, PATCH, 2, seed=4, augment=False, case_sampling="uniform")[3])
    with pytest.raises(ValueError, match="case_sampling"):
        StepBatches(dataset, PATCH, 2, seed=0, case_sampling="size")
    single = StepBatches(PreprocessedDataset(preprocessed_small.folder, ["caseA"]), PATCH, 2, seed=0,
                         case_sampling="volume")
    assert single._pairs(rng) == ["caseA", "caseA"]
