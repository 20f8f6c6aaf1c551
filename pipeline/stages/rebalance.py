"""Stage 3: decoupled classifier retraining on the frozen stage-2 backbone, per fold.

Usage:   ./run.sh rebalance [--fold K] [--force] [key=value ...]
Input:   runs/<exp>/fold<k>/model.safetensors + summary.json (stage 2), folds file, train images
Output:  runs/<exp>/fold<k>/rebalance/features.npz      pooled features of the fold's train and
                                        features.json     held-out rows (+ what made them)
                                        heads/<variant>.safetensors   W, b[, center] + record
                                        oof_<variant>.npz  held-out ids, y, inner split, per-row scores
                                                           (rs_*; no logits: stored.HeldOut computes them)
                                        summary.json       written last: per-variant metrics, choices
         runs/<exp>/rebalance/report.csv, report.md,
                              summary.json (the CV of every variant and the best one)
Features are extracted once per fold (one backbone pass over the images) and reused by every
variant and every later re-run with other rebalance settings.

Honest CV: tau, the logit-adjustment scale, the NCM temperature and the cRT/LWS epoch are chosen
by cross-fitting inside the held-out fold: it is split in `rebalance.inner_folds` stratified parts
and the rows of each part are scored with the value chosen on the other parts. The saved head
uses the value chosen on the whole held-out fold (that is what stage 4 applies to the test set).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import KFold, StratifiedKFold

from ..core.nets import models
from ..core.report import tracking
from ..core.files.artifacts import (NpzStream, atomic_path, experiment_lock, fault_point, map_npz,
                                    read_json, read_npz, write_csv, write_json, write_npz, write_text)
from ..core.inputs.augment import open_store, train_transform, valid_transform
from ..core.config import PROBE, Config, EvalCfg, ModelCfg, RebalanceCfg, TrainCfg, wise_name
from ..core.files import layout
from ..core.inputs.data import read_folds, to_builtin
from ..core.errors import PipelineError
from ..core.nets.heads import VARIANTS, FitInputs, Head, cross_fit, heads_with_choices, median_choices, probe_head
from ..core.inputs.images import ImageDataset
from ..core.files.layout import FULL_FIT, FoldDir
from ..core.predict.metrics import GREATER_IS_BETTER, RowScores, compute, row_scores
from ..core.predict.stored import HeadRows, HeldOut
from ..core.files.provenance import environment, keep_image_snapshots, train_images
from ..core.files.units import Units, experiment_units, trained
from ..core.engine.runtime import amp_dtype, make_loader, memory_format, pick_device, prepare_model, workers
from ..core.engine.distributed import Dist
from ..core.inputs.pixels import Pixels, pixels

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class Job:
    """What stage 3 reads, resolved from the config once by `run`/`status` (`Job.of`, the stage's one edge):
    every step below takes it or the values it needs, never the config."""
    experiment: str
    run: layout.RunDir
    folds_csv: Path
    rebalance: RebalanceCfg
    eval: EvalCfg
    model: ModelCfg
    train: TrainCfg  # amp, channels_last, workers; full_fit
    batch_size: int  # infer.batch_size: the feature pass's
    device: str
    px: Pixels
    seed: int
    train_imgs: dict  # the train images' record (provenance.train_images)
    tracking: tracking.Tracking
    allow_stale: bool
    units: Units  # the experiment's units: stage 3 asks them for its stage-2 inputs and for its own records
    n_classes: int = 0  # what the stage-2 outputs must have been trained for

    @classmethod
    def of(cls, cfg: Config, n_classes: int = 0) -> "Job":
        imgs = train_images(cfg.folds_csv, cfg.data.hash_images, cfg.session.looks)
        return cls(cfg.experiment, cfg.run_dir, cfg.folds_csv, cfg.rebalance, cfg.eval, cfg.model, cfg.train,
                   cfg.infer.batch_size, cfg.device, pixels(cfg), cfg.seed, imgs, tracking.Tracking.of(cfg),
                   cfg.session.allow_stale, experiment_units(cfg), n_classes)

    def stage2(self, k: int) -> dict:
        """Fold k's (or the full-data model's) finished stage-2 summary, refused when stale or of another model."""
        return trained(self.units, k, self.model.arch, self.n_classes, self.heads_key(k))

    @staticmethod
    def heads_key(k: int) -> str:
        return "heads_full" if k == FULL_FIT else f"heads{k}"

    def features_record(self, k: int) -> dict:
        """What fold k's (or the full-data model's) feature cache is made from: its unit's record."""
        return self.units.record(f"features_{self.run.unit(k).name}")

    def probe_record(self) -> dict | None:
        """What the pretrained backbone's features depend on (None without rebalance.probe or wise_alpha)."""
        return self.units.record("probe_features") if "probe_features" in self.units else None

    def record(self, k: int) -> dict:
        """Fold k's (or the full-data model's) stage-3 record: its unit's."""
        return self.units.record(self.heads_key(k))


