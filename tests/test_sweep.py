"""./run.sh sweep: the space checked against the schema, the nested selection across trials, pruning, a killed
worker's trial re-queued and resumed, the leaderboard's view of a sweep."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, cli, config_from_items, make_competition
from pipeline.core.config import load_config
from pipeline.core.files import layout
from pipeline.core.files.artifacts import read_json
from pipeline.tools import sweep

TINY = ["data.image_ext=.png", "model.arch=test_resnet", "aug.img_size=16", "aug.cache=off", "train.batch_size=8",
        "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0", "infer.views=[orig]", "train.ema=false"]


def space_file(path, text):
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- the space
def test_a_misspelt_or_out_of_range_space_is_refused_before_any_trial(workdir):
    cfg = config_from_items(workdir / "base.yaml", ["experiment=s", *TINY])
    bad = space_file(workdir / "space.yaml", "train.lrr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                                             "train.epochs: {type: int, low: 0, high: 3}\n"
                                             "aug.img_size: {type: categorical, choices: [16, big]}\n"
                                             "train.mixup_alpha: {type: float, low: 0.4, high: 0.1}\n"
                                             "train.cutmix_alpha: {type: float, low: 0.0, high: 1.0, "
                                             "when: {train.lr: [0.01]}}\n"
                                             "experiment: {type: categorical, choices: [a, b]}\n")
    r = cli(["sweep", "--config", str(cfg), "--space", str(bad), "--trials", "2"], workdir)
    assert r.returncode == 2, r.stderr
    err = r.stderr
    assert "'train.lrr' is not a config key; did you mean 'train.lr'?" in err
    assert "'train.epochs' = 0" in err and "train.epochs" in err            # below the schema's range
    assert "'aug.img_size' = 'big'" in err                                  # not an int
    assert "low < high" in err                                              # an empty interval
    assert "when names ['train.lr']" in err                                 # a condition on no key of the space
    assert "'experiment' cannot be swept" in err
    assert str(bad) in err and "no trial was run" in err and "Traceback" not in err
    assert not (workdir / "runs").exists() and not (workdir / "folds").exists()   # nothing written


def test_a_good_space_reads_every_kind_and_its_conditions(workdir):
    good = space_file(workdir / "space.yaml", "train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                                              "model.arch: {type: categorical, choices: [test_resnet, resnet10t]}\n"
                                              "train.layer_decay: {type: float, low: 0.6, high: 0.9, "
                                              "when: {model.arch: resnet10t}}\n"
                                              "train.epochs: {type: int, low: 1, high: 3}\n")
    params = sweep.read_space(good, None, TINY)
    assert [p.kind for p in params] == ["float", "categorical", "float", "int"] and params[0].log
    assert params[2].active({"model.arch": "resnet10t"}) and not params[2].active({"model.arch": "test_resnet"})


# ----------------------------------------------------------------------------- honest selection
def test_nested_selection_on_hand_made_per_fold_scores():
    per_fold = {"a": [0.9, 0.5, 0.5], "b": [0.6, 0.6, 0.6], "c": [0.5, 0.7, 0.7]}
    s = sweep.nested_cv(per_fold, greater=True)
    assert s["winner"] == "a" and s["naive"] == pytest.approx(1.9 / 3)
    # fold 0: best on folds 1-2 is c (0.7) -> 0.5; folds 1 and 2: best elsewhere is a (0.7) -> 0.5 and 0.5
    assert s["chosen_per_fold"] == ["c", "a", "a"] and s["nested_per_fold"] == [0.5, 0.5, 0.5]
    assert s["nested"] == pytest.approx(0.5)
    low = sweep.nested_cv({"a": [0.1, 0.5], "b": [0.3, 0.2]}, greater=False)   # log-loss: lower is better
    assert low["winner"] == "b" and low["chosen_per_fold"] == ["b", "a"] and low["nested"] == pytest.approx(0.4)


def test_on_noise_the_naive_winner_is_optimistic_and_the_nested_cv_stays_at_chance():
    """Permuted labels: every trial's per-fold accuracy is chance plus noise. Picking the best of 30 trials lifts the
    naive figure well above chance; the nested sweep CV stays there."""
    rng = np.random.default_rng(0)
    chance, naive, nested = 0.2, [], []
    for _ in range(200):
        per_fold = {f"t{i}": list(chance + rng.normal(0, 0.03, 5)) for i in range(30)}
        s = sweep.nested_cv(per_fold, greater=True)
        naive.append(s["naive"])
        nested.append(s["nested"])
    assert np.mean(naive) > chance + 0.02
    assert abs(np.mean(nested) - chance) < 0.004


# ----------------------------------------------------------------------------- end to end
def _base(workdir, *extra):
    root = make_competition(workdir / "comp", {"a": 10, "b": 10, "c": 10}, size=16, n_test=6)
    return config_from_items(workdir / "base.yaml", [f"data.root={root}", "experiment=s", *TINY, *extra])


@pytest.mark.slow
def test_a_sweep_prunes_ranks_honestly_and_finishes_as_an_ordinary_experiment(workdir):
    base = _base(workdir, "train.epochs=15", "train.min_lr=0", "sweep.startup_trials=1")  # long enough to stop
    space = space_file(workdir / "space.yaml", "train.lr: {type: categorical, choices: [0.01, 1.0e-7]}\n")
    cfg = load_config(base)
    sw = sweep.Sweep.of(cfg, [], str(space))
    study = sweep.open_study(sw)  # the first trial learns, the second cannot: pruned early in fold 0
    for lr in (0.01, 1e-7, 0.01):
        study.enqueue_trial({"train.lr": lr})
    r = cli(["sweep", "--config", str(base), "--space", str(space), "--trials", "3"], workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    s = read_json(layout.SweepDir.of("s-sweep").trials)
    states = {t["trial"]: t["state"] for t in s["trials"]}
    assert states == {0: "complete", 1: "pruned", 2: "complete"}, s["trials"]
    assert s["trials"][1]["intermediate"]          # pruned on stage 2's per-epoch held-out metric
    assert not (workdir / "runs/s-sweep-t1/fold1/summary.json").exists()   # stopped, never finished
    sel = s["selection"]
    assert sel["nested"] is not None and sel["winner"] in ("s-sweep-t0", "s-sweep-t2")
    assert "nested sweep CV" in r.stdout and "selected on the rows it is scored on" in r.stdout
    page = workdir / "reports/s-sweep/index.md"
    assert page.exists() and (workdir / "reports/s-sweep/history.png").exists()
    assert (workdir / "reports/s-sweep/param_train.lr.png").exists()
    # the leaderboard: the pruned trial is no row; the sweep's nested CV is; the naive winner is marked
    from pipeline.tools.reports import leaderboard

    t = leaderboard.build(workdir / "runs")
    assert "s-sweep-t1" not in set(t["experiment"])
    row = t[t["experiment"] == "s-sweep"].iloc[0]
    assert row["kind"] == "sweep" and row["cv_mean"] == pytest.approx(sel["nested"])
    assert (t[t["experiment"] == sel["winner"]]["note"].str.contains("best of sweep s-sweep")).all()
    assert set(t.loc[t["experiment"].str.startswith("s-sweep-t"), "sweep"]) == {"s-sweep"}
    # --finish: the winner through stages 1-5 -> submissions/s-sweep-winner.csv, marked and ranked last (#45)
    journal = layout.SweepDir.of("s-sweep").journal.read_bytes()
    r = cli(["sweep", "--config", str(base), "--finish"], workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert layout.SweepDir.of("s-sweep").journal.read_bytes() == journal       # --finish wrote no study record
    assert (workdir / "submissions/s-sweep-winner.csv").exists() and layout.SweepDir.of("s-sweep").best.exists()
    t = leaderboard.rank(leaderboard.build(workdir / "runs"))
    nested = t[t["experiment"] == "s-sweep"]
    assert len(nested) == 1 and nested["kind"].iloc[0] == "sweep" and nested["note"].iloc[0] == ""
    fin = t[t["experiment"] == "s-sweep-winner"].iloc[0]
    assert "selected on these rows" in fin["note"] and sel["winner"] in fin["note"]
    assert fin["rank"] > nested["rank"].iloc[0] and (t.loc[t["note"] == "", "rank"] < fin["rank"]).all()


def worker_at_checkpoint(args: list[str], workdir, ckpt) -> subprocess.Popen:
    """A sweep worker started as its own process, returned once its trial wrote its first stage-2 checkpoint."""
    worker = subprocess.Popen(args, cwd=workdir, env=dict(os.environ, PYTHONPATH=str(REPO)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), "the trial never reached its first checkpoint"
    return worker


@pytest.mark.slow
def test_a_killed_worker_s_trial_is_queued_again_and_resumes_from_its_checkpoint(workdir):
    base = _base(workdir, "train.epochs=60", "sweep.pruner=none")  # 60 one-step epochs: the kill lands in fold 0
    space = space_file(workdir / "space.yaml", "train.lr: {type: float, low: 0.005, high: 0.02, log: true}\n")
    args = [sys.executable, "-m", "pipeline", "sweep", "--config", str(base), "--space", str(space), "--trials", "1"]
    worker = worker_at_checkpoint(args, workdir, workdir / "runs/s-sweep-t0/fold0/last.pt")
    worker.send_signal(signal.SIGKILL)  # no clean-up: the trial stays RUNNING in the study
    worker.wait()
    time.sleep(2)  # its trial process got SIGTERM (it dies with its worker)
    r = cli(["sweep", "--config", str(base), "--space", str(space), "--trials", "1"], workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lost its worker: queued again" in r.stderr
    s = read_json(layout.SweepDir.of("s-sweep").trials)
    assert [(t["state"], t["experiment"]) for t in s["trials"]] == [("failed", "s-sweep-t0"),
                                                                     ("complete", "s-sweep-t0")]
    assert s["trials"][1]["retry_of"] == 0 and s["trials"][1]["params"] == s["trials"][0]["params"]
    logs = "".join(p.read_text() for p in (workdir / "runs/s-sweep-t0/logs").glob("train-*.log"))
    assert "resum" in logs  # stage 2 went on from the killed run's checkpoint, not from scratch
    assert json.loads(json.dumps(s["selection"]))["winner"] == "s-sweep-t0"
