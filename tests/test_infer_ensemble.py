"""Stages 4 and 5: TTA views, inference on OOF and test, ensembles, the submission file."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_competition, stage4_npz, stage4_probs
from pipeline.core.predict.stored import PARTS, HeldOut
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
    cfg = cfg_of(run_a.data.root, "a", "infer.views=[orig]", "infer.scales=[1.0]", "infer.heads=[joint]",
                 "infer.features=float32")   # float32 features: every logit as a float32 forward pass gives it
    infer_stage.run(cfg)
    test = stage4_npz(cfg.run_dir, "joint", "test")
    folds = pd.read_csv(cfg.folds_csv)
    for k in (0, 1):
        stage2 = HeldOut.of(cfg.run_dir, k).read()
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


def test_float16_features_keep_every_label_of_float32_ones_at_half_the_disk(run_a):
    """infer.features: float16 (the default) against float32 storage of the same backbones' features: identical
    top-1 and top-2 labels on every test and held-out row, probabilities within 2e-3, half the bytes."""
    out = {}
    for dtype in ("float32", "float16"):
        cfg = cfg_of(run_a.data.root, "a", "infer.heads=[joint,crt]", f"infer.features={dtype}")
        infer_stage.run(cfg)
        out[dtype] = {(h, part): stage4_probs(cfg.run_dir, h, part) for h in ("joint", "crt") for part in PARTS}
        out[dtype]["bytes"] = sum(p.stat().st_size for p in cfg.run_dir.infer_features_dir.rglob("*.npy"))
    for key, p32 in out["float32"].items():
        if key == "bytes":
            continue
        p16 = out["float16"][key]
        assert np.array_equal(np.argsort(-p16, 1)[:, :2], np.argsort(-p32, 1)[:, :2]), key
        assert np.abs(p16 - p32).max() < 2e-3, key
    assert out["float16"]["bytes"] < 0.6 * out["float32"]["bytes"]


@pytest.mark.parametrize("how", ["mean_prob", "geo_mean", "mean_logit"])
def test_policies_scored_in_one_pass_equal_each_policy_merged_alone(monkeypatch, how):
    """#35: stage 4 scores every TTA policy of a head in one pass over the rows (each view's probabilities computed
    once per block); each policy's per-row scores are those of its own merge, whatever the block size."""
    from pipeline.core.predict import metrics
    from pipeline.core.predict.inference import policies_rows, policy_probs
    from pipeline.core.predict.metrics import row_scores

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 23, 7)) * 3).astype(np.float32)
    y, names = rng.integers(0, 7, 23), ["orig", "hflip", "orig@1.15"]
    policies = [["orig"], ["orig", "hflip"], ["hflip", "orig@1.15", "orig"], ["orig@1.15"]]
    monkeypatch.setattr(metrics, "BLOCK_BYTES", 5 * 8 * 7)  # blocks of 5 rows: the last one short
    for policy, rs in zip(policies, policies_rows(logits, names, policies, how, y)):
        alone = row_scores(y, merge(logits[[names.index(n) for n in policy]], how))
        assert np.allclose(policy_probs(logits, names, policy, how), merge(logits[[names.index(n) for n in policy]],
                                                                           how), atol=0, rtol=0)
        for f in rs.FIELDS:
            assert np.array_equal(getattr(rs, f), getattr(alone, f)), (policy, f)
    with pytest.raises(PipelineError, match="not predicted"):
        policies_rows(logits, names, [["orig"], ["vflip"]], how, y)


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
    rows = dict(np.load(workdir / "runs/b/infer/rows.npz"))
    rows["test_ids"] = rows["test_ids"][::-1]
    np.savez(workdir / "runs/b/infer/rows.npz", **rows)
    with pytest.raises(PipelineError, match="rows.npz is missing or changed since stage 4 wrote it"):
        ens_stage.run(two)                              # a file changed behind stage 4's back is refused as such
    from pipeline.core.files.artifacts import sha256_file
    s["store"]["rows_sha256"] = sha256_file(workdir / "runs/b/infer/rows.npz", fresh=True)
    (workdir / "runs/b/infer/summary.json").write_text(json.dumps(s))   # as if stage 4 of b had predicted them
    with pytest.raises(PipelineError, match="different test image ids"):
        ens_stage.run(two)


