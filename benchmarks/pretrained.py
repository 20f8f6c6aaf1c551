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
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _stages import stages_1_to_4  # noqa: E402
from pipeline.tools.demo import prepare_data  # noqa: E402
from pipeline.core.files.artifacts import read_json  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.files.layout import RunDir  # noqa: E402
from pipeline.core.nets.models import weights_record  # noqa: E402
from pipeline.stages import ensemble  # noqa: E402
from pipeline.tools.reports import leaderboard  # noqa: E402

CONFIG = "configs/flowers5_pretrained.yaml"
ABLATION = ["folds.n_splits=2", "aug.img_size=64", "train.epochs=2", "rebalance.variants=[joint]",
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
SETS = {"flowers5": CONFIG, "grocery81": "configs/grocery81_pretrained.yaml"}
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


def image_folders(dst: Path) -> Path:
    """timm's ImageFolder layout (train/<class>/, validation/<class>/) of the same competition, as links."""
    cfg = load_config(CONFIG, [])
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
                    help="ablation, final, peer, evidence (#36: Lite0 / Lite2 x 64 / 96 px), probe-default (#47)")
    ap.add_argument("--evidence", nargs="*", default=["lite0:64", "lite0:96", "lite2:64", "lite2:96"],
                    help="evidence part: arch:size pairs")
    ap.add_argument("--only", nargs="*", help="ablation rows to run (finetune first when a row copies it)")
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), help="recipe part (#47 item 2): recipes to run")
    ap.add_argument("--probe-default", nargs="*", default=["flowers5:64:2", "grocery81:64:2"],
                    help="probe-default part (#47): set:size:epochs triples")
    ap.add_argument("--timm-train", default="/tmp/timm_train.py", help="timm's train.py (the peer)")
    ap.add_argument("--peer-head-init", nargs="*", type=float, default=[None, 0.01],
                    help="peer runs: --head-init-scale values (default: timm's init, then 0.01)")
    args = ap.parse_args()
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
