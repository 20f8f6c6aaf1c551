import hashlib

import numpy as np
import pandas as pd
from PIL import Image
import pytest

from pipeline.tools.demo import build_demo


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_demo_is_long_tailed_balanced_test_and_deterministic(tmp_path):
    root = build_demo(tmp_path / "a" / "demo", seed=1)
    train = pd.read_csv(root / "train.csv")
    counts = train["label"].value_counts()
    assert counts.max() >= 20 * counts.min()                       # long-tailed train split
    assert len(counts) == 10
    private = pd.read_csv(root.parent / "demo-private" / "test_labels.csv")
    assert private["label"].value_counts().nunique() == 1         # balanced test split
    sub = pd.read_csv(root / "sample_submission.csv")
    assert sub["image_id"].tolist() == private["image_id"].tolist()
    assert sub["label"].nunique() == 1                             # the test labels are not in the competition folder
    assert not any("label" in p.name for p in root.rglob("*") if p.suffix == ".csv" and p.name != "train.csv"
                   and p.name != "sample_submission.csv")
    img = np.asarray(Image.open(root / "train" / f"{train['image_id'][0]}.png"))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    again = build_demo(tmp_path / "b" / "demo", seed=1)
    assert digest(root) == digest(again)
    other = build_demo(tmp_path / "c" / "demo", seed=2)
    assert digest(root) != digest(other)
