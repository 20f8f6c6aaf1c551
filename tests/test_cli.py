"""At the keyboard: per-command help, --root from another folder, the console script, a log file per stage,
progress lines when the output is not a terminal, the last lines of `all`, and the W&B tracker."""
import importlib.metadata
import shutil
import sys
import types

import pytest

from conftest import cli as cli_inprocess, config_from_items, REPO, make_competition, run_cli
from pipeline import cli
from pipeline.core.config import load_config
from pipeline.stages import ensemble as ens_stage
from pipeline.stages import folds as folds_stage
from pipeline.stages import infer as infer_stage
from pipeline.stages import rebalance as rebalance_stage
from pipeline.stages import train as train_stage

TINY = ["data.image_ext=.png", "model.arch=test_resnet", "aug.img_size=32", "aug.cache=off", "train.batch_size=8",
        "train.epochs=1", "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0", "rebalance.crt_epochs=2",
        "rebalance.lws_epochs=2", "infer.views=[orig]"]


def write_config(path, root, *extra):
    return config_from_items(path, [f"data.root={root}", "experiment=kb", *TINY, *extra])


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_has_its_own_help(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{command}: ") and "options:" in out and "example:" in out
    assert "usage: ./run.sh <command>" not in out   # not the global help
    if command in ("folds", "train", "rebalance", "infer", "ensemble", "export", "predict"):
        assert "Input:" in out and "Output:" in out


def test_help_lists_every_command_with_help(capsys):
    assert cli.main(["help"]) == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert f" {command} " in out
    assert cli.main(["help", "train"]) == 0 and capsys.readouterr().out.startswith("train: ")


def test_the_console_script_is_declared():
    eps = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")
           if e.value.startswith("pipeline.")}
    if "pipeline" not in eps:   # an environment installed before the script was declared: read pyproject
        import tomllib

        eps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert eps["pipeline"] == "pipeline.cli:main"


@pytest.mark.slow
def test_root_from_another_folder_logs_per_stage_and_progress_lines(workdir):
    project = workdir / "project"
    project.mkdir()
    root = make_competition(project / "comp", {"a": 10, "b": 8}, size=24, n_test=4)
    write_config(project / "c.yaml", "comp")   # relative to the project folder
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    r = run_cli(["folds", "--root", str(project), "--config", "c.yaml"], elsewhere)
    assert r.returncode == 0, r.stderr
    assert (project / "folds").is_dir() and not (elsewhere / "folds").exists()
    r = run_cli(["train", "--config", "c.yaml", "--fold", "0"], elsewhere, env={"PIPELINE_ROOT": str(project)})
    assert r.returncode == 0, r.stderr
    logs = sorted((project / "runs/kb/logs").glob("*.log"))
    assert [p.name.split("-")[0] for p in logs] == ["folds", "train"]
    text = logs[1].read_text()
    assert "command: " in text and "train --config c.yaml --fold 0" in text and "config: c.yaml" in text
    assert "fold 0 done" in text
    assert root.is_dir()


def test_progress_lines_when_the_output_is_not_a_terminal(caplog):
    from pipeline.core.report.progress import Progress

    caplog.set_level("INFO", logger="pipeline")
    with Progress(20, "fold 0 epoch 1/3", "step", every_s=0.0) as bar:
        for _ in range(20):
            bar.postfix(loss="0.5")
            bar.update()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fold 0 epoch 1/3")]
    assert len(lines) == 10 and "20/20 step (100%)" in lines[-1] and "left, loss 0.5" in lines[-1]


