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

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..core.files.artifacts import atomic_path, read_json, write_csv, write_json
from ..core.config import DataCfg
from ..core.errors import PipelineError

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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def build_holdout(src: str | Path, root: str | Path, frac: float, seed: int) -> Path:
    """A csv competition in `root` from a folder-per-class photo set `src` (`data.holdout_from`): a stratified
    `frac` of every class (at least one image) becomes the test set, in a shuffled order under anonymous names,
    its labels kept in `<root>-private/test_labels.csv`; the rest is train.csv + train/. Files are copied byte for
    byte. Written to a temporary folder and renamed, so a crash leaves no half-built competition; `<root>-private/
    holdout.json` records what it was made from."""
    import shutil

    src, root = Path(src), Path(root)
    if not src.is_dir():
        raise PipelineError(f"data.holdout_from: {src} is not a folder (a folder-per-class photo set: <dir>/<class>/*.jpg)")
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {c: sorted(f for f in (src / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for c in classes}
    files = {c: fs for c, fs in files.items() if fs}
    if len(files) < 2:
        raise PipelineError(f"data.holdout_from: {src} has {len(files)} class folder(s) with images; a competition "
                            f"needs at least 2 (<dir>/<class>/*.jpg)")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c, fs in files.items():
        order = rng.permutation(len(fs))
        n_test = max(1, int(round(frac * len(fs))))
        test += [(fs[i], c) for i in order[:n_test]]
        train += [(fs[i], c) for i in order[n_test:]]
    private = root.parent / f"{root.name}-private"
    tmp = root.parent / f".{root.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("building the competition %s from %s: %d train, %d held-out test images (%.0f%% of each class, seed %d)",
             root, src, len(train), len(test), 100 * frac, seed)
    rows = {"train": [], "test": []}
    for split, items in (("train", train), ("test", test)):
        (tmp / split).mkdir(parents=True)
        for n, i in enumerate(rng.permutation(len(items))):
            f, c = items[i]
            image_id = f"{split}_{n:05d}{f.suffix.lower()}"
            shutil.copyfile(f, tmp / split / image_id)
            rows[split].append((image_id, c))
    test_df = pd.DataFrame(rows["test"], columns=["image_id", "label"])
    write_csv(private / "test_labels.csv", test_df)
    write_csv(tmp / "sample_submission.csv", test_df.assign(label=classes[0]))
    write_csv(tmp / "train.csv", pd.DataFrame(rows["train"], columns=["image_id", "label"]))
    write_json(private / "holdout.json", holdout_spec(src, frac, seed))
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return root


def holdout_spec(src: Path, frac: float, seed: int) -> dict:
    return {"holdout_from": str(Path(src).resolve()), "holdout_frac": frac, "seed": seed}


def ensure_holdout(src: str | Path, root: str | Path, frac: float, seed: int) -> None:
    """Build `root` from `src` unless it exists; refuse one built from another source, share or seed."""
    root = Path(root)
    spec = root.parent / f"{root.name}-private" / "holdout.json"
    if (root / "train.csv").exists():
        if not spec.exists():
            raise PipelineError(f"data.holdout_from is set but {root} already holds a competition that it did not build "
                                f"(no {spec}); point data.root at a new folder")
        old, new = read_json(spec), holdout_spec(Path(src), frac, seed)
        if old != new:
            raise PipelineError(f"{root} was built from {old}, the config asks for {new}: remove {root} (and "
                                f"{spec.parent}) to rebuild it, or use another data.root")
        return
    build_holdout(src, root, frac, seed)


def unbuilt_data(d: DataCfg) -> str | None:
    """What the config asks to be built that is not there yet (None: nothing): `status` says so instead of
    building it, since it writes nothing."""
    if (d.demo or d.holdout_from) and not (Path(d.root) / "train.csv").exists():
        what = "the digits demo" if d.demo else f"a hold-out split of {d.holdout_from}"
        return f"{d.root} is not built yet ({what}; the first stage command builds it)"
    return None


def prepare_data(d: DataCfg, seed: int) -> None:
    """Build the competition folder a config asks to be built (the digits demo, a hold-out split), once."""
    if d.demo:
        ensure_demo(d.root, seed=seed)
    if d.holdout_from:
        ensure_holdout(d.holdout_from, d.root, d.holdout_frac, seed=seed)


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


def coco_competition(root: Path, counts: list[int], size: int = 16, n_test: int = 6, locations: int = 0,
                     seed: int = 0, first_id: int = 1000) -> Path:
    """Write a tiny iNaturalist-style competition under `root` (tests, benchmarks/scale.py): `counts[i]` images
    of category `first_id + i` (a colour plus noise) in train/<category>/, train.json and test.json in COCO
    style (images, annotations, categories with a taxonomy; `locations` > 0 adds a `location` per image),
    test/ with `n_test` images and no sample submission (the submission's ids are test.json's)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    palette = rng.integers(0, 256, (len(counts), 3))
    images, anns, cats = [], [], []

    def picture(c: int) -> Image.Image:
        return Image.fromarray(np.clip(palette[c] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8))

    n = 0
    for c, k in enumerate(counts):
        cid = first_id + c
        cats.append({"id": cid, "name": f"Species {cid}", "supercategory": "Plants", "kingdom": "Plantae",
                     "genus": f"Genus{c // 10}"})
        (root / "train" / str(cid)).mkdir(parents=True, exist_ok=True)
        for j in range(k):
            name = f"train/{cid}/{n:07d}.png"
            picture(c).save(root / name)
            image = {"id": n, "file_name": name, "width": size, "height": size}
            if locations:
                image["location"] = int(j % locations)
            images.append(image)
            anns.append({"id": n, "image_id": n, "category_id": cid})
            n += 1
    (root / "test").mkdir(parents=True, exist_ok=True)
    tests = []
    for i in range(n_test):
        name = f"test/{i:07d}.png"
        picture(i % len(counts)).save(root / name)
        tests.append({"id": 10_000_000 + i, "file_name": name, "width": size, "height": size})
    (root / "train.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (root / "test.json").write_text(json.dumps({"images": tests, "categories": cats}))
    return root
