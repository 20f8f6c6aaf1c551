"""Stage 4's stored features as files that cannot be silently wrong (#45).

Features are the stored currency: every later reader computes logits from them, so a feature file is an input like a
head file. Each one is checked three ways, at a cost that does not grow with what a reader would not read anyway:

- **while writing** (`write_features`): every value is finite, and each row's digest (its dot product with a fixed
  pseudo-random vector, float64) is kept in a sidecar `<part>.digest.npy` (V x N float64); the manifest entry records
  the shape, dtype, byte size, a sampled digest of the file (`sample_digest`: its size, first and last 64 KiB and 64
  chunks spread over it) and the sidecar's sha256;
- **on opening** (`CheckedFeatures`): the size (a truncated file), the shape against the rows the reader expects
  (rows.npz), the sampled digest (a file swapped with another backbone's or fold's) and the sidecar's sha256, before
  the file is mapped;
- **on every block read**: the block's rows against their recorded digests, so a NaN, a changed or a swapped row
  anywhere in the file is refused at the block that reads it (one dot product per row: 1/C of the logits' cost).

`damage` is the cheap half (size, sampled digest, sidecar) that stage 4's up-to-date check runs: a damaged or missing
file makes stage 4 stale. Nothing here is a cache: each check reads the file it checks.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from ..errors import PipelineError
from .artifacts import atomic_path, sha256_file
from .layout import RunDir

DIGEST_SEED = 45  # the fixed vector rows are dotted with; changing it invalidates every stored digest
SAMPLE_CHUNKS, SAMPLE_BYTES, SAMPLE_ENDS = 64, 4096, 1 << 16
DIGEST_RTOL = 1e-9  # of the row's L1 norm: float64 summation order moves a digest by ~D x 1e-16 of it


digest_path = RunDir.feature_digests


@functools.lru_cache(maxsize=16)
def _weights(d: int) -> np.ndarray:
    """The fixed vector rows of width `d` are dotted with (remembered: a reader asks for it at every block)."""
    rng = np.random.default_rng(DIGEST_SEED)
    w = rng.uniform(0.5, 1.5, d) * rng.choice([-1.0, 1.0], d)
    w.setflags(write=False)
    return w


def row_digest(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's digest (x . w, float64) and L1 norm (the scale of its tolerance), in sub-blocks of ~16 MB."""
    x = np.asarray(x)
    w = _weights(x.shape[-1])
    out, scale = np.empty(len(x), np.float64), np.empty(len(x), np.float64)
    step = max(1, (1 << 21) // max(x.shape[-1], 1))
    for a in range(0, len(x), step):
        x64 = x[a:a + step].astype(np.float64)
        out[a:a + step], scale[a:a + step] = x64 @ w, np.abs(x64).sum(-1)
    return out, scale


def sample_digest(path: Path) -> str:
    """A cheap digest of a file's bytes: its size, first and last 64 KiB and 64 chunks spread evenly over it
    (catches truncation, swaps and rewrites; a change inside one row is the per-row digests' job)."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_ENDS))
        for i in range(SAMPLE_CHUNKS):
            f.seek(size * i // SAMPLE_CHUNKS)
            h.update(f.read(SAMPLE_BYTES))
        f.seek(max(size - SAMPLE_ENDS, 0))
        h.update(f.read(SAMPLE_ENDS))
    return h.hexdigest()


def write_features(path: Path, dtype: str, n_views: int, n: int, compute, what: str) -> dict:
    """A V x N x D feature file written atomically as `compute(sink)` hands it batches: `sink(view position, first
    row, x)` with x rows x D float32 (memory: one batch). Values that are not finite in `dtype` are refused naming the
    rows; each row's digest goes to the sidecar. Returns the manifest entry the readers check the file against."""
    path = Path(path)
    with atomic_path(path, suffix=".npy") as tmp:
        st: dict = {}

        def sink(pos: int, start: int, x: np.ndarray) -> None:
            with np.errstate(over="ignore"):  # overflow is refused just below, naming the rows
                stored = np.asarray(x, dtype)
            bad = ~np.isfinite(stored).all(axis=1)
            if bad.any():
                rows = (start + np.flatnonzero(bad)[:5]).tolist()
                hint = (" (beyond float16's range: set infer.features=float32)"
                        if dtype == "float16" and np.isfinite(x[bad]).all() else " (the model's output)")
                raise PipelineError(f"{what}: pooled features not finite at rows {rows} of view {pos}{hint}")
            if not st:
                st["m"] = np.lib.format.open_memmap(tmp, "w+", dtype, (n_views, n, x.shape[1]))
                st["d"] = np.full((n_views, n), np.nan)
            st["m"][pos, start:start + len(x)] = stored
            st["d"][pos, start:start + len(x)] = row_digest(stored)[0]
        compute(sink)
        if not st:
            raise PipelineError(f"{what}: predicted no rows")
        mm = st.pop("m")
        shape = list(mm.shape)
        mm.flush()
        del mm
        if np.isnan(st["d"]).any():
            raise PipelineError(f"{what}: {int(np.isnan(st['d']).sum())} rows x views were never written")
        side = digest_path(path)
        with atomic_path(side, suffix=".npy") as t2:
            np.save(t2, st["d"])
        entry = {"shape": shape, "dtype": dtype, "bytes": os.path.getsize(tmp), "sample": sample_digest(tmp),
                 "digests": sha256_file(side, fresh=True)}
    return entry


def damage(path: Path, entry: dict) -> str | None:
    """Why the feature file at `path` is not what its manifest `entry` says (missing, size, sampled digest, sidecar),
    or None. Cheap: O(1) reads of the file, the sidecar hashed (N x V x 8 bytes)."""
    path = Path(path)
    side = digest_path(path)
    if not path.exists():
        return f"{path} is missing"
    if os.path.getsize(path) != entry["bytes"]:
        return f"{path} has {os.path.getsize(path)} bytes, stage 4 wrote {entry['bytes']} (truncated or replaced)"
    if sample_digest(path) != entry["sample"]:
        return f"{path} is not the file stage 4 wrote (its bytes differ: replaced or swapped with another)"
    if not side.exists() or sha256_file(side) != entry["digests"]:
        return f"{side} (the rows' digests of {path.name}) is missing or changed"
    return None


class CheckedFeatures:
    """A stored feature file opened after `damage` found nothing and its shape matched `n_rows`; `[view, rows]` gives
    those rows (float32) after checking each against its recorded digest. `rerun` says how to make it anew."""

    def __init__(self, path: Path, entry: dict, n_rows: int, rerun: str):
        self.path, self.rerun = Path(path), rerun
        why = damage(self.path, entry)
        if why:
            raise PipelineError(f"{why}: {rerun}")
        try:
            self.mm = np.load(self.path, mmap_mode="r")
            self.digests = np.load(digest_path(self.path))
        except (ValueError, OSError) as e:
            raise PipelineError(f"{self.path} cannot be read ({e}): {rerun}") from None
        if list(self.mm.shape) != list(entry["shape"]) or str(self.mm.dtype) != entry["dtype"]:
            raise PipelineError(f"{self.path} holds {self.mm.dtype} {list(self.mm.shape)}, stage 4 wrote "
                                f"{entry['dtype']} {entry['shape']}: {rerun}")
        if self.mm.shape[1] != n_rows or self.digests.shape != self.mm.shape[:2]:
            raise PipelineError(f"{self.path} holds {self.mm.shape[1]} rows where stage 4's rows.npz has {n_rows} "
                                f"(another part's features?): {rerun}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mm.shape)

    def __getitem__(self, key) -> np.ndarray:
        view, rows = key
        x = np.asarray(self.mm[view, rows])
        got, scale = row_digest(x)
        want = self.digests[view, rows]
        bad = ~(np.abs(got - want) <= DIGEST_RTOL * (scale + 1.0))
        if bad.any():
            first = range(self.mm.shape[1])[rows][int(np.flatnonzero(bad)[0])]
            kind = "not finite" if not np.isfinite(x[bad]).all() else "not what stage 4 wrote"
            raise PipelineError(f"{self.path}: {int(bad.sum())} row(s) of view {view} {kind} (first: row {first}; "
                                f"damaged or replaced): {self.rerun}")
        return x.astype(np.float32, copy=False)
