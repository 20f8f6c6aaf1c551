"""Benchmarks (not tests): prints the figures of docs/benchmarks/bench.md.

    python benchmarks/bench.py [--data ../shared/data/flowers5] [--size 64] [--arch resnet10t] [--epochs 2]

1. Stage 2 training images/s with and without the decoded-image cache, and the fraction of the
   epoch spent waiting for data (last epoch: the cache is warm).
2. Stage 3 wall time (features + all variants) next to one stage-2 epoch of the same fold.
3. Stage 4 TTA: images/s of each view and of the whole policy, next to the plain model forward
   at the same input sizes (so the overhead of TTA beyond the model's own compute is visible).
Runs in a temporary folder on the folder-per-class flowers5 photos (real JPEGs) or the demo digits.
On GPU, timings use torch.cuda.synchronize around the timed work.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import models  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.stages import folds, rebalance, train  # noqa: E402
from pipeline.core.predict.tta import VIEWS, sizes  # noqa: E402
from pipeline.core.inputs.pixels import pixels  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    here = Path(__file__).resolve().parents[1]
    ap.add_argument("--data", default=str(here.parent / "shared" / "data" / "flowers5"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--arch", default="resnet10t")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = Path(args.data).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    os.chdir(work)
    if data.is_dir():
        base = [f"data.root={data.parent}", "data.layout=folders", f"data.train_dir={data.name}",
                "data.sample_submission=null", "data.demo=false"]
        what = f"{data.name} (real JPEGs, folder per class)"
    else:
        base = ["data.root=data/demo", "data.demo=true", "data.image_ext=.png"]
        what = "demo digits"
        from pipeline.tools.demo import ensure_demo
        ensure_demo("data/demo")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = [*base, f"model.arch={args.arch}", f"aug.img_size={args.size}", f"train.epochs={args.epochs}",
              f"train.batch_size={args.batch}", "folds.n_splits=5", "train.warmup_epochs=0",
              "aug.cache_dir=cache"]
    print(f"# benchmark on {what}; {args.arch} at {args.size}px, batch {args.batch}, device {device}, "
          f"{torch.get_num_threads()} threads, workers {train.workers(load_config(None, common).train)}")
    folds.run(load_config(None, [*common, "experiment=bench-cache"]))

    print("\n## 1. stage 2 throughput (fold 0, last epoch)")
    rows = []
    for cache in ("off", "on"):
        cfg = load_config(None, [*common, f"experiment=bench-{cache}", f"aug.cache={cache}"])
        t0 = time.perf_counter()
        train.run(cfg, fold=0)
        h = pd.read_csv(cfg.run_dir.fold(0).history).iloc[-1]
        rows.append({"cache": cache, "images/s": h["images_per_s"], "data wait": h["data_wait"],
                     "epoch s": h["seconds"], "stage s (incl. cache build)": time.perf_counter() - t0})
    print(pd.DataFrame(rows).to_string(index=False, float_format="%.2f"))

    print("\n## 2. stage 3 (all variants) vs one stage-2 epoch, fold 0")
    cfg = load_config(None, [*common, "experiment=bench-on", "aug.cache=on"])
    t0 = time.perf_counter()
    rebalance.run(cfg, fold=0)
    total = time.perf_counter() - t0
    feat = json.loads((cfg.run_dir.fold(0).features_meta).read_text())["seconds"]
    var = json.loads((cfg.run_dir.fold(0).rebalance_summary).read_text())["seconds"]
    epoch = pd.read_csv(cfg.run_dir.fold(0).history)["seconds"].iloc[-1]
    print(f"features {feat:.2f}s + variants {var:.2f}s (stage total {total:.2f}s) vs one epoch {epoch:.2f}s: "
          f"{(feat + var) / epoch:.2f} epochs")

    print("\n## 3. TTA views vs plain forward (batch 64, fold 0 model, images already on device)")
    model = models.load_trained(cfg.model, cfg.run_dir.fold(0).weights,
                                len(json.loads((cfg.run_dir.classes).read_text()))).to(device)
    rows = []
    for scale in (1.0, 1.15):
        load, crop = sizes(args.size, pixels(cfg).crop_pct, scale)
        x = torch.randn(64, 3, load, load, device=device)
        plain = _rate(lambda: model(x[:, :, :crop, :crop].contiguous()), 64, device)
        for v in ("orig", "hflip", "rot90", "five_crop"):
            n_crops = len(VIEWS[v](x, crop))
            r = _rate(lambda: [model(c.contiguous()) for c in VIEWS[v](x, crop)], 64, device)
            rows.append({"scale": scale, "view": v, "crops": n_crops, "images/s": r,
                         "plain forward img/s": plain, "overhead vs model": plain / (r * n_crops) - 1 if r else 0})
    print(pd.DataFrame(rows).to_string(index=False, float_format="%.2f"))
    print(f"\n(work folder {work})")


@torch.no_grad()
def _rate(fn, n: int, device: str, reps: int = 5) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return n / float(np.median(times))


if __name__ == "__main__":
    main()
