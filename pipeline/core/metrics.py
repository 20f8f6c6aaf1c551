"""Classification metrics on (labels, logits or probabilities), including the long-tail view:
many/medium/few-shot accuracy groups classes by their number of training images (Kang et al. 2020)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import cohen_kappa_score, f1_score, log_loss



class _ByBase(dict):
    """{metric: bool}; a top-k metric's name carries its k ("map_at_k@5"), looked up by its base name."""

    def __missing__(self, key):
        base = str(key).partition("@")[0]
        if base == key:
            raise KeyError(key)
        return self[base]


GREATER_IS_BETTER = _ByBase({"accuracy": True, "macro_f1": True, "balanced_accuracy": True, "log_loss": False,
                             "qwk": True, "top_k_accuracy": True, "map_at_k": True})
TOP_K = ("top_k_accuracy", "map_at_k")  # eval.metric values that take eval.top_k: scored as "<metric>@<k>"
_CHUNK = 2048  # rows per block where an N x C temporary is needed: memory grows with rows + classes


def scorer(metric: str, k: int) -> str:
    """The name every scoring call uses: the metric, with its k for a top-k metric ("top_k_accuracy@5")."""
    return f"{metric}@{k}" if metric in TOP_K else metric


def true_rank(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """1-based place of each row's true class when its classes are listed by probability, best first, ties by
    class index: the order `top_k` lists them in a submission."""
    out = np.empty(len(y), np.int64)
    cls = np.arange(probs.shape[1])
    for a in range(0, len(y), _CHUNK):
        p, t = probs[a:a + _CHUNK], y[a:a + _CHUNK]
        pt = p[np.arange(len(t)), t][:, None]
        out[a:a + _CHUNK] = (p > pt).sum(1) + ((p == pt) & (cls[None, :] < t[:, None])).sum(1) + 1
    return out


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """N x k class indices, most probable first, ties by class index (stable), computed in row blocks."""
    k = min(k, probs.shape[1])
    out = np.empty((len(probs), k), np.int64)
    for a in range(0, len(probs), _CHUNK):
        out[a:a + _CHUNK] = np.argsort(-probs[a:a + _CHUNK], axis=1, kind="stable")[:, :k]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def per_class_recall(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Recall per class; NaN for classes absent from y."""
    rec = np.full(n_classes, np.nan)
    for c in range(n_classes):
        m = y == c
        if m.any():
            rec[c] = (pred[m] == c).mean()
    return rec


def shot_groups(train_counts: np.ndarray, many: int, few: int) -> dict[str, np.ndarray]:
    return {"many": train_counts > many, "medium": (train_counts <= many) & (train_counts >= few),
            "few": train_counts < few}


def compute(y: np.ndarray, probs: np.ndarray, train_counts: np.ndarray, many: int = 100, few: int = 20,
            metric: str = "accuracy") -> dict[str, float]:
    """All metrics for probabilities `probs` (N x C); `score` is the configured competition metric."""
    names = ["accuracy", "macro_f1", "balanced_accuracy", "log_loss"]
    names += [metric] if metric not in names else []
    out = {n: score(n, y, probs) for n in names}
    rec = per_class_recall(y, probs.argmax(1), probs.shape[1])
    for name, mask in shot_groups(train_counts, many, few).items():
        r = rec[mask]
        out[f"{name}_acc"] = float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
    out["score"] = out[metric]
    return out


def cv(y: np.ndarray, probs: np.ndarray, fold: np.ndarray, train_counts: list, many: int, few: int,
       metric: str) -> dict:
    """CV of OOF probabilities: the metric per fold (values, mean, std) and every metric on the pooled
    rows. `train_counts[k]`: the class counts fold k's model was trained on (pooled: their mean)."""
    per = [compute(y[fold == k], probs[fold == k], np.asarray(c), many, few, metric)["score"]
           for k, c in enumerate(train_counts)]
    pooled = compute(y, probs, np.mean(train_counts, axis=0), many, few, metric)
    return {"cv_mean": float(np.mean(per)), "cv_std": float(np.std(per)), "per_fold": [float(v) for v in per],
            "cv_pooled": pooled["score"], **{k: v for k, v in pooled.items() if k != "score"}}


def better(a: float, b: float | None, metric: str) -> bool:
    """Is score a better than b (None: no score yet)?"""
    if b is None or not np.isfinite(b):
        return True
    return a > b if GREATER_IS_BETTER[metric] else a < b


def score(name: str, y: np.ndarray, probs: np.ndarray) -> float:
    """One metric, cheaply (used inside hyper-parameter sweeps). Top-k metrics carry their k: "map_at_k@5" is
    MAP@5 (single label: 1 / the true class's place when within the first 5, else 0), "top_k_accuracy@5" the share
    of rows whose true class is among the 5 most probable."""
    base, _, k = name.partition("@")
    if base in TOP_K:
        if not k:
            raise ValueError(f"{name}: a top-k metric needs its k ({base}@5)")
        r = true_rank(np.asarray(y), probs)
        hit = r <= int(k)
        return float(hit.mean() if base == "top_k_accuracy" else np.where(hit, 1.0 / r, 0.0).mean())
    pred = probs.argmax(1)
    n = probs.shape[1]
    if name == "accuracy":
        return float((pred == y).mean())
    if name == "balanced_accuracy":
        return float(np.nanmean(per_class_recall(y, pred, n)))
    if name == "macro_f1":
        return float(f1_score(y, pred, labels=np.arange(n), average="macro", zero_division=0))
    if name == "log_loss":
        return float(log_loss(y, np.clip(probs, 1e-15, 1), labels=np.arange(n)))
    if name == "qwk":
        return float(cohen_kappa_score(y, pred, weights="quadratic"))
    raise ValueError(name)

