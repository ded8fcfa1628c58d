"""A comparison report of several sCT models on the same cases: a table with units and directions, and
plain sentences saying which models beat a bulk-density sCT and, when one does not, where it loses and
what would help (more training, a better first stage, or training data with bone like the test's)."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wldm_auto.io.files import atomic_path

# (summary key, column header): every header says its unit and which direction is better
COLUMNS = (
    ("mae", "MAE HU (lower better)"),
    ("psnr", "PSNR dB (higher better)"),
    ("ssim", "SSIM (higher better)"),
    ("ms_ssim", "MS-SSIM (higher better)"),
    ("ncc", "NCC (higher better)"),
    ("dice_bone", "bone Dice (higher better)"),
)
CEILING = "first-stage ceiling MAE HU (lower better)"
# a training set whose CT holds less than this share of the test CT's bone has hardly shown the model bone
SCARCE_BONE_RATIO = 1 / 3
SECONDS = "predict s per case"


@dataclass
class ModelRow:
    """One model's evaluation summary (``evaluate_folder``'s) and what else the table shows about it."""

    label: str
    summary: dict[str, Any]
    ceiling_mae: float | None = None  # MAE of the true CT through the model's first stage (latent models)
    predict_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    ceiling_bone_dice: float | None = None  # bone Dice of the true CT through the first stage (latent models)

    def value(self, key: str) -> float | None:
        value = self.summary["metrics"].get(key, {}).get("mean")
        return None if value is None or not math.isfinite(value) else float(value)


@dataclass(frozen=True)
class BoneShares:
    """Share of body voxels that are bone (CT > 250 HU) in the training CTs and in the test CTs."""

    train: float
    test: float

    def describe(self) -> str:
        return f"{100 * self.train:.1f} % bone against the test CT's {100 * self.test:.1f} %"


def _cell(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table_lines(rows: list[ModelRow]) -> list[str]:
    """The table as fixed-width text lines."""
    headers = ["model", *(h for _, h in COLUMNS), CEILING, SECONDS]
    digits = {"mae": 1, "psnr": 2, "ssim": 3, "ms_ssim": 3, "ncc": 3, "dice_bone": 3}
    cells = [[row.label, *(_cell(row.value(k), digits[k]) for k, _ in COLUMNS), _cell(row.ceiling_mae, 1),
              _cell(row.predict_seconds, 1)] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.ljust(w) if i == 0 else v.rjust(w)  # noqa: E731
                                    for i, (v, w) in enumerate(zip(values, widths)))
    return [line(headers), line(["-" * w for w in widths]), *(line(c) for c in cells)]


def _mae_reason(row: ModelRow, ref_mae: float) -> str:
    if row.ceiling_mae is None:
        return "it needs more training (see its learning curve in progress_*.png)"
    if row.ceiling_mae >= ref_mae:
        return (f"its first stage alone loses {row.ceiling_mae:.1f} HU on the true CT (the ceiling), so the VAE "
                "limits it: train stage 1 longer or widen it")
    return f"its first stage would allow {row.ceiling_mae:.1f} HU, so the diffusion stage loses the rest: train stage 2 longer"


def _bone_reason(row: ModelRow, ref_dice: float | None, bone: BoneShares | None) -> str:
    if bone is not None and bone.test <= 0:
        return "the test CT holds no bone (> 250 HU), so bone Dice cannot tell the models apart"
    if bone is not None and bone.train < SCARCE_BONE_RATIO * bone.test:
        return (f"its training CT holds {bone.describe()}, so it has hardly seen bone: more steps will not "
                "teach it, training cases with bone like the test's will")
    if row.ceiling_bone_dice is not None:
        if ref_dice is not None and row.ceiling_bone_dice <= ref_dice:
            return (f"its first stage already loses the bone (bone Dice {row.ceiling_bone_dice:.3f} on the true CT): "
                    "train stage 1 longer or widen it")
        return (f"its first stage keeps bone (bone Dice {row.ceiling_bone_dice:.3f} on the true CT), so the diffusion "
                "stage loses it: train stage 2 longer")
    return "it needs more training (see its learning curve in progress_*.png)"


def verdicts(rows: list[ModelRow], reference: ModelRow, bone: BoneShares | None = None) -> list[str]:
    """One sentence per learned model: does it beat ``reference`` (bulk density) on MAE and bone Dice, and if
    not, why, metric by metric: its first stage (ceiling) or its synthesis for MAE; for bone Dice also a
    training set with little bone against the test's (``bone``), which more training cannot cure."""
    ref_mae, ref_dice = reference.value("mae"), reference.value("dice_bone")
    sentences = []
    for row in rows:
        if row is reference:
            continue
        mae, dice = row.value("mae"), row.value("dice_bone")
        if mae is None or ref_mae is None:
            continue
        better_mae = mae < ref_mae
        better_dice = dice is not None and ref_dice is not None and dice > ref_dice
        if better_mae and better_dice:
            sentences.append(f"{row.label} beats {reference.label} on MAE ({mae:.1f} vs {ref_mae:.1f} HU) and "
                             f"bone Dice ({dice:.3f} vs {ref_dice:.3f}).")
            continue
        lost = []
        if not better_mae:
            lost.append(f"MAE ({mae:.1f} vs {ref_mae:.1f} HU): {_mae_reason(row, ref_mae)}")
        if not better_dice:
            lost.append(f"bone Dice ({_cell(dice, 3)} vs {_cell(ref_dice, 3)}): {_bone_reason(row, ref_dice, bone)}")
        won = f" It does beat it on MAE ({mae:.1f} vs {ref_mae:.1f} HU)." if better_mae else ""
        sentences.append(f"{row.label} does NOT beat {reference.label} on {'; nor on '.join(lost)}.{won}")
    return sentences


def write_report(folder: Path, title: str, rows: list[ModelRow], reference: ModelRow, notes: list[str],
                 bone: BoneShares | None = None) -> str:
    """Write ``metrics.csv`` and ``README.txt`` into ``folder``; returns the text. ``bone``: the bone shares
    of training and test CTs, which the verdicts use to tell missing bone in the training data from too
    little training."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "metrics.csv", suffix=".csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", *(h for _, h in COLUMNS), CEILING, SECONDS])
        for row in rows:
            writer.writerow([row.label, *(_cell(row.value(k), 6) for k, _ in COLUMNS), _cell(row.ceiling_mae, 3),
                             _cell(row.predict_seconds, 2)])
    lines = [title, "", *table_lines(rows), "", *verdicts(rows, reference, bone), "", *notes]
    text = "\n".join(lines) + "\n"
    with atomic_path(folder / "README.txt", suffix=".txt") as tmp:
        tmp.write_text(text)
    return text
