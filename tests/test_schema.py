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
    residual_diffusion_plan,
    wavelet_diffusion_plan,
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
    (("configurations", "3d_wldm", "vae"), "shortcut", -1, "-1 must be >= 0 (0: off; the shortcut's width in values "
     "per latent voxel)"),
    (("configurations", "3d_wldm", "vae"), "shortcut", True, "expected an integer, got True"),
    (("configurations", "3d_wldm", "wavelet_diffusion"), "center_latents", True,
     "the Haar first stage is used as it is (no latents measured); centring needs first_stage 'vae'"),
    (("configurations", "3d_wldm", "diffusion"), "beta_schedule", 3, "expected str, got 3"),
    (("configurations", "3d_wldm", "diffusion"), "timestep_power", 0.0, "0.0 must be > 0 (1: uniform timesteps)"),
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


# -- choice fields, section checks, legacy keys (issue 17) ------------------------------------------

def load_error(tmp_path, data: dict) -> tuple:
    """(path, message) of the PlanError that loading ``data`` from a file raises."""
    with pytest.raises(PlanError) as info:
        load_dict(tmp_path, data)
    return tmp_path / "plans.json", str(info.value)


@pytest.mark.parametrize("location, key, value, allowed", [
    (("configurations", "3d_wldm", "diffusion"), "prediction", "eps", "epsilon, v, x0"),
    (("configurations", "3d_wldm", "diffusion"), "first_stage", "pixel", "vae, haar"),
    (("configurations", "3d_small", "wavelet_diffusion"), "beta_schedule", "quadratic", "linear, cosine"),
    (("configurations", "3d_wldm", "vae"), "normalization", "batch", "voxel, group"),
    (("configurations", "3d_wldm", "vae"), "reconstruction_loss", "l3", "l1, l2"),
    (("configurations", "3d_wldm", "diffusion"), "latent_loss", "huber", "l1, l2"),
    (("registration",), "metric", "MutualInformation", "AdvancedMattesMutualInformation, "),
    (("configurations", "3d_wldm", "inference"), "precision", "half", "float32, bfloat16, float16"),
    (("registration",), "pyramid", "gaussian", "smoothing, recursive, shrinking"),
    (("configurations", "3d_wldm"), "case_sampling", "size", "uniform, volume"),
])
def test_bad_choice_names_file_field_and_allowed_values(tmp_path, plans_dict, location, key, value, allowed):
    target = plans_dict
    for part in location:
        target = target[part]
    target[key] = value
    path, message = load_error(tmp_path, plans_dict)
    assert message.startswith(f"{'.'.join((str(path),) + location + (key,))}: {value!r} is not allowed (allowed: ")
    assert allowed in message and "\n" not in message


@pytest.mark.parametrize("key, value, where", [
    ("stages", ["rigid", "bspine"], "registration.stages[1]: 'bspine'"),
    ("initial_orientations", ["identity", "flip_x"], "registration.initial_orientations[1]: 'flip_x'"),
])
def test_bad_item_of_a_choice_list_is_named_with_its_index(plans_dict, key, value, where):
    plans_dict["registration"][key] = value
    plans_dict["registration"]["iterations"], plans_dict["registration"]["resolutions"] = [1, 1], [1, 1]
    with pytest.raises(PlanError, match=r"^p\.json\." + where.replace("[", r"\[").replace("]", r"\]")
                       + " is not allowed"):
        Plans.from_dict(plans_dict, "p.json")


def test_every_allowed_value_loads_and_matches_its_consumer(plans_dict):
    from wldm_auto.diffusion import schedule
    from wldm_auto.models.precision import DTYPES
    from wldm_auto.networks.blocks import NORMALIZATIONS
    from wldm_auto.planners import schema
    from wldm_auto.preprocessing.registration import ORIENTATIONS, PYRAMIDS
    from wldm_auto.trainers.residual_trainer import PRIOR_FOLDS
    from wldm_auto.trainers.vae_trainer import RECONSTRUCTION_LOSSES

    assert set(schema.PREDICTIONS) == set(schedule.PREDICTIONS)
    assert set(schema.BETA_SCHEDULES) == set(schedule.SCHEDULES)
    assert set(schema.VAE_NORMALIZATIONS) == set(NORMALIZATIONS)
    assert set(schema.RECONSTRUCTION_LOSSES) == set(RECONSTRUCTION_LOSSES)
    assert set(schema.INITIAL_ORIENTATIONS) == set(ORIENTATIONS)
    assert set(schema.REGISTRATION_PYRAMIDS) == set(PYRAMIDS)
    assert set(schema.PRECISIONS) == set(DTYPES)
    assert set(schema.PRIOR_FOLDS) == set(PRIOR_FOLDS)
    for precision in schema.PRECISIONS:
        plans_dict["configurations"]["3d_wldm"]["inference"]["precision"] = precision
        assert Plans.from_dict(plans_dict).configuration("3d_wldm").inference.precision == precision
    for prediction in schema.PREDICTIONS:
        for beta_schedule in schema.BETA_SCHEDULES:
            plans_dict["configurations"]["3d_wldm"]["diffusion"].update(prediction=prediction,
                                                                         beta_schedule=beta_schedule)
            section = Plans.from_dict(plans_dict).configuration("3d_wldm").diffusion
            schedule.NoiseSchedule(section.timesteps, section.beta_schedule, section.beta_start, section.beta_end,
                                   section.prediction)  # the consumer accepts what the schema accepts
    plans_dict["registration"].update(stages=list(schema.REGISTRATION_STAGES), iterations=[1, 1, 1],
                                      resolutions=[1, 1, 1])
    assert Plans.from_dict(plans_dict).registration.stages == ["rigid", "affine", "bspline"]


