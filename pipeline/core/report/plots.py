"""Report pictures (matplotlib, no display needed). Each function writes one PNG atomically."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..files.artifacts import atomic_path  # noqa: E402


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


def training_curves(path, histories: list) -> None:
    """Loss, validation metric and learning rate per epoch, one line per fold (pandas frames)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for k, h in enumerate(histories):
        c = f"C{k % 10}"
        axes[0].plot(h["epoch"], h["train_loss"], color=c, label=f"fold {k} train")
        axes[0].plot(h["epoch"], h["valid_loss"], color=c, ls="--", label=f"fold {k} valid")
        axes[1].plot(h["epoch"], h["score"], color=c, marker=".", label=f"fold {k}")
        if "ema_score" in h and h["ema_score"].notna().any():
            axes[1].plot(h["epoch"], h["ema_score"], color=c, ls=":", alpha=0.7)
        axes[2].plot(h["epoch"], h["lr"], color=c)
    for ax, title in zip(axes, ("loss (solid train, dashed valid)", "validation metric (dotted: EMA)", "learning rate")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    _save(fig, path)


def confusion(path, matrix: np.ndarray, class_names: list, title: str) -> None:
    """Row-normalised confusion matrix (row = true class): the diagonal is per-class recall."""
    n = len(class_names)
    size = min(3 + 0.35 * n, 14)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if n <= 40:
        ax.set_xticks(range(n), [str(c) for c in class_names], rotation=90, fontsize=7)
        ax.set_yticks(range(n), [str(c) for c in class_names], fontsize=7)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if matrix[i, j] >= 0.005:
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if matrix[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def bars(path, labels: list[str], values: list[float], ylabel: str, title: str) -> None:
    """A signed bar per label (e.g. CV gain of each TTA view over no TTA)."""
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(labels) + 2), 3.8))
    ax.bar(range(len(labels)), values, color=["C2" if v >= 0 else "C3" for v in values])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def contact_sheet(path, images: list[np.ndarray], captions: list[str], title: str, cols: int = 4) -> None:
    """Images in a grid, each with a caption (e.g. the most confidently wrong OOF predictions)."""
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, cap in zip(axes.flat, images, captions):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.set_title(cap, fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def lr_curve(path, lrs: np.ndarray, losses: np.ndarray, smooth: np.ndarray, suggestion: float) -> None:
    """The LR range test: loss against learning rate (log), the suggestion marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(lrs, losses, alpha=0.3, label="loss")
    ax.plot(lrs, smooth, label="smoothed")
    ax.axvline(suggestion, color="C3", linestyle="--", label=f"suggested train.lr {suggestion:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log)")
    ax.set_ylabel("training loss")
    ax.set_ylim(min(smooth.min(), losses.min()) * 0.9, min(losses.max(), smooth[0] * 4) * 1.05)
    ax.legend()
    _save(fig, path)


def cam_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """An RGB uint8 image with a class activation map (H x W in [0, 1]) laid over it as a heat map."""
    heat = plt.get_cmap("jet")(cam)[..., :3] * 255
    img = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    return ((1 - alpha) * img.astype(np.float32) + alpha * heat).clip(0, 255).astype(np.uint8)


def param_scatter(path, xs: list, ys: list, pruned_xs: list, pruned_ys: list, xlabel: str, ylabel: str,
                  log_x: bool = False) -> None:
    """A sweep's metric against one parameter: finished trials as dots, pruned ones (at their last reported value)
    as crosses; a categorical parameter on evenly spaced ticks."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    cats = sorted({str(x) for x in xs + pruned_xs}) if any(isinstance(x, str) for x in xs + pruned_xs) else None

    def pos(v):
        return [cats.index(str(x)) for x in v] if cats else v

    ax.scatter(pos(xs), ys, label="finished")
    if pruned_xs:
        ax.scatter(pos(pruned_xs), pruned_ys, marker="x", color="grey", label="pruned (last reported)")
    if cats:
        ax.set_xticks(range(len(cats)), cats)
    elif log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def sweep_history(path, done: list[tuple[int, float]], pruned: list[tuple[int, float]], best: list[tuple[int, float]],
                  ylabel: str) -> None:
    """A sweep's trials in order: each finished trial's CV, the best so far, pruned trials at their last value."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    if done:
        ax.scatter(*zip(*done), label="finished")
    if pruned:
        ax.scatter(*zip(*pruned), marker="x", color="grey", label="pruned (last reported)")
    if best:
        ax.step(*zip(*best), where="post", color="C1", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
