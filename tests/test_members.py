"""Ensemble member names (`exp`, `exp:head`, `exp:head:plain`): one parser, and every ensemble method with every
form through `./run.sh all` to its final lines (the score table once crashed on hill climbing's `:plain` picks)."""
import pytest

from conftest import cli, config_from_items, make_competition
from pipeline.core.files.artifacts import read_json
from pipeline.core.errors import PipelineError
from pipeline.core.predict.submission import METHODS, Member, parse_members

BASE = ["data.image_ext: .png", "model.arch: test_resnet", "aug.img_size: 32", "aug.cache: off", "train.batch_size: 8",
        "train.epochs: 1", "train.workers: 0", "train.warmup_epochs: 0", "folds.n_splits: 2", "rebalance.crt_epochs: 2",
        "rebalance.lws_epochs: 2", "rebalance.variants: [joint, crt, tau]", "infer.heads: [best, tau, crt]",
        "infer.views: [orig, hflip]", "infer.search: true", "data.sample_submission: null"]


def test_member_names_parse_one_way_and_round_trip():
    assert Member.parse("a") == Member("a", None, False)
    assert Member.parse("a:crt") == Member("a", "crt", False)
    assert Member.parse("a:crt:plain") == Member("a", "crt", True)
    for name in ("a", "a:crt", "a:crt:plain"):
        assert str(Member.parse(name)) == name
    for bad in ("a:crt:tta", "a::plain", ":crt", "a:b:plain:x", "a:"):
        with pytest.raises(PipelineError, match="experiment:head:plain"):
            Member.parse(bad)
    assert parse_members([], "me") == [Member("me")]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    home = tmp_path_factory.mktemp("members")
    root = make_competition(home / "comp", {"a": 10, "b": 8, "c": 6}, size=24, n_test=6)
    base = BASE + [f"data.root: {root}"]
    config_from_items(home / "b.yaml", [i.replace(": ", "=", 1) for i in base + ["experiment: b", "model.pool: gem"]])
    return home, base


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_with_every_member_form_runs_all_to_its_last_line(project, method):
    home, base = project
    members = "[a, b:tau, a:crt:plain]" if method != "hill_climb" else "[a, b:crt:plain]"
    cfg = config_from_items(home / f"{method}.yaml", [i.replace(": ", "=", 1) for i in base + [
        "experiment: a", "run_also: [b.yaml]", f"ensemble.members: {members}", f"ensemble.method: {method}",
        f"ensemble.name: e-{method}"]])
    r = cli(["all", "--config", str(cfg)], home)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = read_json(home / "submissions" / f"e-{method}.json")
    assert "Your submission:" in r.stdout and "Traceback" not in r.stderr
    table = r.stderr[r.stderr.index(f"=== e-{method}: CV"):]
    for m in map(Member.parse, rec["members"]):  # each member's row in the closing table, :plain labelled
        assert f"{m.head} (no TTA)" in table if m.plain else m.head in table
    if method == "hill_climb":  # `exp` offers its heads with and without TTA, `exp:head:plain` that view alone
        cands = rec["hill_climb"]["candidates"]
        assert "b:crt:plain" in cands and "b:crt" not in cands and any(c.startswith("a:") for c in cands)
        assert any(m.endswith(":plain") for m in rec["members"])  # the form the closing table once crashed on
    else:
        assert rec["members"] == ["a:best", "b:tau", "a:crt:plain"]