# ----------------------------------------------------------------------------- features
CACHED = ("train", "valid", "views")  # a fold's feature arrays, stored in rebalance.features' precision


def fold_features(job: Job, df: pd.DataFrame, classes: list, k: int, stage2: dict) -> dict[str, np.ndarray]:
    """Cached pooled features of fold k's train rows (plus augmented views) and held-out rows (k = FULL_FIT: the
    full-data model, every row a train row, none held out), as memory maps of the cache in its stored precision:
    a fresh run and a cached one fit their heads on the same values, read a block of rows at a time. Extraction
    streams each batch to the cache file (#49): no N x D array is held."""
    fd = job.run.unit(k)
    record = job.features_record(k)
    if job.units.current(f"features_{fd.name}"):
        return map_npz(fd.features)
    t0 = time.perf_counter()
    device = pick_device(job.device, Dist())
    dtype = amp_dtype(job.train.amp, device)
    model = prepare_model(job.train, models.load_trained(job.model, fd.weights, len(classes)), device)
    clf = model.get_classifier()  # the joint classifier travels with the features
    if not isinstance(clf, torch.nn.Linear):
        raise PipelineError(f"model.arch={job.model.arch}: rebalancing needs a linear classifier head")
    w, b = clf.weight.detach().cpu().numpy(), clf.bias.detach().cpu().numpy()
    norm = models.Normalize(stage2["mean"], stage2["std"]).to(device)
    in_fold = df["fold"].values == k
    tr, va = df[~in_fold], df[in_fold]
    store = open_store(job.px, df["path"])  # the store stage 2 read: every fold's rows in one file

    def run(part, transform, keyed_epoch=None):  # batches of float32 features of the train or held-out rows
        rows = np.flatnonzero(~in_fold if part is tr else in_fold)
        ds = ImageDataset(store.subset(rows), part["y"].values, transform, seed=job.seed)
        if keyed_epoch is not None:  # seeded augmented views: item keys (index, view)
            ds = _Keyed(ds, keyed_epoch)
        loader = make_loader(ds, batch_size=job.batch_size, n_workers=workers(job.train), cuda=device.type == "cuda")
        return models.iter_features(model, loader, norm, device, dtype, memory_format(job.train, device))

    store_as = lambda name: np.float32 if name not in CACHED else job.rebalance.features  # noqa: E731
    with atomic_path(fd.features, suffix=".npz") as tmp, NpzStream(tmp) as z:
        train = run(tr, valid_transform(job.px))
        first = next(train)  # the width, from the first batch
        d = first.shape[1]
        z.rows("train", (len(tr), d), store_as("train"), itertools.chain([first], train))
        for name, v in (("train_y", tr["y"].values), ("valid_y", va["y"].values), ("valid_ids", va["id"].values)):
            z.array(name, v)
        held = run(va, valid_transform(job.px)) if len(va) else iter(())
        if k != FULL_FIT:  # they must be stage 2's held-out features (the full-data model holds nothing out)
            held = same_as_stage2(fd, held, w, b, len(va), 1e-3 if dtype is None else 2e-2)  # bf16 rounds a little
        z.rows("valid", (len(va), d), store_as("valid"), held)
        z.rows("views", (job.rebalance.aug_views, len(tr), d), store_as("views"),
               (x for v in range(job.rebalance.aug_views)
                for x in run(tr, train_transform(job.px), keyed_epoch=10_000 + v)))
        z.array("joint_weight", w)
        z.array("joint_bias", b)
    keep_image_snapshots(record)
    write_json(fd.features_meta, {"made_from": record, "seconds": time.perf_counter() - t0,
                                  "n_train": len(tr), "n_valid": len(va), "dim": int(d)})
    log.info("%s: features %s extracted in %.1fs", fd.name, (len(tr), d), time.perf_counter() - t0)
    return map_npz(fd.features)  # what a cached run reads: the heads read it a block of rows at a time


