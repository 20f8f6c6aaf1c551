"""Experiment management: leaderboard, compare, up-to-date `all`, stale-input refusal, reports."""
import json
import os
import shutil
import subprocess
import sys
import re

import numpy as np
import pandas as pd
from PIL import Image
import pytest

from conftest import REPO, cli
from pipeline.core.files.artifacts import write_npz
from pipeline.core.config import load_config
from pipeline.tools.reports.leaderboard import build, rank

K, C = 3, 4


def fake_run(root, name, strength, folds_hash="a" * 64, seed=0, arch="resnet10t"):
    """A finished stage-2 run folder whose OOF logits are right with a controlled margin."""
    cfg = load_config(None, [f"experiment={name}", f"model.arch={arch}", f"folds.n_splits={K}",
                             "eval.metric=accuracy", "data.test_labels=null"])
    d = root / "runs" / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(cfg.to_yaml())
    (d / "classes.json").write_text(json.dumps(list("abcd")))
    rng = np.random.default_rng(seed)
    for k in range(K):
        y = np.repeat(np.arange(C), 10)
        logits = rng.normal(0, 1, (len(y), C)) + strength * np.eye(C)[y]
        (d / f"fold{k}").mkdir()
        write_npz(d / f"fold{k}" / "oof.npz", ids=np.array([f"{name}{k}_{i}" for i in range(len(y))]), y=y,
                  logits=logits.astype(np.float32))
        (d / f"fold{k}" / "summary.json").write_text(json.dumps(
            {"fold": k, "train_counts": [200, 50, 10, 5], "made_from": {"folds_file": folds_hash}}))


def test_leaderboard_ranks_runs_and_flags_other_folds(workdir):
    fake_run(workdir, "strong", 3.0)
    fake_run(workdir, "weak", 0.5, seed=1)
    fake_run(workdir, "other-folds", 6.0, folds_hash="b" * 64, seed=2)   # best CV, but on another folds file
    (workdir / "submissions").mkdir()
    (workdir / "submissions" / "ens.json").write_text(json.dumps({
        "name": "ens", "members": ["strong:joint", "weak:joint"], "method": "mean", "metric": "accuracy",
        "private": None, "table": [{"member": "ensemble (mean)", "cv_mean": 0.7, "cv_std": 0.01, "cv_pooled": 0.7}]}))
    t = rank(build(workdir / "runs"))
    assert t["experiment"].tolist() == ["strong", "ens", "weak", "other-folds"]
    assert t["note"].tolist() == ["", "", "", "folds differ"]
    assert (np.diff(t["cv_mean"].values[:3]) < 0).all()
    assert t.loc[1, "members"] == "strong:joint + weak:joint"

    r = cli(["leaderboard", "--filter", "model=resnet*", "--sort", "few_acc"], workdir)
    assert r.returncode == 0, r.stderr
    csv = pd.read_csv(workdir / "reports" / "leaderboard.csv")
    assert set(csv["experiment"]) == {"strong", "weak", "other-folds"}               # filter dropped the ensemble
    comparable = csv[csv["note"].isna()]
    assert comparable["few_acc"].is_monotonic_decreasing and csv["note"].iloc[-1] == "folds differ"
    md = (workdir / "reports" / "leaderboard.md").read_text()
    assert "| rank | experiment |" in md and "folds differ" in md
    r = cli(["leaderboard", "--filter", "w*"], workdir)
    assert r.returncode == 0 and pd.read_csv(workdir / "reports" / "leaderboard.csv")["experiment"].tolist() == ["weak"]
    r = cli(["leaderboard", "--sort", "nope"], workdir)
    assert r.returncode == 2 and "--sort nope: no such column" in r.stderr


def test_compare_shows_config_and_metric_differences_against_fold_noise(workdir):
    fake_run(workdir, "a", 3.0, arch="resnet10t")
    fake_run(workdir, "b", 0.3, arch="resnet18", seed=1)
    fake_run(workdir, "a2", 3.0, seed=0)                                   # same predictions as a
    r = cli(["compare", "a", "b"], workdir)
    assert r.returncode == 0, r.stderr
    assert "model.arch: 'resnet10t' -> 'resnet18'" in r.stdout
    row = [line for line in r.stdout.splitlines() if line.strip().startswith("joint")][0]
    assert "A better" in row and "fold0" in r.stdout
    r = cli(["compare", "a", "a2"], workdir)
    assert "(none besides the name)" in r.stdout and "within fold noise" in r.stdout
    assert cli(["compare", "a", "missing"], workdir).returncode == 2


