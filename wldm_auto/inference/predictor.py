"""Synthetic CT for folders of MR volumes with a trained diffusion or regression model (``wldm_predict``).

Per case: read the MR channels, body mask, crop/resample/normalise exactly as
in training, sample the CT latent for the whole volume (see
``models/latent.py``) once per fold and sample, average to HU, put the
result back onto the input MR's exact grid, set everything outside the body
to air (-1024) and write int16. With ``samples * folds > 1`` and
``save_std`` the voxel-wise standard deviation (HU) is written beside it,
multiplied by the model's std scale when its folder holds ``std_scale.json``
(``wldm_calibrate_std``, ``inference/calibration.py``); with ``confidence_hu``
``CASE_confidence`` marks the voxels inside the body whose 2 * std is below it.
With a second model's sCTs (``second_opinion``, ``inference/second_opinion.py``) their smoothed
disagreement with this model's sCT adds to the std map before the std scale.
Regression-baseline folds (``RegressionTrainer``) are deterministic: one
tiled U-Net pass each, so only several folds give a standard deviation.
A model whose plan asks for the posterior-mean sCT (``sct_estimate``,
residual diffusion's default) gives its one-step estimate as the fold's sCT;
its samples are drawn only for the std map.

:func:`synthesize` is the in-memory per-case core; :func:`predict_case` (files)
and the Python API (``inference/api.py``) both call it. Models are loaded by
``inference/folds.py``.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from wldm_auto.inference.attenuation import mu_map
from wldm_auto.inference.calibration import check_confidence_hu, confidence_mask, scale_std
from wldm_auto.inference.edges import edge_std
from wldm_auto.inference.folds import LoadedFold, check_eta, check_seed, check_std_scale_settings, draws_per_sample
from wldm_auto.inference.export import AIR_HU, hu_int16, to_input_grid, write_dicom_series
from wldm_auto.inference.inputs import InputCase, check_output_folder, find_cases, input_files, select_part
from wldm_auto.inference.second_opinion import (add_second_opinion, check_factor, read_second_opinion,
                                                second_opinion_files)
from wldm_auto.io.files import is_disk_full
from wldm_auto.io.image_folders import CONFIDENCE_SUFFIX, MUMAP_SUFFIX, STD_SUFFIX
from wldm_auto.io.images import FILE_ENDINGS, ImageReadError, error_reason, file_ending, read_image, write_image
from wldm_auto.models.phases import Phases
from wldm_auto.paths import model_folder_name
from wldm_auto.planners.schema import ConfigurationPlan, Plans
from wldm_auto.preprocessing.case import CaseError, body_mask, check_channels, preprocess_mr
from wldm_auto.io.normalization import denormalise_ct

log = logging.getLogger(__name__)


@dataclass
class PredictionOutcome:
    case: str
    status: str  # "done", "skipped" or "failed"
    message: str = ""
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (done cases)


def output_paths(case: InputCase, output: Path, ending: str | None) -> tuple[Path, Path]:
    """(sCT path, std path) for ``case``."""
    source = case.channels[min(case.channels)]
    ending = ending or file_ending(source) or ".nii.gz"
    return output / f"{case.name}{ending}", output / f"{case.name}{STD_SUFFIX}{ending}"


def mumap_path(case: InputCase, output: Path, ending: str | None) -> Path:
    """``CASE_mumap<ending>``: the attenuation map written with ``mumap``."""
    sct = output_paths(case, output, ending)[0]
    return output / f"{case.name}{MUMAP_SUFFIX}{sct.name[len(case.name):]}"


def confidence_path(case: InputCase, output: Path, ending: str | None) -> Path:
    """``CASE_confidence<ending>``: the uint8 mask of trusted voxels written with ``confidence_hu``."""
    sct = output_paths(case, output, ending)[0]
    return output / f"{case.name}{CONFIDENCE_SUFFIX}{sct.name[len(case.name):]}"


def case_outputs(case: InputCase, output: Path, ending: str | None) -> list[Path]:
    """Every path a prediction of ``case`` may write: sCT, std map, DICOM folder, mu-map, confidence mask."""
    return [*output_paths(case, output, ending), output / f"{case.name}_dicom", mumap_path(case, output, ending),
            confidence_path(case, output, ending)]


def check_output_collisions(cases: Sequence[InputCase], output: Path, ending: str | None) -> None:
    """ValueError when two cases would write the same file (case ``p``'s std map ``p_std`` and a case named
    ``p_std``): one would silently replace the other."""
    owners: dict[Path, str] = {}
    for case in cases:
        for path in case_outputs(case, output, ending):
            other = owners.setdefault(path, case.name)
            if other != case.name:
                raise ValueError(f"cases {other} and {case.name} would both write {path.name} (an output of one is "
                                 f"named like the other); rename one of them")


def dicom_labels(folds: Sequence[LoadedFold], draws: int, seed: int) -> tuple[str, str, list[str]]:
    """(series description, derivation description, model identity) of the sCT DICOM series ``folds`` make."""
    first = folds[0]
    name = model_folder_name(first.trainer or "unknown", first.plans.plans_name, first.configuration)
    numbers = ",".join(str(f.fold) for f in folds)
    model_hash = hashlib.sha256(" ".join(f.sha256 for f in folds).encode()).hexdigest()
    description = f"SYNTHETIC CT {first.trainer} f{numbers} {model_hash[:8]}"
    axes = first.plans.configuration(first.configuration).inference.mirror_axes
    mirroring = f", test-time mirroring along axes {axes}" if axes else ""
    derivation = (f"Synthetic CT computed from MR (not acquired) by wldm_auto: model {name}, fold(s) {numbers}, "
                  f"checkpoint sha256 {', '.join(f.sha256 for f in folds)}; {draws} draw(s), seed {seed}{mirroring}")
    return description, derivation, [name, *(f.sha256 for f in folds)]


def describe_channel(plans: Plans, channel: int) -> str:
    return f"{channel:04d} ({plans.channel_names.get(str(channel), 'unnamed')})"


def usable_channels(case: InputCase, fold: LoadedFold, config: ConfigurationPlan) -> tuple[list[int], torch.Tensor | None]:
    """(channels present, (C,) availability flags or None when all are there); CaseError for unknown channels."""
    return channel_flags(case.name, {c: Path(p).name for c, p in case.channels.items()}, fold, config)


def channel_flags(name: str, labels: Mapping[int, str], fold: LoadedFold,
                  config: ConfigurationPlan) -> tuple[list[int], torch.Tensor | None]:
    """(channels present, (C,) availability flags or None when all are there); CaseError for unknown channels.

    ``labels``: channel index -> what the user gave for it (a file name), for
    messages. A model of several sequences takes any non-empty subset of them
    (missing ones are flagged, as in training with ``mr_channel_dropout``); a
    single-sequence model needs its one channel.
    """
    expected = list(range(fold.mr_channels))
    trained = ", ".join(describe_channel(fold.plans, c) for c in expected)
    unknown = sorted(set(labels) - set(expected))
    if unknown:
        names = ", ".join(f"{c:04d} ({labels[c]})" for c in unknown)
        raise CaseError(f"{name}: MR channel(s) {names} unknown to the model, which was trained on "
                        f"channel(s) {trained}")
    present = [c for c in expected if c in labels]
    missing = [c for c in expected if c not in labels]
    if not missing:
        return present, None
    if fold.mr_channels == 1 or not present:
        raise CaseError(f"{name}: no MR channel the model knows (it needs {trained})")
    log.info("%s: using MR channel(s) %s; missing %s", name,
             ", ".join(describe_channel(fold.plans, c) for c in present),
             ", ".join(describe_channel(fold.plans, c) for c in missing))
    if config.mr_channel_dropout <= 0:
        log.warning("%s: this model was trained with mr_channel_dropout 0, i.e. never without a sequence: "
                    "its output with missing channels is untested", name)
    return present, torch.tensor([float(c in labels) for c in expected])


def check_case(folds: list[LoadedFold], case: InputCase, output: Path, ending: str | None,
               protected: set[Path]) -> tuple[list[str], torch.Tensor]:
    """The checks made before a case is read, on every rank of a run: its usable MR channels (CaseError
    otherwise) and no output of it (sCT, std, DICOM folder, mu-map) that is an input (ValueError).
    Returns (channels present, availability vector)."""
    first = folds[0]
    present, available = usable_channels(case, first, first.plans.configuration(first.configuration))
    _refuse_inputs(case_outputs(case, output, ending), protected)
    return present, available


def _refuse_inputs(paths: Sequence[Path], protected: set[Path]) -> None:
    """ValueError if any of ``paths`` is (a link to) an input of this run: inputs are never written."""
    for path in paths:
        if Path(path).resolve() in protected:
            raise ValueError(f"{path}: is an input of this run; refusing to overwrite it")


def _remove_outputs(paths: Sequence[Path]) -> None:
    """Best-effort removal of the outputs an attempt wrote before failing (so --continue redoes the case)."""
    for path in paths:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("%s: could not remove this incomplete output (%s)", path, exc)


@dataclass
class Synthesis:
    """What :func:`synthesize` returns: images on the first given MR channel's grid, nothing written."""

    sct: sitk.Image  # int16 HU, -1024 outside the body
    std: sitk.Image | None  # float32 HU over all draws (times std_scale); None with one draw or when not asked for
    draws: int  # samples x mirrorings x folds actually drawn (a deterministic fold: one sample)
    phases: dict[str, float] = field(default_factory=dict)  # seconds: mask, preprocess, encode, sample, ...
    body: sitk.Image | None = None  # uint8 body mask the sCT was cut with (1 inside; the sCT is air outside)
    confidence: sitk.Image | None = None  # uint8: 1 inside the body where 2 * std < confidence_hu (if asked)
    std_scale: float = 1.0  # the factor applied to ``std`` (the model's std_scale.json; 1.0 without one)


