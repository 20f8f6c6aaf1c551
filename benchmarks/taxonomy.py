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


COCO_ROOT = Path("data/grocery81-coco")


def coco_competition(csv_cfg) -> Path:
    """grocery81 as a generated COCO competition (iNaturalist / Herbarium style) whose categories carry the
    taxonomy: train.json (images, annotations, categories with `coarse` and `kind` fields, no CSV), test.json, the same
    photos (linked), ids, split and private labels as the CSV competition, so the two differ only in where the
    levels come from."""
    import json
    import os

    if (COCO_ROOT / "test.json").exists():
        return COCO_ROOT
    src = Path(csv_cfg.data.root).resolve()
    COCO_ROOT.mkdir(parents=True, exist_ok=True)
    for d in ("train", "test"):  # hard links: the same bytes, inside the root (a symlink out of it is refused)
        (COCO_ROOT / d).mkdir(exist_ok=True)
        for f in (src / d).iterdir():
            if not (COCO_ROOT / d / f.name).exists():
                os.link(f, COCO_ROOT / d / f.name)
    train = pd.read_csv(src / "train.csv", dtype=str)
    tax = pd.read_csv(TAXONOMY, dtype=str).set_index("class")
    names = sorted(train["label"].unique())
    cats = [{"id": i + 1, "name": n, "coarse": tax.loc[n, "coarse"], "kind": tax.loc[n, "kind"]}
            for i, n in enumerate(names)]
    cid = {c["name"]: c["id"] for c in cats}
    images = [{"id": r.image_id, "file_name": f"train/{r.image_id}"} for r in train.itertuples()]
    anns = [{"id": i + 1, "image_id": r.image_id, "category_id": cid[r.label]} for i, r in enumerate(train.itertuples())]
    (COCO_ROOT / "train.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    sample = pd.read_csv(src / "sample_submission.csv", dtype=str)
    sample.to_csv(COCO_ROOT / "sample_submission.csv", index=False)
    (COCO_ROOT / "test.json").write_text(json.dumps(
        {"images": [{"id": i, "file_name": f"test/{i}"} for i in sample["image_id"]]}))
    return COCO_ROOT


def run(name: str, epochs: int, coco: bool = False) -> dict:
    what, extra = ROWS[name]
    cfg = load_config(CONFIG, [*BASE, f"train.epochs={epochs}", f"experiment=tx-grocery81-e{epochs}-{name}", *extra])
    prepare_data(cfg.data, cfg.folds.seed)
    train_csv = cfg.data.path(cfg.data.train_csv)  # the rows (the COCO competition has the same ones)
    if coco:  # the same rows, the levels read from the COCO categories' fields instead of the CSV
        root = coco_competition(cfg)
        cfg = load_config(CONFIG, [*BASE, f"train.epochs={epochs}", f"experiment=tx-grocery81coco-e{epochs}-{name}",
                                   *extra, f"data.root={root}", "data.holdout_from=null", "data.layout=coco",
                                   "data.train_json=train.json", "data.test_json=test.json",
                                   "data.category_label=name", "data.taxonomy=null",
                                   f"data.test_labels={Path(cfg.data.root).resolve().parent / 'grocery81-private' / 'test_labels.csv'}"])
        what = f"COCO categories: {what}"
    s4 = stages_1_to_4(cfg)
    m = ensemble.load_member(Member(cfg.experiment, "joint", False))
    classes = m["summary"]["classes"]
    pos = {str(c): i for i, c in enumerate(classes)}
    labels = read_test_labels(cfg.data)
    y = np.array([pos[str(labels[i])] for i in m["test"]["ids"]])
    pred = np.asarray(m["test"]["probs"]).argmax(1)
    tax = pd.read_csv(TAXONOMY).set_index("class")
    coarse = np.array([tax.loc[str(c), "coarse"] for c in classes])
    counts = pd.read_csv(train_csv)["label"].value_counts()
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
    ap.add_argument("--coco", action="store_true", help="the generated COCO competition (levels from its categories)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not TAXONOMY.exists():
        sys.exit(f"{TAXONOMY} not found (the shared photo sets sit beside the repository)")
    print(time.strftime("%Y-%m-%d %H:%M"))
    rows = []
    for epochs, name in itertools.product(args.epochs, args.rows):
        rows.append(run(name, epochs, args.coco))
        print(markdown(rows), flush=True)


if __name__ == "__main__":
    main()
