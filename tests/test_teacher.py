"""train.pseudo and train.distill: a student's fold-k targets come from its teacher's fold-k models only."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import make_competition, stage4_npz
from pipeline.core.files.artifacts import read_json, recorded, sha256_file, write_json
from pipeline.core.files.featurefile import write_features
from pipeline.core.config import load_config
from pipeline.core.inputs.data import read_folds, read_test_table
from pipeline.core.errors import PipelineError
from pipeline.core.engine import teacher as teacher_mod
from pipeline.core.nets.losses import SoftTargetLoss
from pipeline.core.predict.submission import Member
from pipeline.core.files.units import experiment_units
from pipeline.stages import ensemble as ens_stage
from pipeline.stages import folds as folds_stage
from pipeline.stages import infer as infer_stage
from pipeline.stages import rebalance as rebalance_stage
from pipeline.stages import train as train_stage
from pipeline.core.engine.distributed import Dist
from pipeline.tools.reports import leaderboard

BASE = ["data.image_ext=.png", "model.arch=test_resnet", "aug.img_size=32", "aug.cache=off", "train.batch_size=8",
        "train.epochs=2", "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0", "train.lr=0.01",
        "rebalance.variants=[joint,tau]", "infer.views=[orig,hflip]", "infer.batch_size=8"]


TEACHER = ["infer.heads=[tau]", "infer.search=true", "train.select=last", "train.ema=false"]


def cfg_of(root, exp, *extra):
    return load_config(None, [f"data.root={root}", f"experiment={exp}", *BASE, *extra])


def stages_1_to_4(cfg):
    for stage in (folds_stage, train_stage, rebalance_stage, infer_stage):
        stage.run(cfg)
    return cfg


@pytest.fixture
def teacher(workdir):
    """A finished teacher experiment with a tuned head (tau) and a searched TTA policy."""
    root = make_competition(workdir / "comp", {"a": 12, "b": 10, "c": 8}, size=24, n_test=8)
    return stages_1_to_4(cfg_of(root, "t", *TEACHER))


def student(teacher, *extra):
    return cfg_of(teacher.data.root, "s", "train.pseudo.teacher=t", "train.pseudo.threshold=0", "train.distill.teacher=t",
                  *extra)


def build_targets(cfg, y_tr, n_classes, probs):
    t = cfg.train
    return teacher_mod.build_targets(y_tr, n_classes, probs, t.pseudo, t.distill, t.label_smoothing, "cpu")


def fold_targets(cfg, k):
    df, _ = read_folds(cfg.folds_name)
    return dict(teacher_mod.fold_targets(cfg.train, cfg.run_dir.unit(k), sha256_file(cfg.folds_csv), df, k,
                                         read_test_table(cfg.data), Dist(), None,
                                         experiment_units(cfg).record(f"teacher_{cfg.run_dir.unit(k).name}")))


@pytest.mark.slow
def test_fold_k_targets_never_move_when_a_held_out_image_of_fold_k_changes(teacher):
    s = student(teacher)
    before = {k: fold_targets(s, k) for k in (0, 1)}
    assert before[0]["distill_train"].shape[0] == (read_folds(s.folds_name)[0]["fold"] != 0).sum()
    assert not np.allclose(before[0]["pseudo_test"], before[1]["pseudo_test"])  # each fold its own teacher model
    # replace one of fold 0's held-out images and re-run the teacher's stages 2-4 on it: every fold retrains,
    # fold 1 with the new image among its training rows; fold 0's tau choice, the TTA search and the OOF
    # predictions see it too. (The teacher keeps the last epoch's raw weights: `select: best` and the EMA
    # choice are made on the held-out fold, see README.)
    df, _ = read_folds(s.folds_name)
    path = df["path"][df["fold"] == 0].iloc[0]
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
    folds_stage.run(teacher)
    train_stage.run(teacher)
    rebalance_stage.run(teacher)
    infer_stage.run(teacher)
    after = {k: fold_targets(s, k) for k in (0, 1)}
    for name in ("distill_train", "pseudo_test", "distill_test"):
        assert np.array_equal(after[0][name], before[0][name]), name  # fold 0's targets: untouched
    # fold 1 trains on that image: its teacher target for it moves (the check above can fail)
    assert not np.array_equal(after[1]["distill_train"], before[1]["distill_train"])


@pytest.mark.slow
def test_student_trains_on_pseudo_labelled_test_images_only_and_records_its_teacher(teacher):
    s = student(teacher, "train.pseudo.soft=false", "train.mixup_alpha=0.4")
    summaries = train_stage.run(s)
    test = read_test_table(s.data)
    for k, summ in enumerate(summaries):
        assert summ["teacher"] == {"pseudo_images": len(test), "pseudo_from": "t", "distill_from": "t", "leaky": False}
    # a pseudo-labelled row is a test image, never a train row: the extra rows of the dataset are test files
    df, classes = read_folds(s.folds_name)
    targets = build_targets(s, df["y"].values[df["fold"] != 0], len(classes), fold_targets(s, 0))
    assert targets.n_pseudo == len(test) and set(targets.pseudo_rows) <= set(range(len(test)))
    assert len(targets.hard) == (df["fold"] != 0).sum() + len(test)
    hard = targets.t0[-len(test):].numpy()
    assert set(np.unique(hard)) <= {0.0, 1.0}  # hard pseudo-labels: one-hot of the teacher's top class
    # a higher threshold keeps fewer images
    strict = student(teacher, "train.pseudo.threshold=0.99")
    assert build_targets(strict, df["y"].values[df["fold"] != 0], len(classes), fold_targets(s, 0)).n_pseudo < len(test)
    # the teacher is part of the student's record: a changed teacher makes the student stale
    assert train_stage.status(s) == []
    units = experiment_units(s)  # each fold's targets are a unit of their own (#46), current with their record
    for k in range(len(summaries)):
        key, fd = f"teacher_fold{k}", s.run_dir.fold(k)
        assert units[key].cache and units.current(key) and recorded(fd.teacher_meta) == units.record(key)
        assert units.owner(fd.teacher_targets) == key and units.owner(fd.weights) == f"weights{k}"
    infer_stage.run(cfg_of(teacher.data.root, "t", *TEACHER, "infer.search=false"))
    assert any("teacher" in r for r in train_stage.status(s))
    assert experiment_units(s).own_reasons("teacher_fold0") == [
        "fold0: changed teacher.distill.record.members.t, teacher.pseudo.record.members.t"]  # the teacher's stage 4
    rows = leaderboard.experiment_rows(s.run_dir)
    assert all("pseudo-labels from t" in r["recipe"] and "distilled from t" in r["recipe"] for r in rows)


@pytest.mark.slow
def test_leaky_shortcut_is_marked_and_wrong_teachers_are_refused(teacher, workdir):
    leaky = student(teacher, "train.distill.leaky_oof=true", "train.pseudo.teacher=")
    train_stage.run(leaky)
    t = leaderboard.build(workdir / "runs")
    assert all(leaderboard.LEAKY in n for n in t[t["experiment"] == "s"]["note"])
    assert not any(leaderboard.LEAKY in n for n in t[t["experiment"] == "t"]["note"])
    with pytest.raises(PipelineError, match="teacher 'nobody'"):
        train_stage.run(student(teacher, "experiment=stage2", "train.distill.teacher=nobody"))
    with pytest.raises(PipelineError, match="train.distill.teacher"):
        cfg_of(teacher.data.root, "t", *TEACHER, "train.distill.teacher=t")
    other = student(teacher, "experiment=s3", "folds.seed=7")
    folds_stage.run(other)
    with pytest.raises(PipelineError, match="another folds file"):
        train_stage.run(other)


def test_distillation_loss_is_kl_at_temperature_and_pseudo_rows_are_weighted():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    idx = torch.arange(4)
    t0 = torch.eye(3)[torch.tensor([0, 1, 2, 0])]
    t1 = torch.softmax(torch.randn(4, 3), 1)
    r = type("R", (), {})()
    r.criterion = SoftTargetLoss()
    r.targets = teacher_mod.Targets(hard=np.zeros(4), t0=t0, t1=t1, w=torch.tensor([1.0, 1.0, 0.5, 0.5]), alpha=1.0,
                                    temperature=2.0, n_pseudo=2, pseudo_rows=np.arange(2))
    kl = (t1 * (t1.log() - torch.log_softmax(logits / 2, 1))).sum(1).mean() * 4
    assert torch.allclose(teacher_mod.distill_loss(r.targets, r.criterion, logits, idx, 1.0), kl)
    r.targets.alpha = 0.0
    ce = -(t0 * torch.log_softmax(logits, 1)).sum(1)
    w = torch.tensor([1.0, 1.0, 0.5, 0.5])
    assert torch.allclose(teacher_mod.distill_loss(r.targets, r.criterion, logits, idx, 1.0), (ce * w).sum() / w.sum())
    # mixing: targets and weights mixed with the images' partner (the reversed batch)
    lam = 0.3
    mixed = t0 * lam + t0.flip(0) * (1 - lam)
    wm = w * lam + w.flip(0) * (1 - lam)
    ce_m = -(mixed * torch.log_softmax(logits, 1)).sum(1)
    assert torch.allclose(teacher_mod.distill_loss(r.targets, r.criterion, logits, idx, lam), (ce_m * wm).sum() / wm.sum())


@pytest.mark.slow
def test_pseudo_labels_from_a_weighted_ensemble_use_the_weights_fit_without_that_fold(teacher):
    t2 = cfg_of(teacher.data.root, "t2", "infer.heads=[joint]", "train.epochs=1")
    train_stage.run(t2)
    infer_stage.run(t2)
    ens = cfg_of(teacher.data.root, "t", *TEACHER, "ensemble.members=[t,t2]", "ensemble.method=weighted", "ensemble.name=duo")
    rec = ens_stage.run(ens)
    assert len(rec["fold_weights"]) == 2
    from pipeline.core.engine import teacher as T

    tch = T.load_teacher("duo")
    assert tch.weights_for(0) == rec["fold_weights"][0] and tch.weights_for(1) == rec["fold_weights"][1]
    s = cfg_of(teacher.data.root, "s", "train.pseudo.teacher=duo", "train.pseudo.threshold=0")
    got = fold_targets(s, 0)["pseudo_test"]
    paths = {"test": list(read_test_table(s.data)["path"])}
    parts = [T.member_fold_probs(n, tch.stage4[n.split(":")[0]], 0, paths, torch.device("cpu"))["test"]
             for n in rec["fold_weights"][0]]
    w = np.array(list(rec["fold_weights"][0].values()))
    expected = sum(wi * p for wi, p in zip(w / w.sum(), parts))
    assert np.allclose(got, expected / expected.sum(1, keepdims=True), atol=1e-5)
    assert np.allclose(got.sum(1), 1, atol=1e-5) and isinstance(pd.DataFrame(got), pd.DataFrame)
    assert read_json(s.run_dir.fold(0).teacher_meta)["made_from"]["fold"] == 0


def test_a_teacher_is_read_as_its_stage_3_and_4_were_made_not_from_config_yaml(teacher):
    """config.yaml is stage 2's: after stages 3-4 re-run with other settings it is stale. The teacher's cRT
    refit uses the epochs stage 3 used (a chosen epoch past the old crt_epochs was a KeyError), its views those
    of stage 4, and fold k's views the searched policy chosen without fold k."""
    t2 = cfg_of(teacher.data.root, "t", *TEACHER, "rebalance.variants=[joint,crt]", "rebalance.crt_epochs=8",
                "infer.heads=[crt]", "infer.views=[orig,vflip]")
    rebalance_stage.run(t2)
    infer_stage.run(t2)
    assert "crt_epochs: 30" in t2.run_dir.config.read_text()   # stage 2's file still has the default
    s4 = read_json(t2.run_dir.infer_summary)
    got = teacher_mod.recorded_config(t2.run_dir, s4)
    assert got.rebalance.crt_epochs == 8 and got.rebalance.variants == ["joint", "crt"]
    assert got.infer.views == ["orig", "vflip"]
    assert teacher_mod.member_policy(got.infer, s4, False, 1) == s4["fold_policies"][1]
    probs = teacher_mod.fold_probs(teacher_mod.load_teacher("t"), 0, {"test": list(read_test_table(t2.data)["path"])})
    assert probs["test"].shape == (len(read_test_table(t2.data)), 3) and np.allclose(probs["test"].sum(1), 1)


