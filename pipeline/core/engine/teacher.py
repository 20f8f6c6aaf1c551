"""Teachers for pseudo-labels and knowledge distillation (`train.pseudo`, `train.distill`), without leaks.

A teacher is an ensemble (submissions/<name>.json) or one experiment's stage-4 output. The leak to avoid:
the student's fold k is scored on fold k's rows, so nothing it trains on may carry information from them.
A teacher's fold-mean test prediction does (every fold model but one trained on fold k), and so does a
train row's OOF probability (it comes from a model that trained on the student's fold-k rows). So for
the student's fold k every target comes from the teacher's **fold-k models** (trained on exactly the
student's training rows), each applied as stage 4 applies it, with three more precautions:

- a tuned stage-3 head (tau, logit-adjust scale, NCM temperature, cRT/LWS epoch) uses the (low) median of
  the values the *other* folds chose, refit on fold k's training features (stage 3's choice for fold k was
  made on fold k's held-out rows);
- a TTA policy chosen by `infer.search` is the one chosen without fold k's rows (stage 4's `fold_policies[k]`;
  outputs older than those fall back to the configured views), and the `best` head fold k's nested choice;
- weighted and hill-climbing ensembles use the weights fit without fold k (stage 5's `fold_weights`).

The full-data model never takes part (it trained on every row). `train.distill.leaky_oof` offers the
popular shortcut (train rows' OOF probabilities) for comparison; it is marked leaky everywhere.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..files import layout
from ..nets import models
from ..files.artifacts import map_npz, read_json, read_npz, up_to_date, write_json, write_npz
from ..inputs.augment import open_store
from ..config import (MIX, PROBE, Config, DistillCfg, InferCfg, PseudoCfg, RebalanceCfg, TrainCfg, flatten, load_config,
                      off_backbone)
from ..errors import PipelineError
from ..nets.heads import Head, heads_with_choices, median_choices
from ..predict.stored import Stage4
from ..predict.inference import (Loading, default_policy, joint_head, parse_view, policy_probs, predict_policy,
                                 tta_names)
from ..predict.metrics import softmax
from ..predict.submission import Member, combine
from ..files.teachers import Teacher, check_folds, load_teacher
from ..predict.tta import BASELINE
from ..inputs.pixels import pixels

log = logging.getLogger("pipeline")

def leak_free_head(rebalance: RebalanceCfg, seed: int, run: layout.RunDir, k: int, n_splits: int, variant: str,
                   n_classes: int) -> Head:
    """Fold k's head of a stage-3 variant (not joint: that is the model's own classifier) with its tuned value
    taken from the other folds' choices (see above), refit on fold k's training features."""
    others = [read_json(run.fold(j).rebalance_summary) for j in range(n_splits) if j != k]
    chosen = median_choices([variant], others)
    r = dataclasses.replace(rebalance, variants=[variant])
    feats = map_npz(run.fold(k).features)  # the heads read it a block of rows at a time
    return heads_with_choices(r, feats, n_classes, chosen, seed + k)[variant]


def member_policy(infer: InferCfg, s4: dict, plain: bool, k: int) -> list[str]:
    """The views of fold k's targets: a searched policy as chosen without fold k's rows (stage 4's per-fold
    choice; outputs older than it fall back to the configured views), else the policy."""
    if plain:
        return [BASELINE]
    if s4.get("fold_policies"):
        return list(s4["fold_policies"][k])
    if s4.get("searched"):  # chosen on every OOF row: use the configured views instead
        return default_policy(infer, tta_names(infer))
    return list(s4["policy"])


def recorded_config(run: layout.RunDir, s4: dict) -> Config:
    """A member's config as its stage-3 and stage-4 outputs were made: runs/<exp>/config.yaml is written by stage 2
    only, so after `./run.sh all rebalance.crt_epochs=60` it still says 30; the rebalance section is taken from
    the stage-3 record of fold 0 and the infer section from the stage-4 record instead."""
    sections = {"infer": s4["made_from"]["infer"]}
    if run.fold(0).rebalance_summary.exists():  # a joint-only member may have no stage 3
        sections["rebalance"] = read_json(run.fold(0).rebalance_summary)["made_from"]["rebalance"]
    return load_config(run.config, [f"{k}={json.dumps(v)}" for k, v in flatten(sections).items()])


def member_fold_probs(candidate: str, s4: dict, k: int, paths: dict[str, list], device) -> dict[str, np.ndarray]:
    """{part: N x C probabilities} of one teacher candidate's fold-k models on each image set."""
    exp, head, plain = Member.parse(candidate)
    run = layout.RunDir.of(exp)
    mcfg = recorded_config(run, s4)
    classes = read_json(run.classes)
    C = len(classes)
    stage2 = read_json(run.fold(k).summary)
    policy = member_policy(mcfg.infer, s4, plain, k)
    norm = models.Normalize(stage2["mean"], stage2["std"]).to(device)
    dtype = None  # fp32: targets do not depend on the machine's autocast support
    out = {part: np.zeros((len(policy), len(p), C), np.float64) for part, p in paths.items()}
    px = pixels(mcfg)
    load = Loading.of(px, mcfg.infer, mcfg.train, device)
    stores = {part: open_store(px, p) for part, p in paths.items() if len(p)}
    if head == "best":  # fold k's best head, chosen on the other folds (stage 4's nested choice)
        head = s4["best"]["per_fold"][k]
    if off_backbone(head) or head == MIX:
        where = ("the pretrained backbone" if head.startswith(PROBE) else "interpolated (WiSE-FT) weights"
                 if off_backbone(head) else "two backbones (the fine-tuned and the pretrained one)")
        raise PipelineError(f"teacher member '{candidate}': fold {k}'s head is {head}, which runs on {where}: teachers "
                            f"use heads of the fine-tuned models; name one ('{exp}:<head>')")
    fitted = None if head == "joint" else leak_free_head(mcfg.rebalance, mcfg.seed, run, k, mcfg.folds.n_splits,
                                                                         head, C)  # the same for plain and FixRes
    for fixres in (False, True):
        at = [i for i, v in enumerate(policy) if parse_view(v)[2] == fixres]
        if not at:
            continue
        weights = run.fixres(run.fold(k).name) if fixres else run.fold(k).weights
        if not weights.exists():
            raise PipelineError(f"teacher member '{exp}': {weights} not found (re-run ./run.sh infer for it)")
        model = models.load_trained(mcfg.model, weights, C).to(device).eval()
        heads = {head: fitted if fitted is not None else joint_head(model)}
        for part, store in stores.items():
            out[part][at] = predict_policy(load, model, norm, heads, store, [policy[i] for i in at], device,
                                           dtype)[head]
    return {part: policy_probs(lg, policy, policy, s4["merge"]) if lg.shape[1] else np.zeros((0, C))
            for part, lg in out.items()}


