"""Stage 3: the head algorithms on synthetic features, and the stage on a tiny trained run."""
import json

import numpy as np
import pytest

from conftest import make_competition
from pipeline.core.nets import models
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.nets.heads import Head, cross_fit, logit_adjust_head, ncm_head, tau_head, train_linear
from pipeline.core.predict.metrics import score, softmax
from pipeline.core.predict.stored import HeldOut
from pipeline.core.inputs.samplers import epoch_indices
from pipeline.stages import folds as folds_stage
from pipeline.stages import rebalance as rebalance_stage
from pipeline.stages import train as train_stage


def test_tau_zero_returns_joint_logits():
    rng = np.random.default_rng(0)
    w, b, x = rng.normal(size=(5, 8)), rng.normal(size=5), rng.normal(size=(20, 8))
    joint = Head(w, b).logits(x)
    assert np.allclose(tau_head(w, b, 0.0, keep_bias=True).logits(x), joint)
    assert np.allclose(tau_head(w, b, 0.0).logits(x), joint - b)          # the paper drops the bias
    t1 = tau_head(w, b, 1.0)
    assert np.allclose(np.linalg.norm(t1.weight, axis=1), 1.0)           # tau=1: unit-norm class vectors
    assert np.allclose(logit_adjust_head(w, b, np.full(5, 0.2), 0.0).logits(x), joint)


def test_class_balanced_sampler_equal_counts_in_expectation():
    labels = np.repeat(np.arange(4), [500, 60, 12, 3])
    drawn = np.concatenate([labels[epoch_indices("class_balanced", labels, 4, 0, e, 1)] for e in range(40)])
    freq = np.bincount(drawn, minlength=4) / len(drawn)
    assert np.allclose(freq, 0.25, atol=0.01)


def test_ncm_on_separable_features_is_perfect():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(6, 16)) * 5
    y = np.repeat(np.arange(6), [200, 50, 20, 8, 4, 2])
    x = centers[y] + rng.normal(size=(len(y), 16)) * 0.3 + 3.0           # offset: centring matters
    head = ncm_head(x, y, 6)
    yt = np.repeat(np.arange(6), 30)
    xt = centers[yt] + rng.normal(size=(len(yt), 16)) * 0.3 + 3.0
    assert (head.logits(xt).argmax(1) == yt).all()


def long_tailed_features(seed=0):
    """Overlapping classes with a steep tail: a joint classifier trained on it favours the head."""
    rng = np.random.default_rng(seed)
    c, d = 8, 16
    centers = rng.normal(size=(c, d)) * 0.8
    counts = np.floor(400 * (1 / 50) ** (np.arange(c) / (c - 1))).astype(int)   # 400 ... 8 images
    y = np.repeat(np.arange(c), counts)
    x = centers[y] + rng.normal(size=(len(y), d))
    yv = np.repeat(np.arange(c), 60)                                      # balanced evaluation
    xv = centers[yv] + rng.normal(size=(len(yv), d))
    return x, y, xv, yv, c


