"""Stage 2: train every fold with timm (mixup/cutmix, EMA, AMP, imbalance samplers), keep OOF logits.

Usage:   ./run.sh train [--fold K] [--force] [--gpus 0,1,...] [key=value ...]
         torchrun --nproc_per_node=N -m pipeline train --fold K      (data parallel, one fold)
Input:   folds/<name>.csv + folds/<name>.json (stage 1), the train images
Output:  runs/<exp>/config.yaml, runs/<exp>/classes.json
         runs/<exp>/fold<k>/model.safetensors   chosen weights (raw or EMA, by the validation metric)
                            oof.npz             held-out logits of those weights: ids, y, logits
                            history.csv         one row per epoch
                            last.pt             resume checkpoint (model, optimiser, scheduler, scaler,
                                                EMA, epoch, RNG), rewritten atomically every epoch
                            best_raw.safetensors, best_ema.safetensors, oof_raw.npz, oof_ema.npz
                            summary.json        written last: the fold is complete
         runs/<exp>/full/...    train.full_fit: the same files for the model of every row (no OOF, no score),
                                trained after the folds for their median chosen epoch
A fold whose summary matches the config is skipped (--force retrains it); a fold trained from
other settings or another folds file is stale and retrained (`status` lists them). A killed run resumes
from last.pt and, on CPU with a fixed seed, ends bit-identical to an uninterrupted one: every
epoch's sampler order, augmentation, mixup and dropout are seeded by (seed, epoch).
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..core.artifacts import (atomic_path, experiment_lock, fault_flag, fault_point, read_json, read_npz, sha256_file,
                              write_csv, write_json, write_npz, write_text)
from ..core.augment import EpochTransforms, open_store, train_transform, valid_transform
from ..core.config import Config, config_to_yaml
from ..core.data import read_folds, read_test_table
from ..core.distributed import Dist
from ..core.errors import PipelineError
from ..core.images import ConcatView, EpochBatches, ImageDataset
from ..core.losses import SoftTargetLoss, effective_number_weights, ldam_margins
from ..core.metrics import better, compute, softmax
from ..core import models
from ..core.models import Normalize, clean_state_dict, create_model, norm_stats, write_state_dict
from ..core.layout import FULL, FoldDir  # FULL: the full-data model's fold index; `fold != FULL` is every row
from ..core.progress import Progress, progress
from ..core.provenance import (describe_changes, environment, fold_choices, full_record, keep_image_snapshots,
                               recorded, stale_reasons, train_record, up_to_date)
from ..core.runtime import (amp_dtype, grad_scaler, make_loader, maybe_compile, memory_format, pick_device,
                            prepare_model, set_backend_flags, workers)
from ..core.samplers import epoch_indices
from ..core.tracking import Tracker

log = logging.getLogger("pipeline")

# ----------------------------------------------------------------------------- setup helpers
def seed_epoch(seed: int, epoch: int) -> None:
    """Everything random in an epoch flows from (seed, epoch): replayable after a resume."""
    s = (seed * 1_000_003 + epoch) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """Backbone and head at their own learning rates; no weight decay on biases, norms and GeM's p. With
    `train.layer_decay`, timm's layer-wise groups (`param_groups_layer_decay`: the head at scale 1, each
    earlier layer group `layer_decay` times the next); `backbone_lr_mult` multiplies every backbone group.
    Scales live in `lr_scale`, which timm's schedulers apply at every step."""
    t = cfg.train
    head = {id(p) for p in model.get_classifier().parameters()}
    if t.layer_decay is not None:
        from timm.optim import param_groups_layer_decay

        out = []
        for g in param_groups_layer_decay(model, weight_decay=t.weight_decay, layer_decay=t.layer_decay):
            for part, params in (("head", [p for p in g["params"] if id(p) in head]),
                                 ("backbone", [p for p in g["params"] if id(p) not in head])):
                if params:
                    mult = 1.0 if part == "head" else t.backbone_lr_mult
                    out.append({"params": params, "lr": t.lr, "lr_scale": g["lr_scale"] * mult,
                                "weight_decay": g["weight_decay"], "name": f"{part}:{len(out)}"})
        return out
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "head" if id(p) in head else "backbone"
        decay = p.ndim > 1 and not name.endswith(".p")
        key = (part, decay)
        if key not in groups:
            mult = 1.0 if part == "head" else t.backbone_lr_mult
            groups[key] = {"params": [], "lr": t.lr * mult, "weight_decay": t.weight_decay if decay else 0.0,
                           "name": f"{part}{'' if decay else '_no_decay'}"}
        groups[key]["params"].append(p)
    return list(groups.values())