def same_as_stage2(fd: FoldDir, batches, weight: np.ndarray, bias: np.ndarray, n_valid: int, tol: float):
    """The held-out features as they stream past (yielded on), compared row by row within `tol` with the ones stage
    2 scored its held-out rows with (its oof.npz: features and classifier; a file written before #35: logits):
    weights or images changed after stage 2 would make stage 3's heads and stage 2's CV disagree. Refused after the
    last batch (the cache being written is then never kept)."""
    o = map_npz(fd.oof)
    same = "feats" not in o or (o["feats"].shape[0] == n_valid and np.array_equal(o["weight"], weight))
    n = 0
    for x in batches:
        if same and "feats" in o:
            same = o["feats"].shape[1] == x.shape[1] and np.allclose(x, o["feats"][n:n + len(x)], atol=tol, rtol=tol)
        elif same:
            same = np.allclose(x @ weight.T + bias, o["logits"][n:n + len(x)], atol=tol, rtol=tol)
        n += len(x)
        yield x
    if not same:
        raise PipelineError(f"{fd.name}: features of {fd.weights} do not reproduce its held-out features ({fd.oof}); "
                            f"were the weights or images changed after stage 2?")


def probe_features(job: Job, df: pd.DataFrame, classes: list) -> np.ndarray:
    """rebalance.probe: the pretrained, un-fine-tuned backbone's pooled features of every train row (in the folds
    table's order), one pass for every fold, cached in runs/<exp>/rebalance/probe_features.npz."""
    run, rec = job.run, job.probe_record()
    if job.units.current("probe_features"):
        return read_npz(run.probe_features)["feats"]
    t0 = time.perf_counter()
    device = pick_device(job.device, Dist())
    dtype = amp_dtype(job.train.amp, device)
    model = prepare_model(job.train, models.create_model(job.model, len(classes)), device)  # its classifier: unused
    norm = models.Normalize(*models.norm_stats(job.model, model)).to(device)
    loader = _rows_loader(job, df, np.arange(len(df)), device)
    feats = models.extract_features(model, loader, norm, device, dtype, memory_format(job.train, device))
    write_npz(run.probe_features, feats=feats)  # float32 whatever rebalance.features says: see its help
    keep_image_snapshots(rec)
    write_json(run.probe_features_meta, {"made_from": rec, "seconds": time.perf_counter() - t0,
                                         "n": len(feats), "dim": int(feats.shape[1])})
    log.info("probe: the pretrained backbone's features %s in %.1fs", feats.shape, time.perf_counter() - t0)
    return feats


@dataclass(frozen=True)
class FoldProbe:
    """Fold k's linear probe: the pretrained backbone's features of every train row, which rows fold k holds out, and
    the logistic regression fit on its training rows (probe_joint; WiSE-FT's pretrained end)."""
    feats: np.ndarray
    held: np.ndarray
    head: Head


def fold_probe(job: Job, df: pd.DataFrame, classes: list, k: int) -> FoldProbe:
    f = probe_features(job, df, classes)
    held = df["fold"].values == k
    return FoldProbe(f, held, probe_head(f[~held], df["y"].values[~held], len(classes)))


