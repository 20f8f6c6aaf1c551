"""FGVC scale (#27): time, peak resident memory and disk of every stage of `./run.sh all` on generated
iNaturalist-style competitions (COCO-style JSON, thousands of classes, a top-5 submission). Not a test.

    python benchmarks/scale.py [--sizes 1000x4000,5000x20000,10000x20000] [--work DIR] [--variants joint,tau]
    python benchmarks/scale.py --all-in-one --sizes 10000x20000 --code /tmp/old-checkout --code .   (side by side)
    python benchmarks/scale.py --stage5 3 --sizes 10000x100000 --code /tmp/old-checkout --code .
        (#45: `all` once per checkout, each in its own folder, then `ensemble --force` 3 times per checkout,
        alternating, timed: what checking stage 4's stored features costs stage 5; --timed-only re-times)

Each size CLASSESxIMAGES is a competition of tiny pictures (16 px, a colour per class plus noise; images spread
evenly over the classes, a tenth as many test images) in COCO layout, trained with timm's `test_resnet` at
16 px, 2 folds, 1 epoch (`folds.rare_classes: allow`: 2 images per class is below the fold count's comfort),
metric top-5 accuracy, a top-5 submission. Every stage runs in its own process under /usr/bin/time -v: its
peak RSS is that process's. Figures in docs/benchmarks/scale.md.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from pipeline.tools.demo import coco_competition  # noqa: E402

STAGES = ["folds", "train", "rebalance", "infer", "ensemble", "report", "leaderboard"]  # what `all` runs


def config(root: Path, variants: list[str]) -> str:
    return f"""experiment: scale
data: {{root: {root}, layout: coco, train_json: train.json, test_json: test.json, sample_submission: null,
       id_col: Id, label_col: Predicted, check_images: none}}
folds: {{n_splits: 2, rare_classes: allow}}
model: {{arch: test_resnet}}
aug: {{img_size: 16, cache: "on"}}
train: {{epochs: 1, batch_size: 256, lr: 0.01, warmup_epochs: 0, workers: 0}}
rebalance: {{variants: [{", ".join(variants)}], crt_epochs: 5, lws_epochs: 5}}
infer: {{heads: [best], views: [orig, hflip], batch_size: 512}}
eval: {{metric: top_k_accuracy, top_k: 5}}
ensemble: {{submission: topk, top_k: 5}}
"""


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def run_stage(work: Path, stage: str) -> dict:
    t0 = time.perf_counter()
    args = {"report": ["scale"], "leaderboard": []}.get(stage, ["--config", "scale.yaml"])
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "pipeline", stage, *args],
                       cwd=work, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    seconds = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{stage} failed (exit {r.returncode})")
    return {"stage": stage, "seconds": seconds, "peak_rss_gb": int(rss.group(1)) / 2**20 if rss else float("nan")}


def all_in_one(work_root: Path, n_classes: int, n_images: int, variants: list[str], code: Path,
               n_test: int | None = None) -> dict:
    """`./run.sh all` in one process of the checkout `code` under /usr/bin/time -v: wall time, peak RSS, bytes
    under runs/ and each stage's seconds (from its log line)."""
    work = work_root / (f"c{n_classes}_n{n_images}" + (f"_t{n_test}" if n_test else ""))
    root = work / "data"
    if not (root / "train.json").exists():
        shutil.rmtree(work, ignore_errors=True)
        per, extra = divmod(n_images, n_classes)
        coco_competition(root, [per + (i < extra) for i in range(n_classes)], size=16,
                         n_test=n_test or max(n_images // 10, 10))
    for d in ("runs", "folds", "submissions", "reports"):
        shutil.rmtree(work / d, ignore_errors=True)
    (work / "scale.yaml").write_text(config(root.resolve(), variants))
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "pipeline", "all", "--config", "scale.yaml"],
                       cwd=work, capture_output=True, text=True,
                       env={"PYTHONPATH": str(code.resolve()), "PATH": "/usr/bin:/bin"})
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"all failed (exit {r.returncode}) with {code}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    stages = {m.group(1): float(m.group(2)) for m in
              re.finditer(r"stage \d \((\w+)\) of '[^']*' finished in ([\d.]+)s", r.stderr + r.stdout)}
    sub = (work / "submissions" / "scale.csv").read_text().splitlines()
    return {"code": str(code), "classes": n_classes, "images": n_images, "test": len(sub) - 1, "seconds": seconds,
            "peak_rss_gb": int(rss.group(1)) / 2**20 if rss else float("nan"),
            "runs_gb": folder_bytes(work / "runs") / 2**30, "stages": stages, "submission": sub[:3]}


