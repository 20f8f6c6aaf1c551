"""Sub-center ArcFace (#48 item 4): the cosine classifier and its dominant sub-centers, the additive angular margin
(class-size margins), the config's refusals, and a run through stages 1-5 whose later stages read a plain linear
layer on L2-normalised features."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import cli, config_from_items, make_competition, stage4_npz, stage4_probs
from pipeline.core.config import ConfigError, load_config
from pipeline.core.files.artifacts import read_json, read_npz
from pipeline.core.nets.losses import SoftTargetLoss, arcface_margins
from pipeline.core.nets.models import L2Pool, SubCenterCosine, create_model, inference_state, read_state_dict


def test_the_cosine_classifier_takes_the_best_sub_center_and_keeps_the_dominant_one():
    torch.manual_seed(0)
    clf = SubCenterCosine(8, 3, 2, scale=10.0)
    x = torch.randn(50, 8)
    w = F.normalize(clf.weight, dim=1).view(3, 2, 8)
    cos = torch.einsum("nd,ckd->nck", F.normalize(x, dim=1), w)
    assert torch.allclose(clf.eval()(x), 10.0 * cos.max(2).values, atol=1e-5)
    assert clf.hits.sum() == 0   # counted only while it trains
    clf.train()(x)
    pred, sub = cos.max(2).values.argmax(1), cos.max(2).indices
    want = torch.zeros(3, 2)
    for n in range(50):
        want[pred[n], sub[n, pred[n]]] += 1
    assert torch.equal(clf.hits, want)
    lin = clf.linear()
    dominant = want.argmax(1)
    assert torch.allclose(lin.weight, 10.0 * w[torch.arange(3), dominant], atol=1e-6) and not lin.bias.any()
    one = SubCenterCosine(8, 3, 1, scale=10.0)   # plain ArcFace: the linear layer on unit features is the same head
    assert torch.allclose(one.linear()(F.normalize(x, dim=1)), one(x), atol=1e-5)


def test_the_angular_margin_moves_only_the_target_and_scales_with_class_size():
    cos = torch.tensor([[0.5, 0.2, -0.1]])
    s, m = 10.0, np.array([0.3, 0.3, 0.3], np.float32)
    target = torch.tensor([[1.0, 0.0, 0.0]])
    loss = SoftTargetLoss(arc_margins=m, arc_scale=s)
    want = torch.tensor([[s * math.cos(math.acos(0.5) + 0.3), s * 0.2, s * -0.1]])
    assert torch.allclose(loss(s * cos, target), F.cross_entropy(want, torch.tensor([0])), atol=1e-5)
    assert torch.allclose(SoftTargetLoss(arc_margins=np.zeros(3, np.float32), arc_scale=s)(s * cos, target),
                          F.cross_entropy(s * cos, torch.tensor([0])), atol=1e-5)
    near_pi = torch.tensor([[-0.99, 0.0, 0.0]])   # theta + m past pi: the linear fall-back keeps it falling
    out = SoftTargetLoss(arc_margins=m, arc_scale=s).per_sample(s * near_pi, target)
    assert out > F.cross_entropy(s * near_pi, torch.tensor([0]))
    counts = np.array([100, 10, 1, 0])
    got = arcface_margins(counts, 0.5, 0.1)
    assert got[0] == pytest.approx(0.1) and got[2] == pytest.approx(0.5) and got[3] == pytest.approx(0.5)
    assert got[0] < got[1] < got[2]
    assert np.all(arcface_margins(counts, 0.4, None) == np.float32(0.4))


def test_arcface_is_refused_with_a_linear_probe_start_or_ldam():
    with pytest.raises(ConfigError, match="train.head_init.*cosine classifier"):
        load_config(None, ["model.head=arcface", "model.pretrained_path=w.safetensors", "train.head_init=probe"])
    with pytest.raises(ConfigError, match="train.epochs.*cosine classifier"):
        load_config(None, ["model.head=arcface", "model.pretrained_path=w.safetensors", "train.epochs=0"])
    with pytest.raises(ConfigError, match="train.loss.*LDAM"):
        load_config(None, ["model.head=arcface", "train.loss=ldam"])
    with pytest.raises(ConfigError, match="arcface_margin_min"):
        load_config(None, ["model.head=arcface", "train.arcface_margin_min=0.6"])
    cfg = load_config(None, ["model.head=arcface", "model.pretrained_path=w.safetensors", "train.epochs=2"])
    assert cfg.train.head_init == "random" and cfg.train.batch_size == 32   # the short defaults apply


def test_the_model_pools_unit_vectors_and_writes_a_linear_classifier():
    cfg = load_config(None, ["model.arch=test_resnet", "model.head=arcface", "model.arcface_subcenters=2"])
    model = create_model(cfg.model, 4, training=True)
    assert isinstance(model.get_classifier(), SubCenterCosine) and isinstance(model.global_pool, L2Pool)
    x = torch.randn(3, 3, 16, 16)
    feats = model.eval().forward_head(model.forward_features(x), pre_logits=True)
    assert torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-5)
    sd = inference_state(model)
    reading = create_model(cfg.model, 4)   # what every later stage builds
    reading.load_state_dict(sd)           # strict: the same keys
    assert isinstance(reading.get_classifier(), torch.nn.Linear)
    assert torch.allclose(reading.get_classifier().weight.norm(dim=1), torch.full((4,), 30.0), atol=1e-4)


TINY = ["data.image_ext=.png", "model.arch=test_resnet", "aug.img_size=16", "aug.cache=off", "train.batch_size=8",
        "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0", "infer.views=[orig]",
        "rebalance.crt_epochs=2", "rebalance.lws_epochs=2", "rebalance.variants=[joint,crt,ncm]",
        "infer.features=float32"]


def test_an_arcface_experiment_runs_through_every_stage_on_unit_features(workdir):
    root = make_competition(workdir / "comp", {"a": 10, "b": 8, "c": 6}, size=16, n_test=6)
    cfg = config_from_items(workdir / "arc.yaml", [f"data.root={root}", "experiment=arc", *TINY, "train.epochs=2",
                                                   "model.head=arcface", "model.arcface_subcenters=2",
                                                   "train.arcface_margin=0.4", "train.arcface_margin_min=0.2",
                                                   "infer.heads=[best]"])
    r = cli(["all", "--config", str(cfg)], workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    run = load_config(cfg).run_dir
    for k in (0, 1):
        sd = read_state_dict(run.fold(k).weights)
        assert set(sd) >= {"fc.weight", "fc.bias"} and not any("hits" in n for n in sd)
        assert np.allclose(sd["fc.weight"].norm(dim=1).numpy(), 30.0, atol=1e-3) and not sd["fc.bias"].any()
        oof = read_npz(run.fold(k).oof)
        assert np.allclose(np.linalg.norm(oof["feats"], axis=1), 1.0, atol=1e-3)   # stage 2 stored unit features
        s2 = read_json(run.fold(k).summary)
        acc = float(((oof["feats"] @ oof["weight"].T + oof["bias"]).argmax(1) == oof["y"]).mean())
        assert s2["metrics"]["accuracy"] == pytest.approx(acc)   # its score is the written classifier's
        feats = read_npz(run.fold(k).features)   # stage 3 reads the same unit features
        assert np.allclose(np.linalg.norm(feats["train"], axis=1), 1.0, atol=1e-3)
    joint = stage4_npz(run, "joint", "oof")
    for k in (0, 1):
        mine = joint["fold"] == k
        held = read_npz(run.fold(k).oof)
        assert np.allclose(joint["view_logits"][0][mine], held["feats"] @ held["weight"].T, atol=1e-3)
    assert (workdir / "submissions/arc.csv").exists() and stage4_probs(run, "best").shape == (6, 3)
    # export bundles the written (linear) classifier on the normalising pool; predict from the bundle reproduces stage 5
    import pandas as pd

    from pipeline.core.files import layout
    from pipeline.tools import predict

    r = cli(["export", "--config", str(cfg)], workdir)
    assert r.returncode == 0, r.stderr[-2000:]
    res = predict.run(workdir / layout.export_dir("arc"), root / "test", workdir / "arc-predict.csv",
                      root / "sample_submission.csv", tmp_dir=workdir)
    pd.testing.assert_frame_equal(pd.read_csv(workdir / "arc-predict.csv", dtype=str),
                                  pd.read_csv(workdir / "submissions/arc.csv", dtype=str))
    infos = [read_json(p) for p in (workdir / layout.export_dir("arc")).rglob("member.json")]
    assert res["members"] and infos and all(i["plain_timm"] is False for i in infos)


def test_lr_find_trains_the_cosine_classifier_with_its_margin(workdir, monkeypatch):
    from pipeline.stages import folds as folds_stage
    from pipeline.tools import lr_find

    root = make_competition(workdir / "comp", {"a": 10, "b": 8, "c": 6}, size=16, n_test=4)
    cfg = load_config(config_from_items(workdir / "lr.yaml", [f"data.root={root}", "experiment=lr", *TINY,
                                                              "model.head=arcface", "train.epochs=1"]), [])
    folds_stage.run(cfg)
    seen = {}
    made, lossed = lr_find.create_model, lr_find.SoftTargetLoss

    def spy_model(*a, **kw):
        seen["model"] = made(*a, **kw)
        return seen["model"]

    def spy_loss(*a, **kw):
        seen["loss"] = lossed(*a, **kw)
        return seen["loss"]
    monkeypatch.setattr(lr_find, "create_model", spy_model)
    monkeypatch.setattr(lr_find, "SoftTargetLoss", spy_loss)
    from pipeline.core.errors import PipelineError

    try:   # a few steps on 24 tiny images: the range test may find no falling loss to suggest an lr from
        out = lr_find.run(cfg, steps=6)
        assert len(out["lrs"]) == len(out["losses"]) > 0
    except PipelineError as e:
        assert "never fell" in str(e)
    assert isinstance(seen["model"].get_classifier(), SubCenterCosine)   # stage 2's head, with stage 2's margin
    assert seen["loss"].arc is not None and seen["loss"].arc_scale == 30.0


def test_the_new_model_keys_leave_the_probe_features_record_as_it_was_at_their_defaults():
    """Keys added to the model section (model.head, arcface_*) are left out of the probe features' record while at
    their defaults: upgrading does not re-run stage 3 of a pretrained experiment; set, they are recorded."""
    from pipeline.core.files import provenance
    from pipeline.core.inputs.pixels import pixels

    pre = ["model.arch=test_resnet", "model.pretrained_path=w.safetensors"]
    cfg = load_config(None, pre)
    rec = provenance.probe_features_record(cfg.model, pixels(cfg), ["a", "b"], {"digest": "x"})
    assert not {"head", "arcface_subcenters", "arcface_scale"} & set(rec["model"])
    assert {"head_init_scale", "pool", "gem_p"} <= set(rec["model"])   # the keys of the record's format stay
    arc = load_config(None, [*pre, "model.head=arcface"])
    assert provenance.probe_features_record(arc.model, pixels(arc), ["a", "b"], {"digest": "x"})["model"]["head"] == "arcface"
