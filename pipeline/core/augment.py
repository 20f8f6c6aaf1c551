"""albumentations pipelines built from the `aug` config. They output uint8 HWC images;
normalisation happens on the device in a batch (pipeline.core.models.Normalize)."""
from __future__ import annotations

import albumentations as A

from .config import Config


def train_transform(cfg: Config) -> A.Compose:
    a = cfg.aug
    s = a.img_size
    if a.crop == "rrc":
        ops = [A.RandomResizedCrop(size=(s, s), scale=tuple(a.rrc_scale))]
    else:
        big = round(s * a.resize_ratio)
        ops = [A.Resize(big, big), A.RandomCrop(s, s)]
    if a.hflip:
        ops.append(A.HorizontalFlip(p=a.hflip))
    if a.vflip:
        ops.append(A.VerticalFlip(p=a.vflip))
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


def valid_transform(cfg: Config, size: int | None = None) -> A.Compose:
    """Resize to size*resize_ratio, then centre crop `size` (default: the training size)."""
    s = size or cfg.aug.img_size
    big = round(s * cfg.aug.resize_ratio)
    return A.Compose([A.Resize(big, big), A.CenterCrop(s, s)])
