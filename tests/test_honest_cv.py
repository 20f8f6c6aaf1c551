"""Honest CV: a CV number is computed only on rows that took no part in any choice behind it. Stage 4 scores
a fold's held-out rows with the stage-3 head chosen without them (per inner split) and with the TTA views
chosen on the other folds; stage 5's pooled columns come from per-fold weights. On labels that carry no
signal every number the leaderboard ranks stays at chance."""
import numpy as np
import pandas as pd
import pytest
import timm
import torch

from conftest import make_competition, stage4_npz, stage4_probs
from pipeline.core.predict.inference import policy_probs
from pipeline.core.predict.metrics import score
from pipeline.core.files.artifacts import read_json
from pipeline.core.config import load_config
from pipeline.core.nets.models import write_state_dict
from pipeline.stages import ensemble as ens_stage
from pipeline.stages import folds as folds_stage
from pipeline.stages import infer as infer_stage
from pipeline.stages import rebalance as rebalance_stage
from pipeline.stages import train as train_stage
from pipeline.tools.reports import leaderboard

HEADS = ["joint", "crt", "tau", "lws", "ncm", "logit_adjust"]
BASE = ["data.image_ext=.png", "model.arch=test_resnet", "aug.img_size=16", "aug.cache=off", "train.batch_size=16",
        "train.workers=0", "train.warmup_epochs=0", "folds.n_splits=3", "rebalance.crt_epochs=4",
        "rebalance.lws_epochs=4", f"rebalance.variants=[{','.join(HEADS)}]", "infer.heads=[best]",
        "infer.views=[orig,hflip,vflip,rot90]", "infer.scales=[1.0,1.25]", "infer.search=true",
        "infer.batch_size=64", "eval.metric=balanced_accuracy"]


def run_experiment(root, exp, *extra):
    cfg = load_config(None, [f"data.root={root}", f"experiment={exp}", *BASE, *extra])
    for stage in (folds_stage, train_stage, rebalance_stage, infer_stage):
        stage.run(cfg)
    return cfg


def stage3_cv(cfg) -> dict:
    t = read_json(cfg.run_dir.rebalance_summary)["table"]
    return {r["variant"]: r[f"{cfg.eval.metric}_mean"] for r in t}


def stage4_cv(cfg, views: str) -> dict:
    rows = read_json(cfg.run_dir.infer_summary)["cv"]
    return {r["head"]: r["cv_mean"] for r in rows if r["views"] == views}


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    home = tmp_path_factory.mktemp("honest")
    import os

    old = os.getcwd()
    os.chdir(home)
    try:
        root = make_competition(home / "comp", {"a": 14, "b": 12, "c": 10, "d": 8}, size=20, n_test=8)
        cfg = run_experiment(root, "h", "train.epochs=2")
    finally:
        os.chdir(old)
    return home, cfg


def test_stage4_without_tta_scores_every_head_as_stage3_cross_fitted_it(learnable, monkeypatch):
    """Stage 4's "no TTA" CV of each head equals stage 3's cross-fitted CV of that head: the tuned value (tau,
    scale, cRT/LWS epoch) applied to a held-out row was chosen on the other inner split."""
    home, cfg = learnable
    monkeypatch.chdir(home)
    s3, s4 = stage3_cv(cfg), stage4_cv(cfg, "no TTA")
    assert set(s4) == set(HEADS) | {"best"}     # [best]: every variant is predicted, and best is one more head
    for h in HEADS:
        assert s4[h] == pytest.approx(s3[h], abs=1e-9), (h, s3, s4)
    fd = cfg.run_dir.fold(0)
    tuned = read_json(fd.rebalance_summary)["variants"]["tau"]
    assert len(fd.inner_heads("tau")) == len(tuned["chosen_per_inner_fold"]) == cfg.rebalance.inner_folds


def test_the_best_head_of_fold_k_is_chosen_on_the_other_folds(learnable, monkeypatch):
    home, cfg = learnable
    monkeypatch.chdir(home)
    s = read_json(cfg.run_dir.infer_summary)
    assert s["primary"] == "best" and s["best"]["all"] == read_json(cfg.run_dir.rebalance_summary)["best"]
    folds = [read_json(cfg.run_dir.fold(k).rebalance_summary)["variants"] for k in range(cfg.folds.n_splits)]
    best = stage4_npz(cfg.run_dir, "best", "oof")
    for k, v in enumerate(s["best"]["per_fold"]):
        others = {h: np.mean([folds[j][h]["metrics"]["score"] for j in range(len(folds)) if j != k]) for h in HEADS}
        assert others[v] == max(others.values())                       # the winner without fold k
        chosen = stage4_npz(cfg.run_dir, v, "oof")
        rows = best["fold"] == k
        assert np.array_equal(best["view_logits"][:, rows], chosen["view_logits"][:, rows])
    test = stage4_npz(cfg.run_dir, "best", "test")
    assert np.array_equal(test["view_logits"], stage4_npz(cfg.run_dir, s["best"]["all"], "test")["view_logits"])


def test_ensemble_oof_rows_of_fold_k_use_the_weights_fit_without_fold_k():
    rng = np.random.default_rng(0)
    p = [rng.dirichlet(np.ones(3), 12) for _ in range(2)]
    fold = np.repeat([0, 1, 2], 4)
    w = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.5, 0.5])]
    got = np.asarray(ens_stage.nested_combine(p, fold, w))  # computed a block of rows at a time
    assert np.allclose(got[fold == 0], p[0][fold == 0] / p[0][fold == 0].sum(1, keepdims=True))
    assert np.allclose(got[fold == 1], p[1][fold == 1] / p[1][fold == 1].sum(1, keepdims=True))
    assert np.allclose(got[fold == 2], ens_stage.combine([x[fold == 2] for x in p], "weighted", w[2]))


