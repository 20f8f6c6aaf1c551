"""Losses on soft targets (one-hot, smoothed or mixed): cross-entropy or focal, optionally with
class-balanced weights from the effective number of samples (Cui et al. 2019)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def effective_number_weights(counts: np.ndarray, beta: float) -> np.ndarray:
    """w_c = (1 - beta) / (1 - beta^n_c), normalised to sum to the number of classes."""
    counts = np.maximum(counts.astype(float), 1.0)
    w = (1.0 - beta) / (1.0 - np.power(beta, counts))
    return w / w.sum() * len(counts)


class SoftTargetLoss(nn.Module):
    def __init__(self, kind: str = "ce", gamma: float = 2.0, class_weights: np.ndarray | None = None):
        super().__init__()
        self.kind, self.gamma = kind, gamma
        w = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("w", w, persistent=False)

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1)
        term = -target * logp
        if self.kind == "focal":
            term = term * (1.0 - logp.exp()).pow(self.gamma)
        if self.w is not None:
            term = term * self.w
        return term.sum(1)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_sample(logits, target).mean()