@torch.no_grad()
def predict(model, loader, norm, device, dtype, fmt=torch.contiguous_format, desc: str = "validation") -> np.ndarray:
    model.eval()
    out = []
    for x, _ in progress(loader, len(loader), desc, "batch"):
        x = norm(x.to(device, non_blocking=True)).contiguous(memory_format=fmt)
        out.append(models.logits(model, x, dtype).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def build_mixup(cfg: Config, n_classes: int):
    """timm's Mixup/CutMix from the config, or None when both alphas are 0."""
    t = cfg.train
    if t.mixup_alpha <= 0 and t.cutmix_alpha <= 0:
        return None
    if t.batch_size % 2:
        raise PipelineError("mixup/cutmix need an even train.batch_size")
    from timm.data import Mixup

    return Mixup(mixup_alpha=t.mixup_alpha, cutmix_alpha=t.cutmix_alpha, prob=t.mix_prob,
                 switch_prob=t.mix_switch_prob, mode=t.mix_mode, label_smoothing=t.label_smoothing,
                 num_classes=n_classes)


# ----------------------------------------------------------------------------- one fold
@dataclass
class FoldRun:
    """Everything the training loop of one fold touches, built by `set_up`."""
    cfg: Config
    k: int
    dist: Dist
    paths: FoldDir
    rec: dict  # what the fold's outputs are made from
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None: fp32
    y_tr: np.ndarray
    y_va: np.ndarray
    valid_ids: np.ndarray
    counts: np.ndarray  # training images per class
    model: torch.nn.Module
    net: torch.nn.Module  # the model as trained: DDP / compiled wrappers around it
    ema: object | None
    norm: Normalize
    stats: tuple[list[float], list[float]]  # input mean and std
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler | None
    criterion: SoftTargetLoss
    mixup: object | None
    batches: EpochBatches
    train_loader: object
    valid_loader: object
    va_idx: np.ndarray  # this process's share of the held-out rows
    start_epoch: int = 0
    frozen: bool = False  # this epoch trains the classifier only (train.freeze_epochs)
    stopped_epoch: int | None = None  # early stopping (train.patience): the last epoch trained
    plan_epochs: int = 0  # the full-data model: epochs to train (of train.epochs scheduled)
    targets: "Targets | None" = None  # train.pseudo / train.distill: per-row targets (batches carry row indices)
    frozen_bn: list = field(default_factory=list)  # BatchNorm layers of never-trained stages: statistics kept too
    num_updates: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"raw": {"score": None, "epoch": -1}, "ema": {"score": None, "epoch": -1}})

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def full(self) -> bool:  # the full-data model (train.full_fit): every row trains, none is held out
        return self.k == FULL

    @property
    def label(self) -> str:
        return "full fit" if self.full else f"fold {self.k}"




def judge(paths: FoldDir, rec: dict, label: str, force: bool, dist: Dist) -> tuple[dict | None, dict | None]:
    """(the finished summary when the fold is up to date, the resume state when an interrupted run
    of the same inputs left one). A stale or forced fold stops looking complete before any of it
    is replaced."""
    fresh = force
    if paths.summary.exists() and not force:
        if up_to_date(paths.summary, rec):
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


# ----------------------------------------------------------------------------- teachers
@dataclass
class Targets:
    """train.pseudo / train.distill: every training row's targets (labelled rows first, then the pseudo-labelled
    test images), looked up on the device by the row index each batch carries instead of a label."""
    hard: np.ndarray  # N: a class per row (labels; a pseudo-label's top class), for the sampler
    t0: torch.Tensor  # N x C: the label target (one-hot, smoothed) or the pseudo-label (teacher probs or one-hot)
    t1: torch.Tensor | None  # N x C: the distillation target at temperature T (None: no distillation)
    w: torch.Tensor  # N: loss weight (1, or train.pseudo.weight)
    alpha: float
    temperature: float
    n_pseudo: int
    pseudo_rows: np.ndarray  # indices into the test table


def teacher_probs(cfg: Config, df: pd.DataFrame, k: int, test: pd.DataFrame | None, dist: Dist,
                  device: torch.device | None = None, train_rec: dict | None = None) -> dict:
    """The teachers' fold-k probabilities (see core/teacher.py): pseudo_test, distill_train, distill_test, as
    needed. Computed once per fold by the main process and kept in fold<k>/teacher.npz with their record
    (`train_rec`: the fold's stage-2 record when already at hand)."""
    from ..core import teacher as T

    fd = cfg.run.unit(k)
    rec = {"teacher": (train_rec or train_record(cfg))["teacher"], "fold": k}
    if dist.main and not up_to_date(fd.teacher_meta, rec):
        t0 = time.perf_counter()
        tr_paths = list(df["path"][df["fold"] != k])
        test_paths = list(test["path"]) if test is not None else []
        out = {}
        p, d = cfg.train.pseudo, cfg.train.distill
        folds_sha = sha256_file(cfg.folds_csv)

        def by_id(ids_probs, want):  # rows of (ids, probs) in the order of `want`
            where = {str(i): n for n, i in enumerate(ids_probs[0])}
            return ids_probs[1][[where[str(i)] for i in want]]

        # the full-data model has no held-out rows to leak into: the teacher's stage-4/5 predictions serve it
        if p.teacher:
            tp = T.load_teacher(p.teacher)
            T.check_folds(tp, folds_sha)
            out["pseudo_test"] = (by_id(T.stage4_probs(tp, "test"), test["id"]) if k == FULL
                                  else T.fold_probs(tp, k, {"test": test_paths}, device)["test"])
        if d.teacher:
            td = T.load_teacher(d.teacher)
            T.check_folds(td, folds_sha)
            if k == FULL:
                got = {"train": by_id(T.stage4_probs(td, "oof"), df["id"]),
                       "test": by_id(T.stage4_probs(td, "test"), test["id"]) if test is not None else np.zeros(0)}
            else:
                got = T.fold_probs(td, k, {"train": [] if d.leaky_oof else tr_paths, "test": test_paths}, device)
                if d.leaky_oof:  # the popular shortcut, marked leaky: train rows' OOF probabilities
                    got["train"] = by_id(T.leaky_oof_probs(td), df["id"][df["fold"] != k])
            out["distill_train"], out["distill_test"] = got["train"], got["test"]
        write_npz(fd.teacher_targets, **{n: v.astype(np.float32) for n, v in out.items()})
        write_json(fd.teacher_meta, {"made_from": rec, "seconds": time.perf_counter() - t0})
        log.info("%s: teacher targets from its fold-%s models in %.1fs (%s)", fd.name, k, time.perf_counter() - t0,
                 ", ".join(f"{n} {v.shape}" for n, v in out.items()))
    dist.barrier()
    return read_npz(fd.teacher_targets)


