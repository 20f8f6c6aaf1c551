"""How far the whole config travels: every function whose parameters include the `Config` (annotated `Config`, a
list of them, or an un-annotated `cfg`/`mcfg`), counted per folder, and those in the numeric modules (which should
have none). tests/test_architecture.py holds the list of the edges allowed to take it.

    python benchmarks/config_edges.py [--list]

Figures (2026-12-03, docs/architecture.md "The config at the edges"): 159 before issue #34's work (2ba3fde), 140 half
way (a5d9d7d), 44 after (021c6ba; 46 at b6cb744+: + the sweep command's three edges, - ensemble_record), every
one an edge: a stage's run/status/Job.of, a command's handler, a tool's entry, a record or serialiser of the config;
0 in the numeric modules (loop, heads, metrics, images, augment, models, tta, losses, samplers; 14 before).
"""
from __future__ import annotations

import ast
import collections
import re
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pipeline"
NUMERIC = {"loop", "heads", "metrics", "images", "augment", "models", "tta", "losses", "samplers"}


def takes_config(node: ast.FunctionDef) -> bool:
    for a in node.args.args + node.args.kwonlyargs:
        ann = ast.unparse(a.annotation).strip("\"'") if a.annotation else ""
        if re.search(r"\bConfig\b", ann) or (a.arg in ("cfg", "mcfg") and not ann):
            return True
    return False


def main(show: bool) -> int:
    per, numeric, names = collections.Counter(), [], []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG)
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and takes_config(node):
                per[str(rel.parent)] += 1
                names.append(f"{rel}:{node.name}")
                if p.stem in NUMERIC:
                    numeric.append(names[-1])
    print(f"functions taking the whole config: {sum(per.values())}")
    for folder, n in sorted(per.items()):
        print(f"  {folder:<16} {n}")
    print(f"in the numeric modules: {len(numeric)} {numeric}")
    if show:
        print("\n".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main("--list" in sys.argv))
