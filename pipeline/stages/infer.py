"""Stage 4: multi-scale test-time augmentation with every fold's model, on OOF rows and test images.

Usage:   ./run.sh infer [--force] [key=value ...]
         Kaggle kernel (no internet, no training data): ./run.sh infer --config runs/<exp>/config.yaml
             data.root=/kaggle/input/<competition> infer.oof=off
Input:   runs/<exp>/classes.json, fold<k>/model.safetensors + summary.json (stage 2),
         fold<k>/rebalance/heads/<variant>.safetensors and runs/<exp>/rebalance/summary.json (stage 3),
         test images (sample_submission order); for OOF TTA also the folds file and train images
Output:  runs/<exp>/infer/<head>/test.npz  ids, classes, probs (fold mean of the merged policy),
                                           view_logits (V x N x C, fold-mean logits per view), views
                                 oof.npz   ids, y, classes, probs, view_logits, views (held-out rows)
         runs/<exp>/infer/report.csv       CV without TTA, with each view alone, with the policy
         runs/<exp>/infer/summary.json     written last: heads, primary head, policy, CV, provenance
Every fold's model predicts the test images (its probabilities are averaged over folds) and its
own held-out rows, so the CV with TTA is measured on OOF exactly like the CV without it.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..core import models, tracking
from ..core.artifacts import experiment_lock, fault_point, read_json, sha256_file, write_csv, write_json, write_npz
from ..core.config import Config
from ..core.data import read_test_table
from ..core.distributed import Dist
from ..core.errors import PipelineError
from ..core.heads import Head
from ..core.augment import open_store
from ..core.inference import by_scale, joint_head, policy_probs, predict_views
from ..core.metrics import GREATER_IS_BETTER, cv
from ..core.provenance import (environment, infer_record, keep_image_snapshots, oof_rows, rebalance_summary,
                               resolve_heads, stage2_summary, stale_reasons, up_to_date)
from ..core.progress import Progress
from ..core.runtime import amp_dtype, pick_device, prepare_model
from ..core.tta import BASELINE, view_name

log = logging.getLogger("pipeline")

@dataclass
class Inputs:
    """Everything stage 4 reads, checked, and the record its outputs will be made from."""
    classes: list
    oof_df: pd.DataFrame | None  # the folds table when held-out rows are predicted too
    summaries: list[dict]  # stage 2, per fold
    heads: list[str]
    test: pd.DataFrame
    made_from: dict


def load_inputs(cfg: Config) -> Inputs:
    if not cfg.run.classes.exists():
        raise PipelineError(f"{cfg.run.classes} not found: experiment '{cfg.experiment}' has not been trained "
                            f"(run ./run.sh train first)")
    classes = read_json(cfg.run.classes)
    has_folds = cfg.folds_csv.exists()
    oof_df = oof_rows(cfg, classes)
    summaries = [stage2_summary(cfg, k, len(classes), check_stale=has_folds) for k in range(cfg.folds.n_splits)]
    heads = resolve_heads(cfg)
    if has_folds and any(h != "joint" for h in heads):
        for k in range(len(summaries)):
            rebalance_summary(cfg, k, classes)
    test = read_test_table(cfg)
    made_from = infer_record(cfg, heads, test, oof_df is not None)
    return Inputs(classes, oof_df, summaries, heads, test, made_from)


def tta_pairs(cfg: Config) -> list[tuple[float, str]]:
    """Every (scale, view) to predict: the configured ones, and always the no-TTA baseline."""
    pairs = list(itertools.product(cfg.infer.scales, cfg.infer.views))
    return pairs if (1.0, "orig") in pairs else [(1.0, "orig")] + pairs


def status(cfg: Config) -> list[str]:
    """Why stage 4 would do work now (empty: up to date)."""
    return stale_reasons(cfg.run.infer_summary, load_inputs(cfg).made_from)


# ----------------------------------------------------------------------------- predicting
def predict_all(cfg: Config, inp: Inputs, pairs: list[tuple[float, str]]) -> tuple[dict, dict, int]:
    """Every fold's model on the test images (fold mean) and on its own held-out rows, per view:
    {head: V x N x C} for test and OOF, and the number of view-images predicted."""
    device = pick_device(cfg, Dist())
    dtype = amp_dtype(cfg, device)
    C, K = len(inp.classes), len(inp.summaries)
    n_oof = len(inp.oof_df) if inp.oof_df is not None else 0
    test_logits = {h: np.zeros((len(pairs), len(inp.test), C), np.float64) for h in inp.heads}
    oof_logits = {h: np.zeros((len(pairs), n_oof, C), np.float32) for h in inp.heads}
    n_images = 0
    test_store = open_store(cfg, inp.test["path"])
    train_store = open_store(cfg, inp.oof_df["path"]) if inp.oof_df is not None else None
    bar = Progress(K * len(pairs) * (len(inp.test) + n_oof), f"stage 4 of {cfg.experiment}", "view-img")
    for k, s2 in enumerate(inp.summaries):
        model = models.load_trained(cfg, cfg.run.fold(k).weights, C).to(device)
        prepare_model(cfg, model, device)
        norm = models.Normalize(s2["mean"], s2["std"]).to(device)
        heads = {h: _load_head(cfg, k, h, model) for h in inp.heads}
        rows = np.flatnonzero(inp.oof_df["fold"].values == k) if inp.oof_df is not None else None
        for scale, at, views in by_scale(pairs):
            tick = lambda n, v=len(views): bar.update(n * v)  # noqa: E731
            for h, lg in predict_views(cfg, model, norm, heads, test_store, scale, views, device, dtype,
                                       on_batch=tick).items():
                test_logits[h][at] += lg / K
            n_images += len(inp.test) * len(views)
            if rows is not None:
                for h, lg in predict_views(cfg, model, norm, heads, train_store.subset(rows), scale, views, device,
                                           dtype, on_batch=tick).items():
                    oof_logits[h][np.ix_(at, rows)] = lg
                n_images += len(rows) * len(views)
        log.info("fold %d: TTA inference done (%d view(s) x %d scale(s))", k, len(cfg.infer.views),
                 len(cfg.infer.scales))
        fault_point(f"infer:after-fold:{k}")
    bar.close()
    return test_logits, oof_logits, n_images


# ----------------------------------------------------------------------------- entry
def run(cfg: Config, force: bool = False) -> dict:
    inp = load_inputs(cfg)
    if not force and up_to_date(cfg.run.infer_summary, inp.made_from):
        log.info("infer of '%s' is up to date, skipped (--force redoes it)", cfg.experiment)
        return read_json(cfg.run.infer_summary)
    pairs = tta_pairs(cfg)
    names = [view_name(v, s) for s, v in pairs]
    with experiment_lock(cfg.run.infer):
        t0 = time.perf_counter()
        test_logits, oof_logits, n_images = predict_all(cfg, inp, pairs)
        seconds = time.perf_counter() - t0
        policy = [n for n, (s, v) in zip(names, pairs) if s in cfg.infer.scales and v in cfg.infer.views]
        report, searched = pd.DataFrame(), False
        if inp.oof_df is not None:
            if cfg.infer.search:
                policy, searched = greedy_policy(cfg, inp.oof_df, inp.summaries, oof_logits[inp.heads[0]], names), True
            report = tta_report(cfg, inp, oof_logits, names, policy)
        write_predictions(cfg, inp, test_logits, oof_logits, names, policy)
        if not report.empty:
            write_csv(cfg.run.infer_report, report)
        summary = {"experiment": cfg.experiment, "heads": inp.heads, "primary": inp.heads[0], "policy": policy,
                   "searched": searched, "merge": cfg.infer.merge, "classes": inp.classes,
                   "folds_file": sha256_file(cfg.folds_csv) if cfg.folds_csv.exists() else None,
                   "metric": cfg.eval.metric, "cv": report.to_dict(orient="records"),
                   "images_per_s": n_images / seconds, "seconds": seconds, "made_from": inp.made_from,
                   "env": environment()}
        keep_image_snapshots(inp.made_from)
        write_json(cfg.run.infer_summary, summary)
    if not report.empty:
        pol = report[(report["head"] == inp.heads[0]) & (report["views"] == "policy")]
        tracking.report(cfg, "infer", report, {"policy": " ".join(policy), "cv_policy": float(pol["cv_mean"].iloc[0])})
        log.info("experiment %s, stage 4 CV (%s) by TTA views:\n%s", cfg.experiment, cfg.eval.metric,
                 report.to_string(index=False, float_format="%.4f"))
    log.info("TTA policy %s, %.0f view-images/s", policy, summary["images_per_s"])
    return summary


def tta_report(cfg: Config, inp: Inputs, oof_logits: dict, names: list[str], policy: list[str]) -> pd.DataFrame:
    """CV of each head without TTA, with each view alone and with the policy (all on OOF)."""
    rows = []
    selections = [("no TTA", [BASELINE])] + [(f"{n} alone", [n]) for n in names] + [("policy", policy)]
    for h in inp.heads:
        for label, sel in selections:
            probs = policy_probs(oof_logits[h], names, sel, cfg.infer.merge)
            rows.append({"head": h, "views": label, **cv_of(cfg, inp.oof_df, inp.summaries, probs)})
    return pd.DataFrame(rows)


def write_predictions(cfg: Config, inp: Inputs, test_logits: dict, oof_logits: dict, names: list[str],
                      policy: list[str]) -> None:
    classes = np.array([str(c) for c in inp.classes])
    for h in inp.heads:
        write_npz(cfg.run.infer_test(h), ids=inp.test["id"].values, classes=classes,
                  probs=policy_probs(test_logits[h], names, policy, cfg.infer.merge).astype(np.float32),
                  view_logits=test_logits[h].astype(np.float16), views=np.array(names))
        if inp.oof_df is not None:
            write_npz(cfg.run.infer_oof(h), ids=inp.oof_df["id"].values, y=inp.oof_df["y"].values,
                      fold=inp.oof_df["fold"].values, classes=classes,
                      probs=policy_probs(oof_logits[h], names, policy, cfg.infer.merge).astype(np.float32),
                      view_logits=oof_logits[h].astype(np.float16), views=np.array(names))


def _load_head(cfg: Config, k: int, variant: str, model) -> Head:
    return joint_head(model) if variant == "joint" else Head.load(cfg.run.fold(k).head(variant))[0]


def cv_of(cfg: Config, df: pd.DataFrame, summaries: list[dict], probs: np.ndarray) -> dict:
    """CV of OOF probabilities (one report.csv row: per-fold values left out)."""
    e = cfg.eval
    m = cv(df["y"].values, probs, df["fold"].values, [s["train_counts"] for s in summaries], e.many_shot,
           e.few_shot, e.metric)
    m.pop("per_fold")
    return m


def greedy_policy(cfg: Config, df, summaries, logits: np.ndarray, names: list[str]) -> list[str]:
    """Forward selection of views on OOF: start from the baseline view, add the view that helps most, stop
    when none helps. Chosen on the same OOF rows it is scored on (a mild optimism: say so)."""
    gib = GREATER_IS_BETTER[cfg.eval.metric]
    chosen = [BASELINE]
    value = lambda sel: cv_of(cfg, df, summaries, policy_probs(logits, names, sel, cfg.infer.merge))["cv_mean"]  # noqa: E731
    best = value(chosen)
    while True:
        trials = {n: value(chosen + [n]) for n in names if n not in chosen}
        if not trials:
            break
        n, v = (max if gib else min)(trials.items(), key=lambda kv: kv[1])
        if not ((v > best) if gib else (v < best)):
            break
        chosen.append(n)
        best = v
    log.info("TTA search on OOF chose %s (%s %.4f)", chosen, cfg.eval.metric, best)
    return chosen
