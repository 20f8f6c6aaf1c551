"""Stage 2 on a tiny generated competition with timm's test_resnet at 32 px."""
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, cli, make_competition, run_cli
from pipeline.core.engine import training
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.nets.models import GeM, create_model, read_state_dict, write_state_dict
from pipeline.core.files.layout import RunDir
from pipeline.core.predict.stored import HeldOut
from pipeline.core.inputs.samplers import class_probs, epoch_indices
from pipeline.stages import folds as folds_stage
from pipeline.stages import train as train_stage

TINY = ["model.arch=test_resnet", "aug.img_size=32", "aug.cache=off", "train.batch_size=8", "train.epochs=2",
        "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0", "train.lr=0.01"]


def tiny_cfg(root, *extra):
    return load_config(None, [f"data.root={root}", "data.image_ext=.png", "experiment=tiny", *TINY, *extra])


def write_cfg(path, root, *extra):
    lines = [f"data.root={root}", "data.image_ext=.png", "experiment=tiny", *TINY, *extra]
    tree = {}
    for item in lines:  # a later item replaces an earlier one (a key twice in one file is an error)
        k, v = item.split("=", 1)
        sec, _, key = k.rpartition(".")
        tree.setdefault(sec, {})[key] = f"  {key}: {v}" if sec else f"{key}: {v}"
    text = "\n".join(tree.pop("", {}).values()) + "\n" + "".join(
        f"{s}:\n" + "\n".join(v.values()) + "\n" for s, v in tree.items())
    path.write_text(text)
    return path


@pytest.fixture
def comp(workdir):
    root = make_competition(workdir / "comp", {"a": 12, "b": 10, "c": 8}, size=24)
    return root


def test_one_epoch_writes_every_output_and_skips_when_done(comp, workdir):
    cfg = tiny_cfg(comp, "train.epochs=1")
    folds_stage.run(cfg)
    (s0, s1) = train_stage.run(cfg)
    for k in (0, 1):
        fd = cfg.run_dir.fold(k).dir
        for name in ("model.safetensors", "oof.npz", "history.csv", "last.pt", "summary.json"):
            assert (fd / name).exists(), name
        h = pd.read_csv(fd / "history.csv")
        assert {"lr", "train_loss", "valid_loss", "accuracy", "macro_f1", "balanced_accuracy", "many_acc",
                "medium_acc", "few_acc", "ema_score", "images_per_s", "seconds"} <= set(h.columns)
        oof = np.load(fd / "oof.npz")
        folds = pd.read_csv(cfg.folds_csv)
        assert oof["ids"].tolist() == folds.loc[folds["fold"] == k, "id"].tolist()   # keyed by image id
        assert oof["feats"].shape[0] == len(oof["ids"]) and oof["weight"].shape == (3, oof["feats"].shape[1])
        assert "logits" not in oof  # #35: D numbers per row, not C (the logits: HeldOut's, features x classifier)
        logits = HeldOut.of(cfg.run_dir, k).read()["logits"]
        assert logits.shape == (len(oof["ids"]), 3)
        assert np.allclose(logits, oof["feats"] @ oof["weight"].T + oof["bias"], atol=1e-5)
        sd = read_state_dict(fd / "model.safetensors")
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in sd)
    assert (cfg.run_dir.dir / "config.yaml").exists() and (cfg.run_dir.dir / "classes.json").read_text().count('"') == 6
    mtime = (cfg.run_dir.fold(0).dir / "summary.json").stat().st_mtime_ns
    train_stage.run(cfg)                                           # done: skipped
    assert (cfg.run_dir.fold(0).dir / "summary.json").stat().st_mtime_ns == mtime
    changed = tiny_cfg(comp, "train.epochs=1", "train.lr=0.5")
    assert train_stage.status(changed) == ["fold 0: changed train.lr", "fold 1: changed train.lr"]
    train_stage.run(changed, fold=1)                               # stale: retrained, fold 0 untouched
    assert "0.5" in str(pd.read_json(cfg.run_dir.fold(1).dir / "summary.json", typ="series")["made_from"]["train"]["lr"])
    assert (cfg.run_dir.fold(0).dir / "summary.json").stat().st_mtime_ns == mtime
    assert train_stage.status(changed) == ["fold 0: changed train.lr"]


