"""Taxonomy levels in the loss (`train.taxonomy`, #48 item 1), side by side with the same recipe without them.

    python benchmarks/taxonomy.py [--epochs 4] [--rows base coarse coarse-kind coarse-kind-w1]

grocery81 (81 fine-grained grocery classes, 35-143 photos a class) with its real 3-level taxonomy
(`../shared/data/grocery81.taxonomy.csv`: class -> coarse (44: apple, milk, juice, ...) -> kind (fruit,
vegetables, packages)); Lite0 at 64 px from the ImageNet weights, 2 folds, the pipeline's defaults of the epoch
count otherwise; the fine-tune's own joint head, no TTA. Printed: CV (the folds' held-out rows), hold-out accuracy
(the 20 % test photos, labels never used), hold-out accuracy on the classes with the fewest training photos (the
bottom third: where borrowing from siblings should show) and the share of errors that stay inside the true
class's coarse group (a "better mistake"), and minutes per fold.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stages import markdown, stages_1_to_4  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.files.artifacts import read_json  # noqa: E402
from pipeline.core.inputs.data import read_test_labels  # noqa: E402
from pipeline.core.predict.submission import Member  # noqa: E402
from pipeline.stages import ensemble  # noqa: E402
from pipeline.tools.demo import prepare_data  # noqa: E402

CONFIG = "configs/grocery81_pretrained.yaml"
TAXONOMY = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery81.taxonomy.csv"
BASE = ["folds.n_splits=2", "aug.img_size=64", "rebalance.variants=[joint]", "rebalance.probe=[]",
        "infer.views=[orig]", "infer.heads=[joint]", "ensemble.members=[]", f"data.taxonomy={TAXONOMY}"]
ROWS = {
    "base": ("no taxonomy", []),
    "coarse": ("+ coarse level, weight 0.5", ["train.taxonomy=[coarse]"]),
    "coarse-kind": ("+ coarse and kind levels, weight 0.5 each", ["train.taxonomy=[coarse,kind]"]),
    "coarse-kind-w1": ("+ coarse and kind levels, weight 1 each", ["train.taxonomy=[coarse,kind]",
                                                                   "train.taxonomy_weight=1.0"]),
}


def run(name: str, epochs: int) -> dict:
    what, extra = ROWS[name]
    cfg = load_config(CONFIG, [*BASE, f"train.epochs={epochs}", f"experiment=tx-grocery81-e{epochs}-{name}", *extra])
    prepare_data(cfg.data, cfg.folds.seed)
    s4 = stages_1_to_4(cfg)
    m = ensemble.load_member(Member(cfg.experiment, "joint", False))
    classes = m["summary"]["classes"]
    pos = {str(c): i for i, c in enumerate(classes)}
    labels = read_test_labels(cfg.data)
    y = np.array([pos[str(labels[i])] for i in m["test"]["ids"]])
    pred = np.asarray(m["test"]["probs"]).argmax(1)
    tax = pd.read_csv(TAXONOMY).set_index("class")
    coarse = np.array([tax.loc[str(c), "coarse"] for c in classes])
    counts = pd.read_csv(cfg.data.path(cfg.data.train_csv))["label"].value_counts()
    n = np.array([counts.get(str(c), 0) for c in classes])
    rare = n[y] <= np.quantile(n, 1 / 3)
    wrong = pred != y
    minutes = np.mean([read_json(cfg.run_dir.fold(k).summary)["seconds"] for k in range(cfg.folds.n_splits)]) / 60
    cv = next(r["cv_mean"] for r in s4["cv"] if r["head"] == "joint" and r["views"] == "no TTA")
    return {"row": what, "epochs": epochs, "cv": cv,
            "holdout": float(np.mean(~wrong)), "holdout_rare": float(np.mean(~wrong[rare])),
            "errors_in_coarse": float(np.mean(coarse[pred[wrong]] == coarse[y[wrong]])), "min_per_fold": minutes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", nargs="*", type=int, default=[4])
    ap.add_argument("--rows", nargs="*", default=list(ROWS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not TAXONOMY.exists():
        sys.exit(f"{TAXONOMY} not found (the shared photo sets sit beside the repository)")
    print(time.strftime("%Y-%m-%d %H:%M"))
    rows = []
    for epochs, name in itertools.product(args.epochs, args.rows):
        rows.append(run(name, epochs))
        print(markdown(rows), flush=True)


if __name__ == "__main__":
    main()
