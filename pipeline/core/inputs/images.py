"""Images as the user's files hold them, and one decoded copy per image set.

`read_image` is the one decoder every stage uses: upright (EXIF orientation applied), 8 bits per
channel (16-bit grey scaled by its range, not clipped), RGB (grey, palette, CMYK; alpha composited on
white), the first frame of animated GIF/TIFF. JPEGs far larger than needed are decoded at a reduced
size by the JPEG decoder itself (PIL `draft`, DCT scaling). Decompression bombs (more pixels than
PIL's limit, about 89 MP) are refused naming the file.

The store keeps every image of an image set (the train table, the test ids) once, at a storage side:
its shorter side brought down to `side` (never enlarged), aspect ratio kept. Every consumer crops and
resizes from that copy: training's RandomResizedCrop, validation's resize + centre crop, each TTA
scale. With the cache on, the copies live in one ragged uint8 file per (image set, side) under
runs/.cache/ (an offsets table, as FFCV stores images), shared by every fold, stage, scale and
experiment that reads the same files at the same side; without it, the same function produces the
same pixels on the fly, so cache on and off train identically.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from ..files import layout
from ..files.artifacts import sha256_obj
from ..errors import PipelineError
from ..report.progress import progress
from .samplers import rank_slice

log = logging.getLogger("pipeline")

STORE_FORMAT = 2  # 1: one square memmap per (image list, side) -- no longer read


# ----------------------------------------------------------------------------- decoding
BOMB = (Image.DecompressionBombWarning, Image.DecompressionBombError)  # what `open_image` raises for a bomb


@contextlib.contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """Image.open with PIL's decompression-bomb warning (more than about 89 MP) raised as an error,
    like its hard limit (twice that): the header check of stage 1 and every decode refuse alike."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            yield im