def probe_variants(job: Job, df: pd.DataFrame, classes: list, k: int, fp: FoldProbe):
    """rebalance.probe: the variants fit on the pretrained backbone's features of fold k's training rows (joint: the
    logistic-regression probe), scored on its held-out rows as the others: yields ("probe_<variant>", outputs)."""
    f, held, y = fp.feats, fp.held, df["y"].values
    feats = {"train": f[~held], "train_y": y[~held], "valid": f[held], "valid_y": y[held],
             "views": np.zeros((0, int((~held).sum()), f.shape[1]), np.float32)}
    r = dataclasses.replace(job.rebalance, variants=list(job.rebalance.probe))
    for v, o in fit_variants(r, job.eval, feats, fp.head.weight, fp.head.bias, len(classes), job.seed + k):
        yield PROBE + v, {**o, "source": "probe", "where": {"rows": np.flatnonzero(held)}}


def wise_variants(job: Job, df: pd.DataFrame, classes: list, k: int, stage2: dict, feats: dict, fp: FoldProbe):
    """rebalance.wise_alpha: WiSE-FT of fold k at each alpha: the pretrained backbone with the fold's probe head and
    its fine-tuned model with its joint classifier, interpolated (models.wise_model; the head: (1 - alpha) x probe +
    alpha x joint), scored on its held-out rows as the others (no choice made on them: alpha is the variant):
    yields ("wise<alpha>", outputs)."""
    if not job.rebalance.wise_alpha:
        return
    device = pick_device(job.device, Dist())
    dtype, fmt = amp_dtype(job.train.amp, device), memory_format(job.train, device)
    rows, y_va = np.flatnonzero(fp.held), feats["valid_y"]
    loader = _rows_loader(job, df, rows, device)
    norm = models.Normalize(stage2["mean"], stage2["std"]).to(device)
    counts = np.bincount(feats["train_y"], minlength=len(classes))
    inner = inner_split(y_va, job.rebalance.inner_folds, job.seed + k)
    for a in job.rebalance.wise_alpha:
        t0 = time.perf_counter()
        model = prepare_model(job.train, models.wise_model(job.model, job.run.unit(k).weights, len(classes), a),
                              device)
        x = models.extract_features(model, loader, norm, device, dtype, fmt)
        head = Head(((1 - a) * fp.head.weight + a * feats["joint_weight"]).astype(np.float32),
                    ((1 - a) * fp.head.bias + a * feats["joint_bias"]).astype(np.float32))
        scored = row_scores(y_va, logits=HeadRows(head, x), dtype=np.float64)
        metrics = compute(y_va, None, counts, job.eval.many_shot, job.eval.few_shot, job.eval.scorer, rows=scored)
        log.info("fold %d: WiSE-FT alpha %g scored on %d held-out rows in %.1fs", k, a, len(rows),
                 time.perf_counter() - t0)
        yield wise_name(a), {"head": head, "rows": scored, "record": {"alpha": a},
                             "inner": inner, "metrics": metrics, "source": "own", "where": {"feats": x}}


def _rows_loader(job: Job, df: pd.DataFrame, rows: np.ndarray, device):
    """The un-augmented images of these rows of the folds table (validation transform), in order."""
    ds = ImageDataset(open_store(job.px, df["path"]).subset(rows), df["y"].values[rows], valid_transform(job.px))
    return make_loader(ds, batch_size=job.batch_size, n_workers=workers(job.train), cuda=device.type == "cuda")


class _Keyed(torch.utils.data.Dataset):
    def __init__(self, ds, epoch):
        self.ds, self.epoch = ds, epoch

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[(i, self.epoch)]


# ----------------------------------------------------------------------------- variants
def choose(heads: dict, param: str, x_va: np.ndarray, y_va: np.ndarray, inner: np.ndarray, metric: str,
           fixed=None, cands: dict | None = None) -> dict:
    """One tuned variant: {param value: head} -> the head chosen on the whole held-out fold, the honest
    (cross-fitted) held-out per-row scores (float64 softmax), and the record of the choice. `fixed`: no tuning;
    `cands`: the held-out logits of every head (or functions computing them) when the variant provides them; else
    each head's logits are computed a block of rows at a time (no rows x classes table)."""
    cands = cands if cands is not None else {p: HeadRows(h, x_va) for p, h in heads.items()}
    if fixed is not None:
        lg = cands[fixed]
        return {"head": heads[fixed], "rows": row_scores(y_va, logits=lg() if callable(lg) else lg, dtype=np.float64),
                "record": {param: fixed, "tuned": False}}
    rows, final, per_split, curve = cross_fit(cands, y_va, inner, metric)
    return {"head": heads[final], "rows": rows, "inner_heads": [heads[c] for c in per_split],
            "record": {param: final, "chosen_per_inner_fold": per_split, "curve": curve, "tuned": True}}


