"""train.full_fit (a model of every row joining the test mean) and infer.fixres (views at a larger size after
tuning the normalisation layers and classifier there, on each fold's own training rows)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_competition, stage4_npz, stage4_probs
from pipeline.core.nets import models
from pipeline.core.files.artifacts import read_json
from pipeline.core.inputs.augment import open_store
from pipeline.core.inputs.data import read_folds, read_test_table
from pipeline.core.predict.inference import Loading, joint_head, predict_policy
from pipeline.stages import folds as folds_stage
from pipeline.stages import infer as infer_stage
from pipeline.stages import rebalance as rebalance_stage
from pipeline.stages import train as train_stage
from pipeline.tools.reports import leaderboard
from pipeline.core.inputs.pixels import pixels

TINY = ["data.image_ext=.png", "experiment=tiny", "model.arch=test_resnet", "aug.img_size=32", "aug.cache=off",
        "train.batch_size=8", "train.epochs=3", "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0",
        "train.lr=0.01", "infer.views=[orig]", "infer.batch_size=8"]


def cfg_of(root, *extra):
    from pipeline.core.config import load_config

    return load_config(None, [f"data.root={root}", *TINY, *extra])


@pytest.fixture
def comp(workdir):
    return make_competition(workdir / "comp", {"a": 12, "b": 10, "c": 8}, size=24, n_test=9)


def baseline_logits(cfg, weights, stage2, n_classes):
    """One model's plain-view (orig@1) test logits, predicted directly."""
    model = models.load_trained(cfg.model, weights, n_classes).eval()
    norm = models.Normalize(stage2["mean"], stage2["std"])
    store = open_store(pixels(cfg), read_test_table(cfg.data)["path"])
    load = Loading.of(pixels(cfg), cfg.infer, cfg.train, None)
    return predict_policy(load, model, norm, {"joint": joint_head(model)}, store, ["orig@1"], torch.device("cpu"),
                          None)["joint"][0]


@pytest.mark.slow
def test_full_fit_trains_every_row_for_the_folds_epoch_and_joins_the_test_mean(comp):
    cfg = cfg_of(comp, "train.full_fit=true", "rebalance.variants=[joint,tau,crt]", "rebalance.crt_epochs=4",
                 "infer.heads=[tau]", "infer.full_fit_weight=2")
    folds_stage.run(cfg)
    summaries = train_stage.run(cfg)
    df, classes = read_folds(cfg.folds_name)
    full = read_json(cfg.run_dir.full.summary)
    chosen = sorted(s["epoch"] for s in summaries)
    assert full["n_train"] == len(df) and full["n_valid"] == 0 and full["score"] is None
    assert full["epoch"] == chosen[0] == full["epochs_trained"]  # the low median of two folds
    assert full["made_from"]["full_fit"]["epochs"] == chosen[0]
    # the folds do not depend on the full fit: turning it off leaves stage 2 up to date
    assert train_stage.status(cfg_of(comp, "train.full_fit=false")) == [] and train_stage.status(cfg) == []

    rebalance_stage.run(cfg)
    taus = sorted(read_json(cfg.run_dir.fold(k).rebalance_summary)["variants"]["tau"]["tau"] for k in range(2))
    assert read_json(cfg.run_dir.full.rebalance_summary)["variants"]["tau"]["from_folds"] == taus[0]
    assert cfg.run_dir.full.head("crt").exists() and rebalance_stage.status(cfg) == []

    infer_stage.run(cfg)
    test = stage4_npz(cfg.run_dir, "joint", "test")
    parts = [baseline_logits(cfg, cfg.run_dir.fold(k).weights, summaries[k], len(classes)) for k in range(2)]
    parts.append(2 * baseline_logits(cfg, cfg.run_dir.full.weights, full, len(classes)))
    expected = sum(parts) / 4  # two fold models and the full model at weight 2
    got = test["view_logits"][list(test["views"]).index("orig@1")].astype(np.float64)
    assert np.allclose(got, expected, atol=2e-2), np.abs(got - expected).max()
    oof_with = stage4_probs(cfg.run_dir, "tau", "oof")
    rows = leaderboard.experiment_rows(cfg.run_dir)
    assert all("full fit x2 (test only, no CV of its own)" in r["recipe"] for r in rows if r["head"] == "tau")

    # weight 0: the test mean is the folds' alone; OOF (and so the CV) is the same either way
    cfg0 = cfg_of(comp, "train.full_fit=true", "rebalance.variants=[joint,tau,crt]", "rebalance.crt_epochs=4",
                  "infer.heads=[tau]", "infer.full_fit_weight=0")
    assert infer_stage.status(cfg0)  # the weight is a stage-4 setting
    infer_stage.run(cfg0)
    test0 = stage4_npz(cfg.run_dir, "joint", "test")
    assert np.allclose(test0["view_logits"][0].astype(np.float64), sum(parts[:2]) / 2, atol=2e-2)
    assert np.array_equal(stage4_probs(cfg.run_dir, "tau", "oof"), oof_with)


