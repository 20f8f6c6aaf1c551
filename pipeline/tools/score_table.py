"""The table `./run.sh all` prints at the end: CV of joint / best rebalanced head / + TTA per
experiment, the ensemble's CV, and the private score where the test labels are known (demo)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.artifacts import read_json, read_npz
from ..core.config import Config
from ..core.metrics import score, softmax

log = logging.getLogger("pipeline")


def private_score(cfg: Config, ids: np.ndarray, probs: np.ndarray, classes: list) -> float | None:
    """The metric against held-out test labels (`data.test_labels`, the demo's), or None."""
    if not cfg.data.test_labels or not cfg.data_path(cfg.data.test_labels).exists():
        return None
    t = pd.read_csv(cfg.data_path(cfg.data.test_labels), dtype=str).set_index(cfg.data.id_col)[cfg.data.label_col]
    names = [str(c) for c in classes]
    return score(cfg.eval.metric, np.array([names.index(str(t[i])) for i in ids]), probs)


def summary_table(cfg: Config) -> pd.DataFrame:
    name = cfg.ensemble.name or cfg.experiment
    ens = read_json(Path("submissions") / f"{name}.json")
    rows = []
    for member in ens["members"]:
        exp, head = member.split(":")
        inf = read_json(Path("runs") / exp / "infer" / "summary.json")
        cv = pd.DataFrame(inf["cv"])
        if cv.empty:
            continue
        pick = lambda h, v: cv[(cv["head"] == h) & (cv["views"] == v)]  # noqa: E731
        joint = pick("joint", "no TTA").iloc[0]
        best = pick(head, "no TTA").iloc[0]
        tta = pick(head, "policy").iloc[0]
        jt = read_npz(Path("runs") / exp / "infer" / "joint" / "test.npz")
        bt = read_npz(Path("runs") / exp / "infer" / head / "test.npz")
        plain = softmax(jt["view_logits"][list(jt["views"]).index("orig@1")].astype(np.float32))
        rows.append({"model": exp, "head": head, "CV joint": joint["cv_mean"], "CV head": best["cv_mean"],
                     "CV head+TTA": tta["cv_mean"], "CV ensemble": np.nan,
                     "private joint": private_score(cfg, jt["ids"], plain, inf["classes"]),
                     "private head+TTA": private_score(cfg, bt["ids"], bt["probs"], inf["classes"])})
    t = pd.DataFrame(rows)
    ens_row = [r for r in ens["table"] if r["member"].startswith("ensemble")]
    if ens_row:
        t = pd.concat([t, pd.DataFrame([{"model": ens_row[0]["member"], "head": "", "CV ensemble": ens_row[0]["cv_mean"],
                                          "private head+TTA": ens["private"]}])], ignore_index=True)
    return t


def print_summary(cfg: Config) -> pd.DataFrame:
    t = summary_table(cfg)
    log.info("\n=== %s: CV (%s, mean over folds) and private score ===\n%s", cfg.ensemble.name or cfg.experiment,
             cfg.eval.metric, t.to_string(index=False, float_format="%.4f", na_rep=""))
    return t
