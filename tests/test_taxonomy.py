"""Taxonomy levels in the loss (train.taxonomy, #48 item 1): the table is read as a tree and refused otherwise, the
loss adds each level's cross-entropy on summed probabilities, and stage 2 trains with it and re-trains when it
changes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_competition
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.inputs.taxonomy import read_levels
from pipeline.core.nets.losses import SoftTargetLoss
from pipeline.stages import folds as folds_stage
from pipeline.stages import train as train_stage
from pipeline.tools.demo import coco_competition

from test_train import tiny_cfg

TREE = "class,genus,family\na,g1,f1\nb,g1,f1\nc,g2,f1\nd,g3,f2\n"


def test_levels_are_read_in_the_encoding_order_and_a_tree_is_required(tmp_path):
    (tmp_path / "tax.csv").write_text(TREE)
    cfg = load_config(None, [f"data.root={tmp_path}", "data.taxonomy=tax.csv"])
    genus, family = read_levels(cfg.data, ["d", "a", "c", "b"], ["genus", "family"])
    assert genus.parents == ("g1", "g2", "g3") and genus.of_class.tolist() == [2, 0, 1, 0]
    assert family.of_class.tolist() == [1, 0, 0, 0]
    assert genus.matrix().sum(1).tolist() == [1, 1, 1, 1] and genus.matrix()[0, 2] == 1
    (tmp_path / "tax.csv").write_text(TREE + "a,g2,f1\n")  # a listed twice with two genera
    with pytest.raises(PipelineError, match=r"tax.csv: class\(es\) with two parents at level 'genus': 'a'"):
        read_levels(cfg.data, ["a", "b", "c", "d"], ["genus"])
    (tmp_path / "tax.csv").write_text(TREE + "a,g1,f1\n")  # the same row twice is one parent
    assert read_levels(cfg.data, ["a", "b", "c", "d"], ["genus"])[0].of_class.tolist() == [0, 0, 1, 2]
    with pytest.raises(PipelineError, match=r"1 class\(es\) of the training set are not listed: 'e'"):
        read_levels(cfg.data, ["a", "b", "c", "d", "e"], ["genus"])
    with pytest.raises(PipelineError, match=r"level\(s\) \['order'\] are not columns"):
        read_levels(cfg.data, ["a", "b"], ["order"])
    (tmp_path / "tax.csv").write_text("class,genus\na,g1\nb,\n")
    with pytest.raises(PipelineError, match=r"without a 'genus': 'b'"):
        read_levels(cfg.data, ["a", "b"], ["genus"])
    bare = load_config(None, [f"data.root={tmp_path}"])
    with pytest.raises(PipelineError, match="set data.taxonomy"):
        read_levels(bare.data, ["a"], ["genus"])


def test_coco_categories_carry_the_levels(workdir):
    root = coco_competition(workdir / "inat", [3] * 12, size=8, n_test=2)
    cfg = load_config(None, [f"data.root={root}", "data.layout=coco"])
    classes = [str(1000 + i) for i in range(12)]
    (genus,) = read_levels(cfg.data, classes, ["genus"])
    assert genus.parents == ("Genus0", "Genus1") and genus.of_class.tolist() == [0] * 10 + [1] * 2
    named = load_config(None, [f"data.root={root}", "data.layout=coco", "data.category_label=name"])
    (sup,) = read_levels(named.data, [f"Species {c}" for c in classes], ["supercategory"])
    assert sup.parents == ("Plants",)


def test_the_loss_adds_each_levels_cross_entropy_on_summed_probabilities():
    genus = np.array([[1, 0], [1, 0], [0, 1]], np.float32)  # classes a, b in g1; c in g2
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]], requires_grad=True)
    target = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.0, 0.8]])  # b; a mixed with c (mixup)
    loss = SoftTargetLoss("ce", levels=[genus], level_weight=0.5)(logits, target)
    p = F.softmax(logits, 1)
    want = -(target * F.log_softmax(logits, 1)).sum(1) - 0.5 * (target @ torch.tensor(genus) * torch.log(
        p @ torch.tensor(genus))).sum(1)
    assert torch.allclose(loss, want.mean())
    # the level's gradient: a target of class a raises its sibling b's logit and lowers c's
    only = SoftTargetLoss("ce", levels=[genus], level_weight=1.0)
    x = torch.zeros(1, 3, requires_grad=True)
    (only(x, torch.tensor([[1.0, 0.0, 0.0]])) - SoftTargetLoss("ce")(x, torch.tensor([[1.0, 0.0, 0.0]]))).backward()
    assert x.grad[0, 1] < 0 < x.grad[0, 2]


def test_stage2_trains_with_the_levels_refuses_a_bad_table_before_work_and_retrains_when_it_changes(workdir):
    root = make_competition(workdir / "comp", {"a": 8, "b": 8, "c": 6, "d": 6}, size=16)
    (root / "tax.csv").write_text(TREE)
    cfg = tiny_cfg(root, "train.epochs=1", "data.taxonomy=tax.csv", "train.taxonomy=[genus,family]")
    folds_stage.run(cfg)
    seen = []
    real = SoftTargetLoss.per_sample

    def spy(self, logits, target):
        seen.append(self.n_levels)
        return real(self, logits, target)

    mp = pytest.MonkeyPatch()
    mp.setattr(SoftTargetLoss, "per_sample", spy)
    try:
        summaries = train_stage.run(cfg, fold=0)
    finally:
        mp.undo()
    assert seen and set(seen) == {2} and np.isfinite(summaries[0]["score"])
    stamp = cfg.run_dir.fold(0).summary.stat().st_mtime_ns
    train_stage.run(cfg, fold=0)  # up to date: skipped
    assert cfg.run_dir.fold(0).summary.stat().st_mtime_ns == stamp
    (root / "tax.csv").write_text(TREE.replace("d,g3,f2", "d,g2,f2"))
    assert any("taxonomy" in line for line in train_stage.status(cfg))
    (root / "tax.csv").write_text("class,genus,family\na,g1,f1\n")  # b, c, d missing: refused, nothing touched
    before = cfg.run_dir.fold(0).weights.read_bytes()
    with pytest.raises(PipelineError, match=r"3 class\(es\) of the training set are not listed: 'b', 'c', 'd'"):
        train_stage.run(cfg, fold=0)
    assert cfg.run_dir.fold(0).weights.read_bytes() == before
