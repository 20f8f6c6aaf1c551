import pytest

from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg.folds.n_splits == 5 and cfg.train.sampler == "instance"


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("experiment: a\ntrain:\n  epochs: 7\n  lr: 0.1\nmodel:\n  arch: resnet18\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nexperiment: b\ntrain:\n  lr: 0.2\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.epochs=3", "model.mean=[0.5, 0.5, 0.5]"])
    assert cfg.experiment == "b"            # child wins over base
    assert cfg.train.lr == 0.2
    assert cfg.model.arch == "resnet18"     # inherited key kept when the child sets its section
    assert cfg.train.epochs == 3            # command line wins over both
    assert cfg.model.mean == [0.5, 0.5, 0.5]


def test_typo_in_file_names_key_and_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epoch: 3\n")
    with pytest.raises(PipelineError, match=r"unknown config key 'train.epoch'.*c.yaml.*did you mean 'epochs'"):
        load_config(p)


def test_typo_in_base_names_the_base(tmp_path):
    (tmp_path / "base.yaml").write_text("trian:\n  epochs: 3\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\n")
    with pytest.raises(PipelineError, match=r"'trian' in .*base.yaml"):
        load_config(tmp_path / "child.yaml")


def test_typo_on_command_line():
    with pytest.raises(PipelineError, match="unknown config key 'train.lrr' in the command line"):
        load_config(None, ["train.lrr=1"])


@pytest.mark.parametrize("override,match", [
    ("train.epochs=three", "expected an integer"),
    ("train.epochs=2.5", "expected an integer"),
    ("train.lr=[1]", "expected a number"),
    ("train.ema=yes please", "expected true or false"),
    ("train.sampler=balanced", "expected one of"),
    ("aug.rrc_scale=0.5", "expected a list"),
    ("data=3", "is a section"),
])
def test_wrong_types(override, match):
    with pytest.raises(PipelineError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("override,key", [
    ("folds.n_splits=1", "folds.n_splits"),
    ("train.epochs=0", "train.epochs"),
    ("aug.hflip=1.5", "aug.hflip"),
    ("aug.rrc_scale=[0.9, 0.1]", "aug.rrc_scale"),
    ("rebalance.variants=[joint, crtt]", "rebalance.variants"),
])
def test_out_of_range_values(override, key):
    with pytest.raises(PipelineError, match=f"'{key}' \\(set in the command line\\)"):
        load_config(None, [override])


def test_missing_base_and_cycle_and_malformed(tmp_path):
    (tmp_path / "a.yaml").write_text("base: nothere.yaml\n")
    with pytest.raises(PipelineError, match="base file not found.*nothere.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "x.yaml").write_text("base: y.yaml\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(PipelineError, match="config base cycle"):
        load_config(tmp_path / "x.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(PipelineError, match="malformed YAML in .*bad.yaml"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(PipelineError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


def test_shipped_configs_load():
    from conftest import REPO

    for p in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(p)
        assert cfg.experiment, p
