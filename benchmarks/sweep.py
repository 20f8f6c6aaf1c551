"""Sweeps (#37) on the demo: pruning's saving, and whether the nested sweep CV or the naive winner's CV is the closer
estimate of what the winner scores on the private test set (not a test).

    python benchmarks/sweep.py WORKDIR [--trials 12] [--epochs 6] [--folds 3]

In WORKDIR (a fresh folder; the demo competition is built there): a sweep of TRIALS trials over train.lr,
train.mixup_alpha, aug.img_size and train.label_smoothing with the median pruner (`A`); the same parameters,
trial for trial, with no pruning (`B`, every trial run to the end: what pruning saved, and whether a pruned trial
would have won); the winner of A through stages 1-5 (`--finish`: its private score); then a third sweep (`C`, 4
one-epoch trials) run by two workers at once (the trials split between them, none run twice). Prints the figures of
docs/benchmarks/sweep.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPACE = """train.lr: {type: float, low: 3.0e-4, high: 3.0e-2, log: true}
train.mixup_alpha: {type: float, low: 0.0, high: 0.4}
aug.img_size: {type: categorical, choices: [24, 32]}
train.label_smoothing: {type: float, low: 0.0, high: 0.2}
"""


def sh(args: list[str], cwd: Path, log: Path | None = None) -> float:
    """`python -m pipeline ARGS` in `cwd`; its seconds (its output appended to `log`)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    with open(log or os.devnull, "a") as out:
        r = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, stdout=out, stderr=out)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(args)} (see {log})")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--workers-only", action="store_true", help="only the two-worker part (C)")
    a = ap.parse_args()
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "configs").mkdir(exist_ok=True)
    for f in ("demo.yaml", "demo_gem40.yaml"):
        (work / "configs" / f).write_text((REPO / "configs" / f).read_text())
    (work / "space.yaml").write_text(SPACE)
    common = ["--config", "configs/demo.yaml", f"train.epochs={a.epochs}", f"folds.n_splits={a.folds}",
              "train.warmup_epochs=0", "run_also=[]", "ensemble.members=[]"]
    log = work / "benchmark.log"
    if a.workers_only:
        _two_workers(work, common, log, "C2")
        return 0
    t_a = sh(["sweep", "--space", "space.yaml", "--trials", str(a.trials), "sweep.name=A", *common], work, log)
    trials_a = _trials(work, "A")
    _enqueue_same(work, trials_a, common)
    t_b = sh(["sweep", "--space", "space.yaml", "--trials", str(a.trials), "sweep.name=B", "sweep.pruner=none",
              *common], work, log)
    trials_b = _trials(work, "B")
    sh(["sweep", "--finish", "sweep.name=A", *common], work, log)
    _report(work, a, t_a, t_b, trials_a, trials_b)
    _two_workers(work, common, log)
    return 0


def _trials(work: Path, name: str) -> dict:
    from pipeline.core.files.artifacts import read_json

    return read_json(work / "runs/.sweeps" / name / "trials.json")


def _enqueue_same(work: Path, trials_a: dict, common: list[str]) -> None:
    """Sweep B gets sweep A's parameters, in A's order (B runs each to the end)."""
    old = os.getcwd()
    os.chdir(work)
    try:
        from pipeline.core.config import load_config
        from pipeline.tools import sweep

        over = [x for x in common[2:]] + ["sweep.name=B", "sweep.pruner=none"]
        sw = sweep.Sweep.of(load_config(common[1], over), over, "space.yaml")
        study = sweep.open_study(sw)
        for t in trials_a["trials"]:
            study.enqueue_trial(t["params"])
    finally:
        os.chdir(old)


def _report(work: Path, a, t_a: float, t_b: float, trials_a: dict, trials_b: dict) -> None:
    from pipeline.core.files.artifacts import read_json

    sel = trials_a["selection"]
    sub = read_json(work / "submissions/A.json")
    pruned = [t for t in trials_a["trials"] if t["state"] == "pruned"]
    full = {tuple(sorted(t["params"].items())): t["value"] for t in trials_b["trials"] if t["value"] is not None}
    best_b = trials_b["selection"]
    print(f"demo, {a.trials} trials x {a.folds} folds x {a.epochs} epochs, metric {trials_a['metric']}")
    print(f"A (median pruner): {t_a / 60:.1f} min, {len(pruned)} pruned; B (every trial to the end, same "
          f"parameters): {t_b / 60:.1f} min -> pruning saved {100 * (1 - t_a / t_b):.0f}% of the wall time")
    lost = [t for t in pruned if full.get(tuple(sorted(t["params"].items()))) is not None
            and full[tuple(sorted(t["params"].items()))] >= (best_b.get("naive") or 0)]
    print(f"pruned trials that would have won when run to the end: {len(lost)} of {len(pruned)}")
    print(f"A naive winner {sel['winner']}: CV {sel['naive']:.4f} (selected on its rows); nested sweep CV "
          f"{sel['nested']:.4f}; the winner's private score {sub['private']:.4f} (stages 1-5, its submission)")
    gap_naive, gap_nested = abs(sel["naive"] - sub["private"]), abs(sel["nested"] - sub["private"])
    closer = "nested" if gap_nested < gap_naive else "naive" if gap_naive < gap_nested else "equal (nested = naive)"
    print(f"the closer estimate of the private score: {closer} "
          f"(|naive - private| {abs(sel['naive'] - sub['private']):.4f}, "
          f"|nested - private| {abs(sel['nested'] - sub['private']):.4f})")
    print(f"B: naive {best_b['naive']:.4f} ({best_b['winner']}), nested {best_b['nested']:.4f}")


def _two_workers(work: Path, common: list[str], log: Path, name: str = "C") -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [sys.executable, "-m", "pipeline", "sweep", "--space", "space.yaml", "--trials", "4", f"sweep.name={name}",
            "sweep.pruner=none", *common, "train.epochs=1"]
    t0 = time.perf_counter()
    with open(log, "a") as out:
        procs = [subprocess.Popen(args, cwd=work, env=env, stdout=out, stderr=out) for _ in range(2)]
        codes = [p.wait() for p in procs]
    s = _trials(work, name)
    exps = [t["experiment"] for t in s["trials"]]
    split = {w: sum(t["worker"] == w for t in s["trials"]) for w in dict.fromkeys(t["worker"] for t in s["trials"])}
    logs = sorted((work / "runs/.sweeps" / name / "logs").glob("*.log"))
    params = [tuple(sorted(t["params"].items())) for t in s["trials"]]
    print(f"{name}: two workers at once, exit codes {codes}, {len(s['trials'])} trials "
          f"({sum(t['state'] == 'complete' for t in s['trials'])} complete), experiments {exps}: "
          f"{'none repeated' if len(set(exps)) == len(exps) else 'REPEATED'}; trials per worker {list(split.values())}; "
          f"{len(set(params))} distinct parameter sets; {len(logs)} trial logs; "
          f"{(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
