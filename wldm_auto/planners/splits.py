"""Cross-validation splits (``splits_final.json``): a list of {"train": [...], "val": [...]}."""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def make_splits(cases: list[str], num_folds: int = 5, seed: int = 12345) -> tuple[list[dict[str, list[str]]], str]:
    """Seeded k-fold splits and a sentence describing what was done.

    With fewer cases than folds: one fold per case (leave-one-out) for 2..k-1
    cases; a single case trains and validates on itself (fold 0), which
    cannot measure generalisation.
    """
    cases = sorted(cases)
    if not cases:
        raise ValueError("no cases to split")
    if len(cases) == 1:
        note = ("only 1 case: fold 0 trains and validates on the same case; "
                "validation figures measure fitting, not generalisation")
        return [{"train": list(cases), "val": list(cases)}], note
    folds = min(num_folds, len(cases))
    order = np.random.default_rng(seed).permutation(len(cases))
    chunks = np.array_split(order, folds)
    splits = []
    for k in range(folds):
        val = sorted(cases[i] for i in chunks[k])
        splits.append({"train": sorted(c for c in cases if c not in val), "val": val})
    note = f"{folds}-fold cross-validation, shuffled with seed {seed}"
    if folds < num_folds:
        note = f"only {len(cases)} cases: {folds} folds (leave-one-out) instead of {num_folds}, seed {seed}"
    return splits, note