def test_infer_without_training_data_like_a_kaggle_kernel(run_a, workdir):
    cfg = run_a
    shutil.rmtree(cfg.data_path("train"))
    os.remove(cfg.folds_csv)
    kernel = cfg_of(cfg.data.root, "a", "infer.oof=off", "infer.heads=[joint]")
    summary = infer_stage.run(kernel)
    assert stage4_probs(cfg.run_dir, "joint").shape == (9, 3) and summary["cv"] == []
    assert not list(cfg.run_dir.infer_features_dir.rglob("held*.npy"))   # no held-out rows predicted
    with pytest.raises(PipelineError, match="infer.oof=on needs"):
        infer_stage.run(cfg_of(cfg.data.root, "a", "infer.oof=on"))


def test_infer_before_train_is_refused(workdir):
    root = make_competition(workdir / "comp", {"a": 6, "b": 6})
    with pytest.raises(PipelineError, match="has not been trained"):
        infer_stage.run(cfg_of(root, "never"))


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
    probs = [np.asarray(c["oof_probs"]) for c in pool]  # the dense tables: the stage streams them (#49)
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


def test_stage4_reader_computes_every_head_view_and_block_from_features_as_brute_force_does(tmp_path):
    """core/predict/stored (#35): stage 4 stores pooled features per backbone and view plus a manifest; the reader's
    logits equal dense brute force for every head, view and block of rows (odd sizes): the test rows' weighted mean
    over the backbones that predicted a view, each held-out row from its fold's backbone and the head of its inner
    split (nested); one view, the plain and the policy probabilities (fold k's rows over fold k's own policy)."""
    import torch

    from pipeline.core.files.artifacts import write_json, write_npz
    from pipeline.core.files.featurefile import write_features
    from pipeline.core.files.layout import RunDir
    from pipeline.core.nets.heads import Head
    from pipeline.core.nets.models import write_state_dict
    from pipeline.core.predict.metrics import softmax
    from pipeline.core.predict.stored import STORE_VERSION, Stage4, head_ref
    from pipeline.core.predict.tta import BASELINE

    run = RunDir(tmp_path / "runs" / "x")
    rng = np.random.default_rng(0)
    V, N, T, D, C = 3, 11, 9, 6, 4
    views = ["hflip@1", BASELINE, "vflip@1"]
    fold = np.array([0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1])
    ids = np.array([f"r{i}" for i in range(N)])
    y = rng.integers(0, C, N)

    def head(path, normalize=False):
        h = Head(rng.normal(size=(C, D)).astype(np.float32), rng.normal(size=C).astype(np.float32),
                 rng.normal(size=D).astype(np.float32) if normalize else None, normalize)
        path.parent.mkdir(parents=True, exist_ok=True)
        h.save(path, {})
        return h
    heads = {"crt0": head(run.fold(0).head("crt")), "crt1": head(run.fold(1).head("crt")),
             "crtF": head(run.full.head("crt"), normalize=True),
             "in0": head(run.fold(0).inner_head("crt", 0)), "in1": head(run.fold(0).inner_head("crt", 1))}
    inner = rng.integers(0, 2, int((fold == 0).sum()))
    write_npz(run.fold(0).head_oof("crt"), ids=ids[fold == 0][::-1], y=y[fold == 0][::-1], inner=inner[::-1])
    w1 = {"fc.weight": torch.randn(C, D), "fc.bias": torch.randn(C)}
    write_state_dict(run.fold(1).weights, w1)
    feats, files = {}, {}
    for b, part, n, vs in (("fold0", "test", T, [0, 1, 2]), ("fold1", "test", T, [0, 1, 2]),
                           ("full", "test", T, [0, 2]), ("fold0", 0, 6, [0, 1, 2]), ("fold1", 1, 5, [0, 1, 2])):
        feats[(b, part)] = x = rng.normal(size=(len(vs), n, D)).astype(np.float16)
        run.infer_features(b, part).parent.mkdir(parents=True, exist_ok=True)
        files.setdefault(b, {})[str(part)] = write_features(
            run.infer_features(b, part), "float16", len(vs), n,
            lambda sink, x=x: [sink(i, 0, x[i].astype(np.float32)) for i in range(len(x))], "test")
    store = {"version": STORE_VERSION, "dtype": "float16", "views": views,
             "backbones": {"fold0": {"views": [0, 1, 2], "files": files["fold0"]},
                           "fold1": {"views": [0, 1, 2], "files": files["fold1"]},
                           "full": {"views": [0, 2], "files": files["full"]}},
             "test": {"crt": [{"features": "fold0", "weight": 1.0, "head": head_ref(run, run.fold(0).head("crt"))},
                              {"features": "fold1", "weight": 1.0, "head": head_ref(run, run.fold(1).head("crt"))},
                              {"features": "full", "weight": 0.5, "head": head_ref(run, run.full.head("crt"))}]},
             "oof": {"crt": [{"features": "fold0", "fold": 0, "head": head_ref(
                 run, run.fold(0).head("crt"), inner=run.fold(0).inner_heads("crt"), split=run.fold(0).head_oof("crt"))},
                 {"features": "fold1", "fold": 1, "head": head_ref(run, run.fold(1).weights, ["fc.weight", "fc.bias"])}]}}
    write_npz(run.infer_rows, test_ids=np.arange(T), classes=np.array(list("abcd")), oof_ids=ids, oof_y=y,
              oof_fold=fold)
    summary = {"policy": ["hflip@1", BASELINE], "fold_policies": None, "merge": "mean_prob", "store": store}
    write_json(run.infer_summary, summary)

    def lg(h, x):
        return h.logits(x.astype(np.float32)).astype(np.float64)
    want_test = np.zeros((V, T, C))
    for v in range(V):
        parts = [(1.0, lg(heads["crt0"], feats[("fold0", "test")][v])), (1.0, lg(heads["crt1"], feats[("fold1", "test")][v]))]
        if v != 1:  # the full-data model predicted views 0 and 2 only, at weight 0.5
            parts.append((0.5, lg(heads["crtF"], feats[("full", "test")][[0, 2].index(v)])))
        want_test[v] = sum(w * x for w, x in parts) / sum(w for w, _ in parts)
    joint1 = Head(w1["fc.weight"].numpy(), w1["fc.bias"].numpy())
    want_oof = np.zeros((V, N, C))
    for v in range(V):
        x0, x1 = feats[("fold0", 0)][v], feats[("fold1", 1)][v]
        want_oof[v, fold == 1] = lg(joint1, x1)
        want_oof[v, fold == 0] = np.where((inner == 0)[:, None], lg(heads["in0"], x0), lg(heads["in1"], x0))
    for part, want, n in (("test", want_test, T), ("oof", want_oof, N)):
        table = Stage4.of(run, "crt", part).table()
        assert table.shape == (V, n, C)
        for a, b in ((0, 3), (3, n - 1), (n - 1, n), (0, n)):      # blocks of odd sizes, the last row alone
            assert np.allclose(table[:, a:b], want[:, a:b], atol=1e-5), (part, a, b)
        assert np.allclose(table[[2, 0], 1:4], want[[2, 0], 1:4], atol=1e-5)
    s = Stage4.of(run, "crt", "oof")
    assert s.exists() and not Stage4.of(run, "best", "oof").exists()
    assert np.allclose(s.view_logits("vflip@1"), want_oof[2], atol=1e-5)
    p = [softmax(v) for v in want_oof]
    assert np.allclose(s.probs(plain=True), p[1], atol=1e-5) and np.allclose(s.probs(), (p[0] + p[1]) / 2, atol=1e-5)
    assert set(s.rows()) == {"ids", "y", "fold", "classes", "views"} and list(s.ids()) == list(ids)
    nested = Stage4.of(run, "crt", "oof", {**summary, "fold_policies": [["vflip@1"], [BASELINE, "vflip@1"]]})
    got = nested.probs()
    assert np.allclose(got[fold == 0], p[2][fold == 0], atol=1e-5)
    assert np.allclose(got[fold == 1], ((p[1] + p[2]) / 2)[fold == 1], atol=1e-5)
    test = Stage4.of(run, "crt", "test", {**summary, "fold_policies": [["vflip@1"], ["vflip@1"]]})
    assert test.fold_policies is None  # the test images: the policy chosen on every OOF row
    with pytest.raises(PipelineError, match="no view 'rot90@1'"):
        s.view_logits("rot90@1")
    head(run.fold(1).head("crt"))  # stage 3 re-run after stage 4: its features and this head no longer belong together
    with pytest.raises(PipelineError, match="changed after stage 4"):
        Stage4.of(run, "crt", "test").view_logits()
    write_json(run.infer_summary, {**summary, "store": None})
    with pytest.raises(PipelineError, match="older version"):
        Stage4.of(run, "crt", "test")
    run.infer_summary.unlink()
    with pytest.raises(PipelineError, match="stage 4 of 'x' has not finished"):
        Stage4.of(run, "crt", "oof")