def test_crt_and_tau_raise_balanced_accuracy_on_long_tailed_features():
    import torch

    x, y, xv, yv, c = long_tailed_features()
    torch.manual_seed(0)
    # the "joint" classifier: instance sampling, no bias and weight decay, so that (as Kang et al. observe
    # in deep joint training) the class prior ends up in the weight norms
    lin = torch.nn.Linear(x.shape[1], c, bias=False)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(lin(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w, b = lin.weight.detach().numpy(), np.zeros(c, np.float32)
    norms = np.linalg.norm(w, axis=1)
    assert norms[0] > norms[-1]                                           # head classes have larger norms
    bal = lambda head: score("balanced_accuracy", yv, softmax(head.logits(xv)))  # noqa: E731
    joint = bal(Head(w, b))
    pred = Head(w, b).logits(xv).argmax(1)
    assert np.bincount(pred, minlength=c)[0] > np.bincount(pred, minlength=c)[-1]  # biased to the head
    crt = train_linear(x, y, c, epochs=30, lr=0.1, weight_decay=5e-4, seed=0, checkpoints=[30])[30]
    best_tau = max(bal(tau_head(w, b, t)) for t in np.arange(0.5, 2.01, 0.25))
    assert bal(crt) > joint + 0.04, (bal(crt), joint)
    assert best_tau > joint + 0.04, (best_tau, joint)


def test_cross_fit_never_scores_a_row_with_a_value_chosen_on_it():
    y = np.array([0, 1] * 10)
    inner = np.repeat([0, 1], 10)
    # param 'a' is perfect on inner fold 0 only, 'b' on inner fold 1 only
    good, bad = np.eye(2)[y] * 5, np.eye(2)[1 - y] * 5
    cands = {"a": np.where(inner[:, None] == 0, good, bad), "b": np.where(inner[:, None] == 1, good, bad)}
    rows, final, per_split, curve = cross_fit(cands, y, inner, "accuracy")
    assert per_split == ["b", "a"]                       # each part uses the value the *other* part chose
    assert float((rows.pred == y).mean()) == 0.0         # honest: the in-sample choice would claim 1.0
    assert np.array_equal(rows.place, np.full(len(y), 2))  # each row scored by the wrong-way candidate
    assert curve == {"a": 0.5, "b": 0.5}


@pytest.fixture
def trained(workdir):
    root = make_competition(workdir / "comp", {"a": 14, "b": 8, "c": 4}, size=24)
    cfg = load_config(None, [f"data.root={root}", "data.image_ext=.png", "experiment=rb", "model.arch=test_resnet",
                             "aug.img_size=32", "aug.cache=off", "train.batch_size=8", "train.epochs=1",
                             "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0",
                             "rebalance.crt_epochs=4", "rebalance.lws_epochs=4"])
    folds_stage.run(cfg)
    train_stage.run(cfg)
    return cfg


def test_stage_writes_heads_oof_report_and_caches_features(trained, monkeypatch):
    cfg = trained
    calls = {"n": 0}
    real = models.features

    def counting(model, x):
        calls["n"] += 1
        return real(model, x)

    monkeypatch.setattr(models, "features", counting)
    summary = rebalance_stage.run(cfg)
    assert calls["n"] > 0
    assert summary["best"] in cfg.rebalance.variants
    for k in (0, 1):
        d = cfg.run_dir.fold(k).dir / "rebalance"
        for v in cfg.rebalance.variants:
            head, record = Head.load(d / "heads" / f"{v}.safetensors")
            assert record["variant"] == v and head.weight.shape[0] == 3
            assert (d / f"oof_{v}.npz").exists()
        joint = HeldOut.of(cfg.run_dir, k, "joint").read()["logits"]
        assert np.allclose(joint, HeldOut.of(cfg.run_dir, k).read()["logits"], atol=1e-4)
        s3 = json.loads((d / "summary.json").read_text())["variants"]
        for v in cfg.rebalance.variants:  # no logits stored: the reader's, from features and (inner) heads, are
            o = HeldOut.of(cfg.run_dir, k, v).read()      # the cross-fitted ones stage 3 scored
            assert "logits" not in np.load(d / f"oof_{v}.npz").files
            got = score(cfg.eval.scorer, o["y"], softmax(o["logits"].astype(np.float64)))
            assert got == pytest.approx(s3[v]["metrics"]["score"], abs=1e-9), v
    rd = cfg.run_dir.dir / "rebalance"
    for name in ("report.csv", "report.md", "summary.json"):
        assert (rd / name).exists(), name
    md = (rd / "report.md").read_text()
    assert f"Best variant on all folds: **{summary['best']}** (selected on the rows" in md
    assert all(v in md for v in cfg.rebalance.variants)
    assert not list(rd.glob("*.png"))  # pictures are drawn once, by the experiment page
    # another variant setting: features come from the cache, no backbone pass at all
    calls["n"] = 0
    cfg2 = load_config(None, [*_overrides(cfg), "rebalance.tau=1.0", "rebalance.crt_epochs=2"])
    rebalance_stage.run(cfg2)
    assert calls["n"] == 0
    _, rec = Head.load(cfg.run_dir.fold(0).dir / "rebalance" / "heads" / "tau.safetensors")
    assert rec["tau"] == 1.0


def _overrides(cfg):
    return [f"data.root={cfg.data.root}", "data.image_ext=.png", "experiment=rb", "model.arch=test_resnet",
            "aug.img_size=32", "aug.cache=off", "train.batch_size=8", "train.epochs=1", "train.workers=0",
            "folds.n_splits=2", "train.warmup_epochs=0", "rebalance.lws_epochs=4"]


def test_augmented_views_feed_crt(trained):
    cfg = load_config(None, [*_overrides(trained), "rebalance.aug_views=2", "rebalance.variants=[joint, crt]"])
    rebalance_stage.run(cfg, fold=0)
    f = np.load(cfg.run_dir.fold(0).dir / "rebalance" / "features.npz")
    assert f["views"].shape == (2, *f["train"].shape)
    assert not np.allclose(f["views"][0], f["views"][1])                 # two different augmented views
    assert not np.allclose(f["views"][0], f["train"])


def test_a_float16_feature_cache_halves_the_file_and_a_cached_run_fits_the_same_heads(trained):
    """rebalance.features=float16 (#49): the cache is stored in float16 (half the bytes), the fresh run's heads are
    fit on the stored values (so a run from the cache fits bit-identical heads), the change makes the cache and the
    heads stale, and the CV moves by less than 1e-2 on these 26 rows."""
    s32 = rebalance_stage.run(trained)
    bytes32 = {k: v.nbytes for k, v in np.load(trained.run_dir.fold(0).features).items()}
    cfg = load_config(None, [*_overrides(trained), "rebalance.crt_epochs=4", "rebalance.features=float16"])
    assert rebalance_stage.status(cfg)[0] == "fold 0: changed features.dtype, rebalance.features"
    s16 = rebalance_stage.run(cfg)
    f = np.load(cfg.run_dir.fold(0).features)
    assert f["train"].dtype == np.float16 and f["valid"].dtype == np.float16
    assert 2 * f["train"].nbytes == bytes32["train"] and 2 * f["valid"].nbytes == bytes32["valid"]
    fresh = {v: Head.load(cfg.run_dir.fold(0).head(v))[0] for v in cfg.rebalance.variants}
    rebalance_stage.run(cfg, force=True)  # heads again, the features from the float16 cache
    for v, h in fresh.items():
        got = Head.load(cfg.run_dir.fold(0).head(v))[0]
        assert np.array_equal(got.weight, h.weight) and np.array_equal(got.bias, h.bias), v
    assert rebalance_stage.status(cfg) == []
    cv = lambda s: {r["variant"]: r[f"{s['metric']}_mean"] for r in s["table"]}  # noqa: E731
    assert max(abs(cv(s16)[v] - cv(s32)[v]) for v in cv(s32)) < 1e-2


@pytest.mark.parametrize("stored", ["float16", "float32"])
def test_heads_read_the_cache_a_block_at_a_time_and_fit_what_whole_arrays_fit(tmp_path, monkeypatch, stored):
    """#49: stage 3's fits read a memory-mapped cache (map_npz) a few rows at a time, upcast to float32, and give the
    heads an in-memory float32 copy of the same values gives, bit for bit (blocks of 7 rows: many blocks)."""
    from pipeline.core.files.artifacts import map_npz, write_npz
    from pipeline.core.nets import heads

    rng = np.random.default_rng(3)
    n, d, c = 300, 12, 9
    x = rng.normal(size=(n, d)).astype(stored)
    feats = {"train": x, "train_y": rng.integers(0, c, n), "views": rng.normal(size=(2, n, d)).astype(stored),
             "joint_weight": rng.normal(size=(c, d)).astype(np.float32), "joint_bias": np.zeros(c, np.float32)}
    write_npz(tmp_path / "features.npz", **feats)
    monkeypatch.setattr("pipeline.core.files.artifacts.MAP_MIN_BYTES", 0)
    mapped = map_npz(tmp_path / "features.npz")
    assert isinstance(mapped["train"], np.memmap) and mapped["train"].dtype == stored  # nothing upcast whole
    whole = {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in feats.items()}
    r = load_config(None, ["rebalance.variants=[joint,crt,tau,lws,ncm,ncm_pca,knn,logit_adjust]",
                           "rebalance.crt_epochs=3", "rebalance.lws_epochs=2"]).rebalance
    chosen = {"crt": 3, "lws": 2, "tau": 1.0, "ncm": 10.0, "ncm_pca": 10.0, "knn": (5, 0.1), "logit_adjust": 1.0}
    expected = heads.heads_with_choices(r, whole, c, chosen, seed=0)
    monkeypatch.setattr(heads, "_block", lambda d: 7)
    assert np.array_equal(heads.mean_rows(mapped["train"]), whole["train"].mean(0))
    got = heads.heads_with_choices(r, mapped, c, chosen, seed=0)
    for v, h in expected.items():
        for name in ("weight", "bias", "center", "proj", "bank"):
            a, b = getattr(h, name), getattr(got[v], name)
            assert (a is None and b is None) or np.array_equal(a, b), (v, name)
    rows = heads.StackedRows([mapped["train"], *mapped["views"]])
    idx = np.array([5, n + 5, 2 * n + 5, 0, 3 * n - 1])
    assert np.array_equal(rows.take(idx), np.concatenate([whole["train"], *whole["views"]])[idx])


def test_missing_fold_and_stale_weights_are_refused(trained):
    cfg = trained
    (cfg.run_dir.fold(1).dir / "summary.json").unlink()
    with pytest.raises(PipelineError, match=r"fold 1 of experiment 'rb' has no finished stage-2 output"):
        rebalance_stage.run(cfg, fold=1)
    stale = load_config(None, [*_overrides(cfg), "train.lr=0.5"])
    with pytest.raises(PipelineError, match=r"stale.*changed: train.lr"):
        rebalance_stage.run(stale, fold=0)


def test_weights_of_another_architecture_are_refused(trained, tmp_path):
    cfg = trained
    other = models.create_model(load_config(None, ["model.arch=resnet10t"]).model, num_classes=3)
    path = tmp_path / "other.safetensors"
    models.write_state_dict(path, other.state_dict())
    with pytest.raises(PipelineError, match="does not fit model.arch=test_resnet with 3 classes"):
        models.load_trained(cfg.model, path, 3)
    ours = models.read_state_dict(cfg.run_dir.fold(0).dir / "model.safetensors")
    models.write_state_dict(path, ours)
    with pytest.raises(PipelineError, match="with 5 classes"):
        models.load_trained(cfg.model, path, 5)


def test_inner_splits_fall_back_to_plain_shuffling_when_no_class_can_be_stratified():
    from pipeline.stages.rebalance import inner_split

    few = np.arange(1000)                       # 1,000 classes of one held-out image each (FGVC at 2 per class)
    split = inner_split(few, 2, 0)
    assert sorted(np.bincount(split)) == [500, 500]
    many = np.repeat(np.arange(5), 4)           # stratifiable: every class in both splits
    split = inner_split(many, 2, 0)
    assert all(sorted(np.bincount(split[many == c])) == [2, 2] for c in range(5))