def no_spread(folds: Sequence[LoadedFold], samples: int) -> tuple[str, str] | None:
    """(why, what to do) when these folds with ``samples`` samples per fold make only one distinct draw and
    no model predicts a std of its own (no std map); None when they make several, or a regression U-Net has an
    error head (plan ``regression.error_head``)."""
    deterministic = not any(f.synthesizer.is_stochastic for f in folds)
    if len(folds) > 1 or (samples > 1 and not deterministic) or draws_per_sample(folds[0]) > 1:
        return None
    if any(getattr(f.synthesizer, "predicts_std", False) for f in folds):  # an error head's own std map
        return None
    if deterministic:
        return ("a deterministic regression model with one fold and no error head",
                "use several folds or test-time mirroring (--mirror-axes), or train it with regression.error_head")
    return f"one fold and {samples} sample", "use several folds or more than one sample (--samples N)"


def spread_possible(folds: Sequence[LoadedFold], samples: int) -> bool:
    """Whether these folds with ``samples`` samples per fold make more than one distinct draw (a std map)."""
    return no_spread(folds, samples) is None


def check_confidence(folds: Sequence[LoadedFold], samples: int, confidence_hu: float | None,
                     option: str = "confidence_hu") -> float | None:
    """``confidence_hu`` checked (> 0) and usable with these settings: ValueError (naming ``option``)
    when no std map would be made (one fold drawn once, or a deterministic model with one fold)."""
    confidence_hu = check_confidence_hu(confidence_hu, option)
    missing = no_spread(folds, samples) if confidence_hu is not None else None
    if missing is not None:
        raise ValueError(f"{option} needs a std map, i.e. several draws, but {missing[0]} gives one ({missing[1]})")
    return confidence_hu


