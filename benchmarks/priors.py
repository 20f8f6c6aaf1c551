"""Test-time prior estimation (`ensemble.prior`, #48 item 2), measured on real photos.

    python benchmarks/priors.py [--sets flowers5 grocery81] [--epochs 0 4]

Two settings per set (Lite0 at 64 px, 2 folds, the pretrained weights of configs/<set>_pretrained.yaml):
- **as it is**: the set's train rows (mildly imbalanced: grocery81 35-143 photos a class), the stratified hold-out
  (the same prior): the step must cost nothing here;
- **long-tailed train**: the train rows cut to an exponential profile (the largest class keeps all its photos,
  the smallest 1/20 of them; `data/<set>-lt/`, the same test photos and private labels): the realistic case,
  a long-tailed train set and a test set that is not.

For each, an experiment's stages 1-4 (the probe at `train.epochs=0`, or the short fine-tune at 4; skipped when
up to date), then stage 5 with `ensemble.prior` none / em / bbse. Printed per method: whether the test found a
shift, the hold-out (private) accuracy and log-loss without and with the prior, the shift report on re-sampled
OOF rows (stage 5's own honest measurement), and the hold-out rows re-sampled to the same three shifts (the
prior estimated on them, the temperature and source prior from the OOF rows: real test labels, never used by
stage 5).
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
from _stages import stages_1_to_4  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.files.artifacts import read_json  # noqa: E402
from pipeline.core.inputs.data import read_test_labels  # noqa: E402
from pipeline.core.predict import priors  # noqa: E402
from pipeline.core.predict.submission import Member  # noqa: E402
from pipeline.stages import ensemble  # noqa: E402
from pipeline.tools.demo import prepare_data  # noqa: E402

SETS = {"flowers5": "configs/flowers5_pretrained.yaml", "grocery81": "configs/grocery81_pretrained.yaml"}
BASE = ["folds.n_splits=2", "aug.img_size=64", "rebalance.variants=[joint]", "infer.views=[orig]",
        "infer.heads=[joint]", "ensemble.members=[]"]
IMBALANCE = 20.0  # the long-tailed cut: the largest class keeps every photo, the smallest 1 / IMBALANCE


def long_tailed(root: Path, out: Path, seed: int = 0) -> Path:
    """data/<set>-lt: the train rows cut to an exponential profile over the classes (in a seeded random order of
    classes); test/ and the sample submission are the set's own (linked)."""
    if (out / "train.csv").exists():
        return out
    t = pd.read_csv(root / "train.csv")
    rng = np.random.default_rng(seed)
    classes = rng.permutation(sorted(t["label"].unique()))
    keep = []
    for i, c in enumerate(classes):
        rows = t[t["label"] == c]
        share = IMBALANCE ** (-i / max(len(classes) - 1, 1))
        keep.append(rows.sample(max(2, int(round(len(rows) * share))), random_state=seed))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "test"):
        if not (out / name).exists():
            (out / name).symlink_to((root / name).resolve())
    shutil.copy(root / "sample_submission.csv", out / "sample_submission.csv")
    pd.concat(keep).sort_index().to_csv(out / "train.csv", index=False)
    return out


def holdout_shifts(cfg, method: str, seed: int = 0) -> list[dict]:
    """The hold-out rows re-sampled to the shifts: the prior estimated and applied on them (temperature, source
    prior and BBSE's confusion matrix from the OOF rows), scored against the private labels."""
    m = ensemble.load_member(Member(cfg.experiment, None, False))
    classes = m["summary"]["classes"]
    labels = read_test_labels(cfg.data)
    pos = {str(c): i for i, c in enumerate(classes)}
    y_test = np.array([pos[str(labels[i])] for i in m["test"]["ids"]])
    test = np.asarray(m["test"]["probs"], np.float64)
    oof, y = np.asarray(m["oof"]["probs"], np.float64), m["oof"]["y"]
    t = priors.fit_temperature(oof, y) if method == "em" else 1.0
    source = priors.source_prior(method, oof, y, t)
    rng = np.random.default_rng(seed)
    out = []
    for s in priors.SHIFTS:
        rows = np.arange(len(y_test))
        if s != "none":
            rows = priors.resample(y_test, priors.shifted_prior(s, priors.class_prior(y, len(classes)), rng), rng)
        p, yk = test[rows], y_test[rows]
        after, rec = priors.adjusted(method, p, source, oof, y, t)
        acc0, ll0 = priors._scores(p, yk)
        acc1, ll1 = priors._scores(after, yk)
        out.append({"shift": s, "applied": rec["applied"], "acc": acc0, "acc_prior": acc1, "ll": ll0,
                    "ll_prior": ll1})
    return out