def stage5_side_by_side(work_root: Path, n_classes: int, n_images: int, variants: list[str], codes: list[Path],
                        repeats: int, timed_only: bool) -> None:
    """Stage 5's wall time per checkout, measured alternately on outputs each checkout made itself (#45)."""
    data = work_root / f"c{n_classes}_n{n_images}" / "data"
    if not (data / "train.json").exists():
        per, extra = divmod(n_images, n_classes)
        coco_competition(data, [per + (i < extra) for i in range(n_classes)], size=16, n_test=max(n_images // 10, 10))
    works = [work_root / f"c{n_classes}_n{n_images}_code{i}" for i in range(len(codes))]
    for code, work in zip(codes, works):
        work.mkdir(parents=True, exist_ok=True)
        (work / "scale.yaml").write_text(config(data.resolve(), variants))
        if not timed_only:
            for d in ("runs", "folds", "submissions", "reports"):
                shutil.rmtree(work / d, ignore_errors=True)
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "pipeline", "all", "--config", "scale.yaml"], cwd=work,
                               capture_output=True, text=True, env={"PYTHONPATH": str(code.resolve()), "PATH": "/usr/bin:/bin"})
            if r.returncode != 0:
                print(r.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"all failed with {code}")
            print(f"{code}: all in {time.perf_counter() - t0:.0f}s", flush=True)
    times: dict[int, list[float]] = {i: [] for i in range(len(codes))}
    for rep in range(repeats):
        for i, (code, work) in enumerate(zip(codes, works)):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "pipeline", "ensemble", "--force", "--config", "scale.yaml"],
                               cwd=work, capture_output=True, text=True,
                               env={"PYTHONPATH": str(code.resolve()), "PATH": "/usr/bin:/bin"})
            if r.returncode != 0:
                print(r.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"ensemble failed with {code}")
            times[i].append(time.perf_counter() - t0)
            print(f"  repeat {rep}: {code}: ensemble --force {times[i][-1]:.1f}s", flush=True)
    base = float(np.median(times[0]))
    for i, code in enumerate(codes):
        med = float(np.median(times[i]))
        print(f"{code}: stage 5 median {med:.1f}s (runs {', '.join(f'{t:.1f}' for t in times[i])}), "
              f"{med / base:.3f}x the first checkout's", flush=True)


def one(work_root: Path, n_classes: int, n_images: int, variants: list[str]) -> list[dict]:
    work = work_root / f"c{n_classes}_n{n_images}"
    root = work / "data"
    if not (root / "train.json").exists():
        shutil.rmtree(work, ignore_errors=True)
        per, extra = divmod(n_images, n_classes)
        t0 = time.perf_counter()
        coco_competition(root, [per + (i < extra) for i in range(n_classes)], size=16, n_test=max(n_images // 10, 10))
        print(f"generated {n_classes} classes x {n_images} images in {time.perf_counter() - t0:.0f}s", flush=True)
    for d in ("runs", "folds", "submissions", "reports"):
        shutil.rmtree(work / d, ignore_errors=True)
    (work / "scale.yaml").write_text(config(root.resolve(), variants))
    out = []
    for stage in STAGES:
        row = {"classes": n_classes, "images": n_images, **run_stage(work, stage)}
        row["disk_gb"] = sum(folder_bytes(work / d) for d in ("runs", "folds", "submissions")) / 2**30
        print(f"{n_classes:>6} classes {n_images:>6} images  {stage:<10} {row['seconds']:7.1f}s  peak RSS "
              f"{row['peak_rss_gb']:.2f} GB  outputs {row['disk_gb']:.2f} GB", flush=True)
        out.append(row)
    sub = (work / "submissions" / "scale.csv").read_text().splitlines()
    print(f"submission: {len(sub) - 1} rows, header {sub[0]!r}, first row {sub[1]!r}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000x4000,5000x20000,10000x20000")
    ap.add_argument("--work", default="/tmp/pipeline-scale")
    ap.add_argument("--variants", default="joint,tau,crt,logit_adjust")
    ap.add_argument("--all-in-one", action="store_true", help="./run.sh all in one process per --code checkout")
    ap.add_argument("--code", action="append", type=Path, help="a checkout to run (repeat: side by side)")
    ap.add_argument("--n-test", type=int, help="test images (default: a tenth of the train images)")
    ap.add_argument("--stage5", type=int, metavar="N", help="time `ensemble --force` N times per --code, alternating")
    ap.add_argument("--timed-only", action="store_true", help="with --stage5: reuse the outputs of an earlier run")
    a = ap.parse_args()
    if a.stage5:
        for size in a.sizes.split(","):
            c, n = (int(v) for v in size.lower().split("x"))
            stage5_side_by_side(Path(a.work), c, n, a.variants.split(","), a.code or [REPO], a.stage5, a.timed_only)
        return 0
    if a.all_in_one:
        for size in a.sizes.split(","):
            c, n = (int(v) for v in size.lower().split("x"))
            for code in a.code or [REPO]:
                r = all_in_one(Path(a.work), c, n, a.variants.split(","), code, a.n_test)
                print(f"{r['code']}: {c} classes x {n} images ({r['test']} test): all in {r['seconds']:.0f}s, peak RSS "
                      f"{r['peak_rss_gb']:.2f} GB, runs/ {r['runs_gb']:.2f} GB; stages "
                      + ", ".join(f"{k} {v:.0f}s" for k, v in r["stages"].items()), flush=True)
                print(f"  submission head: {r['submission']}", flush=True)
        return 0
    rows = []
    for size in a.sizes.split(","):
        c, n = (int(v) for v in size.lower().split("x"))
        rows += one(Path(a.work), c, n, a.variants.split(","))
    print("\nclasses images stage      seconds peak_RSS_GB outputs_GB")
    for r in rows:
        print(f"{r['classes']:>7} {r['images']:>6} {r['stage']:<10} {r['seconds']:7.1f} {r['peak_rss_gb']:11.2f} "
              f"{r['disk_gb']:10.2f}")
    for c in sorted({r["classes"] for r in rows}):
        mine = [r for r in rows if r["classes"] == c]
        print(f"{c} classes: all stages {sum(r['seconds'] for r in mine):.0f}s, peak RSS "
              f"{max(r['peak_rss_gb'] for r in mine):.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
