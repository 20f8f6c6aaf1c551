"""Fail fast: the whole plan is checked before anything is written, every problem named at once; and a
submission is always written, with or without a sample submission (stage 5 and predict)."""
import pandas as pd
import pytest

from conftest import config_from_items, make_competition
from pipeline import cli
from pipeline.tools import export, predict

TINY = ["data.image_ext=.png", "model.arch=test_resnet", "aug.img_size=16", "aug.cache=off", "train.batch_size=8",
        "train.epochs=1", "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0",
        "rebalance.variants=[joint]", "infer.views=[orig]", "infer.heads=[joint]"]


def write_config(path, root, *extra, experiment="pf"):
    return config_from_items(path, [f"data.root={root}", f"experiment={experiment}", *TINY, *extra])


def written(workdir):
    """Everything the pipeline writes (not the competition and configs the test made)."""
    return sorted(str(p.relative_to(workdir)) for d in ("folds", "runs", "submissions", "reports")
                  for p in (workdir / d).rglob("*") if p.is_file()) if workdir.exists() else []


@pytest.mark.slow
def test_no_sample_submission_end_to_end_with_predict(workdir, capsys):
    root = make_competition(workdir / "comp", {"a": 8, "b": 8}, n_test=5)
    (root / "sample_submission.csv").unlink()
    cfg = write_config(workdir / "c.yaml", root, "data.sample_submission=null")
    assert cli.main(["all", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "Your submission: submissions/pf.csv" in out
    sub = pd.read_csv(workdir / "submissions" / "pf.csv", dtype=str)
    assert list(sub.columns) == ["image_id", "label"]
    assert list(sub["image_id"]) == sorted(p.name for p in (root / "test").iterdir())  # every test image, sorted
    assert set(sub["label"]) <= {"a", "b"}
    from pipeline.core.config import load_config

    bundle = export.run(load_config(cfg, []), out=str(workdir / "bundle"))["bundle"]
    res = predict.run(bundle, root / "test", workdir / "pred.csv", None, tmp_dir=workdir)
    pred = pd.read_csv(res["out"], dtype=str)
    assert pred.equals(sub)  # predict reproduces stage 5 without a sample submission too


@pytest.mark.parametrize("damage, extra, message", [
    ("header_only", [], r"no test images"),
    ("id_without_image", [], r"have no image"),
    ("none", ["ensemble.members=[pf,pff]"], r"ensemble.members: 'pff' is neither.*did you mean 'pf'"),
    ("none", ["model.arch=resnet10tt"], r"unknown timm model 'resnet10tt'; did you mean 'resnet10t'"),
    ("none", ["model.pretrained_path=nowhere.safetensors"], r"weights file not found: nowhere.safetensors"),
    ("none", ["train.distill.teacher=ghost"], r"train.distill.teacher 'ghost' is neither"),
    ("none", ["run_also=[missing.yaml]"], r"run_also 'missing.yaml'.*config file not found"),
])
def test_all_refuses_before_writing_anything(workdir, capsys, damage, extra, message):
    root = make_competition(workdir / "comp", {"a": 6, "b": 6}, n_test=4)
    sample = root / "sample_submission.csv"
    if damage == "header_only":
        sample.write_text("image_id,label\n")
    elif damage == "id_without_image":
        sample.write_text(sample.read_text() + "t999,a\n")
    cfg = write_config(workdir / "c.yaml", root, *extra)
    assert cli.main(["all", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "nothing was written" in err
    assert pytest.importorskip("re").search(message, err), err
    assert written(workdir) == []


def test_every_problem_is_named_at_once_and_status_shows_the_plan(workdir, capsys):
    root = make_competition(workdir / "comp", {"a": 6, "b": 6}, n_test=4)
    (root / "sample_submission.csv").write_text("image_id,label\n")
    cfg = write_config(workdir / "c.yaml", root, "model.arch=nonet", "ensemble.members=[pf,typo]")
    assert cli.main(["all", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and "nonet" in err and "'typo'" in err and "no test images" in err
    assert cli.main(["status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan of 'status':") and out.count("PROBLEM:") == 3
    assert written(workdir) == []


def test_a_stage_command_warns_about_the_test_side_and_refuses_a_bad_model(workdir, capsys, caplog):
    root = make_competition(workdir / "comp", {"a": 6, "b": 6}, n_test=4)
    (root / "sample_submission.csv").write_text("image_id,label\n")
    cfg = write_config(workdir / "c.yaml", root)
    assert cli.main(["folds", "--config", str(cfg)]) == 0  # stages 1-3 do not read the test side: a warning
    assert "test side" in caplog.text and (workdir / "folds").exists()
    assert cli.main(["infer", "--config", str(cfg)]) == 2  # stage 4 does: refused, before anything
    assert "no test images" in capsys.readouterr().err
    typo = write_config(workdir / "typo.yaml", root, "ensemble.members=[pf,pfx]")
    caplog.clear()
    assert cli.main(["folds", "--config", str(typo)]) == 0  # a member trained later: a warning before stage 5
    assert "'pfx' is neither" in caplog.text and "stage 5 will refuse this" in caplog.text
    bad = write_config(workdir / "bad.yaml", root, "model.arch=nonet", experiment="other")
    before = written(workdir)
    assert cli.main(["folds", "--config", str(bad)]) == 2
    assert written(workdir) == before  # the unknown model is reported before stage 1 writes its folds file


def test_the_plan_advises_lp_ft_for_a_short_pretrained_fine_tune_of_small_upsampled_imbalanced_photos(workdir):
    """#47 (eighth session): small photos upsampled to aug.img_size *and* imbalanced classes, with pretrained weights
    and a short plain fine-tune, get the advice to set LP-FT's keys; either alone, LP-FT already set, or a long
    run do not."""
    from pipeline.core.config import load_config
    from pipeline.core.inputs.data import read_train_table
    from pipeline.tools.plan import LP_FT_KEYS, build, recipe_advice

    tail = make_competition(workdir / "tail", {"a": 30, "b": 3}, size=16)  # 10:1
    flat = make_competition(workdir / "flat", {"a": 16, "b": 4}, size=16)  # 4:1, below the bound
    base = ["model.arch=test_resnet", "model.pretrained_path=w.safetensors", "train.epochs=2", "data.image_ext=.png"]

    def advice(root, *extra):
        cfg = load_config(None, [*base, f"data.root={root}", *extra])
        return recipe_advice(cfg.model, cfg.train, cfg.aug.img_size, read_train_table(cfg.data))

    assert LP_FT_KEYS in advice(tail, "aug.img_size=32") and "10:1" in advice(tail, "aug.img_size=32")
    assert advice(tail, "aug.img_size=16") is None  # not upsampled
    assert advice(flat, "aug.img_size=32") is None  # hardly imbalanced (grocery81-32's 4:1 was split)
    assert advice(tail, "aug.img_size=32", "train.head_init=probe") is None  # LP-FT already
    assert advice(tail, "aug.img_size=32", "train.epochs=20") is None  # not a short fine-tune
    assert advice(tail, "aug.img_size=32", "model.pretrained_path=null") is None  # from scratch
    cfg = write_config(workdir / "c.yaml", tail, "model.pretrained_path=w.safetensors", "aug.img_size=32",
                       "train.epochs=2")
    plan = build(load_config(cfg, []), [], "status")
    assert any(LP_FT_KEYS in w for w in plan.warnings)  # status and every command's plan say it
