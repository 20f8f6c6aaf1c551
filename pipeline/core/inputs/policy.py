"""Policy augmentation specs: timm's own AutoAugment / RandAugment / AugMix, read from timm's spec strings.

Kept apart from `augment` (which applies them) so that config validation can check a spec without an import
loop (config -> policy, augment -> config)."""
from __future__ import annotations


def policy_transform(spec: str, size: int):
    """timm's own AutoAugment / RandAugment / AugMix from its spec string (`rand-m9-mstd0.5-inc1`,
    `original-mstd0.5`, `v0`, `augmix-m5-w4-d2`; `trivial` is RandAugment with one op at a uniformly drawn
    magnitude, as TrivialAugment), on PIL images. Raises ValueError for a spec timm cannot read."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    spec = {"trivial": "rand-n1-mstd101-inc1"}.get(spec, spec)
    hparams = {"translate_const": int(size * 0.45), "img_mean": (124, 116, 104)}  # timm's defaults for ImageNet
    try:
        if spec.startswith("rand"):
            return rand_augment_transform(spec, hparams)
        if spec.startswith("augmix"):
            return augment_and_mix_transform(spec, hparams)
        return auto_augment_transform(spec, hparams)
    except (AssertionError, KeyError, ValueError, IndexError) as e:
        raise ValueError(f"timm cannot read the augmentation policy '{spec}': {str(e) or 'not a timm spec'}") from None
