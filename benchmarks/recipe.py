"""Benchmark of the fine-grained recipe's losses and heads (not a test): prints the tables docs/benchmarks/recipe.md quotes.

    ./run.sh all                                      # the demo, once
    python benchmarks/recipe.py [--config configs/demo.yaml] [--flowers ../shared/data/flowers5]
                                [--only demo|flowers]

Two competitions, each trained with three losses (same everything else), stages 2-4 with every stage-3 head:
- the demo (digits, long-tailed 25x, balanced private test);
- flowers5-LT, built here from the shared flowers5 photos: a long-tailed train split (imbalance ratio 10:
  400, 160, 100, 60, 40 images), a balanced private test split of 60 per class, resnet10t at 64 px from
  scratch, 4 folds x 12 epochs.
Losses: CE; class-balanced focal (Cui et al. 2019: focal, gamma 2, effective-number weights); LDAM-DRW (Cao et
al. 2019: margins C / n_c^(1/4), deferred effective-number weights from epoch 8 of 12). For each: CV and
private score of the joint head, and of every stage-3 head including kNN and PCA-whitened NCM/kNN.
Writes data/flowers5-lt*/ and runs/rc-*/ in the project folder.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _stages import stages_1_to_4  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402

from pipeline.tools.reports import leaderboard  # noqa: E402

LOSSES = {"ce": [], "cb-focal": ["train.loss=focal", "train.class_weights=effective_number"],
          "ldam-drw": ["train.loss=ldam", "train.drw_epoch=8"]}
HEADS = ["joint", "crt", "tau", "lws", "ncm", "logit_adjust", "ncm_pca", "knn", "knn_pca"]
COMMON = ["run_also=[]", "ensemble.members=[]", f"rebalance.variants=[{','.join(HEADS)}]", f"infer.heads=[{','.join(HEADS)}]",
          "infer.views=[orig]", "infer.scales=[1.0]", "infer.search=false"]
LT_COUNTS = {"daisy": 400, "dandelion": 160, "rose": 100, "sunflower": 60, "tulip": 40}
N_TEST = 60


def build_flowers_lt(src: Path, root: Path, private: Path, seed: int = 0) -> None:
    """data/flowers5-lt: train.csv + train/ (long-tailed), test/ + sample_submission.csv, and the private labels."""
    if (root / "train.csv").exists():
        return
    rng = np.random.default_rng(seed)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train").mkdir(parents=True)
    (tmp / "test").mkdir()
    train_rows, test_rows = [], []
    for cls, n in LT_COUNTS.items():
        files = sorted((src / cls).glob("*.jpg"))
        pick = rng.permutation(len(files))
        for j in pick[:n]:
            name = f"{cls}_{files[j].stem}.jpg"
            shutil.copy(files[j], tmp / "train" / name)
            train_rows.append({"image_id": name, "label": cls})
        for j in pick[n:n + N_TEST]:
            name = f"t{len(test_rows):05d}.jpg"
            shutil.copy(files[j], tmp / "test" / name)
            test_rows.append({"image_id": name, "label": cls})
    pd.DataFrame(train_rows).to_csv(tmp / "train.csv", index=False)
    test = pd.DataFrame(test_rows)
    test.assign(label=list(LT_COUNTS)[0])[["image_id", "label"]].to_csv(tmp / "sample_submission.csv", index=False)
    private.mkdir(parents=True, exist_ok=True)
    test.to_csv(private / "test_labels.csv", index=False)
    tmp.rename(root)


def run_competition(name: str, config: str, extra: list[str]) -> list[dict]:
    rows = []
    for loss, over in LOSSES.items():
        cfg = load_config(config, [f"experiment=rc-{name}-{loss}", *COMMON, *extra, *over])
        t0 = time.perf_counter()
        stages_1_to_4(cfg)
        lb = {r["head"]: r for r in leaderboard.experiment_rows(cfg.run_dir) if r["tta"] == "off"}
        for h in HEADS:
            rows.append({"data": name, "loss": loss, "head": h, "cv": lb[h]["cv_mean"], "cv_std": lb[h]["cv_std"],
                         "few_acc": lb[h]["few_acc"], "private": lb[h]["private"]})
        j = lb["joint"]
        print(f"{name:8s} {loss:9s} joint CV {j['cv_mean']:.4f} private {j['private']:.4f}  "
              f"({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--flowers", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers5"))
    ap.add_argument("--only", choices=["demo", "flowers"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    rows = []
    if args.only != "flowers":
        rows += run_competition("demo", args.config, [])
    if args.only != "demo":
        root, private = Path("data/flowers5-lt"), Path("data/flowers5-lt-private")
        build_flowers_lt(Path(args.flowers), root, private)
        rows += run_competition("flowers", args.config, [
            f"data.root={root}", "data.image_ext=", "data.demo=false", "data.test_labels=../flowers5-lt-private/test_labels.csv",
            "model.arch=resnet10t", "model.pool=avg", "aug.img_size=64", "aug.crop=rrc", "aug.hflip=0.5",
            "aug.rotate=0", "aug.color_jitter=0.2", "train.epochs=12", "train.batch_size=64", "train.lr=0.003",
            "folds.n_splits=4", "eval.many_shot=200", "eval.few_shot=80"])
    t = pd.DataFrame(rows)
    print()
    for name, part in t.groupby("data", sort=False):
        cv = part.pivot(index="head", columns="loss", values="cv").loc[HEADS, list(LOSSES)]
        pr = part.pivot(index="head", columns="loss", values="private").loc[HEADS, list(LOSSES)]
        print(f"### {name}: CV / private by stage-3 head (rows) and training loss (columns)")
        print("| head | " + " | ".join(LOSSES) + " |")
        print("|---|" + "---|" * len(LOSSES))
        for h in HEADS:
            print(f"| {h} | " + " | ".join(f"{cv.loc[h, c]:.4f} / {pr.loc[h, c]:.4f}" for c in LOSSES) + " |")
        print()


if __name__ == "__main__":
    main()