def ran(stderr: str) -> list[str]:
    line = [ln for ln in stderr.splitlines() if ln.startswith("all: ran")][-1]
    return sorted(re.match(r"all: ran (.*); up to date", line).group(1).replace("nothing", "").split())


@pytest.mark.slow
def test_all_reruns_exactly_the_stale_stages_and_refuses_stale_inputs(workdir):
    """./run.sh all on the debug config (through run.sh, as a user starts it), then re-runs of exactly the stale
    stages."""
    for name in ("run.sh", "pyproject.toml", "requirements-lock.txt"):
        shutil.copy(REPO / name, workdir / name)
    shutil.copytree(REPO / "configs", workdir / "configs")
    env = dict(os.environ, PIPELINE_NO_VENV="1", PYTHON=sys.executable, PYTHONPATH=str(REPO))
    r = subprocess.run(["./run.sh", "all", "--config", "configs/debug.yaml"], cwd=workdir, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sub = pd.read_csv(workdir / "submissions/debug.csv")
    assert sub["image_id"].tolist() == pd.read_csv(workdir / "data/demo/sample_submission.csv")["image_id"].tolist()
    assert "private leaderboard" in r.stderr and "CV joint" in r.stderr
    for stage in ("folds", "train", "rebalance", "infer", "ensemble"):
        assert f"({stage}) of 'debug' finished" in r.stderr
    cfg = ["--config", str(workdir / "configs" / "debug.yaml")]
    every = ["debug:ensemble", "debug:folds", "debug:infer", "debug:rebalance", "debug:train"]
    assert ran(r.stderr) == every
    assert ran(cli(["all", *cfg], workdir).stderr) == []                           # all up to date
    assert ran(cli(["all", *cfg, "train.workers=1"], workdir).stderr) == []        # nothing depends on it
    r = cli(["all", *cfg, "infer.merge=mean_logit"], workdir)
    assert ran(r.stderr) == ["debug:ensemble", "debug:infer"]
    assert "stage 4 (infer) of 'debug' is stale: changed infer.merge" in r.stderr
    r = cli(["all", *cfg, "infer.merge=mean_logit", "train.lr=0.002"], workdir)
    assert ran(r.stderr) == ["debug:ensemble", "debug:infer", "debug:rebalance", "debug:train"]

    # back to the default lr: stage 2's weights are stale for this config; later stages refuse them
    for stage in ("rebalance", "infer"):
        r = cli([stage, *cfg, "infer.merge=mean_logit"], workdir)
        assert r.returncode == 2
        assert re.search(r"runs/debug/fold0/summary.json \(the fold's stage-2 weights\) is stale.*changed: train.lr",
                         r.stderr), r.stderr
    r = cli(["status", *cfg, "infer.merge=mean_logit"], workdir)
    assert "2 train      stale: fold 0: changed train.lr" in r.stdout and "waits for stage 2" in r.stdout
    before = (workdir / "runs/debug/infer/summary.json").read_bytes()
    r = cli(["infer", *cfg, "--allow-stale"], workdir)                     # told to proceed
    assert r.returncode == 0 and "used anyway (--allow-stale)" in r.stderr
    assert (workdir / "runs/debug/infer/summary.json").read_bytes() != before

    # the report pictures are valid PNGs and the page shows each of them
    page = (workdir / "reports/debug/index.md").read_text()
    pngs = sorted((workdir / "reports/debug").glob("*.png"))
    assert {p.name for p in pngs} >= {"training_curves.png", "confusion.png", "recall_vs_frequency.png",
                                      "tta_gain.png", "confidently_wrong.png", "tau_sweep.png"}
    for p in pngs:
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100
        assert f"]({p.name})" in page
    env = json.loads((workdir / "runs/debug/fold0/summary.json").read_text())["env"]
    assert env["torch"] and env["timm"] and "git_commit" in env
    assert (workdir / "reports" / "leaderboard.csv").exists()


def test_many_classes_are_reported_as_most_confused_pairs_and_recall_by_frequency_bin():
    from pipeline.tools.reports.experiment_page import most_confused, recall_by_frequency

    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    pred = np.array([0, 1, 1, 0, 1, 3, 3, 2, 1, 3])
    t = most_confused(y, pred, ["a", "b", "c", "d"], n=2)
    assert t[["true", "predicted", "images"]].values.tolist() == [["a", "b", 2], ["c", "d", 2]]
    assert t["share_of_true"].tolist() == [2 / 3, 2 / 4]
    bins = recall_by_frequency(y, pred, np.array([1, 3, 30, 150]))
    assert bins["train_images"].tolist() == ["1", "2-4", "20-99", "100+"]
    assert bins["mean_recall"].tolist() == [1 / 3, 1 / 2, 1 / 4, 1.0]
