"""albumentations pipelines built from the `aug` config. They start from the stored copy of an image
(pipeline.core.inputs.images: aspect ratio kept, shorter side at the storage side) and output uint8 HWC
squares; normalisation happens on the device in a batch (pipeline.core.nets.models.Normalize).

As timm does by default (`aug.resize: keep_ratio`): training crops with RandomResizedCrop from the
stored image at close to full resolution, and validation/TTA resize the shorter side to
`img_size / crop_pct` and centre crop. `aug.resize: squash` first squashes every image to a square
(the pipeline's behaviour before 2026-11: distorts non-square photos; kept for comparison).
"""
from __future__ import annotations

import albumentations as A
import numpy as np

from ..config import AugCfg
from .pixels import Pixels
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


def load_side(px: Pixels, crop: int) -> int:
    """The side validation/TTA resize to before centre-cropping `crop`."""
    return int(round(crop / px.crop_pct))


def open_store(px: Pixels, paths) -> ImageStore:
    """The image store of an image set (every train row, or every test id) for these pixel settings."""
    a = px.aug
    return ImageStore(list(paths), px.store_side, a.cache, a.cache_dir, a.cache_max_gb, px.store_format,
                      a.store_quality)


def pixel_record(px: Pixels) -> dict:
    """The resolved settings that decide the pixels a model sees beyond the `aug` section itself (a JPEG store
    only when used: records of raw stores stay as they were)."""
    return {"crop_pct": px.crop_pct, "store_side": px.store_side,
            **({"store": f"jpeg@{px.aug.store_quality}"} if px.store_format == "jpeg" else {})}


def train_size(aug: AugCfg, epoch: int) -> int:
    """The training crop side of an epoch: `aug.size_schedule` ([[first epoch, side], ...], fastai's
    progressive resizing), else `aug.img_size`. Validation and inference always use `aug.img_size`."""
    size = aug.img_size
    for start, side in aug.size_schedule:
        if epoch >= start:
            size = side
    return size


class EpochTransforms:
    """epoch -> the training pipeline at that epoch's size (picklable, for DataLoader workers)."""

    def __init__(self, px: Pixels):
        self.px, self.built = px, {}

    def __call__(self, epoch: int) -> A.Compose:
        size = train_size(self.px.aug, epoch)
        if size not in self.built:
            self.built[size] = train_transform(self.px, size)
        return self.built[size]


def train_transform(px: Pixels, size: int | None = None) -> A.Compose:
    a = px.aug
    s = size or a.img_size
    squashing = a.resize == "squash"
    if a.crop == "rrc":
        ops = ([Squash(s)] if squashing else []) + [A.RandomResizedCrop(size=(s, s), scale=tuple(a.rrc_scale))]
    else:
        big = load_side(px, s)
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


def load_transform(px: Pixels, crop: int) -> A.Compose:
    """What the TTA loader feeds the device: a square of the load side, from which each view
    crops `crop` (centre, corners, flips). Its centre crop is exactly `valid_transform`'s."""
    big = load_side(px, crop)
    if px.aug.resize == "squash":
        return A.Compose([Squash(big)])
    return A.Compose([ResizeShort(big), A.CenterCrop(big, big)])


def valid_transform(px: Pixels, size: int | None = None) -> A.Compose:
    """Resize to size / crop_pct (shorter side; both sides when squashing), then centre crop `size`
    (default: the training size)."""
    s = size or px.aug.img_size
    return A.Compose([*load_transform(px, s).transforms, A.CenterCrop(s, s)])

