"""Samplers for class imbalance, as index lists per epoch (Kang et al. 2020, "Decoupling...").

The probability of drawing an image of class c is proportional to n_c^q:
  instance (q=1, plain shuffling), square-root (q=1/2), class-balanced (q=0), and
  progressive: a linear move from instance to class-balanced over the epochs.
Each epoch's order is a pure function of (seed, epoch), so a resumed run replays the same batches,
and every process of a distributed run computes the same global order and takes its own slice of
each global batch (so the class-balanced samplers stay balanced across processes).
"""
from __future__ import annotations

import numpy as np


def class_probs(kind: str, counts: np.ndarray, epoch: int = 0, epochs: int = 1) -> np.ndarray:
    """Probability of drawing each class."""
    counts = counts.astype(float)
    present = counts > 0
    if kind == "instance":
        q = counts
    elif kind == "sqrt":
        q = np.sqrt(counts)
    elif kind == "class_balanced":
        q = present.astype(float)
    elif kind == "progressive":
        t = epoch / max(epochs - 1, 1)
        return (1 - t) * class_probs("instance", counts) + t * class_probs("class_balanced", counts)
    else:
        raise ValueError(f"unknown sampler {kind}")
    return q / q.sum()


def epoch_indices(kind: str, labels: np.ndarray, n_classes: int, seed: int, epoch: int, epochs: int,
                  num_samples: int | None = None) -> np.ndarray:
    """Indices into `labels` for one epoch (length num_samples, default len(labels))."""
    rng = np.random.default_rng([seed, epoch, 7])
    n = num_samples or len(labels)
    if kind == "instance":
        perm = rng.permutation(len(labels))
        return np.resize(perm, n) if n != len(labels) else perm
    counts = np.bincount(labels, minlength=n_classes)
    pc = class_probs(kind, counts, epoch, epochs)
    per_sample = pc[labels] / counts[labels]
    return rng.choice(len(labels), size=n, replace=True, p=per_sample / per_sample.sum())


def rank_slice(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This process's share of a global batch."""
    return np.array_split(batch, world)[rank]
