"""The one command: validate -> fingerprint -> plan -> splits -> preprocess.

Each stage is skipped when its output is current: the fingerprint when the
raw files' hashes are unchanged, the plan when it was made from the same
fingerprint with the same planner options (so hand edits survive), each
case when its JSON carries the current key. Nothing in ``wldm_raw`` is ever
written.
"""
from __future__ import annotations

import logging
import math
import numbers
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from wldm_auto.io.files import atomic_path, read_json, write_json
from wldm_auto.io.raw_validation import ensure_valid
from wldm_auto.paths import preprocessed_root, raw_root, resolve_dataset_name
from wldm_auto.planners.fingerprint import compute_fingerprint, fingerprint_key, hash_case
from wldm_auto.planners.planner import CONFIGURATION, check_preset, plan_dataset, planner_options
from wldm_auto.planners.schema import Plans
from wldm_auto.planners.splits import make_splits
from wldm_auto.preprocessing.preprocessor import CaseOutcome, preprocess_dataset

log = logging.getLogger(__name__)


@dataclass
class PipelineSummary:
    dataset: str
    folder: Path
    outcomes: list[CaseOutcome] = field(default_factory=list)
    stages_run: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def _positive_finite(value: object) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(float(value)) and float(value) > 0)


def check_options(
    num_processes: int = 1,
    spacing: Sequence[float] | None = None,
    gpu_memory_gb: float | None = None,
    preset: str | None = None,
) -> None:
    """Raise a one-line ValueError for an option out of range (before anything is read or written)."""
    check_preset(preset)
    if isinstance(num_processes, bool) or not isinstance(num_processes, numbers.Integral) or num_processes < 1:
        raise ValueError(f"number of processes (-np) must be an integer >= 1, got {num_processes!r}")
    if spacing is not None:
        sequence = hasattr(spacing, "__iter__") and not isinstance(spacing, (str, bytes))
        values = list(spacing) if sequence else [spacing]
        if not sequence or len(values) not in (1, 3) or not all(_positive_finite(v) for v in values):
            raise ValueError(f"spacing (--spacing) must be one or three positive, finite numbers in mm, "
                             f"got {' '.join(map(str, values)) or 'nothing'}")
    if gpu_memory_gb is not None and not _positive_finite(gpu_memory_gb):
        raise ValueError(f"memory target (--gpu-memory-gb) must be a positive, finite number of GB, got {gpu_memory_gb!r}")


def _save_plans(plans: Plans, path: Path) -> None:
    """Write ``plans`` to ``path`` atomically; an existing plan is kept as a .bak only once the new one is complete."""
    with atomic_path(path) as tmp:
        plans.save(tmp)
        if path.exists():
            backup = path.with_name(f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}.bak")
            shutil.copy2(path, backup)
            log.warning("kept the previous %s as %s", path.name, backup.name)


def plan_and_preprocess(
    dataset: str | int,
    num_processes: int = 1,
    registration: bool = True,
    clean: bool = False,
    spacing: Sequence[float] | None = None,
    gpu_memory_gb: float | None = None,
    preset: str | None = None,
) -> PipelineSummary:
    """Run every stage for ``dataset``; failed cases are listed in the summary, not raised.

    Options are checked before anything is read or written (ValueError). An
    existing ``plans.json`` is replaced only by a complete new plan. ``preset``:
    a named plan preset (e.g. ``"cpu"``) applied to the planned configuration.
    """
    check_options(num_processes, spacing, gpu_memory_gb, preset)
    start = time.time()
    name = resolve_dataset_name(dataset, ("wldm_raw",))
    raw = raw_root() / name
    dataset_raw = ensure_valid(raw)
    out = preprocessed_root(create=True) / name
    out.mkdir(parents=True, exist_ok=True)
    summary = PipelineSummary(name, out)
    if clean:
        shutil.rmtree(out / "registration", ignore_errors=True)
        for child in out.iterdir():
            if child.is_dir() and child.name.startswith("wldmPlans_"):
                shutil.rmtree(child)
        (out / "dataset_fingerprint.json").unlink(missing_ok=True)
        log.info("--clean: removed registration cache, preprocessed arrays, fingerprint; "
                 "plans.json is planned again (the previous one kept as a .bak)")
    write_json(dataset_raw.meta, out / "dataset.json")

    cases = dataset_raw.cases("Tr")
    log.info("%s: %d training cases; hashing input files", name, len(cases))
    hashes = {c.name: hash_case(c) for c in cases}

    fingerprint_path = out / "dataset_fingerprint.json"
    fingerprint = read_json(fingerprint_path) if fingerprint_path.is_file() else None
    if fingerprint is None or fingerprint.get("key") != fingerprint_key(hashes):
        fingerprint = compute_fingerprint(cases, hashes, num_processes)
        write_json(fingerprint, fingerprint_path)
        summary.stages_run.append("fingerprint")
    else:
        log.info("fingerprint is current: skipped")

    plans_path = out / "plans.json"
    planner_args = planner_options(spacing, gpu_memory_gb, registration, preset)
    plans = Plans.load(plans_path) if plans_path.is_file() and not clean else None
    if plans is None or plans.fingerprint_hash != fingerprint["key"] or plans.planner != planner_args:
        if plans is not None:
            log.info("the fingerprint or planner options changed: planning again")
        plans = plan_dataset(name, fingerprint, dataset_raw.meta["channel_names"], spacing, gpu_memory_gb, registration,
                             preset)
        _save_plans(plans, plans_path)
        summary.stages_run.append("plan")
    else:
        log.info("plans.json is current (made from this fingerprint with these options): kept as is")

    usable = sorted(fingerprint["cases"])
    splits_path = out / "splits_final.json"
    existing = read_json(splits_path) if splits_path.is_file() else None
    if existing is None or sorted({c for s in existing for c in s["train"] + s["val"]}) != usable:
        splits, note = make_splits(usable) if usable else ([], "no usable case")
        write_json(splits, splits_path)
        log.info("splits_final.json: %s", note)
        summary.stages_run.append("splits")

    summary.outcomes = [CaseOutcome(c, "failed", f"fingerprint: {r}") for c, r in fingerprint["failed"].items()]
    todo = [c for c in cases if c.name in fingerprint["cases"]]
    config = plans.configuration(CONFIGURATION)
    summary.outcomes += preprocess_dataset(todo, hashes, plans, CONFIGURATION, out / config.data_identifier,
                                           out / "registration", num_processes)
    if any(o.status == "done" for o in summary.outcomes):
        summary.stages_run.append("preprocess")
    summary.seconds = time.time() - start
    return summary