@pytest.mark.parametrize("method", ["mean", "weighted"])
def test_stages_4_and_5_in_many_small_blocks_equal_one_block(run_a, monkeypatch, method):
    """#35: a test set (and OOF rows) larger than one block of rows gives what one block gives: stage 4's stored
    features, its TTA search and report, stage 5's member and ensemble CV and the submission."""
    from pipeline.core.predict import metrics

    extra = ["infer.heads=[joint,crt]", "infer.views=[orig,hflip]", "infer.search=true", "infer.batch_size=4",
             "infer.features=float32",
             "ensemble.members=[a:joint,a:crt]", f"ensemble.method={method}"]
    out = {}
    for blocks in ("one", "many"):
        if blocks == "many":  # blocks of 3 rows: the 9 test and 26 held-out rows span several, the last one short
            monkeypatch.setattr(metrics, "BLOCK_BYTES", 3 * 8 * 3)  # 3 rows of 3 classes, float64
            assert metrics.block_rows(3) == 3
        cfg = cfg_of(run_a.data.root, "a", *extra)
        s4 = infer_stage.run(cfg, force=True)
        s5 = ens_stage.run(cfg, force=True)
        out[blocks] = {"report": pd.read_csv(cfg.run_dir.infer_report), "policy": s4["policy"],
                       "fold_policies": s4["fold_policies"],
                       "sub": pd.read_csv(s5["submission"], dtype=str),
                       "table": pd.DataFrame(s5["table"]).drop(columns="per_fold"),
                       "probs": stage4_probs(cfg.run_dir, "crt"), "weights": s5["weights"]}
    one, many = out["one"], out["many"]
    assert one["policy"] == many["policy"] and one["fold_policies"] == many["fold_policies"]
    assert one["sub"].equals(many["sub"])
    assert np.allclose(one["probs"], many["probs"], atol=1e-6)
    num = one["report"].select_dtypes("number").columns
    assert np.allclose(one["report"][num].values, many["report"][num].values, atol=1e-6, equal_nan=True)
    assert one["table"]["member"].tolist() == many["table"]["member"].tolist() and len(one["table"]) == 3
    num = one["table"].select_dtypes("number").columns
    assert np.allclose(one["table"][num].values, many["table"][num].values, atol=1e-6, equal_nan=True)
    assert one["weights"].keys() == many["weights"].keys()
    assert np.allclose(list(one["weights"].values()), list(many["weights"].values()), atol=1e-4)
    if method == "mean":  # the per-row scores the stages store for the reports are the ones their logits give
        from pipeline.core.predict.metrics import row_scores
        from pipeline.core.predict.stored import Stage4

        run = cfg.run_dir
        for k in (0, 1):
            for v in (None, "crt"):
                held = HeldOut.of(run, k, v)
                o, stored_rows = held.read(), held.scores()["rows"]
                fresh = row_scores(o["y"], logits=o["logits"], dtype=np.float64)
                assert np.array_equal(stored_rows.pred, fresh.pred) and np.array_equal(stored_rows.place, fresh.place)
                assert np.allclose(stored_rows.logp, fresh.logp, atol=1e-9)
        for h in ("joint", "crt"):
            s4 = Stage4.of(run, h, "oof")
            y = s4.rows()["y"]
            for plain, fresh in ((True, row_scores(y, logits=s4.view_logits(), dtype=np.float64)),
                                 (False, row_scores(y, probs=s4.probs()))):
                got = s4.scores(plain)
                assert np.array_equal(got.pred, fresh.pred) and np.array_equal(got.place, fresh.place)
                assert np.allclose(got.logp, fresh.logp, atol=1e-5)


