"""The table `./run.sh all` prints at the end: CV of joint / best rebalanced head / + TTA per
experiment, the ensemble's CV, and the private score where the test labels are known (demo)."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ...core.files import layout
from ...core.files.artifacts import read_json
from ...core.config import DataCfg
from ...core.inputs.data import private_score
from ...core.predict.stored import Stage4
from ...core.predict.submission import Member

log = logging.getLogger("pipeline")


def summary_table(name: str, data: DataCfg, metric: str) -> pd.DataFrame:
    """Ensemble `name`'s members and the ensemble: CV of the joint head, the head, the head with TTA; the private
    score (`data`: its test labels) of each."""
    ens = read_json(layout.submission_record(name))
    rows = []
    for member in map(Member.parse, ens["members"]):
        exp, head = member.exp, member.head
        run = layout.RunDir.of(exp)
        inf = read_json(run.infer_summary)
        cv = pd.DataFrame(inf["cv"])
        if cv.empty:
            continue
        pick = lambda h, v: cv[(cv["head"] == h) & (cv["views"] == v)]  # noqa: E731
        joint = pick("joint", "no TTA").iloc[0]
        best = pick(head, "no TTA").iloc[0]
        tta = best if member.plain else pick(head, "policy").iloc[0]  # :plain is the no-TTA view
        # the test probabilities as tables read a block of rows at a time, and only where there are test labels
        # (a 200,000-image test set at 10,000 classes is 16 GB as one float64 table)
        jt, ht = Stage4.of(run, "joint", "test", inf), Stage4.of(run, head, "test", inf)
        rows.append({"model": exp, "head": head + (" (no TTA)" if member.plain else ""), "CV joint": joint["cv_mean"],
                     "CV head": best["cv_mean"], "CV head+TTA": tta["cv_mean"], "CV ensemble": np.nan,
                     "private joint": private_score(data, metric, jt.ids(), lambda: jt.prob_table(plain=True),
                                                    inf["classes"]),
                     "private head+TTA": private_score(data, metric, jt.ids(), lambda: ht.prob_table(member.plain),
                                                       inf["classes"])})
    t = pd.DataFrame(rows)
    ens_row = [r for r in ens["table"] if r["member"].startswith("ensemble")]
    if ens_row:
        t = pd.concat([t, pd.DataFrame([{"model": ens_row[0]["member"], "head": "", "CV ensemble": ens_row[0]["cv_mean"],
                                          "private head+TTA": ens["private"]}])], ignore_index=True)
    return t


def print_summary(name: str, data: DataCfg, metric: str) -> pd.DataFrame:
    t = summary_table(name, data, metric)
    log.info("\n=== %s: CV (%s, mean over folds) and private score ===\n%s", name, metric,
             t.to_string(index=False, float_format="%.4f", na_rep=""))
    return t
