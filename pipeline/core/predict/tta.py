"""Test-time augmentation: small named views chosen by config, merged by a named rule.

A view maps a batch of images (N x C x L x L, already normalised, L = the scale's load side) to
one or more batches at the crop size S; `orig` is the centre crop that validation uses, so a
policy of just `orig` at scale 1.0 is plain inference. Views run at every configured scale
(FixRes: testing at a higher resolution than training often helps).
"""
from __future__ import annotations

import numpy as np
import torch


def _center(x: torch.Tensor, s: int) -> torch.Tensor:
    top = (x.shape[2] - s) // 2  # the same offsets as albumentations' CenterCrop
    left = (x.shape[3] - s) // 2
    return x[:, :, top:top + s, left:left + s]


def orig(x, s):
    return [_center(x, s)]


def hflip(x, s):
    return [_center(x, s).flip(3)]


def vflip(x, s):
    return [_center(x, s).flip(2)]


def rot90(x, s):
    return [_center(x, s).rot90(1, (2, 3))]


def rot180(x, s):
    return [_center(x, s).rot90(2, (2, 3))]


def rot270(x, s):
    return [_center(x, s).rot90(3, (2, 3))]


def five_crop(x, s):
    h, w = x.shape[2], x.shape[3]
    return [x[:, :, :s, :s], x[:, :, :s, w - s:], x[:, :, h - s:, :s], x[:, :, h - s:, w - s:], _center(x, s)]


VIEWS = {f.__name__: f for f in (orig, hflip, vflip, rot90, rot180, rot270, five_crop)}


def view_name(view: str, scale: float) -> str:
    """How a (view, scale) pair is named in stage 4's files and reports: `hflip@1.15`."""
    return f"{view}@{scale:g}"


BASELINE = view_name("orig", 1.0)  # the no-TTA view: plain validation inference


def sizes(img_size: int, crop_pct: float, scale: float) -> tuple[int, int]:
    """(load side, crop side) of a scale: the loader resizes to the load side, views crop the crop side."""
    crop = int(round(img_size * scale))
    return int(round(crop / crop_pct)), crop


def merge(logits: np.ndarray, how: str) -> np.ndarray:
    """V x N x C logits of V views -> N x C probabilities."""
    return combine_views(per_view(logits, how), how)


def per_view(logits: np.ndarray, how: str) -> np.ndarray:
    """V x N x C logits -> what `combine_views` merges (float64): each view's probabilities, or its logits for
    mean_logit. Computed once, it serves every policy (subset of the views) scored on the same rows."""
    from .metrics import softmax

    logits = logits.astype(np.float64)
    return logits if how == "mean_logit" else np.stack([softmax(v) for v in logits])


def combine_views(views: np.ndarray, how: str) -> np.ndarray:
    """`per_view`'s V x N x C -> N x C probabilities."""
    from .metrics import softmax

    if how == "mean_logit":
        return softmax(views.mean(0))
    if how == "geo_mean":
        return softmax(np.log(np.clip(views, 1e-12, 1)).mean(0))
    return views.mean(0)
