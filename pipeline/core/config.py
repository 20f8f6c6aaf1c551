"""Experiment config: every default in one place, loaded from YAML with `base:` inheritance.

A config file is an experiment sheet. It may name a `base:` file (relative to itself) whose values
it extends; `key=value` overrides from the command line come last (`train.epochs=3`; values are
parsed as YAML). Unknown keys, wrong types and out-of-range values are errors naming the key and
the file that set it: a typo is never ignored.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .files import layout
from .errors import PipelineError


# ----------------------------------------------------------------------------- the schema
# Each key is declared once, below, with everything known about it: default, type (the annotation), help,
# range, the first stage whose outputs it changes, the date it was added. RANGES, the records' key lists
# (provenance) and the config reference docs/config.md all read it from here.
STAGES = ("setup", "1", "2", "3", "4", "5", "-")  # "setup": how the competition folder is built; "-": no output
SECTION_STAGE = {"data": "1", "folds": "1", "model": "2", "aug": "2", "train": "2", "eval": "2", "rebalance": "3",
                 "infer": "4", "ensemble": "5", "sweep": "-", "": "2"}  # the stage of a key that does not name its own
BIG = 2 ** 31 - 1
SEED_MAX = 2 ** 32 - 1


def key(default: Any = dataclasses.MISSING, *, factory: Any = None, help: str = "",
        range: tuple[float, float, bool, bool] | None = None, stage: str | None = None, added: str | None = None,
        own_record: bool = False, path_name: bool = False):
    """A config key: its default (or `factory` for a list), one line of help, its range (low, high, low included,
    high included; a list is checked element by element), the first stage whose outputs it changes (default: its
    section's; "-": none: where or how work runs, not what it computes) and, for keys added after outputs existed,
    the date: at their default such keys are left out of records, so upgrading does not make finished work stale.
    `own_record`: recorded in an entry of its own, not with its section (train.full_fit: the extra model's record);
    `path_name`: the value becomes a file or folder name (one plain path component, checked)."""
    assert stage is None or stage in STAGES, stage
    meta = {"help": help, "range": range, "stage": stage, "added": added, "own_record": own_record,
            "path_name": path_name}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, help: str = "", own_record: bool = False):
    """A section of keys; `own_record`: its keys are recorded in an entry of their own (train.pseudo: the teacher's)."""
    return field(default_factory=cls, metadata={"help": help, "section": True, "own_record": own_record})


# ----------------------------------------------------------------------------- a command's run
@dataclass
class Session:
    """What one command sets for its run (not config keys), carried by its configs (`Config.session`; `all`'s
    run_also configs share the command's): `--allow-stale`, and `looks`, the image records made while the command
    runs, so each image set is stat'ed once (a status of 5 folds x 100k images would stat every file a dozen
    times). A config loaded on its own (a member's, a teacher's) gets a fresh session: it looks every time."""
    allow_stale: bool = False
    looks: dict | None = None  # (paths, hashed) -> image record; None: no memo


# ----------------------------------------------------------------------------- sections
@dataclass
class DataCfg:
    root: str = key("data/demo", help="competition folder; the paths below are relative to it")
    layout: Literal["csv", "folders", "coco"] = key("csv", help="csv: train.csv + image folder; folders: "
                                                              "train/<class>/*; coco: COCO-style JSON (train_json)")
    train_csv: str = key("train.csv", help="the id/label table (layout csv)")
    train_dir: str = key("train", help="train images (layout csv) or class folders (layout folders)")
    train_json: str = key("train.json", added="2026-12-02",
                          help="layout coco: images (id, file_name relative to data.root), annotations (image_id, "
                               "category_id), categories (id, name, ...)")
    test_json: Optional[str] = key(None, stage="4", added="2026-12-02",
                                   help="layout coco: the test images' JSON (images: id, file_name); the submission's "
                                        "ids are their ids (null: sample_submission / test_dir)")
    category_label: Literal["id", "name"] = key("id", added="2026-12-02",
                                                help="layout coco: a class is its category id (what iNaturalist's "
                                                     "submission expects) or its category name")
    taxonomy: Optional[str] = key(None, stage="2", added="2026-12-07",
                                  help="each class's parents (train.taxonomy): a CSV whose first column is the class "
                                       "and one column per level (class,genus,family); null with layout coco: the "
                                       "categories' own fields (supercategory, family, genus, ...)")
    test_dir: str = key("test", stage="4", help="test images, flat")
    sample_submission: Optional[str] = key("sample_submission.csv", stage="4",
                                           help="fixes test ids, order and columns; null: use test_dir")
    id_col: str = key("image_id", help="image id column; an id is a path relative to train_dir")
    label_col: str = key("label", help="label column; strings or integers")
    group_col: Optional[str] = key(None, help="rows sharing a group never straddle folds (patient, site, individual); "
                                              "layout coco: a field of the image (or of its annotation)")
    image_ext: str = key("", help="appended to ids that lack it, e.g. \".jpg\" when train.csv ids have no extension")
    check_images: Literal["none", "header", "full"] = key("header", stage="-",
                                                          help="header: open each file; full: decode it")
    hash_images: bool = key(False, stage="1",
                            help="records hold each image's sha256 (else size + mtime): for copies that keep mtimes")
    test_labels: Optional[str] = key(None, stage="5",
                                     help="private test labels (the demo's): score the submission like a leaderboard")
    demo: bool = key(False, stage="setup", help="build the digits demo competition into `root` if it is missing")
    holdout_from: Optional[str] = key(None, stage="setup", added="2026-12-01",
                                      help="a folder-per-class photo set: build `root` from it once, a stratified "
                                           "holdout_frac of every class becoming the test set (labels kept in "
                                           "<root>-private/test_labels.csv)")
    holdout_frac: float = key(0.2, range=(0, 1, False, False), stage="setup", added="2026-12-01",
                              help="share of each class held out as the private test (holdout_from)")

    def path(self, rel: str) -> Path:
        """A file of the competition: `rel` under `root`."""
        return Path(self.root) / rel


@dataclass
class FoldsCfg:
    n_splits: int = key(5, range=(2, 100, True, True), help="K of stratified K-fold")
    seed: int = key(42, range=(0, SEED_MAX, True, True),
                    help="shuffling seed; with the same data it gives a byte-identical folds file")
    name: str = key("", path_name=True, help="the folds file is folds/<name>.csv; empty: <data folder>_k<K>_s<seed>")
    rare_classes: Literal["error", "allow"] = key("error", stage="-",
                                                  help="a class with fewer images than folds: refuse, or allow it (it"
                                                       " is missing from the validation of some folds, so those folds"
                                                       " cannot score it)")


@dataclass
class ModelCfg:
    arch: str = key("resnet10t", help="any timm model name")
    pretrained: bool = key(False, help="load timm hub weights (needs internet)")
    pretrained_path: Optional[str] = key(None,
                                         help="local .safetensors/.pth weights, for offline machines and kernels "
                                              "(`./run.sh weights import` converts another naming; its <file>.json "
                                              "gives mean/std/crop_pct)")
    head_init_scale: Optional[float] = key(None, range=(0, 100, True, True), added="2026-12-01",
                                           help="the new classifier's initial weights and bias x this (timm train.py "
                                                "--head-init-scale); a small head keeps short fine-tunes from "
                                                "wrecking pretrained features; null: timm's init")
    head_init_bias: Optional[float] = key(None, range=(-100, 100, True, True), added="2026-12-01",
                                          help="the new classifier's initial bias (timm --head-init-bias); null: "
                                               "timm's")
    drop_rate: float = key(0.0, range=(0, 1, True, False), help="dropout before the classifier")
    drop_path_rate: float = key(0.0, range=(0, 1, True, False), help="stochastic depth")
    pool: Literal["avg", "gem", "attn"] = key("avg",
                                              help="gem: generalised mean pooling; attn: timm's attention pooling")
    gem_p: float = key(3.0, range=(0, 100, False, True),
                       help="GeM initial exponent (learned); p=1 is average pooling")
    head: Literal["linear", "arcface"] = key("linear", added="2026-12-07",
                                             help="arcface: sub-center ArcFace (Deng et al. 2020) trained with the "
                                                  "margins of train.arcface_margin on L2-normalised pooled features; "
                                                  "stage 2 writes the dominant sub-center of each class as a linear "
                                                  "layer (s x w_c), read by every later stage like any classifier")
    arcface_subcenters: int = key(3, range=(1, 64, True, True), added="2026-12-07",
                                  help="model.head=arcface: sub-centers a class (1: plain ArcFace)")
    arcface_scale: float = key(30.0, range=(1, 1000, True, True), added="2026-12-07",
                               help="model.head=arcface: s, logits = s x cosine")
    mean: Optional[list[float]] = key(None, range=(0, 1, True, True),
                                      help="input normalisation; null: from the model's pretrained config")
    std: Optional[list[float]] = key(None, range=(0, 10, False, True), help="input std (RGB); null: as mean")


@dataclass
class AugCfg:
    img_size: int = key(224, range=(16, 4096, True, True), help="training and validation crop side, pixels")
    policy: str = key("", added="2026-11-24",
                      help="timm AutoAugment / RandAugment / AugMix spec, e.g. rand-m9-mstd0.5-inc1, original, "
                           "augmix-m5-w4-d2, trivial")
    size_schedule: list[list[int]] = key(factory=list, added="2026-11-24",
                                         help="progressive resizing: [[epoch, side], ...] from epoch 0")
    crop: Literal["rrc", "resize_crop"] = key("rrc",
                                              help="rrc: RandomResizedCrop; resize_crop: resize then random crop")
    rrc_scale: list[float] = key(factory=lambda: [0.35, 1.0], range=(0, 1, False, True),
                                 help="RandomResizedCrop area range")
    resize: Literal["keep_ratio", "squash"] = key("keep_ratio",
                                                  help="keep_ratio: as timm; squash: every image to a square first")
    crop_pct: Optional[float] = key(None, range=(0.3, 1, True, True),
                                    help="validation/TTA: shorter side to img_size/crop_pct, centre crop; null: the "
                                         "model's (timm)")
    hflip: float = key(0.5, range=(0, 1, True, True), help="probability")
    vflip: float = key(0.0, range=(0, 1, True, True),
                       help="probability; for images with no \"up\" (leaves, microscopy)")
    rotate: float = key(15.0, range=(0, 180, True, True),
                        help="shift-scale-rotate: max rotation, degrees (0 disables the transform)")
    shift_scale_p: float = key(0.5, range=(0, 1, True, True), help="shift-scale-rotate probability")
    color_jitter: float = key(0.2, range=(0, 1, True, True),
                              help="brightness/contrast/saturation strength (0 disables)")
    coarse_dropout: float = key(0.0, range=(0, 1, True, True),
                                help="probability of cutting up to 8 holes of <=1/8 of the side")
    store_side: Optional[int] = key(None, range=(16, 16384, True, True),
                                    help="shorter side of the stored copies; null: 1.5 x the largest side read, /64")
    store: Literal["auto", "raw", "jpeg"] = key("auto", added="2026-12-02",
                                                help="how stored copies keep pixels: raw uint8, or JPEG at "
                                                     "store_quality (4:4:4; about a tenth of the disk, decoded in the "
                                                     "loader workers); auto: raw unless the train images' raw store "
                                                     "would pass store_raw_max_gb")
    store_quality: int = key(90, range=(50, 100, True, True), added="2026-12-02", help="JPEG quality of store=jpeg")
    store_raw_max_gb: float = key(100.0, range=(0, 1e6, False, True), added="2026-12-02",
                                  help="store=auto: the largest raw store (estimated from the train images and the "
                                       "store side) kept raw; above it, JPEG")
    cache: Literal["auto", "on", "off"] = key("auto", stage="-",
                                              help="keep the stored copies on disk (one per image set); auto: if it "
                                                   "fits")
    cache_dir: str = key(str(layout.CACHE), stage="-", help="where the image caches live (shared by experiments)")
    cache_max_gb: Optional[float] = key(None, range=(0, 1000000.0, False, True), stage="-",
                                        help="after a build, least recently used caches go until all fit; null: no "
                                             "bound")


@dataclass
class PseudoCfg:
    teacher: str = key("", path_name=True,
                       help="an ensemble (submissions/<name>.json) or experiment whose test predictions label test "
                            "images; \"\": off")
    threshold: float = key(0.9, range=(0, 1, True, True),
                           help="a test image joins when the teacher's top probability reaches this")
    soft: bool = key(True, help="targets: the teacher's probabilities (true) or its top class (false)")
    weight: float = key(0.5, range=(0, 100, False, True),
                        help="loss weight of a pseudo-labelled image against a labelled one")


@dataclass
class DistillCfg:
    teacher: str = key("", path_name=True,
                       help="an ensemble or experiment whose predictions are soft targets (knowledge distillation); "
                            "\"\": off")
    alpha: float = key(0.5, range=(0, 1, True, True),
                       help="loss = (1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher_T || student_T)")
    temperature: float = key(4.0, range=(0, 100, False, True), help="T: softens both distributions")
    leaky_oof: bool = key(False,
                          help="LEAKY shortcut: train rows' targets are the teacher's OOF probabilities (docs/stages.md)")


@dataclass
class TrainCfg:
    epochs: int = key(10, range=(0, 100000, True, True), help="epochs per fold (the schedule's length); 0 with "
                                                                "pretrained weights: a linear-probe baseline (the "
                                                                "backbone never trains, the classifier is the probe fit "
                                                                "of train.head_init=probe)")
    batch_size: int = key(64, range=(1, 65536, True, True),
                          help="images per optimiser step per process, before accumulation")
    accum_steps: int = key(1, range=(1, 4096, True, True),
                           help="gradient accumulation: effective batch = batch_size * accum_steps * processes")
    optimizer: str = key("adamw", help="any timm optimizer name (adamw, sgd, lamb, ...)")
    lr: float = key(1e-3, range=(0, 10, False, True),
                    help="peak learning rate of the head, per effective batch (no automatic scaling)")
    backbone_lr_mult: float = key(1.0, range=(0, 100, True, True),
                                  help="backbone lr = lr * this; <1 protects pretrained features")
    layer_decay: Optional[float] = key(None, range=(0, 1, False, True), added="2026-11-24",
                                       help="layer-wise lr decay (timm's param_groups_layer_decay), e.g. 0.75; null: "
                                            "off")
    freeze_epochs: int = key(0, range=(0, 100000, True, True), added="2026-11-24",
                             help="head warm-up: the first N epochs train the classifier only")
    freeze_bn: bool = key(False, added="2026-11-24",
                          help="during those epochs also keep the backbone's BatchNorm statistics fixed")
    bn_stats: Literal["batch", "frozen"] = key("batch", added="2026-12-07",
                                               help="frozen: the backbone's BatchNorm layers normalise with their "
                                                    "running (pretrained) statistics for the whole run, as the "
                                                    "features a probe head was fit on (their affine weights still "
                                                    "train); batch: batch statistics, running ones updated")
    head_init: Literal["random", "probe"] = key("random", added="2026-12-03",
                                                help="probe: LP-FT (Kumar et al. 2022): before the first epoch the "
                                                     "classifier is fit (logistic regression, L-BFGS) on the frozen "
                                                     "pretrained features of the fold's training rows (never its "
                                                     "held-out rows); random: timm's init (x model.head_init_scale)")
    freeze_backbone: bool = key(False, added="2026-11-24",
                                help="linear probe: only the classifier (and pooling) ever trains; BN statistics "
                                     "fixed")
    trainable_stages: Optional[int] = key(None, range=(0, 1000, True, True), added="2026-11-24",
                                          help="partial fine-tuning: the last N stages (timm's coarse groups) + head "
                                               "train")
    patience: Optional[int] = key(None, range=(1, 100000, True, True), added="2026-11-24",
                                  help="early stopping: end the fold after N epochs without a better metric on "
                                       "its held-out rows (a choice on the scored rows: CV marked, not ranked); "
                                       "null: off")
    full_fit: bool = key(False, own_record=True,
                         help="after the folds, one more model on every row for the epoch count the folds chose (no "
                              "CV)")
    pseudo: PseudoCfg = section(PseudoCfg, "pseudo-labels; fold k's from the teacher's fold-k models", own_record=True)
    distill: DistillCfg = section(DistillCfg, "distillation; fold k's targets from teacher fold k", own_record=True)
    weight_decay: float = key(0.05, range=(0, 10, True, True), help="weight decay; none on biases, norms, GeM's p")
    momentum: float = key(0.9, range=(0, 1, True, False), help="sgd only")
    scheduler: str = key("cosine", help="any timm scheduler name (cosine, step, plateau, ...)")
    warmup_epochs: float = key(1.0, range=(0, 100000, True, True),
                               help="linear warmup, epochs (fractions allowed; stepped per iteration)")
    warmup_lr: float = key(1e-5, range=(0, 10, True, True), help="the learning rate the warm-up starts from")
    min_lr: float = key(1e-6, range=(0, 10, True, True), help="the learning rate the schedule ends at")
    clip_grad: Optional[float] = key(None, range=(0, 1000000.0, False, True),
                                     help="max gradient norm; null: no clipping")
    sampler: Literal["instance", "class_balanced", "sqrt", "progressive"] = key(
        "instance", help="how batches draw rows: as they come, classes equally, by sqrt(count), or moving from the "
                         "first to the second over the epochs (Kang et al. 2020)")
    loss: Literal["ce", "focal", "ldam"] = key("ce", help="ldam: Cao et al. 2019, class margins C / n_c^(1/4)")
    focal_gamma: float = key(2.0, range=(0, 20, True, True), help="focal loss focusing exponent (loss focal)")
    ldam_max_margin: float = key(0.5, range=(0, 10, False, True), added="2026-11-24",
                                 help="the rarest class's margin (in logit units before ldam_scale)")
    ldam_scale: float = key(1.0, range=(0, 100, False, True), added="2026-11-24",
                            help="s: logits x s (the paper's 30 goes with a cosine classifier; ours is linear)")
    arcface_margin: float = key(0.3, range=(0, 1.5, True, True), added="2026-12-07",
                                help="model.head=arcface: the additive angular margin (radians; the rarest class's "
                                     "with arcface_margin_min)")
    arcface_margin_min: Optional[float] = key(None, range=(0, 1.5, True, True), added="2026-12-07",
                                              help="model.head=arcface: class-size margins (Happywhale 2022), linear "
                                                   "in n^(-1/4) from this (the most frequent class) to "
                                                   "arcface_margin (the rarest); null: one margin for every class")
    class_weights: Literal["none", "effective_number"] = key("none", help="Cui et al. 2019 class-balanced loss")
    cb_beta: float = key(0.999, range=(0, 1, False, False), help="effective-number beta")
    drw_epoch: Optional[int] = key(None, range=(0, 100000, True, True), added="2026-11-24",
                                   help="deferred re-weighting: effective-number class weights from this epoch "
                                        "(0-based) on")
    label_smoothing: float = key(0.0, range=(0, 1, True, False), help="share of the target spread over all classes")
    taxonomy: list[str] = key(factory=list, added="2026-12-07",
                              help="taxonomy levels (columns of data.taxonomy, or COCO category fields) whose "
                                   "cross-entropy joins the loss: a parent's probability is the sum of its "
                                   "children's, so a rare class learns from its siblings' photos (docs/stages.md)")
    clean_labels: Literal["off", "drop", "relabel"] = key("off", added="2026-12-07",
                                                          help="before a fold trains, flag its training rows whose "
                                                               "label confident learning (cleanlab) finds wrong on an "
                                                               "inner cross-validation of those rows (pretrained "
                                                               "features), then drop them or relabel them to the "
                                                               "predicted class; held-out rows never change")
    clean_max_share: float = key(0.1, range=(0, 1, False, True), added="2026-12-07",
                                 help="train.clean_labels: at most this share of a fold's training rows, the most "
                                      "confidently wrong first")
    taxonomy_weight: float = key(0.5, range=(0, 100, True, True), added="2026-12-07",
                                 help="weight of each train.taxonomy level's cross-entropy (the class's own: 1)")
    mixup_alpha: float = key(0.0, range=(0, 100, True, True), help="0 disables mixup")
    cutmix_alpha: float = key(0.0, range=(0, 100, True, True), help="0 disables cutmix")
    mix_prob: float = key(1.0, range=(0, 1, True, True), help="probability of mixing a batch")
    mix_switch_prob: float = key(0.5, range=(0, 1, True, True), help="probability of cutmix when both are on")
    mix_mode: Literal["batch", "pair", "elem"] = key("batch", help="one lambda per batch, per pair or per image")
    mix_off_epoch: Optional[int] = key(None, range=(0, 100000, True, True),
                                       help="stop mixing from this epoch on (0-based); null: never")
    ema: bool = key(True, help="keep an EMA of the weights; with select=last the EMA weights are the fold's output "
                               "(raw ones when off)")
    ema_decay: float = key(0.998, range=(0, 1, False, False), help="per optimiser step")
    ema_warmup: bool = key(True, help="decay ramps up from 0 (timm's warmup): short or from-scratch runs need it")
    select: Literal["best", "last"] = key("last", help="last: the last epoch's weights (EMA when train.ema), no choice "
                                                      "made on held-out rows; best: the epoch and raw/EMA weights "
                                                      "with the best metric on the fold's held-out rows (its CV is "
                                                      "then selected on the rows it scores: marked, not ranked)")
    amp: Literal["auto", "bf16", "fp16", "off"] = key("auto",
                                                      help="autocast, CPU and GPU; auto: GPU bf16 (fp16 where "
                                                           "unsupported), CPU fp32")
    channels_last: Literal["auto", "on", "off"] = key("auto",
                                                      help="NHWC memory format, CPU and GPU; auto: GPU on, CPU off")
    compile: bool = key(False, help="torch.compile the model (CPU: needs a C++ compiler; GPU: Triton)")
    tf32: bool = key(True, help="GPU: TF32 matmuls/convolutions in fp32 layers (Ampere and later); no effect on CPU")
    workers: Optional[int] = key(None, range=(0, 256, True, True), stage="-",
                                 help="DataLoader workers; null: min(8, cpu count - 1)")
    deterministic: Literal["auto", "on", "off"] = key("auto",
                                                      help="auto: bit-identical on CPU, cudnn.benchmark on GPU; on: "
                                                           "deterministic cuDNN")
    tracker: Literal["none", "mlflow", "tensorboard", "wandb"] = key("none", stage="-",
                                                                     help="also log there, when installed")
    tracker_dir: Optional[str] = key(None, stage="-",
                                     help="MLflow file store / TensorBoard / W&B folder; null: runs/<exp>/tracking")


@dataclass
class EvalCfg:
    metric: Literal["accuracy", "macro_f1", "balanced_accuracy", "log_loss", "qwk", "top_k_accuracy",
                    "map_at_k"] = key("accuracy", help="the competition metric; top_k_accuracy and map_at_k (MAP@k, "
                                                       "Happywhale's) take eval.top_k")
    top_k: int = key(5, range=(1, 1000, True, True), added="2026-12-02",
                     help="k of eval.metric top_k_accuracy / map_at_k")
    many_shot: int = key(100, range=(0, BIG, True, True),
                         help="classes with more training images than this are \"many-shot\"")
    few_shot: int = key(20, range=(0, BIG, True, True), help="fewer than this: \"few-shot\"; in between: \"medium\"")

    @property
    def scorer(self) -> str:
        """The metric as every scoring call names it (a top-k metric with its k: "map_at_k@5")."""
        from .predict.metrics import scorer  # lazily: reading a config imports no scikit-learn
        return scorer(self.metric, self.top_k)


# The names of stage 3's heads and stage 4's TTA views: the schema's Literal types, so a config is checked without
# importing torch; nets/heads.VARIANTS and predict/tta.VIEWS register the code behind each name (a test holds
# them equal).
Variant = Literal["joint", "crt", "tau", "lws", "ncm", "logit_adjust", "ncm_pca", "knn", "knn_pca"]
PROBE = "probe_"  # rebalance.probe: a variant fit on the pretrained (not fine-tuned) backbone's features
WISE = "wise"  # rebalance.wise_alpha: WiSE-FT heads, named wise<alpha> (wise0.5); infer.heads: [wise] names them all
MIX = "mix"  # infer.mix: the fine-tuned head and the probe head, each the best of its family, averaged in logits
Head = Literal[("best",) + typing.get_args(Variant) + tuple(PROBE + v for v in typing.get_args(Variant)) + (WISE, MIX)]
# best: stage 4's nested choice among the variants (probe, WiSE-FT and mix heads included)


def wise_name(alpha: float) -> str:
    return f"{WISE}{alpha:g}"


def wise_alpha_of(head: str) -> float | None:
    """The alpha of a WiSE-FT head's name (wise0.5 -> 0.5); None: not one."""
    try:
        a = float(head[len(WISE):]) if head.startswith(WISE) else None
    except ValueError:
        return None
    return a if a is not None and 0 < a < 1 and wise_name(a) == head else None


def off_backbone(head: str) -> bool:
    """A head that runs on another backbone than the folds' fine-tuned models (the pretrained one: probe heads; an
    interpolation of both: WiSE-FT heads)."""
    return head.startswith((PROBE, WISE))
View = Literal["orig", "hflip", "vflip", "rot90", "rot180", "rot270", "five_crop"]


@dataclass
class RebalanceCfg:
    variants: list[Variant] = key(factory=lambda: ["joint", "crt", "tau", "lws", "ncm", "logit_adjust"],
                              help="heads fit on the frozen features (core/nets/heads.VARIANTS; joint is required)")
    aug_views: int = key(0, range=(0, 100, True, True),
                         help="extra augmented views of each training image for cRT/LWS features (0: centre crop "
                              "only)")
    crt_epochs: int = key(30, range=(1, 10000, True, True), help="cRT epochs (the checkpoint epoch is tuned)")
    crt_lr: float = key(0.01, range=(0, 10, False, True), help="per batch of 256 features")
    crt_weight_decay: float = key(5e-4, range=(0, 10, True, True), help="cRT weight decay")
    lws_epochs: int = key(30, range=(1, 10000, True, True), help="LWS epochs (the checkpoint epoch is tuned)")
    lws_lr: float = key(0.01, range=(0, 10, False, True), help="LWS learning rate, per batch of 256 features")
    tau: Optional[float] = key(None, range=(0, 5, True, True),
                               help="fixed tau; null: chosen by a sweep over tau_grid")
    tau_grid: list[float] = key(factory=lambda: [round(0.1 * i, 1) for i in range(21)], range=(0, 5, True, True),
                                help="tau values tried (rebalance.tau null)")
    la_grid: list[float] = key(factory=lambda: [round(0.25 * i, 2) for i in range(13)], range=(0, 10, True, True),
                               help="logit-adjustment scales tried")
    inner_folds: int = key(2, range=(2, 20, True, True),
                           help="tuned choices are made on one half of a held-out fold and scored on the other")
    ncm_center: bool = key(True, help="subtract the training feature mean before L2 normalisation (NCM and kNN)")
    knn_k_grid: list[int] = key(factory=lambda: [1, 3, 5, 10, 20], range=(1, 10000, True, True), added="2026-11-24",
                                help="knn: neighbours, chosen like tau")
    knn_t_grid: list[float] = key(factory=lambda: [0.02, 0.05, 0.1], range=(0, 10, False, True), added="2026-11-24",
                                  help="knn: vote temperature exp(cos / T)")
    pca_dim: Optional[int] = key(None, range=(1, 100000, True, True), added="2026-11-24",
                                 help="ncm_pca / knn_pca: PCA-whitened dimensions kept; null: every non-degenerate "
                                      "one")
    probe: list[Variant] = key(factory=list, added="2026-12-03",
                               help="variants also fit on the pretrained, un-fine-tuned backbone's features of each "
                                    "fold (named probe_<variant>; probe_joint: logistic regression), predicted by "
                                    "stage 4 and chosen by the nested best head like the others (needs pretrained "
                                    "weights)")
    features: Literal["float32", "float16"] = key("float32", added="2026-12-07",
                                                  help="how stage 3 caches each fold's pooled features on disk: "
                                                       "float16 halves the cache; the heads are fit on the stored "
                                                       "values either way, so a fresh run and one from the cache fit "
                                                       "the same heads. The probe's cache (one array for every fold) "
                                                       "stays float32: its logistic regression amplifies float16's "
                                                       "rounding")
    wise_alpha: list[float] = key(factory=list, range=(0, 1, False, False), added="2026-12-03",
                                  help="WiSE-FT (Wortsman et al. 2022): per fold and alpha, the weights (1 - alpha) x "
                                       "pretrained (with the fold's probe head) + alpha x fine-tuned, a head named "
                                       "wise<alpha> scored on the fold's held-out rows, predicted by stage 4 and "
                                       "chosen by the nested best head like the others (needs pretrained weights)")


@dataclass
class FixResCfg:
    size: Optional[float] = key(None, range=(0.25, 4, True, True),
                                help="test crop = img_size x this, after fine-tuning BN + classifier there; null: off")
    epochs: int = key(1, range=(1, 1000, True, True), help="fine-tuning epochs over the fold's own training rows")
    lr: Optional[float] = key(None, range=(0, 10, False, True),
                              help="fine-tuning peak lr (cosine to 0); null: train.lr / 10")


@dataclass
class InferCfg:
    heads: list[Head] = key(factory=lambda: ["best"], help="stage-3 variants to predict with; best: the CV winner")
    views: list[View] = key(factory=lambda: ["orig", "hflip"], help="named TTA views, see pipeline/core/predict/tta.py")
    scales: list[float] = key(factory=lambda: [1.0], range=(0.25, 4, True, True),
                              help="x img_size (FixRes: >1 often helps); each view at each scale")
    merge: Literal["mean_prob", "mean_logit", "geo_mean"] = key("mean_prob", help="how TTA views combine")
    search: bool = key(False, help="choose the TTA policy greedily on OOF from views x scales; recorded")
    oof: Literal["auto", "on", "off"] = key("auto",
                                            help="TTA on held-out rows too; auto: when the train images exist")
    full_fit_weight: float = key(1.0, range=(0, 100, True, True),
                                 help="the full-data model's share of the test mean, in fold models (0: not used)")
    fixres: FixResCfg = section(FixResCfg, "Touvron et al. 2019: views at a larger size, BN + head tuned there")
    batch_size: int = key(128, range=(1, 65536, True, True), help="images per inference batch (stages 3-4)")
    features: Literal["float16", "float32"] = key("float16", added="2026-12-03",
                                                  help="how stage 4 stores each backbone's pooled features per view "
                                                       "(its stored currency: a head's logits are computed from them "
                                                       "when read); float16 halves the disk, float32 keeps every "
                                                       "logit bit-equal to a float32 forward pass")
    mix: bool = key(True, added="2026-12-07",
                    help="with probe heads (rebalance.probe) and a fine-tune: the head 'mix', the weighted mean of "
                         "the logits of the best fine-tuned variant and the best probe variant (each, and the share "
                         "infer.mix_weights, chosen without the fold it scores), is one more candidate of the best "
                         "head")
    mix_weights: list[float] = key(factory=lambda: [0.25, 0.5, 0.75], range=(0, 1, True, True), added="2026-12-07",
                                   help="the mix head's fine-tuned share w (the probe's 1 - w), chosen among these "
                                        "like its parts (fold k's rows: on the other folds; the test images: on all; "
                                        "ties: the share nearest 0.5); [0.5]: the plain mean")


@dataclass
class EnsembleCfg:
    name: str = key("", path_name=True, help="the submission is submissions/<name>.csv; empty: the experiment name")
    members: list[str] = key(factory=list, help="\"experiment\", \"experiment:head\" or \"experiment:head:plain\" "
                                                "(that head without TTA); empty: this experiment")
    method: Literal["mean", "weighted", "geo_mean", "rank", "hill_climb"] = key("mean",
                                                                                help="hill_climb: Caruana et al. 2004")
    weight_metric: Literal["log_loss", "metric"] = key("log_loss", help="what weighted / hill_climb optimise on OOF")
    hill_climb_steps: int = key(100, range=(1, 100000, True, True), added="2026-11-24",
                                help="hill_climb: at most this many additions (with replacement) after the start")
    submission: Literal["label", "proba", "topk"] = key("label", help="one label column, one probability column "
                                                                     "per class, or topk: the top_k labels "
                                                                     "space-separated, best first (iNaturalist, "
                                                                     "Happywhale)")
    top_k: int = key(5, range=(1, 1000, True, True), added="2026-12-02", help="labels per row of a topk submission")
    prior: Literal["none", "em", "bbse"] = key("none", added="2026-12-07",
                                               help="re-weight the test probabilities to a class prior estimated "
                                                    "from them (em: Saerens et al. 2002 on temperature-calibrated "
                                                    "probabilities; bbse: Lipton et al. 2018) when a likelihood-ratio "
                                                    "test finds a shift; needs OOF rows (docs/stages.md)")


@dataclass
class SweepCfg:
    name: str = key("", path_name=True, help="trials are runs/<name>-t<k>/, the study runs/.sweeps/<name>/; empty: "
                                             "<experiment>-sweep")
    space: str = key("", help="the search space (YAML: config key -> distribution), relative to this config file; "
                              "--space overrides it")
    trials: int = key(20, range=(1, 100000, True, True), help="trials of the study (done, pruned or running; "
                                                               "--trials overrides it), shared by its workers")
    through: Literal["train", "infer"] = key("train", help="the last stage a trial runs; its CV per fold: stage 2's "
                                                           "held-out score, or stage 4's nested policy of its primary "
                                                           "head")
    pruner: Literal["median", "hyperband", "none"] = key("median", help="stops trials whose per-epoch held-out "
                                                                        "metric trails the others'")
    prune_folds: int = key(1, range=(1, 100, True, True), help="folds whose per-epoch metric is reported for pruning")
    startup_trials: int = key(4, range=(0, 10000, True, True), help="trials sampled at random (TPE) and never "
                                                                   "pruned before the search starts")
    seed: int = key(0, range=(0, SEED_MAX, True, True), help="the TPE sampler's seed")
    storage: str = key("", help="empty: a journal file under runs/.sweeps/<name>/ (one machine or a shared "
                                "filesystem); else an RDB URL (postgresql://...) for workers on many machines")


@dataclass
class Config:
    experiment: str = key("demo", stage="-", path_name=True, help="run folder: runs/<experiment>/")
    seed: int = key(42, range=(0, SEED_MAX, True, True), help="training seed")
    device: Literal["auto", "cpu", "cuda"] = key("auto", help="auto: the GPU when there is one, else the CPU")
    run_also: list[str] = key(factory=list, stage="-", help="other experiment configs `all` runs before the ensemble")
    data: DataCfg = section(DataCfg, "the competition: where its files are and how to read them")
    folds: FoldsCfg = section(FoldsCfg, "stage 1: the K folds every later stage reads")
    model: ModelCfg = section(ModelCfg, "the timm model and its starting weights")
    aug: AugCfg = section(AugCfg, "pixels: sizes, crops, augmentation, the image store")
    train: TrainCfg = section(TrainCfg, "stage 2: optimiser, schedule, loss, sampler, mixing, EMA, precision")
    eval: EvalCfg = section(EvalCfg, "the competition metric and the long-tail bins")
    rebalance: RebalanceCfg = section(RebalanceCfg, "stage 3: decoupled classifier retraining on frozen features")
    infer: InferCfg = section(InferCfg, "stage 4: test-time augmentation on OOF rows and test images")
    ensemble: EnsembleCfg = section(EnsembleCfg, "stage 5: combining experiments into the submission")
    sweep: SweepCfg = section(SweepCfg, "hyper-parameter sweeps (./run.sh sweep): where trials and the study go, "
                                        "how they are searched and pruned (no key changes what a trial computes)")
    # not config keys: where it came from, and what the command running it set
    source: str = field(default="", metadata={"internal": True})
    session: Session = field(default_factory=lambda: Session(), metadata={"internal": True}, compare=False, repr=False)

    # ------------------------------------------------------------------ derived paths
    def data_path(self, rel: str) -> Path:
        return self.data.path(rel)

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
        return {f.name: (dataclasses.asdict(getattr(self, f.name)) if f.metadata.get("section")
                         else copy.deepcopy(getattr(self, f.name)))
                for f in dataclasses.fields(self) if not f.metadata.get("internal")}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def assign(self, key: str, value: Any, where: str) -> None:
        """Set the dotted `key` (an unknown one is refused naming the nearest; the value coerced to its type)."""
        parts = key.split(".")
        obj: Any = self
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

    def validate(self, origin: dict[str, str], problems: list[str]) -> set[str]:
        """Ranges and names, then the checks that relate keys to each other, section by section: every problem is
        appended to `problems` (none stops the others). Returns the keys at fault."""
        bad: set[str] = set()

        def check(ok: bool, key: str, why: str) -> None:
            if not ok:
                problems.append(f"config key '{key}' (set in {origin.get(key, 'defaults')}): {why}")
                bad.add(key)

        flat = flatten(self.to_dict())
        for name, (lo, hi, lo_in, hi_in) in RANGES.items():
            value = flat[name]
            for v in (value if isinstance(value, list) else [value]):
                if v is None:
                    continue
                ok = (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
                check(ok, name, f"must be {_range_text(lo, hi, lo_in, hi_in)}, got {v!r}")
        for key in (k.name for k in schema() if k.path_name):
            if flat[key] or key == "experiment":
                try:
                    layout.check_name(flat[key], f"config key '{key}' (set in {origin.get(key, 'defaults')}):")
                except PipelineError as e:
                    problems.append(str(e))
                    bad.add(key)
        _validate_aug(self.aug, check)
        _validate_train(self.train, self.experiment, check)
        check(self.eval.few_shot <= self.eval.many_shot, "eval.few_shot", "must be <= eval.many_shot")
        check(self.ensemble.prior == "none" or self.ensemble.method != "rank", "ensemble.prior",
              "re-weights probabilities: a rank average is not one (use ensemble.method mean, weighted, geo_mean or "
              "hill_climb)")
        pretrained = self.model.pretrained or bool(self.model.pretrained_path)
        check(pretrained or not self.rebalance.probe, "rebalance.probe",
              "probe heads need pretrained weights (model.pretrained or model.pretrained_path)")
        check(pretrained or self.train.clean_labels == "off", "train.clean_labels",
              "finds label issues on the pretrained backbone's features (they depend on no label): it needs "
              "model.pretrained or model.pretrained_path")
        check(self.train.clean_labels == "off" or not (self.train.pseudo.teacher or self.train.distill.teacher),
              "train.clean_labels", "a teacher's targets (train.pseudo / train.distill) replace the labels it cleans: "
                                    "use one or the other")
        check(pretrained or not self.rebalance.wise_alpha, "rebalance.wise_alpha",
              "WiSE-FT interpolates the fine-tuned weights with pretrained ones: it needs model.pretrained or "
              "model.pretrained_path")
        check(self.train.epochs > 0 or not self.rebalance.wise_alpha, "rebalance.wise_alpha",
              "with train.epochs=0 nothing is fine-tuned: every WiSE-FT head would equal probe_joint (set it to [])")
        check(pretrained or (self.train.epochs > 0 and self.train.head_init == "random"),
              "train.epochs" if self.train.epochs == 0 else "train.head_init",
              "a linear probe (train.epochs=0, train.head_init=probe) needs pretrained weights (model.pretrained or "
              "model.pretrained_path): on random features it learns nothing")
        if self.model.head == "arcface":
            _validate_arcface(self.train, check)
        for k in ("mean", "std"):
            v = getattr(self.model, k)
            check(v is None or len(v) == 3, f"model.{k}", "must be 3 numbers (RGB) or null")
        _validate_heads_and_views(self.rebalance, self.infer, self.aug.img_size, check)
        return bad


# ----------------------------------------------------------------------------- the schema, read
@dataclasses.dataclass(frozen=True)
class KeyInfo:
    name: str  # dotted
    type: Any
    default: Any
    help: str
    range: tuple[float, float, bool, bool] | None
    stage: str
    added: str | None
    own_record: bool = False  # recorded in an entry of its own, not with its section
    path_name: bool = False  # becomes a file or folder name



@functools.lru_cache(maxsize=None)
def schema(cls: type = None, prefix: str = "", own: bool = False) -> tuple[KeyInfo, ...]:
    """Every config key, in declaration order, with what the schema says of it (read once: records ask often)."""
    cls = cls or Config
    out: list[KeyInfo] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        name = f"{prefix}{f.name}"
        if f.metadata.get("section"):
            out += schema(hints[f.name], name + ".", own or f.metadata.get("own_record", False))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        top = name.split(".")[0] if "." in name else ""
        out.append(KeyInfo(name, hints[f.name], default, f.metadata.get("help", ""), f.metadata.get("range"),
                           f.metadata.get("stage") or SECTION_STAGE[top], f.metadata.get("added"),
                           own or f.metadata.get("own_record", False), f.metadata.get("path_name", False)))
    return tuple(out)


def section_help(cls: type = None, prefix: str = "") -> dict[str, str]:
    """{section name: its help} (train.pseudo, infer.fixres, ...)."""
    cls = cls or Config
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            out[f"{prefix}{f.name}"] = f.metadata.get("help", "")
            out.update(section_help(hints[f.name], f"{prefix}{f.name}."))
    return out


# Every number of the config with the smallest and largest values that make sense (from the schema).
# tests/test_config.py fails when a numeric key has none.
RANGES: dict[str, tuple[float, float, bool, bool]] = {k.name: k.range for k in schema() if k.range is not None}


@functools.lru_cache(maxsize=None)
def keys_without_output(section: str) -> tuple[str, ...]:
    """Keys of a section (e.g. "aug") that change no output (stage "-": where or how work runs): records leave
    them out."""
    return tuple(k.name.removeprefix(section + ".") for k in schema() if k.stage == "-"
                 and k.name.rpartition(".")[0] == section)


def later_keys(since: str = "") -> dict[str, tuple[str, ...]]:
    """{section: keys added after outputs already existed} (the schema's `added`; with `since`, those added on or
    after that date)."""
    out: dict[str, list[str]] = {}
    for k in schema():
        if k.added and k.added >= since:
            sec, _, name = k.name.rpartition(".")
            out.setdefault(sec, []).append(name)
    return {s: tuple(v) for s, v in out.items()}


SCHEDULERS = ("cosine", "tanh", "step", "constant", "multistep", "plateau", "poly", "wsd", "rsqrt")  # timm's
COMMON_OPTIMIZERS = ("adamw", "adam", "sgd", "momentum", "nesterov", "lamb", "lion", "adan", "rmsprop", "nadam")


STRUCTURED = ("aug.size_schedule",)  # numeric keys whose shape needs its own check in Config.validate (pairs)


def _range_text(lo: float, hi: float, lo_in: bool, hi_in: bool) -> str:
    return f"{'>=' if lo_in else '>'} {lo:g} and {'<=' if hi_in else '<'} {hi:g}"


def _validate_aug(aug: AugCfg, check) -> None:
    sched = aug.size_schedule
    check(not sched or (all(len(x) == 2 for x in sched) and sched[0][0] == 0
                        and all(a[0] < b[0] for a, b in zip(sched, sched[1:]))
                        and all(16 <= x[1] <= 4096 for x in sched)), "aug.size_schedule",
          "must be [[0, side], [epoch, side], ...]: epochs rising from 0, sides 16-4096 (e.g. [[0, 128], [6, 224]])")
    if aug.policy:
        from .inputs.policy import policy_transform  # timm parses its own specs

        try:
            policy_transform(aug.policy, aug.img_size)
        except ValueError as e:
            check(False, "aug.policy", f"{e} (examples: rand-m9-mstd0.5-inc1, original, v0, augmix-m5-w4-d2, trivial)")
    check(len(aug.rrc_scale) == 2 and aug.rrc_scale[0] <= aug.rrc_scale[1],
          "aug.rrc_scale", "must be [lo, hi] with 0 < lo <= hi <= 1")


def _validate_train(train: TrainCfg, experiment: str, check) -> None:
    check(train.drw_epoch is None or train.class_weights == "none", "train.drw_epoch",
          "defers the class weights itself: set train.class_weights=none (weights from the start) or drop drw_epoch")
    check(train.drw_epoch is None or train.drw_epoch < train.epochs, "train.drw_epoch",
          f"must be < train.epochs ({train.epochs}), or re-weighting never starts")
    check(not (train.freeze_backbone and train.trainable_stages is not None), "train.trainable_stages",
          "and train.freeze_backbone both say what trains: set one (freeze_backbone is trainable_stages=0)")
    check(train.freeze_epochs == 0 or train.freeze_epochs < train.epochs, "train.freeze_epochs",
          f"must be < train.epochs ({train.epochs}): at least one epoch trains the backbone")
    check(train.min_lr <= train.lr, "train.min_lr", f"must be <= train.lr ({train.lr:g})")
    for key in ("pseudo", "distill"):
        check(getattr(train, key).teacher != experiment, f"train.{key}.teacher",
              "names this experiment itself: a teacher must be another experiment or an ensemble")
    check(train.scheduler in SCHEDULERS, "train.scheduler", f"one of timm's schedulers {list(SCHEDULERS)}")
    opt = train.optimizer.lower()
    if opt.removeprefix("lookahead_") not in COMMON_OPTIMIZERS:
        from timm.optim import list_optimizers  # only for a rarer name: config loading stays fast

        check(opt.removeprefix("lookahead_") in list_optimizers(), "train.optimizer",
              f"'{train.optimizer}' is not a timm optimizer (e.g. adamw, sgd, lamb, lion; "
              f"timm.optim.list_optimizers() lists them)")


def _validate_arcface(train: "TrainCfg", check) -> None:
    """model.head=arcface: what a cosine classifier cannot be combined with."""
    check(train.head_init == "random", "train.head_init",
          "the LP-FT probe is a linear head; model.head=arcface trains a cosine classifier from a random start "
          "(set train.head_init=random)")
    check(train.epochs > 0, "train.epochs",
          "train.epochs=0 is the linear-probe baseline; model.head=arcface trains a cosine classifier (at least one "
          "epoch)")
    check(train.loss != "ldam", "train.loss",
          "LDAM's margins and ArcFace's (model.head=arcface) would be applied twice: use ce or focal")
    check(train.arcface_margin_min is None or train.arcface_margin_min <= train.arcface_margin,
          "train.arcface_margin_min", "must not exceed train.arcface_margin (the rarest class's margin)")


def _validate_heads_and_views(rebalance: RebalanceCfg, infer: InferCfg, img_size: int, check) -> None:
    check("joint" in rebalance.variants, "rebalance.variants", "must include 'joint' (the baseline)")
    check(bool(rebalance.tau_grid), "rebalance.tau_grid", "must hold at least one value")
    check(bool(rebalance.la_grid), "rebalance.la_grid", "must hold at least one value")
    check(bool(infer.heads), "infer.heads", "must name at least one head ('best' or a stage-3 variant)")
    check(WISE not in infer.heads or bool(rebalance.wise_alpha), "infer.heads",
          f"'{WISE}' names the WiSE-FT heads of rebalance.wise_alpha, which is empty (set e.g. [0.5])")
    check(MIX not in infer.heads or bool(rebalance.probe), "infer.heads",
          f"'{MIX}' averages a fine-tuned head and a probe head, and rebalance.probe is empty (the probe heads need "
          f"pretrained weights and train.epochs > 0)")
    check(bool(infer.mix_weights), "infer.mix_weights", "must hold at least one share (0.5: the plain mean)")
    check(len(set(infer.mix_weights)) == len(infer.mix_weights), "infer.mix_weights", "lists a share twice")
    names = [wise_name(a) for a in rebalance.wise_alpha]
    check(len(set(names)) == len(names), "rebalance.wise_alpha", "lists an alpha twice")
    check(bool(infer.views), "infer.views", f"must name at least one view (of {list(typing.get_args(View))})")
    check(bool(infer.scales), "infer.scales", "must hold at least one scale")
    small = [s for s in infer.scales if round(img_size * s) < 16]
    check(not small, "infer.scales", f"scale(s) {small} x aug.img_size {img_size} give crops under 16 px")
    check(len(set(infer.scales)) == len(infer.scales), "infer.scales", "lists a scale twice")
    check(len(set(infer.views)) == len(infer.views), "infer.views", "lists a view twice")
    fx = infer.fixres.size
    check(fx is None or round(img_size * fx) >= 16, "infer.fixres.size",
          f"{fx} x aug.img_size {img_size} gives crops under 16 px")


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


def read_yaml(path: Path) -> dict:
    """A YAML mapping read as config files are (size, encoding, duplicate keys and non-mappings refused, naming the
    file): what other YAML inputs, such as a sweep's space file, go through."""
    return _read_yaml(Path(path))


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
# 2026-12-01; docs/benchmarks/pretrained.md). Keys not listed keep the defaults above, which
# measured best too: lr 1e-3 (CV 0.685; 3e-3: 0.659), no layer decay (0.9: 0.657), no head warm-up
# (freeze_epochs 1: 0.619; with freeze_bn: 0.634); mean/std and crop_pct come from the weights' record.
# From-scratch runs keep the dataclass defaults.
PRETRAINED_DEFAULTS: dict[str, Any] = {
    "model.head_init_scale": 0.01,  # timm's fan-out init gives a new 5-way head logits of several units (epoch-1
    # loss 4.9, CV 0.522 with a 1-epoch warm-up); x0.01 starts near uniform: CV 0.685
    "train.warmup_epochs": 0.3,  # short fine-tunes: a whole warm-up epoch of 2 spends half the run at low lr
}


# With pretrained weights and a fine-tune of 1 <= train.epochs <= SHORT_FINE_TUNE_EPOCHS, keys left unset also take
# these (#47): batch 32, twice the optimiser steps of batch 64 for the same images seen (a fold model trains on
# (K-1)/K of the rows, so at batch 64 it takes half the steps of one model on all of them), with the plain recipe
# above (random head x0.01, batch BatchNorm statistics, one lr). Measured side by side (benchmarks/pretrained.py
# --part compute, Lite0 at 64 px, 2 folds; docs/benchmarks/pretrained.md, fifth session of #47, 2026-12-07), the
# submission (the nested best with the probe heads and the mix head, the defaults) against the recipe that was the
# default for 1-4 epochs until then (LP-FT + BatchNorm statistics frozen + backbone lr x0.3 + batch 32), CV of
# flowers5 / grocery81: 1 epoch +2.2 / -1.2, 2 epochs +1.0 / +0.5, 3 epochs 0.0 / +1.7, 4 epochs +2.1 / +1.1; hold-out
# +0.2 / +0.1, +1.1 / +1.4, +3.4 / +2.7, +2.0 / +4.0. At 8 epochs against batch 64: CV +0.9 / -0.1, hold-out
# +0.8 / -0.3. The fine-tune's own head is weak at 1-2 epochs on fine-grained classes (grocery81: 0.31 / 0.54 hold-out;
# the probe heads and the mix carry the submission there), so a run without probe heads at such budgets wants LP-FT:
# train.head_init=probe train.bn_stats=frozen train.backbone_lr_mult=0.3 (docs/pretrained.md).
SHORT_FINE_TUNE_EPOCHS = 8
SHORT_FINE_TUNE_DEFAULTS: dict[str, Any] = {
    "train.batch_size": 32,
}


def short_fine_tune_defaults(epochs: int) -> dict[str, Any]:
    """The short fine-tune defaults of a run of `epochs` epochs with pretrained weights ({} outside
    1..SHORT_FINE_TUNE_EPOCHS)."""
    return dict(SHORT_FINE_TUNE_DEFAULTS) if 1 <= epochs <= SHORT_FINE_TUNE_EPOCHS else {}


def _short_fine_tune(values: dict, origin: dict) -> None:
    """With pretrained weights and 1 <= train.epochs <= SHORT_FINE_TUNE_EPOCHS, the keys of
    short_fine_tune_defaults(epochs) the config leaves unset take those values (#47)."""
    default = next(k.default for k in schema() if k.name == "train.epochs")
    epochs = values.get("train.epochs", default)
    if not isinstance(epochs, int) or isinstance(epochs, bool):
        return
    for k, v in short_fine_tune_defaults(epochs).items():
        if k not in values:
            values[k] = v
            origin[k] = (f"the short fine-tune defaults (train.epochs <= {SHORT_FINE_TUNE_EPOCHS} with pretrained "
                         f"weights: config.short_fine_tune_defaults)")


def _default_probe_heads(values: dict, origin: dict) -> None:
    """With pretrained weights, rebalance.probe defaults to every stage-3 variant (#47): the nested best head then
    chooses among the fine-tuned heads and the same heads fit on the frozen pretrained features, so a short
    fine-tune that has not yet passed its own probe does not make the submission worse than the probe (grocery81,
    64 px, 2 folds x 2 epochs: hold-out 0.670 without them, 0.785 with; docs/benchmarks/pretrained.md). Not with
    train.epochs=0: the fold heads are the probe heads there."""
    if "rebalance.probe" in values:
        return
    defaults = {k.name: k.default for k in schema() if k.name in ("train.epochs", "rebalance.variants")}
    epochs = values.get("train.epochs", defaults["train.epochs"])
    variants = values.get("rebalance.variants", defaults["rebalance.variants"])
    if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0 and isinstance(variants, list):
        values["rebalance.probe"] = list(variants)
        origin["rebalance.probe"] = "the pretrained defaults (every rebalance.variants: config._default_probe_heads)"


class ConfigError(PipelineError):
    """Every problem of a config (unknown keys, wrong types, out-of-range values, keys that contradict each other),
    each naming the key and the file that set it; `config` is what loaded, the faulty keys at their defaults."""

    def __init__(self, problems: list[str], config: "Config | None" = None):
        self.problems, self.config = problems, config
        super().__init__(problems[0] if len(problems) == 1 else
                         f"{len(problems)} config problems:\n" + "\n".join(f"  - {p}" for p in problems))


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The validated config of a file (and its bases) with `key=value` overrides; every problem found is reported
    at once (ConfigError). A file that cannot be read as YAML stops at once."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []
    if path is not None:
        values, origin = _load_chain(Path(path))
    for item in overrides:
        try:
            k, v = _parse_override(item)
        except PipelineError as e:
            problems.append(str(e))
            continue
        values[k] = v
        origin[k] = "the command line"
    if values.get("model.pretrained") is True or values.get("model.pretrained_path"):
        for k, v in PRETRAINED_DEFAULTS.items():
            if k not in values:
                values[k] = v
                origin[k] = "the pretrained defaults (config.PRETRAINED_DEFAULTS)"
        _default_probe_heads(values, origin)
        _short_fine_tune(values, origin)
    cfg = Config()
    for key, value in values.items():
        try:
            cfg.assign(key, value, origin[key])
        except PipelineError as e:
            problems.append(str(e))
    cfg.source = str(path) if path is not None else "defaults"
    bad = cfg.validate(origin, problems)
    if problems:  # what loaded, each faulty key back at its default: the plan can still check the rest
        defaults = {k.name: k.default for k in schema()}
        for k in bad:
            cfg.assign(k, copy.deepcopy(defaults[k]), "defaults")
        raise ConfigError(problems, cfg)
    return cfg


RENAMED = {  # keys of earlier versions: what replaced them
    "aug.resize_ratio": "; it was replaced by aug.crop_pct = 1 / resize_ratio (timm's convention, e.g. 0.875 for "
                        "1.14); images now keep their aspect ratio unless aug.resize=squash",
}


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