def test_plans_without_precision_predict_in_float32(plans_dict):
    for config in plans_dict["configurations"].values():
        config["inference"].pop("precision", None)  # plans written before the option
    assert {c.inference.precision for c in Plans.from_dict(plans_dict).configurations.values()} == {"float32"}


def test_registration_lists_must_have_equal_lengths(plans_dict):
    plans_dict["registration"].update(stages=["rigid", "bspline"], iterations=[100], resolutions=[2, 2])
    with pytest.raises(PlanError, match=r"^plans\.registration: stages, iterations and resolutions .* 2, 1, 2$"):
        Plans.from_dict(plans_dict)


@pytest.mark.parametrize("key, value, expected", [
    ("samples", 0, "inference.samples: 0 must be at least 1"),
    ("ddim_steps", 0, "inference.ddim_steps: 0 must be at least 1"),
    ("tile_overlap", 1.0, "inference.tile_overlap: 1.0 outside [0, 1)"),
    ("ddim_eta", -0.5, "inference.ddim_eta: -0.5 must be >= 0"),
    ("latent_margin", -1, "inference.latent_margin: -1 must be >= 0 (latent voxels; 0: tiles at latent_overlap)"),
    ("edge_std_mm", -2.0, "inference.edge_std_mm: -2.0 must be a length >= 0 (mm; 0: no edge term)"),
    ("second_opinion_factor", -1.0, "inference.second_opinion_factor: -1.0 must be a finite number >= 0"),
    ("second_opinion_smoothing_mm", float("nan"), "inference.second_opinion_smoothing_mm: nan must be a finite number >= 0"),
])
def test_inference_values_are_checked(plans_dict, key, value, expected):
    plans_dict["configurations"]["3d_wldm"]["inference"][key] = value
    with pytest.raises(PlanError) as info:
        Plans.from_dict(plans_dict)
    assert str(info.value) == f"plans.configurations.3d_wldm.{expected}"


def test_augmentation_section_defaults_round_trip_and_checks(tmp_path, plans_dict):
    from wldm_auto.planners.schema import AugmentationPlan
    from wldm_auto.trainers.augmentation import DEFAULT_PARAMS

    assert plans_dict["configurations"]["3d_wldm"]["augmentation"] == DEFAULT_PARAMS  # written with every plan
    del plans_dict["configurations"]["3d_wldm"]["augmentation"]  # plans from before the section: defaults
    assert Plans.from_dict(plans_dict).configuration("3d_wldm").augmentation == AugmentationPlan()
    plans_dict["configurations"]["3d_wldm"]["augmentation"] = {"p_rotation": 0, "scale": [0.9, 1.1]}
    loaded = Plans.from_dict(plans_dict).configuration("3d_wldm").augmentation
    assert loaded.p_rotation == 0.0 and loaded.scale == [0.9, 1.1] and loaded.p_gamma == 0.3
    for bad, expected in (({"p_mirror": 1.5}, "augmentation.p_mirror: probability 1.5 outside [0, 1]"),
                          ({"mirror_axes": [0, 3]}, "augmentation.mirror_axes: [0, 3] must be distinct axes"),
                          ({"gamma": [1.5, 0.7]}, "augmentation.gamma: [1.5, 0.7] must be [low, high]"),
                          ({"rotation_degrees": 400}, "augmentation.rotation_degrees: 400.0 outside [0, 180]"),
                          ({"p_rotaton": 0.5}, "augmentation: unknown key 'p_rotaton'")):
        plans_dict["configurations"]["3d_wldm"]["augmentation"] = bad
        with pytest.raises(PlanError) as info:
            Plans.from_dict(plans_dict, "x.json")
        assert str(info.value).startswith(f"x.json.configurations.3d_wldm.{expected}"), str(info.value)