@pytest.mark.slow
def test_fixres_tunes_norm_layers_and_head_on_the_folds_training_rows_only(comp, tmp_path):
    cfg = cfg_of(comp, "infer.fixres.size=1.5", "infer.fixres.epochs=2", "infer.heads=[joint]",
                 "rebalance.variants=[joint]")
    folds_stage.run(cfg)
    train_stage.run(cfg)
    s4 = infer_stage.run(cfg)
    assert "fixres:orig@1.5" in s4["policy"]
    report = {(r["head"], r["views"]): r for r in s4["cv"]}
    assert np.isfinite(report[("joint", "fixres:orig@1.5 alone")]["cv_mean"])  # scored on OOF like any view
    df, classes = read_folds(cfg.folds_name)
    meta = read_json(cfg.run_dir.fixres_meta("fold0"))
    assert meta["crop"] == 48 and meta["rows"] == int((df["fold"] != 0).sum())
    plain = models.read_state_dict(cfg.run_dir.fold(0).weights)
    tuned = models.read_state_dict(cfg.run_dir.fixres("fold0"))
    net = models.load_trained(cfg.model, cfg.run_dir.fold(0).weights, len(classes))
    conv_keys = [f"{n}.weight" for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    bn_keys = [f"{n}.running_mean" for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert conv_keys and all(torch.equal(plain[k], tuned[k]) for k in conv_keys)  # the backbone's filters stay
    assert bn_keys and all(not torch.equal(plain[k], tuned[k]) for k in bn_keys)  # BN re-estimated at 48 px
    assert not torch.equal(plain["fc.weight"], tuned["fc.weight"])  # the classifier moved
    rows = leaderboard.experiment_rows(cfg.run_dir)
    assert [r["recipe"] for r in rows if r["tta"] == "on"] == ["FixRes 1.5"]

    # the held-out rows of fold 0 never reach its FixRes copy: change their pixels and it is byte-identical,
    # while fold 1's copy (which trains on those rows) moves
    before = {u: cfg.run_dir.fixres(u).read_bytes() for u in ("fold0", "fold1")}
    rng = np.random.default_rng(0)
    for p in df["path"][df["fold"] == 0]:
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(p)
    cfg.session.allow_stale = True  # what --allow-stale sets for the command
    infer_stage.run(cfg)
    cfg.session.allow_stale = False
    assert cfg.run_dir.fixres("fold0").read_bytes() == before["fold0"]
    assert cfg.run_dir.fixres("fold1").read_bytes() != before["fold1"]


def test_fixres_without_train_images_uses_the_tuned_copies_or_refuses(comp):
    cfg = cfg_of(comp, "infer.fixres.size=1.25", "infer.heads=[joint]", "rebalance.variants=[joint]")
    folds_stage.run(cfg)
    train_stage.run(cfg)
    kernel = cfg_of(comp, "infer.fixres.size=1.25", "infer.heads=[joint]", "rebalance.variants=[joint]",
                    "infer.oof=off")
    with pytest.raises(Exception, match="infer.fixres needs .*fold0.safetensors"):
        infer_stage.run(kernel)
    infer_stage.run(cfg)
    test = stage4_probs(cfg.run_dir, "joint")
    Path(cfg.folds_csv).rename(Path(cfg.folds_csv).with_suffix(".bak"))  # as in a kernel: no folds, no train rows
    infer_stage.run(kernel, force=True)
    assert np.allclose(stage4_probs(cfg.run_dir, "joint"), test, atol=1e-6)


def test_an_interrupted_full_fit_resumes_to_the_same_weights(comp, monkeypatch, caplog):
    import shutil

    cfg = cfg_of(comp, "train.full_fit=true")
    folds_stage.run(cfg)
    train_stage.run(cfg)  # the folds, then the full fit
    full = cfg.run_dir.full.dir
    clean = (full / "model.safetensors").read_bytes()
    shutil.rmtree(full)  # again, the folds up to date: interrupted in the full fit's second epoch (the SIGKILL
    monkeypatch.setenv("PIPELINE_FAULT", "oom@train:full-step:1")  # variant is the fold test in test_train)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        train_stage.run(cfg)
    assert (full / "last.pt").exists() and not (full / "summary.json").exists()
    monkeypatch.delenv("PIPELINE_FAULT")
    with caplog.at_level("INFO", logger="pipeline"):
        train_stage.run(cfg)
    assert "full fit: resuming" in caplog.text and "fold 0: up to date" in caplog.text
    assert (full / "model.safetensors").read_bytes() == clean