def fold_probs(t: Teacher, k: int, paths: dict[str, list], device=None) -> dict[str, np.ndarray]:
    """{part: N x C}: the teacher's fold-k prediction of each image set, members combined by its method with the
    weights fit without fold k."""
    device = device or torch.device("cpu")
    w = t.weights_for(k)
    names = [n for n in t.candidates if w.get(n, 0) > 0]
    per = [member_fold_probs(n, t.stage4[Member.parse(n).exp], k, paths, device) for n in names]
    ws = np.array([w[n] for n in names]) / sum(w[n] for n in names)
    return {part: combine([p[part] for p in per], t.method, ws) if len(paths[part]) else
            np.zeros((0, per[0][part].shape[1])) for part in paths}


def stage4_probs(t: Teacher, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, N x C): the teacher's stage-4 probabilities of `part` ("oof" or "test"), members combined with the
    weights fit on every row."""
    names = list(t.weights)
    parts, ids = [], None
    for n in names:
        exp, head, plain = Member.parse(n)
        run = layout.RunDir.of(exp)
        stored = Stage4.of(run, head, part, t.stage4[exp])
        if not stored.exists():
            raise PipelineError(f"teacher '{t.name}': stage 4 has no {part} predictions of head {head} (re-run ./run.sh infer for '{exp}')")
        ids = stored.ids() if ids is None else ids
        parts.append(stored.probs(plain))
    return ids, combine(parts, t.method, np.array([t.weights[n] for n in names]))


def leaky_oof_probs(t: Teacher) -> tuple[np.ndarray, np.ndarray]:
    """(ids, N x C): the teacher's OOF probabilities of every train row, members combined with the weights fit on
    every row. LEAKY as distillation targets: a row's OOF prediction comes from a model that trained on the
    student's fold-k rows (train.distill.leaky_oof, for comparison only)."""
    return stage4_probs(t, "oof")