def check_second_opinion(folds: Sequence[LoadedFold], samples: int, want_std: bool,
                         confidence_hu: float | None) -> None:
    """ValueError unless these settings make a std map a second opinion can add to."""
    if not want_std and confidence_hu is None:
        raise ValueError("a second opinion adds to the std map: ask for one (--save-std or --confidence-hu)")
    missing = no_spread(folds, samples)
    if missing is not None:
        raise ValueError(f"a second opinion adds to the std map, but {missing[0]} makes none ({missing[1]})")


def second_opinion_cases(second_opinion_dir: Path, output_dir: Path, cases: Sequence[InputCase]) -> dict[str, Path]:
    """The second model's sCT per case (see ``second_opinion_files``); ValueError when one is missing or the
    output folder is the second opinion's (its sCTs would be replaced)."""
    if Path(second_opinion_dir).resolve() == Path(output_dir).resolve():
        raise ValueError(f"{output_dir}: the output folder is the second-opinion folder (its sCTs would be "
                         "replaced); choose another output folder")
    return second_opinion_files(second_opinion_dir, [c.name for c in cases])


def second_opinion_used(folds: Sequence[LoadedFold], factor: float | None, given: bool) -> float:
    """The second-opinion factor a run applies: 0 without a second opinion, else ``factor`` or the plan's."""
    if not given:
        return 0.0
    return folds[0].plans.configuration(folds[0].configuration).inference.second_opinion_factor \
        if factor is None else float(factor)