def build_targets(cfg: Config, y_tr: np.ndarray, n_classes: int, probs: dict, device) -> Targets:
    p, d, s = cfg.train.pseudo, cfg.train.distill, cfg.train.label_smoothing
    one_hot = np.full((len(y_tr), n_classes), s / n_classes, np.float32)
    one_hot[np.arange(len(y_tr)), y_tr] += 1 - s
    rows = np.zeros(0, np.int64)
    t0, hard, w = [one_hot], [y_tr], [np.ones(len(y_tr), np.float32)]
    if p.teacher:
        pt = probs["pseudo_test"]
        rows = np.flatnonzero(pt.max(1) >= p.threshold)
        top = pt[rows].argmax(1)
        t0.append(pt[rows] / pt[rows].sum(1, keepdims=True) if p.soft else np.eye(n_classes, dtype=np.float32)[top])
        hard.append(top)
        w.append(np.full(len(rows), p.weight, np.float32))
    t1 = None
    if d.teacher:
        t1 = np.concatenate([probs["distill_train"], probs["distill_test"][rows]]) if p.teacher else probs["distill_train"]
        from ..core.teacher import sharpen

        t1 = torch.as_tensor(sharpen(t1, d.temperature), dtype=torch.float32, device=device)
    return Targets(hard=np.concatenate(hard), t0=torch.as_tensor(np.concatenate(t0), device=device),
                   t1=t1, w=torch.as_tensor(np.concatenate(w), device=device), alpha=d.alpha if d.teacher else 0.0,
                   temperature=d.temperature, n_pseudo=len(rows), pseudo_rows=rows)


def teacher_loss(r: FoldRun, logits: torch.Tensor, idx: torch.Tensor, lam) -> torch.Tensor:
    """(1 - alpha) * weighted CE on the label / pseudo-label targets + alpha * T^2 * KL(teacher_T || student_T),
    every target mixed with the batch's mixup/cutmix lambda (lam: 1 when not mixing)."""
    tg = r.targets

    def mixed(t):
        return t * lam + t.flip(0) * (1 - lam)

    w = mixed(tg.w[idx][:, None])[:, 0]
    ce = r.criterion.per_sample(logits, mixed(tg.t0[idx]))
    loss = (ce * w).sum() / w.sum().clamp_min(1e-12)
    if tg.t1 is not None and tg.alpha > 0:
        T = tg.temperature
        t1 = mixed(tg.t1[idx])
        kl = (t1 * (t1.clamp_min(1e-12).log() - torch.log_softmax(logits.float() / T, dim=1))).sum(1).mean()
        loss = (1 - tg.alpha) * loss + tg.alpha * T * T * kl
    return loss


def mix_lambda(mixup, x: torch.Tensor):
    """timm's Mixup applied to the images only (its own dispatch), returning the lambda it used: a number, or a
    column per element ('pair' / 'elem' modes); the targets are mixed by the caller (teacher_loss)."""
    if mixup.mode == "elem":
        return mixup._mix_elem(x)
    if mixup.mode == "pair":
        return mixup._mix_pair(x)
    return mixup._mix_batch(x)


