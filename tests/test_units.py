"""The units engine (core/files/units, #46): the declarations are what the stages write, and the engine derives
status, waits, refusals, the order and what `clean` removes from them alone."""
import argparse
import json
import os
import sys
from pathlib import Path

import pytest

from conftest import make_competition
from pipeline import cli
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.files.artifacts import recorded
from pipeline.core.files.units import Unit, Units, experiment_units, kept
from pipeline.stages import ensemble, folds, infer, rebalance, train

from test_probe import pretrained  # noqa: F401  (fixture)

BASE = ["data.image_ext=.png", "model.arch=test_resnet", "aug.img_size=32", "aug.cache=off", "train.batch_size=8",
        "train.epochs=1", "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0", "rebalance.crt_epochs=2",
        "rebalance.lws_epochs=2", "infer.views=[orig]", "infer.heads=[best]", "experiment=un"]


def opened_during(run) -> list[Path]:
    """The files `run()` opens for reading through Python (numpy, json, torch; not safetensors' own reader),
    relative to the working folder as the layout's paths are: an audit hook, inert once run() returns."""
    seen, on = [], [True]

    def hook(event, args):
        if not on[0] or event != "open" or len(args) != 3:  # installed for the process: inert for anything else
            return
        path, mode, flags = args
        reading = ("r" in mode and not set("wax+") & set(mode)) if isinstance(mode, str) else \
            not (flags or 0) & (os.O_WRONLY | os.O_RDWR)
        if reading and isinstance(path, (str, os.PathLike)):
            f = Path(os.path.abspath(os.fsdecode(path)))
            seen.append(f.relative_to(Path.cwd()) if f.is_relative_to(Path.cwd()) else f)
    sys.addaudithook(hook)
    try:
        run()
    finally:
        on[0] = False
    return seen


def write(path, rec):
    path.write_text(json.dumps({"made_from": rec}))


def toy(tmp_path, recs: dict) -> Units:
    """a (stage 1) -> b, c (stage 2; c reads b) -> d (stage 3, reads c); each made with `recs[key]`."""
    spec = {"a": ("1", ()), "b": ("2", ("a",)), "c": ("2", ("b",)), "d": ("3", ("c",))}
    return Units([Unit(k, k, stage, tmp_path / f"{k}.json", (lambda k=k: {"v": recs[k]}), deps, f"the {k} file",
                       f"remake {k}", f"{k} is not made") for k, (stage, deps) in spec.items()])


def test_the_engine_orders_waits_and_refuses_from_the_declarations(tmp_path):
    recs = {"a": 1, "b": 1, "c": 1, "d": 1}
    units = toy(tmp_path, recs)
    assert units.order() == ["a", "b", "c", "d"]
    assert units.status("1") == ["a: not run"]
    assert units.status("2") == ["b: waits for a (stage 1)", "c: waits for b (stage 2)"]
    with pytest.raises(PipelineError, match="c is not made"):
        units.require("c")
    for k in "abcd":
        write(tmp_path / f"{k}.json", {"v": 1})
    assert all(units.status(s) == [] for s in "123") and units.require("d") == {"made_from": {"v": 1}}
    recs["b"] = 2  # b's settings changed: b is stale, c (same stage) waits for it, d (stage 3) refuses its input
    assert units.status("2") == ["b: changed v", "c: waits for b (stage 2)"]
    with pytest.raises(PipelineError, match="c is not made"):  # c's stage remakes b first: c counts as not made
        units.require("c")
    recs["b"], recs["c"] = 1, 2
    with pytest.raises(PipelineError, match=r"c.json \(the c file\) is stale.*changed: v.*remake c"):
        units.status("3")
    units.allow_stale = True  # --allow-stale: warned, and d's own record decides
    assert units.status("3") == []
    with pytest.raises(ValueError, match="cycle"):
        Units([Unit("x", "x", "1", tmp_path / "x", dict, ("y",)), Unit("y", "y", "1", tmp_path / "y", dict, ("x",))])
    with pytest.raises(ValueError, match="unknown deps"):
        Units([Unit("x", "x", "1", tmp_path / "x", dict, ("nothing",))])


