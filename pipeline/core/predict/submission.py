"""Ensemble combination and the submission file: shared by stage 5 and `./run.sh predict`.

`combine` merges members' probabilities by the ensemble method; `build_submission` turns probabilities
into exactly the sample submission's ids, order and columns (one label column, the top k labels
space-separated in one column, or one probability column per class) and `validate_submission` checks the result before anything is written.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from ..errors import PipelineError
from .metrics import block_rows, top_k

METHODS = ("mean", "weighted", "geo_mean", "rank", "hill_climb")  # hill_climb: a weighted mean (counts / steps)


PLAIN = "plain"  # a member name's third part: the member without TTA (stage 4's no-TTA view)


class Member(NamedTuple):
    """An ensemble member's name, `exp`, `exp:head` or `exp:head:plain`, read by `Member.parse` everywhere a
    name is split (config members, stage 5's records, hill climbing's candidates, teachers, export)."""
    exp: str
    head: str | None = None  # None: stage 4's primary head
    plain: bool = False  # the head's no-TTA view instead of its TTA policy

    @classmethod
    def parse(cls, name: str, where: str = "ensemble member") -> "Member":
        parts = str(name).split(":")
        if len(parts) > 3 or any(not p for p in parts) or (len(parts) == 3 and parts[2] != PLAIN):
            raise PipelineError(f"{where} '{name}': expected experiment, experiment:head or "
                                f"experiment:head:{PLAIN}")
        return cls(parts[0], parts[1] if len(parts) > 1 else None, len(parts) == 3)

    def with_head(self, head: str) -> "Member":
        return self._replace(head=head)

    def __str__(self) -> str:
        return ":".join([self.exp] + ([self.head] if self.head else []) + ([PLAIN] if self.plain else []))


def parse_members(members: list[str], experiment: str) -> list[Member]:
    """The ensemble's members (config ensemble.members; empty: this experiment alone)."""
    return [Member.parse(m, "config ensemble.members:") for m in members or [experiment]]


def combine(probs: list, method: str, weights: np.ndarray | None = None) -> np.ndarray:
    """N x C probabilities (float64) of members (weights: non-negative, summing to 1; default equal)."""
    return np.asarray(mix(probs, method, weights))


def mix(probs: list, method: str, weights: np.ndarray | None = None) -> "Mix | np.ndarray":
    """`combine` without the N x C result: a Mix computed a block of rows at a time from the members' tables
    (arrays, or tables sliced by rows such as stored.ProbTable); rank (per class, across every row) is dense."""
    if method not in METHODS:
        raise PipelineError(f"unknown ensemble method '{method}' (one of {list(METHODS)})")
    w = np.full(len(probs), 1.0 / len(probs)) if weights is None else np.asarray(weights, float)
    if method == "rank":
        return _combine([np.asarray(x) for x in probs], method, w)
    return Mix(probs, method, w)


class Mix:
    """Members' probabilities combined per row (mean, weighted, geometric mean) on demand: `mixed[a:b]` is rows a..b
    (float64); np.asarray(mixed) the whole table, metrics.block_rows at a time (every method but rank is per row: the same
    numbers in less memory)."""
    dtype = np.dtype(np.float64)

    def __init__(self, probs: list, method: str, w: np.ndarray):
        self.probs, self.method, self.w = probs, method, w

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.probs[0].shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if not isinstance(rows, slice):
            raise TypeError("Mix: rows by slice (np.asarray(mixed) for the whole table)")
        return _combine([x[rows] for x in self.probs], self.method, self.w)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, np.float64)
        step = block_rows(self.shape[1])
        for a in range(0, len(self), step):
            out[a:a + step] = self[a:a + step]
        return out if dtype is None else out.astype(dtype)


def _combine(probs: list[np.ndarray], method: str, w: np.ndarray) -> np.ndarray:
    p = np.stack([np.clip(x, 1e-12, 1) for x in probs]).astype(np.float64)
    if method in ("mean", "weighted", "hill_climb"):
        out = np.tensordot(w, p, axes=1)
    elif method == "geo_mean":
        out = np.exp(np.tensordot(w, np.log(p), axes=1))
    else:  # rank: per class, across images (every row at once); on float32 values, as stage 4 stores them, so
        # predict (whose probabilities are float64) ties exactly where stage 5 does
        r = np.stack([rankdata(x.astype(np.float32), axis=0) / len(x) for x in p])
        out = np.tensordot(w, r, axes=1)
    return out / out.sum(1, keepdims=True)


