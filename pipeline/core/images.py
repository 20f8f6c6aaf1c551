"""Image loading for training and inference: an optional on-disk cache of decoded, pre-resized
images, and the datasets the DataLoaders read from.

Every image is first brought to a square of `side` pixels (decode, RGB, resize); the transforms of
pipeline.core.augment then work from that. The cache memoises exactly this step in one uint8 memmap per
(image list, side), so runs with and without the cache see the same pixels, and epochs after the
first decode no JPEG at all. Caches are shared by experiments (same images, same side).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from . import layout
from .artifacts import atomic_path, read_json, sha256_obj, write_json
from .data import read_image
from .samplers import rank_slice

log = logging.getLogger("pipeline")


def load_square(path: str, side: int) -> np.ndarray:
    img = read_image(path)
    if img.shape[0] != side or img.shape[1] != side:
        shrink = img.shape[0] > side or img.shape[1] > side
        img = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return img


class ImageStore:
    """paths -> HxWx3 uint8 images at `side`, from the cache when there is one."""

    def __init__(self, paths: list[str], side: int, cache: str = "off", cache_dir: str | Path = layout.CACHE):
        self.paths, self.side = list(paths), side
        self.cache_file: Path | None = None
        self._mm = None
        if cache != "off":
            need = len(self.paths) * side * side * 3
            cache_dir = Path(cache_dir)
            cache_dir.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(cache_dir).free
            if cache == "on" or need < free // 2:
                self.cache_file = self._build(cache_dir)
            else:
                log.info("image cache off: %.1f GB needed, %.1f GB free", need / 1e9, free / 1e9)

    def _key(self) -> str:
        stats = []
        for p in self.paths:
            st = os.stat(p)
            stats.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
        return sha256_obj({"side": self.side, "files": stats})[:20]

    def _build(self, cache_dir: Path) -> Path:
        key = self._key()
        f = cache_dir / f"{key}_{self.side}px.u8"
        meta = cache_dir / f"{key}_{self.side}px.json"
        if f.exists() and meta.exists() and read_json(meta).get("n") == len(self.paths):
            return f
        shape = (len(self.paths), self.side, self.side, 3)
        with atomic_path(f) as tmp:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            for i, p in enumerate(tqdm(self.paths, desc=f"caching images at {self.side}px", leave=False,
                                       disable=None, mininterval=2)):
                mm[i] = load_square(p, self.side)
            mm.flush()
            del mm
        write_json(meta, {"n": len(self.paths), "side": self.side, "first": self.paths[:3]})
        log.info("cached %d images at %dpx in %s (%.1f MB)", len(self.paths), self.side, f,
                 f.stat().st_size / 1e6)
        return f

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.cache_file is None:
            return load_square(self.paths[i], self.side)
        if self._mm is None:  # opened lazily: once per DataLoader worker
            self._mm = np.load(self.cache_file, mmap_mode="r")
        return np.array(self._mm[i])

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_mm"] = None
        return d


class ImageDataset(Dataset):
    """Items are (uint8 HWC tensor, label). Training keys are (index, epoch): the augmentation of
    an image is seeded by (seed, epoch, index), the same in any worker and after a resume."""

    def __init__(self, store: ImageStore, labels: np.ndarray | None, transform, seed: int = 0):
        self.store, self.transform, self.seed = store, transform, seed
        self.labels = labels if labels is not None else np.full(len(store), -1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            i, epoch = key
            self.transform.set_random_seed(int(np.random.default_rng([self.seed, epoch, i]).integers(2**31)))
        else:
            i = key
        img = self.transform(image=self.store[i])["image"]
        return torch.from_numpy(np.ascontiguousarray(img)), int(self.labels[i])


class EpochBatches:
    """Batch sampler: this process's share of each global batch of an epoch's sampler order."""

    def __init__(self, make_indices, n_samples: int, batch_size: int, world: int = 1, rank: int = 0):
        self.make_indices, self.n_samples = make_indices, n_samples
        self.batch_size, self.world, self.rank = batch_size, world, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[np.ndarray]:
        idx = self.make_indices(self.epoch)
        g = self.batch_size * self.world
        n = len(idx) // g  # drop the ragged end: even, full batches for mixup and equal ranks
        return [idx[b * g:(b + 1) * g] for b in range(n)]

    def __iter__(self):
        for batch in self._global_batches():
            share = rank_slice(batch, self.rank, self.world)
            yield [(int(i), self.epoch) for i in share]

    def __len__(self) -> int:
        return self.n_samples // (self.batch_size * self.world)
