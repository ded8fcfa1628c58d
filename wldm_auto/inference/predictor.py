"""Synthetic CT for folders of MR volumes with a trained diffusion or regression model (``wldm_predict``).

Per case: read the MR channels, body mask, crop/resample/normalise exactly as
in training, sample the CT latent for the whole volume (see
``diffusion/synthesis.py``) once per fold and sample, average to HU, put the
result back onto the input MR's exact grid, set everything outside the body
to air (-1024) and write int16. With ``samples * folds > 1`` and
``save_std`` the voxel-wise standard deviation (HU) is written beside it.
Regression-baseline folds (``RegressionTrainer``) are deterministic: one
tiled U-Net pass each, so only several folds give a standard deviation.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from wldm_auto.diffusion.schedule import NoiseSchedule
from wldm_auto.diffusion.synthesis import LatentSynthesizer
from wldm_auto.inference.export import AIR_HU, hu_int16, to_input_grid, write_dicom_series
from wldm_auto.inference.inputs import InputCase, find_cases
from wldm_auto.io.images import ImageReadError, file_ending, read_image, write_image
from wldm_auto.networks.haar import HaarFirstStage
from wldm_auto.networks.regression_unet import RegressionSynthesizer, RegressionUNet
from wldm_auto.networks.vae import WaveletVAE
from wldm_auto.planners.schema import ConfigurationPlan, InferencePlan, Plans
from wldm_auto.preprocessing.case import CaseError, body_mask, check_channels, preprocess_mr
from wldm_auto.preprocessing.normalization import denormalise_ct
from wldm_auto.trainers.checkpoint import CheckpointError, load_checkpoint
from wldm_auto.trainers.diffusion_trainer import build_unet

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint_final.pt"
Synthesizer = LatentSynthesizer | RegressionSynthesizer


@dataclass
class LoadedFold:
    fold: int
    plans: Plans
    configuration: str
    mr_channels: int
    synthesizer: Synthesizer
    checkpoint: Path


@dataclass
class PredictionOutcome:
    case: str
    status: str  # "done", "skipped" or "failed"
    message: str = ""
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)


def load_fold(folder: Path, device: torch.device, overlap: float | None = None, checkpoint: str = CHECKPOINT,
              inference: InferencePlan | None = None) -> LoadedFold:
    """The synthesizer of one ``fold_F`` folder (diffusion or regression); ValueError naming the file on problems.

    ``inference``: prediction settings to use instead of those stored with the checkpoint (tiles, steps)."""
    path = folder / checkpoint
    if not path.is_file():
        raise ValueError(f"{path}: not found (is training of {folder.name} finished? "
                         f"it writes {checkpoint} at the end)")
    try:
        state = load_checkpoint(path, map_location="cpu")
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None
    stage = state.get("stage")
    if stage not in BUILDERS:
        raise ValueError(f"{path}: a {stage!r} checkpoint; prediction needs a "
                         f"{' or '.join(repr(k) for k in BUILDERS)} model")
    plans = Plans.from_dict(state["plans"], str(path))
    config = plans.configuration(state["configuration"])
    if inference is not None:
        config = replace(config, inference=inference)
    overlap = config.inference.tile_overlap if overlap is None else overlap
    try:
        synthesizer = BUILDERS[stage](state, config, overlap, device)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{path}: weights do not match the plan stored in it ({first[:200]})") from None
    return LoadedFold(int(state["fold"]), plans, state["configuration"], int(state["mr_channels"]), synthesizer, path)


def _diffusion(state: dict[str, Any], config: ConfigurationPlan, overlap: float, device: torch.device) -> Synthesizer:
    """The first stage (embedded VAE or fixed Haar) and the EMA U-Net of a diffusion checkpoint."""
    plan = getattr(config, state.get("plan_section", "diffusion"))
    mr_channels = int(state["mr_channels"])
    first_stage: torch.nn.Module
    if plan.first_stage == "haar":
        first_stage = HaarFirstStage(mr_channels)
    else:
        first_stage = WaveletVAE(mr_channels, config.vae)
        first_stage.load_state_dict(state["networks"]["vae"])
    unet = build_unet(plan, first_stage)
    unet.load_state_dict(state["networks"]["ema"])
    return LatentSynthesizer(first_stage.to(device).eval(), unet.to(device).eval(), NoiseSchedule.from_plan(plan),
                             float(state["latent_scale"]), config.patch_size, overlap, device,
                             latent_tile_scale=config.inference.latent_tile_scale,
                             latent_overlap=config.inference.latent_overlap,
                             image_tile_scale=config.inference.image_tile_scale)


def _regression(state: dict[str, Any], config: ConfigurationPlan, overlap: float, device: torch.device) -> Synthesizer:
    """The U-Net of a regression-baseline checkpoint."""
    net = RegressionUNet(int(state["mr_channels"]), config.regression)
    net.load_state_dict(state["networks"]["net"])
    return RegressionSynthesizer(net.to(device).eval(), config.patch_size, overlap, device)


BUILDERS = {"diffusion": _diffusion, "wavelet_diffusion": _diffusion, "regression": _regression}


def load_model(model_folder: Path, folds: Sequence[int] | None, device: torch.device,
               overlap: float | None = None, checkpoint: str = CHECKPOINT,
               inference: InferencePlan | None = None) -> list[LoadedFold]:
    """All requested folds (default: every ``fold_*`` folder) of a model folder (``inference``: see load_fold)."""
    model_folder = Path(model_folder)
    if not model_folder.is_dir():
        raise ValueError(f"{model_folder}: model folder not found")
    names = [f"fold_{f}" for f in folds] if folds else sorted(p.name for p in model_folder.glob("fold_*") if p.is_dir())
    if not names:
        raise ValueError(f"{model_folder}: holds no fold_* folder")
    loaded = [load_fold(model_folder / name, device, overlap, checkpoint, inference) for name in names]
    first = loaded[0]
    for other in loaded[1:]:
        if other.plans.preprocessing != first.plans.preprocessing or other.mr_channels != first.mr_channels:
            raise ValueError(f"{other.checkpoint}: preprocessing differs from {first.checkpoint}; cannot ensemble")
    return loaded


def output_paths(case: InputCase, output: Path, ending: str | None) -> tuple[Path, Path]:
    """(sCT path, std path) for ``case``."""
    source = case.channels[min(case.channels)]
    ending = ending or file_ending(source) or ".nii.gz"
    return output / f"{case.name}{ending}", output / f"{case.name}_std{ending}"


def describe_channel(plans: Plans, channel: int) -> str:
    return f"{channel:04d} ({plans.channel_names.get(str(channel), 'unnamed')})"


def usable_channels(case: InputCase, fold: LoadedFold, config: ConfigurationPlan) -> tuple[list[int], torch.Tensor | None]:
    """(channels present, (C,) availability flags or None when all are there); CaseError for unknown channels.

    A model of several sequences takes any non-empty subset of them (missing
    ones are flagged, as in training with ``mr_channel_dropout``); a
    single-sequence model needs its one channel.
    """
    expected = list(range(fold.mr_channels))
    trained = ", ".join(describe_channel(fold.plans, c) for c in expected)
    unknown = sorted(set(case.channels) - set(expected))
    if unknown:
        names = ", ".join(f"{c:04d} ({Path(case.channels[c]).name})" for c in unknown)
        raise CaseError(f"{case.name}: MR channel(s) {names} unknown to the model, which was trained on "
                        f"channel(s) {trained}")
    present = [c for c in expected if c in case.channels]
    missing = [c for c in expected if c not in case.channels]
    if not missing:
        return present, None
    if fold.mr_channels == 1 or not present:
        raise CaseError(f"{case.name}: no MR channel the model knows (it needs {trained})")
    log.info("%s: using MR channel(s) %s; missing %s", case.name,
             ", ".join(describe_channel(fold.plans, c) for c in present),
             ", ".join(describe_channel(fold.plans, c) for c in missing))
    if config.mr_channel_dropout <= 0:
        log.warning("%s: this model was trained with mr_channel_dropout 0, i.e. never without a sequence: "
                    "its output with missing channels is untested", case.name)
    return present, torch.tensor([float(c in case.channels) for c in expected])


def predict_case(
    folds: list[LoadedFold], case: InputCase, output: Path, steps: int | None = None, samples: int = 1,
    seed: int = 0, eta: float = 0.0, save_std: bool = False, ending: str | None = None, dicom_out: bool = False,
) -> PredictionOutcome:
    """Predict one case; raises ImageReadError/CaseError/ValueError for inputs that cannot be used."""
    start = time.time()
    first = folds[0]
    plans, config = first.plans, first.plans.configuration(first.configuration)
    present, available = usable_channels(case, first, config)
    paths = [case.channels[c] for c in present]
    images = [read_image(p, sitk.sitkFloat32) for p in paths]
    check_channels(images, [str(p) for p in paths])
    body = body_mask(images[0], plans)  # from the first sequence present
    pre = preprocess_mr(images, body, plans, config.spacing)
    mr_array = np.zeros((first.mr_channels, *pre.mr.shape[1:]), dtype=np.float32)  # missing sequences: zeros
    mr_array[present] = pre.mr
    mr = torch.from_numpy(mr_array)
    window = tuple(plans.preprocessing.ct_window)
    steps = steps or config.inference.ddim_steps
    draws = []
    for k, fold in enumerate(folds):
        generator = torch.Generator(device="cpu").manual_seed(seed + 1000 * k)
        count = 1 if getattr(fold.synthesizer, "deterministic", False) else samples  # repeats add nothing
        normalised = fold.synthesizer.sample(mr, steps, eta, count, generator, progress=True, available=available)
        draws.append(denormalise_ct(normalised.clamp(-1, 1).cpu().numpy(), window))
    stack = np.concatenate(draws)
    sct_path, std_path = output_paths(case, output, ending)
    sct = hu_int16(to_input_grid(stack.mean(0), pre.properties, images[0], body, AIR_HU), window)
    write_image(sct, sct_path)
    outputs = [sct_path]
    if save_std and len(stack) > 1:
        std = to_input_grid(stack.std(0), pre.properties, images[0], body, 0.0)
        write_image(std, std_path)
        outputs.append(std_path)
    elif save_std:
        deterministic = all(getattr(f.synthesizer, "deterministic", False) for f in folds)
        reason = "a deterministic regression model with one fold" if deterministic else "one fold and one sample"
        log.info("%s: std map not written: %s gives no spread (use several folds%s)", case.name, reason,
                 "" if deterministic else " or --samples")
    if dicom_out:
        folder = output / f"{case.name}_dicom"
        write_dicom_series(sct, folder)
        outputs.append(folder)
    return PredictionOutcome(case.name, "done", seconds=time.time() - start, outputs=outputs)


def predict_folder(
    input_dir: Path, output_dir: Path, folds: list[LoadedFold], steps: int | None = None, samples: int = 1,
    seed: int = 0, eta: float = 0.0, save_std: bool = False, resume: bool = False, overwrite: bool = False,
    ending: str | None = None, dicom_out: bool = False,
) -> list[PredictionOutcome]:
    """Predict every case of ``input_dir``; failing cases are reported, the others still run."""
    cases = find_cases(input_dir)
    output_dir = Path(output_dir)
    existing = [c for c in cases if output_paths(c, output_dir, ending)[0].exists()]
    if existing and not (resume or overwrite):
        raise FileExistsError(
            f"{output_dir}: predictions exist for {', '.join(c.name for c in existing[:5])}"
            f"{' ...' if len(existing) > 5 else ''}: use --continue to skip them or --overwrite to replace them")
    output_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for index, case in enumerate(cases, 1):
        if case in existing and resume:
            outcomes.append(PredictionOutcome(case.name, "skipped", "output exists (--continue)"))
            continue
        log.info("case %d/%d: %s", index, len(cases), case.name)
        try:
            outcome = predict_case(folds, case, output_dir, steps, samples, seed, eta, save_std, ending, dicom_out)
            log.info("%s: done in %.1f s -> %s", case.name, outcome.seconds, outcome.outputs[0])
        except (ImageReadError, CaseError, ValueError) as exc:
            outcome = PredictionOutcome(case.name, "failed", str(exc))
            log.error("%s failed: %s", case.name, exc)
        outcomes.append(outcome)
    return outcomes
