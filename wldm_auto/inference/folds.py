"""Loading a trained model for prediction: its folds' synthesizers with the settings they run with.

:func:`load_model` reads a model folder (or exported zip), :func:`load_fold` one ``fold_F`` checkpoint with
per-run overrides (tiles, precision, test-time mirroring, the std maps' edge term); the ``check_*`` functions
turn a bad override into a one-line error before anything slow happens. ``inference/predictor.py`` and the
Python API (``inference/api.py``) predict with what these return.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from wldm_auto.inference.calibration import STD_SCALE_FILE, describe_record, read_std_scale_record
from wldm_auto.inference.model_archive import extracted_model, is_model_archive
from wldm_auto.io.files import read_json, sha256_file
from wldm_auto.models.checkpoint import CheckpointError
from wldm_auto.models.loading import build_synthesizer, load_synthesis_checkpoint
from wldm_auto.models.mirroring import MirroredSynthesizer
from wldm_auto.models.precision import autocast_dtype
from wldm_auto.models.synthesizer import Synthesizer
from wldm_auto.planners.schema import PRECISIONS, ConfigurationPlan, InferencePlan, Plans

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint_final.pt"


@dataclass
class LoadedFold:
    fold: int
    plans: Plans
    configuration: str
    mr_channels: int
    synthesizer: Synthesizer
    checkpoint: Path
    trainer: str = ""  # the trainer that wrote the checkpoint
    sha256: str = ""  # of the checkpoint file (names the model in DICOM output)
    std_scale: float = 1.0  # the model folder's std_scale.json (1.0: none, or ignored)
    std_scale_record: dict[str, Any] | None = None  # that file's content


def resolve_device(device: str | torch.device, option: str = "device") -> torch.device:
    """"auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N" -> torch.device; one-line ValueError
    for anything else or for CUDA on a machine without it (``option``: how the message names the setting)."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and name != "cuda" and not name.startswith("cuda:"):
        raise ValueError(f"{option} {name!r}: use 'auto', 'cpu' or 'cuda'")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{option} {name!r}: no CUDA device is available (use 'cpu', or 'auto' to fall back)")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"{option} {name!r}: {str(exc).strip().splitlines()[0]}") from None


