"""Report pictures (matplotlib, no display needed). Each function writes one PNG atomically."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .artifacts import atomic_path  # noqa: E402


def _save(fig, path: str | Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def recall_vs_frequency(path, counts: np.ndarray, recalls: dict[str, np.ndarray], class_names: list) -> None:
    """Per-class recall against the number of training images, one series per head variant."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    order = np.argsort(-counts)
    for name, rec in recalls.items():
        ax.plot(counts[order], rec[order], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel("recall (pooled OOF)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("per-class recall vs training frequency")
    _save(fig, path)


def sweep(path, curves: list[dict], xlabel: str, ylabel: str, chosen: list | None = None) -> None:
    """A metric against a swept hyper-parameter, one line per fold."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, curve in enumerate(curves):
        xs = list(curve)
        ax.plot(xs, [curve[x] for x in xs], marker=".", label=f"fold {k}")
        if chosen is not None:
            ax.axvline(chosen[k], color=ax.lines[-1].get_color(), ls=":", alpha=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