def plan_samples(folds: Sequence[LoadedFold], samples: int | None = None) -> int:
    """``samples`` if given, else the model's plan (``inference.samples``): samples per fold."""
    if samples is not None:
        return samples
    first = folds[0]
    return first.plans.configuration(first.configuration).inference.samples


def synthesize(
    folds: list[LoadedFold], images: Mapping[int, sitk.Image], available: torch.Tensor | None,
    steps: int | None = None, samples: int | None = None, seed: int = 0, eta: float | None = None, want_std: bool = True,
    names: Sequence[str] | None = None, progress: bool = True, confidence_hu: float | None = None,
    second_opinion: sitk.Image | None = None, second_opinion_factor: float | None = None,
) -> Synthesis:
    """sCT (and std) for one case's MR channels: the per-image code both ``wldm_predict`` and
    :class:`~wldm_auto.inference.api.Predictor` run, so the two give identical voxels.

    ``images``: channel index -> float32 3D image of the channels present (sorted, one
    grid); ``available``: from :func:`channel_flags`; ``steps``/``samples``/``eta`` None: the plan's.
    The result has the first channel's exact geometry. CaseError/ValueError for unusable input.
    The std is multiplied by the folds' ``std_scale``; ``confidence_hu`` (HU > 0): also the
    confidence mask (:func:`~wldm_auto.inference.calibration.confidence_mask`), which needs several draws.
    ``second_opinion``: another model's sCT (HU) on the first channel's grid; its disagreement with this sCT,
    times ``second_opinion_factor`` (None: the plan's ``inference.second_opinion_factor``), adds to the std
    map (``inference/second_opinion.py``); a ValueError when no std map would be made.
    """
    samples = plan_samples(folds, samples)
    if samples < 1 or (steps is not None and steps < 1):
        raise ValueError(f"samples ({samples}) and steps ({steps}) must be at least 1")
    confidence_hu = check_confidence(folds, samples, confidence_hu)
    second_opinion_factor = check_factor(second_opinion_factor)
    if second_opinion is not None:
        check_second_opinion(folds, samples, want_std, confidence_hu)
    first = folds[0]
    eta, seed = check_eta(eta), check_seed(seed)
    plans, config = first.plans, first.plans.configuration(first.configuration)
    present = sorted(images)
    chosen = [images[c] for c in present]
    check_channels(chosen, list(names) if names is not None else [f"channel {c:04d}" for c in present])
    if second_opinion is not None:  # before any work: the second sCT must lie on the MR's grid
        second_opinion = read_second_opinion(second_opinion, chosen[0], names[0] if names else "the MR")
    phases = Phases(getattr(first.synthesizer, "device", None))
    with phases("body_mask"):
        body = body_mask(chosen[0], plans)  # from the first sequence present
    with phases("preprocess"):  # crop to the body, resample to the plan spacing, normalise
        pre = preprocess_mr(chosen, body, plans, config.spacing)
        mr_array = np.zeros((first.mr_channels, *pre.mr.shape[1:]), dtype=np.float32)  # missing sequences: zeros
        mr_array[present] = pre.mr
        mr = torch.from_numpy(mr_array)
    window = tuple(plans.preprocessing.ct_window)
    steps = steps or config.inference.ddim_steps
    eta = config.inference.ddim_eta if eta is None else eta
    want_spread = want_std or confidence_hu is not None
    draws, centres, own_variances = [], [], []  # own: a model's predicted std (error head), HU^2
    for k, fold in enumerate(folds):
        generator = torch.Generator(device="cpu").manual_seed(seed + 1000 * k)
        count = samples if fold.synthesizer.is_stochastic else 1  # repeats add nothing
        timed = hasattr(fold.synthesizer, "phases")  # splits its time into encode / sample / decode
        if timed:
            fold.synthesizer.phases = phases
        try:
            with phases("synthesizer") if not timed else nullcontext():
                estimate = getattr(fold.synthesizer, "mean_estimate", None)  # plan sct_estimate posterior_mean
                # its own generator: the same estimate whatever the number of samples drawn
                centre = None if estimate is None else estimate(
                    mr, torch.Generator(device="cpu").manual_seed(seed + 1000 * k), available)
                own_std = None
                if want_spread and getattr(fold.synthesizer, "predicts_std", False):  # same pass, plus its std
                    normalised, own_std = fold.synthesizer.sample_with_std(
                        mr, steps, eta, count, generator, progress=progress, available=available)
                elif centre is None or want_spread:  # the samples are the sCT, or they give the std
                    normalised = fold.synthesizer.sample(mr, steps, eta, count, generator, progress=progress,
                                                         available=available)
                else:  # the estimate is the sCT and no std is asked for: no sampling
                    normalised = None
        finally:
            if timed:
                fold.synthesizer.phases = None
        with phases("denormalise"):
            centres.append(None if centre is None else denormalise_ct(centre.clamp(-1, 1).cpu().numpy(), window))
            draws.append(centres[-1][None] if normalised is None
                         else denormalise_ct(normalised.clamp(-1, 1).cpu().numpy(), window))
            if own_std is not None:  # normalised units -> HU (the CT normalisation is linear)
                own_variances.append((own_std.cpu().numpy().astype(np.float32) * ((window[1] - window[0]) / 2)) ** 2)
    with phases("resample_back"):  # to the input grid, air outside the body
        stack = np.concatenate(draws)
        if all(c is None for c in centres):  # the sCT is the mean of every draw
            mean = stack.mean(0)
        else:  # per fold its posterior-mean estimate (or its draws' mean), then the folds' mean
            mean = np.mean([d.mean(0) if c is None else c for d, c in zip(draws, centres)], axis=0)
        sct = hu_int16(to_input_grid(mean, pre.properties, chosen[0], body, AIR_HU,
                                     config.inference.export_interpolation), window)
        # the spread linearly: a cubic spline can undershoot below 0
        spread = want_spread and (len(stack) > 1 or bool(own_variances))
        if spread:  # the draws' spread, the models' own predicted variance (mean over the folds), the edge term
            variance = stack.var(0) + (np.mean(own_variances, axis=0) if own_variances else 0.0)
            if config.inference.edge_std_mm > 0:
                variance = variance + edge_std(mean, config.spacing, config.inference.edge_std_mm) ** 2
            std = to_input_grid(np.sqrt(variance).astype(np.float32), pre.properties, chosen[0], body, 0.0)
        else:
            std = None
    if std is not None and second_opinion is not None:
        with phases("second_opinion"):
            std = add_second_opinion(std, sct, second_opinion, body,
                                     second_opinion_used(folds, second_opinion_factor, True),
                                     config.inference.second_opinion_smoothing_mm)
    scale = first.std_scale
    if std is not None:
        std = scale_std(std, scale)
    confidence = confidence_mask(std, body, confidence_hu) if confidence_hu is not None and std is not None else None
    return Synthesis(sct, std, len(stack), phases.seconds, body, confidence, scale if std is not None else 1.0)


