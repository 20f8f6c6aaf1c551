"""Label cleaning before a fold trains (train.clean_labels, #48 item 3): confident learning on an inner
cross-validation of the fold's training rows flags flipped labels, never touches the held-out rows, and stage 2
drops or relabels the flagged rows and records them."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import make_competition
from pipeline.core.config import ConfigError, load_config
from pipeline.core.engine import cleaning
from pipeline.core.inputs.data import read_folds
from pipeline.stages import folds as folds_stage
from pipeline.stages import train as train_stage

from test_probe import TINY, pretrained  # noqa: F401  (fixture)


def test_confident_learning_flags_the_flipped_labels_and_at_most_the_share_asked():
    rng = np.random.default_rng(0)
    n_classes, n = 4, 400
    centres = rng.normal(0, 3.0, (n_classes, 8))
    true = rng.integers(0, n_classes, n)
    feats = (centres[true] + rng.normal(size=(n, 8))).astype(np.float32)
    noisy = true.copy()
    flipped = rng.choice(n, 40, replace=False)
    noisy[flipped] = (true[flipped] + rng.integers(1, n_classes, 40)) % n_classes
    flags, predicted = cleaning.label_issues(feats, noisy, n_classes, 0.2, seed=0)
    assert len(flags) <= 80 and len(set(flags)) == len(flags)
    caught = np.isin(flipped, flags).mean()
    precision = np.isin(flags, flipped).mean()
    assert caught > 0.8 and precision > 0.8, (caught, precision)
    assert (predicted[flipped] == true[flipped]).mean() > 0.8
    few, _ = cleaning.label_issues(feats, noisy, n_classes, 0.05, seed=0)
    assert len(few) == 20 and set(few) <= set(flags)  # the most confidently wrong first


def test_cleaning_needs_pretrained_features_and_no_teacher():
    with pytest.raises(ConfigError, match="train.clean_labels.*needs model.pretrained"):
        load_config(None, ["train.clean_labels=drop"])
    with pytest.raises(ConfigError, match="train.clean_labels.*use one or the other"):
        load_config(None, ["train.clean_labels=drop", "model.pretrained_path=w.safetensors",
                           "train.distill.teacher=other"])


@pytest.mark.parametrize("action", ["drop", "relabel"])
def test_stage2_cleans_only_the_training_rows_and_records_what_it_did(workdir, pretrained, action,  # noqa: F811
                                                                      monkeypatch):
    root = make_competition(workdir / "comp", {"a": 10, "b": 8, "c": 6}, size=16, n_test=4)
    cfg = load_config(None, [f"data.root={root}", "experiment=cl", *TINY, f"model.pretrained_path={pretrained}",
                             "train.epochs=1", f"train.clean_labels={action}", "train.clean_max_share=0.25",
                             "rebalance.probe=[]", "train.head_init=probe"])
    folds_stage.run(cfg)
    df, _ = read_folds(cfg.folds_name)
    seen = {}
    real = cleaning.label_issues

    def spy(feats, y, n_classes, share, seed):
        seen["n"] = len(y)
        flags, pred = real(feats, y, n_classes, share, seed)
        flags = np.arange(3)  # three rows flagged whatever the tiny set holds, so the test sees each action
        pred = (y + 1) % n_classes
        return flags, pred

    monkeypatch.setattr(train_stage, "label_issues", spy)
    passes = []
    extract = train_stage.models.extract_features
    monkeypatch.setattr(train_stage.models, "extract_features", lambda *a, **kw: passes.append(1) or extract(*a, **kw))
    s = train_stage.run(cfg, fold=0)[0]
    assert cfg.train.head_init == "probe" and len(passes) == 1  # LP-FT's probe reads the cleaning pass's features
    train_rows = df[df["fold"] != 0]
    assert seen["n"] == len(train_rows)  # the inner cross-validation saw fold 0's training rows only
    rec = s["cleaned"]
    assert rec["action"] == action and rec["flagged"] == 3 and rec["of"] == len(train_rows)
    assert [r["id"] for r in rec["rows"]] == train_rows["id"].astype(str).tolist()[:3]
    assert set(r["id"] for r in rec["rows"]).isdisjoint(df[df["fold"] == 0]["id"].astype(str))
    assert s["n_valid"] == int((df["fold"] == 0).sum())  # held-out rows untouched, all scored
    counts = np.bincount(train_rows["y"].values, minlength=3)
    if action == "drop":
        assert s["n_train"] == len(train_rows) - 3
        for r in rec["rows"]:
            counts[r["label"]] -= 1
    else:
        assert s["n_train"] == len(train_rows)
        for r in rec["rows"]:
            counts[r["label"]] -= 1
            counts[r["predicted"]] += 1
    assert s["train_counts"] == counts.tolist()
    if action == "drop":  # the experiment page lists and shows the flagged rows
        from pipeline.tools.reports import experiment_page
        train_stage.run(cfg, fold=1)
        page = experiment_page.write("cl", workdir / "reports", workdir / "runs").read_text()
        assert "## Label cleaning" in page and "fold 0: 3 of" in page and "dropped" in page
        assert rec["rows"][0]["id"] in page and (workdir / "reports/cl/cleaned.png").exists()
