"""Stage 1: stratified (optionally grouped) K folds.

Usage:   ./run.sh folds [--config FILE] [--force] [key=value ...]
Input:   the competition's train table (config `data.*`)
Output:  folds/<name>.csv   the train table (id, label, [group], path) plus an integer `fold` column
         folds/<name>.json  the label encoding (`classes`, index = class id) and what the folds
                            were made from (hash of the table, K, seed)
Same inputs and seed give a byte-identical folds file. Every later stage reads these two files and
never recomputes folds. An existing folds file made from other inputs is refused unless --force:
it is shared by every experiment that names it, so rebuilding it makes all of them stale.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from ..core.files.artifacts import read_json, write_csv, write_json
from ..core.config import Config
from ..core.inputs.data import encode, fold_problems, make_classes, read_train_table, to_builtin, train_source
from ..core.errors import PipelineError
from ..core.files.provenance import environment
from ..core.files.units import experiment_units

log = logging.getLogger("pipeline")


def make_folds(df: pd.DataFrame, n_splits: int, seed: int, grouped: bool, rare: str = "allow",
               where: str = "the train table") -> np.ndarray:
    y = df["label"].astype(str).values
    problem, warning = fold_problems(df, n_splits, grouped, rare, where)
    if problem:
        raise PipelineError(problem)
    if warning:
        log.warning("%s", warning)
    if grouped:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        groups = df["group"].astype(str).values
    else:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        groups = None
    fold = np.full(len(df), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        for k, (_, valid) in enumerate(splitter.split(np.zeros(len(df)), y, groups)):
            fold[valid] = k
    return fold


def fold_table(df: pd.DataFrame, classes: list) -> pd.DataFrame:
    t = pd.crosstab(df["label"], df["fold"]).reindex(classes).fillna(0).astype(int)
    t.columns = [f"fold{k}" for k in t.columns]
    t["total"] = t.sum(axis=1)
    return t


def status(cfg: Config) -> list[str]:
    """Why stage 1 would do work now (empty: the folds file is up to date)."""
    return experiment_units(cfg).status("1")


def run(cfg: Config, force: bool = False) -> dict:
    """Write the folds file (unless an up-to-date one exists); returns its record."""
    df = read_train_table(cfg.data)
    classes = make_classes(df["label"])
    units = experiment_units(cfg)
    made_from = units.record("folds")
    if cfg.folds_csv.exists() and cfg.folds_record.exists() and not force:
        if units.current("folds"):
            log.info("folds up to date: %s (use --force to rebuild)", cfg.folds_csv)
            return read_json(cfg.folds_record)
        rec = read_json(cfg.folds_record)
        changed = sorted(k for k in made_from if rec.get("made_from", {}).get(k) != made_from[k])
        raise PipelineError(
            f"{cfg.folds_csv} exists but was made from different inputs (changed: {', '.join(changed)}); "
            f"rebuilding it invalidates every run trained on it: re-run with --force, or set folds.name")
    df["fold"] = make_folds(df, cfg.folds.n_splits, cfg.folds.seed, cfg.data.group_col is not None,
                            cfg.folds.rare_classes, str(train_source(cfg.data)))
    encode(df["label"], classes, str(cfg.folds_csv))  # sanity: every label is encodable
    write_csv(cfg.folds_csv, df)
    record = {"classes": [to_builtin(c) for c in classes], "n_splits": cfg.folds.n_splits, "n_rows": len(df),
              "made_from": made_from, "env": environment()}
    write_json(cfg.folds_record, record)
    log.info("wrote %s (%d rows, %d classes, %d folds); images per class and fold:\n%s",
             cfg.folds_csv, len(df), len(classes), cfg.folds.n_splits, fold_table(df, classes).to_string())
    return record

