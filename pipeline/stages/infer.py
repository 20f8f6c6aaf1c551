"""Stage 4: multi-scale test-time augmentation with every fold's model, on OOF rows and test images.

Usage:   ./run.sh infer [--force] [key=value ...]
         Kaggle kernel (no internet, no training data): ./run.sh infer --config runs/<exp>/config.yaml
             data.root=/kaggle/input/<competition> infer.oof=off
Input:   runs/<exp>/classes.json, fold<k>/model.safetensors + summary.json (stage 2),
         fold<k>/rebalance/heads/<variant>.safetensors and runs/<exp>/rebalance/summary.json (stage 3),
         test images (sample_submission order); for OOF TTA also the folds file and train images
Output:  runs/<exp>/infer/features/<backbone>/test.npy, held<k>.npy   pooled features (V x N x D, infer.features)
             of every backbone run (fold<k>, full, fold<k>.fixres, pretrained, fold<k>.wise<alpha>) per view
         runs/<exp>/infer/rows.npz   test ids; held-out ids, y, fold; classes
         (a head's logits and probabilities: computed by their reader, core/predict/stored.Stage4, from the
         features and the heads the manifest in summary.json names; the policy merged from summary.json)
         runs/<exp>/infer/scores.npz       per head, the held-out rows' per-row scores (no TTA, the policy)
         runs/<exp>/infer/report.csv       CV without TTA, with each view alone, with the policy
         runs/<exp>/infer/summary.json     written last: heads, primary head, policy, CV, provenance
Every fold's model predicts the test images (its probabilities are averaged over folds) and its
own held-out rows, so the CV with TTA is measured on OOF exactly like the CV without it.
train.full_fit: the full-data model (runs/<exp>/full/) joins the test mean with weight
infer.full_fit_weight (OOF rows stay the folds'). infer.fixres: a copy of each model with its norm
layers and classifier tuned at the FixRes size on its own training rows (runs/<exp>/infer/fixres/)
predicts `fixres:<view>@<size>` views, scored on OOF like the others.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.nets import models
from ..core.nets.families import FAMILIES, FINE_TUNED, Family, FamilyModel
from ..core.report import tracking
from ..core.files.artifacts import (experiment_lock, fault_point, read_json, read_npz, sha256_file, write_csv,
                                    write_json, write_npz)
from ..core.config import MIX, Config, EvalCfg, InferCfg, ModelCfg, TrainCfg
from ..core.files import layout
from ..core.inputs.data import read_test_table
from ..core.engine.distributed import Dist
from ..core.errors import PipelineError
from ..core.inputs.augment import open_store, valid_transform
from ..core.inputs.images import ImageDataset
from ..core.predict.inference import (Loading, PolicyFeatures, default_policy, joint_head,
                                      nested_policy_blocks, parse_view, policies_rows, tta_names)
from ..core.files.layout import FULL_FIT
from ..core.engine.loop import Step, run_epoch
from ..core.files.featurefile import write_features
from ..core.predict.stored import (STORE_VERSION, HeldOut, LogitTable, StoredFiles, head_ref, mix_factors,
                                   mix_shares, store_damage)
from ..core.predict.metrics import GREATER_IS_BETTER, RowScores, better, cv, row_scores, score_rows
from ..core.files.provenance import (environment, fixres_lr, keep_image_snapshots, oof_rows, mix_candidates,
                                     resolve_heads)
from ..core.files.units import Units, experiment_units, trained
from ..core.report.progress import Progress
from ..core.engine.runtime import amp_dtype, make_loader, memory_format, pick_device, prepare_model, workers
from ..core.predict.tta import BASELINE
from ..core.inputs.pixels import Pixels, pixels

log = logging.getLogger("pipeline")

@dataclass
class Inputs:
    """Everything stage 4 reads, checked, and the record its outputs will be made from."""
    classes: list
    oof_df: pd.DataFrame | None  # the folds table when held-out rows are predicted too
    summaries: list[dict]  # stage 2, per fold
    full: dict | None  # stage 2 of the full-data model when it joins the test mean (train.full_fit)
    heads: list[str]
    test: pd.DataFrame
    made_from: dict
    units: Units  # the experiment's units, asked for every record stage 4 checks or writes


@dataclass
class TtaModel:
    """One model stage 4 runs: fold k's (or the full-data model's, k = FULL_FIT) weights, plain or FixRes-tuned,
    with its share of the test mean (OOF rows are predicted by their own fold's models only)."""
    k: int
    fixres: bool
    weight: float
    stage2: dict

    @property
    def name(self) -> str:
        return ("full fit" if self.k == FULL_FIT else f"fold {self.k}") + (" (FixRes)" if self.fixres else "")


@dataclass(frozen=True)
class Job:
    """What stage 4 reads from the config, resolved once by `run`/`status` (`Job.of`, with `load_inputs` the stage's
    edge): every step below takes it or the values it needs, never the config."""
    experiment: str
    run: layout.RunDir
    folds_csv: Path
    infer: InferCfg
    eval: EvalCfg
    model: ModelCfg
    train: TrainCfg  # lr (FixRes), batch size, precision, memory format, workers
    px: Pixels
    seed: int
    device: str
    tracking: tracking.Tracking

    @classmethod
    def of(cls, cfg: Config) -> "Job":
        return cls(cfg.experiment, cfg.run_dir, cfg.folds_csv, cfg.infer, cfg.eval, cfg.model, cfg.train, pixels(cfg),
                   cfg.seed, cfg.device, tracking.Tracking.of(cfg))



def load_inputs(cfg: Config) -> Inputs:
    """Every input of stage 4, each asked of its unit (core/files/units): refused when missing or made from other
    settings than the config's now."""
    run = cfg.run_dir
    if not run.classes.exists():
        raise PipelineError(f"{run.classes} not found: experiment '{cfg.experiment}' has not been trained "
                            f"(run ./run.sh train first)")
    classes = read_json(run.classes)
    oof_df = oof_rows(cfg.infer.oof, cfg.folds_name, classes)
    upstream = experiment_units(cfg)
    summaries = [trained(upstream, k, cfg.model.arch, len(classes), "infer") for k in range(cfg.folds.n_splits)]
    full = None
    if cfg.train.full_fit and cfg.infer.full_fit_weight > 0:
        full = trained(upstream, FULL_FIT, cfg.model.arch, len(classes), "infer")
    heads = resolve_heads(cfg.infer.heads, run, cfg.infer.mix)
    if cfg.folds_csv.exists() and any(h != "joint" for h in cfg.infer.heads):
        for key in [d for d in upstream["infer"].deps if not d.startswith("weights")]:  # stage 3's outputs
            upstream.require(key, "infer")
    test = read_test_table(cfg.data)
    return Inputs(classes, oof_df, summaries, full, heads, test, upstream.record("infer"), upstream)


def units(job: Job, inp: Inputs) -> list[TtaModel]:
    fx = job.infer.fixres.size is not None
    out = [TtaModel(k, f, 1.0, stage2) for k, stage2 in enumerate(inp.summaries) for f in ((False, True) if fx else (False,))]
    if inp.full is not None:
        out += [TtaModel(FULL_FIT, f, job.infer.full_fit_weight, inp.full) for f in ((False, True) if fx else (False,))]
    return out


def status(cfg: Config) -> list[str]:
    """Why stage 4 would do work now (empty: up to date): its unit's reasons, then any damaged output."""
    return experiment_units(cfg).status("4") or damaged_outputs(cfg.run_dir)


def damaged_outputs(run: layout.RunDir) -> list[str]:
    """Stage 4's outputs that are not what its manifest says (a damaged or replaced file makes the stage stale)."""
    return [f"damaged output: {x}" for x in store_damage(run, read_json(run.infer_summary))]


# ----------------------------------------------------------------------------- FixRes
def fixres_weights(job: Job, inp: Inputs, u: TtaModel, device, dtype):
    """FixRes (Touvron et al. 2019): the model with its normalisation layers and classifier fine-tuned at the
    test size on its own training rows (fold k: the rows it trained on, never its held-out ones; the full
    model: every row). BatchNorm statistics are re-estimated there (a cumulative average over the epoch, not
    a decayed one). Kept in runs/<exp>/infer/fixres/<unit>.safetensors with its record."""
    fd, df, n_classes = job.run.unit(u.k), inp.oof_df, len(inp.classes)
    path, meta = job.run.fixres(fd.name), job.run.fixres_meta(fd.name)
    if df is None:  # test-only inference (infer.oof=off without the train data): use what was tuned before
        if not path.exists():
            raise PipelineError(f"infer.fixres needs {path}: tune it where the train images are (stage 4 with "
                                f"infer.oof=auto), or set infer.fixres.size=null")
        return models.load_trained(job.model, path, n_classes)
    rec = inp.units.record(f"fixres_{fd.name}")
    if inp.units.current(f"fixres_{fd.name}"):
        return models.load_trained(job.model, path, n_classes)
    t0 = time.perf_counter()
    fx = job.infer.fixres
    crop = int(round(job.px.aug.img_size * fx.size))
    model = models.load_trained(job.model, fd.weights, n_classes).to(device)
    prepare_model(job.train, model, device)
    norm = models.Normalize(u.stage2["mean"], u.stage2["std"]).to(device)
    tuned = fixres_trainable(model)
    rows = np.flatnonzero(df["fold"].values != u.k)
    ds = ImageDataset(open_store(job.px, df["path"]).subset(rows), df["y"].values[rows], valid_transform(job.px, crop))
    desc = f"FixRes {u.name.removesuffix(' (FixRes)')} at {crop} px"
    fixres_tune(job, model, tuned, norm, ds, torch.Generator().manual_seed(job.seed * 7919 + u.k + 1), device,
                dtype, desc)
    model.eval()
    models.write_state_dict(path, model.state_dict(), {"fixres": fx.size, "crop": crop, "unit": fd.name})
    keep_image_snapshots(rec)
    write_json(meta, {"made_from": rec, "crop": crop, "rows": int(len(rows)), "seconds": time.perf_counter() - t0})
    log.info("%s: FixRes-tuned at %d px on %d training rows (%d epoch(s), BN re-estimated) in %.1fs", u.name, crop,
             len(rows), fx.epochs, time.perf_counter() - t0)
    return model.cpu()


NORM_LAYERS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)


