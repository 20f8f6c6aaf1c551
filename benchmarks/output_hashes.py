"""Fingerprint a project's outputs: the sha256 of every data file that stages 1-5 write (folds, weights,
OOF and test logits, stage-3 heads and features, stage-4 predictions, submissions), one line per file.

Used to show that a refactor changes no behaviour: run `./run.sh all` on the demo before and after, in two
clean clones, and compare

    python benchmarks/output_hashes.py /path/to/clone-before > before.txt
    python benchmarks/output_hashes.py /path/to/clone-after  > after.txt
    diff before.txt after.txt      # empty: byte-identical outputs

Records (*.json), logs, histories (they hold seconds) and resume checkpoints (last.pt pickles the record
and history) carry times and machine facts, so they are left out; everything a later stage or a user reads
as data is in.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

DATA = {".csv", ".npz", ".safetensors"}
SKIP_NAMES = {"history.csv"}  # per-epoch seconds


def main(root: str) -> int:
    base = Path(root)
    n = 0
    for top in ("folds", "runs", "submissions"):
        for p in sorted((base / top).rglob("*")):
            rel = p.relative_to(base)
            if (not p.is_file() or p.suffix not in DATA or p.name in SKIP_NAMES or "logs" in rel.parts
                    or ".cache" in rel.parts or ".stats" in rel.parts):
                continue
            print(hashlib.sha256(p.read_bytes()).hexdigest()[:16], rel)
            n += 1
    print(f"{n} files", file=sys.stderr)
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
