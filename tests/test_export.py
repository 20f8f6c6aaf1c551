"""`export` and `predict`: a bundle reproduces stage 5's submission with nothing but itself and the test images."""
import hashlib
import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_competition, run_cli, stage4_probs
from pipeline.core.files import layout
from pipeline.core.files.layout import RunDir
from pipeline.core.nets import models
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.nets.heads import Head
from pipeline.core.predict.submission import combine
from pipeline.stages import ensemble as ens_stage
from pipeline.stages import folds as folds_stage
from pipeline.stages import infer as infer_stage
from pipeline.stages import rebalance as rebalance_stage
from pipeline.stages import train as train_stage
from pipeline.tools import export, predict

BASE = ["data.image_ext=.png", "model.arch=test_resnet", "aug.img_size=32", "aug.cache=off", "train.batch_size=8",
        "train.epochs=1", "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0", "rebalance.crt_epochs=2",
        "rebalance.lws_epochs=2", "rebalance.variants=[joint,tau,ncm]", "infer.batch_size=4"]
MEMBERS = {"a": ["infer.heads=[tau]", "infer.views=[orig,hflip]", "infer.scales=[1.0,1.25]"],
           "b": ["infer.heads=[ncm]", "infer.views=[orig,rot90]", "model.pool=gem", "train.full_fit=true",
                 "infer.full_fit_weight=0.5", "infer.fixres.size=1.25"]}
ENSEMBLE = ["ensemble.members=[a:tau,b:ncm]", "ensemble.method=weighted", "ensemble.name=duo"]


