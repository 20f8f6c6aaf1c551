"""The built-in demo competition, made from scikit-learn's bundled handwritten digits (no download).

Layout written under `root` (the standard Kaggle one):
    train.csv               image_id,label   a long-tailed split: the most frequent class has
                                             `imbalance` x the images of the rarest
    train/<id>.png          32x32 RGB
    test/<id>.png           a balanced split of `test_per_class` images per class
    sample_submission.csv   image_id,label   (label filled with a constant)
The test labels are kept aside in `<root>-private/test_labels.csv`, outside the competition folder,
so no stage can train on them; the demo scores its submission against them like a private
leaderboard. Everything is deterministic given the seed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..core.artifacts import atomic_path, write_csv

log = logging.getLogger("pipeline")


def tail_counts(n_classes: int, n_max: int, imbalance: float) -> np.ndarray:
    """Exponentially decaying class sizes from n_max down to n_max/imbalance (Cui et al. style)."""
    r = np.arange(n_classes) / max(n_classes - 1, 1)
    return np.floor(n_max * imbalance ** (-r)).astype(int)


def build_demo(root: str | Path, seed: int = 0, size: int = 32, test_per_class: int = 30,
               n_max: int = 150, imbalance: float = 25.0) -> Path:
    from sklearn.datasets import load_digits

    root = Path(root)
    private = root.parent / f"{root.name}-private"
    digits = load_digits()
    images, labels = digits.images, digits.target  # 8x8 floats in [0, 16]
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    # which class is the head and which the tail is itself drawn from the seed
    sizes = dict(zip(rng.permutation(classes), tail_counts(len(classes), n_max, imbalance)))
    train_idx, test_idx = [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx += idx[:test_per_class].tolist()
        train_idx += idx[test_per_class:test_per_class + sizes[c]].tolist()
    train_idx = rng.permutation(train_idx)
    test_idx = rng.permutation(test_idx)

    def render(i: int) -> Image.Image:
        g = Image.fromarray((images[i] * (255.0 / 16.0)).astype(np.uint8), mode="L")
        return g.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")

    def write_split(split: str, idx: np.ndarray) -> pd.DataFrame:
        rows = []
        for n, i in enumerate(idx):
            image_id = f"{split}_{n:05d}"
            with atomic_path(root / split / f"{image_id}.png", suffix=".png") as tmp:
                render(i).save(tmp, format="PNG")
            rows.append((image_id, int(labels[i])))
        return pd.DataFrame(rows, columns=["image_id", "label"])

    log.info("building the demo competition in %s (digits, seed %d)", root, seed)
    train = write_split("train", train_idx)
    test = write_split("test", test_idx)
    write_csv(private / "test_labels.csv", test)
    sub = test.assign(label=int(classes[0]))
    write_csv(root / "sample_submission.csv", sub)
    write_csv(root / "train.csv", train)  # last: its presence means the demo is complete
    return root


def ensure_demo(root: str | Path, seed: int = 0) -> None:
    if not (Path(root) / "train.csv").exists():
        build_demo(root, seed=seed)


def synthetic_competition(root: Path, counts: dict, size: int = 16, ext: str = ".png", n_test: int = 6,
                          groups_per_class: int | None = None, seed: int = 0, with_ext_in_id: bool = False) -> Path:
    """Write a tiny Kaggle-layout competition under `root` (tests and `./run.sh selfcheck`): each
    class is a distinct colour plus noise, so it is learnable in an epoch or two."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(parents=True, exist_ok=True)
    rows = []
    palette = {c: rng.integers(0, 256, 3) for c in counts}
    n = 0
    for c, k in counts.items():
        for j in range(k):
            img = np.clip(palette[c] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            image_id = f"img{n:04d}"
            Image.fromarray(img).save(root / "train" / f"{image_id}{ext}")
            row = {"image_id": image_id + (ext if with_ext_in_id else ""), "label": c}
            if groups_per_class:
                row["group"] = f"g{c}_{j % groups_per_class}"
            rows.append(row)
            n += 1
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    classes = list(counts)
    test_rows = []
    for i in range(n_test):
        c = classes[i % len(classes)]
        img = np.clip(palette[c] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "test" / f"t{i:03d}{ext}")
        test_rows.append({"image_id": f"t{i:03d}", "label": classes[0]})
    pd.DataFrame(test_rows).to_csv(root / "sample_submission.csv", index=False)
    return root
