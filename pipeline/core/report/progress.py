"""Progress of long loops, on a terminal and in a log file alike.

On a terminal: a tqdm bar. Otherwise (a log file, nohup, a notebook, CI) tqdm would print nothing, so
a plain log line goes out every 10 % of the work or every 30 s, whichever comes later, with the rate
and the time left. `progress()` wraps an iterable; `Progress` is the same counter for work that is
spread over several loops (stage 4 and `predict`: every fold, scale and member on one bar)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

log = logging.getLogger("pipeline")
T = TypeVar("T")


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "it", every_s: float = 30.0, enabled: bool = True):
        self.total, self.desc, self.unit, self.every_s = max(int(total), 1), desc, unit, every_s
        self.done, self.enabled, self.extra = 0, enabled, {}
        self.t0 = self.last = time.perf_counter()
        self.step = max(1, self.total // 10)
        self.next_at = self.step
        self.bar = (tqdm(total=self.total, desc=desc, unit=unit, leave=False, mininterval=1)
                    if enabled and sys.stderr.isatty() else None)

    def postfix(self, **values) -> None:
        """Running numbers shown next to the count (a loss, images/s)."""
        self.extra = values
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if (self.done >= self.next_at and now - self.last >= self.every_s
                or self.done >= self.total and now - self.t0 >= self.every_s):
            rate = self.done / max(now - self.t0, 1e-9)
            extra = "".join(f", {k} {v}" for k, v in self.extra.items())
            log.info("%s: %d/%d %s (%.0f%%), %.1f %s/s, %s left%s", self.desc, self.done, self.total, self.unit,
                     100 * self.done / self.total, rate, self.unit, _clock(max(self.total - self.done, 0) / rate), extra)
            self.last = now
            self.next_at = self.done + self.step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(items: Iterable[T], total: int, desc: str, unit: str = "it", every_s: float = 30.0,
             enabled: bool = True) -> Iterator[T]:
    with Progress(total, desc, unit, every_s, enabled) as bar:
        for item in items:
            yield item
            bar.update()


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
