"""What goes into a model: the competition's tables and images, decoded once, augmented, sampled.

- `data`: the data contract (read_train_table, read_test_table, COCO JSON, label encoding, refusals by row).
- `images`: decoding (PIL draft, EXIF), the one stored copy per image set (ImageStore), ImageDataset.
- `pixels`: what decides the pixels, resolved once (`pixels(cfg)` -> Pixels: crop_pct, store side and format).
- `augment`: albumentations pipelines from the resolved Pixels (train_transform, valid_transform, open_store).
- `policy`: timm AutoAugment / RandAugment / AugMix specs.
- `taxonomy`: each class's parents at the levels of train.taxonomy (a CSV or COCO categories), checked as a tree.
- `samplers`: class-balanced, square-root and progressive sampling as per-epoch index lists.

Nothing is imported here: `from pipeline.core.inputs import data` loads that module alone.
"""