def test_select_last_keeps_the_fixed_source_and_best_is_marked_as_chosen_on_held_out_rows(comp, workdir):
    from pipeline.core.files.provenance import up_to_date
    from pipeline.core.files.units import experiment_units
    from pipeline.tools.reports.leaderboard import build, rank

    cfg = tiny_cfg(comp, "train.epochs=2", "train.ema_decay=0.5")       # the default: select=last, EMA on
    folds_stage.run(cfg)
    s = train_stage.run(cfg, fold=0)[0]
    fd = cfg.run_dir.fold(0)
    hist = pd.read_csv(fd.history)
    # the EMA weights of the last epoch, whichever source scored better on the held-out rows
    assert s["chosen"] == "ema" and s["epoch"] == 2 and s["chosen_on_held_out"] == []
    assert np.isclose(s["score"], hist["ema_score"].iloc[-1])
    assert not fd.best("raw").exists() and not fd.best("ema").exists()   # one copy of the chosen weights
    assert not fd.oof_of("ema").exists() and fd.oof.exists() and fd.weights.exists()   # and of their OOF logits
    # an output of the older rule (last epoch, the better of raw and EMA) is stale for the fixed rule
    old = experiment_units(cfg).record("weights0")
    old["train"]["select"] = "last"
    summary = pd.read_json(fd.summary, typ="series").to_dict()
    fd.summary.write_text(pd.Series({**summary, "made_from": old}).to_json())
    assert not up_to_date(fd.summary, experiment_units(cfg).record("weights0"))
    assert any("train.select" in r for r in train_stage.status(cfg))

    best = tiny_cfg(comp, "train.epochs=2", "train.select=best", "train.ema=false")
    assert train_stage.run(best, fold=0)[0]["chosen_on_held_out"] == ["epoch"]
    train_stage.run(best, fold=1)
    rows = rank(build(workdir / "runs"))
    assert rows["note"].str.contains("stage 2 chose epoch on the scored rows: CV optimistic").all()


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(workdir):
    results = {}
    for name, fault in (("clean", None), ("killed", "train:mid-epoch:1")):
        d = workdir / name
        d.mkdir()
        root = make_competition(d / "comp", {"a": 12, "b": 10, "c": 8}, size=24)
        cfgfile = write_cfg(d / "c.yaml", root, "train.workers=1", "train.mixup_alpha=0.4", "train.epochs=3",
                            "model.drop_rate=0.2")
        assert cli(["folds", "--config", str(cfgfile)], d).returncode == 0
        if fault:  # a real process to kill; everything else in this one
            r = run_cli(["train", "--config", str(cfgfile), "--fold", "0"], d, env={"PIPELINE_FAULT": fault})
            assert r.returncode == -9                                  # SIGKILLed mid-epoch 2
            assert not (d / "runs/tiny/fold0/summary.json").exists()
            assert (d / "runs/tiny/fold0/last.pt").exists()
        r = cli(["train", "--config", str(cfgfile), "--fold", "0"], d)
        assert r.returncode == 0, r.stderr
        if fault:
            assert "resuming" in r.stderr
        results[name] = d / "runs/tiny/fold0"
    a, b = results["clean"], results["killed"]
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert np.array_equal(np.load(a / "oof.npz")["feats"], np.load(b / "oof.npz")["feats"])
    ha, hb = pd.read_csv(a / "history.csv"), pd.read_csv(b / "history.csv")
    assert np.array_equal(ha["train_loss"], hb["train_loss"])


