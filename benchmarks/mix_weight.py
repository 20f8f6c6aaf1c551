"""#47 lead, measured before building it: the mix head (infer.mix) with its weight chosen, nested, instead of the fixed
1:1 average of the fine-tuned and the probe part's logits.

Reads the finished compute runs of benchmarks/pretrained.py (runs/cp-<set>-64-e<epochs>-<recipe>[-s<seed>]): for
each, the two parts stage 4's mix head chose (per fold without the fold, and on all folds for the test images),
their cross-fitted held-out logits of stage 3 and their test logits of stage 4 (no TTA). For a weight w of the
fine-tuned part (the probe's 1 - w), w from a grid, it prints:

- the nested CV: fold k's held-out rows with the parts and the weight chosen on the other folds (as stage 4 chooses
  the parts), against the same with w = 0.5 (today's mix: the same figure stage 4 reports for the mix head);
- the hold-out accuracy of the test images with the parts and the weight chosen on every fold.

No pipeline code changes; nothing is written. Usage:
    python benchmarks/mix_weight.py [--runs cp-flowers5-64-e4-before47-bs32 ...] [--grid 0.25 0.5 0.75]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.files.artifacts import read_json  # noqa: E402
from pipeline.core.files.layout import RunDir  # noqa: E402
from pipeline.core.inputs.data import read_test_labels  # noqa: E402
from pipeline.core.predict.stored import HeldOut, Stage4  # noqa: E402
from pipeline.core.predict.tta import BASELINE  # noqa: E402

SETS = {"flowers5": "configs/flowers5_pretrained.yaml", "grocery81": "configs/grocery81_pretrained.yaml"}
DEFAULT_RUNS = [f"cp-{s}-64-e{e}-before47-bs32{t}" for s in SETS for e in (1, 2, 3, 4, 6, 8) for t in ("",)] + \
    [f"cp-{s}-64-e{e}-before47-bs32-s{seed}" for s in SETS for e in (2, 4) for seed in (1, 2)]


def accuracy(y: np.ndarray, logits: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def held(run: RunDir, k: int, v: str) -> tuple[np.ndarray, np.ndarray]:
    o = HeldOut.of(run, k, v).read()
    return o["y"], o["logits"].astype(np.float64)


def fold_score(run: RunDir, k: int, parts: list[str], w: float) -> float:
    (y, a), (_, b) = held(run, k, parts[0]), held(run, k, parts[1])
    return accuracy(y, w * a + (1 - w) * b)


def choose(run: RunDir, ks: list[int], parts: list[str], grid: list[float]) -> float:
    """The weight with the best mean accuracy over folds ks (ties: the one nearest 0.5, then the smaller)."""
    return max(grid, key=lambda w: (np.mean([fold_score(run, k, parts, w) for k in ks]), -abs(w - 0.5), -w))


def test_logits(run: RunDir, v: str, summary: dict) -> np.ndarray:
    t = Stage4.of(run, v, "test", summary).table()
    at = list(summary["store"]["views"]).index(BASELINE)
    return t[[at], slice(None)][0].astype(np.float64)


def one(name: str, grid: list[float]) -> dict:
    run = RunDir.of(name)
    s = read_json(run.infer_summary)
    mix = s["mix"]
    folds = list(range(len(mix["per_fold"])))
    nested = {}
    for label, pick in (("w=0.5", lambda ks, parts: 0.5), ("nested w", lambda ks, parts: choose(run, ks, parts, grid))):
        ws = [pick([j for j in folds if j != k], mix["per_fold"][k]) for k in folds]
        nested[label] = (float(np.mean([fold_score(run, k, mix["per_fold"][k], w) for k, w in zip(folds, ws)])), ws)
    set_name = name.split("-")[1]
    labels = read_test_labels(load_config(SETS[set_name], []).data)
    ids = Stage4.of(run, mix["all"][0], "test", s).ids()
    pos = {str(c): i for i, c in enumerate(s["classes"])}
    y = np.array([pos[str(labels[i])] for i in ids])
    a, b = test_logits(run, mix["all"][0], s), test_logits(run, mix["all"][1], s)
    w_all = choose(run, folds, mix["all"], grid)
    return {"run": name, "parts": " + ".join(mix["all"]), "cv_05": nested["w=0.5"][0], "cv_w": nested["nested w"][0],
            "ws": nested["nested w"][1], "w_all": w_all, "hold_05": accuracy(y, 0.5 * a + 0.5 * b),
            "hold_w": accuracy(y, w_all * a + (1 - w_all) * b)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=DEFAULT_RUNS)
    ap.add_argument("--grid", nargs="*", type=float, default=[0.25, 0.5, 0.75])
    args = ap.parse_args()
    print("| run | parts (test) | CV, w = 0.5 | CV, w nested (per fold) | hold-out, w = 0.5 | hold-out, w on all folds |")
    print("|---|---|---|---|---|---|")
    for name in args.runs:
        if not RunDir.of(name).infer_summary.exists():
            continue
        r = one(name, args.grid)
        print(f"| {r['run']} | {r['parts']} | {r['cv_05']:.4f} | {r['cv_w']:.4f} ({', '.join(map(str, r['ws']))}) | "
              f"{r['hold_05']:.4f} | {r['hold_w']:.4f} (w {r['w_all']}) |", flush=True)


if __name__ == "__main__":
    main()