# ----------------------------------------------------------------------------- every teacher kind, 3 folds
KINDS = {  # teacher name -> the ensemble config that makes it ("t" itself: the experiment, its primary head `best`)
    "e_tau": ["ensemble.members=[t:tau]", "ensemble.method=mean"],
    "e_crt": ["ensemble.members=[t:crt]", "ensemble.method=mean"],
    "e_weighted": ["ensemble.members=[t:crt,t:tau]", "ensemble.method=weighted"],
    "e_climb": ["ensemble.members=[t]", "ensemble.method=hill_climb"],
}


T3 = ["folds.n_splits=3", "rebalance.variants=[joint,tau,crt]", "rebalance.crt_epochs=3", "infer.heads=[best]",
      "infer.search=true", "ensemble.weight_metric=log_loss"]


@pytest.fixture
def teachers3(workdir):
    """A 3-fold teacher experiment (tuned tau and cRT heads, the nested `best` head, a searched TTA policy) and an
    ensemble teacher of each kind over it."""
    root = make_competition(workdir / "comp", {"a": 12, "b": 12, "c": 12}, size=24, n_test=6)
    cfg = stages_1_to_4(cfg_of(root, "t", *T3))
    for name, extra in KINDS.items():
        ens_stage.run(cfg_of(root, "t", *T3, f"ensemble.name={name}", *extra))
    return cfg