def top_labels(probs: np.ndarray, classes: list, k: int) -> list[str]:
    """Each row's k most probable classes, best first (ties by class order), space-separated."""
    names = np.array([str(c) for c in classes], dtype=object)
    spaced = [n for n in names if any(ch.isspace() for ch in n)]
    if spaced:  # the plan refuses this before training; predict and old outputs meet it here
        raise PipelineError(f"a top-k submission separates labels by spaces, but class name(s) {spaced[:3]} hold "
                            f"one: the rows could not be read back (layout coco: data.category_label=id)")
    if k > len(names):
        raise PipelineError(f"a top-{k} submission row needs {k} labels; there are {len(names)} classes")
    return [" ".join(row) for row in names[top_k(probs, k)]]


def build_submission(sample: pd.DataFrame, ids: np.ndarray, probs: np.ndarray, classes: list, kind: str,
                     label_col: str, where: str, k: int = 5) -> pd.DataFrame:
    """The submission table for `sample` (the sample submission read from `where`); `k`: labels per row of a
    topk submission."""
    if not np.array_equal(sample.iloc[:, 0].astype(str).values, np.asarray(ids).astype(str)):
        raise PipelineError(f"{where}: its ids differ from the predicted test ids (order or set)")
    cols = list(sample.columns)
    if kind == "topk":  # the prediction column keeps the sample's name (Predicted, predictions, ...)
        if len(cols) != 2:
            raise PipelineError(f"{where}: a topk submission has an id and one prediction column, found {cols}")
        sub = pd.DataFrame({cols[0]: sample.iloc[:, 0].values, cols[1]: top_labels(probs, classes, k)})
    elif kind == "label":
        if cols[1:] != [label_col]:
            raise PipelineError(f"{where}: expected columns [{cols[0]}, {label_col}] for a label submission, found "
                                f"{cols} (ensemble.submission=proba writes one column per class)")
        sub = pd.DataFrame({cols[0]: sample.iloc[:, 0].values, cols[1]: [classes[i] for i in top_k(probs, 1)[:, 0]]})
    else:
        names = [str(c) for c in classes]
        unknown = [c for c in cols[1:] if c not in names]
        missing = [c for c in names if c not in cols[1:]]
        if unknown or missing:
            raise PipelineError(f"{where}: probability columns must be the class names; unknown columns "
                                f"{unknown}, classes without a column {missing}")
        sub = pd.DataFrame({cols[0]: sample.iloc[:, 0].values})
        probs = np.asarray(probs)  # one column per class: the table is the submission
        for c in cols[1:]:
            sub[c] = probs[:, names.index(c)]
    validate_submission(sub, sample, kind)
    return sub


def submission_without_sample(ids: np.ndarray, probs: np.ndarray, classes: list, kind: str, id_col: str,
                              label_col: str, k: int = 5) -> pd.DataFrame:
    """A submission without a sample submission: the ids in test-folder (or test JSON) order."""
    if kind == "topk":
        return pd.DataFrame({id_col: ids, label_col: top_labels(probs, classes, k)})
    if kind == "label":
        return pd.DataFrame({id_col: ids, label_col: [classes[i] for i in top_k(probs, 1)[:, 0]]})
    sub = pd.DataFrame({id_col: ids})
    probs = np.asarray(probs)
    for i, c in enumerate(classes):
        sub[str(c)] = probs[:, i]
    return sub


def validate_submission(sub: pd.DataFrame, sample: pd.DataFrame, kind: str) -> None:
    if list(sub.columns) != list(sample.columns) or len(sub) != len(sample):
        raise PipelineError("submission does not match the sample submission's columns or length")
    if not (sub.iloc[:, 0].astype(str).values == sample.iloc[:, 0].astype(str).values).all():
        raise PipelineError("submission ids are not in the sample submission's order")
    if sub.isna().any().any():
        raise PipelineError("submission has empty values")
    if kind == "proba":
        p = sub.iloc[:, 1:].values.astype(float)
        if (p < 0).any() or not np.allclose(p.sum(1), 1, atol=1e-4):
            raise PipelineError("submission probabilities are not a distribution per row")