def set_up(cfg: Config, df: pd.DataFrame, n_classes: int, k: int, dist: Dist, paths: FoldDir | None = None,
           rec: dict | None = None) -> FoldRun:
    """Model, EMA, optimiser, schedule, loss, mixup and loaders of fold k (k = FULL: every row trains)."""
    paths = paths or cfg.run.unit(k)
    rec = rec or train_record(cfg)
    t = cfg.train
    device = pick_device(cfg, dist)
    cuda = device.type == "cuda"
    set_backend_flags(cfg, device)
    train_df, valid_df = df[df["fold"] != k], df[df["fold"] == k]
    if valid_df.empty and k != FULL:
        raise PipelineError(f"fold {k} has no held-out rows in {cfg.folds_csv}")
    y_tr, y_va = train_df["y"].values, valid_df["y"].values
    counts = np.bincount(y_tr, minlength=n_classes)

    seed_epoch(cfg.seed, -1)  # the initial weights
    model = create_model(cfg, n_classes)
    frozen, _ = models.frozen_parameters(model, t.freeze_backbone, t.trainable_stages)
    for p in model.parameters():  # a linear probe / partial fine-tuning: these never get a gradient
        if id(p) in frozen:
            p.requires_grad_(False)
    frozen_bn = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 and any(id(p) in frozen for p in m.parameters(recurse=False))]
    stats = norm_stats(cfg, model)
    norm = Normalize(*stats).to(device)
    prepare_model(cfg, model, device)
    ema = None
    if t.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=t.ema_warmup)
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(param_groups(model, cfg), opt=t.optimizer, lr=t.lr,
                                    weight_decay=t.weight_decay, momentum=t.momentum)
    if dist.main:  # builds the cache; the other processes open it once it exists
        store = open_store(cfg, df["path"])
    dist.barrier()
    if not dist.main:
        store = open_store(cfg, df["path"])
    in_fold = df["fold"].values == k  # every fold reads the one store of the train images
    rows_store, labels, targets = store.subset(np.flatnonzero(~in_fold)), y_tr, None
    if t.pseudo.teacher or t.distill.teacher:
        test = read_test_table(cfg) if t.pseudo.teacher else None
        targets = build_targets(cfg, y_tr, n_classes, teacher_probs(cfg, df, k, test, dist, device, rec), device)
        if targets.n_pseudo:
            rows_store = ConcatView(rows_store, open_store(cfg, test["path"]).subset(targets.pseudo_rows))
        labels = np.arange(len(targets.hard))  # batches carry row indices; targets are looked up on the device
    sampled = targets.hard if targets is not None else y_tr
    tr_ds = ImageDataset(rows_store, labels, train_transform(cfg), seed=cfg.seed,
                         by_epoch=EpochTransforms(cfg) if cfg.aug.size_schedule else None)
    va_ds = ImageDataset(store.subset(np.flatnonzero(in_fold)), y_va, valid_transform(cfg))
    batches = EpochBatches(lambda e: epoch_indices(t.sampler, sampled, n_classes, cfg.seed, e, t.epochs),
                           len(sampled), t.batch_size, dist.world, dist.rank)
    if len(batches) < t.accum_steps:
        raise PipelineError(f"{'full fit' if k == FULL else f'fold {k}'}: {len(y_tr)} training images make "
                            f"{len(batches)} batch(es) of {t.batch_size} x {dist.world} process(es); lower "
                            f"train.batch_size or accum_steps")
    scheduler, _ = create_scheduler_v2(optimizer, sched=t.scheduler, num_epochs=t.epochs, warmup_epochs=t.warmup_epochs,
                                       warmup_lr=t.warmup_lr, min_lr=t.min_lr, step_on_epochs=False,
                                       updates_per_epoch=len(batches) // t.accum_steps, plateau_mode="max")
    dtype = amp_dtype(cfg, device)
    va_idx = np.arange(len(va_ds))[dist.rank::dist.world]
    weights = effective_number_weights(counts, t.cb_beta) if t.class_weights == "effective_number" else None
    margins = ldam_margins(counts, t.ldam_max_margin) if t.loss == "ldam" else None
    net = model
    if dist.world > 1:
        # batch statistics over the global batch (GPU only: on CPU each process keeps its own)
        if cuda and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if cuda else None)
    net = maybe_compile(cfg, net)
    return FoldRun(
        cfg=cfg, k=k, dist=dist, paths=paths, rec=rec, device=device, dtype=dtype,
        y_tr=y_tr, y_va=y_va, valid_ids=valid_df["id"].values, counts=counts, model=model, net=net, ema=ema,
        norm=norm, stats=stats, optimizer=optimizer, scheduler=scheduler,
        scaler=grad_scaler(dtype, device),
        criterion=SoftTargetLoss(t.loss, t.focal_gamma, weights, margins, t.ldam_scale).to(device),
        mixup=build_mixup(cfg, n_classes),
        batches=batches, train_loader=make_loader(tr_ds, batch_sampler=batches, n_workers=workers(cfg), cuda=cuda),
        valid_loader=make_loader(va_ds, batch_size=max(t.batch_size, 64), n_workers=workers(cfg), cuda=cuda,
                                 indices=va_idx, persistent=True),
        va_idx=va_idx, targets=targets, frozen_bn=frozen_bn)


def restore(r: FoldRun, state: dict) -> None:
    """Continue an interrupted run from its last checkpoint."""
    r.model.load_state_dict(state["model"])
    r.optimizer.load_state_dict(state["optimizer"])
    r.scheduler.load_state_dict(state["scheduler"])
    if r.scaler is not None and state.get("scaler"):
        r.scaler.load_state_dict(state["scaler"])
    if r.ema is not None:
        r.ema.module.load_state_dict(state["ema"])
    r.start_epoch, r.num_updates = state["epoch"] + 1, state["num_updates"]
    r.history, r.best = state["history"], state["best"]
    log.info("%s: resuming from %s after epoch %d", r.label, r.paths.checkpoint, state["epoch"])


