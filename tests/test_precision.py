"""Half-precision prediction (plan ``inference.precision``, ``wldm_predict --precision``): float32 is the plain
prediction bit for bit; bfloat16 autocast keeps geometry and HU window and stays close to float32."""
from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import PHANTOM_DIR, tiny_models
from wldm_auto import Predictor
from wldm_auto.models import precision
from wldm_auto.preprocessing.case import body_mask

# |bfloat16 - float32| sCT difference (HU) allowed on the phantom's centre below. Measured on this project's CPU
# (torch 2.13) with this test's tiny model (VAE + diffusion trained 8 steps each, 4 mm, plan 4 DDIM steps x 1
# sample), on the whole phantom: seeds 0, 1, 2 gave at most 22, 21, 21 HU and 5.6, 5.5, 5.5 HU on average inside
# the body (99th percentile 12 HU); 10 steps x 5 samples, seed 0: 17 / 5.5 HU; 2026-12-07, seed 0: 26 / 6.1 HU
# on the whole phantom, 24 / 5.0 HU on its centre. bfloat16 keeps 8 significant bits
# (relative rounding 2^-9: ~4 HU of the 4095 HU window per rounding of an output near full scale), so tens
# of HU at worst are expected. The bounds leave ~4.5x (max) and ~2.7x (mean) headroom for other CPUs'
# kernels and still fail gross errors: overflow or NaN (clamped to the window edges: thousands of HU), a
# mis-scaled or mis-placed tile output (hundreds), or autocast not acting at all (0 HU).
MAX_DIFF_HU = 100
MEAN_DIFF_HU = 15.0


@pytest.fixture(scope="module")
def model(preprocessed_small, tmp_path_factory):
    with tiny_models(preprocessed_small, tmp_path_factory.mktemp("precision"), ("vae", "diffusion")) as folders:
        yield folders["diffusion"]


@pytest.fixture(scope="module")
def phantom():
    """The bundled phantom MR's central eighth (128 x 128 x 47 of its 256 x 256 x 94 at 1 x 1 x 2.5 mm): CPU
    bfloat16 has no fast kernels here, so the whole volume took 47 s against 6 s in float32 (2026-12-07)."""
    whole = sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz"), sitk.sitkFloat32)
    size = whole.GetSize()
    return whole[size[0] // 4: size[0] // 4 + size[0] // 2, size[1] // 4: size[1] // 4 + size[1] // 2,
                 size[2] // 4: size[2] // 4 + size[2] // 2]


def predict(model, mr, precision_name=None, seed=0):
    predictor = Predictor.from_model_folder(model, device="cpu", progress=False, precision=precision_name)
    start = time.perf_counter()
    sct = predictor.predict(mr, seed=seed).sct
    return predictor, sct, time.perf_counter() - start


@pytest.fixture(scope="module")
def float32_sct(model, phantom):
    return predict(model, phantom)


def test_float32_is_the_default_bit_for_bit(model, phantom, float32_sct):
    default, sct, _ = float32_sct
    assert default.folds[0].plans.configuration("3d_wldm").inference.precision == "float32"
    assert default.folds[0].synthesizer.autocast is None
    explicit, again, _ = predict(model, phantom, "float32")
    assert explicit.folds[0].synthesizer.autocast is None
    assert np.array_equal(sitk.GetArrayViewFromImage(sct), sitk.GetArrayViewFromImage(again))


def test_bfloat16_keeps_geometry_and_window_and_stays_close(model, phantom, float32_sct):
    _, reference, seconds32 = float32_sct
    predictor, sct, seconds16 = predict(model, phantom, "bfloat16")
    assert predictor.folds[0].synthesizer.autocast is torch.bfloat16
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(sct, get)() == getattr(phantom, get)(), get
    values = sitk.GetArrayViewFromImage(sct).astype(np.int32)
    assert np.isfinite(values).all() and values.min() >= -1024 and values.max() <= 3071
    difference = np.abs(values - sitk.GetArrayViewFromImage(reference).astype(np.int32))
    body = sitk.GetArrayFromImage(body_mask(phantom, predictor.folds[0].plans)) > 0  # a copy: the mask is temporary
    print(f"\nbfloat16 vs float32 (phantom centre, seed 0): max |diff| {difference.max()} HU, mean inside the body "
          f"{difference[body].mean():.2f} HU; seconds float32 {seconds32:.2f}, bfloat16 {seconds16:.2f}")
    assert 0 < difference.max() <= MAX_DIFF_HU  # 0: autocast did not act
    assert difference[body].mean() <= MEAN_DIFF_HU


def test_precision_reaches_the_networks_only(model, phantom):
    """Under bfloat16 the networks see autocast; what is blended and stepped is float32."""
    predictor = Predictor.from_model_folder(model, device="cpu", progress=False, precision="bfloat16")
    synthesizer = predictor.folds[0].synthesizer
    seen = []

    def hook(module, inputs, output):
        seen.append((torch.is_autocast_enabled("cpu"), output.dtype))

    handle = synthesizer.unet.register_forward_hook(hook)
    try:
        mr = torch.rand(1, 16, 16, 16) * 2 - 1
        z = synthesizer.encode_mr(mr)
        out = synthesizer.sample(mr, 2, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert z.dtype == torch.float32 and out.dtype == torch.float32
    assert seen and all(enabled and dtype == torch.bfloat16 for enabled, dtype in seen)
    assert not torch.is_autocast_enabled("cpu")


def test_cli_precision_reaches_the_predictor(model, monkeypatch, tmp_path, capsys):
    from wldm_auto.cli.predict import main
    from wldm_auto.inference import folds as folds_module

    original, loaded = folds_module.load_model, []

    def spy(*args, **kwargs):
        folds = original(*args, **kwargs)
        loaded.append((kwargs.get("precision"), folds[0].synthesizer.autocast))
        return folds

    monkeypatch.setattr(folds_module, "load_model", spy)
    (tmp_path / "in").mkdir()
    crop = sitk.RegionOfInterest(sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz")), [64, 64, 24], [96, 96, 35])
    sitk.WriteImage(crop, str(tmp_path / "in" / "case_0000.nii.gz"))
    code = main(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", str(model), "--steps", "2",
                 "--device", "cpu", "--precision", "bfloat16"])
    assert code == 0, capsys.readouterr().err
    assert loaded == [("bfloat16", torch.bfloat16)] and (tmp_path / "out" / "case.nii.gz").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "o2"), "-m", str(model), "--precision", "half"])
    assert exit_info.value.code == 2 and "float32, bfloat16, float16" in capsys.readouterr().err.replace("'", "")


