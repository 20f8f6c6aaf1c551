"""Benchmarks of the image path (not tests): prints the figures docs/benchmarks/images.md quotes.

    python benchmarks/images.py [--data DIR] [--only accuracy,speed,disk,encoded,draft] [--size 64] [--epochs 8]

--data is any competition folder: folder-per-class (`<DIR>/<class>/*.jpg`, default: ../shared/data/flowers5)
or Kaggle layout (`<DIR>/train.csv` + `train/`, `test/`, `sample_submission.csv`).
1. accuracy: balanced accuracy of fold 0, the old path (aug.resize=squash: every image squashed to a
   square first) vs the new one (aspect ratio kept, crops from the stored copy), same seed and epochs;
   on the photos as they are and on a copy cropped to random aspect ratios between 9:16 and 16:9.
2. speed: training images/s of stage 2 with and without the image store (cache), the store's build
   time, and the loader alone (decode + augment, no model) with and without it.
3. disk: bytes of every image store after stages 1-4 on 5 folds with TTA scales [1.0, 1.15], against one
   stored copy of the train and test images.
4. draft: decoding a 4000x3000 JPEG into a 256 px stored copy with and without JPEG DCT scaling.
5. encoded: the JPEG store (aug.store: jpeg) against the raw store and the originals: disk per 100k images,
   build time, loader images/s, PSNR against raw.
Runs in a temporary folder; CPU, the threads torch picks (2 on the project's machines).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.inputs.augment import open_store, train_transform  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.inputs.images import ImageDataset, ImageStore, cache_report, read_image, resize_short, stored_image
from pipeline.core.engine.runtime import make_loader  # noqa: E402
from pipeline.stages import folds, infer, rebalance, train  # noqa: E402
from pipeline.core.inputs.pixels import pixels  # noqa: E402


def as_competition(data: Path, dst: Path, seed: int = 0) -> Path:
    """A Kaggle-layout competition folder: `data` itself when it is one, else a copy of a
    folder-per-class set with one image in ten held out as the test set (labels kept aside)."""
    if (data / "train.csv").exists():
        return data
    rng = np.random.default_rng(seed)
    rows, test = [], []
    for p in sorted(data.rglob("*")):
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        image_id = f"{p.parent.name}_{p.stem}"
        split = "test" if rng.random() < 0.1 else "train"
        (dst / split).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst / split / f"{image_id}{p.suffix}")
        (test if split == "test" else rows).append({"image_id": image_id + p.suffix, "label": p.parent.name})
    pd.DataFrame(rows).to_csv(dst / "train.csv", index=False)
    pd.DataFrame(test).assign(label=rows[0]["label"]).to_csv(dst / "sample_submission.csv", index=False)
    return dst


def competition_args(data: Path) -> list[str]:
    return [f"data.root={data}", "data.demo=false"]


def random_aspect_copy(src: Path, dst: Path, seed: int = 0) -> Path:
    """The competition with every photo cropped to a random aspect ratio between 9:16 and 16:9."""
    rng = np.random.default_rng(seed)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.jpg", "*.jpeg", "*.png"))
    for p in sorted(src.rglob("*")):
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        img = Image.open(p)
        w, h = img.size
        r = float(np.exp(rng.uniform(np.log(9 / 16), np.log(16 / 9))))  # width / height, log-uniform
        cw, ch = (w, min(h, round(w / r))) if r >= 1 else (min(w, round(h * r)), h)
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img.crop((left, top, left + cw, top + ch)).save(dst / p.relative_to(src), quality=95)
    return dst


def common(args, data: Path, exp: str, *extra: str) -> list[str]:
    return [*competition_args(data), f"experiment={exp}", f"model.arch={args.arch}", f"aug.img_size={args.size}",
            f"train.epochs={args.epochs}", f"train.batch_size={args.batch}", "train.workers=1",
            "eval.metric=balanced_accuracy", "folds.n_splits=5", "aug.cache_dir=cache", *extra]


def accuracy(args, data: Path) -> None:
    rows = []
    sets = {"as is": data, "random 9:16-16:9": random_aspect_copy(data, Path("aspect"))}
    for name, d in sets.items():
        for mode in ("squash", "keep_ratio"):
            cfg = load_config(None, common(args, d, f"acc-{mode}-{len(rows)}", f"aug.resize={mode}", "aug.cache=on",
                                           f"folds.name=acc{len(rows) // 2}"))
            folds.run(cfg)
            t0 = time.perf_counter()
            s = train.run(cfg, fold=0)[0]
            rows.append({"images": name, "path": "old (squash)" if mode == "squash" else "new (keep ratio)",
                         "bal. acc fold 0": s["metrics"]["balanced_accuracy"], "accuracy": s["metrics"]["accuracy"],
                         "minutes": (time.perf_counter() - t0) / 60})
    t = pd.DataFrame(rows)
    print(f"\n1. fold-0 scores, {args.arch} at {args.size} px, {args.epochs} epochs, seed 42, one run each:")
    print(t.to_string(index=False, float_format="%.4f"))
    for name in sets:
        sub = t[t["images"] == name]["bal. acc fold 0"].values
        print(f"   {name}: new - old = {sub[1] - sub[0]:+.4f}")


def speed(args, data: Path) -> None:
    rows = []
    for cache in ("off", "on"):
        cfg = load_config(None, common(args, data, f"speed-{cache}", f"aug.cache={cache}", "train.epochs=2",
                                       "folds.name=speed"))
        folds.run(cfg)
        shutil.rmtree(cfg.aug.cache_dir, ignore_errors=True)
        df = pd.read_csv(cfg.folds_csv)
        t0 = time.perf_counter()
        store = open_store(pixels(cfg), df["path"])
        build = time.perf_counter() - t0
        ds = ImageDataset(store, df["fold"].values * 0, train_transform(pixels(cfg)), seed=0)
        loader = make_loader(ds, batch_size=args.batch, n_workers=1)
        t0 = time.perf_counter()
        n = sum(len(x) for x, _ in loader)
        loader_rate = n / (time.perf_counter() - t0)
        train.run(cfg, fold=0)
        h = pd.read_csv(cfg.run_dir.fold(0).history).iloc[-1]
        rows.append({"store": cache, "build s": build if cache == "on" else 0.0, "loader img/s": loader_rate,
                     "train img/s": h["images_per_s"], "data wait": h["data_wait"], "epoch s": h["seconds"]})
    t = pd.DataFrame(rows)
    print(f"\n2. stage 2 on fold 0 ({args.arch}, {args.size} px, batch {args.batch}, 1 loader worker; last of 2 epochs)"
          f" and the loader alone (decode + augment, 1 worker), store side {pixels(cfg).store_side}:")
    print(t.to_string(index=False, float_format="%.2f"))
    print(f"   train: cache/no cache = {rows[1]['train img/s'] / rows[0]['train img/s']:.2f}x; "
          f"loader alone: {rows[1]['loader img/s'] / rows[0]['loader img/s']:.2f}x")


def disk(args, data: Path) -> None:
    cfg = load_config(None, common(args, data, "disk", "aug.cache=on", "train.epochs=1", "folds.name=disk",
                                   "infer.scales=[1.0,1.15]", "infer.views=[orig,hflip]",
                                   "rebalance.variants=[joint,ncm,tau]"))
    shutil.rmtree(cfg.aug.cache_dir, ignore_errors=True)
    for stage in (folds, train, rebalance, infer):
        stage.run(cfg)
    stores = cache_report(cfg.aug.cache_dir)
    total = sum(r["bytes"] for r in stores)
    side = pixels(cfg).store_side
    df = pd.read_csv(cfg.folds_csv)
    test = infer.load_inputs(cfg).test
    one = sum(stored_image(p, side).nbytes for p in list(df["path"]) + list(test["path"]))
    print(f"\n3. image stores after stages 1-4 (5 folds, TTA scales [1.0, 1.15], {len(df)} train + {len(test)} test "
          f"images, store side {side}):")
    for r in stores:
        print(f"   {r['store']}: {r['images']} images, {r['bytes'] / 1e6:.1f} MB")
    print(f"   total {total / 1e6:.1f} MB; one stored copy of train+test: {one / 1e6:.1f} MB; ratio {total / one:.3f}")


def encoded(args, data: Path) -> None:
    """The JPEG store (aug.store: jpeg) against the raw store and against decoding the originals: bytes per
    100k images, build time, the loader alone (decode + augment, 2 workers) in images/s, and how close the
    pixels are (PSNR against raw)."""
    df = pd.read_csv(data / "train.csv")
    paths = [str(data / "train" / i) for i in df["image_id"]]
    side = args.store_side
    rows, stores = [], {}
    for name, fmt, cache in (("originals (no store)", "raw", "off"), ("raw store", "raw", "on"),
                             (f"JPEG store q{args.quality}", "jpeg", "on")):
        shutil.rmtree("enc-cache", ignore_errors=True)
        t0 = time.perf_counter()
        store = ImageStore(paths, side, cache, "enc-cache", fmt=fmt, quality=args.quality)
        build = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in store.dir.iterdir()) if store.dir else 0
        cfg = load_config(None, [*competition_args(data), f"aug.img_size={side * 2 // 3}"])
        ds = ImageDataset(store, np.zeros(len(paths), np.int64), train_transform(pixels(cfg)), seed=0)
        loader = make_loader(ds, batch_size=args.batch, n_workers=2)
        t0 = time.perf_counter()
        n = sum(len(x) for x, _ in loader)
        rows.append({"pixels": name, "build s": build, "MB per 100k images": size / len(paths) * 1e5 / 1e6,
                     "loader img/s": n / (time.perf_counter() - t0)})
        stores[name] = store
        if store.dir:  # keep it for the PSNR below
            shutil.copytree(store.dir, f"keep-{fmt}", dirs_exist_ok=True)
            store.dir = Path(f"keep-{fmt}")
    raw, jpeg = stores["raw store"], stores[f"JPEG store q{args.quality}"]
    err = [np.mean((raw[i].astype(np.float64) - jpeg[i].astype(np.float64)) ** 2) for i in range(0, len(paths), 10)]
    print(f"\n5. stored copies at side {side} of {len(paths)} photos: originals / raw / JPEG q{args.quality} (4:4:4)")
    print(pd.DataFrame(rows).to_string(index=False, float_format="%.1f"))
    print(f"   JPEG against raw: PSNR {10 * np.log10(255 ** 2 / np.mean(err)):.1f} dB (mean over every 10th image), "
          f"disk ratio {rows[2]['MB per 100k images'] / rows[1]['MB per 100k images']:.3f}")


def draft(args, reps: int = 5) -> None:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (300, 400, 3), np.uint8)
    Image.fromarray(small).resize((4000, 3000), Image.Resampling.BICUBIC).save("big.jpg", quality=90)
    times = {}
    for name, short in (("full decode + resize", None), ("draft (DCT scaling) + resize", 256)):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            img = read_image("big.jpg", short_side=short)
            resize_short(img, 256)
            ts.append(time.perf_counter() - t0)
        times[name] = (np.median(ts), np.min(ts), np.max(ts))
    print(f"\n4. a 4000x3000 JPEG into a 256 px stored copy (median [min-max] of {reps}):")
    for name, (m, lo, hi) in times.items():
        print(f"   {name}: {m * 1000:.0f} ms [{lo * 1000:.0f}-{hi * 1000:.0f}]")
    a, b = times.values()
    print(f"   speed-up {a[0] / b[0]:.1f}x")


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(here.parent / "shared" / "data" / "flowers5"))
    ap.add_argument("--only", default="accuracy,speed,disk,encoded,draft")
    ap.add_argument("--store-side", type=int, default=128, help="encoded: the stored copies' shorter side")
    ap.add_argument("--quality", type=int, default=90, help="encoded: JPEG quality")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--arch", default="resnet10t")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = Path(args.data).resolve()
    if not data.is_dir():
        sys.exit(f"no competition folder at {data}")
    work = Path(tempfile.mkdtemp(prefix="bench-images-"))
    os.chdir(work)
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, data {data}, work {work}")
    data = as_competition(data, work / "comp")
    only = args.only.split(",")
    try:
        for name, fn in (("accuracy", accuracy), ("speed", speed), ("disk", disk), ("encoded", encoded)):
            if name in only:
                fn(args, data)
        if "draft" in only:
            draft(args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