def predict_case(
    folds: list[LoadedFold], case: InputCase, output: Path, steps: int | None = None, samples: int | None = None,
    seed: int = 0, eta: float | None = None, save_std: bool = False, ending: str | None = None,
    dicom_out: bool = False, protected: set[Path] | None = None, mumap: bool = False,
    confidence_hu: float | None = None, second_opinion: Path | None = None,
    second_opinion_factor: float | None = None,
) -> PredictionOutcome:
    """Predict one case (read, :func:`synthesize`, write); raises ImageReadError/CaseError/ValueError for
    inputs that cannot be used. ``mumap``: also write ``CASE_mumap`` (cm^-1 at 511 keV, plan ``mu_map``);
    ``dicom_out`` from a DICOM MR: the series joins the MR's patient, study and frame of reference;
    ``confidence_hu``: also write ``CASE_confidence`` (uint8, 1 inside the body where 2 * std < it).
    ``second_opinion``: another model's sCT of this case (file or DICOM folder on the MR's grid), whose
    disagreement adds to the std map (see :func:`synthesize`).

    A failed write (full disk) raises an OSError naming the file; the outputs
    this call already wrote for the case are removed. ``protected``: resolved
    paths never to write to (the run's inputs).
    """
    start = time.time()
    present, available = check_case(folds, case, output, ending, protected or set())
    paths = [case.channels[c] for c in present]
    sct_path, std_path = output_paths(case, output, ending)
    dicom_folder = output / f"{case.name}_dicom"
    mumap_file = mumap_path(case, output, ending)
    confidence_file = confidence_path(case, output, ending)
    phases = Phases()
    with phases("read"):
        images = {c: read_image(p, sitk.sitkFloat32) for c, p in zip(present, paths)}
    result = synthesize(folds, images, available, steps, samples, seed, eta, want_std=save_std,
                        names=[str(p) for p in paths], confidence_hu=confidence_hu, second_opinion=second_opinion,
                        second_opinion_factor=second_opinion_factor)
    phases.update(result.phases)
    outputs: list[Path] = []
    with phases("write"):
        try:
            write_image(result.sct, sct_path)
            outputs.append(sct_path)
            if result.std is not None and save_std:
                write_image(result.std, std_path)
                outputs.append(std_path)
            elif save_std:
                why, remedy = no_spread(folds, plan_samples(folds, samples)) or ("one draw", "use several folds")
                log.info("%s: std map not written: %s gives no spread (%s)", case.name, why, remedy)
            if result.confidence is not None:
                write_image(result.confidence, confidence_file)
                outputs.append(confidence_file)
            if mumap:
                write_image(mu_map(result.sct, folds[0].plans.mu_map), mumap_file)
                outputs.append(mumap_file)
            if dicom_out:
                source = paths[0] if Path(paths[0]).is_dir() else None  # a DICOM MR: inherit patient, study, frame
                description, derivation, identity = dicom_labels(folds, result.draws, seed)
                write_dicom_series(result.sct, dicom_folder, description, derivation, source, identity)
                outputs.append(dicom_folder)
        except OSError:
            _remove_outputs(outputs)
            raise
    log.debug("%s phases: %s", case.name, phases.table())
    return PredictionOutcome(case.name, "done", seconds=time.time() - start, outputs=outputs, phases=phases.seconds)


