"""Preprocess every training case of a dataset into patch-readable arrays.

Per case, in worker processes: read MR channels and CT, body mask, register
(cached), crop, resample, normalise, and write to
``$wldm_preprocessed/DatasetXXX/<data_identifier>/``:

    CASE_mr.npy     float32 (C, z, y, x), MR channels in [-1, 1]
    CASE_ct.npy     float32 (1, z, y, x), CT window in [-1, 1]
    CASE_masks.npy  uint8 (2, z, y, x): [valid (real CT exists), body]
    CASE.json       geometry, crop, normalisation parameters, registration report, key

Uncompressed .npy files are memory-mapped by the loaders, so a patch is read
without loading the volume. ``CASE.json`` is written last and carries a key
over inputs and settings: a case is finished exactly when its JSON exists
with the current key, so a killed run resumes without redoing finished cases.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from wldm_auto.io.files import hash_data, read_json, save_npy, write_json
from wldm_auto.io.images import ImageReadError, read_image
from wldm_auto.io.preprocessed_layout import ARRAYS
from wldm_auto.io.raw_dataset import RawCase
from wldm_auto.planners.schema import Plans
from wldm_auto.planners.workers import WorkerPool
from wldm_auto.preprocessing.case import CaseError, body_mask, check_channels, preprocess_ct, preprocess_mr
from wldm_auto.preprocessing.registration import RegistrationError
from wldm_auto.preprocessing.registration_cache import register_case, registration_key

log = logging.getLogger(__name__)



@dataclass
class CaseOutcome:
    case: str
    status: str  # "done", "cached" or "failed"
    message: str = ""
    seconds: float = 0.0
    registration_cached: bool = False


def case_key(input_hashes: dict[str, Any], plans: Plans, configuration: str) -> str:
    """Hash over inputs and every setting that shapes the preprocessed arrays."""
    config = plans.configuration(configuration)
    settings = {k: v for k, v in dataclasses.asdict(plans.preprocessing).items() if k != "notes"}
    return hash_data(input_hashes, registration_key(input_hashes, plans), settings, config.spacing)


def is_finished(output: Path, case: str, key: str) -> bool:
    """True if ``case`` was completely written with ``key``."""
    path = output / f"{case}.json"
    if not path.is_file():
        return False
    try:
        done = read_json(path).get("key") == key
    except ValueError:
        return False
    return done and all((output / f"{case}{s}").is_file() for s in ARRAYS.values())


def preprocess_case(
    case: RawCase, input_hashes: dict[str, Any], plans: Plans, configuration: str,
    output: Path, registration_folder: Path,
) -> CaseOutcome:
    """Preprocess one training case (skipped when already finished); never raises for bad data."""
    start = time.time()
    key = case_key(input_hashes, plans, configuration)
    if is_finished(output, case.name, key):
        return CaseOutcome(case.name, "cached", registration_cached=True)
    try:
        if case.target is None:
            raise CaseError("no CT target")
        images = [read_image(p, sitk.sitkFloat32) for p in case.images]
        check_channels(images, [str(p) for p in case.images])
        ct = read_image(case.target, sitk.sitkFloat32)
        provided = read_image(case.mask) if case.mask is not None else None
        body = body_mask(images[0], plans, provided)
        ct_mr, valid_mr, report, reg_cached = register_case(
            registration_folder / case.name, registration_key(input_hashes, plans), images[0], ct, body, plans)
        pre = preprocess_mr(images, body, plans, plans.configuration(configuration).spacing)
        ct_np, valid_np = preprocess_ct(ct_mr, valid_mr, pre, plans)
        if not (valid_np & pre.body).any():
            raise CaseError("no voxel of the body has CT behind it after cropping and resampling")
        masks = np.stack([valid_np, pre.body]).astype(np.uint8)
        # an older JSON must not vouch for arrays about to be replaced: the case is unfinished until the new one lands
        (output / f"{case.name}.json").unlink(missing_ok=True)
        for name, array in (("mr", pre.mr), ("ct", ct_np), ("masks", masks)):
            save_npy(array, output / f"{case.name}{ARRAYS[name]}")
        properties = dict(pre.properties)
        properties.update({
            "case": case.name,
            "ct_window": list(plans.preprocessing.ct_window),
            "valid_fraction_in_body": float((valid_np & pre.body).sum() / max(pre.body.sum(), 1)),
            "registration": {k: v for k, v in report.items() if k != "key"},
            "files": {name: f"{case.name}{suffix}" for name, suffix in ARRAYS.items()},
            "key": key,
        })
        write_json(properties, output / f"{case.name}.json")
        return CaseOutcome(case.name, "done", seconds=time.time() - start, registration_cached=reg_cached)
    except (ImageReadError, CaseError, RegistrationError, ValueError) as exc:
        return CaseOutcome(case.name, "failed", str(exc), time.time() - start)
    except Exception as exc:  # noqa: BLE001 - one broken case must not stop the others
        log.debug("%s", traceback.format_exc())
        return CaseOutcome(case.name, "failed", f"unexpected {type(exc).__name__}: {exc}", time.time() - start)


def _worker(args: tuple) -> CaseOutcome:
    case, hashes, plans_dict, configuration, output, registration_folder = args
    plans = Plans.from_dict(plans_dict)
    return preprocess_case(case, hashes, plans, configuration, Path(output), Path(registration_folder))


def preprocess_dataset(
    cases: list[RawCase], hashes: dict[str, dict[str, Any]], plans: Plans, configuration: str,
    output: Path, registration_folder: Path, num_processes: int = 1,
) -> list[CaseOutcome]:
    """Preprocess ``cases`` with ``num_processes`` workers and a progress bar; returns one outcome per case."""
    output.mkdir(parents=True, exist_ok=True)
    registration_folder.mkdir(parents=True, exist_ok=True)
    jobs = [(c, hashes[c.name], plans.to_dict(), configuration, str(output), str(registration_folder)) for c in cases]
    outcomes: list[CaseOutcome] = []
    with logging_redirect_tqdm(), tqdm(total=len(jobs), desc="preprocess", unit="case") as bar:
        if num_processes <= 1 or len(jobs) <= 1:
            for job in jobs:
                outcomes.append(_report(_worker(job)))
                bar.update()
        else:
            # workers die with this process, leave Ctrl-C to it (queued cases are then cancelled, running ones
            # stopped: only a case whose JSON landed counts as finished) and log through its handlers
            with WorkerPool(num_processes) as pool:
                for outcome in pool.imap_unordered(_worker, jobs):
                    outcomes.append(_report(outcome))
                    bar.update()
    return sorted(outcomes, key=lambda o: o.case)


def _report(outcome: CaseOutcome) -> CaseOutcome:
    if outcome.status == "failed":
        log.error("case %s failed: %s", outcome.case, outcome.message)
    elif outcome.status == "done":
        log.info("case %s preprocessed in %.1f s%s", outcome.case, outcome.seconds,
                 " (registration from cache)" if outcome.registration_cached else "")
    return outcome
