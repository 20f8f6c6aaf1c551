"""What decides the pixels a model sees, resolved once from the config's `aug` and `model` sections and the folds
file: crop_pct, the image store's side and format (`Pixels`). `pixels(cfg)` is the edge where the config is read;
augment, images and inference take the resolved `Pixels`."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

from ..config import AugCfg, Config, ModelCfg


def pixels(cfg: Config) -> "Pixels":
    """The resolved pixel settings of an experiment config."""
    return Pixels.resolve(cfg.aug, cfg.model, cfg.folds_csv)


@functools.lru_cache(maxsize=64)
def _timm_crop_pct(arch: str) -> float:
    """The crop_pct of a timm architecture's pretrained config (0.875 when it has none)."""
    import timm

    try:
        pc = timm.get_pretrained_cfg(arch)
    except (RuntimeError, KeyError, ValueError):
        pc = None
    return float(getattr(pc, "crop_pct", None) or 0.875)


@dataclass(frozen=True)
class Pixels:
    """Everything that decides the pixels a model sees, resolved once (`Config.pixels()` at the edge): the `aug`
    section, crop_pct (`aug.crop_pct`, else the imported weights' record, else timm's pretrained config, else
    0.875), the image store's side and format. Every function below takes it, never the whole config."""
    aug: AugCfg
    crop_pct: float
    store_side: int
    store_format: str

    @classmethod
    def resolve(cls, aug: AugCfg, model: ModelCfg, folds_csv: Path) -> "Pixels":
        crop = aug.crop_pct if aug.crop_pct is not None else _weights_crop_pct(model)
        side = aug.store_side if aug.store_side is not None else _store_side(aug.img_size, crop)
        return cls(aug, crop, side, _store_format(aug, side, folds_csv))


def _weights_crop_pct(model: ModelCfg) -> float:
    from ..nets.models import weights_record

    rec = weights_record(model.pretrained_path)
    if rec and rec.get("pretrained_cfg", {}).get("crop_pct"):
        return float(rec["pretrained_cfg"]["crop_pct"])
    return _timm_crop_pct(model.arch)


def _store_side(img_size: int, crop_pct: float) -> int:
    """The storage side of the image store (without `aug.store_side`): 1.5 x the validation load side (room for
    RandomResizedCrop's small crops and TTA scales up to about 1.3 without upsampling), rounded up to a multiple
    of 64 so that nearby settings share one store. It depends on `aug` alone: a new TTA scale never changes the
    pixels a model was trained on."""
    need = max(img_size, int(round(img_size / crop_pct)))
    return int(math.ceil(1.5 * need / 64) * 64)


def _store_format(aug: AugCfg, side: int, folds_csv: Path) -> str:
    """`aug.store` resolved: auto is JPEG when a raw store of the train images (the folds file's rows; about
    4/3 x side^2 x 3 bytes each, a 4:3 photo) would pass aug.store_raw_max_gb, else raw. One format per
    experiment: its test images are stored as its train images are (a model sees one kind of pixels)."""
    if aug.store != "auto":
        return aug.store
    p = folds_csv
    n = _rows(str(p), (p.stat().st_mtime_ns, p.stat().st_size)) if p.exists() else 0
    return "jpeg" if n * side ** 2 * 4 > aug.store_raw_max_gb * 1e9 else "raw"


@functools.lru_cache(maxsize=8)
def _rows(path: str, _stamp: tuple) -> int:  # _stamp: the file's mtime and size (a rebuilt file is read again)
    with open(path, "rb") as f:
        return max(sum(1 for _ in f) - 1, 0)


