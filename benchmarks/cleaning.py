"""Label cleaning (`train.clean_labels`, #48 item 3) on real photos with synthetic label noise.

    python benchmarks/cleaning.py [--noise 0 0.1 0.2] [--actions off drop relabel]

flowers5 (configs/flowers5_pretrained.yaml: Lite0 ImageNet weights, here 64 px, 2 folds, 2 epochs, the short
fine-tune defaults) with a share of its train labels flipped to another class at random (`data/flowers5-noise<p>/`,
seeded; the test photos and their private labels are the clean originals). Per noise level and action: the
flagged rows (how many, how many of them were flipped, the share of flipped rows caught; summed over the folds'
training rows, so each flipped row counts once per fold it trains), CV (on the noisy held-out labels, as a user sees
it) and the hold-out accuracy on the clean test labels (never used by anything).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stages import markdown, stages_1_to_4  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.files.artifacts import read_json  # noqa: E402
from pipeline.tools.demo import prepare_data  # noqa: E402

CONFIG = "configs/flowers5_pretrained.yaml"
BASE = ["folds.n_splits=2", "aug.img_size=64", "train.epochs=2", "rebalance.variants=[joint]", "rebalance.probe=[]",
        "infer.views=[orig]", "infer.heads=[joint]", "ensemble.members=[]"]


def noisy_copy(root: Path, share: float, seed: int = 0) -> Path:
    """data/flowers5-noise<share>: train.csv with `share` of its labels flipped to another class (seeded), the
    flipped ids in flipped.csv; train/, test/ and the sample submission linked or copied from the original."""
    out = Path(f"{root}-noise{share:g}")
    if (out / "train.csv").exists():
        return out
    t = pd.read_csv(root / "train.csv", dtype=str)
    rng = np.random.default_rng(seed)
    classes = sorted(t["label"].unique())
    rows = rng.choice(len(t), int(round(share * len(t))), replace=False)
    for i in rows:
        others = [c for c in classes if c != t.at[i, "label"]]
        t.at[i, "label"] = others[rng.integers(len(others))]
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "test"):
        if not (out / name).exists():
            (out / name).symlink_to((root / name).resolve())
    shutil.copy(root / "sample_submission.csv", out / "sample_submission.csv")
    t.to_csv(out / "train.csv", index=False)
    pd.DataFrame({"image_id": t["image_id"].values[rows]}).to_csv(out / "flipped.csv", index=False)
    return out


def run(share: float, action: str) -> dict:
    base = load_config(CONFIG, BASE)
    prepare_data(base.data, base.folds.seed)
    root = noisy_copy(Path(base.data.root), share) if share else Path(base.data.root)
    cfg = load_config(CONFIG, [*BASE, f"data.root={root}", "data.holdout_from=null",
                               "data.test_labels=../flowers5-private/test_labels.csv",
                               f"experiment=cl-flowers5-n{share:g}-{action}",
                               *([] if action == "off" else [f"train.clean_labels={action}"])])
    t0 = time.time()
    s4 = stages_1_to_4(cfg)
    flipped = set(pd.read_csv(root / "flipped.csv", dtype=str)["image_id"]) if share else set()
    flagged = caught = flipped_train = 0
    for k in range(cfg.folds.n_splits):
        s = read_json(cfg.run_dir.fold(k).summary)
        ids = {r["id"] for r in s.get("cleaned", {}).get("rows", [])}
        flagged += len(ids)
        caught += len(ids & flipped)
        folds = pd.read_csv(cfg.folds_csv, dtype=str)
        flipped_train += len(set(folds[folds["fold"] != str(k)]["id"]) & flipped)
    from pipeline.tools.reports import leaderboard
    row = next(r for r in leaderboard.experiment_rows(cfg.run_dir) if r["head"] == "joint" and r["tta"] != "on")
    return {"noise": share, "action": action, "flagged": flagged, "flagged that were flipped": caught,
            "flipped caught": caught / flipped_train if flipped_train else float("nan"),
            "cv (noisy labels)": row["cv_mean"], "hold-out (clean labels)": row["private"],
            "minutes": (time.time() - t0) / 60}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--noise", nargs="*", type=float, default=[0.0, 0.1, 0.2])
    ap.add_argument("--actions", nargs="*", default=["off", "drop", "relabel"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    print(time.strftime("%Y-%m-%d %H:%M"))
    rows = []
    for share in args.noise:
        for action in args.actions:
            rows.append(run(share, action))
            print(markdown(rows), flush=True)


if __name__ == "__main__":
    main()