def test_mixup_targets_sum_to_one_and_mix_images():
    cfg = load_config(None, ["train.mixup_alpha=0.4", "train.cutmix_alpha=1.0", "train.label_smoothing=0.1"])
    mix = training.build_mixup(cfg.train, 5)
    torch.manual_seed(0)
    np.random.seed(0)
    x = torch.rand(8, 3, 16, 16)
    y = torch.arange(8) % 5
    x2, t = mix(x.clone(), y)
    assert t.shape == (8, 5) and torch.allclose(t.sum(1), torch.ones(8))
    assert not torch.equal(x2, x)
    assert training.build_mixup(load_config(None).train, 5) is None
    with pytest.raises(PipelineError, match="even"):
        training.build_mixup(load_config(None, ["train.mixup_alpha=1", "train.batch_size=7"]).train, 5)


@pytest.mark.parametrize("kind", ["instance", "class_balanced", "sqrt", "progressive"])
def test_sampler_class_distribution_matches_definition(kind):
    counts = np.array([400, 100, 25, 5])
    labels = np.repeat(np.arange(4), counts)
    epochs = 5
    for epoch in (0, epochs - 1):
        drawn = np.concatenate([labels[epoch_indices(kind, labels, 4, seed=s, epoch=epoch, epochs=epochs)]
                                for s in range(20)])
        freq = np.bincount(drawn, minlength=4) / len(drawn)
        expected = {"instance": counts / counts.sum(),
                    "class_balanced": np.full(4, 0.25),
                    "sqrt": np.sqrt(counts) / np.sqrt(counts).sum()}.get(kind)
        if kind == "progressive":
            expected = counts / counts.sum() if epoch == 0 else np.full(4, 0.25)
        assert np.allclose(freq, expected, atol=0.015), (kind, epoch, freq, expected)
        assert np.allclose(class_probs(kind, counts, epoch, epochs), expected)
    a = epoch_indices(kind, labels, 4, seed=1, epoch=2, epochs=epochs)
    assert np.array_equal(a, epoch_indices(kind, labels, 4, seed=1, epoch=2, epochs=epochs))  # replayable
    if kind == "instance":
        assert sorted(a) == list(range(len(labels)))                     # a plain permutation


def test_local_pretrained_checkpoint_loads(tmp_path):
    src = create_model(load_config(None, ["model.arch=test_resnet"]).model, num_classes=1000)
    write_state_dict(tmp_path / "w.safetensors", src.state_dict())
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        cfg = load_config(None, ["model.arch=test_resnet", f"model.pretrained_path={tmp_path / name}"])
        m = create_model(cfg.model, num_classes=4)
        assert torch.equal(m.conv1.weight if hasattr(m, "conv1") and isinstance(m.conv1, torch.nn.Conv2d)
                           else next(m.parameters()), next(src.parameters()))
        assert m.get_classifier().out_features == 4                      # new head for our classes
    other = create_model(load_config(None, ["model.arch=resnet10t"]).model, num_classes=4)
    write_state_dict(tmp_path / "other.safetensors", other.state_dict())
    with pytest.raises(PipelineError, match="other.safetensors"):
        create_model(load_config(None, ["model.arch=test_resnet", f"model.pretrained_path={tmp_path / 'other.safetensors'}"]).model, 4)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARK', '/tmp/pipeline-evil-mark')}",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(PipelineError, match="not a checkpoint this pipeline reads.*never unpickled"):
        read_state_dict(tmp_path / "evil.pth")
    assert not mark.exists()


