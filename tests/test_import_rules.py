"""The package's import rules: imports that must never exist (every import statement, lazy ones included)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wldm_auto"

# (importer, imported, why): packages of wldm_auto, "io" includes paths.py
NEVER = [
    ("inference", "trainers", "prediction loads a model, not a trainer"),
    ("networks", "planners", "networks take plain widths, not plan dataclasses"),
    ("networks", "io", "networks see tensors, not files"),
    ("networks", "trainers", "a network knows no trainer"),
    ("diffusion", "networks", "samplers take any eps-model callable"),
    ("diffusion", "planners", "schedules are built from numbers"),
    ("planners", "preprocessing", "planning reads the fingerprint only"),
    ("preprocessing", "dataset_conversion", "raw-layout validation belongs to io"),
    ("io", "planners", "the bottom layer knows no stage"),
]


def imported_packages(package: str) -> dict[str, set[str]]:
    """wldm_auto package -> the files of ``package`` that import it."""
    found: dict[str, set[str]] = {}
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                parts = name.split(".")
                if parts[0] == "wldm_auto" and len(parts) > 1:
                    target = "io" if parts[1] == "paths" else parts[1]
                    found.setdefault(target, set()).add(path.relative_to(PACKAGE).as_posix())
    return found


@pytest.mark.parametrize(("importer", "imported", "why"), NEVER, ids=[f"{a}->{b}" for a, b, _ in NEVER])
def test_never_imports(importer: str, imported: str, why: str) -> None:
    offenders = imported_packages(importer).get(imported, set())
    assert not offenders, f"{', '.join(sorted(offenders))} import wldm_auto.{imported}: {why}"


def test_training_and_inference_share_the_models_layer() -> None:
    assert "models" in imported_packages("trainers") and "models" in imported_packages("inference")
