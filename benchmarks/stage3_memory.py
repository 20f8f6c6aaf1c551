"""Stage 3's heads on a large feature cache, side by side (#49; not a test): peak resident memory and seconds of
fitting and scoring the six variants of one fold from its cached features, per checkout, and whether the heads are
the same bytes.

    python benchmarks/stage3_memory.py [--rows 100000] [--dim 1280] [--classes 10000] [--views 1]
        [--dtype float16] --code /tmp/old-checkout --code .

One fold's cache as stage 3 writes it (runs/<exp>/fold0/rebalance/features.npz: `rows` train rows, as many
held-out rows, `views` augmented views of the train rows, the joint classifier), generated once under --work:
features of width `dim` around a random centre per class (rows spread evenly over the classes), stored in
`dtype`. Each checkout then reads it the way its stage 3 does (before #49: the whole cache upcast to float32;
since: memory maps read a block of rows at a time) and runs its `fit_variants` over joint, cRT, tau, LWS, NCM and
logit adjustment (cRT and LWS for --epochs epochs), in its own process under /usr/bin/time -v (peak RSS, which
counts the pages of a mapped file the process touched: the kernel can drop those, so the anonymous memory's peak
is printed beside it). Figures in docs/benchmarks/scale.md.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ["joint", "crt", "tau", "lws", "ncm", "logit_adjust"]

# run in each checkout's process: read the cache as that checkout's stage 3 does, fit and score every variant
CHILD = """
import hashlib, json, sys, threading, time
import numpy as np
peak = {"RssAnon": 0, "RssFile": 0}
phase = {"RssAnon": 0}
def sample():  # the anonymous memory and the mapped file pages (which the kernel can drop), every 50 ms
    while True:
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in peak:
                peak[k] = max(peak[k], int(v.split()[0]))
                if k in phase:
                    phase[k] = max(phase[k], int(v.split()[0]))
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
from pipeline.core.config import load_config
from pipeline.stages.rebalance import fit_variants
try:
    from pipeline.core.files.artifacts import map_npz as read  # since #49
except ImportError:
    from pipeline.core.files.artifacts import read_feature_cache as read
cfg = load_config(None, json.loads(sys.argv[2]))
t0 = time.perf_counter()
feats = read(sys.argv[1])
out, phases = {}, {}
for v, o in fit_variants(cfg.rebalance, cfg.eval, feats, feats["joint_weight"], feats["joint_bias"],
                         int(sys.argv[3]), 0):
    h = o["head"]
    out[v] = {"score": float(o["metrics"]["score"]), "sha256": hashlib.sha256(
        np.ascontiguousarray(h.weight, np.float32).tobytes() + np.ascontiguousarray(h.bias, np.float32).tobytes()
        ).hexdigest()[:16]}
    phases[v] = phase["RssAnon"] / 2**10
    phase["RssAnon"] = 0
print(json.dumps({"seconds": time.perf_counter() - t0, "variants": out, "anon_gb": peak["RssAnon"] / 2**20,
                  "file_gb": peak["RssFile"] / 2**20, "anon_mb_per_variant": phases}))
"""


def make_cache(path: Path, rows: int, dim: int, classes: int, views: int, dtype: str) -> None:
    """features.npz as stage 3 writes it, one fold's: train, valid, views, labels, ids, the joint classifier."""
    from pipeline.core.files.artifacts import write_npz

    if path.exists():
        return
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)

    def feats(y):  # a block at a time: the generator never holds float64 rows x dim
        out = np.empty((len(y), dim), dtype)
        for a in range(0, len(y), 8192):
            out[a:a + 8192] = centres[y[a:a + 8192]] + 2.0 * rng.normal(size=(len(y[a:a + 8192]), dim))
        return out

    y_tr, y_va = rng.permutation(np.arange(rows) % classes), rng.permutation(np.arange(rows) % classes)
    w = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_npz(path, train=feats(y_tr), train_y=y_tr, valid=feats(y_va), valid_y=y_va,
              valid_ids=np.arange(rows), views=np.stack([feats(y_tr) for _ in range(views)]),
              joint_weight=w, joint_bias=np.zeros(classes, np.float32))


def run_code(code: Path, cache: Path, classes: int, overrides: list[str]) -> dict:
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", CHILD, str(cache), json.dumps(overrides),
                        str(classes)], capture_output=True, text=True,
                       env={"PYTHONPATH": str(code.resolve()), "PATH": "/usr/bin:/bin"})
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{code} failed (exit {r.returncode})")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "peak_rss_gb": int(rss.group(1)) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000, help="train rows (and as many held-out rows)")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=10_000)
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--epochs", type=int, default=1, help="cRT and LWS epochs")
    ap.add_argument("--work", default="/tmp/stage3-memory")
    ap.add_argument("--code", action="append", default=[], help="a checkout (repeat: side by side)")
    args = ap.parse_args()
    cache = Path(args.work) / f"r{args.rows}_d{args.dim}_c{args.classes}_v{args.views}_{args.dtype}" / "features.npz"
    t0 = time.perf_counter()
    make_cache(cache, args.rows, args.dim, args.classes, args.views, args.dtype)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}: cache {cache} ({cache.stat().st_size / 2**30:.2f} GB, made or found "
          f"in {time.perf_counter() - t0:.0f}s)", flush=True)
    overrides = [f"rebalance.variants=[{','.join(VARIANTS)}]", f"rebalance.crt_epochs={args.epochs}",
                 f"rebalance.lws_epochs={args.epochs}", "eval.metric=top_k_accuracy", "eval.top_k=5"]
    results = []
    for code in args.code or ["."]:
        results.append({"code": code, **run_code(Path(code), cache, args.classes, overrides)})
        r = results[-1]
        print(f"{code}: {r['seconds']:.0f}s, peak RSS {r['peak_rss_gb']:.2f} GB (anonymous {r['anon_gb']:.2f}, "
              f"mapped file pages {r['file_gb']:.2f}: sampled every 50 ms; anonymous MB while each variant is fit: "
              + ", ".join(f"{v} {m:.0f}" for v, m in r["anon_mb_per_variant"].items()) + "), scores "
              + ", ".join(f"{v} {o['score']:.4f}" for v, o in r["variants"].items()), flush=True)
    if len(results) > 1:
        same = all(r["variants"] == results[0]["variants"] for r in results[1:])
        print(f"heads and scores identical across checkouts: {same}")


if __name__ == "__main__":
    main()
