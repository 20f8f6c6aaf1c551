"""The units engine (core/files/units, #46): the declarations are what the stages write, and the engine derives
status, waits, refusals and the order from them alone."""
import json

import pytest

from conftest import make_competition
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.files.artifacts import recorded
from pipeline.core.files.units import Unit, Units, experiment_units
from pipeline.stages import ensemble, folds, infer, rebalance, train

BASE = ["data.image_ext=.png", "model.arch=test_resnet", "aug.img_size=32", "aug.cache=off", "train.batch_size=8",
        "train.epochs=1", "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0", "rebalance.crt_epochs=2",
        "rebalance.lws_epochs=2", "infer.views=[orig]", "infer.heads=[best]", "experiment=un"]


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
def test_each_declared_record_is_the_one_its_stage_writes(workdir, monkeypatch):
    """After stages 1-5, every unit's output exists and holds exactly the record its declaration computes (a stage
    that changed what it records without its declaration fails here), every stage's status is empty, and stage 4
    reads exactly the units it declares."""
    root = make_competition(workdir / "comp", {"a": 8, "b": 6, "c": 6}, size=24, n_test=6)
    cfg = load_config(None, [f"data.root={root}", *BASE, "train.full_fit=true"])
    for mod in (folds, train, rebalance, infer, ensemble):
        mod.run(cfg)
    units = experiment_units(cfg)
    assert set(units.order()) == {"folds", "weights0", "weights1", "weights_full", "heads0", "heads1", "report",
                                  "heads_full", "infer"}
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
    with pytest.raises(ValueError, match="unit weights0 reads heads0, which it does not declare"):
        units.require("heads0", by="weights0")
    other = load_config(None, [f"data.root={root}", *BASE, "train.full_fit=true", "rebalance.crt_epochs=3"])
    assert rebalance.status(other) == ["fold 0: changed rebalance.crt_epochs", "fold 1: changed rebalance.crt_epochs",
                                       "report: waits for fold 0 (stage 3), fold 1 (stage 3)",
                                       "full fit: waits for fold 0 (stage 3), fold 1 (stage 3)"]
    with pytest.raises(PipelineError, match=r"fold0/rebalance/summary.json \(the fold's rebalanced heads\) is stale"):
        infer.status(other)  # stage 4 asks stage 3's unit, and refuses its stale input