def train_epoch(r: FoldRun, epoch: int) -> dict:
    """One epoch of optimiser steps; returns the epoch's training numbers."""
    from timm.data.mixup import mixup_target

    cfg, t = r.cfg, r.cfg.train
    n_classes = len(r.counts)
    seed_epoch(cfg.seed, epoch)
    r.batches.set_epoch(epoch)
    r.net.train()
    if t.drw_epoch is not None:  # deferred re-weighting: a function of the epoch, so a resume agrees
        r.criterion.set_class_weights(effective_number_weights(r.counts, t.cb_beta) if epoch >= t.drw_epoch else None,
                                      r.device)
    for m in r.frozen_bn:  # a linear probe / frozen stages: their BatchNorm statistics stay as they are
        m.eval()
    r.frozen = epoch < t.freeze_epochs
    if r.frozen and t.freeze_bn:  # the backbone's BatchNorm statistics stay as they are
        head = set(r.model.get_classifier().modules())
        for m in r.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m not in head:
                m.eval()
    mixing = r.mixup is not None and (t.mix_off_epoch is None or epoch < t.mix_off_epoch)
    # host<->device syncs are costly on GPU: read the loss back (and check it is finite) every
    # `sync_every` steps there; on CPU every step, so a divergence names its exact step
    sync_every = 25 if r.cuda else 1
    t0 = time.perf_counter()
    wait, seen = 0.0, 0
    loss_sum = torch.zeros((), device=r.device)  # summed on the device: no sync per step
    bar = Progress(len(r.batches), f"{r.label} epoch {epoch + 1}/{t.epochs}", "step", enabled=r.dist.main)
    t_wait = time.perf_counter()
    r.optimizer.zero_grad(set_to_none=True)
    for step, (x, y) in enumerate(r.train_loader):
        wait += time.perf_counter() - t_wait
        x = r.norm(x.to(r.device, non_blocking=True))
        y = y.to(r.device, non_blocking=True)
        x = x.contiguous(memory_format=memory_format(cfg, r.device))
        if r.targets is not None:  # y holds row indices: label, pseudo-label and teacher targets per row
            lam = mix_lambda(r.mixup, x) if mixing else 1.0
        elif mixing:
            x, target = r.mixup(x, y)
        else:
            target = mixup_target(y, n_classes, smoothing=t.label_smoothing)
        fault_point(f"train:{'full-' if r.full else ''}step:{epoch}")
        with torch.autocast(r.device.type, dtype=r.dtype, enabled=r.dtype is not None):
            out = r.net(x)
            loss = teacher_loss(r, out, y, lam) if r.targets is not None else r.criterion(out, target)
        if fault_flag(f"nan-loss:{epoch}"):
            loss = loss * float("nan")
        loss_sum += loss.detach() * len(x)
        seen += len(x)
        if (step + 1) % sync_every == 0 or step + 1 == len(r.batches):
            total = loss_sum.item()  # the one sync; a non-finite step makes the running sum non-finite
            if r.dist.any(not np.isfinite(total)):
                at = f"step {step + 1}" if sync_every == 1 else f"steps {step + 2 - sync_every}-{step + 1}"
                raise _diverged(r.label, f"loss at epoch {epoch + 1}, {at}", r.paths.checkpoint)
            bar.postfix(loss=f"{total / seen:.4f}", img_s=f"{seen * r.dist.world / (time.perf_counter() - t0):.0f}")
        (r.scaler.scale(loss / t.accum_steps) if r.scaler else loss / t.accum_steps).backward()
        if (step + 1) % t.accum_steps == 0:
            optimizer_step(r)
        bar.update()
        if step == len(r.batches) // 2:
            fault_point(f"train:mid-epoch:{epoch}")
        t_wait = time.perf_counter()
    bar.close()
    if r.cuda:
        torch.cuda.synchronize()
    train_time = time.perf_counter() - t0
    r.scheduler.step(epoch + 1)
    return {"epoch": epoch + 1, "lr": r.optimizer.param_groups[0]["lr"],
            "train_loss": _mean_over_ranks(r.dist, loss_sum.item(), seen),
            "images_per_s": seen * r.dist.world / train_time, "data_wait": wait / train_time, "_t0": t0}


def optimizer_step(r: FoldRun) -> None:
    """Clip, step (through the fp16 scaler when there is one), schedule and update the EMA."""
    t = r.cfg.train
    if r.frozen:  # head warm-up: only the classifier moves (no grad, so no step and no weight decay)
        head = {id(p) for p in r.model.get_classifier().parameters()}
        for p in r.model.parameters():
            if id(p) not in head:
                p.grad = None
    if t.clip_grad:
        if r.scaler:
            r.scaler.unscale_(r.optimizer)
        torch.nn.utils.clip_grad_norm_(r.model.parameters(), t.clip_grad)
    if r.scaler:
        r.scaler.step(r.optimizer)
        r.scaler.update()
    else:
        r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    r.num_updates += 1
    r.scheduler.step_update(r.num_updates)
    if r.ema is not None:
        r.ema.update(r.model, step=r.num_updates)