def test_the_closing_score_table_reads_test_probabilities_a_block_at_a_time(run_a, monkeypatch):
    """#35: the table `all` prints last scores the test labels (where known) from tables read a block of rows at a
    time, never one test x classes table (a 200,000-image test set at 10,000 classes took 24 GB there and was
    killed after stage 5 had finished); the private scores equal the dense computation."""
    from pipeline.core.inputs.data import read_test_labels
    from pipeline.core.predict import metrics, stored
    from pipeline.core.predict.metrics import score
    from pipeline.tools.reports import score_table

    cfg = cfg_of(run_a.data.root, "a", "infer.heads=[joint,crt]", "infer.views=[orig,hflip]")
    infer_stage.run(cfg)
    ids = stored.Stage4.of(cfg.run_dir, "joint", "test").ids()
    labels = Path(run_a.data.root).parent / "labels.csv"  # private test labels, as the demo keeps them
    pd.DataFrame({cfg.data.id_col: ids, cfg.data.label_col: np.random.default_rng(0).choice(list("abc"), len(ids))}
                 ).to_csv(labels, index=False)
    cfg = cfg_of(run_a.data.root, "a", "infer.heads=[joint,crt]", "infer.views=[orig,hflip]",
                 f"data.test_labels={labels}")
    ens_stage.run(cfg)
    assert read_test_labels(cfg.data) is not None

    def whole(*_, **__):
        raise AssertionError("a test x classes table was built")

    with monkeypatch.context() as m:
        m.setattr(stored.ProbTable, "__array__", whole)
        m.setattr(metrics, "BLOCK_BYTES", 2 * 8 * 3)  # blocks of 2 of the 9 test rows
        t = score_table.summary_table(cfg.experiment, cfg.data, cfg.eval.scorer).iloc[0]
    labels = read_test_labels(cfg.data)
    s = stored.Stage4.of(cfg.run_dir, "joint", "test")
    y = np.array([["a", "b", "c"].index(labels[i]) for i in s.ids()])
    head = t["head"].split(" ")[0]
    metric = cfg.eval.scorer
    assert t["private joint"] == pytest.approx(score(metric, y, stage4_probs(cfg.run_dir, "joint", plain=True)))
    assert t["private head+TTA"] == pytest.approx(score(metric, y, stage4_probs(cfg.run_dir, head)))
    assert np.isfinite(t["private joint"]) and np.isfinite(t["private head+TTA"])