def read_image(path: str | os.PathLike, short_side: int | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB, upright. `short_side`: the caller needs no more than this on the shorter
    side, so a JPEG may be decoded at 1/2, 1/4 or 1/8 scale as long as it stays at least that big."""
    try:
        with open_image(path) as im:
            if short_side and im.format == "JPEG" and min(im.size) >= 2 * short_side:
                f = short_side / min(im.size)
                im.draft(im.mode, (math.ceil(im.size[0] * f), math.ceil(im.size[1] * f)))
            im.seek(0)  # animated GIF/TIFF/WebP: the first frame
            return _to_rgb8(ImageOps.exif_transpose(im), path)
    except BOMB as e:
        raise PipelineError(f"refused image {path}: {e} -- a decompression-bomb guard; downscale the file if it "
                            f"is genuine") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise PipelineError(f"cannot decode image {path}: {e}") from None


def _to_rgb8(im: Image.Image, path) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise PipelineError(f"cannot read image {path}: {mode} values span {a.min()}..{a.max()}, outside the "
                                f"16-bit range; convert it to 8 or 16 bits")
        return _grey(np.round(a * (255.0 / 65535.0)))
    if mode == "F":
        a = np.asarray(im)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise PipelineError(f"cannot read image {path}: floating-point pixels outside [0, 1] "
                                f"({np.nanmin(a):.3g}..{np.nanmax(a):.3g}); scale it to 8 or 16 bits")
        return _grey(np.round(a * 255.0))
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def _grey(a: np.ndarray) -> np.ndarray:
    g = np.clip(a, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


# ----------------------------------------------------------------------------- resizing
def resize_short(img: np.ndarray, side: int) -> np.ndarray:
    """Aspect ratio kept, the shorter side made `side` (area filter down, bicubic up)."""
    h, w = img.shape[:2]
    if min(h, w) == side:
        return img
    f = side / min(h, w)
    size = (side, max(1, round(w * f))) if h <= w else (max(1, round(h * f)), side)
    return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC)


def squash(img: np.ndarray, side: int) -> np.ndarray:
    """`aug.resize: squash`: a side x side square, aspect ratio not kept."""
    if img.shape[0] == side and img.shape[1] == side:
        return img
    shrink = img.shape[0] > side or img.shape[1] > side
    return cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def stored_image(path: str, side: int) -> np.ndarray:
    """The copy the store keeps: shorter side at most `side`, aspect ratio kept."""
    img = read_image(path, short_side=side)
    return resize_short(img, side) if min(img.shape[:2]) > side else img


# ----------------------------------------------------------------------------- the store
JPEG_RATIO = 8  # a q90 4:4:4 JPEG of a photo is about an eighth of its raw bytes (the `cache: auto` estimate)


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    """HxWx3 uint8 -> JPEG bytes (4:4:4 chroma: colour detail kept; PIL's libjpeg-turbo, deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


class ImageStore:
    """An image set at storage side `side`: `store[i]` is the stored HxWx3 uint8 copy of `paths[i]`.

    cache: off (decode on every read), on (build or reuse the shared cache file), auto (on when the
    estimate fits in half the free disk). `max_gb`: after building, least recently used caches of
    other image sets are removed until all caches together fit.
    """

    def __init__(self, paths: list[str], side: int, cache: str = "off", cache_dir: str | Path = layout.CACHE,
                 max_gb: float | None = None, fmt: str = "raw", quality: int = 90):
        self.paths, self.side = [str(p) for p in paths], int(side)
        self.fmt, self.quality = fmt, int(quality)
        self.dir: Path | None = None
        self._mm = self._index = None
        if cache == "off":
            return
        cache_dir = Path(cache_dir)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PipelineError(f"cannot create the image cache folder {cache_dir}: {e.strerror or e}") from e
        need = len(self.paths) * self.side * self.side * 3 * 4 // 3  # a typical 4:3 photo at the storage side
        need //= JPEG_RATIO if fmt == "jpeg" else 1
        free = shutil.disk_usage(cache_dir).free
        if cache == "auto" and need >= free // 2:
            log.info("image cache off: about %.1f GB needed, %.1f GB free", need / 1e9, free / 1e9)
            return
        self.dir = self._open_or_build(cache_dir)
        if max_gb is not None:
            evict(cache_dir, int(max_gb * 1e9), keep=self.dir)

    def key(self) -> str:
        """Which files, exactly as they are now (size and mtime), at which side."""
        files = []
        for p in self.paths:
            try:
                st = os.stat(p)
            except OSError as e:
                raise PipelineError(f"image {p} cannot be read: {e.strerror or e}") from None
            files.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
        what = {"format": STORE_FORMAT, "side": self.side, "files": files}
        if self.fmt == "jpeg":  # raw stores keep their key (and their caches)
            what["jpeg"] = self.quality
        return f"{sha256_obj(what)[:20]}-{self.side}px" + (f"-jpeg{self.quality}" if self.fmt == "jpeg" else "")

    def _open_or_build(self, cache_dir: Path) -> Path:
        final = cache_dir / self.key()
        if (final / "meta.json").exists():
            os.utime(final)  # last used, for the LRU bound
            return final
        _sweep_legacy(cache_dir)
        tmp = cache_dir / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        t0 = time.perf_counter()
        offsets, shapes, pos = [], [], 0
        try:
            with open(tmp / self._blob, "wb") as f:
                for p in progress(self.paths, len(self.paths), f"storing images at {self.side}px"
                                  + (f" as JPEG q{self.quality}" if self.fmt == "jpeg" else ""), "img"):
                    img = np.ascontiguousarray(stored_image(p, self.side))
                    data = encode_jpeg(img, self.quality) if self.fmt == "jpeg" else img.tobytes()
                    f.write(data)
                    offsets.append(pos)
                    shapes.append(img.shape[:2])
                    pos += len(data)
            offsets.append(pos)  # the end of the last one
            np.savez(tmp / "index.npz", offsets=np.asarray(offsets, np.int64),
                     shapes=np.asarray(shapes, np.int32).reshape(-1, 2))
            (tmp / "meta.json").write_text(json.dumps({
                "format": STORE_FORMAT, "side": self.side, "n": len(self.paths), "bytes": pos,
                "pixels": f"jpeg@{self.quality}" if self.fmt == "jpeg" else "raw",
                "first": self.paths[:3], "seconds": time.perf_counter() - t0}, indent=1))
            try:
                os.replace(tmp, final)  # atomic: the store appears whole or not at all
            except OSError:
                if not (final / "meta.json").exists():  # not another process that built it first
                    raise
        except OSError as e:
            raise PipelineError(f"cannot write the image cache {final}: {e.strerror or e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("stored %d images at %dpx in %s (%.1f MB, %.1fs)", len(self.paths), self.side, final, pos / 1e6,
                 time.perf_counter() - t0)
        return final

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def _blob(self) -> str:
        return "pixels.jpg" if self.fmt == "jpeg" else "pixels.u8"

    def __getitem__(self, i: int) -> np.ndarray:
        if self.dir is None:  # no cache: the same pixels, made now (a JPEG store's round trip included)
            img = stored_image(self.paths[i], self.side)
            return decode_jpeg(encode_jpeg(img, self.quality)) if self.fmt == "jpeg" else img
        if self._mm is None:  # opened lazily: once per DataLoader worker
            self._mm = np.memmap(self.dir / self._blob, dtype=np.uint8, mode="r")
            with np.load(self.dir / "index.npz") as z:
                self._index = (z["offsets"], z["shapes"])
        o, (h, w) = self._index[0][i], self._index[1][i]
        if self.fmt == "jpeg":  # decoded here, in the loader worker that asked
            return decode_jpeg(self._mm[o:self._index[0][i + 1]].tobytes())
        return np.array(self._mm[o:o + h * w * 3]).reshape(h, w, 3)

    def subset(self, rows) -> "StoreView":
        return StoreView(self, np.asarray(rows, dtype=np.int64))

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_mm"] = d["_index"] = None
        return d


class StoreView:
    """Some rows of a store (a fold's training or held-out rows): the same stored copies."""

    def __init__(self, store: ImageStore, rows: np.ndarray):
        self.store, self.rows = store, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.store[int(self.rows[i])]


class ConcatView:
    """Rows of several stores one after another (a fold's training rows, then pseudo-labelled test images)."""

    def __init__(self, *parts):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        j = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[j][i - int(self.offsets[j])]


# ----------------------------------------------------------------------------- cache management
def cache_report(cache_dir: str | Path = layout.CACHE) -> list[dict]:
    """Every store under `cache_dir` (and files of the old format), least recently used first."""
    cache_dir = Path(cache_dir)
    rows = []
    for d in sorted(cache_dir.iterdir()) if cache_dir.is_dir() else []:
        if d.is_dir() and (d / "meta.json").exists():
            meta = json.loads((d / "meta.json").read_text())
            rows.append({"store": d.name, "images": meta["n"], "side": meta["side"],
                         "bytes": sum(f.stat().st_size for f in d.iterdir()), "last_used": d.stat().st_mtime,
                         "first": (meta.get("first") or [""])[0], "path": d})
        elif d.is_file() and d.suffix in (".u8", ".json") and "px" in d.stem:
            rows.append({"store": d.name, "images": None, "side": None, "bytes": d.stat().st_size,
                         "last_used": d.stat().st_mtime, "first": "(old format: rebuilt on use)", "path": d})
    return sorted(rows, key=lambda r: r["last_used"])


def clear_cache(cache_dir: str | Path = layout.CACHE) -> int:
    """Remove every store; returns the bytes freed."""
    freed = 0
    for r in cache_report(cache_dir):
        freed += r["bytes"]
        _remove(r["path"])
    return freed


def evict(cache_dir: Path, max_bytes: int, keep: Path | None = None) -> None:
    """Remove least recently used stores (never `keep`) until all fit in `max_bytes`."""
    rows = cache_report(cache_dir)
    total = sum(r["bytes"] for r in rows)
    for r in rows:
        if total <= max_bytes:
            break
        if keep is not None and r["path"] == keep:
            continue
        _remove(r["path"])
        total -= r["bytes"]
        log.info("image cache: removed %s (%.1f MB, least recently used) to stay under aug.cache_max_gb",
                 r["store"], r["bytes"] / 1e6)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _sweep_legacy(cache_dir: Path) -> None:
    """Square memmaps of the first store format (one per image list and size): unusable now."""
    old = [r for r in cache_report(cache_dir) if r["images"] is None]
    for r in old:
        _remove(r["path"])
    if old:
        log.info("image cache: removed %d file(s) of the old square format (%.1f MB)", len(old),
                 sum(r["bytes"] for r in old) / 1e6)


# ----------------------------------------------------------------------------- datasets
class ImageDataset(Dataset):
    """Items are (uint8 HWC tensor, label). Training keys are (index, epoch): the augmentation of
    an image is seeded by (seed, epoch, index), the same in any worker and after a resume."""

    def __init__(self, store, labels: np.ndarray | None, transform, seed: int = 0, by_epoch=None):
        # by_epoch: epoch -> transform, for training keys whose transform changes (progressive resizing)
        self.store, self.transform, self.seed, self.by_epoch = store, transform, seed, by_epoch
        self.labels = labels if labels is not None else np.full(len(store), -1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, key):
        transform = self.transform
        if isinstance(key, tuple):
            i, epoch = key
            if self.by_epoch is not None:
                transform = self.by_epoch(epoch)
            transform.set_random_seed(int(np.random.default_rng([self.seed, epoch, i]).integers(2**31)))
        else:
            i = key
        img = transform(image=self.store[i])["image"]
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