def validate(r: FoldRun, epoch: int, row: dict) -> None:
    """Score the raw and the EMA weights on the held-out rows; keep the best of each source."""
    cfg = r.cfg
    fmt = memory_format(cfg, r.device)
    logits = {"raw": predict(r.model, r.valid_loader, r.norm, r.device, r.dtype, fmt)}
    if r.ema is not None:
        logits["ema"] = predict(r.ema.module, r.valid_loader, r.norm, r.device, r.dtype, fmt)
    logits = {s: _gather_rows(r.dist, r.va_idx, v, len(r.y_va)) for s, v in logits.items()}
    if not np.isfinite(logits["raw"]).all():
        raise _diverged(r.label, f"outputs at epoch {epoch + 1}, validation", r.paths.checkpoint)
    for src, lg in logits.items():
        m = compute(r.y_va, softmax(lg), r.counts, cfg.eval.many_shot, cfg.eval.few_shot, cfg.eval.metric)
        prefix = "" if src == "raw" else "ema_"
        if src == "raw":
            row["valid_loss"] = m["log_loss"]
        row.update({f"{prefix}{n}": v for n, v in m.items() if n != "log_loss" or src == "ema"})
        if r.dist.main and (cfg.train.select == "last" or better(m["score"], r.best[src]["score"], cfg.eval.metric)):
            r.best[src] = {"score": m["score"], "epoch": epoch + 1}
            state = r.ema.module.state_dict() if src == "ema" else r.model.state_dict()
            write_state_dict(r.paths.best(src), state, {"epoch": epoch + 1, "source": src})
            write_npz(r.paths.oof_of(src), ids=r.valid_ids, y=r.y_va, logits=lg.astype(np.float32))


def end_epoch(r: FoldRun, epoch: int, row: dict, tracker) -> None:
    """Checkpoint, history and the epoch's log line (main process)."""
    cfg, t = r.cfg, r.cfg.train
    r.history.append(row)
    if not r.dist.main:
        return
    fault_point(f"train:before-checkpoint:{epoch}")
    _save_checkpoint(r, epoch)
    write_csv(r.paths.history, pd.DataFrame(r.history))
    if tracker is not None:
        tracker.log(row, step=epoch + 1)
    if r.full:
        log.info("full fit epoch %d/%d (of %d scheduled)  lr %.2e  train loss %.4f  %.0f img/s  %.1fs", epoch + 1,
                 r.plan_epochs, t.epochs, row["lr"], row["train_loss"], row["images_per_s"], row["seconds"])
        return
    metric = cfg.eval.metric
    extra = f" ema {row['ema_score']:.4f}" if r.ema is not None else ""
    if metric != "balanced_accuracy":
        extra += f"  bal.acc {row['balanced_accuracy']:.4f}"
    log.info("fold %d epoch %d/%d  lr %.2e  train loss %.4f  valid loss %.4f  %s %.4f%s  %.0f img/s  %.1fs",
             r.k, epoch + 1, t.epochs, row["lr"], row["train_loss"], row["valid_loss"], metric, row["score"], extra,
             row["images_per_s"], row["seconds"])


def finish(r: FoldRun) -> dict:
    """Keep the better of the raw and EMA weights as the fold's output; write the summary last."""
    cfg = r.cfg
    scored = {s: b for s, b in r.best.items() if b["score"] is not None}
    chosen = "raw"
    if "ema" in scored and better(scored["ema"]["score"], scored["raw"]["score"], cfg.eval.metric):
        chosen = "ema"
    for src, dst in ((r.paths.best(chosen), r.paths.weights), (r.paths.oof_of(chosen), r.paths.oof)):
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    oof = np.load(r.paths.oof)
    final = compute(r.y_va, softmax(oof["logits"]), r.counts, cfg.eval.many_shot, cfg.eval.few_shot, cfg.eval.metric)
    summary = {"fold": r.k, "chosen": chosen, "epoch": r.best[chosen]["epoch"], "score": final["score"],
               "metric": cfg.eval.metric, "metrics": final, "best": r.best,
               "arch": cfg.model.arch, "num_classes": len(r.counts), "img_size": cfg.aug.img_size,
               "mean": r.stats[0], "std": r.stats[1], "epochs_trained": len(r.history),
               "stopped_early_after": r.stopped_epoch,
               "teacher": None if r.targets is None else {
                   "pseudo_images": r.targets.n_pseudo, "pseudo_from": r.cfg.train.pseudo.teacher or None,
                   "distill_from": r.cfg.train.distill.teacher or None,
                   "leaky": bool(r.cfg.train.distill.teacher and r.cfg.train.distill.leaky_oof)},
               "n_train": int(len(r.y_tr)), "n_valid": int(len(r.y_va)), "train_counts": r.counts.tolist(),
               "seconds": float(sum(h["seconds"] for h in r.history)), "made_from": r.rec,
               "env": environment()}
    fault_point("train:before-summary")
    keep_image_snapshots(r.rec)
    write_json(r.paths.summary, summary)
    log.info("fold %d done: %s weights of epoch %d, %s %.4f", r.k, chosen, summary["epoch"], cfg.eval.metric,
             summary["score"])
    return summary


