"""Benchmarks call the Python API, never the argparse entry points (architecture.json: Bench -/-> Face)."""
from __future__ import annotations

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_no_benchmark_imports_the_cli() -> None:
    offenders = []
    for path in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}: {m}" for m in modules if m.startswith("wldm_auto.cli")]
    assert not offenders, offenders
