"""albumentations pipelines built from the `aug` config. They start from the stored copy of an image
(pipeline.core.inputs.images: aspect ratio kept, shorter side at the storage side) and output uint8 HWC
squares; normalisation happens on the device in a batch (pipeline.core.nets.models.Normalize).

As timm does by default (`aug.resize: keep_ratio`): training crops with RandomResizedCrop from the
stored image at close to full resolution, and validation/TTA resize the shorter side to
`img_size / crop_pct` and centre crop. `aug.resize: squash` first squashes every image to a square
(the pipeline's behaviour before 2026-11: distorts non-square photos; kept for comparison).
"""
from __future__ import annotations

import functools
import math

import albumentations as A
import numpy as np

from ..config import Config
from .policy import policy_transform
from .images import ImageStore, resize_short, squash


class ResizeShort(A.ImageOnlyTransform):
    """The shorter side to `side`, aspect ratio kept (area filter when shrinking)."""

    def __init__(self, side: int, p: float = 1.0):
        super().__init__(p=p)
        self.side = side

    def apply(self, img, **params):
        return resize_short(img, self.side)

    def get_transform_init_args_names(self):
        return ("side",)


class Squash(A.ImageOnlyTransform):
    """A side x side square, aspect ratio not kept (`aug.resize: squash`)."""

    def __init__(self, side: int, p: float = 1.0):
        super().__init__(p=p)
        self.side = side

    def apply(self, img, **params):
        return squash(img, self.side)

    def get_transform_init_args_names(self):
        return ("side",)


class TimmPolicy(A.ImageOnlyTransform):
    """A timm policy (see `policy_transform`) inside the albumentations pipeline: uint8 array -> PIL -> array.
    timm draws from Python's and NumPy's global generators; each call seeds both from this transform's own
    generator (seeded per image and epoch by the dataset) and restores them after, so the result depends only on
    (seed, epoch, index), in any worker and after a resume."""

    def __init__(self, spec: str, size: int, p: float = 1.0):
        super().__init__(p=p)
        self.spec, self.size = spec, size
        self.tf = policy_transform(spec, size)

    def get_params(self):
        return {"policy_seed": self.py_random.randrange(2 ** 31)}

    def apply(self, img, policy_seed: int = 0, **params):
        import random

        from PIL import Image

        py, npy = random.getstate(), np.random.get_state()
        random.seed(policy_seed)
        np.random.seed(policy_seed)
        try:
            out = np.array(self.tf(Image.fromarray(img)), dtype=np.uint8)  # a writable copy
        finally:
            random.setstate(py)
            np.random.set_state(npy)
        return np.ascontiguousarray(out)

    def get_transform_init_args_names(self):
        return ("spec", "size")


@functools.lru_cache(maxsize=64)
def _timm_crop_pct(arch: str) -> float:
    """The crop_pct of a timm architecture's pretrained config (0.875 when it has none)."""
    import timm

    try:
        pc = timm.get_pretrained_cfg(arch)
    except (RuntimeError, KeyError, ValueError):
        pc = None
    return float(getattr(pc, "crop_pct", None) or 0.875)


def crop_pct(cfg: Config) -> float:
    """`aug.crop_pct`, else the imported weights' (their record), else the model's pretrained config's (timm),
    else timm's default 0.875."""
    if cfg.aug.crop_pct is not None:
        return cfg.aug.crop_pct
    from ..nets.models import weights_record

    rec = weights_record(cfg.model.pretrained_path)
    if rec and rec.get("pretrained_cfg", {}).get("crop_pct"):
        return float(rec["pretrained_cfg"]["crop_pct"])
    return _timm_crop_pct(cfg.model.arch)


def load_side(cfg: Config, crop: int) -> int:
    """The side validation/TTA resize to before centre-cropping `crop`."""
    return int(round(crop / crop_pct(cfg)))


def store_side(cfg: Config) -> int:
    """The storage side of the image store: `aug.store_side`, else 1.5 x the validation load side
    (room for RandomResizedCrop's small crops and TTA scales up to about 1.3 without upsampling),
    rounded up to a multiple of 64 so that nearby settings share one store. It depends on `aug`
    alone: a new TTA scale never changes the pixels a model was trained on."""
    if cfg.aug.store_side is not None:
        return cfg.aug.store_side
    need = max(cfg.aug.img_size, load_side(cfg, cfg.aug.img_size))
    return int(math.ceil(1.5 * need / 64) * 64)


