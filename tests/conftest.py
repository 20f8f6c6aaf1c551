"""Shared test helpers: a tiny generated competition in a temporary working folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh folder: folds/, runs/ and submissions/ land there, not in the repo."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make_competition(root: Path, counts: dict, size: int = 16, ext: str = ".png", n_test: int = 6,
                     groups_per_class: int | None = None, seed: int = 0, with_ext_in_id: bool = False) -> Path:
    """Write a Kaggle-layout competition: each class is a distinct colour plus noise (learnable)."""
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
                row["group"] = f"g{hash(str(c)) % 1000}_{j % groups_per_class}"
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


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` in a subprocess, as run.sh does."""
    e = dict(os.environ, PYTHONPATH=str(REPO))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)
