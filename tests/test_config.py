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
    ("rebalance.variants=[joint, crtt]", "'rebalance.variants' in the command line: expected one of 'joint', 'crt'"),
    ("infer.views=[orig, hflp]", "'infer.views' in the command line: expected one of 'orig', 'hflip'"),
    ("infer.heads=[best, lwss]", "'infer.heads' in the command line: expected one of 'best', 'joint'"),
])
def test_wrong_types(override, match):
    with pytest.raises(PipelineError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("override,key", [
    ("folds.n_splits=1", "folds.n_splits"),
    ("train.epochs=0", "train.epochs"),
    ("aug.hflip=1.5", "aug.hflip"),
    ("aug.rrc_scale=[0.9, 0.1]", "aug.rrc_scale"),
    ("rebalance.variants=[crt]", "rebalance.variants"),
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


def test_duplicate_yaml_keys_are_refused_naming_key_and_lines(tmp_path):
    (tmp_path / "c.yaml").write_text("folds:\n  n_splits: 3\ntrain:\n  epochs: 2\nfolds:\n  n_splits: 5\n")
    with pytest.raises(PipelineError, match=r"c.yaml.*duplicate key 'folds' on lines 1 and 5"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("train:\n  epochs: 2\n  epochs: 3\n")
    with pytest.raises(PipelineError, match=r"duplicate key 'epochs' on lines 2 and 3"):
        load_config(tmp_path / "d.yaml")


@pytest.mark.parametrize("key", ["experiment", "ensemble.name", "folds.name"])
@pytest.mark.parametrize("value", ["../../escaped", "a/b", "..", ".hidden", "a:b", "/abs", "x\\\\y"])
def test_names_that_become_paths_must_be_plain(key, value):
    with pytest.raises(PipelineError, match=rf"config key '{key}'.*not a plain name"):
        load_config(None, [f"{key}={value}"])


def test_layout_refuses_escaping_names_at_every_path_function():
    from pipeline.core.files import layout

    for fn in (layout.folds_csv, layout.submission_csv, layout.submission_record, layout.export_dir,
               layout.experiment_report, layout.RunDir.of):
        with pytest.raises(PipelineError, match="not a plain name"):
            fn("../x")
    assert layout.submission_csv("ok-name_1.2") == layout.SUBMISSIONS / "ok-name_1.2.csv"


@pytest.mark.parametrize("scales,why", [("[0.01]", r"must be >= 0.25"), ("[9]", r"must be >= 0.25 and <= 4"),
                                        ("[]", "at least one scale"), ("[1.0, 1.0]", "twice")])
def test_tta_scales_are_validated(scales, why):
    with pytest.raises(PipelineError, match=rf"'infer.scales'.*{why}"):
        load_config(None, [f"infer.scales={scales}"])
    with pytest.raises(PipelineError, match=r"'infer.scales'.*crops under 16 px"):
        load_config(None, ["aug.img_size=32", "infer.scales=[0.3]"])


def test_every_numeric_key_has_a_range_and_both_ends_are_enforced():
    import dataclasses
    import typing

    from pipeline.core.config import RANGES, STRUCTURED, Config, flatten

    def owner(key):  # the (nested) section object a dotted key lives in
        obj = Config()
        for part in key.split(".")[:-1]:
            obj = getattr(obj, part)
        return obj

    numeric = []
    for key, value in flatten(Config().to_dict()).items():
        t = typing.get_type_hints(type(owner(key)))[key.split(".")[-1]]
        if any(a in (int, float) for a in (t, *typing.get_args(t), *[x for a in typing.get_args(t) for x in typing.get_args(a)])):
            numeric.append(key)
    assert dataclasses.is_dataclass(Config)
    assert sorted(k for k in numeric if k not in RANGES and k not in STRUCTURED) == []
    for key, (lo, hi, lo_in, hi_in) in RANGES.items():
        t = typing.get_type_hints(type(owner(key)))[key.split(".")[-1]]
        is_list = typing.get_origin(t) is list
        is_int = int in (t, *typing.get_args(t)) and float not in (t, *typing.get_args(t))
        for bad in (lo - (0 if not lo_in else (1 if is_int else 1e-3 * max(1, abs(lo)))),
                    hi + (0 if not hi_in else (1 if is_int else 1e-3 * max(1, abs(hi))))):
            v = int(bad) if is_int else bad
            if key in ("model.mean", "model.std"):
                v = [v] * 3
            elif is_list:
                v = [v]
            with pytest.raises(PipelineError, match=rf"'{key}'.*must be"):
                load_config(None, [f"{key}={v}"])


def test_optimizer_and_scheduler_names_are_timm_names():
    assert load_config(None, ["train.optimizer=lookahead_adamw", "train.scheduler=step"]).train.optimizer
    assert load_config(None, ["train.optimizer=madgrad"]).train.optimizer == "madgrad"   # a rarer one: asks timm
    with pytest.raises(PipelineError, match=r"'train.optimizer'.*'adamm' is not a timm optimizer"):
        load_config(None, ["train.optimizer=adamm"])
    with pytest.raises(PipelineError, match=r"'train.scheduler'.*one of timm's schedulers"):
        load_config(None, ["train.scheduler=cosin"])


@pytest.mark.parametrize("content,why", [(b"", "is empty"), (b"\xff\xfe\x00garbage", "cannot read config file"),
                                         (b"experiment: a\n" + b"#" * 1_100_000, "is 1.1 MB"),
                                         (b"data: {root: co", "malformed YAML")])
def test_bad_config_files_are_refused_naming_them(tmp_path, content, why):
    (tmp_path / "c.yaml").write_bytes(content)
    with pytest.raises(PipelineError, match=rf"c.yaml.*{why}|{why}.*c.yaml"):
        load_config(tmp_path / "c.yaml")


def test_the_schema_is_the_one_source():
    """Records, ranges and the reference all come from the schema: a key declared with stage "-" is left out of
    the training record, a key with `added` is in LATER_KEYS, and docs/config.md is what the schema generates."""
    from pathlib import Path

    from pipeline.core.files import provenance
    from pipeline.core.config import RANGES, Config, keys_without_output, later_keys, schema
    from pipeline.tools.config_reference import reference

    info = {k.name: k for k in schema()}
    assert set(RANGES) == {n for n, k in info.items() if k.range is not None}
    assert keys_without_output("aug") == ("cache", "cache_dir", "cache_max_gb")
    assert set(keys_without_output("train")) == {"workers", "tracker", "tracker_dir"}
    assert provenance.LATER_KEYS == later_keys() and "head_init_scale" in later_keys()["model"]
    data = provenance.recorded_keys(Config().to_dict()["data"], "data", ("1", "2"))
    assert not {"test_dir", "test_json", "sample_submission", "test_labels", "holdout_from", "check_images"} & set(data)
    assert provenance.TRAIN_SECTIONS == ("data", "folds", "model", "aug", "train", "eval")
    assert all(k.help for k in schema()), [k.name for k in schema() if not k.help]
    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == reference(), "docs/config.md is stale: python -m pipeline.tools.config_reference > docs/config.md"


def test_the_schema_names_every_head_and_view_the_code_registers():
    """Config checks names without importing torch: the schema's Literal types must equal the registries."""
    import typing

    from pipeline.core.config import Head, Variant, View
    from pipeline.core.nets.heads import VARIANTS
    from pipeline.core.predict.tta import VIEWS

    assert list(typing.get_args(Variant)) == list(VARIANTS)
    assert list(typing.get_args(View)) == list(VIEWS)
    assert list(typing.get_args(Head)) == ["best", *VARIANTS, *(f"probe_{v}" for v in VARIANTS), "wise", "mix"]


def test_a_config_typo_is_reported_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom pipeline.core.config import load_config\nfrom pipeline.core.errors import PipelineError\n"
            "try:\n    load_config(None, ['train.epocs=3', 'infer.views=[hflp]'])\nexcept PipelineError as e:\n"
            "    print(e)\nprint('torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "train.epocs" in out and "hflp" in out and out.strip().endswith("False False")


def test_no_module_of_the_package_keeps_mutable_state_at_module_level():
    """What a command sets for its run travels in an object (Config.session), never in a module's variable: no
    `global`, and no module-level container created empty (or as a one-element box such as `[False]`) to be filled
    at run time. Registries and tables written out in full, and lru_caches, are fine."""
    import ast
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "pipeline"
    bad = []
    for p in pkg.rglob("*.py"):
        tree = ast.parse(p.read_text())
        for node in tree.body:
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            if isinstance(value, (ast.List, ast.Dict, ast.Set)):
                items = value.keys if isinstance(value, ast.Dict) else value.elts
                boxed = len(items) == 1 and isinstance(items[0], ast.Constant) and items[0].value in (None, False, True)
                if not items or boxed:
                    bad.append(f"{p.relative_to(pkg)}:{node.lineno}: {ast.unparse(node)[:60]}")
        bad += [f"{p.relative_to(pkg)}:{n.lineno}: global" for n in ast.walk(tree) if isinstance(n, ast.Global)]
    assert not bad, bad
