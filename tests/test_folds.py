import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, make_competition
from pipeline.core.config import load_config
from pipeline.core.inputs.data import read_folds
from pipeline.core.errors import PipelineError
from pipeline.stages import folds as folds_stage
from pipeline.stages.folds import make_folds


def test_stratified_within_one_of_even_disjoint_and_covering():
    rng = np.random.default_rng(0)
    labels = rng.choice(list("abcdefg"), size=503, p=[0.4, 0.2, 0.15, 0.1, 0.08, 0.05, 0.02])
    df = pd.DataFrame({"label": labels})
    k = 5
    fold = make_folds(df, k, seed=3, grouped=False)
    assert set(fold) == set(range(k))            # every row gets exactly one fold: disjoint and covering
    for c in "abcdefg":
        per = np.bincount(fold[labels == c], minlength=k)
        even = (labels == c).sum() / k
        assert np.all(np.abs(per - even) <= 1), (c, per)
    assert np.array_equal(fold, make_folds(df, k, seed=3, grouped=False))
    assert not np.array_equal(fold, make_folds(df, k, seed=4, grouped=False))


def test_groups_never_split():
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 60, 400)
    labels = np.array(list("abc"))[groups % 3]
    df = pd.DataFrame({"label": labels, "group": groups})
    fold = make_folds(df, 4, seed=0, grouped=True)
    per_group = pd.Series(fold).groupby(groups).nunique()
    assert (per_group == 1).all()
    assert set(fold) == set(range(4))


def test_too_few_groups_fails():
    df = pd.DataFrame({"label": list("abab"), "group": [1, 1, 2, 2]})
    with pytest.raises(PipelineError, match="only 2 distinct group"):
        make_folds(df, 3, seed=0, grouped=True)


def test_stage_writes_byte_identical_file_and_class_list(workdir):
    root = make_competition(workdir / "comp", {"b": 9, "a": 6, "c": 5}, groups_per_class=3)
    cfg = load_config(None, [f"data.root={root}", "data.image_ext=.png", "folds.n_splits=3", "data.group_col=group"])
    rec = folds_stage.run(cfg)
    assert rec["classes"] == ["a", "b", "c"] and rec["n_rows"] == 20 and folds_stage.status(cfg) == []
    first = cfg.folds_csv.read_bytes()
    df, classes = read_folds(cfg.folds_name)
    assert classes == ["a", "b", "c"]
    assert df.groupby("group")["fold"].nunique().max() == 1
    mtime = cfg.folds_csv.stat().st_mtime_ns
    assert folds_stage.run(cfg) == rec                    # up to date: skipped, file untouched
    assert cfg.folds_csv.stat().st_mtime_ns == mtime
    assert folds_stage.run(cfg, force=True)["made_from"] == rec["made_from"]
    assert cfg.folds_csv.read_bytes() == first            # same inputs and seed: byte-identical
    # a changed table under the same folds name is refused, not silently overwritten
    t = pd.read_csv(root / "train.csv")
    t.iloc[:-1].to_csv(root / "train.csv", index=False)
    with pytest.raises(PipelineError, match="made from different inputs.*table"):
        folds_stage.run(cfg)
    assert cfg.folds_csv.read_bytes() == first


@pytest.mark.slow
def test_run_sh_folds_end_to_end(tmp_path):
    """The real entry point on the real demo: ./run.sh folds in a copy of the project."""
    for name in ("run.sh", "pyproject.toml", "requirements-lock.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    env = dict(os.environ, PIPELINE_NO_VENV="1", PYTHON=sys.executable, PYTHONPATH=str(REPO))
    r = subprocess.run(["./run.sh", "folds"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = list((tmp_path / "folds").glob("*.csv"))
    assert len(out) == 1
    df = pd.read_csv(out[0])
    assert {"id", "label", "fold"} <= set(df.columns) and df["fold"].nunique() == 4
    assert "fold0" in r.stderr                               # the per-fold class-count table is printed
    assert (tmp_path / "data" / "demo" / "train.csv").exists()
    r = subprocess.run(["./run.sh", "help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "rebalance" in r.stdout
