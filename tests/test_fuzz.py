"""Property-based fuzz of the inputs a user hands us: COCO JSON, train.csv, the sample submission, config files and
sweep spaces (stage 4's stored feature files: tests/test_stored_checks.py).

Each example takes a valid input, breaks it one way (a field deleted, its type changed, an entry duplicated, a list
or file emptied, bytes that are not UTF-8, a huge value, the file cut short) and runs the command that reads it.
For every mutation: exit status 2, a message that names the file and the key or row at fault, no traceback, and
nothing written under folds/, runs/ or submissions/.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is installed by ./run.sh test (requirements-test.txt)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from conftest import cli, make_competition  # noqa: E402

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
OUTPUTS = ("folds", "runs", "submissions")
WRONG_TYPES = [None, 1.5, [1], {"a": 1}, True, ""]  # never a valid id, file name or count
HUGE = 10 ** 30


def outputs(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for d in OUTPUTS if (home / d).exists() for p in (home / d).rglob("*"))


def refused(home: Path, args: list[str], names: list[str]):
    """Run the CLI; assert the refusal and return its message."""
    before = outputs(home)
    r = cli(args, home)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert any(n in r.stderr for n in names), (names, r.stderr[-2000:])
    assert outputs(home) == before, "a refused command wrote output"
    return r.stderr


# ----------------------------------------------------------------------------- COCO train JSON
@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz_coco")
    root = make_competition(home / "comp", {"a": 4, "b": 4, "c": 4}, size=16, n_test=3)
    cats = {"a": 1, "b": 2, "c": 3}
    import pandas as pd

    rows = pd.read_csv(root / "train.csv")
    images = [{"id": i + 1, "file_name": f"train/{r.image_id}.png"} for i, r in rows.iterrows()]
    anns = [{"id": 100 + i, "image_id": i + 1, "category_id": cats[r.label]} for i, r in rows.iterrows()]
    valid = {"images": images, "annotations": anns,
             "categories": [{"id": v, "name": k} for k, v in cats.items()]}
    cfg = home / "coco.yaml"
    cfg.write_text(f"experiment: fz\ndata: {{root: {root}, layout: coco, train_json: train.json, "
                   f"sample_submission: null}}\nmodel: {{arch: test_resnet}}\nfolds: {{n_splits: 2}}\n")
    return home, root, valid, cfg


COCO_FIELDS = [("images", "id"), ("images", "file_name"), ("annotations", "image_id"),
               ("annotations", "category_id")]


@st.composite
def coco_mutation(draw):
    kind = draw(st.sampled_from(["delete", "retype", "duplicate", "empty", "huge", "huge_category", "not_utf8", "cut"]))
    part, field = draw(st.sampled_from(COCO_FIELDS))
    return kind, part, field, draw(st.integers(0, 11)), draw(st.sampled_from(WRONG_TYPES)), draw(st.integers(1, 60))


@FUZZ
@given(m=coco_mutation())
def test_fuzzed_coco_json_is_refused_naming_the_entry(coco, m):
    home, root, valid, cfg = coco
    kind, part, field, i, wrong, cut = m
    data = copy.deepcopy(valid)
    entry = data[part][i]
    path = root / "train.json"
    if kind == "delete":
        del entry[field]
    elif kind == "retype":
        entry[field] = wrong
    elif kind == "duplicate":
        data["images"].append(dict(data["images"][i]))
    elif kind == "empty":
        data[part] = []
    elif kind == "huge":
        entry[field] = HUGE if field != "file_name" else "x" * 5000
    elif kind == "huge_category":  # a real category with a 31-digit id: one image of it, fewer than the folds
        data["annotations"][i]["category_id"] = HUGE
        data["categories"].append({"id": HUGE, "name": "huge"})
    text = json.dumps(data)
    if kind == "not_utf8":
        path.write_bytes(text.replace("train/", "tr\u00e4in/").encode("latin-1"))
    else:
        path.write_text(text[:-cut] if kind == "cut" else text)
    msg = refused(home, ["folds", "--config", str(cfg)], [str(path)])
    if kind in ("delete", "retype", "duplicate", "huge"):
        assert f"{part}[" in msg or "image id" in msg or "file_name" in msg or "category" in msg, msg


# ----------------------------------------------------------------------------- train.csv
@pytest.fixture(scope="module")
def csv_comp(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz_csv")
    root = make_competition(home / "comp", {"a": 4, "b": 4, "c": 4}, size=16, n_test=3)
    cfg = home / "csv.yaml"
    cfg.write_text(f"experiment: fz\ndata: {{root: {root}, image_ext: .png}}\nmodel: {{arch: test_resnet}}\n"
                   f"folds: {{n_splits: 2}}\n")
    return home, root, (root / "train.csv").read_text(), (root / "sample_submission.csv").read_text(), cfg


CSV_VALUES = ["", "1.5", "1e300", "-1e300", "a|b", "\u00e9\u00e8", "nan", "x" * 300]


@st.composite
def csv_mutation(draw):
    kind = draw(st.sampled_from(["drop_column", "blank", "value", "duplicate", "empty", "header_only", "not_utf8",
                                 "missing_file"]))
    return kind, draw(st.integers(0, 1)), draw(st.integers(1, 12)), draw(st.sampled_from(CSV_VALUES))


def mutate_csv(text: str, kind: str, col: int, row: int, value: str) -> bytes:
    lines = text.strip("\n").split("\n")
    cells = [ln.split(",") for ln in lines]
    row = min(row, len(cells) - 1)
    if kind == "drop_column":
        cells = [[c for j, c in enumerate(r) if j != col] for r in cells]
    elif kind == "blank":
        cells[row][col] = ""
    elif kind == "value":  # a label no classifier should read as a class (the id column: a file that is not there)
        cells[row][1 if col == 1 else 0] = value if col == 1 else f"nofile{value[:20]}"
    elif kind == "duplicate":
        cells.append(list(cells[row]))
    elif kind == "empty":
        return b""
    elif kind == "header_only":
        cells = cells[:1]
    elif kind == "missing_file":
        cells[row][0] = "does_not_exist"
    out = "\n".join(",".join(r) for r in cells) + "\n"
    return out.encode("latin-1") if kind == "not_utf8" else out.encode("utf-8")


@FUZZ
@given(m=csv_mutation())
def test_fuzzed_train_csv_is_refused_naming_the_row_or_column(csv_comp, m):
    home, root, train, _, cfg = csv_comp
    kind, col, row, value = m
    if kind == "value" and col == 1 and value in ("", "nan"):
        kind = "blank"
    if kind == "not_utf8":
        train = train.replace(",a\n", ",\u00e4\u00df\n", 1)
    (root / "train.csv").write_bytes(mutate_csv(train, kind, col, row, value))
    try:
        refused(home, ["folds", "--config", str(cfg)], [str(root / "train.csv"), str(root / "train")])
    finally:
        (root / "train.csv").write_text(train)


@FUZZ
@given(m=csv_mutation())
def test_fuzzed_sample_submission_is_refused_naming_it(csv_comp, m):
    home, root, _, sample, cfg = csv_comp
    kind, col, row, value = m
    if kind in ("value", "blank") and col == 1:  # the label column's values are not read: break the id instead
        col = 0
    if kind == "not_utf8":
        sample = sample.replace("t000", "t\u00e4000", 1)
    path = root / "sample_submission.csv"
    path.write_bytes(mutate_csv(sample, kind, col, min(row, 3), value))
    try:
        refused(home, ["ensemble", "--config", str(cfg)], [str(path)])
    finally:
        path.write_text(sample)


# ----------------------------------------------------------------------------- config files
KEYS = {"train.epochs": 3, "folds.n_splits": 3, "aug.img_size": 32, "train.lr": 0.01, "eval.metric": "accuracy",
        "ensemble.method": "mean", "train.amp": True, "infer.views": ["orig"]}


@st.composite
def config_mutation(draw):
    kind = draw(st.sampled_from(["typo", "retype", "huge", "negative", "duplicate", "empty", "not_utf8",
                                 "section_scalar", "unknown_choice"]))
    return kind, draw(st.sampled_from(sorted(KEYS))), draw(st.sampled_from(WRONG_TYPES[:4] + ["text"]))


def wrong_for(key: str, value):
    """A value of the wrong type for the key (a string stands for a number: never for a string key)."""
    default = KEYS[key]
    if isinstance(default, str):
        return value if not isinstance(value, str) else 7
    if isinstance(default, list):
        return value if not isinstance(value, list) else 7
    if isinstance(default, bool):
        return value if not isinstance(value, bool) else "yes please"
    return value if not isinstance(value, (int, float)) or isinstance(value, bool) else "text"


@FUZZ
@given(m=config_mutation())
def test_fuzzed_config_is_refused_naming_the_file_and_key(csv_comp, m):
    home, root, _, _, _ = csv_comp
    kind, key, wrong = m
    sec, name = key.split(".")
    base = f"experiment: fz\ndata: {{root: {root}, image_ext: .png}}\nmodel: {{arch: test_resnet}}\n"
    body = {"typo": f"{sec}:\n  {name}x: 1\n",
            "retype": f"{sec}:\n  {name}: {json.dumps(wrong_for(key, wrong))}\n",
            "huge": f"{sec}:\n  {name}: {HUGE}\n", "negative": f"{sec}:\n  {name}: -5\n",
            "duplicate": f"{sec}:\n  {name}: {json.dumps(KEYS[key])}\n  {name}: {json.dumps(KEYS[key])}\n",
            "section_scalar": f"{sec}: 3\n", "unknown_choice": f"{sec}:\n  {name}: [not, a, choice]\n"}
    path = home / "fuzzed.yaml"
    if kind == "empty":
        path.write_text("")
    elif kind == "not_utf8":
        path.write_bytes((base + "# caf\u00e9\n").encode("latin-1"))
    else:
        path.write_text(base + body[kind])
    names = [str(path)] if kind in ("empty", "not_utf8", "duplicate") else [key if kind != "section_scalar" else sec]
    msg = refused(home, ["folds", "--config", str(path)], names)
    if kind not in ("empty", "not_utf8"):
        assert str(path) in msg, msg


# ----------------------------------------------------------------------------- sweep spaces (#45)
SPACE_KEYS = ["train.lr", "train.epochs", "aug.img_size", "train.mixup_alpha", "model.arch", "infer.views",
              "train.label_smoothing"]
ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(-1, 2), st.just(float("nan")), st.just(1.0e-3),
                st.sampled_from(["false", "true", "x", "test_resnet", "resnet10tt", "orig", "hflip"]),
                st.lists(st.sampled_from(["orig", "hflip", 3]), max_size=2))


VALID_SPACE = {  # a valid distribution per key; the fuzz starts from one and breaks 0-2 of its entries
    "train.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
    "train.epochs": {"type": "int", "low": 1, "high": 4},
    "aug.img_size": {"type": "categorical", "choices": [16, 32]},
    "train.mixup_alpha": {"type": "float", "low": 0.0, "high": 0.4, "step": 0.1},
    "model.arch": {"type": "categorical", "choices": ["test_resnet", "resnet10t"]},
    "infer.views": {"type": "categorical", "choices": [["orig"], ["orig", "hflip"]]},
    "train.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2, "when": {"model.arch": "resnet10t"}},
}


@st.composite
def space_entry(draw, key):
    spec = dict(VALID_SPACE[key])
    for _ in range(draw(st.integers(0, 2))):
        entry = draw(st.sampled_from(["type", "low", "high", "log", "step", "choices", "when", "bogus"]))
        if draw(st.booleans()) and entry in spec:
            del spec[entry]
        elif entry == "type":
            spec[entry] = draw(st.sampled_from(["float", "int", "categorical", "uniform", None]))
        elif entry == "choices":
            spec[entry] = draw(st.one_of(st.lists(ANY, max_size=4), ANY))
        elif entry == "when":
            spec[entry] = {draw(st.sampled_from(SPACE_KEYS)): draw(ANY)}
        else:
            spec[entry] = draw(ANY)
    return spec


@st.composite
def space(draw):
    keys = draw(st.lists(st.sampled_from(SPACE_KEYS), min_size=1, max_size=3, unique=True))
    return {k: draw(space_entry(k)) for k in keys}


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(space=space())
def test_a_fuzzed_sweep_space_is_refused_or_every_trial_it_draws_is_a_valid_config(tmp_path_factory, space):
    """Random spaces (wrong types, bounds, steps, log flags, choices, conditions): read_space refuses them naming the
    file, or every trial Optuna draws from them is a config the loader and the plan accept (no trial fails at its
    config, the failure that used to reach the study)."""
    import yaml
    import optuna

    from pipeline.core.config import load_config
    from pipeline.core.errors import PipelineError
    from pipeline.tools import sweep
    from pipeline.tools.plan import config_problems

    path = tmp_path_factory.mktemp("space") / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    base = ["model.arch=test_resnet", "aug.img_size=32"]
    try:
        params = sweep.read_space(path, None, base)
    except PipelineError as e:
        assert str(path) in str(e), str(e)
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(4):
        values = sweep.suggest(study.ask(), params)
        c = load_config(None, [*base, *(f"{k}={json.dumps(v)}" for k, v in values.items())])
        assert not config_problems(c.experiment, c.model, c.train, c.experiment), values