def scramble(path, rows, seed=0, keys=("logits", "view_logits", "probs")):
    """Replace the predictions of `rows` (a mask, or None: every row) in an npz with noise."""
    d = dict(np.load(path))
    rng = np.random.default_rng(seed)
    for key in keys:
        if key in d:
            a = d[key]
            sel = (slice(None),) * (a.ndim - 2) + (rows if rows is not None else slice(None),)
            a[sel] = rng.normal(0, 5, a[sel].shape).astype(a.dtype)
    np.savez(path, **d)


@pytest.mark.slow
def test_every_teacher_kind_keeps_fold_k_targets_and_choices_free_of_fold_k_held_out_rows(teachers3):
    """What stays byte-identical when fold 0's held-out rows change (docs/stages.md): fold 0's targets read no
    prediction or choice made on fold 0's held-out rows, for every teacher kind (tau, cRT, the nested best head with
    a searched policy, weighted ensemble, hill climbing), and each choice they use for fold 0 (the tuned value, the
    best head, the TTA policy, the ensemble weights) is a function of the other folds' rows only: changing fold
    0's rows leaves it as it was, changing the other folds' rows moves it."""
    cfg = teachers3
    run = cfg.run_dir
    df, classes = read_folds(cfg.folds_name)
    paths = {"train": list(df["path"][df["fold"] != 0]), "test": list(read_test_table(cfg.data)["path"])}
    names = ["t", *KINDS]
    before = {n: teacher_mod.fold_probs(teacher_mod.load_teacher(n), 0, paths) for n in names}
    assert teacher_mod.load_teacher("e_weighted").fold_weights and teacher_mod.load_teacher("e_climb").fold_weights
    assert read_json(run.infer_summary)["fold_policies"] is not None

    # 1. every file holding a prediction or choice made on fold 0's held-out rows, replaced by noise
    s3 = read_json(run.fold(0).rebalance_summary)
    for v, grid_value in (("tau", 0.0), ("crt", 1)):
        key = "tau" if v == "tau" else "epochs"
        assert key in s3["variants"][v], s3["variants"][v]
        s3["variants"][v][key] = grid_value
    for v in s3["variants"]:
        s3["variants"][v]["metrics"]["score"] = 1.0 if v == "joint" else 0.0
    run.fold(0).rebalance_summary.write_text(pd.Series(s3).to_json())
    scramble(run.fold(0).oof, None)
    for v in ("joint", "tau", "crt"):
        scramble(run.fold(0).head_oof(v), None)
    s4 = read_json(run.infer_summary)
    for held in run.infer_features_dir.glob("*/held0.npy"):  # stage 4's features of fold 0's held-out rows, written
        x = np.random.default_rng(0).normal(0, 5, np.load(held).shape).astype(np.float32)  # as stage 4 writes them
        s4["store"]["backbones"][held.parent.name]["files"]["0"] = write_features(
            held, s4["store"]["dtype"], len(x), x.shape[1], lambda sink, x=x: [sink(v, 0, x[v]) for v in range(len(x))],
            "test")
    write_json(run.infer_summary, s4)
    after = {n: teacher_mod.fold_probs(teacher_mod.load_teacher(n), 0, paths) for n in names}
    for n in names:
        for part in paths:
            assert np.array_equal(after[n][part], before[n][part]), (n, part)

    # 2. the choices behind fold 0: computed again from the OOF rows, fold 0's rows changed or the others'
    o = stage4_npz(run, "best", "oof")
    views = [str(v) for v in o["views"]]
    assert views == ["orig@1", "hflip@1"]
    inp = type("Inp", (), {"summaries": [None] * 3, "oof_df": pd.DataFrame({"y": o["y"], "fold": o["fold"]})})()
    y, fold = o["y"], o["fold"]
    C = len(classes)

    def hflip(good: bool, where: np.ndarray) -> np.ndarray:
        lg = o["view_logits"].copy()
        target = y if good else (y + 1) % C
        lg[1, where] = 10.0 * np.eye(C)[target[where]]
        return lg

    policy0 = infer_stage.search_policies(infer_stage.Job.of(cfg), inp, o["view_logits"], views)[1][0]
    for good in (True, False):
        assert infer_stage.search_policies(infer_stage.Job.of(cfg), inp, hflip(good, fold == 0), views)[1][0] == policy0
        assert infer_stage.search_policies(infer_stage.Job.of(cfg), inp, hflip(good, fold != 0), views)[1][0] == (
            ["orig@1", "hflip@1"] if good else ["orig@1"])

    # the best head: fold 0's choice reads the other folds' stage-3 scores (fold 0's are now rigged for joint)
    heads_inp = type("Inp", (), {"summaries": [None] * 3, "heads": ["joint", "tau", "crt"]})()
    best = infer_stage.best_choice(infer_stage.Job.of(cfg), heads_inp)
    assert best["per_fold"][0] == read_json(run.infer_summary)["best"]["per_fold"][0]
    assert best["per_fold"][1] == best["per_fold"][2] == "joint"  # fold 0's rigged scores reach the others
    # the tuned values: fold 0's teacher head takes the median of folds 1 and 2 (fold 0's rigged value is ignored)
    others = [read_json(run.fold(j).rebalance_summary) for j in (1, 2)]
    other_tau = 2.0 if min(sj["variants"]["tau"]["tau"] for sj in others) < 2.0 else 0.0
    for j, sj in zip((1, 2), others):
        sj["variants"]["tau"]["tau"] = other_tau
        run.fold(j).rebalance_summary.write_text(pd.Series(sj).to_json())
    moved = teacher_mod.fold_probs(teacher_mod.load_teacher("e_tau"), 0, paths)
    assert not np.array_equal(moved["test"], before["e_tau"]["test"])

    # ensemble weights (weighted, hill climbing) for fold 0: fit without fold 0's rows
    members = [np.asarray(ens_stage.load_member(Member("t", h))["oof"]["probs"]) for h in ("crt", "tau")]
    ycfg = cfg_of(cfg.data.root, "t", *T3)

    def perfect(i: int, where: np.ndarray) -> list[np.ndarray]:
        out = [p.copy() for p in members]
        out[i][where] = np.eye(C)[y[where]] * 0.98 + 0.02 / C
        return out

    w0 = ens_stage.honest_cv(members, y, fold, ycfg.ensemble.weight_metric, ycfg.eval.scorer)[1][0]
    c0 = ens_stage.honest_hill_climb(ycfg.ensemble, ycfg.eval.scorer, members, y, fold)[1][0]
    for i in (0, 1):
        assert np.array_equal(ens_stage.honest_cv(perfect(i, fold == 0), y, fold, ycfg.ensemble.weight_metric, ycfg.eval.scorer)[1][0], w0)
        assert ens_stage.honest_hill_climb(ycfg.ensemble, ycfg.eval.scorer, perfect(i, fold == 0), y, fold)[1][0] == c0
        assert ens_stage.honest_cv(perfect(i, fold != 0), y, fold, ycfg.ensemble.weight_metric, ycfg.eval.scorer)[1][0][i] > 0.9
        assert ens_stage.honest_hill_climb(ycfg.ensemble, ycfg.eval.scorer, perfect(i, fold != 0), y, fold)[1][0][0] == i
