"""`./run.sh cache [--clear]`: what the decoded-image stores under `aug.cache_dir` hold and cost on
disk (one store per image set and storage side, least recently used first), or remove them all.
A store is rebuilt on next use; `aug.cache_max_gb` bounds the total automatically."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from ..core.inputs.images import cache_report, clear_cache


def describe(cache_dir: str | Path) -> str:
    rows = cache_report(cache_dir)
    if not rows:
        return f"no image stores in {cache_dir}"
    t = pd.DataFrame([{"store": r["store"], "images": "" if r["images"] is None else r["images"],
                       "side": "" if r["side"] is None else r["side"], "MB": r["bytes"] / 1e6,
                       "last used": time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"])),
                       "first image": r["first"]} for r in rows])
    total = sum(r["bytes"] for r in rows)
    return (f"image stores in {cache_dir} (least recently used first):\n"
            f"{t.to_string(index=False, float_format=lambda v: f'{v:.1f}')}\n"
            f"total {total / 1e6:.1f} MB in {len(rows)} store(s); ./run.sh cache --clear removes them")


def run(cache_dir: str | Path, clear: bool = False) -> str:
    if clear:
        freed = clear_cache(cache_dir)
        return f"removed the image stores in {cache_dir}: {freed / 1e6:.1f} MB freed"
    return describe(cache_dir)
