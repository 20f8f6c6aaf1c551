"""Benchmark of the training modes (not a test): prints the figures docs/benchmarks/modes.md quotes.

    python benchmarks/modes.py [--data DIR] [--size 64] [--arch resnet10t] [--batch 64] [--steps 30] [--score-epochs 8]
                               [--timm-train PATH/TO/timm/train.py]

On real photos (default ../shared/data/flowers5, decoded and augmented by the pipeline's loader with
its default workers), `./run.sh doctor`'s measurement in every CPU mode: fp32, bf16 and fp16 autocast,
channels_last, compile, their combination, DDP with 2 gloo processes. With --timm-train, timm's own
train.py on the same images (fold 0's training rows as an ImageFolder), same model, size and batch,
AdamW, `--device cpu`, one epoch: its logged images/s next to ours. With --score-epochs N, fold 0
trained N epochs in fp32 (seeds 42 and 43) and in bf16 (seed 42): does bf16 score within seed noise?
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from images import as_competition  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.stages import folds  # noqa: E402
from pipeline.tools import doctor  # noqa: E402


def timm_side_by_side(train_py: Path, cfg, args) -> float:
    """timm's train.py for one epoch on fold 0's training rows; its mean logged images/s."""
    df = pd.read_csv(cfg.folds_csv)
    root = Path("timm_data")
    for split, rows in (("train", df[df["fold"] != 0]), ("validation", df[df["fold"] == 0])):
        for _, r in rows.iterrows():
            d = root / split / str(r["label"])
            d.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.abspath(r["path"]), d / Path(r["path"]).name)
    cmd = [sys.executable, str(train_py), "--data-dir", str(root), "--model", args.arch, "--num-classes",
           str(df["label"].nunique()), "--img-size", str(args.size), "-b", str(args.batch), "--epochs", "1",
           "--device", "cpu", "--workers", str(max(1, (os.cpu_count() or 2) - 1)), "--opt", "adamw", "--lr", "1e-3",
           "--log-interval", "10", "--output", "timm_out", "--warmup-epochs", "0"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    rates = [float(x) for x in re.findall(r"\(\d+\.\d+s,\s+([\d.]+)/s\)", r.stdout + r.stderr)]
    if r.returncode != 0 or not rates:
        print((r.stdout + r.stderr)[-2000:])
        return float("nan")
    print(f"   timm train.py: one epoch in {time.perf_counter() - t0:.0f}s wall")
    return rates[-1]  # its running average over the epoch


def score_check(cfg_args: list[str], epochs: int) -> None:
    """Fold 0's score with bf16 autocast next to fp32's, and next to fp32 with another seed (the noise
    a single fold's score has anyway)."""
    from pipeline.stages import train

    rows = []
    for name, extra in (("fp32, seed 42", ["train.amp=off"]), ("fp32, seed 43", ["train.amp=off", "seed=43"]),
                        ("bf16, seed 42", ["train.amp=bf16"])):
        cfg = load_config(None, [*cfg_args, f"train.epochs={epochs}", "eval.metric=balanced_accuracy",
                                 f"experiment=score-{len(rows)}", *extra])
        s = train.run(cfg, fold=0)[0]
        h = pd.read_csv(cfg.run_dir.fold(0).history)
        rows.append({"run": name, "bal. acc fold 0": s["metrics"]["balanced_accuracy"],
                     "accuracy": s["metrics"]["accuracy"], "train img/s": h["images_per_s"].median()})
    t = pd.DataFrame(rows)
    print(f"\nfold 0 after {epochs} epochs (stage 2 defaults otherwise):")
    print(t.to_string(index=False, float_format="%.4f"))
    v = t["bal. acc fold 0"].values
    print(f"   bf16 - fp32 = {v[2] - v[0]:+.4f}; seed-to-seed fp32 difference {v[1] - v[0]:+.4f}")


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(here.parent / "shared" / "data" / "flowers5"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--arch", default="resnet10t")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--timm-train", default=None)
    ap.add_argument("--score-epochs", type=int, default=0, help="also compare fold-0 scores, bf16 vs fp32")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = Path(args.data).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-modes-"))
    os.chdir(work)
    try:
        comp = as_competition(data, work / "comp")
        cfg_args = [f"data.root={comp}", "data.demo=false", f"model.arch={args.arch}", f"aug.img_size={args.size}",
                    f"train.batch_size={args.batch}", "aug.cache=on", "aug.cache_dir=cache", "folds.n_splits=5"]
        cfg = load_config(None, cfg_args)
        folds.run(cfg)
        print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, {args.arch} at {args.size} px, batch "
              f"{args.batch}, {args.steps} timed steps after 2 warm-up steps, real images ({data.name}):")
        t, rec, _ = doctor.check(doctor.Bench.of(cfg), steps=args.steps, log=lambda m: None)
        print(doctor.table_text(t))
        print(rec)
        if args.timm_train:
            rate = timm_side_by_side(Path(args.timm_train).resolve(), cfg, args)
            ours = float(t.loc[t["mode"] == "fp32", "train_img_s"].iloc[0])
            best = float(t.loc[t["ok"] & (t["mode"] != "ddp x2"), "train_img_s"].max())
            print(f"   timm train.py (fp32, its default augmentation): {rate:.0f} img/s; ours fp32 {ours:.0f} "
                  f"({ours / rate:.2f}x), ours best single-process mode {best:.0f} ({best / rate:.2f}x)")
        if args.score_epochs:
            score_check(cfg_args, args.score_epochs)
    finally:
        os.chdir("/")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
