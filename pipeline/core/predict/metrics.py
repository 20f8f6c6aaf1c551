"""Classification metrics on (labels, logits or probabilities), including the long-tail view:
many/medium/few-shot accuracy groups classes by their number of training images (Kang et al. 2020)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import cohen_kappa_score, f1_score


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
BLOCK_BYTES = 4 << 20  # an N x C float64 temporary is made this many bytes at a time (see block_rows)


def block_rows(n_classes: int) -> int:
    """Rows per block where an N x C temporary is needed: memory grows with rows + classes, and a block of a few
    MB stays in the cache and is reused by the allocator (blocks of tens of MB are mapped and unmapped, page by
    page, each time: at 10,000 classes 4,096-row blocks made softmax 7x slower, most of it system time). Every
    per-row computation gives the same numbers whatever the block."""
    return max(1, BLOCK_BYTES // (8 * max(int(n_classes), 1)))


def scorer(metric: str, k: int) -> str:
    """The name every scoring call uses: the metric, with its k for a top-k metric ("top_k_accuracy@5")."""
    return f"{metric}@{k}" if metric in TOP_K else metric


@dataclass
class RowScores:
    """Per row, everything a metric here reads of a prediction: the predicted class, the log-probability of the
    true class (clipped at 1e-15, as log-loss is) and the true class's place when the classes are listed by
    probability, best first, ties by class index (1: first; the order `top_k` writes a submission in). A
    metric of any subset of rows is a metric of these rows: a sweep over candidates keeps O(rows) per candidate
    instead of rows x classes."""
    pred: np.ndarray
    logp: np.ndarray
    place: np.ndarray
    conf: np.ndarray  # the predicted class's probability (reports: the most confidently wrong rows)
    n_classes: int

    FIELDS = ("pred", "logp", "place", "conf")

    def take(self, rows) -> "RowScores":
        return RowScores(*(getattr(self, f)[rows] for f in self.FIELDS), self.n_classes)

    def arrays(self) -> dict[str, np.ndarray]:
        """The fields as arrays named for a stage's npz file (`rs_pred`, ..., `rs_n_classes`): what the leaderboard
        and the reports read instead of recomputing rows x classes (O(rows) on disk)."""
        return {**{f"rs_{f}": getattr(self, f) for f in self.FIELDS}, "rs_n_classes": np.array(self.n_classes)}

    @staticmethod
    def of_arrays(o: dict) -> "RowScores | None":
        """RowScores stored by `arrays`, or None when the file has none (written before they were)."""
        if "rs_pred" not in o:
            return None
        return RowScores(*(o[f"rs_{f}"] for f in RowScores.FIELDS), int(o["rs_n_classes"]))

    @staticmethod
    def pick(parts: list["RowScores"], which: np.ndarray) -> "RowScores":
        """Row i of parts[which[i]] (scores of the same rows by several predictions: cross-fitting's assembly)."""
        out = RowScores(*(np.empty_like(getattr(parts[0], f)) for f in RowScores.FIELDS), parts[0].n_classes)
        for j, p in enumerate(parts):
            mine = which == j
            for f in RowScores.FIELDS:
                getattr(out, f)[mine] = getattr(p, f)[mine]
        return out

    @staticmethod
    def concat(parts: list["RowScores"]) -> "RowScores":
        return RowScores(*(np.concatenate([getattr(p, f) for p in parts]) for f in RowScores.FIELDS),
                         parts[0].n_classes)


def row_scores(y: np.ndarray, probs: np.ndarray | None = None, logits: np.ndarray | None = None,
               dtype=None) -> RowScores:
    """RowScores of probabilities, or of logits (softmax taken per block of rows, in `dtype` when given: N x C
    temporaries stay small)."""
    src = probs if probs is not None else logits
    n = len(y)
    pred, logp, place, conf = np.empty(n, np.int64), np.empty(n, np.float64), np.empty(n, np.int64), np.empty(n)
    cls, step = np.arange(src.shape[1]), block_rows(src.shape[1])
    for a in range(0, n, step):
        p = src[a:a + step] if probs is not None else softmax(src[a:a + step].astype(dtype or src.dtype))
        t = y[a:a + step]
        pt = p[np.arange(len(t)), t]
        pred[a:a + step] = p.argmax(1)
        conf[a:a + step] = p.max(1)
        logp[a:a + step] = np.log(np.clip(pt.astype(np.float64), 1e-15, 1))
        place[a:a + step] = (p > pt[:, None]).sum(1) + ((p == pt[:, None]) & (cls[None, :] < t[:, None])).sum(1) + 1
    return RowScores(pred, logp, place, conf, src.shape[1])


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """N x k class indices, most probable first, ties by class index (stable), computed in row blocks."""
    k = min(k, probs.shape[1])
    out, step = np.empty((len(probs), k), np.int64), block_rows(probs.shape[1])
    for a in range(0, len(probs), step):
        out[a:a + step] = np.argsort(-probs[a:a + step], axis=1, kind="stable")[:, :k]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def per_class_recall(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Recall per class; NaN for classes absent from y (counted, not looped: thousands of classes are cheap)."""
    n = np.bincount(y, minlength=n_classes).astype(np.float64)
    hits = np.bincount(y[pred == y], minlength=n_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, hits / n, np.nan)


def shot_groups(train_counts: np.ndarray, many: int, few: int) -> dict[str, np.ndarray]:
    return {"many": train_counts > many, "medium": (train_counts <= many) & (train_counts >= few),
            "few": train_counts < few}


def compute(y: np.ndarray, probs: np.ndarray, train_counts: np.ndarray, many: int = 100, few: int = 20,
            metric: str = "accuracy", rows: RowScores | None = None) -> dict[str, float]:
    """All metrics for probabilities `probs` (N x C; or `rows`, their RowScores); `score` is the configured
    competition metric."""
    rs = rows if rows is not None else row_scores(y, probs)
    names = ["accuracy", "macro_f1", "balanced_accuracy", "log_loss"]
    names += [metric] if metric not in names else []
    out = {n: score_rows(n, y, rs) for n in names}
    rec = per_class_recall(y, rs.pred, rs.n_classes)
    for name, mask in shot_groups(train_counts, many, few).items():
        r = rec[mask]
        out[f"{name}_acc"] = float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
    out["score"] = out[metric]
    return out


def cv(y: np.ndarray, probs: np.ndarray | None, fold: np.ndarray, train_counts: list, many: int, few: int,
       metric: str, rows: RowScores | None = None) -> dict:
    """CV of OOF probabilities (or `rows`, their RowScores): the metric per fold (values, mean, std) and every
    metric on the pooled rows. `train_counts[k]`: the class counts fold k's model was trained on (pooled: their
    mean). Per-row scores are computed once: no fold's rows x classes is copied."""
    rs = rows if rows is not None else row_scores(y, probs)
    per = [compute(y[fold == k], None, np.asarray(c), many, few, metric, rows=rs.take(fold == k))["score"]
           for k, c in enumerate(train_counts)]
    pooled = compute(y, None, np.mean(train_counts, axis=0), many, few, metric, rows=rs)
    return {"cv_mean": float(np.mean(per)), "cv_std": float(np.std(per)), "per_fold": [float(v) for v in per],
            "cv_pooled": pooled["score"], **{k: v for k, v in pooled.items() if k != "score"}}


def better(a: float, b: float | None, metric: str) -> bool:
    """Is score a better than b (None: no score yet)?"""
    if b is None or not np.isfinite(b):
        return True
    return a > b if GREATER_IS_BETTER[metric] else a < b


def score(name: str, y: np.ndarray, probs: np.ndarray) -> float:
    """One metric, cheaply (used inside hyper-parameter sweeps)."""
    return score_rows(name, y, row_scores(y, probs))


def score_rows(name: str, y: np.ndarray, rs: RowScores) -> float:
    """One metric of RowScores. Top-k metrics carry their k: "map_at_k@5" is MAP@5 (single label: 1 / the true
    class's place when within the first 5, else 0), "top_k_accuracy@5" the share of rows whose true class is
    among the 5 most probable."""
    base, _, k = name.partition("@")
    if base in TOP_K:
        if not k:
            raise ValueError(f"{name}: a top-k metric needs its k ({base}@5)")
        hit = rs.place <= int(k)
        return float(hit.mean() if base == "top_k_accuracy" else np.where(hit, 1.0 / rs.place, 0.0).mean())
    pred, n = rs.pred, rs.n_classes
    if name == "accuracy":
        return float((pred == y).mean())
    if name == "balanced_accuracy":
        return float(np.nanmean(per_class_recall(y, pred, n)))
    if name == "macro_f1":
        return float(f1_score(y, pred, labels=np.arange(n), average="macro", zero_division=0))
    if name == "log_loss":
        return float(-rs.logp.mean())
    if name == "qwk":
        return float(cohen_kappa_score(y, pred, weights="quadratic"))
    raise ValueError(name)