def fixres_trainable(model: torch.nn.Module) -> list:
    """The classifier and every normalisation layer train; BatchNorm statistics restart as a cumulative
    average (the exact mean over the tuning batches); everything else is frozen."""
    tuned = [p for p in model.get_classifier().parameters()]
    for m in model.modules():
        if isinstance(m, NORM_LAYERS):
            tuned += [p for p in m.parameters(recurse=False)]
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
    ids = {id(p) for p in tuned}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return tuned


def fixres_tune(job: Job, model, tuned: list, norm, ds, gen: torch.Generator, device, dtype, desc: str) -> None:
    """infer.fixres.epochs over `ds` (shuffled and flipped by `gen`) with AdamW and a cosine schedule to 0,
    through stage 2's step and loop."""
    fx = job.infer.fixres
    steps = fx.epochs * (-(-len(ds) // job.train.batch_size))
    opt = torch.optim.AdamW(tuned, lr=fixres_lr(fx, job.train.lr), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    step = Step(model, opt, device, dtype, on_update=lambda n: sched.step())  # fp16: loss scaling too
    fmt = memory_format(job.train, device)

    def loss(batch):
        x, y = batch
        x = models.to_input(x, norm, device, fmt)
        flip = torch.rand(len(x), generator=gen) < job.px.aug.hflip
        x[flip.to(device)] = x[flip.to(device)].flip(3)
        return torch.nn.functional.cross_entropy(model(x).float(), y.to(device)), len(x)

    model.train()
    bar = Progress(steps, desc, "step")
    for _ in range(fx.epochs):
        order = torch.randperm(len(ds), generator=gen).numpy()
        loader = make_loader(torch.utils.data.Subset(ds, order), batch_size=job.train.batch_size,
                             n_workers=workers(job.train), cuda=device.type == "cuda")
        run_epoch(step, loader, loss, bar=bar, on_sync=lambda i, total, seen: bar.postfix(loss=f"{total / seen:.4f}"))
    bar.close()


# ----------------------------------------------------------------------------- predicting
class Store:
    """Stage 4's outputs while its backbones run: each backbone's pooled features of its views over an image set
    (V x N x D, infer.features; written as soon as the backbone is done) and the manifest of summary.json: per head
    and part, which backbone's features and which head make its logits (with a weight in the test mean). Logits are
    computed from them by predict/stored.LogitTable, for stage 4's own report and policy search as for every later
    reader: nothing of rows x classes is stored."""

    def __init__(self, run: layout.RunDir, names: list[str], dtype: str, rows: dict):
        self.run, self.dtype, self.rows = run, dtype, rows
        self.manifest = {"version": STORE_VERSION, "dtype": dtype, "views": names, "backbones": {}, "test": {},
                         "oof": {}}
        self.files = None

    def features(self, backbone: str, part: str | int, at: list[int], n: int, compute) -> None:
        """A backbone's features of the test images (`part` "test") or of fold k's held-out rows (`part` k), `n`
        rows, for the views `at` (positions in the view names): `compute(sink)` runs the backbone (PolicyFeatures)
        and each batch is written into the file as it comes (memory: one batch, whatever the image count)."""
        path = self.run.infer_features(backbone, part)
        path.parent.mkdir(parents=True, exist_ok=True)

        def batches(sink) -> None:
            def each(positions: list[int], start: int, feats: list) -> None:
                for pos, f in zip(positions, feats):
                    sink(pos, start, f.float().cpu().numpy())
            compute(each)
        entry = write_features(path, self.dtype, len(at), n, batches, f"stage 4: {backbone} on {part}")
        known = self.manifest["backbones"].setdefault(backbone, {"views": list(at)})
        if known["views"] != list(at):
            raise PipelineError(f"stage 4: backbone {backbone} predicted views {at} and {known['views']}")
        known.setdefault("files", {})[str(part)] = entry

    def add(self, part: str, head: str, backbone: str, ref: dict, weight: float = 1.0, fold: int | None = None):
        """A head's entry: its logits are `backbone`'s features x `ref`'s head, with `weight` in the test mean (a
        held-out fold's: in the mean of the fold's entries, recorded where it is not 1: the mix head's parts)."""
        entry = {"features": backbone, "head": ref, **({"weight": weight} if part == "test" else {"fold": fold})}
        if part != "test" and weight != 1.0:
            entry["weight"] = weight
        self.manifest[part].setdefault(head, []).append(entry)

    def alias(self, head: str, src: str) -> None:
        """Head's test predictions are src's (the `best` head: the variant best on all folds)."""
        self.manifest["test"][head] = list(self.manifest["test"][src])

    def table(self, head: str, part: str) -> LogitTable:
        if self.files is None:
            self.files = StoredFiles(self.run)  # heads opened once for every report and search
        return LogitTable(self.manifest, head, part, self.rows[part], self.files)


def joint_ref(run: layout.RunDir, weights: Path, model) -> dict:
    """The manifest's reference to a model's own classifier: its weight and bias tensors in `weights` (checked to
    be what the model holds)."""
    names = {id(p): n for n, p in model.named_parameters()}
    clf = model.get_classifier()
    ref = head_ref(run, weights, [names[id(clf.weight)], names[id(clf.bias)]])
    got = StoredFiles(run).head(ref["file"], ref["keys"])
    if not np.array_equal(got.weight, joint_head(model).weight):
        raise PipelineError(f"{weights}: its classifier tensors {ref['keys']} are not the model's")
    return ref


def stage3_ref(job: Job, k: int, variant: str, nested: bool) -> dict:
    """The manifest's reference to fold k's stage-3 head `variant`; `nested` (held-out rows): with the head of
    each inner split when it was tuned (a row is scored by the head chosen without it, as stage 3 scored it)."""
    fd = job.run.unit(k)
    if not nested or k == FULL_FIT or not read_json(fd.rebalance_summary)["variants"][variant].get("tuned"):
        return head_ref(job.run, fd.head(variant))
    if "inner" not in read_npz(fd.head_oof(variant), keys=("inner",)):
        raise PipelineError(f"{fd.head_oof(variant)} has no inner splits (made by an older version): re-run "
                            f"./run.sh rebalance --force")
    return head_ref(job.run, fd.head(variant), inner=fd.inner_heads(variant), split=fd.head_oof(variant))


@dataclass
class Pass:
    """What every model of stage 4 runs with: the device and autocast dtype, the loading, the image stores, the bar."""
    device: torch.device
    dtype: torch.dtype | None
    load: Loading
    test_store: object
    train_store: object | None
    bar: Progress | None = None


def backbone_of(job: Job, u: TtaModel) -> str:
    """The name a unit's backbone goes by in stage 4's store (fold<k>, full, fold<k>.fixres, full.fixres)."""
    return job.run.unit(u.k).name + (".fixres" if u.fixres else "")


def shared_test_passes(job: Job, n_classes: int, plan: list) -> dict[int, int]:
    """{i: j}: plan entry i's backbone is entry j's (an earlier one with the same views, every tensor but the
    classifier equal: with train.epochs=0 every fold's backbone is the pretrained one), so unit i's test heads are
    computed from unit j's test features instead of running the same backbone over the test images again (#47).
    FixRes units are tuned per unit and never shared."""
    skip = None
    seen, out = {}, {}
    for i, (u, sel) in enumerate(plan):
        if u.fixres:
            continue
        if skip is None:
            model = models.create_model(job.model, n_classes, pretrained=False)
            names = {id(p): n for n, p in model.named_parameters()}
            skip = {names[id(p)] for p in model.get_classifier().parameters()}
        key = (backbone_digest(models.read_state_dict(job.run.unit(u.k).weights), skip), tuple(sel))
        if key in seen:
            out[i] = seen[key]
        else:
            seen[key] = i
    return out


def backbone_digest(sd: dict, skip: set[str]) -> str:
    """sha256 of a state dict's tensors (names and bytes), those named in `skip` (the classifier) left out."""
    h = hashlib.sha256()
    for k in sorted(sd):
        if k not in skip:
            h.update(k.encode())
            h.update(sd[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_backbone(store: Store, backbone: str, part: str | int, at: list[int], p: Pass, model, norm, images,
                 views: list[str]) -> None:
    """One backbone over an image set (the test images, or fold k's held-out rows) for the views `at`: its pooled
    features streamed batch by batch into the store (memory: one batch, whatever the number of images)."""
    store.features(backbone, part, at, len(images),
                   lambda sink: PolicyFeatures(p.load, model, norm, images, views, p.device, p.dtype,
                                               on_batch=p.bar.update, sink=sink))


def _held_rows(inp: Inputs, k: int) -> np.ndarray:
    return np.flatnonzero(inp.oof_df["fold"].values == k) if inp.oof_df is not None else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------- the plan: backbones and head families
@dataclass
class Backbone:
    """One model stage 4 runs, and every head that reads its features: on the test images (`test`: head, the fold
    whose head file it is, variant, share of the test mean) and on fold k's held-out rows (`held[k]`: head, variant).
    `run_test`: it runs over the test images (else `test_from` names the identical backbone whose test features its
    test heads read, or it has no test heads)."""
    name: str
    family: Family
    views: list[int]
    run_test: bool
    test: list[tuple[str, int, str, float]]
    held: dict[int, list[tuple[str, str]]]
    unit: TtaModel | None = None  # the fine-tuned family's model (a trained unit)
    model: FamilyModel | None = None  # another family's model (families.FamilyModel: the pretrained one, WiSE-FT)
    test_from: str | None = None

    def images(self, n_test: int, n_held) -> int:
        """The view-images it predicts (the progress total is their sum: the plan it executes)."""
        return len(self.views) * (n_test * self.run_test + sum(n_held(k) for k in self.held))


def parts(head: str | None, k: int | None, mix: dict | None) -> list[tuple[str, float]]:
    """The stage-3 variants whose logits make a head, each with its factor in their weighted mean: the mix head's two
    parts and shares (chosen without fold k; k None: on all folds, for the test images), or the variant itself."""
    if head == MIX:
        return list(zip(mix["all"] if k is None else mix["per_fold"][k], mix_shares(mix, k)))
    return [] if head is None else [(head, 1.0)]


def test_parts(inp: Inputs, mix: dict | None, fam: Family, alpha: float | None = None) -> list[tuple[str, str, float]]:
    """(head, variant, factor) of the test images' heads that read a backbone of family `fam`."""
    out = [(h, h, 1.0) for h in inp.heads if h != MIX and fam.owns(h, alpha)]
    return out + ([(MIX, v, f) for v, f in parts(MIX, None, mix) if fam.owns(v, alpha)] if mix is not None else [])


def held_parts(inp: Inputs, best: dict | None, mix: dict | None, k: int, fam: Family,
               alpha: float | None = None) -> list[tuple[str, str, float]]:
    """(head, variant, factor) scoring fold k's held-out rows from a backbone of family `fam`: the family's heads, the
    mix head's part of it and `best`'s pick (both chosen without fold k) where it is the family's or is the mix."""
    out = [(h, h, 1.0) for h in inp.heads if h != MIX and fam.owns(h, alpha)]
    if mix is not None:
        out += [(MIX, v, f) for v, f in parts(MIX, k, mix) if fam.owns(v, alpha)]
    pick = best["per_fold"][k] if best is not None and k != FULL_FIT else None
    return out + [("best", v, f) for v, f in parts(pick, k, mix) if fam.owns(v, alpha)]


def plan(job: Job, inp: Inputs, names: list[str], best: dict | None, mix: dict | None) -> list[Backbone]:
    """Every backbone stage 4 runs, in order: each unit of the fine-tuned family (fold models, plain and FixRes-tuned,
    and the full-data model; a unit whose backbone equals an earlier one reads its test features), then the models
    each other family's entry declares (core/nets/families: the pretrained backbone of rebalance.probe, one model
    for every fold; each fold's WiSE-FT model per alpha of rebalance.wise_alpha), with the heads that read them."""
    folds = range(len(inp.summaries))
    has_rows = (lambda k: bool((inp.oof_df["fold"].values == k).any())) if inp.oof_df is not None else (lambda k: False)
    units_ = [(u, [i for i, n in enumerate(names) if parse_view(n)[2] == u.fixres]) for u in units(job, inp)]
    reuse = shared_test_passes(job, len(inp.classes), units_)
    out = []
    for i, (u, sel) in enumerate(units_):
        test = [(h, u.k, v, u.weight * f) for h, v, f in test_parts(inp, mix, FINE_TUNED)]
        held = {u.k: held_parts(inp, best, mix, u.k, FINE_TUNED)} if u.k != FULL_FIT and has_rows(u.k) else {}
        out.append(Backbone(backbone_of(job, u), FINE_TUNED, sel, i not in reuse, test, held, unit=u,
                            test_from=backbone_of(job, units_[reuse[i]][0]) if i in reuse else None))
    every = list(range(len(names)))
    picks = lambda k: inp.heads + ([best["per_fold"][k]] if best is not None else [])  # noqa: E731
    for fam in FAMILIES:  # the families on other backbones (probe, WiSE-FT, ...): each entry says which models
        for m in fam.backbones(list(folds), picks, lambda k: job.run.fold(k).name) if fam.backbones else []:
            test = [(h, k, v, f) for k in m.folds for h, v, f in test_parts(inp, mix, fam, m.alpha)]
            held = {k: held_parts(inp, best, mix, k, fam, m.alpha) for k in m.folds if has_rows(k)}
            held = {k: v for k, v in held.items() if v}
            if test or held:
                out.append(Backbone(m.name, fam, every, bool(test), test, held, model=m))
    return out


def predict_all(job: Job, inp: Inputs, names: list[str], best: dict | None, store: Store, mix: dict | None = None) -> int:
    """Every backbone of the plan on the test images and on the held-out rows of the folds whose heads it serves: its
    pooled features per view into `store` (each backbone runs once per image set), with every head that reads them
    (the nested `best` head: fold k's rows from the variant chosen without fold k; the mix head: its two parts).
    Returns the number of view-images predicted."""
    device = pick_device(job.device, Dist())
    p = Pass(device, amp_dtype(job.train.amp, device), Loading.of(job.px, job.infer, job.train, device),
             open_store(job.px, inp.test["path"]),
             open_store(job.px, inp.oof_df["path"]) if inp.oof_df is not None else None)
    backbones = plan(job, inp, names, best, mix)
    n_held = lambda k: len(_held_rows(inp, k))  # noqa: E731
    n_images = sum(b.images(len(inp.test), n_held) for b in backbones)
    p.bar = Progress(n_images, f"stage 4 of {job.experiment}", "view-img")
    for b in backbones:
        predict_backbone(job, inp, b, names, store, p)
        if b.unit is not None:
            u = b.unit
            fault_point(f"infer:after-fold:{u.k if u.k != FULL_FIT else 'full'}{':fixres' if u.fixres else ''}")
    p.bar.close()
    return n_images


def open_backbone(job: Job, inp: Inputs, b: Backbone, p: Pass):
    """The model of a backbone, its input normalisation and (fine-tuned family) the reference to its own classifier.
    Another family's model is made by its entry from fold k's weights (normalised as fold k's inputs) or, without a
    fold, from the pretrained weights (normalised as they were trained)."""
    C = len(inp.classes)
    if b.model is not None:
        m = b.model
        weights = job.run.fold(m.k).weights if m.k is not None else None
        model = prepare_model(job.train, b.family.model(job.model, weights, C, m.alpha), p.device).eval()
        stats = (inp.summaries[m.k]["mean"], inp.summaries[m.k]["std"]) if m.k is not None else \
            models.norm_stats(job.model, model)
        return model, models.Normalize(*stats).to(p.device), None
    u = b.unit
    fd = job.run.unit(u.k)
    model = (fixres_weights(job, inp, u, p.device, p.dtype) if u.fixres
             else FINE_TUNED.model(job.model, fd.weights, C)).to(p.device)
    prepare_model(job.train, model, p.device)
    norm = models.Normalize(u.stage2["mean"], u.stage2["std"]).to(p.device)
    return model, norm, joint_ref(job.run, job.run.fixres(fd.name) if u.fixres else fd.weights, model)


def predict_backbone(job: Job, inp: Inputs, b: Backbone, names: list[str], store: Store, p: Pass) -> None:
    """One backbone over the test images (unless it reads an identical one's) and over each fold's held-out rows it
    serves, every head that reads it entered in the store's manifest."""
    model, norm, joint = open_backbone(job, inp, b, p)
    views = [names[i] for i in b.views]

    def ref(k: int, variant: str, nested: bool) -> dict:
        return joint if variant == "joint" and joint is not None else stage3_ref(job, k, variant, nested and b.family.nested)
    if b.run_test:
        run_backbone(store, b.name, "test", b.views, p, model, norm, p.test_store, views)
    for h, k, v, weight in b.test:
        store.add("test", h, b.test_from or b.name, ref(k, v, False), weight)
    for k, heads in b.held.items():
        run_backbone(store, b.name, k, b.views, p, model, norm, p.train_store.subset(_held_rows(inp, k)), views)
        for h, v, weight in heads:
            store.add("oof", h, b.name, ref(k, v, True), weight, fold=k)
    if b.unit is None:
        variants = {v for _, _, v, _ in b.test} | {v for hv in b.held.values() for _, v, _ in hv}
        log.info("%s (%s heads %s): TTA views done", b.name, b.family.name, sorted(variants))
    else:
        log.info("%s: TTA inference done (%d view(s))", b.unit.name, len(views))


# ----------------------------------------------------------------------------- entry
def run(cfg: Config, force: bool = False) -> dict:
    inp, job = load_inputs(cfg), Job.of(cfg)
    if not force and inp.units.current("infer"):
        damaged = damaged_outputs(cfg.run_dir)
        if not damaged:
            log.info("infer of '%s' is up to date, skipped (--force redoes it)", cfg.experiment)
            return read_json(cfg.run_dir.infer_summary)
        log.warning("infer of '%s' is re-run: %s", cfg.experiment, "; ".join(damaged))
    names = tta_names(cfg.infer)
    with experiment_lock(cfg.run_dir.infer):
        store = start_store(job, inp, names)
        mix = mix_choice(job, inp) if MIX in inp.heads else None
        best = best_choice(job, inp, mix) if "best" in cfg.infer.heads else None
        heads = (["best"] if best else []) + inp.heads
        t0 = time.perf_counter()
        n_images = predict_all(job, inp, names, best, store, mix)
        seconds = time.perf_counter() - t0
        if best is not None:  # the test images: the variant best on all folds
            store.alias("best", best["all"])
        policy = default_policy(cfg.infer, names)
        report, searched, fold_policies, scores = [], False, None, {}
        if inp.oof_df is not None and cfg.infer.search:  # test images: chosen on every OOF row; fold k's rows: on
            policy, fold_policies = search_policies(job, inp, store.table(heads[0], "oof"), names)  # the others'
            searched = True
        if inp.oof_df is not None:
            for h in heads:  # logits computed from the stored features in blocks of rows
                report += tta_report(job, inp, h, store.table(h, "oof"), names, policy, fold_policies, scores)
            write_npz(cfg.run_dir.infer_scores, **scores)
            store.manifest["scores_sha256"] = sha256_file(cfg.run_dir.infer_scores, fresh=True)
        report = pd.DataFrame(report)
        if not report.empty:
            write_csv(cfg.run_dir.infer_report, report)
        summary = {"experiment": cfg.experiment, "heads": heads, "primary": heads[0], "best": best,
                   **({"mix": mix} if mix is not None else {}), "policy": policy,
                   "fold_policies": fold_policies, "searched": searched, "merge": cfg.infer.merge, "classes": inp.classes,
                   "folds_file": sha256_file(cfg.folds_csv) if cfg.folds_csv.exists() else None,
                   "metric": cfg.eval.scorer, "cv": report.to_dict(orient="records"),
                   "images_per_s": n_images / seconds, "seconds": seconds, "made_from": inp.made_from,
                   "full_fit_weight": cfg.infer.full_fit_weight if inp.full is not None else 0.0,
                   "fixres_files": {fd.name: sha256_file(cfg.run_dir.fixres(fd.name)) for fd in
                                    (cfg.run_dir.unit(u.k) for u in units(job, inp) if u.fixres)},
                   "store": store.manifest,
                   "env": environment()}
        keep_image_snapshots(inp.made_from)
        write_json(cfg.run_dir.infer_summary, summary)
    if not report.empty:
        pol = report[(report["head"] == heads[0]) & (report["views"] == "policy")]
        tracking.report(job.tracking, "infer", report, {"policy": " ".join(policy), "cv_policy": float(pol["cv_mean"].iloc[0])})
        log.info("experiment %s, stage 4 CV (%s) by TTA views:\n%s", cfg.experiment, cfg.eval.scorer,
                 report.to_string(index=False, float_format="%.4f"))
    log.info("TTA policy %s, %.0f view-images/s", policy, summary["images_per_s"])
    return summary


def best_choice(job: Job, inp: Inputs, mix: dict | None = None) -> dict:
    """infer.heads: [best] as a head of its own, nested like every other choice: fold k's held-out rows are scored
    by the variant with the best stage-3 CV on the other folds (their cross-fitted per-fold scores), the test
    images by the variant best on all folds (stage 3's winner). With `mix` (mix_choice) the mix head is one more
    candidate, scored on the same folds with the parts chosen on them."""
    folds = [read_json(job.run.fold(k).rebalance_summary)["variants"] for k in range(len(inp.summaries))]
    variants = [h for h in inp.heads if all(h in f for f in folds)]
    every = list(range(len(folds)))
    choice = {"all": read_json(job.run.rebalance_summary)["best"],
              "per_fold": [_winner(job, folds, variants, [j for j in every if j != k]) for k in every]}
    if mix is not None:  # the mix wins only where it is strictly better (ties: the single head)
        if better(mix["scores"]["all"], _mean_score(folds, choice["all"], every), job.eval.scorer):
            choice["all"] = MIX
        for k in every:
            others = [j for j in every if j != k]
            if better(mix["scores"]["per_fold"][k], _mean_score(folds, choice["per_fold"][k], others), job.eval.scorer):
                choice["per_fold"][k] = MIX
    log.info("best head: %s for the test images (all folds), per fold (chosen without it) %s", choice["all"],
             choice["per_fold"])
    return choice


def _mean_score(folds: list[dict], v: str, ks: list[int]) -> float:
    """Variant v's mean stage-3 score over folds ks (each fold's cross-fitted score on its held-out rows)."""
    return float(np.mean([folds[k][v]["metrics"]["score"] for k in ks]))


def _winner(job: Job, folds: list[dict], candidates: list[str], ks: list[int]) -> str:
    """The candidate with the best mean stage-3 score over folds ks; ties: the earlier (stage 3's report order)."""
    pick = max if GREATER_IS_BETTER[job.eval.scorer] else min
    return pick(candidates, key=lambda v: (_mean_score(folds, v, ks),
                                           -candidates.index(v) if pick is max else candidates.index(v)))


def mix_choice(job: Job, inp: Inputs) -> dict:
    """The mix head (infer.mix): the weighted mean of the logits of a fine-tuned variant (on the fold's backbone) and
    a probe variant (on the pretrained one), a two-model ensemble inside the experiment. Each part is the variant of
    its family with the best stage-3 CV on the folds it is chosen on, and the fine-tuned share w (of
    infer.mix_weights; ties: the one nearest 0.5, then the smaller) the one whose mix scores best there: for fold k's
    held-out rows the other folds, for the test images all folds (so no held-out row helps choose what scores it).
    `scores`: the mix's stage-3-like CV on those same folds (the held-out rows stage 3 scored, no TTA), which the best
    head compares with the variants'."""
    folds = [read_json(job.run.fold(k).rebalance_summary)["variants"] for k in range(len(inp.summaries))]
    table = [r["variant"] for r in read_json(job.run.rebalance_summary)["table"]]  # best first: the order of ties
    fine, probe = mix_candidates([v for v in table if all(v in f for f in folds)])
    gib, logits = GREATER_IS_BETTER[job.eval.scorer], {}

    def held(k: int, v: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if (k, v) not in logits:
            o = HeldOut.of(job.run, k, v).read()
            logits[(k, v)] = (o["ids"], o["y"], o["logits"])
        return logits[(k, v)]

    def score(ks: list[int]) -> tuple[list[str], float, float]:
        a, b = _winner(job, folds, fine, ks), _winner(job, folds, probe, ks)
        for k in ks:
            if list(held(k, a)[0]) != list(held(k, b)[0]):
                raise PipelineError(f"fold {k}: stage 3's held-out rows of {a} and {b} differ: re-run ./run.sh "
                                    f"rebalance --force")

        def cv(w: float) -> float:  # the arithmetic of LogitTable's held-out rows (w = 0.5: the plain mean)
            fa, fb = mix_factors(w)
            per = []
            for k in ks:
                _, y, la = held(k, a)
                mixed = (fa * la.astype(np.float64) + fb * held(k, b)[2].astype(np.float64)) / (fa + fb)
                per.append(score_rows(job.eval.scorer, y, row_scores(y, logits=mixed)))
            return float(np.mean(per))
        scored = [(w, cv(w)) for w in job.infer.mix_weights]
        w, best = max(scored, key=lambda x: ((x[1] if gib else -x[1]), -abs(x[0] - 0.5), -x[0]))
        return [a, b], w, best

    every = list(range(len(folds)))
    all_, per_fold = score(every), [score([j for j in every if j != k]) for k in every]
    out = {"all": all_[0], "per_fold": [p for p, _, _ in per_fold],
           "weights": {"all": all_[1], "per_fold": [w for _, w, _ in per_fold]},
           "scores": {"all": all_[2], "per_fold": [v for _, _, v in per_fold]}}
    log.info("mix head: %s + %s (fine-tuned share %s) for the test images, per fold (chosen without it) %s, shares "
             "%s; stage-3 CV %.4f", *all_[0], all_[1], out["per_fold"], out["weights"]["per_fold"], all_[2])
    return out


def tta_report(job: Job, inp: Inputs, h: str, logits: LogitTable, names: list[str], policy: list[str],
               fold_policies: list[list[str]] | None, scores: dict) -> list[dict]:
    """CV of head h without TTA, with each view alone and with the policy (all on OOF). A searched policy is
    scored nested (fold k's rows with the views chosen on the other folds); the policy chosen on every row is
    shown too, labelled as optimistic (it was chosen on the rows it is scored on). The per-row scores without TTA
    and with the (nested) policy go into `scores` (infer/scores.npz: what the reports read)."""
    rows = []
    selections = [("no TTA", [BASELINE])] + [(f"{n} alone", [n]) for n in names] + [("policy", policy)]
    fold, y = inp.oof_df["fold"].values, inp.oof_df["y"].values
    every = policies_rows(logits, names, [sel for _, sel in selections], job.infer.merge, y)  # one pass
    for (label, sel), rs in zip(selections, every):
        if label == "policy" and fold_policies is not None:
            nested = RowScores.concat([row_scores(y[a:a + len(b)], b) for a, b in
                                       nested_policy_blocks(logits, names, fold_policies, fold, job.infer.merge)])
            rows.append({"head": h, "views": label, **cv_of(job, inp.oof_df, inp.summaries, nested)})
            scores.update(score_arrays(h, "policy", nested))
            label = SELECTED_ON_ALL  # the policy chosen on every row, scored on them (rs)
        rows.append({"head": h, "views": label, **cv_of(job, inp.oof_df, inp.summaries, rs)})
        if label in ("no TTA", "policy"):
            scores.update(score_arrays(h, "plain" if label == "no TTA" else "policy", rs))
    return rows


def score_arrays(head: str, form: str, rs: RowScores) -> dict[str, np.ndarray]:
    """infer/scores.npz's arrays of one head's per-row scores (`form`: plain, policy): stored.Stage4.scores reads
    them."""
    return {f"{head}__{form}__{k}": v for k, v in rs.arrays().items()}


SELECTED_ON_ALL = "policy chosen on all OOF rows (optimistic: not ranked)"


def start_store(job: Job, inp: Inputs, names: list[str]) -> Store:
    """Stage 4 starts: the summary of a previous run goes first (its manifest names the files about to be
    replaced, so no reader mixes old and new), then the features of every backbone (and the per-head logit files
    of stage-4 outputs made before #35); the rows predicted are written."""
    run = job.run
    run.infer_summary.unlink(missing_ok=True)
    run.infer_scores.unlink(missing_ok=True)
    for old in [run.infer_features_dir, *run.infer_legacy()]:
        shutil.rmtree(old, ignore_errors=True)
    classes = np.array([str(c) for c in inp.classes])
    rows = {"test": {"ids": inp.test["id"].values, "classes": classes}}
    arrays = {"test_ids": rows["test"]["ids"], "classes": classes}
    if inp.oof_df is not None:
        rows["oof"] = {"ids": inp.oof_df["id"].values, "y": inp.oof_df["y"].values,
                       "fold": inp.oof_df["fold"].values, "classes": classes}
        arrays.update(oof_ids=rows["oof"]["ids"], oof_y=rows["oof"]["y"], oof_fold=rows["oof"]["fold"])
    write_npz(run.infer_rows, **arrays)
    store = Store(run, names, job.infer.features, rows)
    store.manifest["rows_sha256"] = sha256_file(run.infer_rows, fresh=True)
    return store


def cv_of(job: Job, df: pd.DataFrame, summaries: list[dict], rows: RowScores) -> dict:
    """CV of OOF predictions' per-row scores (one report.csv row: per-fold values left out)."""
    e = job.eval
    m = cv(df["y"].values, None, df["fold"].values, [s["train_counts"] for s in summaries], e.many_shot,
           e.few_shot, e.scorer, rows=rows)
    m.pop("per_fold")
    return m


def search_policies(job: Job, inp: Inputs, logits: np.ndarray, names: list[str]) -> tuple[list[str], list]:
    """infer.search: the policy chosen on every OOF row (for the test images) and, for each fold k, the one chosen
    on the other folds' rows (for fold k's rows, so their CV took no part in the choice)."""
    folds, seen = list(range(len(inp.summaries))), {}  # seen: a policy's per-row scores, for every search
    policy = greedy_policy(job, inp.oof_df, logits, names, folds, seen)
    per_fold = [greedy_policy(job, inp.oof_df, logits, names, [f for f in folds if f != k], seen)
                for k in folds]
    log.info("TTA search per fold (fold k's rows get the views chosen without them): %s", per_fold)
    return policy, per_fold


def greedy_policy(job: Job, df, logits: np.ndarray, names: list[str], folds: list[int],
                  seen: dict | None = None) -> list[str]:
    """Forward selection of views on the OOF rows of `folds`: start from the baseline view, add the view that
    helps most (the mean of those folds' metric), stop when none helps. Each step's candidates are scored in one
    pass over the rows; `seen` keeps every policy's per-row scores (on all OOF rows) for the next search."""
    gib = GREATER_IS_BETTER[job.eval.scorer]
    y, fold = df["y"].values, df["fold"].values
    seen = {} if seen is None else seen

    def values(sels: list[list[str]]) -> list[float]:  # the CV of those folds: the mean of their metric
        todo = [s for s in sels if tuple(s) not in seen]
        seen.update(zip(map(tuple, todo), policies_rows(logits, names, todo, job.infer.merge, y) if todo else []))
        return [float(np.mean([score_rows(job.eval.scorer, y[fold == k], seen[tuple(s)].take(fold == k))
                               for k in folds])) for s in sels]

    chosen = [BASELINE]
    best = values([chosen])[0]
    while True:
        rest = [n for n in names if n not in chosen]
        trials = dict(zip(rest, values([chosen + [n] for n in rest])))
        if not trials:
            break
        n, v = (max if gib else min)(trials.items(), key=lambda kv: kv[1])
        if not ((v > best) if gib else (v < best)):
            break
        chosen.append(n)
        best = v
    log.info("TTA search on the OOF rows of folds %s chose %s (%s %.4f)", folds, chosen, job.eval.scorer, best)
    return chosen