def train_fold(cfg: Config, df: pd.DataFrame, classes: list, k: int, force: bool, dist: Dist) -> dict:
    paths, rec = cfg.run.fold(k), train_record(cfg)
    done, resume = judge(paths, rec, f"fold {k}", force, dist)
    if done is not None:
        return done
    r = set_up(cfg, df, len(classes), k, dist, paths, rec)
    if resume is not None:
        restore(r, resume)
    if dist.main:
        extra = f" + {r.targets.n_pseudo} pseudo-labelled test images" if r.targets is not None else ""
        log.info("fold %d: %s, %d train%s / %d valid images, %d classes, %d steps/epoch, device %s%s%s",
                 k, cfg.model.arch, len(r.y_tr), extra, len(r.y_va), len(classes), len(r.batches) // cfg.train.accum_steps,
                 r.device, f", AMP {r.dtype}" if r.dtype else "", f", {dist.world} processes" if dist.world > 1 else "")
    tracker = Tracker(cfg, k) if dist.main and cfg.train.tracker != "none" else None
    for epoch in range(r.start_epoch, cfg.train.epochs):
        if stop_early(r, epoch):
            break
        row = train_epoch(r, epoch)
        t0 = row.pop("_t0")
        validate(r, epoch, row)
        row["seconds"] = time.perf_counter() - t0
        end_epoch(r, epoch, row, tracker)
        dist.barrier()
    if tracker is not None:
        tracker.close()
    summary = finish(r) if dist.main else None
    dist.barrier()
    return dist.broadcast(summary)


def train_full(cfg: Config, df: pd.DataFrame, classes: list, choices: list[dict], force: bool, dist: Dist) -> dict:
    """train.full_fit: one more model on every row, on the folds' schedule (train.epochs long) stopped at the
    epoch the folds chose (their low median), keeping the weights (raw or EMA) most folds kept. It has no
    held-out rows, so no CV of its own; stage 4 adds its test predictions to the fold mean."""
    paths, rec = cfg.run.full, full_record(cfg, choices)
    plan = rec["full_fit"]
    done, resume = judge(paths, rec, "full fit", force, dist)
    if done is not None:
        return done
    r = set_up(cfg, df, len(classes), FULL, dist, paths, rec)
    r.plan_epochs = plan["epochs"]
    if resume is not None:
        restore(r, resume)
    if dist.main:
        log.info("full fit: %s on all %d images, %d of %d scheduled epochs (the folds chose epochs %s), %s weights",
                 cfg.model.arch, len(r.y_tr), plan["epochs"], cfg.train.epochs, [c["epoch"] for c in choices],
                 plan["source"])
    tracker = Tracker(cfg, "full") if dist.main and cfg.train.tracker != "none" else None
    for epoch in range(r.start_epoch, plan["epochs"]):
        row = train_epoch(r, epoch)
        row["seconds"] = time.perf_counter() - row.pop("_t0")
        end_epoch(r, epoch, row, tracker)
        dist.barrier()
    if tracker is not None:
        tracker.close()
    summary = None
    if dist.main:
        model = r.ema.module if plan["source"] == "ema" and r.ema is not None else r.model
        write_state_dict(paths.weights, model.state_dict(), {"epoch": plan["epochs"], "source": plan["source"]})
        summary = {"fold": "full", "chosen": plan["source"], "epoch": plan["epochs"], "score": None,
                   "metric": cfg.eval.metric, "cv": "none: trained on every row",
                   "arch": cfg.model.arch, "num_classes": len(classes), "img_size": cfg.aug.img_size,
                   "mean": r.stats[0], "std": r.stats[1], "epochs_trained": len(r.history),
                   "n_train": int(len(r.y_tr)), "n_valid": 0, "train_counts": r.counts.tolist(),
                   "seconds": float(sum(h["seconds"] for h in r.history)), "made_from": rec, "env": environment()}
        fault_point("train:before-full-summary")
        keep_image_snapshots(rec)
        write_json(paths.summary, summary)
        log.info("full fit done: %s weights after epoch %d (no CV of its own)", plan["source"], plan["epochs"])
    dist.barrier()
    return dist.broadcast(summary)


def stop_early(r: FoldRun, epoch: int) -> bool:
    """`train.patience`: no better metric (raw or EMA) in the last `patience` epochs ends the fold before
    `epoch` (judged from the kept best epochs, so a resumed run stops where an uninterrupted one would)."""
    p = r.cfg.train.patience
    if p is None or epoch == 0 or r.full:
        return False
    last_better = max(b["epoch"] for b in r.best.values()) if r.dist.main else 0
    stop = bool(r.dist.broadcast(r.dist.main and epoch - last_better >= p))
    if stop:
        r.stopped_epoch = epoch
        if r.dist.main:
            log.info("fold %d: early stop after epoch %d of %d (no better %s for %d epochs; best at epoch %d)", r.k,
                     epoch, r.cfg.train.epochs, r.cfg.eval.metric, p, last_better)
    return stop


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
    state = {
        "model": clean_state_dict(r.model.state_dict()),
        "optimizer": r.optimizer.state_dict(),
        "scheduler": r.scheduler.state_dict(),
        "scaler": r.scaler.state_dict() if r.scaler is not None else None,
        "ema": clean_state_dict(r.ema.module.state_dict()) if r.ema is not None else None,
        "epoch": epoch, "num_updates": r.num_updates, "history": r.history, "best": r.best, "made_from": r.rec,
        "rng": {"torch": torch.get_rng_state()},  # each epoch reseeds from (seed, epoch); kept for inspection
    }
    with atomic_path(r.paths.checkpoint, suffix=".pt") as tmp:
        torch.save(state, tmp)


