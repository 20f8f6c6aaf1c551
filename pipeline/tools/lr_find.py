"""`./run.sh lr-find`: the learning-rate range test (Smith 2015; fastai's `lr_find`) on one fold.

Usage:   ./run.sh lr-find [--config FILE] [--fold K] [--steps N] [key=value ...]
Input:   folds/<name>.csv (stage 1), the train images of the fold's training rows, the config's model,
         optimizer, augmentation, loss and batch size
Output:  reports/<exp>/lr_find.csv  lr, loss, smoothed loss per step
         reports/<exp>/lr_find.png  loss against learning rate, the suggestion marked
The model (fresh, as stage 2 starts it) trains for up to N steps (default 100) with the learning rate
rising exponentially from 1e-7 to 10, and stops once the smoothed loss is 4x its minimum. The suggestion
is the steepest descent of the smoothed loss (the learning rate where it falls fastest) before its
minimum, the value fastai's `lr_find` also reports; paste it as `train.lr`. Nothing under runs/ changes.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from ..core.files import layout
from ..core.report import plots
from ..core.files.artifacts import write_csv
from ..core.inputs.augment import open_store, train_transform
from ..core.config import Config, TrainCfg
from ..core.inputs.data import read_folds
from ..core.engine.distributed import Dist
from ..core.errors import PipelineError
from ..core.inputs.images import ImageDataset
from ..core.engine.loop import Step, run_epoch
from ..core.nets.losses import SoftTargetLoss, arcface_margins, ldam_margins
from ..core.nets.models import Normalize, create_model, norm_stats, to_input
from ..core.report.progress import Progress
from ..core.engine.runtime import amp_dtype, memory_format, pick_device, prepare_model, workers
from ..core.inputs.pixels import Pixels, pixels

log = logging.getLogger("pipeline")

START_LR, END_LR, DIVERGE, BETA = 1e-7, 10.0, 4.0, 0.98


def smooth(losses: list[float], beta: float = BETA) -> np.ndarray:
    """fastai's debiased exponential moving average."""
    avg, out = 0.0, []
    for i, v in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return np.array(out)


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> float:
    """The learning rate of the steepest fall of the smoothed loss (in log lr) before its minimum."""
    end = int(np.argmin(smoothed))
    if end < 2:
        raise PipelineError("lr-find: the loss never fell (it diverged from the first steps); check the data and "
                            "model, or lower the batch size")
    slope = np.gradient(smoothed[: end + 1], np.log(lrs[: end + 1]))
    start = max(1, end // 10)  # the first steps carry the EMA's warm-up noise
    return float(lrs[start + int(np.argmin(slope[start:end]))])


def _data_and_loss(t: TrainCfg, px: Pixels, seed: int, df: pd.DataFrame, rows: np.ndarray, n_classes: int, device,
                   arc_scale: float | None = None):
    """A shuffled loader of the fold's training rows (stage 2's augmentation) and stage 2's loss (`arc_scale`:
    model.head=arcface's s, with its margins)."""
    store = open_store(px, df["path"])
    ds = ImageDataset(store.subset(rows), df["y"].values[rows], train_transform(px), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=t.batch_size, shuffle=True, drop_last=True,
                                         generator=gen, num_workers=workers(t),
                                         pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise PipelineError(f"lr-find: {len(rows)} training images make no full batch of {t.batch_size}")
    counts = np.bincount(df["y"].values[rows], minlength=n_classes)
    arc = arcface_margins(counts, t.arcface_margin, t.arcface_margin_min) if arc_scale is not None else None
    criterion = SoftTargetLoss(t.loss, t.focal_gamma, margins=ldam_margins(
        counts, t.ldam_max_margin) if t.loss == "ldam" else None, scale=t.ldam_scale, arc_margins=arc,
        arc_scale=arc_scale or 1.0).to(device)
    return loader, criterion


def run(cfg: Config, fold: int = 0, steps: int = 100) -> dict:
    df, classes = read_folds(cfg.folds_name)
    rows = np.flatnonzero(df["fold"].values != fold)
    if not len(rows):
        raise PipelineError(f"--fold {fold}: {cfg.folds_csv} has no such fold")
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device, Dist())
    dtype = amp_dtype(cfg.train.amp, device)
    model = prepare_model(cfg.train, create_model(cfg.model, len(classes), training=True), device).train()
    norm = Normalize(*norm_stats(cfg.model, model)).to(device)
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, opt=cfg.train.optimizer, lr=START_LR, weight_decay=cfg.train.weight_decay,
                              momentum=cfg.train.momentum)
    loader, criterion = _data_and_loss(cfg.train, pixels(cfg), cfg.seed, df, rows, len(classes), device,
                                       cfg.model.arcface_scale if cfg.model.head == "arcface" else None)
    lrs, losses = [], []
    factor = (END_LR / START_LR) ** (1 / max(steps - 1, 1))
    fmt = memory_format(cfg.train, device)

    def set_lr(n: int) -> None:  # after update n, the lr of step n + 1 (the optimiser starts at START_LR)
        for g in opt.param_groups:
            g["lr"] = START_LR * factor ** n

    step = Step(model, opt, device, dtype, on_update=set_lr)  # the training step of stage 2 (fp16: scaled)

    def loss(batch):
        x, y = batch
        target = torch.nn.functional.one_hot(y.to(device), len(classes)).float()
        return criterion(model(to_input(x, norm, device, fmt)), target), len(y)

    state = {"avg": 0.0, "best": float("inf"), "stop": False}

    def after_batch(i: int, value: torch.Tensor) -> bool:
        v = float(value.item())
        lrs.append(START_LR * factor ** len(losses))
        losses.append(v if np.isfinite(v) else float("inf"))
        state["avg"] = BETA * state["avg"] + (1 - BETA) * losses[-1]  # smooth()'s running value, step by step
        sm = state["avg"] / (1 - BETA ** len(losses))
        state["best"] = min(state["best"], sm)
        bar.postfix(lr=f"{lrs[-1]:.1e}", loss=f"{sm:.3f}")
        state["stop"] = len(losses) >= steps or not np.isfinite(sm) or (len(losses) > 10 and sm > DIVERGE * state["best"])
        return state["stop"]

    with Progress(steps, "lr-find", "step") as bar:
        while not state["stop"]:  # epochs until all steps are done or the loss diverged
            run_epoch(step, loader, loss, bar=bar, after_batch=after_batch, sync_every=None)
    lrs_a = np.array(lrs)
    sm = smooth([v if np.isfinite(v) else max(x for x in losses if np.isfinite(x)) * DIVERGE for v in losses])
    lr = suggest(lrs_a, sm)
    write_csv(layout.lr_find_csv(cfg.experiment), pd.DataFrame({"lr": lrs_a, "loss": losses, "smoothed": sm}))
    plots.lr_curve(layout.lr_find_png(cfg.experiment), lrs_a, np.minimum(np.array(losses), sm.max() * 2), sm, lr)
    log.info("lr-find on fold %d (%d steps, lr %.1e to %.1e): suggested train.lr=%.2e (steepest fall; the minimum "
             "of the smoothed loss is at %.2e); %s", fold, len(lrs), lrs[0], lrs[-1], lr, lrs_a[int(np.argmin(sm))],
             layout.lr_find_png(cfg.experiment))
    return {"suggestion": lr, "lrs": lrs_a, "losses": np.array(losses), "smoothed": sm}
