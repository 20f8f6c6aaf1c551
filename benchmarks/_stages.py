"""Shared by the benchmark scripts: stages 1-4 of one experiment, as `./run.sh all` runs them (no ensemble)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.config import Session  # noqa: E402
from pipeline.stages import folds, infer, rebalance, train  # noqa: E402


def stages_1_to_4(cfg) -> dict:
    """Run (or skip, when up to date) folds, train, rebalance and infer; returns stage 4's summary."""
    cfg.session = Session(looks={})  # as one command: each image set is looked at once
    folds.run(cfg)
    train.run(cfg)
    rebalance.run(cfg)
    return infer.run(cfg)


def markdown(rows: list[dict]) -> str:
    """Rows of dicts as a markdown table (floats to 4 places), as the benchmark pages quote them."""
    cols = list(rows[0])
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                      *("| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows)])
