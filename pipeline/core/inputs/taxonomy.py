"""Class taxonomies (`train.taxonomy`): each class's parent at each named level, from `data.taxonomy` (a CSV whose
first column is the class, one column per level) or, with layout coco and no CSV, from the categories' own fields
(iNaturalist and Herbarium files carry supercategory, kingdom, ..., family, genus).

Refused with the file and rows at fault: a class of the training set missing from the table, a class listed twice
with different parents (two parents at one level), an empty parent, a level that is not a column.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DataCfg
from ..errors import PipelineError
from .data import _first, read_json_file, read_table


@dataclass(frozen=True)
class Level:
    """One level: its name, its parents' names (their index order) and each class's parent index."""
    name: str
    parents: tuple[str, ...]
    of_class: np.ndarray  # (n_classes,) int64

    def matrix(self) -> np.ndarray:
        """n_classes x n_parents, 1 where the class belongs to the parent: soft targets and probabilities of the
        classes become the parents' by a product with it."""
        m = np.zeros((len(self.of_class), len(self.parents)), np.float32)
        m[np.arange(len(self.of_class)), self.of_class] = 1.0
        return m


def source(d: DataCfg) -> Path:
    """The file the taxonomy is read from: data.taxonomy, or (layout coco) the train JSON's categories."""
    if d.taxonomy:
        return d.path(d.taxonomy)
    if d.layout == "coco":
        return d.path(d.train_json)
    raise PipelineError("train.taxonomy needs each class's parents: set data.taxonomy (a CSV: class, then one column "
                        "per level), or use layout coco with categories that carry the levels")


def _table(d: DataCfg) -> tuple[pd.DataFrame, str]:
    """(a table whose first column is the class, one column per level; what to name in errors)."""
    path = source(d)
    if d.taxonomy:
        if not path.is_file():
            raise PipelineError(f"data.taxonomy: {path} not found")
        t = read_table(path, "taxonomy (config data.taxonomy)")
        if t.shape[1] < 2:
            raise PipelineError(f"{path}: needs the class column and at least one level column, has {list(t.columns)}")
        return t, str(path)
    cats = read_json_file(path, "train annotations (config data.root / data.train_json)").get("categories") or []
    key = "name" if d.category_label == "name" else "id"
    rows = [{k: "" if v is None else str(v) for k, v in c.items() if not isinstance(v, (dict, list))}
            for c in cats if isinstance(c, dict)]
    t = pd.DataFrame(rows).fillna("")
    if t.empty or key not in t:
        raise PipelineError(f"{path}: no 'categories' with a '{key}' to take the taxonomy from")
    return t[[key, *[c for c in t.columns if c != key]]], f"{path} (categories)"


def read_levels(d: DataCfg, classes: list, levels: list[str]) -> list[Level]:
    """Each named level of every class in `classes` (the label encoding's order)."""
    if not levels:
        return []
    t, where = _table(d)
    cls = t.columns[0]
    missing = [lv for lv in levels if lv not in t.columns[1:]]
    if missing:
        raise PipelineError(f"train.taxonomy: level(s) {missing} are not columns of {where} "
                            f"(it has {list(t.columns[1:])})")
    t = t.astype(str)
    known = set(t[cls])
    absent = [c for c in map(str, classes) if c not in known]
    if absent:
        raise PipelineError(f"{where}: {len(absent)} class(es) of the training set are not listed: {_first(absent)}")
    out = []
    for lv in levels:
        pairs = t[[cls, lv]].drop_duplicates()
        twice = pairs[cls][pairs[cls].duplicated()].unique()
        if len(twice):
            raise PipelineError(f"{where}: class(es) with two parents at level '{lv}': {_first(twice)} (a taxonomy "
                                f"is a tree: one parent per class and level)")
        parent = dict(zip(pairs[cls], pairs[lv]))
        empty = [c for c in map(str, classes) if not parent[c].strip()]
        if empty:
            raise PipelineError(f"{where}: class(es) without a '{lv}': {_first(empty)}")
        names = tuple(sorted({parent[str(c)] for c in classes}))
        index = {p: i for i, p in enumerate(names)}
        out.append(Level(lv, names, np.array([index[parent[str(c)]] for c in classes], np.int64)))
    return out