@pytest.mark.slow
def test_each_declared_record_is_the_one_its_stage_writes(workdir, monkeypatch, pretrained):  # noqa: F811
    """After stages 1-5, every unit's output exists and holds exactly the record its declaration computes (a stage
    that changed what it records without its declaration fails here; the stage-internal caches and stage 5 too:
    each stage writes the record its unit gives it), every stage's status is empty, and stage 4 reads exactly the
    units it declares."""
    root = make_competition(workdir / "comp", {"a": 8, "b": 6, "c": 6}, size=24, n_test=6)
    cfg = load_config(None, [f"data.root={root}", *BASE, "train.full_fit=true", f"model.pretrained_path={pretrained}",
                             "rebalance.probe=[joint]", "infer.fixres.size=1.25", "infer.fixres.epochs=1"])
    for mod in (folds, train, rebalance, infer, ensemble):
        mod.run(cfg)
    units = experiment_units(cfg)
    caches = {"features_fold0", "features_fold1", "features_full", "probe_features", "fixres_fold0", "fixres_fold1",
              "fixres_full"}
    assert set(units.order()) == {"folds", "weights0", "weights1", "weights_full", "heads0", "heads1", "report",
                                  "heads_full", "infer", "ensemble", *caches}
    assert {k for k in units.order() if units[k].cache} == caches
    assert units.order().index("weights_full") > units.order().index("weights1")
    for key in units.order():
        assert recorded(units[key].out) == units[key].record(), key
    assert [mod.status(cfg) for mod in (folds, train, rebalance, infer, ensemble)] == [[]] * 5
    made = []
    monkeypatch.setattr(infer, "experiment_units", lambda c: made.append(experiment_units(c)) or made[-1])
    infer.run(cfg, force=True)  # stage 4 asks for exactly the units it declares, no fewer, no more
    assert made[0].read == {"infer": set(units["infer"].deps)}
    monkeypatch.setattr(rebalance, "experiment_units", lambda c: made.append(experiment_units(c)) or made[-1])
    rebalance.run(cfg, force=True)  # stage 3: each fold's weights for its heads, the full model's for its heads
    assert made[1].read == {"heads0": {"weights0"}, "heads1": {"weights1"}, "heads_full": {"weights_full"}}
    monkeypatch.setattr(train, "experiment_units", lambda c: made.append(experiment_units(c)) or made[-1])
    train.run(cfg)  # stage 2 asks for the folds file it trains on (each fold), even when every fold is current
    assert made[2].read == {"weights0": {"folds"}, "weights1": {"folds"}}
    monkeypatch.setattr(ensemble, "experiment_units", lambda c: made.append(experiment_units(c)) or made[-1])
    ensemble.run(cfg, force=True)  # stage 5: the experiment's own predictions (a member)
    assert made[3].read == {"ensemble": {"infer"}} and units["ensemble"].deps == ("infer",)
    for mod, stage in ((rebalance, "3"), (infer, "4"), (ensemble, "5")):  # every file a stage opens under the
        allowed = {k for k in units.order() if units[k].stage == stage}  # experiment's folder is an output of one
        while {d for k in allowed for d in units[k].deps} - allowed:  # of its units or of a unit they declare (or
            allowed |= {d for k in allowed for d in units[k].deps}  # that those declare: stage 4's manifest points
        opened = opened_during(lambda: mod.run(cfg, force=True))
        mine = [f for f in opened if f.is_relative_to(cfg.run_dir.dir) and not kept(cfg.run_dir, f)]
        assert mine and not {str(f): units.owner(f) for f in mine if units.owner(f) not in allowed}, stage
    with pytest.raises(ValueError, match="unit weights0 reads heads0, which it does not declare"):
        units.require("heads0", by="weights0")
    other = load_config(None, [f"data.root={root}", *BASE, "train.full_fit=true", f"model.pretrained_path={pretrained}",
                               "rebalance.probe=[joint]", "infer.fixres.size=1.25", "infer.fixres.epochs=1",
                               "rebalance.crt_epochs=3"])
    assert rebalance.status(other) == ["fold 0: changed rebalance.crt_epochs", "fold 1: changed rebalance.crt_epochs",
                                       "report: waits for fold 0 (stage 3), fold 1 (stage 3)",
                                       "full fit: waits for fold 0 (stage 3), fold 1 (stage 3)"]
    with pytest.raises(PipelineError, match=r"fold0/rebalance/summary.json \(the fold's rebalanced heads\) is stale"):
        infer.status(other)  # stage 4 asks stage 3's unit, and refuses its stale input
    # cleaning from the same declarations: a finished fold's resume checkpoint is no unit's output
    run = cfg.run_dir
    assert {str(p.relative_to(run.dir)) for p in units.unowned(run)} == {"fold0/last.pt", "fold1/last.pt",
                                                                         "full/last.pt"}
    fewer = load_config(None, [f"data.root={root}", *BASE, "train.full_fit=true", f"model.pretrained_path={pretrained}",
                               "rebalance.probe=[joint]", "rebalance.variants=[joint,ncm]"])
    gone = {str(p.relative_to(run.dir)) for p in experiment_units(fewer).unowned(run)}
    assert {"fold0/rebalance/heads/crt.safetensors", "fold0/rebalance/heads/crt.inner1.safetensors",
            "fold1/rebalance/oof_crt.npz", "full/rebalance/heads/crt.safetensors", "infer/fixres/fold0.safetensors",
            "infer/fixres/full.json", "fold0/last.pt"} <= gone
    assert not [g for g in gone if "ncm" in g or "joint" in g or "features" in g or g.endswith(("model.safetensors",
                                                                                                "summary.json"))]
    assert cli.cmd_clean(argparse.Namespace(yes=True), fewer) == 0
    assert experiment_units(fewer).unowned(run) == [] and not run.fixres("fold0").parent.exists()
    assert train.status(fewer) == [] and train.status(cfg) == []  # what stage 2 reads was kept
    assert rebalance.status(fewer) == ["fold 0: changed rebalance.variants", "fold 1: changed rebalance.variants",
                                       "report: waits for fold 0 (stage 3), fold 1 (stage 3)",
                                       "full fit: waits for fold 0 (stage 3), fold 1 (stage 3)"]


def test_stage_2_refuses_a_folds_file_made_from_another_train_table(workdir, caplog):
    """A label changed in train.csv after stage 1: the folds file (which holds the labels stage 2 trains on) is a
    stale input of every fold, refused naming it before anything trains; --allow-stale warns and proceeds."""
    root = make_competition(workdir / "comp", {"a": 8, "b": 6}, size=16, n_test=4)
    cfg = load_config(None, [f"data.root={root}", *BASE])
    folds.run(cfg)
    table = (root / "train.csv").read_text().replace("img0000,a", "img0000,b")
    (root / "train.csv").write_text(table)
    with pytest.raises(PipelineError, match=r"folds/.*\.json \(the folds file\) is stale.*changed: table.*folds --force"):
        train.run(cfg)
    assert not cfg.run_dir.fold(0).summary.exists() and not cfg.run_dir.fold(0).checkpoint.exists()
    units = experiment_units(cfg)
    units.allow_stale = True
    units.require("folds", "weights0")  # warned, not refused
    assert "stale" in caplog.text
