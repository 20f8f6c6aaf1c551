"""Honest CV (#25): every leaderboard row's CV before and after nesting the choices behind it, next to its
private / hold-out score, and whether the CV ranking agrees better with the hold-out ranking (not a test).

    python benchmarks/honest_cv.py BEFORE_DIR AFTER_DIR

BEFORE_DIR: a project whose stages 3-5 were made by the code before nesting (stage 2 outputs are shared:
nesting changes no weights). AFTER_DIR: a copy of it after `./run.sh all` with the current code (stages 3-5
re-run; `outputs: 2` in the stage-3 record makes them stale). Both must hold the private test labels
(data.test_labels) so each row has a private score. Prints one table per project and Spearman's rank
correlation of CV against private score, before and after; figures in docs/benchmarks/honest_cv.md.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

from pipeline.tools.reports import leaderboard


def rows(project: Path) -> pd.DataFrame:
    old = os.getcwd()
    os.chdir(project)
    try:
        t = leaderboard.build(Path("runs"), Path("submissions"))
    finally:
        os.chdir(old)
    keep = t[t["cv_mean"].notna()]
    return keep[["experiment", "head", "tta", "cv_mean", "cv_pooled", "private"]].reset_index(drop=True)


def main(before: str, after: str) -> int:
    b, a = rows(Path(before)), rows(Path(after))
    key = ["experiment", "head", "tta"]
    t = b.merge(a, on=key, suffixes=("_before", "_after"), how="outer")
    t["cv_change"] = t["cv_mean_after"] - t["cv_mean_before"]
    pd.set_option("display.width", 200)
    print(t[key + ["cv_mean_before", "cv_mean_after", "cv_change", "private_before", "private_after"]]
          .to_string(index=False, float_format="%.4f"))
    common = t.dropna(subset=["cv_mean_before", "cv_mean_after", "private_before", "private_after"])
    for name, df, cv, priv in (("before, all its rows", t, "cv_mean_before", "private_before"),
                               ("after, all its rows", t, "cv_mean_after", "private_after"),
                               ("before, rows in both", common, "cv_mean_before", "private_before"),
                               ("after, rows in both", common, "cv_mean_after", "private_after")):
        ok = df[[cv, priv]].dropna()
        rho = spearmanr(ok[cv], ok[priv]).statistic if len(ok) > 2 else float("nan")
        gap = float((ok[cv] - ok[priv]).mean())
        print(f"{name}: {len(ok)} rows, Spearman(CV, private) {rho:.3f}, mean CV - private {gap:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