def test_gem_equals_average_pooling_at_p1_and_plugs_into_timm():
    x = torch.rand(2, 5, 7, 7)
    assert torch.allclose(GeM(p=1.0)(x), x.mean((2, 3)), atol=1e-6)
    assert torch.all(GeM(p=6.0)(x) > x.mean((2, 3)))                   # towards max pooling
    m = create_model(load_config(None, ["model.arch=test_resnet", "model.pool=gem"]).model, num_classes=3)
    assert any(isinstance(mod, GeM) for mod in m.modules())
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_non_finite_loss_stops_with_epoch_and_step(comp, monkeypatch):
    cfg = tiny_cfg(comp, "train.epochs=2", "train.ema=false")
    folds_stage.run(cfg)
    monkeypatch.setenv("PIPELINE_FAULT", "nan-loss:0")  # a diverged step (train.lr is bounded by the config)
    with pytest.raises(PipelineError, match=r"non-finite (loss|outputs) at epoch 1, (step \d+|validation)"):
        train_stage.run(cfg, fold=0)
    assert not (cfg.run_dir.fold(0).dir / "summary.json").exists()


def assert_same_weights(path_a, path_b) -> None:
    """The same tensors within float tolerance (DDP's reduction order differs from one process's sum)."""
    a, b = read_state_dict(path_a), read_state_dict(path_b)
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), k


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_single_process(workdir):
    root = make_competition(workdir / "comp", {"a": 12, "b": 10, "c": 8}, size=24)
    # a LayerNorm model: on CPU, BatchNorm statistics are per process (SyncBatchNorm is GPU-only)
    common = ("model.arch=test_convnext", "train.ema=false", "train.amp=off")  # equivalence holds in fp32 math
    single = write_cfg(workdir / "single.yaml", root, "train.batch_size=8", "experiment=single", *common)
    ddp = write_cfg(workdir / "ddp.yaml", root, "train.batch_size=4", "experiment=ddp", *common)
    assert cli(["folds", "--config", str(single)], workdir).returncode == 0
    assert cli(["train", "--config", str(single), "--fold", "0"], workdir).returncode == 0
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                        "-m", "pipeline", "train", "--config", str(ddp), "--fold", "0"],
                       cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(workdir / "runs/single/fold0/model.safetensors", workdir / "runs/ddp/fold0/model.safetensors")
    la = HeldOut.of(RunDir(workdir / "runs/single"), 0).read()["logits"]
    lb = HeldOut.of(RunDir(workdir / "runs/ddp"), 0).read()["logits"]
    assert np.allclose(la, lb, atol=1e-3)


def test_tracker_logs_each_epoch_and_is_optional(comp, workdir, monkeypatch, caplog):
    import types

    calls = []
    fake = types.ModuleType("mlflow")
    fake.set_tracking_uri = lambda uri: calls.append(("uri", uri))
    fake.set_experiment = lambda name: calls.append(("experiment", name))
    fake.start_run = lambda run_name: calls.append(("start", run_name))
    fake.log_params = lambda p: calls.append(("params", p))
    fake.log_metrics = lambda m, step: calls.append(("metrics", step, m))
    fake.end_run = lambda: calls.append(("end",))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    cfg = tiny_cfg(comp, "train.epochs=2", "train.tracker=mlflow")
    folds_stage.run(cfg)
    train_stage.run(cfg, fold=0)
    metrics = [c for c in calls if c[0] == "metrics"]
    assert [m[1] for m in metrics] == [1, 2] and {"train_loss", "valid_loss", "lr"} <= set(metrics[0][2])
    assert calls[0] == ("uri", (workdir / "runs" / "tiny" / "tracking").resolve().as_uri())
    assert ("start", "fold0") in calls and calls[-1] == ("end",)
    assert dict(c for c in calls if c[0] == "params")["params"]["train.epochs"] == "2"
    # the tracker is not part of what the weights depend on: switching it does not make the fold stale
    assert train_stage.status(tiny_cfg(comp, "train.epochs=2"))[0].startswith("fold 1")
    # tensorboard chosen but not installed: one warning, training goes on
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    caplog.set_level("WARNING", logger="pipeline")
    train_stage.run(tiny_cfg(comp, "train.epochs=1", "train.tracker=tensorboard"), fold=1)
    assert "train.tracker=tensorboard but it is not installed" in caplog.text
    assert (cfg.run_dir.fold(1).dir / "summary.json").exists()