def fit_variants(r: RebalanceCfg, ev: EvalCfg, feats: dict, w: np.ndarray, b: np.ndarray, n_classes: int, seed: int):
    """Every configured variant (core/heads.VARIANTS), one at a time (its held-out logits are dropped before the
    next is fit): yields (variant, {head, honest held-out logits, metrics, record of the choice, inner splits})."""
    metric = ev.scorer
    y_tr, y_va, x_va = feats["train_y"], feats["valid_y"], feats["valid"]
    counts = np.bincount(y_tr, minlength=n_classes)
    f = FitInputs(w=w, b=b, train=feats["train"], train_y=y_tr, views=list(feats["views"]), n_classes=n_classes,
                  seed=seed, valid=x_va)
    inner = inner_split(y_va, r.inner_folds, seed)
    for v in r.variants:
        spec = VARIANTS[v]
        heads, cands = spec.fit(r, f)
        if spec.tuned is None:
            h = heads[None]
            o = {"head": h, "rows": row_scores(y_va, logits=HeadRows(h, x_va), dtype=np.float64), "record": {}}
        else:
            o = choose(heads, spec.tuned, x_va, y_va, inner, "log_loss" if spec.rule == "log_loss" else metric,
                       fixed=spec.fixed(r) if spec.fixed else None, cands=cands)
            if spec.record:
                spec.record(o["record"])
        o["metrics"] = compute(y_va, None, counts, ev.many_shot, ev.few_shot, metric, rows=o["rows"])
        o["inner"] = inner  # each held-out row's inner split
        yield v, o
        del heads, cands, o  # a grid's candidate heads (classes x dimensions each) go before the next variant's


def check_inner_folds(n: int, df: pd.DataFrame, folds: list[int]) -> None:
    """Tuned choices are cross-fitted over `n` (rebalance.inner_folds) splits of each held-out fold: that needs at
    least as many held-out images as splits."""
    for k in folds:
        held = int((df["fold"].values == k).sum())
        if n > held:
            raise PipelineError(f"config key 'rebalance.inner_folds' ({n}): fold {k} holds out {held} image(s), too "
                                f"few for {n} inner splits; set rebalance.inner_folds to {max(2, held)} or less (or "
                                f"use fewer folds)")


