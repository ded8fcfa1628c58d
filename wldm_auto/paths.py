"""The three data roots, read lazily from environment variables.

``wldm_raw`` holds raw datasets, ``wldm_preprocessed`` plans and arrays,
``wldm_results`` trained models. Nothing is read at import time, so a missing
variable only matters to the command that needs it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

RAW = "wldm_raw"
PREPROCESSED = "wldm_preprocessed"
RESULTS = "wldm_results"

_EXPLAIN = {
    RAW: "the folder holding raw datasets (DatasetXXX_Name/imagesTr, targetsTr, dataset.json)",
    PREPROCESSED: "the folder where plans and preprocessed arrays are written",
    RESULTS: "the folder where trained models are written",
}


class PathNotSetError(RuntimeError):
    """A required data root environment variable is unset or empty."""


def root(variable: str, create: bool = False) -> Path:
    """Return the folder named by environment ``variable``; raise if unset."""
    value = os.environ.get(variable, "").strip()
    if not value:
        raise PathNotSetError(
            f"environment variable {variable} is not set: export {variable}=/some/folder "
            f"({_EXPLAIN.get(variable, 'a data folder')})"
        )
    path = Path(value).expanduser()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def raw_root() -> Path:
    return root(RAW)


def preprocessed_root(create: bool = False) -> Path:
    return root(PREPROCESSED, create)


def results_root(create: bool = False) -> Path:
    return root(RESULTS, create)


_NAME_RE = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9][A-Za-z0-9_\-]*)$")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetXXX_Name`` for an id in 1..999 and a name of letters, digits, - and _."""
    if not 0 < int(dataset_id) < 1000:
        raise ValueError(f"dataset id must be in 1..999, got {dataset_id}")
    full = f"Dataset{int(dataset_id):03d}_{name}"
    if not _NAME_RE.match(full):
        raise ValueError(f"dataset name {name!r} may only hold letters, digits, '-' and '_'")
    return full


def parse_dataset_id(text: str | int) -> int | None:
    """The numeric id of ``1``, ``001`` or ``Dataset001_Name``; None if it has none."""
    text = str(text).strip()
    if text.isdigit():
        return int(text)
    match = _NAME_RE.match(text)
    return int(match.group(1)) if match else None


def resolve_dataset_name(dataset: str | int, search_in: tuple[str, ...] = (RAW, PREPROCESSED)) -> str:
    """Resolve ``1``, ``001`` or ``Dataset001_Name`` to ``Dataset001_Name``.

    Looks in the data roots named by ``search_in`` (those that are set) and
    raises a ValueError listing what exists when nothing matches or when two
    datasets share the id.
    """
    text = str(dataset).strip()
    dataset_id = parse_dataset_id(text)
    if dataset_id is None:
        raise ValueError(f"{text!r} is not a dataset id (use 1, 001 or Dataset001_Name)")
    found: set[str] = set()
    looked: list[str] = []
    for variable in search_in:
        value = os.environ.get(variable, "").strip()
        if not value or not Path(value).is_dir():
            continue
        looked.append(f"{variable}={value}")
        for child in Path(value).iterdir():
            match = _NAME_RE.match(child.name)
            if child.is_dir() and match and int(match.group(1)) == dataset_id:
                found.add(child.name)
    if _NAME_RE.match(text) and (text in found or not looked):
        return text
    if not found:
        if not looked:
            root(search_in[0])  # raises the "not set" error for the first root
        raise ValueError(f"no dataset with id {dataset_id:03d} in {', '.join(looked)}")
    if _NAME_RE.match(text):  # a full name that does not exist: never substitute another dataset
        raise ValueError(f"no dataset {text} in {', '.join(looked)} (id {dataset_id:03d} holds: {', '.join(sorted(found))})")
    if len(found) > 1:
        raise ValueError(f"dataset id {dataset_id:03d} is ambiguous: {', '.join(sorted(found))}")
    return found.pop()


DEFAULT_PLANS = "wldmPlans"
DEFAULT_CONFIGURATION = "3d_wldm"


def model_folder_name(trainer: str, plans: str = DEFAULT_PLANS, configuration: str = DEFAULT_CONFIGURATION) -> str:
    """``<Trainer>__<plans>__<configuration>``: the results folder of one trained model (all its folds)."""
    parts = (trainer, plans, configuration)
    if any(not p or "__" in p or "/" in p for p in parts):
        raise ValueError(f"trainer, plans and configuration must be non-empty without '__' or '/', got {parts}")
    return "__".join(parts)


def parse_model_folder_name(name: str) -> tuple[str, str, str]:
    """(trainer, plans, configuration) of a ``<Trainer>__<plans>__<configuration>`` folder name."""
    parts = Path(name).name.split("__")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{name}: not a model folder name (expected <Trainer>__<plans>__<configuration>)")
    return parts[0], parts[1], parts[2]
