"""Stage 2: train every fold with timm (mixup/cutmix, EMA, AMP, imbalance samplers), keep OOF features.

Usage:   ./run.sh train [--fold K] [--force] [--gpus 0,1,...] [key=value ...]
         torchrun --nproc_per_node=N -m pipeline train --fold K      (data parallel, one fold)
Input:   folds/<name>.csv + folds/<name>.json (stage 1), the train images
Output:  runs/<exp>/config.yaml, runs/<exp>/classes.json
         runs/<exp>/fold<k>/model.safetensors   the fold's weights: train.select=last (default): the last
                                                epoch's, EMA when train.ema (fixed before training: no
                                                choice on the held-out rows); best: the epoch and raw/EMA
                                                weights best on the held-out rows (CV marked optimistic)
                            oof.npz             the held-out rows of those weights: ids, y, feats (pooled
                                                features, float32) + weight, bias (the classifier); a
                                                classifier other than one linear layer: logits
                            history.csv         one row per epoch (raw and EMA metrics)
                            last.pt             resume checkpoint (model, optimiser, scheduler, scaler,
                                                EMA, epoch, RNG), rewritten atomically every epoch
                            best_<src>.safetensors, oof_<src>.npz   the kept weights of each source the
                                                fold may output (src: raw, ema), while it trains only
                            summary.json        written last: the fold is complete
         runs/<exp>/full/...    train.full_fit: the same files for the model of every row (no OOF, no score),
                                trained after the folds for their median epoch count
A fold whose summary matches the config is skipped (--force retrains it); a fold trained from
other settings or another folds file is stale and retrained (`status` lists them). A killed run resumes
from last.pt and, on CPU with a fixed seed, ends bit-identical to an uninterrupted one: every
epoch's sampler order, augmentation, mixup and dropout are seeded by (seed, epoch).
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.nets import models
from ..core.engine import training
from ..core.files.artifacts import (atomic_path, experiment_lock, fault_flag, fault_point, faulty, read_json, read_npz,
                                    sha256_file, write_csv, write_json, write_npz, write_text)
from ..core.inputs.augment import EpochTransforms, open_store, train_transform, valid_transform
from ..core.config import AugCfg, Config, DataCfg, EvalCfg, ModelCfg, TrainCfg
from ..core.inputs.data import read_folds, read_test_table
from ..core.engine.distributed import Dist, run_per_device
from ..core.errors import PipelineError
from ..core.inputs.images import ConcatView, EpochBatches, ImageDataset
# FULL_FIT: the full-data model's fold index; `fold != FULL_FIT` is every row
from ..core.files.layout import FULL_FIT, FoldDir, RunDir
from ..core.engine.loop import EpochResult, Step, run_epoch, sync_interval
from ..core.nets.heads import probe_head
from ..core.nets.losses import SoftTargetLoss, arcface_margins, effective_number_weights, ldam_margins
from ..core.predict.metrics import RowScores, better, compute, row_scores
from ..core.predict.stored import stage2_logits
from ..core.nets.models import (Normalize, SubCenterCosine, clean_state_dict, create_model, inference_state, norm_stats,
                                to_input, write_state_dict)
from ..core.report.progress import Progress, progress
from ..core.files.provenance import describe_changes, environment, fold_choices, keep_image_snapshots, recorded
from ..core.files.units import FULL, Units, experiment_units
from ..core.engine.runtime import (amp_dtype, autocast, make_loader, maybe_compile, memory_format, pick_device,
                                   prepare_model, set_backend_flags, workers)
from ..core.inputs.samplers import epoch_indices
from ..core.inputs.taxonomy import Level, read_levels
from ..core.engine.cleaning import label_issues
from ..core.engine import teacher as teachers
from ..core.report.tracking import Tracker, Tracking
from ..core.inputs.pixels import Pixels, pixels

log = logging.getLogger("pipeline")


@torch.no_grad()
def predict(model, loader, norm, device, dtype, fmt=torch.contiguous_format, desc: str = "validation") -> np.ndarray:
    """Pooled features (float32) of every image of `loader`, in order: the backbone under autocast as
    models.logits runs it (the logits are the classifier's of these, in fp32)."""
    model.eval()
    out = []
    for x, _ in progress(loader, len(loader), desc, "batch"):
        with autocast(device, dtype):
            out.append(models.features(model, to_input(x, norm, device, fmt)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def held_out(model, feats: np.ndarray, device) -> dict[str, np.ndarray]:
    """What oof.npz keeps of a model's held-out rows (#35: D numbers per row, not C): the pooled features and the
    classifier (predict/stored.stage2_logits makes the logits of them), or the logits when the classifier is not
    one linear layer."""
    clf = model.get_classifier()
    if isinstance(clf, SubCenterCosine):  # model.head=arcface: what stage 2 writes (its dominant sub-centers)
        clf = clf.linear().to(device)
    if isinstance(clf, torch.nn.Linear):
        w = clf.weight.detach().float().cpu().numpy()
        b = clf.bias.detach().float().cpu().numpy() if clf.bias is not None else np.zeros(len(w), np.float32)
        return {"feats": feats.astype(np.float32), "weight": w, "bias": b}
    return {"logits": clf(torch.from_numpy(feats).to(device)).float().cpu().numpy()}


# ----------------------------------------------------------------------------- one fold
@dataclass
class FoldData:
    """The rows fold k trains and validates on, and their loaders."""
    y_tr: np.ndarray
    y_va: np.ndarray
    valid_ids: np.ndarray
    counts: np.ndarray  # training images per class
    batches: EpochBatches
    train_loader: object
    valid_loader: object
    va_idx: np.ndarray  # this process's share of the held-out rows
    targets: teachers.Targets | None = None  # train.pseudo / train.distill: per-row targets (batches carry row indices)
    probe_loader: object = None  # the labelled training rows, un-augmented (train.head_init=probe, train.epochs=0)
    cleaned: dict | None = None  # train.clean_labels: what was flagged and done
    train_feats: np.ndarray | None = None  # the training rows' pretrained features, when cleaning computed them


@dataclass
class FoldNets:
    """The model and what trains it."""
    model: torch.nn.Module
    net: torch.nn.Module  # the model as trained: DDP / compiled wrappers around it
    ema: object | None
    norm: Normalize
    stats: tuple[list[float], list[float]]  # input mean and std
    optimizer: torch.optim.Optimizer
    scheduler: object
    step: Step
    criterion: SoftTargetLoss
    mixup: object | None
    frozen_bn: list = field(default_factory=list)  # BatchNorm layers of never-trained stages: statistics kept too


@dataclass
class FoldState:
    """What the epochs have done so far (saved in last.pt; a resume continues from it)."""
    start_epoch: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"raw": {"score": None, "epoch": -1}, "ema": {"score": None, "epoch": -1}})
    stopped_epoch: int | None = None  # early stopping (train.patience): the last epoch trained
    frozen: bool = False  # this epoch trains the classifier only (train.freeze_epochs)


@dataclass(frozen=True)
class Job:
    """What stage 2 reads from the config, resolved once by `run`/`status` (`Job.of`, the stage's edge): every step
    below takes it, a section or values, never the config."""
    experiment: str
    run: RunDir
    folds_csv: Path
    n_splits: int
    data: DataCfg  # the test table (train.pseudo)
    model: ModelCfg
    train: TrainCfg
    eval: EvalCfg
    px: Pixels
    seed: int
    device: str
    tracking: Tracking
    units: Units  # the experiment's units: each trained unit's record is asked of its unit
    levels: tuple[Level, ...] = ()  # train.taxonomy: each level's parent of every class

    @classmethod
    def of(cls, cfg: Config, classes: list | None = None) -> "Job":
        """`classes` (the label encoding): read the taxonomy levels of train.taxonomy for them (refused before any
        work when the table lacks a class or gives one two parents)."""
        levels = tuple(read_levels(cfg.data, classes, cfg.train.taxonomy)) if classes is not None else ()
        return cls(cfg.experiment, cfg.run_dir, cfg.folds_csv, cfg.folds.n_splits, cfg.data, cfg.model, cfg.train,
                   cfg.eval, pixels(cfg), cfg.seed, cfg.device, Tracking.of(cfg), experiment_units(cfg), levels)

    @property
    def aug(self) -> AugCfg:
        return self.px.aug

    @property
    def rec(self) -> dict:
        """What each fold's outputs are made from (the record of its unit; every fold's is the same)."""
        return self.units.record("weights0")


@dataclass
class FoldRun:
    """One trained unit: fold k, or the full-data model (k = FULL_FIT: every row trains, none is held out)."""
    job: Job
    k: int
    dist: Dist
    paths: FoldDir
    rec: dict  # what the fold's outputs are made from
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None: fp32
    data: FoldData
    nets: FoldNets
    state: FoldState = field(default_factory=FoldState)
    epochs: int = 0  # epochs to train (the full-data model: the folds' choice, of train.epochs scheduled)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def full(self) -> bool:
        return self.k == FULL_FIT

    @property
    def label(self) -> str:
        return "full fit" if self.full else f"fold {self.k}"


def resume_or_skip(paths: FoldDir, rec: dict, label: str, force: bool, dist: Dist,
                   current: bool) -> tuple[dict | None, dict | None]:
    """(the finished summary when the fold is up to date (`current`: its unit's, the engine's decision), the resume
    state when an interrupted run of the same inputs (`rec`: its unit's record) left one). A stale or forced fold
    stops looking complete before any of it is replaced."""
    fresh = force
    if paths.summary.exists() and not force:
        if current:
            old = read_json(paths.summary)
            score = f"{old['metric']} {old['score']:.4f}" if old.get("score") is not None else "no CV of its own"
            log.info("%s: up to date (%s), skipped; --force retrains", label, score)
            return old, None
        log.info("%s: stale, retraining (changed: %s)", label,
                 ", ".join(describe_changes(recorded(paths.summary), rec)) or "unknown")
        fresh = True
    resume = None
    if paths.checkpoint.exists() and not fresh:
        resume = torch.load(paths.checkpoint, map_location="cpu", weights_only=True)
        if resume.get("made_from") != rec:
            log.info("%s: %s is an interrupted run with other inputs (changed: %s): starting afresh", label,
                     paths.checkpoint, ", ".join(describe_changes(resume.get("made_from", {}), rec)))
            resume, fresh = None, True
    dist.barrier()  # every rank has judged the fold from the same files before any is removed
    if fresh and dist.main:
        paths.summary.unlink(missing_ok=True)
        paths.checkpoint.unlink(missing_ok=True)
    dist.barrier()
    return None, resume


# ----------------------------------------------------------------------------- set-up
def set_up(job: Job, df: pd.DataFrame, n_classes: int, k: int, dist: Dist, paths: FoldDir | None = None,
           rec: dict | None = None) -> FoldRun:
    """Model, EMA, optimiser, schedule, loss, mixup and loaders of fold k (k = FULL_FIT: every row trains)."""
    paths = paths or job.run.unit(k)
    rec = rec or job.rec
    device = pick_device(job.device, dist)
    set_backend_flags(job.train, device)
    if k != FULL_FIT and not (df["fold"] == k).any():
        raise PipelineError(f"fold {k} has no held-out rows in {job.folds_csv}")
    training.seed_epoch(job.seed, -1)  # the initial weights
    model = create_model(job.model, n_classes, training=True)
    frozen_bn = training.freeze(model, job.train.freeze_backbone, job.train.trainable_stages)
    stats = norm_stats(job.model, model)
    prepare_model(job.train, model, device)
    data = _fold_data(job, df, n_classes, k, dist, device, model, stats)
    if data.probe_loader is not None:
        probe_init(model, stats, data, job.train, device, "full fit" if k == FULL_FIT else f"fold {k}")
    state = FoldState()
    nets = _fold_nets(job.train, model, stats, frozen_bn, data, n_classes, dist, device, state, job.levels)
    return FoldRun(job=job, k=k, dist=dist, paths=paths, rec=rec, device=device, dtype=nets.step.dtype,
                   data=data, nets=nets, state=state, epochs=job.train.epochs)


def _fold_data(job: Job, df: pd.DataFrame, n_classes: int, k: int, dist: Dist, device, model=None,
               stats=None) -> FoldData:
    """The fold's rows from the one store of the train images (built by the main process), the teachers'
    targets, the sampler's batches and the loaders."""
    t = job.train
    in_fold = df["fold"].values == k
    y_tr, y_va = df["y"].values[~in_fold], df["y"].values[in_fold]
    if dist.main:  # builds the cache; the other processes open it once it exists
        store = open_store(job.px, df["path"])
    dist.barrier()
    if not dist.main:
        store = open_store(job.px, df["path"])
    train_idx, cleaned, train_feats = np.flatnonzero(~in_fold), None, None
    if t.clean_labels != "off":  # before anything reads the training rows' labels
        train_idx, y_tr, cleaned, train_feats = clean_training_rows(job, model, stats, store, train_idx, y_tr,
                                                                    n_classes, device, df["id"].values, k)
    rows_store, labels, targets = store.subset(train_idx), y_tr, None
    if t.pseudo.teacher or t.distill.teacher:
        test = read_test_table(job.data) if t.pseudo.teacher else None
        probs = teachers.fold_targets(t, job.run.unit(k), sha256_file(job.folds_csv), df, k, test, dist, device,
                                       job.units.record(f"teacher_{job.run.unit(k).name}"))
        targets = teachers.build_targets(y_tr, n_classes, probs, t.pseudo, t.distill, t.label_smoothing, device)
        if targets.n_pseudo:
            rows_store = ConcatView(rows_store, open_store(job.px, test["path"]).subset(targets.pseudo_rows))
        labels = np.arange(len(targets.hard))  # batches carry row indices; targets are looked up on the device
    sampled = targets.hard if targets is not None else y_tr
    tr_ds = ImageDataset(rows_store, labels, train_transform(job.px), seed=job.seed,
                         by_epoch=EpochTransforms(job.px) if job.aug.size_schedule else None)
    va_ds = ImageDataset(store.subset(np.flatnonzero(in_fold)), y_va, valid_transform(job.px))
    batches = EpochBatches(lambda e: epoch_indices(t.sampler, sampled, n_classes, job.seed, e, t.epochs),
                           len(sampled), t.batch_size, dist.world, dist.rank)
    if len(batches) < t.accum_steps:
        raise PipelineError(f"{'full fit' if k == FULL_FIT else f'fold {k}'}: {len(y_tr)} training images make "
                            f"{len(batches)} batch(es) of {t.batch_size} x {dist.world} process(es); lower "
                            f"train.batch_size or accum_steps")
    va_idx = np.arange(len(va_ds))[dist.rank::dist.world]
    cuda = device.type == "cuda"
    probe = None
    if t.head_init == "probe" or t.epochs == 0:  # every process fits the same head on every training row
        probe = make_loader(ImageDataset(store.subset(train_idx), y_tr, valid_transform(job.px)),
                            batch_size=max(t.batch_size, 64), n_workers=workers(job.train), cuda=cuda)
    return FoldData(
        y_tr=y_tr, y_va=y_va, valid_ids=df["id"].values[in_fold], counts=np.bincount(y_tr, minlength=n_classes),
        batches=batches, train_loader=make_loader(tr_ds, batch_sampler=batches, n_workers=workers(job.train), cuda=cuda),
        valid_loader=make_loader(va_ds, batch_size=max(t.batch_size, 64), n_workers=workers(job.train), cuda=cuda,
                                 indices=va_idx, persistent=True),
        va_idx=va_idx, targets=targets, probe_loader=probe, cleaned=cleaned, train_feats=train_feats)


def clean_training_rows(job: Job, model, stats, store, train_idx: np.ndarray, y_tr: np.ndarray, n_classes: int,
                        device, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray]:
    """train.clean_labels: the training rows flagged by confident learning on an inner cross-validation of these rows
    (the pretrained backbone's features: core/engine/cleaning), dropped or relabelled to their predicted class.
    Returns (the rows that train, their labels, the record: every flagged id with its label and prediction, those
    rows' features: LP-FT's probe reads them instead of a second pass)."""
    t0, t = time.perf_counter(), job.train
    loader = make_loader(ImageDataset(store.subset(train_idx), y_tr, valid_transform(job.px)),
                         batch_size=max(t.batch_size, 64), n_workers=workers(t), cuda=device.type == "cuda")
    with torch.no_grad():
        feats = models.extract_features(model, loader, Normalize(*stats).to(device), device, amp_dtype(t.amp, device),
                                        memory_format(t, device))
    flagged, predicted = label_issues(feats, y_tr, n_classes, t.clean_max_share, job.seed + k)
    rec = {"action": t.clean_labels, "flagged": int(len(flagged)), "of": int(len(y_tr)),
           "rows": [{"id": str(ids[train_idx[i]]), "label": int(y_tr[i]), "predicted": int(predicted[i])}
                    for i in flagged]}
    log.info("%s: label cleaning flagged %d of %d training rows (%s; %.1fs)", "full fit" if k == FULL_FIT else
             f"fold {k}", len(flagged), len(y_tr), "dropped" if t.clean_labels == "drop" else "relabelled",
             time.perf_counter() - t0)
    if t.clean_labels == "drop":
        keep = np.setdiff1d(np.arange(len(y_tr)), flagged)
        return train_idx[keep], y_tr[keep], rec, feats[keep]
    y = y_tr.copy()
    y[flagged] = predicted[flagged]
    return train_idx, y, rec, feats


def probe_init(model, stats, data: FoldData, t: TrainCfg, device, label: str) -> None:
    """LP-FT's first step (train.head_init=probe; the whole of train.epochs=0): the classifier fit on the frozen
    pretrained features of the fold's labelled training rows (never its held-out rows), before any gradient step."""
    t0 = time.perf_counter()
    clf = model.get_classifier()
    if not isinstance(clf, torch.nn.Linear):
        raise PipelineError(f"train.head_init=probe needs a linear classifier; the model has {type(clf).__name__}")
    with torch.no_grad():
        feats = data.train_feats if data.train_feats is not None else models.extract_features(
            model, data.probe_loader, Normalize(*stats).to(device), device, amp_dtype(t.amp, device),
            memory_format(t, device))
        head = probe_head(feats, data.y_tr, clf.out_features)
        clf.weight.copy_(torch.as_tensor(head.weight, device=clf.weight.device))
        clf.bias.copy_(torch.as_tensor(head.bias, device=clf.bias.device))
    acc = float((head.logits(feats).argmax(1) == data.y_tr).mean())
    log.info("%s: linear probe on %d training rows' pretrained features (%d-d): train accuracy %.3f, %.1fs", label,
             len(feats), feats.shape[1], acc, time.perf_counter() - t0)


def _fold_nets(t: TrainCfg, model, stats, frozen_bn, data: FoldData, n_classes: int, dist: Dist, device,
               state: FoldState, levels: tuple[Level, ...] = ()) -> FoldNets:
    """EMA, optimiser, schedule, the step, loss and mixup; DDP / SyncBatchNorm / compile wrappers."""
    ema = None
    if t.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=t.ema_warmup)
    optimizer = training.optimizer(model, t)
    scheduler = training.scheduler(optimizer, t, len(data.batches) // t.accum_steps)
    weights = effective_number_weights(data.counts, t.cb_beta) if t.class_weights == "effective_number" else None
    margins = ldam_margins(data.counts, t.ldam_max_margin) if t.loss == "ldam" else None
    clf = model.get_classifier()
    arc = arcface_margins(data.counts, t.arcface_margin, t.arcface_margin_min) if isinstance(clf, SubCenterCosine) else None
    net = model
    if dist.world > 1:
        # batch statistics over the global batch (GPU only: on CPU each process keeps its own)
        if device.type == "cuda" and any(isinstance(m, training.BATCH_NORMS) for m in model.modules()):
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    step = Step(model, optimizer, device, amp_dtype(t.amp, device), accum_steps=t.accum_steps, clip_grad=t.clip_grad,
                on_update=scheduler.step_update, ema=ema,
                before_update=lambda: training.drop_backbone_grads(model) if state.frozen else None)
    return FoldNets(model=model, net=maybe_compile(t, net), ema=ema, norm=Normalize(*stats).to(device), stats=stats,
                    optimizer=optimizer, scheduler=scheduler, step=step,
                    criterion=SoftTargetLoss(t.loss, t.focal_gamma, weights, margins, t.ldam_scale,
                                             [lv.matrix() for lv in levels], t.taxonomy_weight, arc,
                                             clf.scale if arc is not None else 1.0).to(device),
                    mixup=training.build_mixup(t, n_classes, per_row_targets=data.targets is not None),
                    frozen_bn=frozen_bn)


def restore(r: FoldRun, saved: dict) -> None:
    """Continue an interrupted run from its last checkpoint."""
    n, st = r.nets, r.state
    n.model.load_state_dict(saved["model"])
    n.optimizer.load_state_dict(saved["optimizer"])
    n.scheduler.load_state_dict(saved["scheduler"])
    n.step.load_state_dict(saved.get("scaler"), saved["num_updates"])
    if n.ema is not None:
        n.ema.module.load_state_dict(saved["ema"])
    st.start_epoch, st.history, st.best = saved["epoch"] + 1, saved["history"], saved["best"]
    log.info("%s: resuming from %s after epoch %d", r.label, r.paths.checkpoint, saved["epoch"])


# ----------------------------------------------------------------------------- epochs
def train_epoch(r: FoldRun, epoch: int) -> dict:
    """One epoch, top to bottom: the epoch's switches, then per batch forward and loss (labels, mixup/cutmix or
    the per-row teacher targets) under autocast, backward and, every train.accum_steps batches, the update
    (`Step`: fp16 loss scaling, clipping, optimiser, per-update schedule, EMA) through the shared loop
    (`engine.loop.run_epoch`), the loss read back every few steps (a divergence names its step), then the epoch's
    schedule step and numbers."""
    from timm.data.mixup import mixup_target

    t, n, data = r.job.train, r.nets, r.data
    # the epoch's switches (functions of the epoch, so a resumed run agrees): seeding, the sampler's order, the
    # deferred re-weighting, BatchNorm layers kept frozen, the head warm-up, whether this epoch mixes
    training.seed_epoch(r.job.seed, epoch)
    data.batches.set_epoch(epoch)
    n.net.train()
    if t.drw_epoch is not None:
        n.criterion.set_class_weights(effective_number_weights(data.counts, t.cb_beta) if epoch >= t.drw_epoch
                                      else None, r.device)
    for m in n.frozen_bn:  # a linear probe / frozen stages: their BatchNorm statistics stay as they are
        m.eval()
    r.state.frozen = epoch < t.freeze_epochs  # Step's before_update drops the backbone's gradients then
    if t.bn_stats == "frozen" or (r.state.frozen and t.freeze_bn):
        training.backbone_bn_eval(n.model)
    mixing = n.mixup is not None and (t.mix_off_epoch is None or epoch < t.mix_off_epoch)
    fmt, n_classes = memory_format(r.job.train, r.device), len(data.counts)

    def loss(batch):  # forward and loss of one batch (timm's task): (mean loss, images)
        x, y = batch
        x = to_input(x, n.norm, r.device, fmt)
        y = y.to(r.device, non_blocking=True)
        if data.targets is not None:  # y holds row indices: label, pseudo-label and teacher targets per row
            lam = training.mix_lambda(n.mixup, x) if mixing else 1.0
            return teachers.distill_loss(data.targets, n.criterion, n.net(x), y, lam), len(x)
        x, target = n.mixup(x, y) if mixing else (x, mixup_target(y, n_classes, smoothing=t.label_smoothing))
        return n.criterion(n.net(x), target), len(x)

    sync_every, n_batches = sync_interval(r.device), len(data.batches)  # the loss is read back this often
    bar = Progress(n_batches, f"{r.label} epoch {epoch + 1}/{t.epochs}", "step", enabled=r.dist.main)
    t0 = time.perf_counter()

    def on_sync(i: int, total: float, seen: int) -> None:  # a non-finite step makes the running sum non-finite
        if r.dist.any(not np.isfinite(total)):
            at = f"step {i + 1}" if sync_every == 1 else f"steps {i + 2 - sync_every}-{i + 1}"
            raise _diverged(r.label, f"loss at epoch {epoch + 1}, {at}", r.paths.checkpoint)
        bar.postfix(loss=f"{total / seen:.4f}", img_s=f"{seen * r.dist.world / (time.perf_counter() - t0):.0f}")

    res: EpochResult = run_epoch(n.step, *_test_hooks(r, epoch, data.train_loader, loss, n_batches),
                                 n_batches=n_batches, sync_every=sync_every, bar=bar, on_sync=on_sync)
    bar.close()
    n.scheduler.step(epoch + 1)
    return {"epoch": epoch + 1, "lr": n.optimizer.param_groups[0]["lr"],
            "train_loss": _mean_over_ranks(r.dist, res.loss_sum, res.seen),
            "images_per_s": res.seen * r.dist.world / res.seconds, "data_wait": res.wait / res.seconds}


def _test_hooks(r: FoldRun, epoch: int, batches, loss, n_batches: int):
    """selfcheck's kill points around the loader and its NaN loss: both wrapped only under PIPELINE_FAULT (the
    loader and the loss come back as they are otherwise)."""
    batches = faulty(batches, before={0: f"train:{'full-' if r.full else ''}step:{epoch}"},
                     after={n_batches // 2: f"train:mid-epoch:{epoch}"})
    if fault_flag(f"nan-loss:{epoch}"):
        return batches, lambda batch: (lambda v, k: (v * float("nan"), k))(*loss(batch))
    return batches, loss


def kept_sources(select: str, has_ema: bool) -> tuple[str, ...]:
    """The weights a fold may output. select=last (train.select): one, fixed before training (EMA when train.ema),
    so no choice is made on the held-out rows; select=best: raw and EMA, the better on the held-out rows."""
    if select == "last":
        return ("ema",) if has_ema else ("raw",)
    return ("raw", "ema") if has_ema else ("raw",)


def held_out_choices(t: TrainCfg) -> list[str]:
    """What stage 2 chooses on a fold's held-out rows, the rows its CV is then scored on (empty: nothing)."""
    return ((["epoch"] + (["raw/EMA weights"] if t.ema else []) if t.select == "best" else [])
            + ([f"early stop (patience {t.patience})"] if t.patience is not None else []))


def validate(r: FoldRun, epoch: int, row: dict) -> None:
    """Score the raw and the EMA weights on the held-out rows (history); keep the weights the fold may output:
    each epoch's (select=last) or the best epoch's (select=best)."""
    job, n, d = r.job, r.nets, r.data
    fmt = memory_format(job.train, r.device)
    nets = {"raw": n.model, **({"ema": n.ema.module} if n.ema is not None else {})}
    outs = {s: held_out(m, _gather_rows(r.dist, d.va_idx, predict(m, d.valid_loader, n.norm, r.device, r.dtype, fmt),
                                        len(d.y_va)), r.device) for s, m in nets.items()}
    if not all(np.isfinite(a).all() for a in outs["raw"].values()):
        raise _diverged(r.label, f"outputs at epoch {epoch + 1}, validation", r.paths.checkpoint)
    kept = kept_sources(job.train.select, n.ema is not None)
    for src, out in outs.items():  # per-row scores in float64, as the leaderboard reads them from oof.npz
        rs = row_scores(d.y_va, logits=stage2_logits(out), dtype=np.float64)
        m = compute(d.y_va, None, d.counts, job.eval.many_shot, job.eval.few_shot, job.eval.scorer, rows=rs)
        prefix = "" if src == "raw" else "ema_"
        if src == "raw":
            row["valid_loss"] = m["log_loss"]
        row.update({f"{prefix}{k}": v for k, v in m.items() if k != "log_loss" or src == "ema"})
        best = r.state.best
        if not r.dist.main or src not in kept:
            continue
        if job.train.select == "last" or better(m["score"], best[src]["score"], job.eval.scorer):
            best[src] = {"score": m["score"], "epoch": epoch + 1}
            state = inference_state(n.ema.module if src == "ema" else n.model)
            write_state_dict(r.paths.best(src), state, {"epoch": epoch + 1, "source": src})
            write_npz(r.paths.oof_of(src), ids=d.valid_ids, y=d.y_va, **out, **rs.arrays())


def end_epoch(r: FoldRun, epoch: int, row: dict, tracker) -> None:
    """Checkpoint, history and the epoch's log line (main process)."""
    job, t = r.job, r.job.train
    r.state.history.append(row)
    if not r.dist.main:
        return
    fault_point(f"train:before-checkpoint:{epoch}")
    _save_checkpoint(r, epoch)
    write_csv(r.paths.history, pd.DataFrame(r.state.history))
    if tracker is not None:
        tracker.log(row, step=epoch + 1)
    if r.full:
        log.info("full fit epoch %d/%d (of %d scheduled)  lr %.2e  train loss %.4f  %.0f img/s  %.1fs", epoch + 1,
                 r.epochs, t.epochs, row["lr"], row["train_loss"], row["images_per_s"], row["seconds"])
        return
    metric = job.eval.scorer
    extra = f" ema {row['ema_score']:.4f}" if r.nets.ema is not None else ""
    if metric != "balanced_accuracy":
        extra += f"  bal.acc {row['balanced_accuracy']:.4f}"
    log.info("fold %d epoch %d/%d  lr %.2e  train loss %.4f  valid loss %.4f  %s %.4f%s  %.0f img/s  %.1fs",
             r.k, epoch + 1, t.epochs, row["lr"], row["train_loss"], row["valid_loss"], metric, row["score"], extra,
             row["images_per_s"], row["seconds"])


def stop_early(r: FoldRun, epoch: int) -> bool:
    """`train.patience`: no better metric (raw or EMA) in the last `patience` epochs ends the fold before
    `epoch` (judged from the kept best epochs, so a resumed run stops where an uninterrupted one would)."""
    p = r.job.train.patience
    if p is None or epoch == 0 or r.full:
        return False
    last_better = best_epoch(r.state.history, r.job.eval.scorer) if r.dist.main else 0
    stop = bool(r.dist.broadcast(r.dist.main and epoch - last_better >= p))
    if stop:
        r.state.stopped_epoch = epoch
        if r.dist.main:
            log.info("fold %d: early stop after epoch %d of %d (no better %s for %d epochs; best at epoch %d)", r.k,
                     epoch, r.job.train.epochs, r.job.eval.scorer, p, last_better)
    return stop


def best_epoch(history: list[dict], metric: str) -> int:
    """The last epoch (1-based) at which the raw or the EMA weights reached their best held-out metric so far."""
    out = 0
    for col in ("score", "ema_score"):
        top = None
        for row in history:
            v = row.get(col)
            if v is not None and not pd.isna(v) and better(v, top, metric):
                top, out = v, max(out, row["epoch"])
    return out


# ----------------------------------------------------------------------------- a unit from start to end
def train_unit(job: Job, df: pd.DataFrame, classes: list, k: int, force: bool, dist: Dist) -> dict:
    """Fold k, or the full-data model (k = FULL_FIT): skip when up to date, resume when interrupted, train its
    epochs (a fold validates each and may stop early), then write its weights and summary (main process)."""
    choices = fold_choices(job.run, job.n_splits, job.rec) if k == FULL_FIT else None
    paths = job.run.unit(k)
    key = f"weights_{FULL}" if k == FULL_FIT else f"weights{k}"
    rec = job.units.record(key)
    done, resume = resume_or_skip(paths, rec, "full fit" if k == FULL_FIT else f"fold {k}", force, dist,
                                  job.units.current(key))
    if done is not None:
        return done
    r = set_up(job, df, len(classes), k, dist, paths, rec)
    if r.full:
        r.epochs = rec["full_fit"]["epochs"]
    if resume is not None:
        restore(r, resume)
    if dist.main:
        log.info(_describe(r, len(classes), choices))
    tracker = Tracker(job.tracking, "full" if r.full else k) if dist.main and job.train.tracker != "none" else None
    for epoch in range(r.state.start_epoch, r.epochs):
        if stop_early(r, epoch):
            break
        t0 = time.perf_counter()
        row = train_epoch(r, epoch)
        if not r.full:
            validate(r, epoch, row)
        row["seconds"] = time.perf_counter() - t0
        end_epoch(r, epoch, row, tracker)
        dist.barrier()
    if r.epochs == 0 and not r.full:  # train.epochs=0: the fold's output is the probe-initialised model itself
        t0 = time.perf_counter()
        row = {"epoch": 0, "lr": 0.0, "train_loss": float("nan"), "images_per_s": 0.0}
        validate(r, -1, row)
        row["seconds"] = time.perf_counter() - t0
        r.state.history.append(row)
        if dist.main:
            write_csv(r.paths.history, pd.DataFrame(r.state.history))
    if tracker is not None:
        tracker.close()
    summary = (finish_full(r) if r.full else finish(r)) if dist.main else None
    dist.barrier()
    return dist.broadcast(summary)


def _describe(r: FoldRun, n_classes: int, choices: list[dict] | None) -> str:
    job, d = r.job, r.data
    if r.full:
        plan = r.rec["full_fit"]
        return (f"full fit: {job.model.arch} on all {len(d.y_tr)} images, {plan['epochs']} of {job.train.epochs} "
                f"scheduled epochs (the folds chose epochs {[c['epoch'] for c in choices]}), {plan['source']} weights")
    extra = f" + {d.targets.n_pseudo} pseudo-labelled test images" if d.targets is not None else ""
    return (f"fold {r.k}: {job.model.arch}, {len(d.y_tr)} train{extra} / {len(d.y_va)} valid images, {n_classes} "
            f"classes, {len(d.batches) // job.train.accum_steps} steps/epoch, device {r.device}"
            f"{f', AMP {r.dtype}' if r.dtype else ''}{f', {r.dist.world} processes' if r.dist.world > 1 else ''}")


def _summary(r: FoldRun, **fields) -> dict:
    """The summary fields of a fold and of the full-data model; written last, it marks the unit complete."""
    job, d = r.job, r.data
    return {**fields, "arch": job.model.arch, "num_classes": len(d.counts), "img_size": job.aug.img_size,
            "mean": r.nets.stats[0], "std": r.nets.stats[1], "epochs_trained": sum(h["epoch"] > 0 for h in r.state.history),
            **({} if r.full else {"stopped_early_after": r.state.stopped_epoch, "teacher": _teacher_summary(r)}),
            "n_train": int(len(d.y_tr)), "n_valid": int(len(d.y_va)), "train_counts": d.counts.tolist(),
            **({"cleaned": d.cleaned} if d.cleaned is not None else {}),
            "seconds": float(sum(h["seconds"] for h in r.state.history)), "made_from": r.rec, "env": environment()}


def _teacher_summary(r: FoldRun) -> dict | None:
    t = r.job.train
    if r.data.targets is None:
        return None
    return {"pseudo_images": r.data.targets.n_pseudo, "pseudo_from": t.pseudo.teacher or None,
            "distill_from": t.distill.teacher or None, "leaky": bool(t.distill.teacher and t.distill.leaky_oof)}


def finish(r: FoldRun) -> dict:
    """Keep the fold's output weights (select=last: the fixed source; best: the better of raw and EMA on the
    held-out rows); write the summary last."""
    job, best = r.job, r.state.best
    kept = kept_sources(job.train.select, r.nets.ema is not None)
    chosen = kept[0]
    if len(kept) == 2 and better(best["ema"]["score"], best["raw"]["score"], job.eval.scorer):
        chosen = "ema"
    for src, dst in ((r.paths.best(chosen), r.paths.weights), (r.paths.oof_of(chosen), r.paths.oof)):
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    oof = read_npz(r.paths.oof)
    final = compute(r.data.y_va, None, r.data.counts, job.eval.many_shot, job.eval.few_shot,
                    job.eval.scorer, rows=RowScores.of_arrays(oof) or row_scores(r.data.y_va, logits=stage2_logits(oof),
                                                                                   dtype=np.float64))
    summary = _summary(r, fold=r.k, chosen=chosen, epoch=best[chosen]["epoch"], score=final["score"],
                       metric=job.eval.scorer, metrics=final, best=best,
                       chosen_on_held_out=held_out_choices(job.train))
    fault_point("train:before-summary")
    keep_image_snapshots(r.rec)
    write_json(r.paths.summary, summary)
    for src in kept:  # copied above: per-source copies were for the choice only (the fold is complete now)
        r.paths.best(src).unlink(missing_ok=True)
        r.paths.oof_of(src).unlink(missing_ok=True)
    log.info("fold %d done: %s weights of epoch %d, %s %.4f", r.k, chosen, summary["epoch"], job.eval.scorer,
             summary["score"])
    return summary


def finish_full(r: FoldRun) -> dict:
    """train.full_fit: keep the weights (raw or EMA) most folds kept, after the folds' epoch count; no CV."""
    plan, n = r.rec["full_fit"], r.nets
    model = n.ema.module if plan["source"] == "ema" and n.ema is not None else n.model
    write_state_dict(r.paths.weights, inference_state(model), {"epoch": plan["epochs"], "source": plan["source"]})
    summary = _summary(r, fold="full", chosen=plan["source"], epoch=plan["epochs"], score=None,
                       metric=r.job.eval.scorer, cv="none: trained on every row")
    fault_point("train:before-full-summary")
    keep_image_snapshots(r.rec)
    write_json(r.paths.summary, summary)
    log.info("full fit done: %s weights after epoch %d (no CV of its own)", plan["source"], plan["epochs"])
    return summary


def _diverged(label: str, what: str, ckpt_path) -> PipelineError:
    return PipelineError(f"{label}: non-finite {what}: the weights diverged; stopped. The last good checkpoint "
                         f"is kept: {ckpt_path if ckpt_path.exists() else 'none yet'}. "
                         f"Try a lower train.lr, train.clip_grad, or train.amp=bf16")


def _gather_rows(dist: Dist, idx: np.ndarray, part: np.ndarray, n: int) -> np.ndarray:
    if dist.world == 1:
        return part
    out = np.zeros((n, part.shape[1]), np.float32)
    for i, p in dist.gather((idx, part)):
        out[i] = p
    return out


def _mean_over_ranks(dist: Dist, total: float, count: int) -> float:
    total, count = dist.sum([total, count])
    return total / max(1.0, count)


def _save_checkpoint(r: FoldRun, epoch: int) -> None:
    n = r.nets
    state = {
        "model": clean_state_dict(n.model.state_dict()),
        "optimizer": n.optimizer.state_dict(),
        "scheduler": n.scheduler.state_dict(),
        "scaler": n.step.state_dict(),
        "ema": clean_state_dict(n.ema.module.state_dict()) if n.ema is not None else None,
        "epoch": epoch, "num_updates": n.step.num_updates, "history": r.state.history, "best": r.state.best,
        "made_from": json.loads(json.dumps(r.rec)),  # plain data: loaded back with weights_only=True
        "rng": {"torch": torch.get_rng_state()},  # each epoch reseeds from (seed, epoch); kept for inspection
    }
    with atomic_path(r.paths.checkpoint, suffix=".pt") as tmp:
        torch.save(state, tmp)


# ----------------------------------------------------------------------------- entry
def status(cfg: Config) -> list[str]:
    """Why stage 2 would do work now (empty: every fold and the full-data model are up to date)."""
    return experiment_units(cfg).status("2")


def run(cfg: Config, fold: int | None = None, force: bool = False, gpus: str | None = None) -> list[dict]:
    df, classes = read_folds(cfg.folds_name)
    n_splits = int(df["fold"].max()) + 1
    if fold is not None and not 0 <= fold < n_splits:
        raise PipelineError(f"--fold {fold}: {cfg.folds_csv} has folds 0..{n_splits - 1}")
    folds = [fold] if fold is not None else list(range(n_splits))
    dist = Dist.from_env(torch.cuda.is_available() and cfg.device != "cpu")
    if gpus:
        summaries = _run_parallel(cfg.to_yaml(), cfg.run_dir, folds, force, gpus)
        print_fold_table(cfg.experiment, cfg.eval.scorer, cfg.train, summaries)
        _maybe_full(Job.of(cfg, classes), df, classes, force, dist)  # one model: trained here, on the first GPU
        return summaries
    if cfg.model.pretrained_path:  # refused (a pickle that is not plain tensors, weights of another model)
        create_model(cfg.model, len(classes))  # before anything is written
    job = Job.of(cfg, classes)  # every train image still there (a file removed after stage 1 is named), the
    # taxonomy's levels, before any write
    for k in folds:  # the folds file is the one the config makes now (stale: refused, or --allow-stale warns)
        job.units.require("folds", f"weights{k}")
    if dist.main:
        write_text(cfg.run_dir.config, cfg.to_yaml())
        write_json(cfg.run_dir.classes, classes)
    dist.barrier()
    summaries = []
    for k in folds:
        lock = experiment_lock(cfg.run_dir.fold(k).dir) if dist.main else nullcontext()
        with lock:
            summaries.append(train_unit(job, df, classes, k, force, dist))
    if dist.main:
        print_fold_table(cfg.experiment, cfg.eval.scorer, cfg.train, summaries)
    _maybe_full(job, df, classes, force, dist)
    return summaries


def _maybe_full(job: Job, df: pd.DataFrame, classes: list, force: bool, dist: Dist) -> None:
    """train.full_fit: the full-data model, once every fold is finished from the current settings."""
    if not job.train.full_fit:
        return
    choices = fold_choices(job.run, job.n_splits, job.rec)
    if choices is None:
        if dist.main:
            log.info("full fit waits for every fold to finish (./run.sh train without --fold trains it)")
        return
    with experiment_lock(job.run.full.dir) if dist.main else nullcontext():
        train_unit(job, df, classes, FULL_FIT, force, dist)


def print_fold_table(experiment: str, metric: str, t: TrainCfg, summaries: list[dict]) -> None:
    rows = [{"fold": s["fold"], "weights": s["chosen"], "epoch": s["epoch"], metric: s["score"],
             "macro_f1": s["metrics"]["macro_f1"], "bal_acc": s["metrics"]["balanced_accuracy"],
             "few_acc": s["metrics"]["few_acc"], "minutes": s["seconds"] / 60} for s in summaries]
    table = pd.DataFrame(rows).astype({"fold": str})
    if len(table) > 1:
        num = table.drop(columns=["fold", "weights"])
        extra = [{"fold": "mean", "weights": "", **num.mean().to_dict()},
                 {"fold": "std", "weights": "", **num.std(ddof=0).to_dict()}]
        table = pd.concat([table, pd.DataFrame(extra)], ignore_index=True)
    log.info("experiment %s, stage 2 per fold:\n%s", experiment, table.to_string(index=False, float_format="%.4f"))
    chosen = held_out_choices(t)
    if chosen:
        log.warning("experiment %s: %s chosen on each fold's held-out rows, the rows its CV is scored on: this CV "
                    "and every later one of the experiment are optimistic (the leaderboard marks them and ranks them "
                    "last); train.select=last without train.patience chooses nothing there", experiment,
                    " and ".join(chosen))


def _run_parallel(resolved_yaml: str, run: RunDir, folds: list[int], force: bool, gpus: str) -> list[dict]:
    """One fold per GPU at a time (folds are independent), each in its own `pipeline train --fold k` process
    (`resolved_yaml`: the config, resolved)."""
    devices = [g.strip() for g in gpus.split(",") if g.strip()]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(resolved_yaml)
        resolved = f.name
    jobs = [(k, [sys.executable, "-m", "pipeline", "train", "--config", resolved, "--fold", str(k)]
             + (["--force"] if force else [])) for k in folds]
    try:
        failed = run_per_device(jobs, devices, on_start=lambda k, d: log.info("fold %d -> GPU %s", k, d))
    finally:
        Path(resolved).unlink()
    if failed:
        raise PipelineError(f"fold(s) {failed} failed; see their messages above")
    return [read_json(run.fold(k).summary) for k in folds]
