"""Losses on soft targets (one-hot, smoothed or mixed): cross-entropy, focal or LDAM (Cao et al. 2019,
label-distribution-aware margins), optionally with class-balanced weights from the effective number of
samples (Cui et al. 2019), from the start or deferred to a later epoch (DRW, Cao et al. 2019), and with the
cross-entropy of taxonomy levels (a parent's probability the sum of its classes': the hierarchical loss of
Bertinetto et al. 2020 without its per-level discount; Herbarium 2022's winners trained family / genus / species)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def effective_number_weights(counts: np.ndarray, beta: float) -> np.ndarray:
    """w_c = (1 - beta) / (1 - beta^n_c), normalised to sum to the number of classes."""
    counts = np.maximum(counts.astype(float), 1.0)
    w = (1.0 - beta) / (1.0 - np.power(beta, counts))
    return w / w.sum() * len(counts)


def ldam_margins(counts: np.ndarray, max_margin: float) -> np.ndarray:
    """m_c proportional to n_c^(-1/4), the rarest class's equal to `max_margin` (classes without images: max)."""
    m = 1.0 / np.power(np.maximum(counts.astype(float), 1.0), 0.25)
    return (m * (max_margin / m.max())).astype(np.float32)


def arcface_margins(counts: np.ndarray, margin: float, margin_min: float | None) -> np.ndarray:
    """Additive angular margins of ArcFace, one per class: every class `margin`, or with `margin_min` class-size
    margins (Happywhale 2022's winners): linear in n_c^(-1/4) from `margin_min` for the most frequent class to
    `margin` for the rarest (classes without images: `margin`)."""
    w = 1.0 / np.power(np.maximum(counts.astype(float), 1.0), 0.25)
    if margin_min is None or w.max() == w.min():
        return np.full(len(counts), margin, np.float32)
    return (margin_min + (w - w.min()) / (w.max() - w.min()) * (margin - margin_min)).astype(np.float32)


class SoftTargetLoss(nn.Module):
    """`kind`: ce, focal or ldam (then `margins`, one per class, and `scale`). With a soft target t (label
    smoothing, mixup) LDAM subtracts t_c * m_c from every logit: exactly the paper's margin on the true class
    for a one-hot target, and the mixed margin for a mixed one. `arc_margins` (model.head=arcface: the logits are s x
    cos, `arc_scale` = s): ArcFace's additive angular margin, each logit s x cos(theta_c + t_c m_c), the same way."""

    def __init__(self, kind: str = "ce", gamma: float = 2.0, class_weights: np.ndarray | None = None,
                 margins: np.ndarray | None = None, scale: float = 1.0, levels: list[np.ndarray] | None = None,
                 level_weight: float = 0.0, arc_margins: np.ndarray | None = None, arc_scale: float = 1.0):
        super().__init__()
        self.arc_scale = arc_scale
        self.register_buffer("arc", torch.as_tensor(arc_margins, dtype=torch.float32) if arc_margins is not None
                             else None, persistent=False)
        self.kind, self.gamma, self.scale = kind, gamma, scale
        # taxonomy levels: class x parent 0/1 matrices; each level adds level_weight x its cross-entropy, the
        # parent's probability the sum of its classes' (the target's mass moved to parents the same way)
        self.level_weight = level_weight
        self.n_levels = len(levels or [])
        for i, m in enumerate(levels or []):
            self.register_buffer(f"level{i}", torch.as_tensor(m, dtype=torch.float32), persistent=False)
        self.register_buffer("w", None, persistent=False)
        self.set_class_weights(class_weights)
        m = torch.as_tensor(margins, dtype=torch.float32) if margins is not None else None
        self.register_buffer("m", m, persistent=False)
        if kind == "ldam" and m is None:
            raise ValueError("the LDAM loss needs per-class margins")

    def set_class_weights(self, class_weights: np.ndarray | None, device=None) -> None:
        """Class weights from now on (DRW switches them on at an epoch); None: unweighted."""
        self.w = (torch.as_tensor(class_weights, dtype=torch.float32, device=device)
                  if class_weights is not None else None)

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = raw = logits.float()
        if self.arc is not None:
            cos = (logits / self.arc_scale).clamp(-1 + 1e-6, 1 - 1e-6)
            m = target * self.arc
            shifted = torch.acos(cos) + m  # past pi cos would rise again: there the usual linear fall-back
            logits = self.arc_scale * torch.where(shifted < math.pi, torch.cos(shifted), cos - m * torch.sin(m))
        if self.kind == "ldam":
            logits = self.scale * (logits - target * self.m)
        logp = F.log_softmax(logits, dim=1)
        term = -target * logp
        if self.kind == "focal":
            term = term * (1.0 - logp.exp()).pow(self.gamma)
        if self.w is not None:
            term = term * self.w
        out = term.sum(1)
        if self.n_levels:
            p = F.softmax(raw, dim=1)
            for i in range(self.n_levels):
                m = getattr(self, f"level{i}")
                out = out - self.level_weight * (target @ m * torch.log((p @ m).clamp_min(1e-12))).sum(1)
        return out

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_sample(logits, target).mean()