@pytest.mark.slow
def test_all_ends_by_saying_where_the_submission_is_and_what_next(workdir, capsys):
    root = make_competition(workdir / "comp", {"a": 10, "b": 8}, size=24, n_test=4)
    cfg_path = write_config(workdir / "c.yaml", root)
    assert cli.main(["all", "--config", str(cfg_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-3].startswith("Your submission: submissions/kb.csv (1 member(s), mean): CV accuracy ")
    assert out[-2].startswith("Reports: reports/leaderboard.md, reports/kb/index.md")
    assert "./run.sh export --zip" in out[-1] and "./run.sh status" in out[-1]


def test_wandb_tracker_logs_every_stage_offline_and_is_optional(workdir, monkeypatch, caplog):
    inits, logged, summaries = [], [], {}

    class Run:
        def __init__(self, **kw):
            self.kw, self.summary = kw, summaries.setdefault(kw["id"], {})
            inits.append(kw)

        def log(self, values, step=None):
            logged.append((self.kw["name"], step, values))

        def finish(self):
            logged.append((self.kw["name"], "finish", None))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: Run(**kw)
    fake.Table = lambda dataframe: ("table", list(dataframe.columns), len(dataframe))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(workdir))   # no ~/.netrc: no key, so offline without probing the network
    root = make_competition(workdir / "comp", {"a": 10, "b": 8}, size=24, n_test=4)
    cfg = load_config(None, [f"data.root={root}", "experiment=wb", *TINY, "train.tracker=wandb"])
    for stage in (folds_stage, train_stage, rebalance_stage, infer_stage, ens_stage):
        stage.run(cfg)
    assert {i["mode"] for i in inits} == {"offline"} and {i["group"] for i in inits} == {"wb"}
    assert [i["name"] for i in inits][:2] == ["wb fold0", "wb fold1"]
    assert inits[0]["config"]["train"]["tracker"] == "wandb"
    epochs = [x for x in logged if x[0] == "wb fold0" and x[1] != "finish"]
    assert epochs and epochs[0][1] == 1 and "valid_loss" in epochs[0][2]
    tables = {k for name, _, v in logged if name == "wb summary" and v for k in v}
    assert tables == {"rebalance/table", "infer/table", "ensemble/table"}
    summary = next(v for k, v in summaries.items() if k.startswith("wb-summary"))
    assert {"rebalance/best", "infer/cv_policy", "ensemble/cv"} <= set(summary)
    assert len({i["id"] for i in inits if i["name"] == "wb summary"}) == 1   # one run, resumed by id
    monkeypatch.setenv("WANDB_MODE", "disabled")
    inits.clear()
    ens_stage.run(cfg, force=True)
    assert inits[0]["mode"] == "disabled"
    # not installed: a warning, the stage goes on
    monkeypatch.setitem(sys.modules, "wandb", None)
    caplog.set_level("WARNING", logger="pipeline")
    ens_stage.run(cfg, force=True)
    assert "train.tracker=wandb but it is not installed" in caplog.text


def test_the_command_list_in_the_docs_is_the_generated_one():
    """docs/commands.md shows `./run.sh help` verbatim: the one command table in cli.py is its only source."""
    assert cli.help_text() in (REPO / "docs" / "commands.md").read_text()


def test_an_option_a_command_does_not_take_is_refused_naming_those_it_takes(capsys):
    assert cli.main(["train", "--zip", "--sort", "x"]) == 2
    err = capsys.readouterr().err
    assert "train does not take --zip --sort" in err and "--fold" in err and "--gpus" in err
    assert cli.main(["leaderboard", "train.epochs=3"]) == 2      # no key=value where no config is read
    assert cli.main(["2", "--help"]) == 0 and capsys.readouterr().out.startswith("train: ")   # a stage by number


def test_status_in_a_fresh_project_writes_nothing_not_even_the_demo_data(tmp_path):
    for name in ("demo.yaml", "demo_gem40.yaml"):
        shutil.copy(REPO / "configs" / name, tmp_path / name)
    r = cli_inprocess(["status", "--config", "demo.yaml"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "data/demo is not built yet" in r.stdout and "every stage will run" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.yaml", "demo_gem40.yaml"]


def test_config_and_plan_problems_are_listed_at_once_each_naming_file_and_key(tmp_path):
    make_competition(tmp_path / "comp", {"a": 4, "b": 4})
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: x\ndata: {root: comp, image_ext: .png}\nfolds: {n_splits: 2}\neval: {metric: acuracy}\n"
                   "ensemble: {method: avg, members: [x, nothere]}\ntrain: {epocs: 3}\nmodel: {arch: resnet10tt}\n")
    r = cli_inprocess(["all", "--config", str(bad)], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr
    for want in ("'eval.metric' in " + str(bad), "'ensemble.method' in " + str(bad), "'train.epocs' in " + str(bad),
                 "unknown timm model 'resnet10tt'", "'nothere' is neither"):
        assert want in err, (want, err)
    assert "5 problem(s) found before any work; nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "comp"]
