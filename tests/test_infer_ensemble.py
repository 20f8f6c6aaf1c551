"""Stages 4 and 5: TTA views, inference on OOF and test, ensembles, the submission file."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, make_competition, stage4_probs
from pipeline.core.nets import models
from pipeline.core.inputs.augment import open_store, valid_transform
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.inputs.images import ImageDataset
from pipeline.core.predict.metrics import softmax
from pipeline.core.engine.runtime import amp_dtype, make_loader
from pipeline.stages import ensemble as ens_stage
from pipeline.stages import folds as folds_stage
from pipeline.stages import infer as infer_stage
from pipeline.stages import rebalance as rebalance_stage
from pipeline.stages import train as train_stage
from pipeline.stages.ensemble import fit_weights
from pipeline.core.predict.submission import combine
from pipeline.core.predict.tta import merge, sizes
from pipeline.core.predict.inference import policy_logits
from pipeline.core.inputs.pixels import pixels

BASE = ["data.image_ext=.png", "model.arch=test_resnet", "aug.img_size=32", "aug.cache=off",
        "train.batch_size=8", "train.epochs=1", "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0",
        "rebalance.crt_epochs=3", "rebalance.lws_epochs=3"]


def cfg_of(root, exp, *extra):
    return load_config(None, [f"data.root={root}", f"experiment={exp}", *BASE, *extra])


@pytest.fixture
def run_a(workdir):
    root = make_competition(workdir / "comp", {"a": 12, "b": 8, "c": 6}, size=24, n_test=9)
    cfg = cfg_of(root, "a")
    folds_stage.run(cfg)
    train_stage.run(cfg)
    rebalance_stage.run(cfg)
    return cfg


def test_identity_policy_equals_plain_inference(run_a):
    cfg = cfg_of(run_a.data.root, "a", "infer.views=[orig]", "infer.scales=[1.0]", "infer.heads=[joint]")
    infer_stage.run(cfg)
    test = np.load(cfg.run_dir.dir / "infer/joint/test.npz")
    folds = pd.read_csv(cfg.folds_csv)
    for k in (0, 1):
        stage2 = np.load(cfg.run_dir.fold(k).dir / "oof.npz")
        rows = folds["fold"].values == k
        assert np.allclose(stage4_probs(cfg.run_dir, "joint", "oof")[rows], softmax(stage2["logits"]), atol=1e-5)
    # the test images through each fold's model with the validation transform, averaged over folds
    paths = sorted(str(p) for p in (cfg.data_path("test")).iterdir())
    expected = 0
    for k in (0, 1):
        model = models.load_trained(cfg.model, cfg.run_dir.fold(k).dir / "model.safetensors", 3)
        s = json.loads((cfg.run_dir.fold(k).dir / "summary.json").read_text())
        norm = models.Normalize(s["mean"], s["std"])
        ds = ImageDataset(open_store(pixels(cfg), paths), None, valid_transform(pixels(cfg)))
        with torch.no_grad():
            dtype = amp_dtype(cfg.train.amp, torch.device("cpu"))   # the evaluation precision: bf16 backbone where native
            logits = torch.cat([models.logits(model, norm(x), dtype) for x, _ in make_loader(ds, batch_size=4)]).numpy()
        expected = expected + softmax(logits) / 2
    assert test["ids"].tolist() == [os.path.basename(p)[:-4] for p in paths]
    assert np.allclose(stage4_probs(cfg.run_dir, "joint"), expected, atol=1e-5)


def test_hflip_of_flip_invariant_model_equals_plain():
    torch.manual_seed(0)
    net = models.create_model(load_config(None, ["model.arch=test_resnet"]).model, 4).eval()

    def invariant(x):  # a flip-invariant model: average of the net on the image and its mirror
        with torch.no_grad():
            return (net(x) + net(x.flip(3))) / 2

    x = torch.rand(3, 3, 36, 36)
    plain = policy_logits(invariant, x, ["orig"], 32)
    both = policy_logits(invariant, x, ["orig", "hflip"], 32)
    assert torch.allclose(both[0], both[1], atol=1e-5)
    assert np.allclose(merge(np.stack([b.numpy() for b in both]), "mean_prob"), softmax(plain[0].numpy()), atol=1e-6)


def test_multiscale_views_have_configured_sizes():
    seen = []
    fake = lambda c: (seen.append(tuple(c.shape[2:])), torch.zeros(len(c), 2))[1]  # noqa: E731
    for scale, expect in ((1.0, 32), (1.15, 37), (1.3, 42)):
        load, crop = sizes(32, 0.875, scale)
        assert crop == expect and load == round(expect / 0.875)
        seen.clear()
        policy_logits(fake, torch.zeros(2, 3, load, load), ["orig", "hflip", "rot90", "five_crop"], crop)
        assert seen == [(crop, crop)] * 8


def test_ensemble_of_one_equals_member_and_writes_matching_submission(run_a):
    cfg = run_a
    infer_stage.run(cfg)
    result = ens_stage.run(cfg)
    member = {"probs": stage4_probs(cfg.run_dir, result["members"][0].split(":")[1])}
    for method in ("mean", "weighted", "geo_mean"):
        assert np.allclose(combine([member["probs"]], method, np.ones(1)), member["probs"], atol=1e-6)
    sub = pd.read_csv(result["submission"], dtype=str)
    sample = pd.read_csv(cfg.data_path("sample_submission.csv"), dtype=str)
    assert list(sub.columns) == list(sample.columns)
    assert sub["image_id"].tolist() == sample["image_id"].tolist()
    classes = ["a", "b", "c"]
    assert sub["label"].tolist() == [classes[i] for i in member["probs"].argmax(1)]
    # probability submissions: one column per class, in the sample's column order
    pd.DataFrame({"image_id": sample["image_id"], "c": 0.0, "a": 0.0, "b": 0.0}).to_csv(
        cfg.data_path("sample_submission.csv"), index=False)
    proba = load_config(None, [f"data.root={cfg.data.root}", "experiment=a", *BASE, "ensemble.submission=proba"])
    ens_stage.run(proba)
    sub = pd.read_csv("submissions/a.csv")
    assert list(sub.columns) == ["image_id", "c", "a", "b"]
    assert np.allclose(sub[["a", "b", "c"]].values, member["probs"], atol=1e-6)


def test_malformed_sample_submission_is_a_clear_error(run_a):
    cfg = run_a
    infer_stage.run(cfg)
    path = cfg.data_path("sample_submission.csv")
    good = pd.read_csv(path, dtype=str)
    good.rename(columns={"label": "target"}).to_csv(path, index=False)
    with pytest.raises(PipelineError, match=r"expected columns \[image_id, label\].*found \['image_id', 'target'\]"):
        ens_stage.run(cfg)
    good.iloc[::-1].to_csv(path, index=False)
    with pytest.raises(PipelineError, match=r"runs/a/infer/summary.json is stale.*changed: test_ids"):
        ens_stage.run(cfg)                                                # stage 4 predicted other ids
    cfg.session.allow_stale = True  # what --allow-stale sets for the command
    with pytest.raises(PipelineError, match=r"test ids of .*sample_submission.csv differ"):
        ens_stage.run(cfg)
    cfg.session.allow_stale = False
    good.assign(extra=1).to_csv(path, index=False)
    with pytest.raises(PipelineError, match="expected columns"):
        ens_stage.run(cfg)
    assert not os.path.exists("submissions/a.csv")                       # nothing written


def test_weights_fit_on_oof_are_nonnegative_and_sum_to_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    good = np.eye(4)[y] * 0.7 + 0.3 / 4
    noisy = softmax(rng.normal(size=(400, 4)) * 2)
    meh = 0.5 * good + 0.5 * noisy
    for objective in ("log_loss", "metric"):
        w = fit_weights([noisy, good, meh], y, objective, "accuracy")
        assert np.all(w >= 0) and np.isclose(w.sum(), 1.0)
    w = fit_weights([noisy, good, meh], y, "log_loss", "accuracy")
    assert w.argmax() == 1


def test_ensemble_refuses_incompatible_members(run_a, workdir):
    cfg = run_a
    infer_stage.run(cfg)
    shutil.copytree(cfg.run_dir.dir, workdir / "runs" / "b")
    two = load_config(None, [f"data.root={cfg.data.root}", "experiment=a", *BASE, "ensemble.members=[a, b]"])
    ens_stage.run(two)                                                   # compatible: fine
    s = json.loads((workdir / "runs/b/infer/summary.json").read_text())
    for key, value, match in (("classes", ["x", "y", "z"], "different label encodings"),
                              ("folds_file", "0" * 64, "different folds files")):
        bad = dict(s, **{key: value})
        (workdir / "runs/b/infer/summary.json").write_text(json.dumps(bad))
        with pytest.raises(PipelineError, match=match):
            ens_stage.run(two)
    (workdir / "runs/b/infer/summary.json").write_text(json.dumps(s))
    t = dict(np.load(workdir / f"runs/b/infer/{s['primary']}/test.npz"))
    t["ids"] = t["ids"][::-1]
    np.savez(workdir / f"runs/b/infer/{s['primary']}/test.npz", **t)
    with pytest.raises(PipelineError, match="different test image ids"):
        ens_stage.run(two)


def test_infer_without_training_data_like_a_kaggle_kernel(run_a, workdir):
    cfg = run_a
    shutil.rmtree(cfg.data_path("train"))
    os.remove(cfg.folds_csv)
    kernel = cfg_of(cfg.data.root, "a", "infer.oof=off", "infer.heads=[joint]")
    summary = infer_stage.run(kernel)
    assert (cfg.run_dir.dir / "infer/joint/test.npz").exists() and summary["cv"] == []
    with pytest.raises(PipelineError, match="infer.oof=on needs"):
        infer_stage.run(cfg_of(cfg.data.root, "a", "infer.oof=on"))


def test_infer_before_train_is_refused(workdir):
    root = make_competition(workdir / "comp", {"a": 6, "b": 6})
    with pytest.raises(PipelineError, match="has not been trained"):
        infer_stage.run(cfg_of(root, "never"))


@pytest.mark.slow
def test_run_sh_all_on_debug_config(tmp_path):
    for name in ("run.sh", "pyproject.toml", "requirements-lock.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    env = dict(os.environ, PIPELINE_NO_VENV="1", PYTHON=sys.executable, PYTHONPATH=str(REPO))
    r = subprocess.run(["./run.sh", "all", "--config", "configs/debug.yaml"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sub = pd.read_csv(tmp_path / "submissions/debug.csv")
    sample = pd.read_csv(tmp_path / "data/demo/sample_submission.csv")
    assert sub["image_id"].tolist() == sample["image_id"].tolist()
    assert "private leaderboard" in r.stderr and "CV joint" in r.stderr
    for stage in ("folds", "train", "rebalance", "infer", "ensemble"):
        assert f"({stage}) of 'debug' finished" in r.stderr


def test_hill_climb_starts_from_the_best_single_never_gets_worse_and_reuses_candidates():
    from pipeline.stages.ensemble import hill_climb, multiset_weights

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    truth = np.eye(3)[y]
    good = 0.6 * truth + 0.4 * softmax(rng.normal(size=(300, 3)))
    other = 0.5 * truth + 0.5 * softmax(rng.normal(size=(300, 3)))
    noise = softmax(rng.normal(size=(300, 3)) * 3)
    probs = [noise, other, good]
    loss = lambda yy, p: -float(np.mean(np.log(np.clip(p[np.arange(len(yy)), yy], 1e-15, 1))))  # noqa: E731
    chosen = hill_climb(probs, y, loss, 50)
    assert chosen[0] == 2  # the best single candidate
    w = multiset_weights(chosen, 3)
    assert np.isclose(w.sum(), 1) and w[2] > w[1] and w[0] == 0  # with replacement: the best one counts most
    assert loss(y, combine(probs, "weighted", w)) < loss(y, good)  # strictly better than its start here
    # it never accepts a step that makes the fit rows worse: with one candidate it stays at the start
    assert hill_climb([noise], y, loss, 50) == [0]


def test_hill_climb_ensemble_is_scored_on_folds_it_was_not_fit_on(run_a):
    from pipeline.stages.ensemble import candidates, hill_climb, multiset_weights, objective

    cfg = cfg_of(run_a.data.root, "a", "infer.heads=[crt,tau]", "infer.views=[orig,hflip]")
    infer_stage.run(cfg)
    climb = cfg_of(run_a.data.root, "a", "infer.heads=[crt,tau]", "infer.views=[orig,hflip]",
                   "ensemble.method=hill_climb", "ensemble.name=climb")
    result = ens_stage.run(climb)
    rec = result["hill_climb"]
    # every head stage 4 predicted, with its policy and without TTA
    assert sorted(rec["candidates"]) == sorted(["a:crt", "a:crt:plain", "a:tau", "a:tau:plain", "a:joint",
                                                "a:joint:plain"])
    assert set(result["members"]) <= set(rec["candidates"]) and np.isclose(sum(result["weights"].values()), 1)
    pool = candidates(climb.ensemble.members, climb.experiment)
    probs = [c["oof_probs"] for c in pool]
    y, fold = pool[0]["oof"]["y"], pool[0]["oof"]["fold"]
    for k, picked in enumerate(rec["per_fold_chosen"]):
        # fold k's multiset is climbed on the other folds only: changing fold k's predictions cannot move it
        scrambled = [p.copy() for p in probs]
        for p in scrambled:
            p[fold == k] = np.roll(p[fold == k], 1, axis=1)
        again = hill_climb([p[fold != k] for p in scrambled], y[fold != k], objective(climb.ensemble.weight_metric, climb.eval.scorer), 100)
        assert [pool[i]["candidate"] for i in again] == picked
    assert rec["fit_loss_end"] <= rec["fit_loss_start"]
    table = {r["member"]: r for r in result["table"]}
    assert np.isclose(rec["cv_gain_over_mean"], table["ensemble (hill_climb)"]["cv_mean"] - rec["mean_cv"])
    w = multiset_weights([rec["candidates"].index(n) for n in rec["chosen"]], len(pool))
    keep = [i for i in range(len(pool)) if w[i] > 0]
    test = combine([pool[i]["test_probs"] for i in keep], "weighted", w[keep])
    sub = pd.read_csv(result["submission"], dtype=str)
    assert sub["label"].tolist() == [["a", "b", "c"][i] for i in test.argmax(1)]


def test_stage4_reader_gives_one_view_the_policy_and_the_plain_probabilities(tmp_path):
    """core/predict/stored: what stage 5, the leaderboard, teachers and sweeps read of a stage-4 file: one view's
    logits, the no-TTA probabilities, the policy merged (fold k's OOF rows over fold k's own searched policy)."""
    from pipeline.core.files.artifacts import write_npz
    from pipeline.core.files.layout import RunDir
    from pipeline.core.predict.metrics import softmax
    from pipeline.core.predict.stored import Stage4
    from pipeline.core.predict.tta import BASELINE

    run = RunDir(tmp_path / "runs" / "x")
    rng = np.random.default_rng(0)
    vl = rng.normal(size=(3, 7, 4)).astype(np.float32)
    views = ["hflip@1", BASELINE, "vflip@1"]
    fold = np.array([0, 1, 0, 1, 1, 0, 0])
    run.infer_oof("joint").parent.mkdir(parents=True)
    write_npz(run.infer_oof("joint"), ids=np.arange(7), y=rng.integers(0, 4, 7), fold=fold,
              classes=np.array(list("abcd")), view_logits=vl, views=np.array(views))
    summary = {"policy": ["hflip@1", BASELINE], "fold_policies": None, "merge": "mean_prob"}
    s = Stage4.of(run, "joint", "oof", summary)
    assert s.exists() and not Stage4.of(run, "best", "oof", summary).exists()
    assert np.array_equal(s.view_logits("vflip@1"), vl[2]) and np.array_equal(s.view_logits(), vl[1])
    p = [softmax(v) for v in vl.astype(np.float64)]
    assert np.allclose(s.probs(plain=True), p[1]) and np.allclose(s.probs(), (p[0] + p[1]) / 2, atol=1e-6)
    assert set(s.rows()) == {"ids", "y", "fold", "classes", "views"}
    nested = Stage4.of(run, "joint", "oof", {**summary, "fold_policies": [["vflip@1"], [BASELINE, "vflip@1"]]})
    got = nested.probs()
    assert np.allclose(got[fold == 0], p[2][fold == 0], atol=1e-6)
    assert np.allclose(got[fold == 1], ((p[1] + p[2]) / 2)[fold == 1], atol=1e-6)
    test = Stage4.of(run, "joint", "test", {**summary, "fold_policies": [["vflip@1"], ["vflip@1"]]})
    assert test.fold_policies is None  # the test images: the policy chosen on every OOF row
    with pytest.raises(PipelineError, match="no view 'rot90@1'"):
        s.view_logits("rot90@1")
    with pytest.raises(PipelineError, match="stage 4 of 'x' has not finished"):
        Stage4.of(run, "joint", "oof")