def test_old_plans_with_target_spacing_still_load(tmp_path, plans_dict):
    """preprocessing.target_spacing was read by nobody: accepted (and dropped) when it equals the spacing."""
    assert "target_spacing" not in plans_dict["preprocessing"]
    for config in plans_dict["configurations"].values():
        config["spacing"] = [2.0, 2.0, 2.5]
    plans_dict["preprocessing"]["target_spacing"] = [2, 2, 2.5]
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(plans_dict))
    plans = Plans.load(path)
    assert plans.configuration("3d_small").spacing == [2.0, 2.0, 2.5]
    plans.save(tmp_path / "again.json")
    assert "target_spacing" not in json.loads((tmp_path / "again.json").read_text())["preprocessing"]
    assert "target_spacing" in json.loads(path.read_text())["preprocessing"]  # the file itself is not touched


def test_old_plans_with_an_edited_target_spacing_say_where_to_set_it(tmp_path, plans_dict):
    plans_dict["preprocessing"]["target_spacing"] = [1.5, 1.5, 1.5]  # edited, expecting an effect
    path, message = load_error(tmp_path, plans_dict)
    assert message.startswith(f"{path}.preprocessing.target_spacing: [1.5, 1.5, 1.5] is no longer read")
    assert "configurations.3d_wldm.spacing [2.0, 2.0, 2.5]" in message and "set the spacing there" in message
    plans_dict["preprocessing"]["target_spacing"] = "2 mm"
    with pytest.raises(PlanError, match=r"^p\.preprocessing\.target_spacing: expected a list"):
        Plans.from_dict(plans_dict, "p")


def test_a_partial_section_takes_its_own_defaults(plans_dict):
    """Keys a section lacks come from that section's defaults, not from a bare DiffusionPlan: the residual and
    wavelet-domain sections differ from the latent one (Haar first stage, x0, no DSCA; the residual sCT is the
    posterior mean). A plan written before a key existed, or edited down by hand, must not change model."""
    config = plans_dict["configurations"]["3d_wldm"]
    for section in ("wavelet_diffusion", "residual_diffusion"):
        for key in ("first_stage", "prediction", "dsca", "sct_estimate", "unet_channels"):
            config[section].pop(key, None)
        config[section]["training"].pop("learning_rate", None)
    config["diffusion"].pop("sct_estimate", None)
    loaded = Plans.from_dict(plans_dict).configuration("3d_wldm")
    for section, expected in (("wavelet_diffusion", wavelet_diffusion_plan()),
                              ("residual_diffusion", residual_diffusion_plan())):
        got = getattr(loaded, section)
        assert (got.first_stage, got.prediction, got.dsca, got.unet_channels, got.sct_estimate) == (
            expected.first_stage, expected.prediction, expected.dsca, expected.unet_channels, expected.sct_estimate)
        assert got.training.learning_rate == expected.training.learning_rate
    assert loaded.residual_diffusion.sct_estimate == "posterior_mean" and loaded.residual_diffusion.first_stage == "haar"
    assert loaded.diffusion.sct_estimate == "sample_mean" and loaded.diffusion.first_stage == "vae"


def test_prior_blur_is_only_a_residual_setting(plans_dict):
    config = plans_dict["configurations"]["3d_wldm"]
    config["residual_diffusion"]["prior_blur_mm"] = 6.0
    assert Plans.from_dict(plans_dict).configuration("3d_wldm").residual_diffusion.prior_blur_mm == 6.0
    config["residual_diffusion"]["prior_blur_mm"] = -1.0
    with pytest.raises(PlanError, match=r"residual_diffusion\.prior_blur_mm: -1.0 must be >= 0 mm"):
        Plans.from_dict(plans_dict)
    config["residual_diffusion"]["prior_blur_mm"] = 0.0
    config["diffusion"]["prior_blur_mm"] = 2.0
    with pytest.raises(PlanError, match=r"diffusion\.prior_blur_mm: only the residual_diffusion section"):
        Plans.from_dict(plans_dict)


def test_out_of_fold_prior_is_only_a_residual_setting(plans_dict):
    config = plans_dict["configurations"]["3d_wldm"]
    config["residual_diffusion"]["prior_folds"] = "out_of_fold"
    assert Plans.from_dict(plans_dict).configuration("3d_wldm").residual_diffusion.prior_folds == "out_of_fold"
    config["diffusion"]["prior_folds"] = "out_of_fold"
    with pytest.raises(PlanError, match=r"diffusion\.prior_folds: 'out_of_fold' needs a regression prior"):
        Plans.from_dict(plans_dict)

