"""wldm_auto.planners.schema: plans.json round trip and strict validation naming the key."""
from __future__ import annotations

import copy
import json

import pytest

from wldm_auto.planners.schema import (
    PLANS_VERSION,
    BodyMaskPlan,
    ConfigurationPlan,
    DiffusionPlan,
    InferencePlan,
    PlanError,
    Plans,
    PreprocessingPlan,
    RegistrationPlan,
    VAEPlan,
)


def make_plans() -> Plans:
    config = ConfigurationPlan(
        data_identifier="wldm_3d_2mm",
        spacing=[2.0, 2.0, 2.5],
        median_shape=[59, 128, 128],
        patch_size=[64, 128, 128],
        batch_size=2,
        estimated_memory_gb=7.25,
        vae=VAEPlan(channels=[16, 32, 64], latent_channels=4, kl_weight=1e-7, wrm=False),
        diffusion=DiffusionPlan(timesteps=500, beta_schedule="cosine", unet_channels=[32, 64]),
        inference=InferencePlan(ddim_steps=20, samples=3),
        notes={"patch_size": "median shape rounded to a multiple of 16"},
    )
    return Plans(
        dataset_name="Dataset001_Phantom",
        plans_name="wldmPlans",
        channel_names={"0": "T2"},
        registration=RegistrationPlan(stages=["rigid"], iterations=[250], resolutions=[2]),
        preprocessing=PreprocessingPlan(
            target_spacing=[2.0, 2.0, 2.5],
            body_mask=BodyMaskPlan(threshold_fraction=0.2, fill_holes=False),
            ct_window=[-800.0, 800.0],
            notes={"ct_window": "paper"},
        ),
        configurations={"3d_wldm": config, "3d_small": copy.deepcopy(config)},
        planner={"name": "default", "gpu_memory_gb": 8, "reasons": ["a", "b"]},
        fingerprint_hash="0123abcd",
    )


@pytest.fixture
def plans_dict() -> dict:
    return json.loads(json.dumps(make_plans().to_dict()))


def load_dict(tmp_path, data: dict) -> Plans:
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(data))
    return Plans.load(path)


def test_save_load_round_trip(tmp_path):
    plans = make_plans()
    path = tmp_path / "out" / "plans.json"
    plans.save(path)
    loaded = Plans.load(path)
    assert loaded.to_dict() == plans.to_dict()
    assert loaded == plans
    assert isinstance(loaded.configurations["3d_wldm"], ConfigurationPlan)
    assert isinstance(loaded.configurations["3d_wldm"].vae, VAEPlan)
    assert isinstance(loaded.preprocessing.body_mask, BodyMaskPlan)
    assert loaded.configuration("3d_wldm").vae.kl_weight == 1e-7
    assert loaded.configuration("3d_wldm").patch_size == [64, 128, 128]
    assert loaded.preprocessing.ct_window == [-800.0, 800.0]
    assert loaded.version == PLANS_VERSION
    # saved twice -> the same bytes (stable, hand-editable JSON)
    plans.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()


def test_defaults_fill_missing_optional_keys(tmp_path):
    minimal = {
        "dataset_name": "Dataset001_X", "plans_name": "p", "channel_names": {"0": "MR"},
        "registration": {}, "preprocessing": {"body_mask": {}},
        "configurations": {"c": {"data_identifier": "d", "spacing": [2, 2, 2], "median_shape": [10, 20, 30],
                                 "patch_size": [8, 16, 16], "batch_size": 1, "estimated_memory_gb": 1}},
    }
    plans = load_dict(tmp_path, minimal)
    assert plans.registration == RegistrationPlan()
    assert plans.preprocessing == PreprocessingPlan()
    assert plans.configuration("c").vae == VAEPlan()
    assert plans.configuration("c").inference.ddim_steps == 50
    assert plans.preprocessing.ct_window == [-1024.0, 3071.0]


def test_unknown_configuration_name(plans_dict):
    plans = Plans.from_dict(plans_dict)
    with pytest.raises(PlanError, match="'3d_big' not in plans.*3d_wldm, 3d_small"):
        plans.configuration("3d_big")


@pytest.mark.parametrize("location", [
    (), ("preprocessing",), ("preprocessing", "body_mask"), ("configurations", "3d_wldm", "vae"),
    ("configurations", "3d_small"), ("registration",), ("configurations", "3d_wldm", "inference"),
])
def test_unknown_key_names_key_and_location(tmp_path, plans_dict, location):
    target = plans_dict
    for key in location:
        target = target[key]
    target["kl_wieght"] = 0.1  # a typo
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(plans_dict))
    with pytest.raises(PlanError) as info:
        Plans.load(path)
    message = str(info.value)
    where = ".".join((str(path),) + location)
    assert message.startswith(f"{where}: unknown key 'kl_wieght'"), message