def expects_std(folds: list[LoadedFold], samples: int, save_std: bool) -> bool:
    """Whether ``predict_case`` writes a std map with these settings (more than one draw)."""
    return save_std and spread_possible(folds, samples)


def incomplete_outputs(case: InputCase, output: Path, ending: str | None, std: bool = False,
                       dicom_out: bool = False, mumap: bool = False, confidence: bool = False) -> str | None:
    """Why the existing outputs of ``case`` cannot be trusted (missing, truncated, unreadable), or None.

    Each image is read back fully (``read_image`` checks the voxel payload
    against the header), so a prediction cut short by a full disk or a kill
    does not count as finished.
    """
    sct_path, std_path = output_paths(case, output, ending)
    for path, needed in ((sct_path, True), (std_path, std), (mumap_path(case, output, ending), mumap),
                         (confidence_path(case, output, ending), confidence)):
        if not needed:
            continue
        if not path.exists():
            return f"{path.name} is missing"
        try:
            read_image(path, check_values=False)
        except ImageReadError as exc:
            return str(exc)
    if dicom_out and not (output / f"{case.name}_dicom").is_dir():
        return f"{case.name}_dicom is missing"
    return None


def prepare_prediction(input_dir: Path, output_dir: Path, resume: bool = False, overwrite: bool = False,
                       ending: str | None = None, part_id: int = 0, num_parts: int = 1) -> list[InputCase]:
    """This process's share of the cases of ``input_dir`` after every check that needs no model; creates nothing.

    ``part_id``/``num_parts``: the share (``cases[part_id::num_parts]`` of the
    sorted cases, see ``inference/sharding.py``); only its outputs are
    checked. ValueError for an input that is not a folder of MR images, an output
    folder that is (inside) the input folder or a bad share; FileExistsError when outputs
    exist and neither ``resume`` nor ``overwrite`` is given.
    """
    if ending is not None and ending not in FILE_ENDINGS:
        raise ValueError(f"--file-ending {ending!r}: use one of {', '.join(FILE_ENDINGS)}")
    if resume and overwrite:
        raise ValueError("--continue (skip finished cases) and --overwrite (predict every case again) exclude each "
                         "other: give one")
    every = find_cases(input_dir)
    cases = select_part(every, part_id, num_parts)
    check_output_folder(input_dir, output_dir)
    output_dir = Path(output_dir)
    check_output_collisions(every, output_dir, ending)
    # any output of a case counts (a std map or mu-map left without its sCT too): none is replaced unasked
    existing = [c for c in cases if any(p.exists() or p.is_symlink() for p in case_outputs(c, output_dir, ending))]
    if existing and not (resume or overwrite):
        raise FileExistsError(
            f"{output_dir}: predictions exist for {', '.join(c.name for c in existing[:5])}"
            f"{' ...' if len(existing) > 5 else ''}: use --continue to skip them or --overwrite to replace them")
    return cases


