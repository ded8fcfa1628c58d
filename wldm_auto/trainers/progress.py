"""Training history and its picture (``progress.png``), redrawn every epoch."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from wldm_auto.io.files import atomic_path

# validation figures grouped by unit, each panel saying which direction is better
VALIDATION_PANELS = (
    ("mae", "validation MAE (HU, lower is better)"),
    ("psnr", "validation PSNR (dB, higher is better)"),
)


def _series(history: list[dict[str, Any]], key: str) -> list[float]:
    return [float(h[key]) if isinstance(h.get(key), (int, float)) else math.nan for h in history]


def progress_panels(history: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(title, history keys) of every panel: one per training loss, validation figures grouped by unit."""
    train_keys = sorted({k for h in history for k in h if k.startswith("train_")})
    val_keys = sorted({k for h in history for k in h if k.startswith("val_")})
    panels: list[tuple[str, list[str]]] = [(f"training {k[len('train_'):]} (per-epoch mean)", [k]) for k in train_keys]
    used: set[str] = set()
    for word, label in VALIDATION_PANELS:
        keys = [k for k in val_keys if word in k]
        if keys:
            panels.append((label, keys))
            used.update(keys)
    rest = [k for k in val_keys if k not in used]
    if rest:
        panels.append(("validation (other)", rest))
    return panels + [("learning rate", ["lr"]), ("seconds per epoch (training + validation)", ["epoch_seconds"])]


def draw_progress(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Plot against the training step: every training loss on its own linear axis (negative values, e.g. the
    SMD loss, stay visible), validation figures grouped by unit (HU apart from dB), learning rate, seconds per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps = [h.get("step", h.get("epoch", i)) for i, h in enumerate(history)]
    panels = progress_panels(history)
    columns = 2
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(12, 2.6 * rows), sharex=True, squeeze=False)
    marker = "o" if len(steps) < 30 else None
    for ax, (label, keys) in zip(axes.flat, panels):
        for key in keys:
            values = _series(history, key)
            ax.plot(steps, values, marker=marker, label=key.removeprefix("val_").removeprefix("train_"))
            finite = [v for v in values if math.isfinite(v)]
            if finite and min(finite) < 0 < max(finite):
                ax.axhline(0.0, color="k", linewidth=0.6)
        ax.set_title(label, fontsize=9)
        if len(keys) > 1:
            ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for column in range(columns):
        last = max(r for r in range(rows) if r * columns + column < len(panels))
        axes[last][column].set_xlabel("training step")
        axes[last][column].xaxis.set_tick_params(labelbottom=True)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