def test_the_tta_report_keeps_the_nested_policy_and_the_one_chosen_on_every_row_apart(run_a, monkeypatch):
    """infer.search: the report's "policy" row scores fold k's rows with fold k's policy (here: no TTA for every
    fold), its optimistic row the policy chosen on every row (here: orig + hflip), each with its own per-row scores."""
    from pipeline.core.predict.metrics import score
    from pipeline.core.predict.tta import BASELINE

    monkeypatch.setattr(infer_stage, "search_policies",
                        lambda job, inp, logits, names: ([BASELINE, "hflip@1"], [[BASELINE], [BASELINE]]))
    cfg = cfg_of(run_a.data.root, "a", "infer.heads=[joint]", "infer.views=[orig,hflip]", "infer.search=true",
                 "infer.features=float32")
    infer_stage.run(cfg, force=True)
    mine = pd.read_csv(cfg.run_dir.infer_report).query("head == 'joint'").set_index("views")
    oof = stage4_npz(cfg.run_dir, "joint", "oof")
    both = merge(oof["view_logits"][[list(oof["views"]).index(v) for v in (BASELINE, "hflip@1")]], cfg.infer.merge)
    assert mine.loc["policy", "log_loss"] == pytest.approx(mine.loc["no TTA", "log_loss"])
    assert mine.loc[infer_stage.SELECTED_ON_ALL, "log_loss"] == pytest.approx(score("log_loss", oof["y"], both))
    assert mine.loc[infer_stage.SELECTED_ON_ALL, "log_loss"] != pytest.approx(mine.loc["no TTA", "log_loss"])


