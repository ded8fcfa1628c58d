"""Training history and its picture (``progress.png``), redrawn every epoch."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from wldm_auto.io.files import atomic_path


def draw_progress(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Plot per-epoch train losses, validation figures, learning rate and seconds per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(4, 1, figsize=(9, 13), sharex=True)
    groups = [
        (axes[0], "train_", "training losses (log scale)", True),
        (axes[1], "val_", "validation", False),
    ]
    for ax, prefix, label, log_scale in groups:
        keys = sorted({k for h in history for k in h if k.startswith(prefix)})
        for key in keys:
            values = [h.get(key, math.nan) for h in history]
            if log_scale and all((v is None or not math.isfinite(v) or v > 0) for v in values):
                ax.set_yscale("log")
            ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, label=key[len(prefix):])
        ax.set_ylabel(label)
        if keys:
            ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    axes[2].plot(epochs, [h.get("lr", math.nan) for h in history], color="k")
    axes[2].set_ylabel("learning rate")
    axes[2].grid(alpha=0.3)
    axes[3].plot(epochs, [h.get("epoch_seconds", math.nan) for h in history], color="tab:gray")
    axes[3].set_ylabel("seconds per epoch")
    axes[3].set_xlabel("epoch")
    axes[3].grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
