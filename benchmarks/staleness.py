"""What the image records cost (not a test): prints the figures docs/benchmarks/staleness.md quotes.

    python benchmarks/staleness.py [--files 100000] [--kb 20]

Writes N image-sized files into a temporary folder and times `provenance.image_record` over them: the
default record (size and mtime of every file: one stat each) and `data.hash_images: true` (sha256 of every
file's bytes), each twice (the second call is what a repeated `status` pays), and how long naming the
changed files takes after one is replaced.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.files import artifacts, provenance  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--kb", type=int, default=20, help="size of each file (a small JPEG is 20-100 KB)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-stale-"))
    try:
        blob = os.urandom(args.kb * 1024)
        t0 = time.perf_counter()
        paths = []
        for i in range(args.files):
            p = tmp / f"{i // 1000:03d}" / f"img{i:06d}.jpg"
            if i % 1000 == 0:
                p.parent.mkdir()
            p.write_bytes(blob[:-8] + i.to_bytes(8, "little"))
            paths.append(str(p))
        print(f"{args.files} files of {args.kb} KB written in {time.perf_counter() - t0:.1f}s")
        os.chdir(tmp)
        for hashed in (False, True):
            cfg = load_config(None, [f"data.hash_images={str(hashed).lower()}"])
            for attempt in ("first", "again"):
                if attempt == "first":
                    artifacts._HASHES.clear()  # the per-process hash memo: the first call reads every file
                t0 = time.perf_counter()
                rec = provenance.image_record(paths, cfg.data.hash_images)
                dt = time.perf_counter() - t0
                print(f"{'sha256 of bytes' if hashed else 'size + mtime':>15}, {attempt}: {dt:.2f}s "
                      f"({1e6 * dt / args.files:.1f} us/file)")
            if not hashed:
                provenance.keep_image_snapshots({"images": rec})
                Path(paths[123]).write_bytes(b"another picture")
                t0 = time.perf_counter()
                new = provenance.image_record(paths, cfg.data.hash_images)
                why = provenance.describe_changes({"images": rec}, {"images": new})
                print(f"naming the replaced file: {time.perf_counter() - t0:.2f}s -> {why[0][:90]}")
                print(f"the list behind the record: {os.path.getsize(provenance.layout.image_snapshot(rec['digest'])) / 1e6:.1f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
