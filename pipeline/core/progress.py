"""Progress of long loops, on a terminal and in a log file alike.

On a terminal: a tqdm bar. Otherwise (a log file, nohup, a notebook, CI) tqdm would print nothing, so
a plain log line goes out every 10 % of the work or every 30 s, whichever comes later, with the rate
and the time left."""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

log = logging.getLogger("pipeline")
T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str, unit: str = "it", every_s: float = 30.0) -> Iterator[T]:
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=desc, unit=unit, leave=False, mininterval=1)
        return
    t0 = last = time.perf_counter()
    step = max(1, total // 10)
    next_at = step
    for i, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if i >= next_at and now - last >= every_s or i == total and now - t0 >= every_s:
            rate = i / max(now - t0, 1e-9)
            log.info("%s: %d/%d %s (%.0f%%), %.1f %s/s, %s left", desc, i, total, unit, 100 * i / total, rate, unit,
                     _clock((total - i) / rate))
            last = now
            next_at = i + step


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