def run(set_name: str, lt: bool, epochs: int) -> list[dict]:
    tag = f"pr-{set_name}{'-lt' if lt else ''}-e{epochs}"
    cfg = load_config(SETS[set_name], [*BASE, f"train.epochs={epochs}", f"experiment={tag}"])
    prepare_data(cfg.data, cfg.folds.seed)
    if lt:
        root = long_tailed(cfg.data.path("."), Path(f"data/{set_name}-lt"))
        cfg = load_config(SETS[set_name], [*BASE, f"train.epochs={epochs}", f"experiment={tag}",
                                           f"data.root={root}", "data.holdout_from=null",
                                           f"data.test_labels=../{set_name}-private/test_labels.csv"])
    n_train = len(pd.read_csv(cfg.data.path(cfg.data.train_csv)))
    t0 = time.time()
    stages_1_to_4(cfg)
    rows = []
    for method in ("none", "em", "bbse"):
        e = load_config(SETS[set_name], [*BASE, f"train.epochs={epochs}", f"experiment={tag}",
                                         *([f"data.root={cfg.data.root}", "data.holdout_from=null",
                                            f"data.test_labels=../{set_name}-private/test_labels.csv"] if lt else []),
                                         f"ensemble.prior={method}", f"ensemble.name={tag}-{method}"])
        t1 = time.time()
        res = ensemble.run(e, force=True)  # the code may have changed since (records hold settings, not code)
        pr = res["prior"] or {}
        rows.append({"set": set_name + (" long-tailed train" if lt else ""), "train rows": n_train,
                     "epochs": epochs, "method": method, "applied": pr.get("applied", ""),
                     "p": pr.get("p_value", float("nan")), "private": res["private"],
                     "private without": pr.get("private_without", res["private"]),
                     "stage5 s": time.time() - t1, "shifts": pr.get("shifts", []),
                     "holdout": holdout_shifts(e, method) if method != "none" else []})
    print(f"{tag}: stages 1-4 {time.time() - t0:.0f} s", flush=True)
    return rows


def show(rows: list[dict]) -> None:
    print("\n| set | train rows | epochs | prior | applied (p) | hold-out acc without -> with | stage 5 s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ap = f"{r['applied']} ({r['p']:.2g})" if r["method"] != "none" else ""
        print(f"| {r['set']} | {r['train rows']} | {r['epochs']} | {r['method']} | {ap} | "
              f"{r['private without']:.4f} -> {r['private']:.4f} | {r['stage5 s']:.1f} |")
    print("\nper shift: accuracy gain / log-loss gain (positive = better), shift report on re-sampled OOF rows "
          "(stage 5, mean over folds) | hold-out rows re-sampled (private labels)")
    print("| set | epochs | prior | " + " | ".join(priors.SHIFTS) + " |")
    print("|---|---|---|" + "---|" * len(priors.SHIFTS))
    for r in rows:
        if r["method"] == "none":
            continue
        cells = []
        for s, h in zip(r["shifts"], r["holdout"]):
            cells.append(f"OOF {s['accuracy_gain']:+.3f} / {s['log_loss_gain']:+.3f} (applied {s['applied_share']:.1f}); "
                         f"hold-out {h['acc_prior'] - h['acc']:+.3f} / {h['ll'] - h['ll_prior']:+.3f}"
                         f"{'' if h['applied'] else ' (not applied)'}")
        print(f"| {r['set']} | {r['epochs']} | {r['method']} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", nargs="*", default=list(SETS))
    ap.add_argument("--epochs", nargs="*", type=int, default=[0])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    print(f"{time.strftime('%Y-%m-%d %H:%M')}")
    rows = []
    for epochs in args.epochs:
        for set_name in args.sets:
            for lt in (False, True):
                rows += run(set_name, lt, epochs)
                show(rows[-3:])
    show(rows)


if __name__ == "__main__":
    main()
