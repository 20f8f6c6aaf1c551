"""Linear probes on pretrained features (#36): LP-FT's head init (train.head_init=probe) fit on the fold's training
rows only, train.epochs=0 (the probe baseline run through stages 1-5), probe heads and WiSE-FT heads beside the
fine-tuned ones."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from conftest import cli, config_from_items, make_competition, stage4_npz, stage4_probs
from pipeline.core.config import ConfigError, load_config
from pipeline.core.engine.distributed import Dist
from pipeline.core.files.artifacts import read_json, read_npz
from pipeline.core.inputs.data import read_folds
from pipeline.core.nets.heads import probe_head
from pipeline.core.nets.models import read_state_dict, write_state_dict
from pipeline.core.predict.stored import HeldOut
from pipeline.stages import folds as folds_stage
from pipeline.stages import train as train_stage

TINY = ["data.image_ext=.png", "model.arch=test_resnet", "aug.img_size=16", "aug.cache=off", "train.batch_size=8",
        "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0", "infer.views=[orig]", "train.ema=false",
        "rebalance.crt_epochs=2", "rebalance.lws_epochs=2"]


@pytest.fixture
def pretrained(workdir):
    """A 'pretrained' test_resnet: fixed weights in a local file (what `weights import` would give)."""
    torch.manual_seed(123)
    path = workdir / "pre.safetensors"
    write_state_dict(path, timm.create_model("test_resnet", num_classes=1000).state_dict())
    return path


def _comp(workdir):
    return make_competition(workdir / "comp", {"a": 10, "b": 8, "c": 6}, size=16, n_test=6)


def test_a_probe_needs_pretrained_weights():
    for extra in (["train.epochs=0"], ["train.head_init=probe"]):
        with pytest.raises(ConfigError, match="a linear probe .* needs pretrained weights"):
            load_config(None, extra)
    load_config(None, ["train.epochs=0", "model.pretrained_path=w.safetensors"])  # a file to check later


def test_the_mix_head_needs_probe_heads():
    with pytest.raises(ConfigError, match="infer.heads.*'mix' averages a fine-tuned head and a probe head"):
        load_config(None, ["infer.heads=[mix]"])   # from scratch: no probe heads
    with pytest.raises(ConfigError, match="'mix' averages"):
        load_config(None, ["infer.heads=[mix]", "model.pretrained_path=w.safetensors", "train.epochs=0"])
    cfg = load_config(None, ["infer.heads=[best,mix]", "model.pretrained_path=w.safetensors", "train.epochs=2"])
    assert cfg.rebalance.probe and cfg.infer.mix


def test_probe_heads_of_every_variant_are_the_pretrained_default_except_at_epochs_0():
    pre = "model.pretrained_path=w.safetensors"
    assert load_config(None, [pre]).rebalance.probe == load_config(None, []).rebalance.variants  # #47
    assert load_config(None, [pre, "rebalance.variants=[joint,ncm]"]).rebalance.probe == ["joint", "ncm"]
    assert load_config(None, [pre, "train.epochs=0"]).rebalance.probe == []       # the fold heads are the probes
    assert load_config(None, [pre, "rebalance.probe=[]"]).rebalance.probe == []   # set by the user: kept
    assert load_config(None, []).rebalance.probe == []                            # from scratch: none


def test_wise_ft_needs_pretrained_weights_and_a_fine_tune():
    with pytest.raises(ConfigError, match="WiSE-FT interpolates"):
        load_config(None, ["rebalance.wise_alpha=[0.5]"])
    with pytest.raises(ConfigError, match="nothing is fine-tuned"):
        load_config(None, ["rebalance.wise_alpha=[0.5]", "train.epochs=0", "model.pretrained_path=w.safetensors"])
    with pytest.raises(ConfigError, match="rebalance.wise_alpha"):
        load_config(None, ["rebalance.wise_alpha=[1.0]", "model.pretrained_path=w.safetensors"])  # alpha 1: joint
    with pytest.raises(ConfigError, match="infer.heads"):
        load_config(None, ["infer.heads=[wise]"])
    load_config(None, ["rebalance.wise_alpha=[0.3,0.7]", "infer.heads=[wise,joint]", "model.pretrained_path=w.pt"])


def test_wise_model_interpolates_every_tensor_between_pretrained_and_fine_tuned(workdir, pretrained):
    from pipeline.core.nets import models

    m = load_config(None, ["model.arch=test_resnet", f"model.pretrained_path={pretrained}"]).model
    pre = models.create_model(m, 3).state_dict()
    torch.manual_seed(9)
    tuned = {k: (v + torch.randn_like(v) if v.is_floating_point() else v + 3) for k, v in pre.items()}
    write_state_dict(workdir / "ft.safetensors", tuned)
    got = models.wise_model(m, workdir / "ft.safetensors", 3, 0.25).state_dict()
    for k, v in got.items():
        if v.is_floating_point() and not k.startswith("fc."):
            assert torch.allclose(v, 0.75 * pre[k] + 0.25 * tuned[k], atol=1e-6), k
        else:
            assert torch.equal(v, tuned[k]), k   # BN batch counts, the classifier: the fine-tuned model's
    body = [k for k in got if k.endswith("weight") and got[k].is_floating_point()]
    assert not torch.allclose(got[body[0]], tuned[body[0]])   # not simply the fine-tuned weights


def test_probe_head_fits_logistic_regression_and_keeps_unseen_classes_low():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(90, 6)), rng.integers(0, 3, 90)
    x[np.arange(90), y] += 3
    h = probe_head(x, y, 5)
    assert (h.logits(x).argmax(1) == y).mean() > 0.95
    assert h.weight.shape == (5, 6) and (h.weight[3:] == 0).all() and h.bias[3:].max() < h.bias[:3].min()
    two = probe_head(x, (y > 0).astype(int), 2)   # scikit-learn's binary form, mapped to two rows
    assert ((two.logits(x).argmax(1)) == (y > 0)).mean() > 0.9


def test_lp_ft_head_is_fit_on_the_fold_s_training_rows_only(workdir, pretrained):
    root = _comp(workdir)
    cfg = load_config(None, [f"data.root={root}", "experiment=lp", *TINY, f"model.pretrained_path={pretrained}",
                             "train.head_init=probe", "train.epochs=1"])
    folds_stage.run(cfg)
    df, classes = read_folds(cfg.folds_name)
    job = train_stage.Job.of(cfg)

    def head(frame):
        r = train_stage.set_up(job, frame, len(classes), 0, Dist())
        return r.nets.model.get_classifier().weight.detach().clone()

    w = head(df)
    held = df["fold"].values == 0
    shuffled = df.copy()
    shuffled.loc[held, "y"] = np.random.default_rng(1).permutation(df["y"].values[held])
    assert torch.equal(head(shuffled), w)                       # held-out labels take no part in the fit
    moved = df.copy()
    moved.loc[~held, "y"] = np.random.default_rng(1).permutation(df["y"].values[~held])
    assert not torch.equal(head(moved), w)                      # training labels do: the test can fail
    fresh = load_config(None, [f"data.root={root}", "experiment=lp", *TINY, f"model.pretrained_path={pretrained}",
                               "train.epochs=1", "train.head_init=random"])
    r = train_stage.set_up(train_stage.Job.of(fresh), df, len(classes), 0, Dist())
    assert not torch.equal(r.nets.model.get_classifier().weight, w)   # head_init=random: timm's init


@pytest.mark.slow
def test_epochs_0_is_the_linear_probe_baseline_through_every_stage(workdir, pretrained):
    root = _comp(workdir)
    cfg = config_from_items(workdir / "probe.yaml", [f"data.root={root}", "experiment=probe", *TINY,
                                                     f"model.pretrained_path={pretrained}", "train.epochs=0",
                                                     "rebalance.variants=[joint,ncm,crt]", "infer.heads=[best]"])
    r = cli(["all", "--config", str(cfg)], workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (workdir / "submissions/probe.csv").exists()
    s = read_json(workdir / "runs/probe/fold0/summary.json")
    assert s["epoch"] == 0 and s["epochs_trained"] == 0 and s["score"] > 0.5   # 3 colours: chance is 1/3
    pre, got = read_state_dict(pretrained), read_state_dict(workdir / "runs/probe/fold0/model.safetensors")
    body = [k for k in got if not k.startswith("fc.")]
    assert body and all(torch.equal(got[k], pre[k]) for k in body)   # the backbone took no gradient step
    feats = read_npz(workdir / "runs/probe/fold0/rebalance/features.npz")
    df, _ = read_folds(load_config(cfg).folds_name)
    tr = df["fold"].values != 0
    want = probe_head(feats["train"], df["y"].values[tr], 3)
    assert np.allclose(got["fc.weight"].numpy(), want.weight, atol=1e-4)   # the classifier is the probe fit
    # stage 4 runs the (one) pretrained backbone over the test images once, not once per fold (#47)
    run = load_config(cfg).run_dir
    assert sorted(p.parent.name for p in run.infer_features_dir.glob("*/test.npy")) == ["fold0"]
    s4 = read_json(run.infer_summary)
    assert {e["features"] for entries in s4["store"]["test"].values() for e in entries} == {"fold0"}
    assert {e["head"]["file"]["path"].split("/")[0] for e in s4["store"]["test"]["best"]} == {"fold0", "fold1"}
    from pipeline.core.predict.stored import Stage4
    from pipeline.core.nets.heads import Head

    def head(k: int) -> Head:
        if s4["best"]["all"] == "joint":
            sd = read_state_dict(run.fold(k).weights)
            return Head(sd["fc.weight"].numpy(), sd["fc.bias"].numpy())
        return Head.load(run.fold(k).head(s4["best"]["all"]))[0]
    x = np.load(run.infer_features("fold0", "test"))[0].astype(np.float32)   # every fold's head on those features
    mean = sum(head(k).logits(x).astype(np.float64) for k in (0, 1)) / 2
    assert np.allclose(Stage4.of(run, "best", "test").view_logits(), mean, atol=1e-5)


@pytest.mark.slow
def test_probe_heads_sit_beside_the_fine_tuned_ones_and_never_see_held_out_rows(workdir, pretrained):
    """rebalance.probe: heads on the pretrained backbone's features, fit on each fold's training rows, predicted by
    stage 4 from that backbone, and candidates of the nested best head; rebalance.wise_alpha: WiSE-FT heads, the
    probe and fine-tuned classifiers mixed on the interpolated backbone, the same held-out logits in stages 3 and 4."""
    root = _comp(workdir)
    cfg = config_from_items(workdir / "p.yaml", [f"data.root={root}", "experiment=p", *TINY, "train.epochs=1",
                                                 f"model.pretrained_path={pretrained}", "rebalance.variants=[joint]",
                                                 "rebalance.probe=[joint,ncm]", "rebalance.wise_alpha=[0.5]",
                                                 "infer.heads=[best]", "infer.features=float32"])
    r = cli(["all", "--config", str(cfg)], workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    run = load_config(cfg).run_dir
    df, _ = read_folds(load_config(cfg).folds_name)
    f = read_npz(run.probe_features)["feats"]
    assert f.shape[0] == len(df)
    for k in (0, 1):
        s3 = read_json(run.fold(k).rebalance_summary)
        assert {"joint", "probe_joint", "probe_ncm"} <= set(s3["variants"])
        tr = df["fold"].values != k
        from pipeline.core.nets.heads import Head

        got = Head.load(run.fold(k).head("probe_joint"))[0]
        want = probe_head(f[tr], df["y"].values[tr], 3)          # the fold's training rows only
        assert np.allclose(got.weight, want.weight) and np.allclose(got.bias, want.bias)
        oof = stage4_npz(run, "probe_joint", "oof")
        held = oof["fold"] == k
        rows = np.flatnonzero(df["fold"].values == k)
        assert np.allclose(oof["view_logits"][0][held], f[rows] @ got.weight.T + got.bias, atol=1e-3)
        wise = Head.load(run.fold(k).head("wise0.5"))[0]
        joint = read_state_dict(run.fold(k).weights)
        assert np.allclose(wise.weight, 0.5 * got.weight + 0.5 * joint["fc.weight"].numpy(), atol=1e-6)
        assert np.allclose(wise.bias, 0.5 * got.bias + 0.5 * joint["fc.bias"].numpy(), atol=1e-6)
        s3_oof, s4_oof = HeldOut.of(run, k, "wise0.5").read(), stage4_npz(run, "wise0.5", "oof")
        assert list(s4_oof["ids"][s4_oof["fold"] == k]) == list(s3_oof["ids"])
        assert np.allclose(s4_oof["view_logits"][0][s4_oof["fold"] == k], s3_oof["logits"], atol=1e-3)
        assert not np.allclose(s3_oof["logits"], HeldOut.of(run, k, "joint").read()["logits"], atol=1e-3)
        for v in ("probe_joint", "probe_ncm"):   # stage 3 keeps no logits: the reader's are the probe's
            assert np.allclose(HeldOut.of(run, k, v).read()["logits"], stage4_npz(run, v, "oof")["view_logits"][0][
                oof["fold"] == k], atol=1e-3)
    s4 = read_json(run.infer_summary)
    assert {"probe_joint", "probe_ncm", "wise0.5"} <= set(s4["heads"]) and (workdir / "submissions/p.csv").exists()
    best = stage4_npz(run, "best", "oof")
    for k, pick in enumerate(s4["best"]["per_fold"]):   # fold k's rows: the head chosen without them, from its backbone
        mine = best["fold"] == k
        assert np.allclose(best["view_logits"][:, mine], stage4_npz(run, pick, "oof")["view_logits"][:, mine])
    # infer.mix (on by default): the best fine-tuned and the best probe variant, each chosen without the fold it
    # scores, and the fine-tuned share w chosen the same way, their logits' weighted mean; on the test images the
    # parts and the share chosen on all folds, every fold's models in the mean
    assert "mix" in s4["heads"] and s4["mix"]["all"][0] == "joint" and s4["mix"]["all"][1] in ("probe_joint", "probe_ncm")

    part = {(v, p): stage4_npz(run, v, p)["view_logits"] for v in ("joint", "probe_joint", "probe_ncm")
            for p in ("oof", "test")}   # each part's own logits (the default run predicts every variant)

    def assert_mix(s4: dict) -> None:
        mix = stage4_npz(run, "mix", "oof")
        for k, (a, b) in enumerate(s4["mix"]["per_fold"]):
            other = read_json(run.fold(1 - k).rebalance_summary)["variants"]
            assert b == max(("probe_joint", "probe_ncm"), key=lambda v: (other[v]["metrics"]["score"],
                                                                         v == "probe_joint"))
            mine, w = mix["fold"] == k, s4["mix"]["weights"]["per_fold"][k]
            want = w * part[(a, "oof")][:, mine].astype(np.float64) + (1 - w) * part[(b, "oof")][:, mine]
            assert np.allclose(mix["view_logits"][:, mine], want, atol=1e-5)
        (a, b), w = s4["mix"]["all"], s4["mix"]["weights"]["all"]
        want = w * part[(a, "test")].astype(np.float64) + (1 - w) * part[(b, "test")]
        assert np.allclose(stage4_npz(run, "mix", "test")["view_logits"], want, atol=1e-5)
        assert len(s4["mix"]["scores"]["per_fold"]) == 2
    assert_mix(s4)
    assert set(s4["mix"]["weights"]["per_fold"]) <= {0.25, 0.5, 0.75}   # infer.mix_weights' default
    shares = ["infer.mix_weights=[0.75]"]   # a share other than the plain mean: stage 4's and the bundle's arithmetic
    r = cli(["infer", "--config", str(cfg), "infer.heads=[mix]", *shares], workdir)   # the mix alone
    assert r.returncode == 0, r.stderr[-2000:]
    s4 = read_json(run.infer_summary)
    assert s4["heads"] == ["mix", "joint"] and s4["mix"]["weights"] == {"all": 0.75, "per_fold": [0.75, 0.75]}
    assert_mix(s4)
    r = cli(["infer", "--config", str(cfg), "infer.mix=false"], workdir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mix" not in read_json(run.infer_summary)["heads"] and "mix" not in read_json(run.infer_summary)
    r = cli(["infer", "--config", str(cfg), *shares], workdir)   # back to the default heads for the exports below
    assert r.returncode == 0, r.stderr[-2000:]
    # export bundles the backbone a probe / WiSE-FT head ran on; predict from the bundle reproduces stage 5 (the mix
    # with its share: each model's factor in the bundle)
    from pipeline.core.files import layout
    from pipeline.tools import predict

    for name, member in (("pj", "p:probe_joint"), ("pn", "p:probe_ncm"), ("pw", "p:wise0.5"), ("pm", "p:mix")):
        over = [f"ensemble.members=[{member}]", f"ensemble.name={name}", *shares]
        r = cli(["ensemble", "--config", str(cfg), *over], workdir)
        assert r.returncode == 0, r.stderr[-2000:]
        r = cli(["export", "--config", str(cfg), *over], workdir)
        assert r.returncode == 0, r.stderr[-2000:]
        res = predict.run(workdir / layout.export_dir(name), root / "test", workdir / f"{name}-predict.csv",
                          root / "sample_submission.csv", tmp_dir=workdir)
        want = stage4_probs(run, member.split(":")[1])
        assert np.abs(res["members"][member] - want).max() < 1e-5, name
        pd.testing.assert_frame_equal(pd.read_csv(workdir / f"{name}-predict.csv", dtype=str),
                                      pd.read_csv(workdir / f"submissions/{name}.csv", dtype=str))
    weights = Path(pretrained)
    weights.write_bytes(weights.read_bytes() + b"\0")  # other pretrained weights than stage 2 used: refused
    r = cli(["export", "--config", str(cfg), "ensemble.members=[p:probe_joint]", "ensemble.name=pj"], workdir)
    assert r.returncode == 2 and "not the file stage 2 used" in r.stderr, r.stderr[-2000:]


def test_the_mix_parts_and_the_best_heads_pick_are_chosen_without_the_fold_they_score(workdir):
    """mix_choice / best_choice on stage-3 files made by hand: fold k's parts are the families' winners on the other
    fold (fold 0 alone would pick crt, fold 1 tau: each fold gets the other's), the mix's CV is the mean of its
    parts' logits on those folds, and `best` takes the mix only where it beats the variants there."""
    from types import SimpleNamespace

    from pipeline.core.files.artifacts import write_json, write_npz
    from pipeline.core.files.layout import RunDir
    from pipeline.stages import infer

    run = RunDir.of("m")
    y = np.array([0, 1, 2, 0])
    hit = lambda rows, strong: np.stack([np.eye(3)[c] * (3.0 if i in rows else -1.0) * strong  # noqa: E731
                                         for i, c in enumerate(y)]).astype(np.float32)
    # the fine-tuned heads know rows 0-1, the probe heads rows 2-3: the mean of one of each knows all four
    logits = {"crt": hit({0, 1}, 1.0), "tau": hit({0, 1}, 0.9), "probe_crt": hit({2, 3}, 1.0),
              "probe_tau": hit({2, 3}, 0.9)}
    scores = [{"crt": 0.75, "tau": 0.5, "probe_crt": 0.5, "probe_tau": 0.75},   # fold 0's own winners: crt, probe_tau
              {"crt": 0.5, "tau": 0.75, "probe_crt": 0.75, "probe_tau": 0.5}]   # fold 1's: tau, probe_crt
    for k in (0, 1):
        fd = run.fold(k)
        for v, lg in logits.items():
            write_npz(fd.head_oof(v), ids=np.array([f"{k}-{i}" for i in range(4)]), y=y, logits=lg)
        write_json(fd.rebalance_summary, {"variants": {v: {"metrics": {"score": s}} for v, s in scores[k].items()}})
    write_json(run.rebalance_summary, {"table": [{"variant": v} for v in logits], "best": "crt"})
    job = SimpleNamespace(run=run, eval=SimpleNamespace(scorer="accuracy"), infer=SimpleNamespace(mix_weights=[0.5]))
    inp = SimpleNamespace(summaries=[{}, {}], heads=list(logits))
    mix = infer.mix_choice(job, inp)
    assert mix["per_fold"] == [["tau", "probe_crt"], ["crt", "probe_tau"]]   # each from the other fold
    assert mix["scores"]["per_fold"] == [1.0, 1.0]   # scored on those folds' rows: the parts agree nowhere wrong
    best = infer.best_choice(job, inp, mix)
    assert best == {"all": "mix", "per_fold": ["mix", "mix"]}   # 1.0 against at most 0.75
    worse = {**mix, "scores": {"all": 0.5, "per_fold": [0.75, 0.5]}}   # a tie is the single head's; below loses
    assert infer.best_choice(job, inp, worse) == {"all": "crt", "per_fold": ["tau", "crt"]}


def test_the_mix_share_is_chosen_without_the_fold_it_scores_and_ties_go_to_the_plain_mean(workdir):
    """infer.mix_weights on stage-3 files made by hand: fold 0's rows want the fine-tuned share 0.75, fold 1's 0.25;
    each fold gets the share chosen on the other, the test images the one best on both (a tie of 0.25 and 0.75:
    the smaller), and a share no better than 0.5 never replaces it."""
    from types import SimpleNamespace

    from pipeline.core.files.artifacts import write_json, write_npz
    from pipeline.core.files.layout import RunDir
    from pipeline.stages import infer

    run = RunDir.of("w")
    y = np.array([0, 0])
    diff = {0: ([1.0, 1.0], [-2.0, 1.0]), 1: ([-2.0, 1.0], [1.0, 1.0])}  # (fine, probe): the true class's lead per row
    for k in (0, 1):
        fd = run.fold(k)
        for v, d in zip(("joint", "probe_joint"), diff[k]):
            lg = np.stack([[x, 0.0] for x in d]).astype(np.float32)
            write_npz(fd.head_oof(v), ids=np.array([f"{k}-{i}" for i in range(2)]), y=y, logits=lg)
        write_json(fd.rebalance_summary, {"variants": {v: {"metrics": {"score": 0.5}} for v in ("joint", "probe_joint")}})
    write_json(run.rebalance_summary, {"table": [{"variant": "joint"}, {"variant": "probe_joint"}], "best": "joint"})
    job = SimpleNamespace(run=run, eval=SimpleNamespace(scorer="accuracy"),
                          infer=SimpleNamespace(mix_weights=[0.25, 0.5, 0.75]))
    inp = SimpleNamespace(summaries=[{}, {}], heads=["joint", "probe_joint"])
    mix = infer.mix_choice(job, inp)
    assert mix["weights"] == {"all": 0.25, "per_fold": [0.25, 0.75]}   # fold 0 gets fold 1's choice, and back
    assert mix["scores"] == {"all": 0.75, "per_fold": [1.0, 1.0]}   # each scored where it was chosen, like the parts
    job.infer.mix_weights = [0.75, 0.5]   # fold 1 alone (for fold 0): 0.75 scores 0.5, as 0.5 does: the plain mean
    assert infer.mix_choice(job, inp)["weights"]["per_fold"] == [0.5, 0.75]
