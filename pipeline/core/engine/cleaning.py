"""Label cleaning before a fold trains (`train.clean_labels`, #48 item 3): the rows of the fold's training set whose
label confidently disagrees with what the rest of that training set predicts for them, found by confident learning
(Northcutt et al. 2021, cleanlab's `find_label_issues`), then dropped or relabelled to the predicted class.

Honest by construction: the predictions come from an inner cross-validation *of fold k's training rows only*
(logistic regression on the frozen pretrained backbone's features, which depend on no label), so no flag that
shapes fold k's model was made by a model that saw fold k's held-out rows; those rows are never dropped, relabelled
or read. (Plain OOF predictions would not do: the other folds' models trained on fold k.)
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
from sklearn.model_selection import StratifiedKFold

from ..nets.heads import probe_head

log = logging.getLogger("pipeline")
INNER_FOLDS = 5


def inner_probabilities(feats: np.ndarray, y: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    """Each row's class probabilities from a linear probe fit on the other inner folds' rows (INNER_FOLDS,
    stratified; a class with fewer rows than folds is missing from some of them: its probe gives it a low bias)."""
    out = np.zeros((len(y), n_classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the least populated class has only k members"
        splits = list(StratifiedKFold(INNER_FOLDS, shuffle=True, random_state=seed).split(feats, y))
    for fit, held in splits:
        logits = probe_head(feats[fit], y[fit], n_classes).logits(feats[held]).astype(np.float64)
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        out[held] = p / p.sum(1, keepdims=True)
    return out


def label_issues(feats: np.ndarray, y: np.ndarray, n_classes: int, max_share: float,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the rows flagged, most confidently wrong first, at most max_share of them; each row's predicted class).
    cleanlab sees the classes present in y only (its confident joint needs every column to have rows)."""
    from cleanlab.filter import find_label_issues

    probs = inner_probabilities(feats, y, n_classes, seed)
    present = np.unique(y)
    local = np.searchsorted(present, y)
    p = probs[:, present]
    p = p / np.maximum(p.sum(1, keepdims=True), 1e-12)
    if len(present) < 2:
        return np.zeros(0, np.int64), probs.argmax(1)
    ranked = find_label_issues(local, p, filter_by="prune_by_noise_rate", return_indices_ranked_by="self_confidence",
                               n_jobs=1)
    keep = int(np.floor(max_share * len(y)))
    return np.asarray(ranked[:keep], np.int64), present[p.argmax(1)]