def test_a_searched_tta_policy_is_chosen_per_fold_without_its_rows(learnable, monkeypatch):
    home, cfg = learnable
    monkeypatch.chdir(home)
    s = read_json(cfg.run_dir.infer_summary)
    assert s["searched"] and len(s["fold_policies"]) == cfg.folds.n_splits
    rows = pd.DataFrame(s["cv"])
    assert (rows["views"] == infer_stage.SELECTED_ON_ALL).sum() == len(HEADS) + 1  # shown, labelled, not ranked
    oof = stage4_npz(cfg.run_dir, s["primary"], "oof")
    fold = oof["fold"]
    names = list(oof["views"])
    for k, pol in enumerate(s["fold_policies"]):  # fold k's stored probabilities merge fold k's own policy
        want = policy_probs(oof["view_logits"][:, fold == k].astype(np.float64), names, pol,
                                        cfg.infer.merge)
        assert np.allclose(stage4_probs(cfg.run_dir, s["primary"], "oof")[fold == k], want, atol=1e-6)
    # the report: "policy" is the nested policy's CV, the optimistic row the policy chosen on every row
    mine = rows[rows["head"] == s["primary"]].set_index("views")
    on_all = policy_probs(oof["view_logits"].astype(np.float64), names, s["policy"], cfg.infer.merge)
    assert mine.loc[infer_stage.SELECTED_ON_ALL, "cv_pooled"] == pytest.approx(score(cfg.eval.scorer, oof["y"], on_all))
    assert mine.loc["policy", "cv_pooled"] == pytest.approx(
        score(cfg.eval.scorer, oof["y"], stage4_probs(cfg.run_dir, s["primary"], "oof")))


@pytest.mark.slow
def test_on_permuted_labels_every_ranked_cv_stays_at_chance(tmp_path, monkeypatch):
    """Train labels that are a random permutation carry no signal: every CV the leaderboard ranks (each head
    with and without TTA, scales and a searched policy, a 2-member hill-climbing ensemble) must stay at chance,
    0.25 balanced accuracy for 4 classes. Noise: each class has 30 rows, so one class's recall has a standard
    deviation of about sqrt(0.25 * 0.75 / 30) = 0.079 and the mean over 4 classes 0.040; the bound is chance
    + 3.5 standard deviations (0.39), which a selection on the scored rows among ~30 choices would exceed."""
    monkeypatch.chdir(tmp_path)
    root = make_competition(tmp_path / "comp", {"a": 30, "b": 30, "c": 30, "d": 30}, size=16, n_test=8, seed=1)
    t = pd.read_csv(root / "train.csv")
    t["label"] = np.random.default_rng(0).permutation(t["label"].values)
    t.to_csv(root / "train.csv", index=False)
    (root / "tax.csv").write_text("class,genus\na,g1\nb,g1\nc,g2\nd,g2\n")
    a = run_experiment(root, "p1", "train.epochs=2")
    run_experiment(root, "p2", "train.epochs=2", "model.pool=gem", "seed=7", "data.taxonomy=tax.csv",
                   "train.taxonomy=[genus]",  # taxonomy levels in the loss (#48)
                   "model.head=arcface", "model.arcface_subcenters=2", "train.arcface_margin_min=0.1")  # ArcFace (#48)
    torch.manual_seed(5)  # "pretrained" weights in a local file: probe heads (rebalance.probe) and LP-FT's head init
    write_state_dict(tmp_path / "pre.safetensors", timm.create_model("test_resnet", num_classes=1000).state_dict())
    p3 = run_experiment(root, "p3", "train.epochs=1", f"model.pretrained_path={tmp_path / 'pre.safetensors'}",
                        "train.head_init=probe", "rebalance.probe=[joint,ncm,knn,tau]", "rebalance.wise_alpha=[0.5]",
                        "train.clean_labels=relabel", "train.clean_max_share=0.3")  # label cleaning (#48)
    assert {"probe_joint", "probe_ncm", "probe_knn", "probe_tau", "wise0.5"} <= set(stage3_cv(p3))
    ens = load_config(None, [f"data.root={root}", "experiment=p1", *BASE, "ensemble.members=[p1,p2]",
                             "ensemble.method=hill_climb", "ensemble.name=pp", "ensemble.prior=em"])
    rec = ens_stage.run(ens)
    assert rec["prior"]["shifts"]  # the test prior's shift report ran (it adjusts test rows only, never a CV)
    table = leaderboard.build(a.run_dir.dir.parent, tmp_path / "submissions")
    ranked = table[table["cv_mean"].notna()]
    assert len(ranked) >= 2 * len(HEADS) and ranked["head"].str.startswith("probe_").sum() >= 4
    assert (ranked["head"] == "wise0.5").any() and (ranked["head"] == "mix").any()   # the mix head (#47)
    from pipeline.core.nets.models import read_state_dict
    w = read_state_dict(tmp_path / "runs/p2/fold0/model.safetensors")["fc.weight"]   # p2 is an ArcFace model
    assert torch.allclose(w.norm(dim=1), torch.full((4,), 30.0), atol=1e-3)
    bound = 0.25 + 3.5 * 0.040
    assert (ranked["cv_mean"] < bound).all(), ranked[["experiment", "head", "tta", "cv_mean"]].to_string()
    ens_row = next(r for r in rec["table"] if str(r["member"]).startswith("ensemble"))
    assert ens_row["cv_mean"] < bound and ens_row["cv_pooled"] < bound
    for cfg in (a,):
        s3, s4 = stage3_cv(cfg), stage4_cv(cfg, "no TTA")
        assert all(s4[h] == pytest.approx(s3[h], abs=1e-9) for h in HEADS)