def store_format(cfg: Config) -> str:
    """`aug.store` resolved: auto is JPEG when a raw store of the train images (the folds file's rows; about
    4/3 x side^2 x 3 bytes each, a 4:3 photo) would pass aug.store_raw_max_gb, else raw. One format per
    experiment: its test images are stored as its train images are (a model sees one kind of pixels)."""
    a = cfg.aug
    if a.store != "auto":
        return a.store
    p = cfg.folds_csv
    n = _rows(str(p), (p.stat().st_mtime_ns, p.stat().st_size)) if p.exists() else 0
    return "jpeg" if n * store_side(cfg) ** 2 * 4 > a.store_raw_max_gb * 1e9 else "raw"


@functools.lru_cache(maxsize=8)
def _rows(path: str, _stamp: tuple) -> int:  # _stamp: the file's mtime and size (a rebuilt file is read again)
    with open(path, "rb") as f:
        return max(sum(1 for _ in f) - 1, 0)


def open_store(cfg: Config, paths) -> ImageStore:
    """The image store of an image set (every train row, or every test id) for this config."""
    a = cfg.aug
    return ImageStore(list(paths), store_side(cfg), a.cache, a.cache_dir, a.cache_max_gb, store_format(cfg),
                      a.store_quality)


def pixel_record(cfg: Config) -> dict:
    """The resolved settings that decide the pixels a model sees beyond the `aug` section itself (a JPEG store
    only when used: records of raw stores stay as they were)."""
    fmt = store_format(cfg)
    return {"crop_pct": crop_pct(cfg), "store_side": store_side(cfg),
            **({"store": f"jpeg@{cfg.aug.store_quality}"} if fmt == "jpeg" else {})}


def train_size(cfg: Config, epoch: int) -> int:
    """The training crop side of an epoch: `aug.size_schedule` ([[first epoch, side], ...], fastai's
    progressive resizing), else `aug.img_size`. Validation and inference always use `aug.img_size`."""
    size = cfg.aug.img_size
    for start, side in cfg.aug.size_schedule:
        if epoch >= start:
            size = side
    return size


class EpochTransforms:
    """epoch -> the training pipeline at that epoch's size (picklable, for DataLoader workers)."""

    def __init__(self, cfg: Config):
        self.cfg, self.built = cfg, {}

    def __call__(self, epoch: int) -> A.Compose:
        size = train_size(self.cfg, epoch)
        if size not in self.built:
            self.built[size] = train_transform(self.cfg, size)
        return self.built[size]


def train_transform(cfg: Config, size: int | None = None) -> A.Compose:
    a = cfg.aug
    s = size or a.img_size
    squashing = a.resize == "squash"
    if a.crop == "rrc":
        ops = ([Squash(s)] if squashing else []) + [A.RandomResizedCrop(size=(s, s), scale=tuple(a.rrc_scale))]
    else:
        big = load_side(cfg, s)
        ops = [Squash(big) if squashing else ResizeShort(big), A.RandomCrop(s, s)]
    if a.hflip:
        ops.append(A.HorizontalFlip(p=a.hflip))
    if a.vflip:
        ops.append(A.VerticalFlip(p=a.vflip))
    if a.policy:  # where timm's create_transform puts it: after the crop and flips
        ops.append(TimmPolicy(a.policy, s))
    if a.shift_scale_p:
        ops.append(A.Affine(scale=(0.9, 1.1), translate_percent=(-0.0625, 0.0625), rotate=(-a.rotate, a.rotate),
                            p=a.shift_scale_p))
    if a.color_jitter:
        j = a.color_jitter
        ops.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 4), p=0.8))
    if a.coarse_dropout:
        ops.append(A.CoarseDropout(num_holes_range=(1, 8), hole_height_range=(0.05, 0.125),
                                   hole_width_range=(0.05, 0.125), p=a.coarse_dropout))
    return A.Compose(ops)


def load_transform(cfg: Config, crop: int) -> A.Compose:
    """What the TTA loader feeds the device: a square of the load side, from which each view
    crops `crop` (centre, corners, flips). Its centre crop is exactly `valid_transform`'s."""
    big = load_side(cfg, crop)
    if cfg.aug.resize == "squash":
        return A.Compose([Squash(big)])
    return A.Compose([ResizeShort(big), A.CenterCrop(big, big)])


def valid_transform(cfg: Config, size: int | None = None) -> A.Compose:
    """Resize to size / crop_pct (shorter side; both sides when squashing), then centre crop `size`
    (default: the training size)."""
    s = size or cfg.aug.img_size
    return A.Compose([*load_transform(cfg, s).transforms, A.CenterCrop(s, s)])