def inner_split(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Each held-out row's inner split: stratified by class, or (no class has n held-out images: thousands of
    classes of 1-2 images, as FGVC sets have) shuffled without strata."""
    inner = np.zeros(len(y), dtype=np.int64)
    strata = len(y) and np.bincount(y).max() >= n
    splitter = (StratifiedKFold(n, shuffle=True, random_state=seed) if strata
                else KFold(n, shuffle=True, random_state=seed))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        for j, (_, idx) in enumerate(splitter.split(np.zeros(len(y)), y)):
            inner[idx] = j
    return inner


# ----------------------------------------------------------------------------- per fold
def rebalance_fold(job: Job, df: pd.DataFrame, classes: list, k: int, force: bool) -> dict:
    stage2 = job.stage2(k)
    fd = job.run.fold(k)
    feats = fold_features(job, df, classes, k, stage2)
    made_from = job.record(k)
    if not force and job.units.current(job.heads_key(k)):
        log.info("fold %d: rebalanced heads up to date, skipped", k)
        return read_json(fd.rebalance_summary)
    fault_point(f"rebalance:after-features:{k}")
    t0 = time.perf_counter()
    variants = {}
    fitted = fit_variants(job.rebalance, job.eval, feats, feats["joint_weight"], feats["joint_bias"], len(classes),
                          job.seed + k)
    extra = ()
    if job.rebalance.probe or job.rebalance.wise_alpha:
        fp = fold_probe(job, df, classes, k)
        extra = itertools.chain(probe_variants(job, df, classes, k, fp) if job.rebalance.probe else (),
                                wise_variants(job, df, classes, k, stage2, feats, fp))
    for v, o in itertools.chain(fitted, extra):
        record = {"variant": v, "fold": k, "classes": classes, **o["record"]}
        record.pop("curve", None)
        o["head"].save(fd.head(v), record)
        for j, h in enumerate(o.get("inner_heads", [])):  # stage 4 scores inner split j's rows with head j
            h.save(fd.inner_head(v, j), {**record, "inner_split": j, "chosen_without_it": to_builtin(
                o["record"]["chosen_per_inner_fold"][j])})
        where = {"source": np.array(o.get("source", "features")), **o.get("where", {})}
        write_npz(fd.head_oof(v), ids=feats["valid_ids"], y=feats["valid_y"], inner=o["inner"], **where,
                  **o["rows"].arrays())  # the per-row scores (float64 softmax): what the reports read
        variants[v] = {"metrics": o["metrics"], **o["record"]}
    summary = {"fold": k, "variants": variants, "seconds": time.perf_counter() - t0, "made_from": made_from,
               "env": environment()}
    write_json(fd.rebalance_summary, summary)
    line = "  ".join(f"{v} {o['metrics']['score']:.4f}" for v, o in variants.items())
    log.info("fold %d rebalanced in %.1fs: %s %s", k, summary["seconds"], job.eval.scorer, line)
    return summary


# ----------------------------------------------------------------------------- the full-data model
def rebalance_full(job: Job, df: pd.DataFrame, classes: list, summaries: list[dict], force: bool) -> dict:
    """Stage 3 of the full-data model (train.full_fit): each variant's head on every row's features, with
    the value the folds chose (no CV of its own; stage 4 uses the heads on test images only). The value each
    tuned variant uses is the folds' (low) median choice: the full model holds no rows out to tune on; the folds'
    choices were each made on held-out rows."""
    fd = job.run.full
    stage2 = job.stage2(FULL_FIT)
    chosen = median_choices(job.rebalance.variants, summaries)
    made_from = job.record(FULL_FIT)  # the folds' choices (`chosen`) among what it is made from
    if not force and job.units.current(job.heads_key(FULL_FIT)):
        log.info("full fit: rebalanced heads up to date, skipped")
        return read_json(fd.rebalance_summary)
    feats = fold_features(job, df, classes, FULL_FIT, stage2)
    t0 = time.perf_counter()
    for v, h in heads_with_choices(job.rebalance, feats, len(classes), chosen, job.seed + 1000).items():
        h.save(fd.head(v), {"variant": v, "fold": "full", "classes": classes, "from_folds": chosen.get(v)})
    summary = {"fold": "full", "variants": {v: {"from_folds": chosen.get(v)} for v in job.rebalance.variants},
               "seconds": time.perf_counter() - t0, "made_from": made_from, "env": environment()}
    write_json(fd.rebalance_summary, summary)
    log.info("full fit: heads %s fit on all %d rows with the folds' choices %s", list(job.rebalance.variants),
             len(df), chosen)
    return summary


# ----------------------------------------------------------------------------- report
def report(job: Job, df: pd.DataFrame, classes: list, summaries: list[dict]) -> dict:
    """The CV of every variant over the folds (report.csv, report.md, summary.json). Its pictures
    (recall vs frequency, the tau sweep) are drawn by `./run.sh report` into reports/<exp>/."""
    variants = list(summaries[0]["variants"])
    metric, ev, k_folds = job.eval.scorer, job.eval, len(summaries)
    rows = []
    counts = np.bincount(df["y"].values, minlength=len(classes))
    for v in variants:
        per = pd.DataFrame([s["variants"][v]["metrics"] for s in summaries])
        ys, parts = [], []
        for s in summaries:  # each fold's per-row scores, stored beside its held-out rows
            held = HeldOut.of(job.run, s["fold"], v).scores()
            ys.append(held["y"])
            parts.append(held["rows"])
        pooled = compute(np.concatenate(ys), None, counts * (k_folds - 1) / k_folds,
                         ev.many_shot, ev.few_shot, metric, rows=RowScores.concat(parts))
        row = {"variant": v, f"{metric}_mean": per["score"].mean(), f"{metric}_std": per["score"].std(ddof=0),
               f"{metric}_pooled": pooled["score"]}
        for m in ("accuracy", "macro_f1", "balanced_accuracy", "many_acc", "medium_acc", "few_acc"):
            row[m] = per[m].mean()
        rows.append(row)
    table = pd.DataFrame(rows)
    asc = not GREATER_IS_BETTER[metric]
    table = table.sort_values(f"{metric}_mean", ascending=asc, kind="stable").reset_index(drop=True)
    best = table["variant"].iloc[0]
    run = job.run
    write_csv(run.rebalance_csv, table)
    md = [f"# Rebalancing report: {job.experiment}", "",
          f"CV over {len(summaries)} folds (mean and std of per-fold {metric}; pooled = on all OOF rows). "
          f"Tuned values are cross-fitted inside each held-out fold: every reported score is out-of-sample.", "",
          "```", table.to_string(index=False, float_format="%.4f"), "```", "",
          f"Best variant on all folds: **{best}** (selected on the rows it is scored on: the test images' choice "
          f"for infer.heads=[best]; its nested CV, each fold's winner chosen on the other folds, is stage 4's "
          f"`best` head)", "",
          "Pictures (per-class recall against frequency, the tau sweep): `./run.sh report` -> reports/<exp>/.", ""]
    write_text(run.rebalance_md, "\n".join(md))
    summary = {"best": best, "metric": metric, "table": table.to_dict(orient="records"),
               "made_from": job.units.record("report"),
               "folds": [s["fold"] for s in summaries],
               "chosen_tau": [s["variants"].get("tau", {}).get("tau") for s in summaries]}
    write_json(run.rebalance_summary, summary)
    tracking.report(job.tracking, "rebalance", table, {"best": best, f"{best}_cv": float(table[f"{metric}_mean"].iloc[0])})
    log.info("experiment %s, stage 3 CV by head variant (%s):\n%s\nbest on all folds (selected on these rows; "
             "nested: stage 4's best head): %s", job.experiment, metric,
             table.to_string(index=False, float_format="%.4f"), best)
    return summary


def status(cfg: Config) -> list[str]:
    """Why stage 3 would do work now (empty: every fold, the report and the full-data model's heads are up to
    date)."""
    return experiment_units(cfg).status("3")


def run(cfg: Config, fold: int | None = None, force: bool = False) -> dict | None:
    """Rebalance the folds (all, or `fold`); once every fold is current, the report: its summary,
    or None while it waits for other folds."""
    df, classes = read_folds(cfg.folds_name)
    n_splits = int(df["fold"].max()) + 1
    if fold is not None and not 0 <= fold < n_splits:
        raise PipelineError(f"--fold {fold}: {cfg.folds_csv} has folds 0..{n_splits - 1}")
    folds = [fold] if fold is not None else list(range(n_splits))
    check_inner_folds(cfg.rebalance.inner_folds, df, folds)
    job = Job.of(cfg, n_classes=len(classes))
    for k in folds:
        with experiment_lock(cfg.run_dir.fold(k).dir):
            rebalance_fold(job, df, classes, k, force)
    done = [k for k in range(n_splits) if cfg.run_dir.fold(k).rebalance_summary.exists()]
    if len(done) < n_splits:
        log.info("report waits for every fold: rebalanced %s of %d", done, n_splits)
        return None
    summaries = [read_json(cfg.run_dir.fold(k).rebalance_summary) for k in range(n_splits)]
    stale = [s["fold"] for s in summaries if s["made_from"] != job.record(s["fold"])]
    if stale:
        log.info("report waits: fold(s) %s were rebalanced with other settings or weights", stale)
        return None
    if cfg.train.full_fit:
        with experiment_lock(cfg.run_dir.full.dir):
            rebalance_full(job, df, classes, summaries, force)
    if not force and job.units.current("report"):
        log.info("stage-3 report of '%s' is up to date", cfg.experiment)
        return read_json(cfg.run_dir.rebalance_summary)
    return report(job, df, classes, summaries)