# ----------------------------------------------------------------------------- fine-tuning controls
def test_layer_decay_uses_timm_groups_and_the_scheduler_applies_them(comp):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    cfg = tiny_cfg(comp, "train.layer_decay=0.5", "train.backbone_lr_mult=0.1", "train.warmup_epochs=0")
    model = create_model(cfg.model, 3)
    groups = training.param_groups(model, cfg.train)
    head = {id(p) for p in model.get_classifier().parameters()}
    head_scales = {g["lr_scale"] for g in groups if all(id(p) in head for p in g["params"])}
    body_scales = sorted({round(g["lr_scale"], 12) for g in groups if not any(id(p) in head for p in g["params"])})
    assert head_scales == {1.0}
    # backbone layers: 0.1 x 0.5^k, one k per layer group below the head (test_resnet: stem + 4 stages)
    ks = [round(np.log(s / 0.1) / np.log(0.5), 6) for s in body_scales]
    assert all(k == int(k) and k >= 1 for k in ks) and len(ks) >= 4
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
    opt = create_optimizer_v2(groups, opt="adamw", lr=cfg.train.lr, weight_decay=0.05)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=2, warmup_epochs=0, step_on_epochs=False,
                                   updates_per_epoch=5)
    sched.step_update(0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(cfg.train.lr * g["lr_scale"])


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_frozen_epochs_train_the_classifier_only(comp, freeze_bn):
    from pipeline.core.inputs.data import read_folds
    from pipeline.core.engine.distributed import Dist

    cfg = tiny_cfg(comp, "train.freeze_epochs=1", f"train.freeze_bn={str(freeze_bn).lower()}", "train.ema=false")
    folds_stage.run(cfg)
    df, classes = read_folds(cfg.folds_name)
    r = train_stage.set_up(train_stage.Job.of(cfg), df, len(classes), 0, Dist())
    head = {id(p) for p in r.nets.model.get_classifier().parameters()}
    params = lambda: {n: p.detach().clone() for n, p in r.nets.model.named_parameters()}  # noqa: E731
    bn = lambda: {n: b.clone() for n, b in r.nets.model.named_buffers() if "running" in n}  # noqa: E731
    p0, b0 = params(), bn()
    train_stage.train_epoch(r, 0)
    p1, b1 = params(), bn()
    names = dict(r.nets.model.named_parameters())
    assert all(torch.equal(p0[n], p1[n]) for n in p0 if id(names[n]) not in head)       # backbone frozen
    assert any(not torch.equal(p0[n], p1[n]) for n in p0 if id(names[n]) in head)        # the head learned
    assert all(torch.equal(b0[n], b1[n]) for n in b0) is freeze_bn                        # BN stats as asked
    train_stage.train_epoch(r, 1)
    assert any(not torch.equal(p1[n], p) for n, p in params().items() if id(names[n]) not in head)


@pytest.mark.parametrize("bn_stats", ["batch", "frozen"])
def test_bn_stats_frozen_keeps_running_statistics_for_the_whole_run(comp, bn_stats):
    """train.bn_stats=frozen: every epoch normalises with the running statistics (unchanged), while the backbone's
    weights, BatchNorm's affine ones included, still train; batch: the statistics move."""
    from pipeline.core.inputs.data import read_folds
    from pipeline.core.engine.distributed import Dist

    cfg = tiny_cfg(comp, f"train.bn_stats={bn_stats}", "train.ema=false")
    folds_stage.run(cfg)
    df, classes = read_folds(cfg.folds_name)
    r = train_stage.set_up(train_stage.Job.of(cfg), df, len(classes), 0, Dist())
    bn = lambda: {n: b.clone() for n, b in r.nets.model.named_buffers() if "running" in n}  # noqa: E731
    affine = lambda: {n: p.detach().clone() for n, p in r.nets.model.named_parameters() if "bn" in n}  # noqa: E731
    b0, a0 = bn(), affine()
    assert b0 and a0
    for epoch in range(2):
        train_stage.train_epoch(r, epoch)
    assert all(torch.equal(b0[n], b) for n, b in bn().items()) is (bn_stats == "frozen")
    assert any(not torch.equal(a0[n], a) for n, a in affine().items())


def test_patience_stops_the_fold_and_the_summary_says_when(comp, monkeypatch):
    cfg = tiny_cfg(comp, "train.epochs=5", "train.patience=2", "train.ema=false")
    folds_stage.run(cfg)
    real = train_stage.better
    monkeypatch.setattr(train_stage, "better", lambda a, b, metric: b is None)  # only epoch 1 is ever "better"
    s = train_stage.run(cfg, fold=0)[0]
    # select=last keeps the last trained epoch; stopping there is itself a choice made on the held-out rows
    assert s["epoch"] == 3 and s["epochs_trained"] == 3 and s["stopped_early_after"] == 3
    assert s["chosen_on_held_out"] == ["early stop (patience 2)"]
    hist = pd.read_csv(cfg.run_dir.fold(0).dir / "history.csv")
    assert list(hist["epoch"]) == [1, 2, 3]
    monkeypatch.setattr(train_stage, "better", real)
    s = train_stage.run(tiny_cfg(comp, "train.epochs=2", "train.ema=false"), fold=1)[0]
    assert s["stopped_early_after"] is None and s["epochs_trained"] == 2 and s["chosen_on_held_out"] == []


def test_progressive_resizing_follows_the_schedule_and_validation_stays(comp):
    from pipeline.core.inputs.data import read_folds
    from pipeline.core.engine.distributed import Dist

    with pytest.raises(PipelineError, match="aug.size_schedule"):
        tiny_cfg(comp, "aug.size_schedule=[[1, 16], [0, 32]]")
    cfg = tiny_cfg(comp, "aug.size_schedule=[[0, 16], [2, 24], [3, 32]]", "train.epochs=4", "train.workers=1")
    folds_stage.run(cfg)
    df, classes = read_folds(cfg.folds_name)
    r = train_stage.set_up(train_stage.Job.of(cfg), df, len(classes), 0, Dist())
    ds = r.data.train_loader.dataset
    assert [ds[(0, e)][0].shape[0] for e in range(5)] == [16, 16, 24, 32, 32]
    for epoch, side in ((0, 16), (2, 24)):      # through the real loader (a worker process), a whole batch
        r.data.batches.set_epoch(epoch)
        x, _ = next(iter(r.data.train_loader))
        assert tuple(x.shape[1:3]) == (side, side)
    x, _ = next(iter(r.data.valid_loader))
    assert tuple(x.shape[1:3]) == (32, 32)
    s = train_stage.run(cfg, fold=0)[0]
    assert s["img_size"] == 32 and s["epochs_trained"] == 4


def test_lr_find_suggests_a_rate_on_the_falling_part_of_its_curve(comp, workdir):
    from pipeline.cli import main
    from pipeline.tools import lr_find

    cfg = tiny_cfg(comp, "train.batch_size=4", "aug.img_size=16")
    folds_stage.run(cfg)
    out = lr_find.run(cfg, fold=0, steps=60)
    lrs, sm, lr = out["lrs"], out["smoothed"], out["suggestion"]
    i, low = int(np.searchsorted(lrs, lr)), int(np.argmin(sm))
    assert lrs[0] == pytest.approx(1e-7) and np.all(np.diff(lrs) > 0)
    assert i < low and sm[i + 1] < sm[i] and sm[low] < sm[0]          # falling, before the minimum
    assert (workdir / "reports/tiny/lr_find.png").stat().st_size > 1000
    assert len(pd.read_csv(workdir / "reports/tiny/lr_find.csv")) == len(lrs)
    assert not (workdir / "runs").exists()
    assert main(["lr-find", "--steps", "2"]) == 2


@pytest.mark.slow
def test_two_nodes_on_one_machine_under_torchrun_c10d_match_one_process(workdir):
    """#49 item 3: stage 2 of one fold under torchrun with --nnodes 2 --nproc-per-node 1 and the c10d rendezvous on
    127.0.0.1 (two launcher processes, as two machines would start them; gloo), the same weights as one process with
    the global batch (LayerNorm model, fp32: the DDP test's equivalence)."""
    root = make_competition(workdir / "comp", {"a": 12, "b": 10, "c": 8}, size=24)
    common = ("model.arch=test_convnext", "train.ema=false", "train.amp=off")
    single = write_cfg(workdir / "single.yaml", root, "train.batch_size=8", "experiment=single", *common)
    nodes = write_cfg(workdir / "nodes.yaml", root, "train.batch_size=4", "experiment=nodes", *common)
    assert cli(["folds", "--config", str(single)], workdir).returncode == 0
    assert cli(["train", "--config", str(single), "--fold", "0"], workdir).returncode == 0
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
              "-m", "pipeline", "train", "--config", str(nodes), "--fold", "0"]
    procs = [subprocess.Popen(launch, cwd=workdir, env=dict(env, PIPELINE_HOSTNAME=f"node-{i}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert_same_weights(workdir / "runs/single/fold0/model.safetensors", workdir / "runs/nodes/fold0/model.safetensors")


@pytest.mark.slow
def test_folds_spread_over_two_hosts_and_a_dead_host_s_fold_is_taken_over_after_the_stale_time(workdir, monkeypatch):
    """#49 item 3: two "hosts" (processes with their own PIPELINE_HOSTNAME) sharing the project folder each train a
    fold at the same time; a host killed mid-fold leaves its lock, which another host refuses while it is fresh and
    takes over once stale (shortened here), resuming from the dead host's checkpoint."""
    root = make_competition(workdir / "comp", {"a": 10, "b": 10, "c": 8}, size=16)
    cfg = write_cfg(workdir / "c.yaml", root, "train.epochs=40", "train.ema=false")
    assert cli(["folds", "--config", str(cfg)], workdir).returncode == 0
    env = dict(os.environ, PYTHONPATH=str(REPO), PIPELINE_LOCK_HEARTBEAT_S="0.2")
    train = [sys.executable, "-m", "pipeline", "train", "--config", str(cfg), "--fold"]
    a = subprocess.Popen([*train, "0"], cwd=workdir, env=dict(env, PIPELINE_HOSTNAME="node-a"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = workdir / "runs/tiny/fold0/last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and a.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    b = subprocess.Popen([*train, "1"], cwd=workdir, env=dict(env, PIPELINE_HOSTNAME="node-b"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fold 1 on the other host
    assert ckpt.exists() and a.poll() is None, "node-a finished fold 0 before it could be killed"
    a.send_signal(signal.SIGKILL)  # the host dies mid-fold: no clean-up, its lock stays
    a.wait()
    killed = time.time()
    assert (workdir / "runs/tiny/fold0/.lock").exists() and not (workdir / "runs/tiny/fold0/summary.json").exists()
    monkeypatch.setenv("PIPELINE_HOSTNAME", "node-c")
    monkeypatch.setenv("PIPELINE_LOCK_STALE_S", "8")
    r = cli(["train", "--config", str(cfg), "--fold", "0"], workdir)
    assert time.time() - killed < 8, "too slow to see the lock while it is fresh"
    assert r.returncode != 0 and "node-a" in r.stderr  # its heartbeat stopped under 8 s ago: still node-a's
    assert b.wait(timeout=300) == 0, b.stderr.read()[-2000:]
    time.sleep(max(0.0, killed + 9 - time.time()))
    r = cli(["train", "--config", str(cfg), "--fold", "0"], workdir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resum" in r.stderr  # from node-a's checkpoint, not from scratch
    for k in (0, 1):
        assert (workdir / f"runs/tiny/fold{k}/summary.json").exists()
