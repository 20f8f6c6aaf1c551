"""reports/<sweep>/index.md: a sweep's page (written by `./run.sh sweep`, also --status): its trials, the naive
winner and the nested sweep CV, and pictures: the metric against each parameter, the history of the trials (pruned
ones marked), Optuna's parameter importance."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from ...core.files import layout
from ...core.files.artifacts import write_text
from ...core.predict.metrics import GREATER_IS_BETTER
from ...core.report import plots

log = logging.getLogger("pipeline")


def _file(key: str) -> str:
    return "param_" + re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".png"


def write(s: dict, importance: dict[str, float], reports: Path = layout.REPORTS) -> Path:
    """The page of a sweep's summary (tools/sweep.py `summary`) and its importance ({param: share})."""
    out = layout.sweep_report(s["sweep"], reports)
    metric, rows = s["metric"], s["trials"]
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    pruned = [r for r in rows if r["state"] == "pruned" and r["intermediate"]]
    last = {r["trial"]: r["intermediate"][max(r["intermediate"])] for r in pruned}
    pics = []
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    log_keys = {p["key"] for p in s.get("space", []) if p.get("log")}
    for k in keys:
        d = [r for r in done if k in r["params"]]
        p = [r for r in pruned if k in r["params"]]
        if not d and not p:
            continue
        plots.param_scatter(out / _file(k), [r["params"][k] for r in d], [r["value"] for r in d],
                            [r["params"][k] for r in p], [last[r["trial"]] for r in p], k, f"CV {metric}",
                            k in log_keys)
        pics.append((f"CV against {k}", _file(k)))
    pick = max if GREATER_IS_BETTER[metric] else min
    best, so_far = [], None
    for r in sorted(done, key=lambda r: r["trial"]):
        so_far = r["value"] if so_far is None else pick(so_far, r["value"])
        best.append((r["trial"], so_far))
    plots.sweep_history(out / "history.png", [(r["trial"], r["value"]) for r in done],
                        [(r["trial"], last[r["trial"]]) for r in pruned], best, f"CV {metric}")
    pics.insert(0, ("The trials in order (pruned: their last per-epoch value)", "history.png"))
    if importance:
        names = sorted(importance, key=importance.get, reverse=True)
        plots.bars(out / "importance.png", names, [importance[n] for n in names], "importance (Optuna, PED-ANOVA)",
                   "parameter importance")
        pics.append(("Parameter importance (Optuna's default evaluator, PED-ANOVA, over the finished trials)", "importance.png"))
    page = layout.experiment_page(s["sweep"], reports)
    write_text(page, "\n".join(_markdown(s, pics)))
    log.info("sweep page of '%s': %s (%d pictures)", s["sweep"], page, len(pics))
    return page


def _markdown(s: dict, pics: list) -> list[str]:
    sel, metric = s["selection"], s["metric"]
    table = pd.DataFrame([{"trial": r["trial"], "experiment": r["experiment"], "state": r["state"],
                           f"CV {metric}": r["value"], **r["params"]} for r in s["trials"]])
    md = [f"# Sweep {s['sweep']}", "",
          f"{len(s['trials'])} trials through stage {s['through']}, {s['n_splits']} folds, metric {metric}: "
          + ", ".join(f"{n} {k}" for k, n in s["counts"].items() if n) + ".", ""]
    if sel.get("nested") is not None:
        per = " ".join(f"{v:.4f}" for v in sel["nested_per_fold"])
        md += [f"**Nested sweep CV: {sel['nested']:.4f}** (per fold {per}; fold k scored by the trial best on the "
               f"other folds: {', '.join(sel['chosen_per_fold'])}). This is the figure to report.", "",
               f"Naive winner {sel['winner']}: CV {sel['naive']:.4f}, selected on the rows it is scored on "
               f"(optimistic by {abs(sel['naive'] - sel['nested']):.4f} here; not ranked as such).", ""]
    md += ["## Trials", "", "```", table.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")
           if not table.empty else "no trials yet", "```", ""]
    for title, f in pics:
        md += [f"## {title}", "", f"![{title}]({f})", ""]
    return md

