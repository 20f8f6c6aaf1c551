"""Experiment config: every default in one place, loaded from YAML with `base:` inheritance.

A config file is an experiment sheet. It may name a `base:` file (relative to itself) whose values
it extends; `key=value` overrides from the command line come last (`train.epochs=3`; values are
parsed as YAML). Unknown keys, wrong types and out-of-range values are errors naming the key and
the file that set it: a typo is never ignored.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from . import layout
from .errors import PipelineError


# ----------------------------------------------------------------------------- sections
@dataclass
class DataCfg:
    root: str = "data/demo"  # competition folder; the paths below are relative to it
    layout: Literal["csv", "folders"] = "csv"  # csv: train.csv + image folder; folders: train/<class>/*
    train_csv: str = "train.csv"  # the id/label table (layout csv)
    train_dir: str = "train"  # train images (layout csv) or class folders (layout folders)
    test_dir: str = "test"  # test images, flat
    sample_submission: Optional[str] = "sample_submission.csv"  # fixes test ids, order and columns; null: use test_dir
    id_col: str = "image_id"  # image id column; an id is a path relative to train_dir
    label_col: str = "label"  # label column; strings or integers
    group_col: Optional[str] = None  # rows sharing a group never straddle folds (patient, site, individual)
    image_ext: str = ""  # appended to ids that lack it, e.g. ".jpg" when train.csv ids have no extension
    check_images: Literal["none", "header", "full"] = "header"  # header: open each file; full: decode it
    hash_images: bool = False  # records hold each image's sha256 (else size + mtime): for copies that keep mtimes
    test_labels: Optional[str] = None  # private test labels (the demo's): score the submission like a leaderboard
    demo: bool = False  # build the digits demo competition into `root` if it is missing
    holdout_from: Optional[str] = None  # a folder-per-class photo set: build `root` from it once, a stratified
    # holdout_frac of every class becoming the test set (labels kept in <root>-private/test_labels.csv)
    holdout_frac: float = 0.2  # share of each class held out as the private test (holdout_from)


@dataclass
class FoldsCfg:
    n_splits: int = 5  # K of stratified K-fold
    seed: int = 42  # shuffling seed; with the same data it gives a byte-identical folds file
    name: str = ""  # folds/<name>.csv; empty: <data folder>_k<K>_s<seed>
    rare_classes: Literal["error", "allow"] = "error"  # a class with fewer images than folds: refuse, or
    # allow it (it is missing from the validation of some folds, so those folds cannot score it)


@dataclass
class ModelCfg:
    arch: str = "resnet10t"  # any timm model name
    pretrained: bool = False  # load timm hub weights (needs internet)
    pretrained_path: Optional[str] = None  # local .safetensors/.pth weights, for offline machines and kernels
    # (`./run.sh weights import` converts another naming; its <file>.json gives mean/std/crop_pct)
    head_init_scale: Optional[float] = None  # the new classifier's initial weights and bias x this (timm train.py
    # --head-init-scale); a small head keeps short fine-tunes from wrecking pretrained features; null: timm's init
    head_init_bias: Optional[float] = None  # the new classifier's initial bias (timm --head-init-bias); null: timm's
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth
    pool: Literal["avg", "gem", "attn"] = "avg"  # gem: generalised mean pooling; attn: timm's attention pooling
    gem_p: float = 3.0  # GeM initial exponent (learned); p=1 is average pooling
    mean: Optional[list[float]] = None  # input normalisation; null: from the model's pretrained config
    std: Optional[list[float]] = None


@dataclass
class AugCfg:
    img_size: int = 224  # training and validation crop side, pixels
    policy: str = ""  # timm AutoAugment / RandAugment / AugMix spec, e.g. rand-m9-mstd0.5-inc1, original, augmix-m5-w4-d2, trivial
    size_schedule: list[list[int]] = field(default_factory=list)  # progressive resizing: [[epoch, side], ...] from epoch 0
    crop: Literal["rrc", "resize_crop"] = "rrc"  # rrc: RandomResizedCrop; resize_crop: resize then random crop
    rrc_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])  # RandomResizedCrop area range
    resize: Literal["keep_ratio", "squash"] = "keep_ratio"  # keep_ratio: as timm; squash: every image to a square first
    crop_pct: Optional[float] = None  # validation/TTA: shorter side to img_size/crop_pct, centre crop; null: the model's (timm)
    hflip: float = 0.5  # probability
    vflip: float = 0.0  # probability; for images with no "up" (leaves, microscopy)
    rotate: float = 15.0  # shift-scale-rotate: max rotation, degrees (0 disables the transform)
    shift_scale_p: float = 0.5  # shift-scale-rotate probability
    color_jitter: float = 0.2  # brightness/contrast/saturation strength (0 disables)
    coarse_dropout: float = 0.0  # probability of cutting up to 8 holes of <=1/8 of the side
    store_side: Optional[int] = None  # shorter side of the stored copies; null: 1.5 x the largest side read, /64
    cache: Literal["auto", "on", "off"] = "auto"  # keep the stored copies on disk (one per image set); auto: if it fits
    cache_dir: str = str(layout.CACHE)  # where the image caches live (shared by experiments)
    cache_max_gb: Optional[float] = None  # after a build, least recently used caches go until all fit; null: no bound


@dataclass
class PseudoCfg:
    teacher: str = ""  # an ensemble (submissions/<name>.json) or experiment whose test predictions label test images; "": off
    threshold: float = 0.9  # a test image joins when the teacher's top probability reaches this
    soft: bool = True  # targets: the teacher's probabilities (true) or its top class (false)
    weight: float = 0.5  # loss weight of a pseudo-labelled image against a labelled one


@dataclass
class DistillCfg:
    teacher: str = ""  # an ensemble or experiment whose predictions are soft targets (knowledge distillation); "": off
    alpha: float = 0.5  # loss = (1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher_T || student_T)
    temperature: float = 4.0  # T: softens both distributions
    leaky_oof: bool = False  # LEAKY shortcut: train rows' targets are the teacher's OOF probabilities (see README)


@dataclass
class TrainCfg:
    epochs: int = 10
    batch_size: int = 64  # images per optimiser step per process, before accumulation
    accum_steps: int = 1  # gradient accumulation: effective batch = batch_size * accum_steps * processes
    optimizer: str = "adamw"  # any timm optimizer name (adamw, sgd, lamb, ...)
    lr: float = 1e-3  # peak learning rate of the head, per effective batch (no automatic scaling)
    backbone_lr_mult: float = 1.0  # backbone lr = lr * this; <1 protects pretrained features
    layer_decay: Optional[float] = None  # layer-wise lr decay (timm's param_groups_layer_decay), e.g. 0.75; null: off
    freeze_epochs: int = 0  # head warm-up: the first N epochs train the classifier only
    freeze_bn: bool = False  # during those epochs also keep the backbone's BatchNorm statistics fixed
    freeze_backbone: bool = False  # linear probe: only the classifier (and pooling) ever trains; BN statistics fixed
    trainable_stages: Optional[int] = None  # partial fine-tuning: the last N stages (timm's coarse groups) + head train
    patience: Optional[int] = None  # early stopping: end the fold after N epochs without a better metric; null: off
    full_fit: bool = False  # after the folds, one more model on every row for the epoch count the folds chose (no CV)
    pseudo: PseudoCfg = field(default_factory=PseudoCfg)  # pseudo-labels; fold k's from the teacher's fold-k models
    distill: DistillCfg = field(default_factory=DistillCfg)  # distillation; fold k's targets from teacher fold k
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # any timm scheduler name (cosine, step, plateau, ...)
    warmup_epochs: float = 1.0  # linear warmup, epochs (fractions allowed; stepped per iteration)
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    clip_grad: Optional[float] = None  # max gradient norm; null: no clipping
    sampler: Literal["instance", "class_balanced", "sqrt", "progressive"] = "instance"
    loss: Literal["ce", "focal", "ldam"] = "ce"  # ldam: Cao et al. 2019, class margins C / n_c^(1/4)
    focal_gamma: float = 2.0
    ldam_max_margin: float = 0.5  # the rarest class's margin (in logit units before ldam_scale)
    ldam_scale: float = 1.0  # s: logits x s (the paper's 30 goes with a cosine classifier; ours is linear)
    class_weights: Literal["none", "effective_number"] = "none"  # Cui et al. 2019 class-balanced loss
    cb_beta: float = 0.999  # effective-number beta
    drw_epoch: Optional[int] = None  # deferred re-weighting: effective-number class weights from this epoch (0-based) on
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # 0 disables mixup
    cutmix_alpha: float = 0.0  # 0 disables cutmix
    mix_prob: float = 1.0  # probability of mixing a batch
    mix_switch_prob: float = 0.5  # probability of cutmix when both are on
    mix_mode: Literal["batch", "pair", "elem"] = "batch"
    mix_off_epoch: Optional[int] = None  # stop mixing from this epoch on (0-based); null: never
    ema: bool = True  # keep an EMA of weights next to the raw ones; the better is used downstream
    ema_decay: float = 0.998  # per optimiser step
    ema_warmup: bool = True  # decay ramps up from 0 (timm's warmup): short or from-scratch runs need it
    select: Literal["best", "last"] = "best"  # which epoch's weights to keep: best valid metric or the last
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # autocast, CPU and GPU; auto: GPU bf16 (fp16 where unsupported), CPU fp32
    channels_last: Literal["auto", "on", "off"] = "auto"  # NHWC memory format, CPU and GPU; auto: GPU on, CPU off
    compile: bool = False  # torch.compile the model (CPU: needs a C++ compiler; GPU: Triton)
    tf32: bool = True  # GPU: TF32 matmuls/convolutions in fp32 layers (Ampere and later); no effect on CPU
    workers: Optional[int] = None  # DataLoader workers; null: min(8, cpu count - 1)
    deterministic: Literal["auto", "on", "off"] = "auto"  # auto: bit-identical on CPU, cudnn.benchmark on GPU; on: deterministic cuDNN
    tracker: Literal["none", "mlflow", "tensorboard", "wandb"] = "none"  # also log there, when installed
    tracker_dir: Optional[str] = None  # MLflow file store / TensorBoard / W&B folder; null: runs/<exp>/tracking


@dataclass
class EvalCfg:
    metric: Literal["accuracy", "macro_f1", "balanced_accuracy", "log_loss", "qwk"] = "accuracy"  # the competition metric
    many_shot: int = 100  # classes with more training images than this are "many-shot"
    few_shot: int = 20  # fewer than this: "few-shot"; in between: "medium"


@dataclass
class RebalanceCfg:
    variants: list[str] = field(default_factory=lambda: ["joint", "crt", "tau", "lws", "ncm", "logit_adjust"])
    aug_views: int = 0  # extra augmented views of each training image for cRT/LWS features (0: centre crop only)
    crt_epochs: int = 30
    crt_lr: float = 0.01  # per batch of 256 features
    crt_weight_decay: float = 5e-4
    lws_epochs: int = 30
    lws_lr: float = 0.01
    tau: Optional[float] = None  # fixed tau; null: chosen by a sweep over tau_grid
    tau_grid: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(21)])
    la_grid: list[float] = field(default_factory=lambda: [round(0.25 * i, 2) for i in range(13)])
    inner_folds: int = 2  # tuned choices are made on one half of a held-out fold and scored on the other
    ncm_center: bool = True  # subtract the training feature mean before L2 normalisation (NCM and kNN)
    knn_k_grid: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20])  # knn: neighbours, chosen like tau
    knn_t_grid: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1])  # knn: vote temperature exp(cos / T)
    pca_dim: Optional[int] = None  # ncm_pca / knn_pca: PCA-whitened dimensions kept; null: every non-degenerate one


@dataclass
class FixResCfg:
    size: Optional[float] = None  # test crop = img_size x this, after fine-tuning BN + classifier there; null: off
    epochs: int = 1  # fine-tuning epochs over the fold's own training rows
    lr: Optional[float] = None  # fine-tuning peak lr (cosine to 0); null: train.lr / 10


@dataclass
class InferCfg:
    heads: list[str] = field(default_factory=lambda: ["best"])  # stage-3 variants to predict with; best: the CV winner
    views: list[str] = field(default_factory=lambda: ["orig", "hflip"])  # named TTA views, see pipeline/core/tta.py
    scales: list[float] = field(default_factory=lambda: [1.0])  # x img_size (FixRes: >1 often helps); each view at each scale
    merge: Literal["mean_prob", "mean_logit", "geo_mean"] = "mean_prob"
    search: bool = False  # choose the TTA policy greedily on OOF from views x scales; recorded
    oof: Literal["auto", "on", "off"] = "auto"  # TTA on held-out rows too; auto: when the train images exist
    full_fit_weight: float = 1.0  # the full-data model's share of the test mean, in fold models (0: not used)
    fixres: FixResCfg = field(default_factory=FixResCfg)  # Touvron et al. 2019: views at a larger size, BN + head tuned there
    batch_size: int = 128


@dataclass
class EnsembleCfg:
    name: str = ""  # submissions/<name>.csv; empty: the experiment name
    members: list[str] = field(default_factory=list)  # "experiment" or "experiment:head"; empty: this experiment
    method: Literal["mean", "weighted", "geo_mean", "rank", "hill_climb"] = "mean"  # hill_climb: Caruana et al. 2004
    weight_metric: Literal["log_loss", "metric"] = "log_loss"  # what weighted / hill_climb optimise on OOF
    hill_climb_steps: int = 100  # hill_climb: at most this many additions (with replacement) after the start
    submission: Literal["label", "proba"] = "label"  # one label column, or one probability column per class


@dataclass
class Config:
    experiment: str = "demo"  # run folder: runs/<experiment>/
    seed: int = 42  # training seed
    device: Literal["auto", "cpu", "cuda"] = "auto"
    run_also: list[str] = field(default_factory=list)  # other experiment configs `all` runs before the ensemble
    data: DataCfg = field(default_factory=DataCfg)
    folds: FoldsCfg = field(default_factory=FoldsCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    aug: AugCfg = field(default_factory=AugCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    rebalance: RebalanceCfg = field(default_factory=RebalanceCfg)
    infer: InferCfg = field(default_factory=InferCfg)
    ensemble: EnsembleCfg = field(default_factory=EnsembleCfg)
    # not config keys: where it came from
    source: str = field(default="", metadata={"internal": True})

    # ------------------------------------------------------------------ derived paths
    def data_path(self, rel: str) -> Path:
        return Path(self.data.root) / rel

    @property
    def folds_name(self) -> str:
        if self.folds.name:
            return self.folds.name
        group = f"_g-{self.data.group_col}" if self.data.group_col else ""
        return f"{Path(self.data.root).name}_k{self.folds.n_splits}_s{self.folds.seed}{group}"

    @property
    def folds_csv(self) -> Path:
        return layout.folds_csv(self.folds_name)

    @property
    def folds_record(self) -> Path:
        return layout.folds_record(self.folds_name)

    @property
    def run_dir(self) -> layout.RunDir:
        """runs/<experiment>/ and the files in it."""
        return layout.RunDir.of(self.experiment)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


# ----------------------------------------------------------------------------- validation
BIG = 2 ** 31 - 1
# Every number of the config with the smallest and largest values that make sense: (low, high, low
# included, high included). A list of numbers is checked element by element. tests/test_config.py
# fails when a numeric key has no entry here.
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "seed": (0, 2 ** 32 - 1, True, True),
    "folds.n_splits": (2, 100, True, True),
    "folds.seed": (0, 2 ** 32 - 1, True, True),
    "model.drop_rate": (0, 1, True, False),
    "model.drop_path_rate": (0, 1, True, False),
    "model.gem_p": (0, 100, False, True),
    "model.head_init_scale": (0, 100, True, True),
    "model.head_init_bias": (-100, 100, True, True),
    "data.holdout_frac": (0, 1, False, False),
    "model.mean": (0, 1, True, True),
    "model.std": (0, 10, False, True),
    "aug.img_size": (16, 4096, True, True),
    "aug.rrc_scale": (0, 1, False, True),
    "aug.crop_pct": (0.3, 1, True, True),
    "aug.hflip": (0, 1, True, True),
    "aug.vflip": (0, 1, True, True),
    "aug.rotate": (0, 180, True, True),
    "aug.shift_scale_p": (0, 1, True, True),
    "aug.color_jitter": (0, 1, True, True),
    "aug.coarse_dropout": (0, 1, True, True),
    "aug.store_side": (16, 16384, True, True),
    "aug.cache_max_gb": (0, 1e6, False, True),
    "train.epochs": (1, 100_000, True, True),
    "train.batch_size": (1, 65_536, True, True),
    "train.accum_steps": (1, 4096, True, True),
    "train.lr": (0, 10, False, True),
    "train.backbone_lr_mult": (0, 100, True, True),
    "train.layer_decay": (0, 1, False, True),
    "train.freeze_epochs": (0, 100_000, True, True),
    "train.trainable_stages": (0, 1000, True, True),
    "train.patience": (1, 100_000, True, True),
    "train.pseudo.threshold": (0, 1, True, True),
    "train.pseudo.weight": (0, 100, False, True),
    "train.distill.alpha": (0, 1, True, True),
    "train.distill.temperature": (0, 100, False, True),
    "train.weight_decay": (0, 10, True, True),
    "train.momentum": (0, 1, True, False),
    "train.warmup_epochs": (0, 100_000, True, True),
    "train.warmup_lr": (0, 10, True, True),
    "train.min_lr": (0, 10, True, True),
    "train.clip_grad": (0, 1e6, False, True),
    "train.focal_gamma": (0, 20, True, True),
    "train.cb_beta": (0, 1, False, False),
    "train.ldam_max_margin": (0, 10, False, True),
    "train.ldam_scale": (0, 100, False, True),
    "train.drw_epoch": (0, 100_000, True, True),
    "train.label_smoothing": (0, 1, True, False),
    "train.mixup_alpha": (0, 100, True, True),
    "train.cutmix_alpha": (0, 100, True, True),
    "train.mix_prob": (0, 1, True, True),
    "train.mix_switch_prob": (0, 1, True, True),
    "train.mix_off_epoch": (0, 100_000, True, True),
    "train.ema_decay": (0, 1, False, False),
    "train.workers": (0, 256, True, True),
    "eval.many_shot": (0, BIG, True, True),
    "eval.few_shot": (0, BIG, True, True),
    "rebalance.aug_views": (0, 100, True, True),
    "rebalance.crt_epochs": (1, 10_000, True, True),
    "rebalance.crt_lr": (0, 10, False, True),
    "rebalance.crt_weight_decay": (0, 10, True, True),
    "rebalance.lws_epochs": (1, 10_000, True, True),
    "rebalance.lws_lr": (0, 10, False, True),
    "rebalance.tau": (0, 5, True, True),
    "rebalance.tau_grid": (0, 5, True, True),
    "rebalance.la_grid": (0, 10, True, True),
    "rebalance.inner_folds": (2, 20, True, True),
    "rebalance.knn_k_grid": (1, 10_000, True, True),
    "rebalance.knn_t_grid": (0, 10, False, True),
    "rebalance.pca_dim": (1, 100_000, True, True),
    "infer.scales": (0.25, 4, True, True),
    "infer.batch_size": (1, 65_536, True, True),
    "infer.full_fit_weight": (0, 100, True, True),
    "ensemble.hill_climb_steps": (1, 100_000, True, True),
    "infer.fixres.size": (0.25, 4, True, True),
    "infer.fixres.epochs": (1, 1000, True, True),
    "infer.fixres.lr": (0, 10, False, True),
}


SCHEDULERS = ("cosine", "tanh", "step", "constant", "multistep", "plateau", "poly", "wsd", "rsqrt")  # timm's
COMMON_OPTIMIZERS = ("adamw", "adam", "sgd", "momentum", "nesterov", "lamb", "lion", "adan", "rmsprop", "nadam")


STRUCTURED = ("aug.size_schedule",)  # numeric keys whose shape needs its own check in _validate (pairs)


def _range_text(lo: float, hi: float, lo_in: bool, hi_in: bool) -> str:
    return f"{'>=' if lo_in else '>'} {lo:g} and {'<=' if hi_in else '<'} {hi:g}"


def _validate(cfg: Config, origin: dict[str, str]) -> None:
    def check(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise PipelineError(f"config key '{key}' (set in {origin.get(key, 'defaults')}): {why}")

    flat = flatten(cfg.to_dict())
    for key, (lo, hi, lo_in, hi_in) in RANGES.items():
        value = flat[key]
        for v in (value if isinstance(value, list) else [value]):
            if v is None:
                continue
            ok = (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
            check(ok, key, f"must be {_range_text(lo, hi, lo_in, hi_in)}, got {v!r}")
    for key in ("experiment", "folds.name", "ensemble.name", "train.pseudo.teacher", "train.distill.teacher"):
        if flat[key] or key == "experiment":
            layout.check_name(flat[key], f"config key '{key}' (set in {origin.get(key, 'defaults')}):")
    sched = cfg.aug.size_schedule
    check(not sched or (all(len(x) == 2 for x in sched) and sched[0][0] == 0
                        and all(a[0] < b[0] for a, b in zip(sched, sched[1:]))
                        and all(16 <= x[1] <= 4096 for x in sched)), "aug.size_schedule",
          "must be [[0, side], [epoch, side], ...]: epochs rising from 0, sides 16-4096 (e.g. [[0, 128], [6, 224]])")
    if cfg.aug.policy:
        from .policy import policy_transform  # timm parses its own specs

        try:
            policy_transform(cfg.aug.policy, cfg.aug.img_size)
        except ValueError as e:
            check(False, "aug.policy", f"{e} (examples: rand-m9-mstd0.5-inc1, original, v0, augmix-m5-w4-d2, trivial)")
    check(len(cfg.aug.rrc_scale) == 2 and cfg.aug.rrc_scale[0] <= cfg.aug.rrc_scale[1],
          "aug.rrc_scale", "must be [lo, hi] with 0 < lo <= hi <= 1")
    check(cfg.train.drw_epoch is None or cfg.train.class_weights == "none", "train.drw_epoch",
          "defers the class weights itself: set train.class_weights=none (weights from the start) or drop drw_epoch")
    check(cfg.train.drw_epoch is None or cfg.train.drw_epoch < cfg.train.epochs, "train.drw_epoch",
          f"must be < train.epochs ({cfg.train.epochs}), or re-weighting never starts")
    check(not (cfg.train.freeze_backbone and cfg.train.trainable_stages is not None), "train.trainable_stages",
          "and train.freeze_backbone both say what trains: set one (freeze_backbone is trainable_stages=0)")
    check(cfg.train.freeze_epochs < cfg.train.epochs, "train.freeze_epochs",
          f"must be < train.epochs ({cfg.train.epochs}): at least one epoch trains the backbone")
    check(cfg.train.min_lr <= cfg.train.lr, "train.min_lr", f"must be <= train.lr ({cfg.train.lr:g})")
    for key in ("pseudo", "distill"):
        check(getattr(cfg.train, key).teacher != cfg.experiment, f"train.{key}.teacher",
              "names this experiment itself: a teacher must be another experiment or an ensemble")
    check(cfg.eval.few_shot <= cfg.eval.many_shot, "eval.few_shot", "must be <= eval.many_shot")
    for k in ("mean", "std"):
        v = getattr(cfg.model, k)
        check(v is None or len(v) == 3, f"model.{k}", "must be 3 numbers (RGB) or null")
    from .heads import VARIANTS

    known = set(VARIANTS)
    bad = [v for v in cfg.rebalance.variants if v not in known]
    check(not bad, "rebalance.variants", f"unknown variant(s) {bad}; known: {sorted(known)}")
    check("joint" in cfg.rebalance.variants, "rebalance.variants", "must include 'joint' (the baseline)")
    check(cfg.train.scheduler in SCHEDULERS, "train.scheduler", f"one of timm's schedulers {list(SCHEDULERS)}")
    opt = cfg.train.optimizer.lower()
    if opt.removeprefix("lookahead_") not in COMMON_OPTIMIZERS:
        from timm.optim import list_optimizers  # only for a rarer name: config loading stays fast

        check(opt.removeprefix("lookahead_") in list_optimizers(), "train.optimizer",
              f"'{cfg.train.optimizer}' is not a timm optimizer (e.g. adamw, sgd, lamb, lion; "
              f"timm.optim.list_optimizers() lists them)")
    check(bool(cfg.rebalance.tau_grid), "rebalance.tau_grid", "must hold at least one value")
    check(bool(cfg.rebalance.la_grid), "rebalance.la_grid", "must hold at least one value")
    from .tta import VIEWS

    bad = [h for h in cfg.infer.heads if h != "best" and h not in known]
    check(bool(cfg.infer.heads) and not bad, "infer.heads", f"'best' or variants of {sorted(known)}; got {bad}")
    bad = [v for v in cfg.infer.views if v not in VIEWS]
    check(bool(cfg.infer.views) and not bad, "infer.views", f"unknown view(s) {bad}; known: {list(VIEWS)}")
    check(bool(cfg.infer.scales), "infer.scales", "must hold at least one scale")
    small = [s for s in cfg.infer.scales if round(cfg.aug.img_size * s) < 16]
    check(not small, "infer.scales", f"scale(s) {small} x aug.img_size {cfg.aug.img_size} give crops under 16 px")
    check(len(set(cfg.infer.scales)) == len(cfg.infer.scales), "infer.scales", "lists a scale twice")
    check(len(set(cfg.infer.views)) == len(cfg.infer.views), "infer.views", "lists a view twice")
    fx = cfg.infer.fixres.size
    check(fx is None or round(cfg.aug.img_size * fx) >= 16, "infer.fixres.size",
          f"{fx} x aug.img_size {cfg.aug.img_size} gives crops under 16 px")


# ----------------------------------------------------------------------------- loading
class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' on lines {seen[key]} and {line} (the second would silently "
                                f"replace the first; merge them into one block)", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; anything near this is not one


def _read_yaml(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise PipelineError(f"config file {path} is {path.stat().st_size / 1e6:.1f} MB: not a config file "
                                f"(they are a few KB; the limit is {MAX_CONFIG_BYTES >> 20} MB)")
        text = path.read_text()
    except FileNotFoundError:
        raise PipelineError(f"config file not found: {path}") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise PipelineError(f"cannot read config file {path}: {e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise PipelineError(f"malformed YAML in {path}: {e}") from None
    if data is None:
        raise PipelineError(f"config file {path} is empty (no keys): a truncated or wrong file? Write at least "
                            f"`experiment: <name>`")
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: a config file must be a mapping of keys, got {type(data).__name__}")
    return data


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (an empty section stays as its own key)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
            if not v:
                out[key] = v
        else:
            out[key] = v
    return out


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """Flat {dotted key: value} of a file and its bases, and which file set each key."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise PipelineError(f"config base cycle: {chain}")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if base is not None:
        if not isinstance(base, str):
            raise PipelineError(f"{path}: 'base' must be a file name")
        base_path = (path.parent / base)
        if not base_path.exists():
            raise PipelineError(f"{path}: base file not found: {base_path}")
        values, origin = _load_chain(base_path, (*seen, path))
    for k, v in flatten(raw).items():
        # a child that sets a section drops nothing of the base: keys merge one by one
        values[k] = v
        origin[k] = str(path)
    return values, origin


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise PipelineError(f"override '{item}' must look like key=value (e.g. train.epochs=3)")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


