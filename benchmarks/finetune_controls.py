"""Benchmark of the fine-tuning controls (not a test): prints the table docs/benchmarks/finetune_controls.md quotes.

    ./run.sh all                                   # the demo, once (builds data/demo and its folds)
    python benchmarks/finetune_controls.py [--config configs/demo.yaml] [--only NAME ...]

One experiment per control, each the config's experiment with one change, trained and scored exactly
like it (stages 2-4): CV of the joint head without TTA, CV of the best stage-3 head with the TTA
policy, and their private-leaderboard scores (the demo's held-back test labels), plus minutes of
wall time. The FixRes and full-fit rows start from a copy of the baseline's run folder: stages 2-3 of
the copy are up to date (they do not depend on the experiment name), so only what the control adds
runs. Writes runs/ctl-<name>/ in the project folder (remove them afterwards if you like).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _stages import stages_1_to_4  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.files.layout import RunDir  # noqa: E402
from pipeline.stages import infer  # noqa: E402
from pipeline.tools.reports import leaderboard  # noqa: E402

CONTROLS = {  # name: (overrides, copy the baseline's run folder first)
    "base": ([], False),
    "layer-decay": (["train.layer_decay=0.75"], False),
    "head-warmup": (["train.freeze_epochs=2"], False),
    "early-stop": (["train.patience=3"], False),
    "prog-resize": (["aug.size_schedule=[[0,24],[6,32]]"], False),
    "full-fit": (["train.full_fit=true"], True),
    "fixres": (["infer.fixres.size=1.25"], True),
}


def run_one(config: str, name: str, overrides: list[str], copy: bool) -> dict:
    exp = f"ctl-{name}"
    cfg = load_config(config, [f"experiment={exp}", "run_also=[]", "ensemble.members=[]", *overrides])
    if copy and not cfg.run_dir.dir.exists():
        shutil.copytree(RunDir.of("ctl-base").dir, cfg.run_dir.dir, ignore=shutil.ignore_patterns("infer", "logs"))
    t0 = time.perf_counter()
    stages_1_to_4(cfg)
    minutes = (time.perf_counter() - t0) / 60
    rows = {(r["head"], r["tta"]): r for r in leaderboard.experiment_rows(cfg.run_dir)}
    best = infer.load_inputs(cfg).heads[0]
    joint, head = rows[("joint", "off")], rows.get((best, "on")) or rows[(best, "off")]
    return {"control": name, "change": " ".join(overrides) or "(the demo config)", "head": best,
            "cv_joint": joint["cv_mean"], "cv_head_tta": head["cv_mean"], "private_joint": joint["private"],
            "private_head_tta": head["private"], "minutes": minutes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--only", nargs="*", help="controls to run (base always runs first)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    names = ["base"] + [n for n in CONTROLS if n != "base" and (not args.only or n in args.only)]
    out = []
    for n in names:
        r = run_one(args.config, n, *CONTROLS[n])
        out.append(r)
        print(f"{r['control']:12s} {r['change']:40s} head {r['head']:6s} CV joint {r['cv_joint']:.4f}  "
              f"CV head+TTA {r['cv_head_tta']:.4f}  private joint {r['private_joint']:.4f}  "
              f"private head+TTA {r['private_head_tta']:.4f}  {r['minutes']:.1f} min", flush=True)
    print("\n| control | change | CV joint | CV head+TTA | private joint | private head+TTA | minutes |")
    print("|---|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['control']} | `{r['change']}` | {r['cv_joint']:.4f} | {r['cv_head_tta']:.4f} | "
              f"{r['private_joint']:.4f} | {r['private_head_tta']:.4f} | {r['minutes']:.1f} |")


if __name__ == "__main__":
    main()
