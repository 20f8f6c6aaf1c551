"""#49: stage 3's feature cache in float16 (rebalance.features) against float32, on finished runs of real photos.

For each run (a compute run of benchmarks/pretrained.py: runs/cp-<set>-<size>-e<epochs>-<recipe>), stages 1-2 are
hard-linked into runs/fp16-<run>, stage 3 runs again with rebalance.features=float16, and it prints per run: the
cache's bytes (each fold's features.npz and the probe features) in both precisions, every variant's stage-3 CV in
both, the largest CV difference, and the variant each chooses (the report's best).

    python benchmarks/feature_precision.py [--runs cp-flowers5-64-e2-before47-bs32 ...]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.files.artifacts import read_json  # noqa: E402
from pipeline.core.files.layout import RunDir  # noqa: E402
from pipeline.stages import rebalance  # noqa: E402

DEFAULT_RUNS = ["cp-flowers5-64-e2-before47-bs32", "cp-grocery81-64-e2-before47-bs32", "cp-cifar10lt-64-e2-before47-bs32"]


def cache_bytes(run: RunDir, n: int) -> int:
    files = [run.fold(k).features for k in range(n)] + [run.probe_features]
    return sum(f.stat().st_size for f in files if f.exists())


def table(run: RunDir) -> dict[str, float]:
    s = read_json(run.rebalance_summary)
    return {r["variant"]: r[f"{s['metric']}_mean"] for r in s["table"]}


def one(name: str) -> dict:
    base = RunDir.of(name)
    cfg32 = load_config(base.config, [])
    exp = f"fp16-{name}"
    cfg = load_config(base.config, [f"experiment={exp}", "rebalance.features=float16"])
    if not cfg.run_dir.dir.exists():  # stages 1-2 linked (stage 3 replaces files, it never writes into one)
        shutil.copytree(base.dir, cfg.run_dir.dir, copy_function=os.link,
                        ignore=shutil.ignore_patterns("rebalance", "infer", "logs", "last.pt"))
    rebalance.run(cfg)
    a, b = table(base), table(cfg.run_dir)
    n = cfg32.folds.n_splits
    return {"run": name, "bytes32": cache_bytes(base, n), "bytes16": cache_bytes(cfg.run_dir, n),
            "max_diff": max(abs(a[v] - b[v]) for v in a), "best32": read_json(base.rebalance_summary)["best"],
            "best16": read_json(cfg.run_dir.rebalance_summary)["best"],
            "chosen_diff": abs(a[read_json(base.rebalance_summary)["best"]] - b[read_json(cfg.run_dir.rebalance_summary)["best"]])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=DEFAULT_RUNS)
    args = ap.parse_args()
    print("| run | cache MB, float32 / float16 | largest CV difference over the variants | best variant, float32 / float16 | its CV difference |")
    print("|---|---|---|---|---|")
    for name in args.runs:
        r = one(name)
        print(f"| {r['run']} | {r['bytes32'] / 1e6:.1f} / {r['bytes16'] / 1e6:.1f} | {r['max_diff']:.2e} | "
              f"{r['best32']} / {r['best16']} | {r['chosen_diff']:.2e} |", flush=True)


if __name__ == "__main__":
    main()