def test_api_refuses_an_unknown_precision(model):
    with pytest.raises(ValueError, match=r"precision 'half': use one of float32, bfloat16, float16"):
        Predictor.from_model_folder(model, device="cpu", precision="half")


def test_autocast_dtypes_and_fallbacks(monkeypatch):
    from wldm_auto.planners.schema import PRECISIONS

    assert tuple(precision.DTYPES) == PRECISIONS
    assert precision.autocast_dtype("float32", "cpu") is None
    assert precision.autocast_dtype("bfloat16", "cpu") is torch.bfloat16
    assert precision.autocast_dtype("float16", "cpu") is torch.float16  # CPU autocast runs float16 in torch >= 2.4
    monkeypatch.setattr(precision, "autocast_works", lambda device_type, dtype: False)
    with pytest.raises(ValueError, match="cpu autocast in torch .* does not run float16; use float32 or bfloat16"):
        precision.autocast_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="use one of float32, bfloat16, float16"):
        precision.autocast_dtype("fp8", "cpu")


def test_regression_unet_under_bfloat16_blends_in_float32():
    from wldm_auto.models.regression import RegressionSynthesizer
    from wldm_auto.networks.regression_unet import RegressionUNet

    torch.manual_seed(0)
    net = RegressionUNet(1, [8, 16], 1, 4).eval()
    mr = torch.rand(1, 16, 24, 32) * 2 - 1
    plain = RegressionSynthesizer(net, [8, 8, 16]).predict(mr)
    half = RegressionSynthesizer(net, [8, 8, 16], autocast=torch.bfloat16).predict(mr)
    assert half.dtype == torch.float32 and plain.dtype == torch.float32
    assert 0 < (half - plain).abs().max() < 0.05


def test_bfloat16_counts_only_where_the_gpu_runs_it_natively(monkeypatch):
    """``torch.cuda.is_bf16_supported()`` says yes on GPUs that only emulate bfloat16 (V100, T4): there the
    trainers' AMP and ``--precision bfloat16`` must take float16 (+ GradScaler) instead."""
    from wldm_auto.models import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.cuda_bf16_native() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts there
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    for capability, native in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert precision.cuda_bf16_native("cuda:0") is native
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert precision.autocast_dtype("bfloat16", "cuda") is torch.float16  # a V100: float16, with a warning
