"""What a stage-2 training run is built from, as library calls: parameter groups, the timm optimizer and
schedule, Mixup/CutMix, the frozen parts of a linear probe or head warm-up, per-epoch seeding.

Functions take the `train` section (or plain values), never the whole config; stage 2 wires them together
and runs them through `core/engine/loop.py`.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from ..nets import models
from ..config import TrainCfg
from ..errors import PipelineError

BATCH_NORMS = torch.nn.modules.batchnorm._BatchNorm


def seed_epoch(seed: int, epoch: int) -> None:
    """Everything random in an epoch flows from (seed, epoch): replayable after a resume."""
    s = (seed * 1_000_003 + epoch) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def param_groups(model: torch.nn.Module, t: TrainCfg) -> list[dict]:
    """Backbone and head at their own learning rates; no weight decay on biases, norms and GeM's p. With
    `train.layer_decay`, timm's layer-wise groups (`param_groups_layer_decay`: the head at scale 1, each
    earlier layer group `layer_decay` times the next); `backbone_lr_mult` multiplies every backbone group.
    Scales live in `lr_scale`, which timm's schedulers apply at every step."""
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


def optimizer(model: torch.nn.Module, t: TrainCfg) -> torch.optim.Optimizer:
    """timm's optimizer over `param_groups`."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(param_groups(model, t), opt=t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                               momentum=t.momentum)


def scheduler(opt: torch.optim.Optimizer, t: TrainCfg, updates_per_epoch: int):
    """timm's schedule, stepped per update (warm-up in fractions of an epoch)."""
    from timm.scheduler import create_scheduler_v2

    sched, _ = create_scheduler_v2(opt, sched=t.scheduler, num_epochs=max(t.epochs, 1), warmup_epochs=t.warmup_epochs,
                                   warmup_lr=t.warmup_lr, min_lr=t.min_lr, step_on_epochs=False,
                                   updates_per_epoch=updates_per_epoch, plateau_mode="max")
    return sched


def build_mixup(t: TrainCfg, n_classes: int, per_row_targets: bool = False):
    """timm's Mixup/CutMix from the train section, or None when both alphas are 0. per_row_targets: the
    targets are mixed by the caller (teacher targets, looked up per row): see `mix_lambda`."""
    if t.mixup_alpha <= 0 and t.cutmix_alpha <= 0:
        return None
    if t.batch_size % 2:
        raise PipelineError("mixup/cutmix need an even train.batch_size")
    from timm.data import Mixup

    return Mixup(mixup_alpha=t.mixup_alpha, cutmix_alpha=t.cutmix_alpha, prob=t.mix_prob,
                 switch_prob=t.mix_switch_prob, mode=t.mix_mode,
                 label_smoothing=0.0 if per_row_targets else t.label_smoothing,
                 num_classes=2 if per_row_targets else n_classes)


def mix_lambda(mixup, x: torch.Tensor) -> torch.Tensor:
    """Mix the images of a batch in place with timm's Mixup (its public call; built with per_row_targets)
    and return each element's lambda as a column (B x 1), for targets the caller mixes itself. The trick:
    two "classes" alternating along the batch, so element i and its partner (the flipped batch, B - 1 - i,
    of the other parity as B is even) always differ, and the mixed one-hot of i holds lambda_i at its own
    class."""
    parity = torch.arange(len(x), device=x.device) % 2
    _, mixed = mixup(x, parity)
    return mixed.gather(1, parity[:, None])


def freeze(model: torch.nn.Module, freeze_backbone: bool, trainable_stages: int | None) -> list[torch.nn.Module]:
    """A linear probe / partial fine-tuning: parameters that never train get no gradient. Returns the
    BatchNorm layers among them, whose running statistics must stay as they are too (kept in eval mode)."""
    frozen, _ = models.frozen_parameters(model, freeze_backbone, trainable_stages)
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
    return [m for m in model.modules() if isinstance(m, BATCH_NORMS)
            and any(id(p) in frozen for p in m.parameters(recurse=False))]


def backbone_bn_eval(model: torch.nn.Module) -> None:
    """train.bn_stats=frozen (or a head warm-up with train.freeze_bn): the backbone's BatchNorm layers normalise
    with their running statistics, which stay as they are; their affine weights still train."""
    head = set(model.get_classifier().modules())
    for m in model.modules():
        if isinstance(m, BATCH_NORMS) and m not in head:
            m.eval()


def drop_backbone_grads(model: torch.nn.Module) -> None:
    """Head warm-up: only the classifier moves (no gradient, so no step and no weight decay elsewhere)."""
    head = {id(p) for p in model.get_classifier().parameters()}
    for p in model.parameters():
        if id(p) not in head:
            p.grad = None