def predict_folder(
    input_dir: Path, output_dir: Path, folds: list[LoadedFold], steps: int | None = None, samples: int | None = None,
    seed: int = 0, eta: float | None = None, save_std: bool = False, resume: bool = False, overwrite: bool = False,
    ending: str | None = None, dicom_out: bool = False, cases: list[InputCase] | None = None,
    part_id: int = 0, num_parts: int = 1, announce: Callable[[InputCase, str], None] | None = None,
    mumap: bool = False, confidence_hu: float | None = None, second_opinion_dir: Path | None = None,
    second_opinion_factor: float | None = None,
) -> list[PredictionOutcome]:
    """Predict every case of ``input_dir`` (or its share ``part_id`` of ``num_parts``); failing cases are
    reported, the others still run.

    ``cases``: those :func:`prepare_prediction` returned (else it is called
    here). With ``resume`` a case is skipped only when its outputs read back
    completely. A full disk fails the case being written and every case
    after it (they could not be written either). ``confidence_hu``: see :func:`predict_case`; a
    ValueError before any case when no std map would be made. ``announce(case, decision)``
    hears, before each case, "predict", "skip" or "stop" (a ``--split-case``
    run tells its other ranks, see ``inference/sharding.py``). ``second_opinion_dir``: another model's sCTs
    of the same cases (``CASE<ending>``, e.g. its ``wldm_predict`` output), each case's disagreement added to its
    std map (``second_opinion_factor`` None: the plan's); a ValueError before any case when one is missing or
    no std map is asked for.
    """
    output_dir = Path(output_dir)
    samples = plan_samples(folds, samples)
    confidence_hu = check_confidence(folds, samples, confidence_hu)
    second_opinion_factor = check_factor(second_opinion_factor, "second_opinion_factor")
    if cases is None:
        cases = prepare_prediction(input_dir, output_dir, resume, overwrite, ending, part_id, num_parts)
    second_opinions: dict[str, Path] = {}
    if second_opinion_dir is not None:
        check_second_opinion(folds, samples, save_std, confidence_hu)
        second_opinions = second_opinion_cases(second_opinion_dir, output_dir, cases)
    output_dir.mkdir(parents=True, exist_ok=True)
    protected = input_files(cases) | {p.resolve() for p in second_opinions.values()}
    want_std = expects_std(folds, samples, save_std)
    if want_std or confidence_hu is not None:
        check_std_scale_settings(folds, samples, second_opinion_used(folds, second_opinion_factor,
                                                                      second_opinion_dir is not None))
    outcomes = []
    disk_full: str | None = None
    for index, case in enumerate(cases, 1):
        decision, problem = ("stop" if disk_full is not None else "predict"), None
        if decision == "predict" and resume and output_paths(case, output_dir, ending)[0].exists():
            problem = incomplete_outputs(case, output_dir, ending, want_std, dicom_out, mumap,
                                         confidence_hu is not None)
            decision = "skip" if problem is None else "predict"
        if announce is not None:
            announce(case, decision)
        if decision == "stop":
            outcomes.append(PredictionOutcome(case.name, "failed", f"not predicted: {disk_full}"))
            continue
        if decision == "skip":
            outcomes.append(PredictionOutcome(case.name, "skipped", "output exists (--continue)"))
            continue
        if problem is not None:
            log.warning("%s: existing output not complete (%s): predicting it again", case.name, problem)
        log.info("case %d/%d: %s", index, len(cases), case.name)
        try:
            outcome = predict_case(folds, case, output_dir, steps, samples, seed, eta, save_std, ending, dicom_out,
                                   protected, mumap, confidence_hu, second_opinions.get(case.name),
                                   second_opinion_factor)
            log.info("%s: done in %.1f s -> %s", case.name, outcome.seconds, outcome.outputs[0])
        except (ImageReadError, CaseError, ValueError, OSError) as exc:
            outcome = PredictionOutcome(case.name, "failed", str(exc))
            log.error("%s failed: %s", case.name, exc)
            if isinstance(exc, OSError) and is_disk_full(exc):
                disk_full = f"the disk is full (writing {case.name} failed)"
        except (RuntimeError, MemoryError) as exc:  # a library's own error (ITK, torch): this case only
            kind = "out of memory" if isinstance(exc, MemoryError) else type(exc).__name__
            outcome = PredictionOutcome(case.name, "failed", f"{kind}: {error_reason(exc, 300)}")
            log.error("%s failed: %s", case.name, outcome.message)
            log.debug("%s: traceback", case.name, exc_info=True)
        outcomes.append(outcome)
    return outcomes