@pytest.mark.parametrize("location, key, value, expected", [
    (("preprocessing",), "crop_margin_mm", "10", "expected a number, got '10'"),
    (("preprocessing", "body_mask"), "closing_mm", True, "expected a number, got True"),
    (("configurations", "3d_wldm"), "batch_size", 2.0, "expected an integer, got 2.0"),
    (("configurations", "3d_wldm"), "batch_size", True, "expected an integer, got True"),
    (("configurations", "3d_wldm", "vae"), "kl_weight", False, "expected a number, got False"),
    (("configurations", "3d_wldm", "vae"), "latent_channels", "8", "expected an integer, got '8'"),
    (("configurations", "3d_wldm", "vae"), "wrm", 1, "expected bool, got 1"),
    (("configurations", "3d_wldm", "diffusion"), "beta_schedule", 3, "expected str, got 3"),
    (("registration",), "iterations", 500, "expected a list, got int"),
    ((), "channel_names", ["MR"], "expected an object, got list"),
    ((), "preprocessing", 5, "expected an object, got int"),
])
def test_wrong_types_name_the_key(plans_dict, location, key, value, expected):
    target = plans_dict
    for part in location:
        target = target[part]
    target[key] = value
    with pytest.raises(PlanError) as info:
        Plans.from_dict(plans_dict, "my_plans.json")
    assert str(info.value) == f"{'.'.join(('my_plans.json',) + location + (key,))}: {expected}"


@pytest.mark.parametrize("path, value, expected", [
    (("configurations", "3d_wldm", "spacing"), [2, 2.0, "2"], "configurations.3d_wldm.spacing[2]: expected a number"),
    (("configurations", "3d_wldm", "patch_size"), [64, 128.5, 128], "configurations.3d_wldm.patch_size[1]: expected an integer"),
    (("preprocessing", "notes"), {"a": 1}, "preprocessing.notes.a: expected str, got 1"),
    (("registration", "stages"), ["rigid", None], "registration.stages[1]: expected str, got None"),
])
def test_wrong_item_types_name_the_index(plans_dict, path, value, expected):
    target = plans_dict
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(PlanError, match=r"^plans\." + expected.replace("[", r"\[").replace("]", r"\]")):
        Plans.from_dict(plans_dict)


def test_ints_accepted_for_floats(plans_dict):
    plans_dict["preprocessing"]["crop_margin_mm"] = 10
    plans_dict["preprocessing"]["ct_window"] = [-1000, 2000]
    plans_dict["configurations"]["3d_wldm"]["estimated_memory_gb"] = 8
    plans_dict["configurations"]["3d_wldm"]["spacing"] = [2, 2, 3]
    plans_dict["configurations"]["3d_wldm"]["vae"]["kl_weight"] = 0
    plans = Plans.from_dict(plans_dict)
    assert plans.preprocessing.crop_margin_mm == 10.0 and type(plans.preprocessing.crop_margin_mm) is float
    assert plans.preprocessing.ct_window == [-1000.0, 2000.0]
    assert all(type(v) is float for v in plans.preprocessing.ct_window)
    config = plans.configuration("3d_wldm")
    assert type(config.estimated_memory_gb) is float and config.estimated_memory_gb == 8.0
    assert [type(v) for v in config.spacing] == [float, float, float]
    assert type(config.vae.kl_weight) is float
    assert type(config.batch_size) is int


@pytest.mark.parametrize("location, key", [
    ((), "dataset_name"), ((), "configurations"), (("configurations", "3d_small"), "batch_size"),
    (("configurations", "3d_wldm"), "data_identifier"),
])
def test_missing_required_key_is_named(plans_dict, location, key):
    target = plans_dict
    for part in location:
        target = target[part]
    del target[key]
    with pytest.raises(PlanError) as info:
        Plans.from_dict(plans_dict, "p.json")
    assert str(info.value) == f"{'.'.join(('p.json',) + location)}: missing key {key!r}"


def test_version_and_empty_configurations(plans_dict):
    plans_dict["version"] = PLANS_VERSION + 1
    with pytest.raises(PlanError, match=f"version {PLANS_VERSION + 1} is not supported"):
        Plans.from_dict(plans_dict)
    plans_dict["version"] = PLANS_VERSION
    plans_dict["configurations"] = {}
    with pytest.raises(PlanError, match="'configurations' is empty"):
        Plans.from_dict(plans_dict)


def test_top_level_not_an_object(tmp_path):
    path = tmp_path / "plans.json"
    path.write_text("[1, 2]")
    with pytest.raises(PlanError, match=f"^{path}: expected an object, got list"):
        Plans.load(path)


def test_plan_error_is_value_error():
    assert issubclass(PlanError, ValueError)