# The defaults of a fine-tune from pretrained weights (`model.pretrained` or `model.pretrained_path` set), for
# every key the config files and command line leave unset: the best combination measured by
# benchmarks/pretrained.py (EfficientNet-Lite0 ImageNet weights on flowers5, 2 folds x 2 epochs at 64 px,
# 2026-12-01; README "Pretrained fine-tuning on flowers5"). Keys not listed keep the defaults above, which
# measured best too: lr 1e-3 (CV 0.685; 3e-3: 0.659), no layer decay (0.9: 0.657), no head warm-up
# (freeze_epochs 1: 0.619; with freeze_bn: 0.634); mean/std and crop_pct come from the weights' record.
# From-scratch runs keep the dataclass defaults.
PRETRAINED_DEFAULTS: dict[str, Any] = {
    "model.head_init_scale": 0.01,  # timm's fan-out init gives a new 5-way head logits of several units (epoch-1
    # loss 4.9, CV 0.522 with a 1-epoch warm-up); x0.01 starts near uniform: CV 0.685
    "train.warmup_epochs": 0.3,  # short fine-tunes: a whole warm-up epoch of 2 spends half the run at low lr
}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path is not None:
        values, origin = _load_chain(Path(path))
    for item in overrides:
        k, v = _parse_override(item)
        values[k] = v
        origin[k] = "the command line"
    if values.get("model.pretrained") is True or values.get("model.pretrained_path"):
        for k, v in PRETRAINED_DEFAULTS.items():
            if k not in values:
                values[k] = v
                origin[k] = "the pretrained defaults (config.PRETRAINED_DEFAULTS)"
    cfg = Config()
    for key, value in values.items():
        _assign(cfg, key, value, origin[key])
    cfg.source = str(path) if path is not None else "defaults"
    _validate(cfg, origin)
    return cfg