def cfg_of(root, exp, *extra):
    return load_config(None, [f"data.root={root}", f"experiment={exp}", *BASE, *MEMBERS[exp], *extra])


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Two trained experiments (a linear stage-3 head, and an NCM head with GeM pooling, a full-data model and
    FixRes views), their weighted ensemble, and its export bundle."""
    home = tmp_path_factory.mktemp("project")
    old = Path.cwd()
    os.chdir(home)
    try:
        root = make_competition(home / "comp", {"x": 10, "y": 8, "z": 6}, size=24, n_test=10)
        for exp in MEMBERS:
            cfg = cfg_of(root, exp)
            folds_stage.run(cfg)
            train_stage.run(cfg)
            rebalance_stage.run(cfg)
            infer_stage.run(cfg)
        ens = cfg_of(root, "a", *ENSEMBLE)
        ens_stage.run(ens)
        result = export.run(ens, zip_=True)
    finally:
        os.chdir(old)
    return {"home": home, "root": root, "cfg": ens, "bundle": home / result["bundle"], "zip": home / result["zip"],
            "result": result}


def tree_state(path: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(path.rglob("*")) if p.is_file()}


def kaggle_inputs(project, where: Path) -> tuple[Path, Path, Path]:
    """A fresh folder as in a code competition: the bundle and the competition's test images and
    sample submission, read-only, and no runs/, folds/ or train images."""
    inp = where / "input"
    shutil.copytree(project["bundle"], inp / "bundle")
    (inp / "comp").mkdir(parents=True)
    shutil.copytree(project["root"] / "test", inp / "comp" / "test")
    shutil.copy(project["root"] / "sample_submission.csv", inp / "comp" / "sample_submission.csv")
    return inp / "bundle", inp / "comp" / "test", inp / "comp" / "sample_submission.csv"


def read_only(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True) + [path]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def writable(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


@pytest.mark.slow
def test_bundle_holds_only_what_inference_needs(project):
    files = sorted(p.relative_to(project["bundle"]).as_posix() for p in project["bundle"].rglob("*") if p.is_file())
    allowed = ("manifest.json", "README.md", "wheels/pipeline-", "/config.yaml", "/member.json", "/model.safetensors",
               "/head.safetensors", "/fixres.safetensors")
    assert all(any(a in f for a in allowed) for f in files), files
    assert not [f for f in files if any(t in f for t in ("last", "oof", "feature", "checkpoint", "history", ".npz"))]
    manifest = json.loads((project["bundle"] / "manifest.json").read_text())
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    assert manifest["members"] == ["a:tau", "b:ncm"] and manifest["method"] == "weighted"
    assert abs(sum(manifest["weights"].values()) - 1) < 1e-9
    # the NCM head is a file (normalised: not a linear layer), the tau head lives in the weights
    assert "members/b--ncm/fold0/head.safetensors" in files and "members/a--tau/fold0/head.safetensors" not in files
    # b: the full-data model and the FixRes copies travel too (a has neither)
    assert {"members/b--ncm/full/model.safetensors", "members/b--ncm/full/head.safetensors",
            "members/b--ncm/full/fixres.safetensors", "members/b--ncm/fold1/fixres.safetensors"} <= set(files)
    assert not [f for f in files if f.startswith("members/a--tau/") and ("full/" in f or "fixres" in f)]
    assert manifest["size_bytes"] < manifest["source_bytes"]
    with zipfile.ZipFile(project["zip"]) as z:
        assert sorted(n for n in z.namelist() if not n.endswith("/")) == files
    wheel = next((project["bundle"] / "wheels").glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        assert "pipeline/tools/predict.py" in z.namelist() and "pipeline/core/predict/inference.py" in z.namelist()


def test_weights_are_plain_timm_checkpoints_with_the_head_folded_in(project):
    import timm

    bundle = layout.BundleDir(project["bundle"])
    home = project["home"]
    net = timm.create_model("test_resnet", num_classes=3, checkpoint_path=str(bundle.member("a:tau").weights(0))).eval()
    trained = models.load_trained(load_config(home / "runs/a/config.yaml").model, home / "runs/a/fold0/model.safetensors", 3)
    tau, _ = Head.load(home / "runs/a/fold0/rebalance/heads/tau.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = tau.torch_logits(models.features(trained.eval(), x))
        assert torch.allclose(net(x), expected, atol=1e-5)
    info = json.loads(bundle.member("b:ncm").info.read_text())
    assert info["plain_timm"] is False and info["head_in_weights"] is False  # GeM; NCM


def test_predict_reproduces_stage5_offline_and_leaves_inputs_untouched(project, tmp_path, monkeypatch):
    bundle, test_dir, sample = kaggle_inputs(project, tmp_path)
    read_only(tmp_path / "input")
    before = tree_state(tmp_path / "input")
    work = tmp_path / "working"
    work.mkdir()
    monkeypatch.chdir(work)
    try:
        res = predict.run(bundle, test_dir, work / "submission.csv", sample, tmp_dir=tmp_path)
    finally:
        after = tree_state(tmp_path / "input")
        writable(tmp_path / "input")
    assert before == after
    assert sorted(p.name for p in work.iterdir()) == ["submission.csv"]
    assert not list(tmp_path.glob("pipeline-predict-*"))  # the temporary folder is gone
    home = project["home"]
    stage5 = pd.read_csv(home / "submissions/duo.csv", dtype=str)
    ours = pd.read_csv(work / "submission.csv", dtype=str)
    pd.testing.assert_frame_equal(ours, stage5)
    rec = json.loads((home / "submissions/duo.json").read_text())
    tests = [stage4_probs(RunDir(home / "runs" / m.split(":")[0]), m.split(":")[1]) for m in rec["members"]]
    for m, t in zip(rec["members"], tests):
        assert np.abs(res["members"][m] - t).max() < 1e-6
    expected = combine(tests, "weighted", np.array([rec["weights"][m] for m in rec["members"]]))
    assert np.abs(res["probs"] - expected).max() < 1e-6


@pytest.mark.slow
def test_predict_cli_from_the_zip_without_a_project(project, tmp_path):
    _, test_dir, sample = kaggle_inputs(project, tmp_path)
    zip_copy = tmp_path / "input" / "duo.zip"
    shutil.copy(project["zip"], zip_copy)
    read_only(tmp_path / "input")
    try:
        r = run_cli(["predict", "--bundle", str(zip_copy), "--test-dir", str(test_dir), "--sample-submission",
                     str(sample), "--out", str(tmp_path / "sub.csv"), "--batch-size", "3"], cwd=tmp_path)
    finally:
        writable(tmp_path / "input")
    assert r.returncode == 0, r.stderr
    assert "images/s" in r.stderr
    stage5 = pd.read_csv(project["home"] / "submissions/duo.csv", dtype=str)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "sub.csv", dtype=str), stage5)


@pytest.mark.parametrize("damage", ["corrupt", "remove", "newer", "manifest-truncated", "manifest-empty",
                                    "manifest-garbage", "manifest-wrong-type", "manifest-escaping-entry"])
def test_damaged_bundles_are_refused_naming_the_file(project, tmp_path, damage):
    bundle, test_dir, sample = kaggle_inputs(project, tmp_path)
    weights = layout.BundleDir(bundle).member("a:tau").weights(1)
    if damage == "corrupt":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
        want = f"bundle file altered: {weights}"
    elif damage == "remove":
        weights.unlink()
        want = f"bundle file missing: {weights}"
    elif damage == "newer":
        m = json.loads((bundle / "manifest.json").read_text())
        m["format"] += 1
        (bundle / "manifest.json").write_text(json.dumps(m))
        want = "newer than this one"
    elif damage == "manifest-escaping-entry":
        m = json.loads((bundle / "manifest.json").read_text())
        m["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
        (bundle / "manifest.json").write_text(json.dumps(m))
        want = "points outside the bundle"
    else:
        manifest = bundle / "manifest.json"
        text = manifest.read_bytes()
        manifest.write_bytes({"manifest-truncated": text[: len(text) // 2], "manifest-empty": b"",
                              "manifest-garbage": np.random.default_rng(0).bytes(2048),
                              "manifest-wrong-type": b"[1, 2, 3]"}[damage])
        want = f"{manifest}: not a"
    snapshot = tree_state(bundle)
    with pytest.raises(PipelineError) as e:
        predict.run(bundle, test_dir, tmp_path / "sub.csv", sample, tmp_dir=tmp_path)
    assert want in str(e.value)
    assert tree_state(bundle) == snapshot and not (tmp_path / "sub.csv").exists()


def test_test_folder_and_sample_submission_must_agree(project, tmp_path):
    bundle, test_dir, sample = kaggle_inputs(project, tmp_path)
    shutil.copy(test_dir / "t000.png", test_dir / "extra.png")
    with pytest.raises(PipelineError, match=r"image\(s\) are not in the sample submission.*extra.png"):
        predict.run(bundle, test_dir, tmp_path / "sub.csv", sample, tmp_dir=tmp_path)
    (test_dir / "extra.png").unlink()
    (test_dir / "t003.png").unlink()
    with pytest.raises(PipelineError, match="t003"):
        predict.run(bundle, test_dir, tmp_path / "sub.csv", sample, tmp_dir=tmp_path)
    assert not (tmp_path / "sub.csv").exists()
    with pytest.raises(PipelineError, match="inside"):
        predict.run(bundle, test_dir, bundle / "sub.csv", sample, tmp_dir=tmp_path)


def test_time_budget_drops_the_least_useful_views_first():
    class M:
        def __init__(self, name, policy, view_cv):
            self.name, self.policy, self.folds = name, list(policy), 2
            self.info = {"view_cv": view_cv}

        def units(self):  # two fold models
            return [(0, 1.0), (1, 1.0)]

    a = M("a:joint", ["orig@1", "hflip@1", "orig@1.25"], {"orig@1": 0.9, "hflip@1": 0.85, "orig@1.25": 0.88})
    b = M("b:joint", ["orig@1", "rot90@1"], {"orig@1": 0.8, "rot90@1": 0.7})
    costs = {m.name: {v: 0.01 for v in m.policy} for m in (a, b)}
    # 100 images x 2 folds x 0.01 s = 2 s per view; 5 views = 10 s; 6.5 s left: drop two views
    dropped = predict.fit_budget([a, b], costs, 100, 6.5, "accuracy")
    assert [d.split(" (")[0] for d in dropped] == ["b:joint rot90@1", "a:joint hflip@1"]
    assert b.policy == ["orig@1"] and a.policy == ["orig@1", "orig@1.25"]
    # never below one view per member
    predict.fit_budget([a, b], costs, 100, 0.1, "accuracy")
    assert len(a.policy) == 1 and len(b.policy) == 1 and a.policy == ["orig@1"]
    # a loss metric: the view with the highest value alone is the least useful
    c = M("c:joint", ["orig@1", "hflip@1"], {"orig@1": 0.3, "hflip@1": 0.5})
    predict.fit_budget([c], {c.name: {"orig@1": 0.01, "hflip@1": 0.01}}, 100, 3, "log_loss")
    assert c.policy == ["orig@1"]


def test_export_refuses_an_ensemble_older_than_its_members(project, tmp_path, monkeypatch):
    monkeypatch.chdir(project["home"])
    summary = project["home"] / "runs/a/infer/summary.json"
    saved = summary.read_text()
    s = json.loads(saved)
    s["made_from"]["heads"] = ["tau", "joint", "extra"]
    summary.write_text(json.dumps(s))
    try:
        with pytest.raises(PipelineError, match="re-run ./run.sh ensemble"):
            export.run(project["cfg"], out=str(tmp_path / "b"))
    finally:
        summary.write_text(saved)
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_onnx_export_matches_the_member(project, tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in requirements-lock.txt; absent here")
    monkeypatch.chdir(project["home"])
    out = export.run(project["cfg"], out=str(tmp_path / "with-onnx"), onnx=True)
    bundle = layout.BundleDir(Path(out["bundle"]))
    manifest = json.loads(bundle.manifest.read_text())
    assert "members/b--ncm/fold1/model.onnx" in manifest["files"]
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    for name in ("a:tau", "b:ncm"):
        files = bundle.member(name)
        info = json.loads(files.info.read_text())
        cfg = load_config(files.config)
        net = models.load_trained(cfg.model, files.weights(1), 3)
        head = Head.load(files.head(1))[0] if not info["head_in_weights"] else None
        with torch.no_grad():
            f = models.features(net, torch.from_numpy(x))
            want = (head.torch_logits(f) if head else net.get_classifier()(f)).numpy()
        sess = ort.InferenceSession(str(files.onnx(1)), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"image": x})[0]
        assert np.abs(got - want).max() < 1e-4, name


def test_time_budget_end_to_end_keeps_one_view_per_member_and_says_so(project, tmp_path, caplog):
    bundle, test_dir, sample = kaggle_inputs(project, tmp_path)
    with caplog.at_level("INFO", logger="pipeline"):
        res = predict.run(bundle, test_dir, tmp_path / "sub.csv", sample, time_budget=1e-4, tmp_dir=tmp_path)
    assert res["dropped"] and all(len(p) == 1 for p in res["policies"].values())
    assert "time budget" in caplog.text and "dropped" in caplog.text
    assert len(pd.read_csv(tmp_path / "sub.csv")) == 10


@pytest.mark.slow
def test_hill_climb_ensemble_exports_its_candidates_and_predict_reproduces_it(project, tmp_path, monkeypatch):
    monkeypatch.chdir(project["home"])
    cfg = cfg_of(project["root"], "a", "ensemble.members=[a,b]", "ensemble.method=hill_climb", "ensemble.name=climb",
                 "ensemble.weight_metric=metric")
    rec = ens_stage.run(cfg)
    assert rec["method"] == "hill_climb" and set(rec["members"]) <= set(rec["hill_climb"]["candidates"])
    assert any(c.endswith(":plain") for c in rec["hill_climb"]["candidates"])
    out = export.run(cfg, out=str(tmp_path / "climb"))
    manifest = json.loads((Path(out["bundle"]) / "manifest.json").read_text())
    assert manifest["members"] == rec["members"] and manifest["method"] == "hill_climb"
    for m in rec["members"]:  # a ":plain" candidate is its member without TTA
        info = json.loads((Path(out["bundle"]) / "members" / m.replace(":", "--") / "member.json").read_text())
        assert (info["policy"] == ["orig@1"]) == m.endswith(":plain")
    res = predict.run(Path(out["bundle"]), project["root"] / "test", tmp_path / "sub.csv",
                      project["root"] / "sample_submission.csv", tmp_dir=tmp_path)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "sub.csv", dtype=str),
                                  pd.read_csv("submissions/climb.csv", dtype=str))
    pool = {c["candidate"]: c["test_probs"] for c in ens_stage.candidates(cfg.ensemble.members, cfg.experiment)}
    expected = combine([pool[m] for m in rec["members"]], "weighted", np.array(list(rec["weights"].values())))
    assert np.abs(res["probs"] - expected).max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mean", "geo_mean", "rank"])
def test_predict_reproduces_stage5_exactly_for_every_method(project, tmp_path, monkeypatch, method):
    """One dtype on both sides: predict combines its members' probabilities as float32, the values stage 4 stored
    and stage 5 combined, so the ensemble's probabilities agree bit for bit (rank ties included)."""
    monkeypatch.chdir(project["home"])
    cfg = cfg_of(project["root"], "a", "ensemble.members=[a:tau,b:ncm]", f"ensemble.method={method}",
                 f"ensemble.name=m-{method}")
    rec = ens_stage.run(cfg)
    out = export.run(cfg, out=str(tmp_path / method))
    res = predict.run(Path(out["bundle"]), project["root"] / "test", tmp_path / "sub.csv",
                      project["root"] / "sample_submission.csv", tmp_dir=tmp_path)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "sub.csv", dtype=str),
                                  pd.read_csv(f"submissions/m-{method}.csv", dtype=str))
    tests = [stage4_probs(RunDir.of(m.split(":")[0]), m.split(":")[1]) for m in rec["members"]]
    assert np.array_equal(res["probs"], combine(tests, method, np.array(list(rec["weights"].values()))))