def sharpen(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the teacher distribution at temperature T (its logits divided by T for one view)."""
    logp = np.log(np.clip(probs, 1e-12, 1)) / temperature
    return softmax(logp)



# ----------------------------------------------------------------------------- a student's targets
def fold_targets(train: TrainCfg, fd: layout.FoldDir, folds_sha: str, df, k: int, test, dist, device,
                 rec: dict) -> dict:
    """The teachers' fold-k probabilities for the student's fold k: pseudo_test, distill_train, distill_test,
    as needed. Computed once per fold by the main process and kept in fold<k>/teacher.npz with their record
    (`rec`: their unit's, core/files/units: the stage-2 record's "teacher" entry and the fold). The full-data model
    (k = FULL_FIT) has no held-out rows to leak into: the teachers' stage-4/5 predictions serve it."""
    if dist.main and not (fd.teacher_targets.exists() and up_to_date(fd.teacher_meta, rec)):
        t0 = time.perf_counter()
        out = _teacher_targets(train.pseudo, train.distill, df, k, test, device, folds_sha)
        write_npz(fd.teacher_targets, **{n: v.astype(np.float32) for n, v in out.items()})
        write_json(fd.teacher_meta, {"made_from": rec, "seconds": time.perf_counter() - t0})
        log.info("%s: teacher targets from its fold-%s models in %.1fs (%s)", fd.name, k, time.perf_counter() - t0,
                 ", ".join(f"{n} {v.shape}" for n, v in out.items()))
    dist.barrier()
    return read_npz(fd.teacher_targets)


def _teacher_targets(p: PseudoCfg, d: DistillCfg, df, k: int, test, device, folds_sha: str) -> dict[str, np.ndarray]:
    full = k == layout.FULL_FIT
    tr_paths = list(df["path"][df["fold"] != k])
    test_paths = list(test["path"]) if test is not None else []
    out = {}

    def by_id(ids_probs, want):  # rows of (ids, probs) in the order of `want`
        where = {str(i): n for n, i in enumerate(ids_probs[0])}
        return ids_probs[1][[where[str(i)] for i in want]]

    if p.teacher:
        tp = load_teacher(p.teacher)
        check_folds(tp, folds_sha)
        out["pseudo_test"] = (by_id(stage4_probs(tp, "test"), test["id"]) if full
                              else fold_probs(tp, k, {"test": test_paths}, device)["test"])
    if d.teacher:
        td = load_teacher(d.teacher)
        check_folds(td, folds_sha)
        if full:
            got = {"train": by_id(stage4_probs(td, "oof"), df["id"]),
                   "test": by_id(stage4_probs(td, "test"), test["id"]) if test is not None else np.zeros(0)}
        else:
            got = fold_probs(td, k, {"train": [] if d.leaky_oof else tr_paths, "test": test_paths}, device)
            if d.leaky_oof:  # the popular shortcut, marked leaky: train rows' OOF probabilities
                got["train"] = by_id(leaky_oof_probs(td), df["id"][df["fold"] != k])
        out["distill_train"], out["distill_test"] = got["train"], got["test"]
    return out


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


def build_targets(y_tr: np.ndarray, n_classes: int, probs: dict, pseudo, distill, smoothing: float,
                  device) -> Targets:
    """Per-row targets from the labels (smoothed one-hot) and the teachers' probabilities (`fold_targets`);
    `pseudo` / `distill`: the train.pseudo / train.distill sections."""
    one_hot = np.full((len(y_tr), n_classes), smoothing / n_classes, np.float32)
    one_hot[np.arange(len(y_tr)), y_tr] += 1 - smoothing
    rows = np.zeros(0, np.int64)
    t0, hard, w = [one_hot], [y_tr], [np.ones(len(y_tr), np.float32)]
    if pseudo.teacher:
        pt = probs["pseudo_test"]
        rows = np.flatnonzero(pt.max(1) >= pseudo.threshold)
        top = pt[rows].argmax(1)
        t0.append(pt[rows] / pt[rows].sum(1, keepdims=True) if pseudo.soft
                  else np.eye(n_classes, dtype=np.float32)[top])
        hard.append(top)
        w.append(np.full(len(rows), pseudo.weight, np.float32))
    t1 = None
    if distill.teacher:
        t1 = (np.concatenate([probs["distill_train"], probs["distill_test"][rows]]) if pseudo.teacher
              else probs["distill_train"])
        t1 = torch.as_tensor(sharpen(t1, distill.temperature), dtype=torch.float32, device=device)
    return Targets(hard=np.concatenate(hard), t0=torch.as_tensor(np.concatenate(t0), device=device),
                   t1=t1, w=torch.as_tensor(np.concatenate(w), device=device),
                   alpha=distill.alpha if distill.teacher else 0.0, temperature=distill.temperature,
                   n_pseudo=len(rows), pseudo_rows=rows)


def distill_loss(tg: Targets, criterion, logits: torch.Tensor, idx: torch.Tensor, lam) -> torch.Tensor:
    """(1 - alpha) * weighted CE on the label / pseudo-label targets + alpha * T^2 * KL(teacher_T || student_T),
    every target mixed with the batch's mixup/cutmix lambda (lam: 1 when not mixing, else a column per row).
    `criterion`: stage 2's SoftTargetLoss (its per-sample loss)."""
    def mixed(t):
        return t * lam + t.flip(0) * (1 - lam)

    w = mixed(tg.w[idx][:, None])[:, 0]
    ce = criterion.per_sample(logits, mixed(tg.t0[idx]))
    loss = (ce * w).sum() / w.sum().clamp_min(1e-12)
    if tg.t1 is not None and tg.alpha > 0:
        T = tg.temperature
        t1 = mixed(tg.t1[idx])
        kl = (t1 * (t1.clamp_min(1e-12).log() - torch.log_softmax(logits.float() / T, dim=1))).sum(1).mean()
        loss = (1 - tg.alpha) * loss + tg.alpha * T * T * kl
    return loss
