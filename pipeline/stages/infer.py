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

import albumentations as A
import numpy as np
import pandas as pd
import torch

from ..core import models
from ..core.artifacts import experiment_lock, fault_point, read_json, sha256_file, write_csv, write_json, write_npz
from ..core.config import Config
from ..core.distributed import Dist
from ..core.heads import Head
from ..core.images import ImageDataset, ImageStore
from ..core.metrics import GREATER_IS_BETTER, cv
from ..core.provenance import environment, infer_inputs, stale_reasons
from ..core.runtime import amp_dtype, make_loader, pick_device, workers
from ..core.tta import VIEWS, merge, sizes

log = logging.getLogger("pipeline")


def policy_logits(forward, x: torch.Tensor, policy: list[str], crop: int) -> list[torch.Tensor]:
    """Logits of each named view of a batch (several crops of one view are averaged)."""
    out = []
    for v in policy:
        parts = [forward(c) for c in VIEWS[v](x, crop)]
        out.append(torch.stack(parts).mean(0) if len(parts) > 1 else parts[0])
    return out


def status(cfg: Config) -> list[str]:
    """Why stage 4 would do work now (empty: up to date)."""
    path = cfg.run_dir / "infer" / "summary.json"
    return stale_reasons(path, infer_inputs(cfg)["made_from"])


def run(cfg: Config, force: bool = False) -> dict:
    inp = infer_inputs(cfg)
    classes, has_folds, oof_df, summaries, heads, test, made_from = (
        inp[k] for k in ("classes", "has_folds", "oof_df", "summaries", "heads", "test", "made_from"))
    a = cfg.aug
    pairs = list(itertools.product(cfg.infer.scales, cfg.infer.views))
    if (1.0, "orig") not in pairs:
        pairs = [(1.0, "orig")] + pairs  # always measured: the no-TTA baseline
    names = [f"{v}@{s:g}" for s, v in pairs]
    out_dir = cfg.run_dir / "infer"
    summary_path = out_dir / "summary.json"
    if summary_path.exists() and not force and read_json(summary_path).get("made_from") == made_from:
        log.info("infer of '%s' is up to date, skipped (--force redoes it)", cfg.experiment)
        return read_json(summary_path)

    with experiment_lock(out_dir):
        t0 = time.perf_counter()
        device = pick_device(cfg, Dist())
        dtype = amp_dtype(cfg, device)
        n_workers = workers(cfg)
        C = len(classes)
        test_logits = {h: np.zeros((len(pairs), len(test), C), np.float64) for h in heads}
        oof_logits = {h: np.zeros((len(pairs), len(oof_df) if oof_df is not None else 0, C), np.float32) for h in heads}
        identity = A.Compose([])
        n_images = 0
        for k, s2 in enumerate(summaries):
            model = models.load_trained(cfg, cfg.fold_dir(k) / "model.safetensors", C).to(device)
            if device.type == "cuda" and cfg.train.channels_last:
                model.to(memory_format=torch.channels_last)
            norm = models.Normalize(s2["mean"], s2["std"]).to(device)
            fold_heads = {h: _load_head(cfg, k, h, model) for h in heads}
            jobs = [("test", test, np.arange(len(test)))]
            if oof_df is not None:
                rows = np.flatnonzero(oof_df["fold"].values == k)
                jobs.append(("oof", oof_df.iloc[rows], rows))
            for what, table, rows in jobs:
                for scale in sorted(set(s for s, _ in pairs)):
                    load, crop = sizes(a.img_size, a.resize_ratio, scale)
                    views = [(i, v) for i, (s, v) in enumerate(pairs) if s == scale]
                    store = ImageStore(table["path"].tolist(), load, a.cache, a.cache_dir)
                    loader = make_loader(ImageDataset(store, None, identity), batch_size=cfg.infer.batch_size,
                                         n_workers=n_workers, cuda=device.type == "cuda")
                    start = 0
                    for x, _ in loader:
                        x = norm(x.to(device, non_blocking=True))
                        feats = _view_features(model, x, [v for _, v in views], crop, dtype)
                        n = len(x)
                        for (i, _), f in zip(views, feats):
                            for h, head in fold_heads.items():
                                lg = head.torch_logits(f).cpu().numpy()
                                if what == "test":
                                    test_logits[h][i, start:start + n] += lg / len(summaries)
                                else:
                                    oof_logits[h][i, rows[start:start + n]] = lg
                        start += n
                        n_images += n * len(views)
            log.info("fold %d: TTA inference done (%d view(s) x %d scale(s))", k, len(cfg.infer.views),
                     len(cfg.infer.scales))
            fault_point(f"infer:after-fold:{k}")
        seconds = time.perf_counter() - t0

        policy = [n for n, (s, v) in zip(names, pairs) if s in cfg.infer.scales and v in cfg.infer.views]
        report_rows, searched = [], None
        if oof_df is not None:
            primary = heads[0]
            if cfg.infer.search:
                searched = greedy_policy(cfg, oof_df, summaries, oof_logits[primary], names)
                policy = searched
            for h in heads:
                for label, sel in [("no TTA", ["orig@1"])] + [(f"{n} alone", [n]) for n in names] + \
                                  [("policy", policy)]:
                    probs = merge(oof_logits[h][[names.index(n) for n in sel]], cfg.infer.merge)
                    report_rows.append({"head": h, "views": label, **cv_of(cfg, oof_df, summaries, probs)})
        report = pd.DataFrame(report_rows)
        idx = [names.index(n) for n in policy]
        for h in heads:
            test_probs = merge(test_logits[h][idx], cfg.infer.merge) if len(summaries) else None
            write_npz(out_dir / h / "test.npz", ids=test["id"].values, classes=np.array([str(c) for c in classes]),
                      probs=test_probs.astype(np.float32), view_logits=test_logits[h].astype(np.float16),
                      views=np.array(names))
            if oof_df is not None:
                write_npz(out_dir / h / "oof.npz", ids=oof_df["id"].values, y=oof_df["y"].values,
                          fold=oof_df["fold"].values, classes=np.array([str(c) for c in classes]),
                          probs=merge(oof_logits[h][idx], cfg.infer.merge).astype(np.float32),
                          view_logits=oof_logits[h].astype(np.float16), views=np.array(names))
        if not report.empty:
            write_csv(out_dir / "report.csv", report)
        summary = {"experiment": cfg.experiment, "heads": heads, "primary": heads[0], "policy": policy,
                   "searched": searched is not None, "merge": cfg.infer.merge, "classes": classes,
                   "folds_file": sha256_file(cfg.folds_csv) if has_folds else None,
                   "metric": cfg.eval.metric, "cv": report.to_dict(orient="records"),
                   "images_per_s": n_images / seconds, "seconds": seconds, "made_from": made_from,
                   "env": environment()}
        write_json(summary_path, summary)
    if not report.empty:
        log.info("experiment %s, stage 4 CV (%s) by TTA views:\n%s", cfg.experiment, cfg.eval.metric,
                 report.to_string(index=False, float_format="%.4f"))
    log.info("TTA policy %s, %.0f view-images/s", policy, summary["images_per_s"])
    return summary