def check_precision(precision: str | None, option: str = "precision") -> None:
    """One-line ValueError unless ``precision`` is None (the plan's) or one of :data:`PRECISIONS`."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"{option} {precision!r}: use one of {', '.join(PRECISIONS)}")


def _optional_number(value: float | None, valid: Callable[[float], bool], message: str) -> float | None:
    """``value`` as a float when it is None or a real, finite number ``valid`` accepts; else a ValueError of
    ``message`` (formatted with ``value``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not valid(value):
        raise ValueError(message.format(value=value))
    return float(value)


def check_edge_std_mm(value: float | None, option: str = "edge_std_mm") -> float | None:
    """``value`` as a float when it is None or a finite length >= 0 (mm), else a ValueError naming ``option``."""
    return _optional_number(value, lambda v: v >= 0,
                            f"{option} must be a length >= 0 in mm (0: no edge term), got {{value!r}}")


def check_eta(eta: float | None, option: str = "eta") -> float | None:
    """``eta`` (DDIM noise, 0 deterministic, 1 DDPM-like) as a float when None or finite and >= 0, else a
    one-line ValueError naming ``option`` (NaN made every sCT voxel 0 HU without an error)."""
    return _optional_number(eta, lambda v: v >= 0,
                            f"{option} must be a finite number >= 0 (0: deterministic DDIM), got {{value!r}}")


def check_overlap(overlap: float | None, option: str = "overlap") -> float | None:
    """``overlap`` (share of a tile shared with its neighbour) when None or in [0, 1), else a ValueError."""
    return _optional_number(overlap, lambda v: 0 <= v < 1,
                            f"{option} must be in [0, 1) (the share of a tile its neighbour overlaps), got {{value!r}}")


def check_seed(seed: int, option: str = "seed") -> int:
    """``seed`` as an int when it is a whole number in [0, 2**62), else a one-line ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**62:
        raise ValueError(f"{option} must be a whole number in [0, 2**62), got {seed!r}")
    return int(seed)


def check_mirror_axes(axes: Sequence[int] | None, option: str = "mirror_axes") -> list[int] | None:
    """``axes`` as a sorted list (None: the plan's); one-line ValueError unless distinct axes among 0, 1, 2."""
    if axes is None:
        return None
    if len(set(axes)) != len(list(axes)) or not set(axes) <= {0, 1, 2}:
        raise ValueError(f"{option} {list(axes)}: give distinct axes among 0, 1, 2 (z, y, x), or none to switch "
                         "test-time mirroring off")
    return sorted(int(a) for a in axes)


def mirrored(synthesizer: Synthesizer, config: ConfigurationPlan, where: Path) -> Synthesizer:
    """``synthesizer`` behind test-time mirroring along the plan's ``inference.mirror_axes`` (none: as is);
    warns about axes the model never saw flipped in training."""
    axes = config.inference.mirror_axes
    if not axes:
        return synthesizer
    trained = set(config.augmentation.mirror_axes) if config.augmentation.p_mirror > 0 else set()
    if not set(axes) <= trained:
        log.warning("%s: test-time mirroring along axes %s, but training flipped only %s: flipped inputs the "
                    "model never saw may make its sCT worse", where, sorted(set(axes) - trained),
                    sorted(trained) or "none")
    log.info("%s: test-time mirroring along axes %s (%d draws per sample)", where.parent.name, axes, 2 ** len(axes))
    return MirroredSynthesizer(synthesizer, tuple(axes))


def draws_per_sample(fold: LoadedFold) -> int:
    """How many draws one sample of this fold becomes (2 ** mirror axes; 1 without mirroring)."""
    return int(getattr(fold.synthesizer, "draws_per_sample", 1))


def folder_inference(model_folder: Path, configuration: str, stored: Plans) -> InferencePlan:
    """The prediction settings (``inference`` section) of the model folder's ``plans.json``: they do not change
    the trained weights, so a user may edit them there after training (tiles, DDIM steps, mirroring, edge term).
    The checkpoint's own (from its ``stored`` plans) when the folder has no ``plans.json``, no such configuration,
    or a plan of another dataset, plans name or preprocessing (not this model's: warned); ValueError naming the
    file when it cannot be read."""
    own = stored.configuration(configuration).inference
    path = Path(model_folder) / "plans.json"
    if not path.is_file():
        return own
    try:
        plans = Plans.from_dict(read_json(path), str(path))
    except (ValueError, KeyError, TypeError) as exc:
        message = str(exc)
        raise ValueError(message if str(path) in message else f"{path}: {message}") from None
    if configuration not in plans.configurations:
        return own
    if (plans.dataset_name, plans.plans_name, plans.preprocessing) != (stored.dataset_name, stored.plans_name,
                                                                       stored.preprocessing):
        log.warning("%s is not the plan this checkpoint was trained with (dataset, plans name or preprocessing "
                    "differ): using the prediction settings stored with the checkpoint", path)
        return own
    edited = plans.configuration(configuration).inference
    if edited != own:
        before, after = asdict(own), asdict(edited)
        changed = sorted(k for k in after if before.get(k) != after[k])
        log.info("%s: prediction settings edited since training (%s): using the folder's", path, ", ".join(changed))
    return edited


def load_fold(folder: Path, device: torch.device, overlap: float | None = None, checkpoint: str = CHECKPOINT,
              inference: InferencePlan | None = None, precision: str | None = None,
              mirror_axes: Sequence[int] | None = None, edge_std_mm: float | None = None) -> LoadedFold:
    """The synthesizer of one ``fold_F`` folder (diffusion or regression); ValueError naming the file on problems.

    ``inference``: prediction settings to use instead of the model folder's (``plans.json`` beside the fold
    folders, editable after training: see :func:`folder_inference`).
    ``precision``: "float32", "bfloat16" or "float16" instead of the plan's ``inference.precision``
    (the networks' autocast dtype, see ``models/precision.py``). ``mirror_axes``: test-time mirroring
    along these axes instead of the plan's ``inference.mirror_axes`` ([]: off; ``models/mirroring.py``).
    ``edge_std_mm``: the std maps' edge term instead of the plan's ``inference.edge_std_mm`` (0: off;
    ``inference/edges.py``)."""
    check_precision(precision)
    check_overlap(overlap)
    mirror_axes = check_mirror_axes(mirror_axes)
    edge_std_mm = check_edge_std_mm(edge_std_mm)
    path = folder / checkpoint
    if not path.is_file():
        raise ValueError(f"{path}: not found (is training of {folder.name} finished? "
                         f"it writes {checkpoint} at the end)")
    try:
        stored = load_synthesis_checkpoint(path)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None
    plans = Plans.from_dict(stored.plans, str(path))
    config = plans.configuration(stored.configuration)
    if inference is None:
        inference = folder_inference(folder.parent, stored.configuration, plans)
    config = replace(config, inference=inference)
    if precision is not None:
        config = replace(config, inference=replace(config.inference, precision=precision))
    if mirror_axes is not None:
        config = replace(config, inference=replace(config.inference, mirror_axes=mirror_axes))
    if edge_std_mm is not None:
        config = replace(config, inference=replace(config.inference, edge_std_mm=edge_std_mm))
    # the fold carries the settings it runs with, so synthesize() reads the same ones as the synthesizer
    plans = replace(plans, configurations={**plans.configurations, stored.configuration: config})
    overlap = config.inference.tile_overlap if overlap is None else overlap
    try:
        autocast_dtype(config.inference.precision, device)  # a precision this device cannot run: its own message
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    try:
        synthesizer = build_synthesizer(stored, config, overlap, device)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{path}: weights do not match the plan stored in it ({first[:200]})") from None
    synthesizer = mirrored(synthesizer, config, path)
    if config.inference.precision != "float32":
        log.info("%s: networks under %s autocast (blending and DDIM steps in float32)", folder.name,
                 config.inference.precision)
    return LoadedFold(int(stored.fold), plans, stored.configuration, int(stored.mr_channels), synthesizer, path,
                      stored.trainer, sha256_file(path))


def load_model(model_folder: Path, folds: Sequence[int] | None, device: torch.device,
               overlap: float | None = None, checkpoint: str = CHECKPOINT,
               inference: InferencePlan | None = None, precision: str | None = None,
               std_scale: bool = True, mirror_axes: Sequence[int] | None = None,
               edge_std_mm: float | None = None) -> list[LoadedFold]:
    """The requested folds of a model folder or model zip (``inference``, ``precision``, ``mirror_axes``,
    ``edge_std_mm``: see load_fold).

    Default: every ``fold_*`` folder holding ``checkpoint``; folders without one
    (training unfinished or failed) are skipped with a warning. Requested folds must have it.
    A zip (``wldm_export_model``) is checked and unpacked into a temporary folder, removed once loaded.
    ``std_scale``: multiply std maps by the scale in the folder's ``std_scale.json`` when there is one
    (False: ignore it, e.g. to measure the calibration); a malformed file is a ValueError naming it."""
    model_folder = Path(model_folder)
    check_overlap(overlap)
    repeated = sorted({f for f in folds or () if list(folds).count(f) > 1})
    if repeated:  # a fold twice would pass for an ensemble of two: its zero spread would look like certainty
        raise ValueError(f"fold(s) {', '.join(map(str, repeated))} given more than once (-f); give each fold once")
    if is_model_archive(model_folder):
        with extracted_model(model_folder) as folder:
            return load_model(folder, folds, device, overlap, checkpoint, inference, precision, std_scale,
                              mirror_axes, edge_std_mm)
    if not model_folder.is_dir():
        raise ValueError(f"{model_folder}: model folder not found")
    record = read_std_scale_record(model_folder) if std_scale else None  # before the slow part: fail fast
    names = [f"fold_{f}" for f in folds] if folds else sorted(p.name for p in model_folder.glob("fold_*") if p.is_dir())
    if not names:
        raise ValueError(f"{model_folder}: holds no fold_* folder")
    if not folds:
        finished = [n for n in names if (model_folder / n / checkpoint).is_file()]
        skipped = [n for n in names if n not in finished]
        if finished and skipped:
            log.warning("%s: skipping %s: no %s (training unfinished or failed); using %s", model_folder,
                        ", ".join(skipped), checkpoint, ", ".join(finished))
        names = finished or names  # none finished: load_fold names the missing file
    check_precision(precision)
    mirror_axes = check_mirror_axes(mirror_axes)
    edge_std_mm = check_edge_std_mm(edge_std_mm)
    loaded = [load_fold(model_folder / name, device, overlap, checkpoint, inference, precision, mirror_axes,
                        edge_std_mm) for name in names]
    first = loaded[0]
    for other in loaded[1:]:
        if other.plans.preprocessing != first.plans.preprocessing or other.mr_channels != first.mr_channels:
            raise ValueError(f"{other.checkpoint}: preprocessing differs from {first.checkpoint}; cannot ensemble")
    if record is not None:
        for fold in loaded:
            fold.std_scale, fold.std_scale_record = float(record["scale"]), record
        about = "; ".join(filter(None, (describe_record(record), "--no-std-scale / std_scale=False ignores it")))
        log.info("%s: std maps multiplied by %.4g (%s)", model_folder / STD_SCALE_FILE, record["scale"], about)
    elif not std_scale and (model_folder / STD_SCALE_FILE).is_file():
        log.info("%s: ignored (std maps not rescaled)", model_folder / STD_SCALE_FILE)
    return loaded


def check_std_scale_settings(folds: Sequence[LoadedFold], samples: int, second_opinion_factor: float = 0.0) -> None:
    """Warn when the std scale was fitted with another number of samples, mirrorings, edge term, folds or
    second-opinion factor (0: none) than this run uses."""
    record = folds[0].std_scale_record
    if record is None:
        return
    fitted, used = record.get("samples"), samples if any(f.synthesizer.is_stochastic for f in folds) else None
    if isinstance(fitted, int) and used is not None and fitted != used:
        log.warning("the std scale %.4g was fitted on predictions with %d sample(s); this run draws %d: the "
                    "spread of another number of samples has other units, so the scaled std may be off",
                    folds[0].std_scale, fitted, used)
    fitted_axes, used_axes = record.get("mirror_axes"), folds[0].plans.configuration(
        folds[0].configuration).inference.mirror_axes
    if isinstance(fitted_axes, list) and sorted(fitted_axes) != sorted(used_axes):
        log.warning("the std scale %.4g was fitted on predictions mirrored along axes %s; this run mirrors along "
                    "%s: the spread of other mirrorings has other units, so the scaled std may be off",
                    folds[0].std_scale, fitted_axes or "none", used_axes or "none")
    fitted_edge = record.get("edge_std_mm")
    used_edge = folds[0].plans.configuration(folds[0].configuration).inference.edge_std_mm
    if isinstance(fitted_edge, (int, float)) and not isinstance(fitted_edge, bool) and fitted_edge != used_edge:
        log.warning("the std scale %.4g was fitted on std maps with an edge term of %g mm; this run adds %g mm: "
                    "the scaled std may be off", folds[0].std_scale, fitted_edge, used_edge)
    fitted_folds = record.get("folds")
    if isinstance(fitted_folds, list) and len(fitted_folds) != len(folds):
        log.warning("the std scale %.4g was fitted with %d fold(s); this run ensembles %d",
                    folds[0].std_scale, len(fitted_folds), len(folds))
    fitted_second = record.get("second_opinion_factor")
    if isinstance(fitted_second, (int, float)) and not isinstance(fitted_second, bool) \
            and fitted_second != second_opinion_factor:
        log.warning("the std scale %.4g was fitted on std maps with a second-opinion factor of %g; this run uses "
                    "%g (0: no second opinion): the scaled std may be off", folds[0].std_scale, fitted_second,
                    second_opinion_factor)