RENAMED = {  # keys of earlier versions: what replaced them
    "aug.resize_ratio": "; it was replaced by aug.crop_pct = 1 / resize_ratio (timm's convention, e.g. 0.875 for "
                        "1.14); images now keep their aspect ratio unless aug.resize=squash",
}


def _assign(cfg: Config, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(obj) if not f.metadata.get("internal")}
        if part not in fields:
            path = ".".join(parts[: i + 1])
            near = _near(part, list(fields))
            hint = RENAMED.get(path) or (f"; did you mean '{near}'?" if near else "")
            raise PipelineError(f"unknown config key '{path}' in {where}{hint}")
        hint_t = typing.get_type_hints(type(obj))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hint_t):
                if not isinstance(value, dict) or value:
                    raise PipelineError(f"config key '{key}' in {where} is a section; set its keys (e.g. {key}.x=...)")
                return
            setattr(obj, part, _coerce(value, hint_t, key, where))
        else:
            if not dataclasses.is_dataclass(hint_t):
                raise PipelineError(f"unknown config key '{key}' in {where}: '{'.'.join(parts[:i+1])}' is not a section")
            obj = getattr(obj, part)


def _near(word: str, options: list[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return m[0] if m else None


def _coerce(value: Any, t: Any, key: str, where: str) -> Any:
    def bad(expected: str) -> PipelineError:
        return PipelineError(
            f"config key '{key}' in {where}: expected {expected}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, where)
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in args:
            raise bad("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad(f"a list of {args[0].__name__}")
        return [_coerce(v, args[0], key, where) for v in value]
    if t is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if t is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise bad(str(t))  # pragma: no cover - a schema type we do not handle


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