# ----------------------------------------------------------------------------- entry
def status(cfg: Config) -> list[str]:
    """Why stage 2 would do work now (empty: every fold is up to date)."""
    df, _ = read_folds(cfg)
    rec, reasons = train_record(cfg), []
    for k in range(int(df["fold"].max()) + 1):
        fd = cfg.run.fold(k)
        if not fd.summary.exists() and fd.checkpoint.exists():
            reasons.append(f"fold {k}: interrupted, resumes from {fd.checkpoint.name}")
        else:
            reasons += stale_reasons(fd.summary, rec, f"fold {k}: ")
    if cfg.train.full_fit:
        choices = fold_choices(cfg)
        if choices is None:
            reasons.append("full fit: waits for every fold")
        else:
            reasons += stale_reasons(cfg.run.full.summary, full_record(cfg, choices), "full fit: ")
    return reasons


def run(cfg: Config, fold: int | None = None, force: bool = False, gpus: str | None = None) -> list[dict]:
    df, classes = read_folds(cfg)
    n_splits = int(df["fold"].max()) + 1
    if fold is not None and not 0 <= fold < n_splits:
        raise PipelineError(f"--fold {fold}: {cfg.folds_csv} has folds 0..{n_splits - 1}")
    folds = [fold] if fold is not None else list(range(n_splits))
    dist = Dist.from_env(torch.cuda.is_available() and cfg.device != "cpu")
    if gpus:
        summaries = _run_parallel(cfg, folds, force, gpus)
        _maybe_full(cfg, df, classes, force, dist)  # one model: trained here, on the first GPU
        return summaries
    if cfg.model.pretrained_path:  # refused (a pickle that is not plain tensors, weights of another model)
        create_model(cfg, len(classes))  # before anything is written
    train_record(cfg)  # every train image still there (a file removed after stage 1 is named), before any write
    if dist.main:
        write_text(cfg.run.config, config_to_yaml(cfg))
        write_json(cfg.run.classes, classes)
    dist.barrier()
    summaries = []
    for k in folds:
        lock = experiment_lock(cfg.run.fold(k).dir) if dist.main else nullcontext()
        with lock:
            summaries.append(train_fold(cfg, df, classes, k, force, dist))
    if dist.main:
        print_fold_table(cfg, summaries)
    _maybe_full(cfg, df, classes, force, dist)
    return summaries


def _maybe_full(cfg: Config, df: pd.DataFrame, classes: list, force: bool, dist: Dist) -> None:
    """train.full_fit: the full-data model, once every fold is finished from the current settings."""
    if not cfg.train.full_fit:
        return
    choices = fold_choices(cfg)
    if choices is None:
        if dist.main:
            log.info("full fit waits for every fold to finish (./run.sh train without --fold trains it)")
        return
    with experiment_lock(cfg.run.full.dir) if dist.main else nullcontext():
        train_full(cfg, df, classes, choices, force, dist)


def print_fold_table(cfg: Config, summaries: list[dict]) -> None:
    rows = [{"fold": s["fold"], "weights": s["chosen"], "epoch": s["epoch"], cfg.eval.metric: s["score"],
             "macro_f1": s["metrics"]["macro_f1"], "bal_acc": s["metrics"]["balanced_accuracy"],
             "few_acc": s["metrics"]["few_acc"], "minutes": s["seconds"] / 60} for s in summaries]
    t = pd.DataFrame(rows).astype({"fold": str})
    if len(t) > 1:
        num = t.drop(columns=["fold", "weights"])
        extra = [{"fold": "mean", "weights": "", **num.mean().to_dict()},
                 {"fold": "std", "weights": "", **num.std(ddof=0).to_dict()}]
        t = pd.concat([t, pd.DataFrame(extra)], ignore_index=True)
    log.info("experiment %s, stage 2 per fold:\n%s", cfg.experiment, t.to_string(index=False, float_format="%.4f"))


def _run_parallel(cfg: Config, folds: list[int], force: bool, gpus: str) -> list[dict]:
    """One fold per GPU at a time (folds are independent), each in its own process."""
    devices = [g.strip() for g in gpus.split(",") if g.strip()]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(config_to_yaml(cfg))
        resolved = f.name
    queue, running, failed = list(folds), [], []
    try:
        while queue or running:
            while queue and len(running) < len(devices):
                free = [d for d in devices if d not in {r[1] for r in running}][0]
                k = queue.pop(0)
                cmd = [sys.executable, "-m", "pipeline", "train", "--config", resolved, "--fold", str(k)]
                cmd += ["--force"] if force else []
                env = dict(os.environ, CUDA_VISIBLE_DEVICES=free)
                log.info("fold %d -> GPU %s", k, free)
                running.append((subprocess.Popen(cmd, env=env), free, k))
            time.sleep(0.5)
            for r in list(running):
                if r[0].poll() is not None:
                    running.remove(r)
                    if r[0].returncode != 0:
                        failed.append(r[2])
    finally:
        os.unlink(resolved)
    if failed:
        raise PipelineError(f"fold(s) {failed} failed; see their messages above")
    summaries = [read_json(cfg.run.fold(k).summary) for k in folds]
    print_fold_table(cfg, summaries)
    return summaries