class StreamOnly:
    """An N x C probability table that can only be read a block of rows at a time (#49): reading it whole fails."""

    def __init__(self, p):
        self.p, self.shape, self.dtype = p, p.shape, p.dtype
        self.widest = 0

    def __len__(self):
        return len(self.p)

    def __getitem__(self, rows):
        assert isinstance(rows, slice), "read by row blocks only"
        self.widest = max(self.widest, len(self.p[rows]))
        return self.p[rows]

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("a member's OOF table was read whole")


def test_weights_and_hill_climbing_read_members_a_block_of_rows_at_a_time_and_agree_with_whole_tables(monkeypatch):
    """With log-loss weights (the default) stage 5's weighted and hill-climbing ensembles read each member's OOF
    table in row blocks (its true-class probabilities and the nested mix's per-row scores), never whole, and choose
    and score exactly what the whole tables give."""
    from pipeline.core.predict import metrics
    from pipeline.stages.ensemble import hill_climb, honest_cv, honest_hill_climb, objective

    rng = np.random.default_rng(7)
    n, c = 240, 6
    y = rng.integers(0, c, n)
    fold = np.arange(n) % 3
    probs = [(softmax(rng.normal(size=(n, c)) * s + 2.0 * np.eye(c)[y] * q)).astype(np.float32)
             for s, q in ((1, 1), (2, 0.5), (1, 2), (3, 0.2))]
    monkeypatch.setattr(metrics, "block_rows", lambda n_cols: 50)  # many blocks
    monkeypatch.setattr(ens_stage, "block_rows", lambda n_cols: 50)
    tables = [StreamOnly(p) for p in probs]
    vals, weights = honest_cv(tables, y, fold, "log_loss", "accuracy")
    want_vals, want_weights = honest_cv(probs, y, fold, "log_loss", "accuracy")
    assert vals == want_vals and all(np.array_equal(a, b) for a, b in zip(weights, want_weights))
    assert all(t.widest == 50 for t in tables)
    climb = load_config(None, ["ensemble.method=hill_climb"]).ensemble
    got = honest_hill_climb(climb, "accuracy", tables, y, fold)
    assert got == honest_hill_climb(climb, "accuracy", probs, y, fold)
    loss = objective("log_loss", "accuracy")
    dense = [hill_climb([p[fold != k] for p in probs], y[fold != k], loss, 100) for k in range(3)]
    assert got[1] == dense  # the same multisets the whole tables climb to
    w = fit_weights(tables, y, "log_loss", "accuracy")
    assert np.array_equal(w, fit_weights(probs, y, "log_loss", "accuracy")) and w.argmax() == 2
