"""Benchmark of `export` and `predict` (not a test): prints the figures docs/benchmarks/export.md quotes.

    ./run.sh all                      # the demo, once (or any finished project with --config)
    python benchmarks/export.py [--config configs/demo.yaml] [--repeat 3]

1. size: the bundle against the runs/<exp> folders it was made from.
2. speed: predict's view-images/s on the test images against stage 4's on the same images and the same
   views (stage 4 re-run test-only in a temporary copy of the project, with every view x scale it
   predicts; predict told to predict exactly those views), best of --repeat, CPU.
3. agreement: predict's submission against stage 5's (same labels) and the largest probability gap.
Runs from the project folder; writes only into a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.files import layout  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.predict.inference import tta_names  # noqa: E402
from pipeline.core.predict.submission import combine  # noqa: E402
from pipeline.stages import infer  # noqa: E402
from pipeline.tools import export, predict  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = load_config(args.config)
    project = Path.cwd()
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        res = export.run(cfg, out=str(tmp / "bundle"))
        print(f"bundle: {res['size_bytes'] / 1e6:.2f} MB; runs folders it came from: {res['source_bytes'] / 1e6:.2f} MB "
              f"({res['source_bytes'] / res['size_bytes']:.1f}x smaller)")
        manifest = json.loads((tmp / "bundle/manifest.json").read_text())
        test_dir = cfg.data_path(cfg.data.test_dir).resolve()
        sample = cfg.data_path(cfg.data.sample_submission).resolve() if cfg.data.sample_submission else None

        # predict as a user runs it (each member's own policy), against stage 5's submission
        out = predict.run(tmp / "bundle", test_dir, tmp / "sub.csv", sample, tmp_dir=tmp)
        name = manifest["name"]
        mine, theirs = pd.read_csv(tmp / "sub.csv", dtype=str), pd.read_csv(layout.submission_csv(name), dtype=str)
        rec = json.loads(layout.submission_record(name).read_text())
        tests = [np.load(layout.RunDir.of(m.split(":")[0]).infer_test(m.split(":")[1])) for m in rec["members"]]
        ref = combine([t["probs"] for t in tests], rec["method"], np.array([rec["weights"][m] for m in rec["members"]]))
        print(f"agreement with stage 5: {int((mine.values == theirs.values).all(1).sum())}/{len(theirs)} rows equal, "
              f"max |p - p_stage5| = {np.abs(out['probs'] - ref).max():.2e}")
        print(f"predict (own policies): {out['images_per_s']:.1f} images/s, {out['view_images_per_s']:.1f} view-images/s "
              f"({out['view_images_per_s_with_decode']:.1f} counting the decode into its temporary store)")

        # same views: stage 4 test-only in a copy of the project, and predict told to predict its views
        copy = tmp / "project"
        copy.mkdir()
        for d in ("runs", "folds"):
            shutil.copytree(project / d, copy / d, symlinks=True)
        shutil.copytree(project / "data", copy / "data", symlinks=True)
        os.chdir(copy)
        s4_rates, views, folds = {}, {}, {}
        for m in manifest["members"]:
            exp = m.split(":")[0]
            mcfg = load_config(layout.RunDir.of(exp).config, ["infer.oof=off", "infer.search=false"])
            views[m] = tta_names(mcfg.infer)
            folds[m] = mcfg.folds.n_splits
            s4_rates[m] = max(infer.run(mcfg, force=True)["images_per_s"] for _ in range(args.repeat))
        os.chdir(project)
        real = predict.load_members

        def same_views(*a, **k):
            members = real(*a, **k)
            for mem in members:
                mem.policy = list(views[mem.name])
            return members

        predict.load_members = same_views
        try:
            best = max(predict.run(tmp / "bundle", test_dir, tmp / "sub2.csv", sample, tmp_dir=tmp)["view_images_per_s"]
                       for _ in range(args.repeat))
        finally:
            predict.load_members = real
        n = len(out["ids"])
        work = {m: n * len(views[m]) * folds[m] for m in views}  # view-images per member
        s4 = sum(work.values()) / sum(work[m] / s4_rates[m] for m in views)
        for m in views:
            print(f"stage 4 test-only, {m}: {s4_rates[m]:.1f} view-images/s over {len(views[m])} views x scales")
        print(f"same views: stage 4 {s4:.1f} view-images/s, predict {best:.1f} view-images/s "
              f"({100 * (best / s4 - 1):+.1f} %)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