def _load_head(cfg: Config, k: int, variant: str, model) -> Head:
    if variant == "joint":
        clf = model.get_classifier()
        return Head(clf.weight.detach().cpu().numpy(), clf.bias.detach().cpu().numpy())
    return Head.load(cfg.fold_dir(k) / "rebalance" / "heads" / f"{variant}.safetensors")[0]


@torch.no_grad()
def _view_features(model, x, views, crop, dtype):
    def forward(c):
        c = c.contiguous(memory_format=torch.channels_last) if c.is_cuda else c.contiguous()
        with torch.autocast(c.device.type, dtype=dtype, enabled=dtype is not None):
            return models.features(model, c).float()
    return policy_logits(forward, x, views, crop)


def cv_of(cfg: Config, df: pd.DataFrame, summaries: list[dict], probs: np.ndarray) -> dict:
    """CV of OOF probabilities (one report.csv row: per-fold values left out)."""
    e = cfg.eval
    m = cv(df["y"].values, probs, df["fold"].values, [s["train_counts"] for s in summaries], e.many_shot,
           e.few_shot, e.metric)
    m.pop("per_fold")
    return m


def greedy_policy(cfg: Config, df, summaries, logits: np.ndarray, names: list[str]) -> list[str]:
    """Forward selection of views on OOF: start from orig@1, add the view that helps most, stop
    when none helps. Chosen on the same OOF rows it is scored on (a mild optimism: say so)."""
    gib = GREATER_IS_BETTER[cfg.eval.metric]
    chosen = ["orig@1"]
    value = lambda sel: cv_of(cfg, df, summaries, merge(logits[[names.index(n) for n in sel]], cfg.infer.merge))["cv_mean"]  # noqa: E731
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
