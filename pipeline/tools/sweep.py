"""`./run.sh sweep --space space.yaml --trials N`: a hyper-parameter search on Optuna whose winner's CV stays honest.

The space file names config keys and their distributions, checked against the config schema (every bound and
choice, with the base config) before the first trial:

    train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    train.mixup_alpha: {type: float, low: 0.0, high: 0.4}
    aug.img_size: {type: categorical, choices: [24, 32]}
    train.epochs: {type: int, low: 2, high: 6}
    train.layer_decay: {type: float, low: 0.6, high: 0.9, when: {model.arch: [convnext_tiny]}}   # conditional

Each trial is an ordinary experiment, `<sweep>-t<k>` (the sweep: `sweep.name`, default `<experiment>-sweep`), run
in a process of its own through the normal stages (`./run.sh all --until <sweep.through>` on a config that extends
the base one: runs/.sweeps/<sweep>/trials/<exp>.yaml): the folds file, the image store and any stage output whose
inputs an earlier trial shared are reused. Its CV is per fold: stage 2's held-out score of each fold
(through=train), or stage 4's nested policy of the primary head (through=infer).

Optuna searches: TPE with a fixed seed (`sweep.seed`); pruning (`sweep.pruner`: median or hyperband) on stage 2's
per-epoch held-out metric of the first `sweep.prune_folds` folds, read from their history.csv while the trial
runs; a pruned trial is stopped, marked, and never ranked. The study lives in a journal file under
runs/.sweeps/<sweep>/ (safe for several `sweep` processes on one machine or a shared filesystem; `sweep.storage`: an
RDB URL such as postgresql://... for many machines). Run one `sweep` process per GPU (CUDA_VISIBLE_DEVICES) or per
node: they share the study, never run a trial twice, and stop at N trials. A worker killed with kill -9 leaves its
trial RUNNING; the next worker to start (same machine: its process is gone; elsewhere: no heartbeat for
`HEARTBEAT_STALE_S`) marks it failed and queues its parameters again under the same experiment name, so stage 2
resumes it from its last checkpoint.

Honest selection: the naive winner's CV (the best mean over folds) is selected on the rows it is scored on, so it is
optimistic and labelled so. The sweep's nested CV is what to report: for each fold k, the trial best on the other
folds' held-out rows, scored on fold k, averaged over k.

    ./run.sh sweep --space space.yaml --trials 20     a worker (start several for parallel trials)
    ./run.sh sweep --status                           trials done, running, pruned; naive and nested CV
    ./run.sh sweep --finish                           the winner through stages 3-5: submissions/<sweep>-winner.csv
Outputs: runs/.sweeps/<sweep>/ (journal, trials.json: each trial's experiment, state, parameters and per-fold
scores; the trials' configs and logs), runs/<sweep>-t<k>/ (ordinary experiments), reports/<sweep>/ (the sweep page:
metric against each parameter, the history with pruned trials, parameter importance).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.config import Config, SweepCfg, load_config
from ..core.errors import PipelineError
from ..core.files import layout
from ..core.files.artifacts import pid_alive, read_json, write_json, write_text
from ..core.predict.stored import Stage4
from ..core.predict.metrics import GREATER_IS_BETTER, row_scores, score_rows
from .sweep_space import Param, read_space, space_changes, space_record, suggest  # noqa: F401  (the sweep's API)

log = logging.getLogger("pipeline")

NAME_MAX = 128  # layout.check_name's limit on experiment names
MAX_TRIALS = 99_999  # the largest trial number a sweep.name must leave room for (<sweep>-t99999)
FINISH_SUFFIX = "-winner"  # --finish's ensemble: <sweep>-winner (selected on its rows; the nested row is <sweep>)
STORAGE_CONNECT_S = 5  # how long sweep.storage's server may take to answer before it is called unreachable
HEARTBEAT_S = 10  # a running trial's worker writes its heartbeat this often
HEARTBEAT_STALE_S = 600  # a running trial without a heartbeat for this long is taken for dead (another machine)
POLL_S = 1.0


# ----------------------------------------------------------------------------- honest selection
def nested_cv(per_fold: dict[str, list[float]], greater: bool) -> dict:
    """The sweep's nested CV: for each fold k, the trial with the best mean over the other folds, scored on fold k;
    the mean over k. Also the naive winner (best mean over every fold, scored on the rows it was chosen on)."""
    names = list(per_fold)
    if not names:
        return {"naive": None, "nested": None}
    s = np.array([per_fold[n] for n in names], dtype=np.float64)
    pick = np.argmax if greater else np.argmin
    k_folds = s.shape[1]
    chosen = [names[int(pick(np.delete(s, k, axis=1).mean(1)))] if k_folds > 1 else names[int(pick(s[:, 0]))]
              for k in range(k_folds)]
    nested = [per_fold[c][k] for k, c in enumerate(chosen)]
    best = names[int(pick(s.mean(1)))]
    return {"naive": float(s.mean(1)[names.index(best)]), "winner": best, "nested": float(np.mean(nested)),
            "nested_per_fold": nested, "chosen_per_fold": chosen}


def trial_scores(run: layout.RunDir, n_splits: int, through: str, metric: str) -> list[float]:
    """A finished trial's CV per fold: stage 2's held-out score, or stage 4's (its primary head, policy, nested)."""
    if through == "train":
        return [float(read_json(run.fold(k).summary)["score"]) for k in range(n_splits)]
    s4 = read_json(run.infer_summary)
    stored = Stage4.of(run, s4["primary"], "oof", s4)
    o = stored.rows()
    rows = row_scores(o["y"], probs=stored.prob_table())  # a block of rows at a time: no rows x classes (#49)
    return [float(score_rows(metric, o["y"][o["fold"] == k], rows.take(o["fold"] == k))) for k in range(n_splits)]


# ----------------------------------------------------------------------------- the sweep, resolved
@dataclass(frozen=True)
class Sweep:
    """What a sweep command reads from the config, once (`Sweep.of`): its name and folder, the `sweep` section, the
    base config (file and overrides: every trial starts from it), the space, the metric and the folds."""
    name: str
    dir: layout.SweepDir
    s: SweepCfg
    base: Path | None
    overrides: tuple[str, ...]
    space: tuple[Param, ...]
    metric: str
    n_splits: int

    @classmethod
    def of(cls, cfg: Config, overrides: list[str], space: str | None, need_space: bool = True) -> "Sweep":
        from .plan import config_problems

        name = layout.check_name(cfg.sweep.name or f"{cfg.experiment}-sweep", "sweep.name")
        longest = max(f"{name}-t{MAX_TRIALS}", f"{name}{FINISH_SUFFIX}", key=len)
        if len(longest) > NAME_MAX:
            raise PipelineError(f"sweep.name is {len(name)} characters: the names it gives ({longest[:20]}...: "
                                f"<sweep.name>-t<k> for trials, <sweep.name>{FINISH_SUFFIX} for --finish) must stay "
                                f"within {NAME_MAX}; use at most {NAME_MAX - (len(longest) - len(name))} characters")
        if cfg.sweep.storage:
            why = storage_problem(cfg.sweep.storage)
            if why:
                raise PipelineError(f"config sweep.storage {cfg.sweep.storage!r}: {why}; nothing was created")
        base = Path(cfg.source) if cfg.source not in ("", "defaults") else None
        path = space or cfg.sweep.space
        if path and not space and base is not None and not Path(path).is_absolute():
            path = base.parent / path  # sweep.space is relative to its config file
        plan = lambda c: config_problems(c.experiment, c.model, c.train, c.ensemble.name or c.experiment)  # noqa: E731
        params = tuple(read_space(Path(path), base, overrides, plan)) if path else ()
        if need_space and not params:
            raise PipelineError("sweep needs a search space: --space FILE (or sweep.space in the config)")
        return cls(name, layout.SweepDir.of(name), cfg.sweep, base, tuple(overrides), params, cfg.eval.scorer,
                   cfg.folds.n_splits)

    @property
    def greater(self) -> bool:
        return GREATER_IS_BETTER[self.metric]

    def trial_config(self, exp: str, values: dict) -> str:
        """The trial's resolved config (YAML): the base config and overrides, the trial's values, its experiment name;
        it runs alone (no run_also, no ensemble members)."""
        extra = [f"{k}={json.dumps(v)}" for k, v in values.items()]
        c = load_config(self.base, [*self.overrides, *extra, f"experiment={exp}", "run_also=[]",
                                    "ensemble.members=[]", "ensemble.name=''"])
        return c.to_yaml()


# ----------------------------------------------------------------------------- where the study lives
def storage_problem(url: str) -> str | None:
    """Why an RDB URL (sweep.storage) cannot hold a study (None: it can), found before anything is created: not a
    URL, a database SQLAlchemy does not know, its driver not installed, a SQLite file in a folder that does not exist
    (or in memory: workers could not share it), a server that does not answer within STORAGE_CONNECT_S."""
    from sqlalchemy import create_engine, exc
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    try:
        u = make_url(url)
    except (exc.ArgumentError, ValueError):
        return ("not a database URL (e.g. postgresql+psycopg://user:password@host:5432/db, "
                "sqlite:////absolute/path/sweeps.db; leave it empty for the journal file under runs/.sweeps/)")
    try:
        u.get_dialect().import_dbapi()
    except exc.NoSuchModuleError:
        return f"SQLAlchemy knows no database '{u.drivername}'"
    except ImportError as e:
        return f"the driver of '{u.drivername}' is not installed ({e}; for postgresql+psycopg: pip install psycopg)"
    if u.get_backend_name() == "sqlite":
        if not u.database or u.database == ":memory:":
            return "an in-memory SQLite database cannot be shared by workers: name a file"
        folder = Path(u.database).resolve().parent
        return None if folder.is_dir() else f"the folder of the SQLite file ({folder}) does not exist"
    args = {"connect_timeout": STORAGE_CONNECT_S} if u.get_backend_name() in ("postgresql", "mysql", "mariadb") else {}
    engine = create_engine(u, connect_args=args, poolclass=NullPool)
    try:
        with engine.connect():
            return None
    except exc.SQLAlchemyError as e:
        first = (str(getattr(e, "orig", None) or e).strip().splitlines() or ["no answer"])[0]
        return f"the database cannot be reached ({first})"
    finally:
        engine.dispose()


def _rdb_holds(url: str, study: str) -> bool:
    """Does the database at `url` hold the study (read only: a missing SQLite file is not created)?"""
    from sqlalchemy import create_engine, inspect, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    u = make_url(url)
    if u.get_backend_name() == "sqlite" and not Path(u.database).is_file():
        return False
    engine = create_engine(u, poolclass=NullPool)
    try:
        with engine.connect() as c:
            if "studies" not in inspect(c).get_table_names():
                return False
            return c.execute(text("SELECT 1 FROM studies WHERE study_name = :n"), {"n": study}).first() is not None
    finally:
        engine.dispose()


@contextlib.contextmanager
def _journal_lock(path: Path):
    """The lock Optuna's journal takes around each append (no worker writes while it is held)."""
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def journal_damage(data: bytes, path: Path) -> tuple[int, str | None]:
    """(bytes of a cut last record to drop, why the journal is damaged beyond that or None). A worker killed while
    appending leaves its last line cut: Optuna's reader skips it, and dropping it repairs the file; a line that is
    not a record anywhere else (what appending after a cut line makes) cannot be repaired."""
    cut = len(data) - (data.rfind(b"\n") + 1)
    for i, line in enumerate(data[:len(data) - cut].splitlines(), start=1):
        try:
            json.loads(line)
        except ValueError:
            return cut, (f"{path}: line {i} is not a journal record (damaged); restore the file from a copy, or start "
                         f"another study (sweep.name=<another name>)")
    return cut, None


def repair_journal(path: Path) -> None:
    """Drop a cut last record (a worker killed mid-write) under Optuna's journal lock; refuse a damaged journal naming
    it. Workers call this before they append: a record appended to a cut line would make the journal unreadable."""
    if not path.exists():
        return
    with _journal_lock(path):
        data = path.read_bytes()
        cut, why = journal_damage(data, path)
        if why:
            raise PipelineError(why)
        if cut:
            with open(path, "r+b") as f:
                f.truncate(len(data) - cut)
            log.warning("sweep: %s ended in a cut record (%d bytes: a worker killed while writing it): dropped, as "
                        "Optuna's reader skips it", path, cut)


def _study_args(sw: Sweep, n: int) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=sw.s.startup_trials, n_warmup_steps=1),
              "hyperband": optuna.pruners.HyperbandPruner(min_resource=1),
              "none": optuna.pruners.NopPruner()}[sw.s.pruner]
    sampler = optuna.samplers.TPESampler(seed=sw.s.seed + n, n_startup_trials=sw.s.startup_trials)
    return {"study_name": sw.name, "sampler": sampler, "pruner": pruner}


def _journal(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def open_study(sw: Sweep, n: int = 0):
    """The sweep's Optuna study for a worker (created on first use): TPE seeded with sweep.seed + n (`n`: the trials
    the study holds when the next one is asked for, so workers that start together draw different parameters and one
    worker is reproducible), the pruner, the direction of the metric; a journal file under runs/.sweeps/<sweep>/
    (a cut last record repaired first) unless sweep.storage names an RDB URL."""
    import optuna

    sw.dir.dir.mkdir(parents=True, exist_ok=True)
    if not sw.s.storage:
        repair_journal(sw.dir.journal)
    storage = optuna.storages.get_storage(sw.s.storage) if sw.s.storage else _journal(sw.dir.journal)
    try:  # loading appends nothing (create_study(load_if_exists) appends a create record to the journal each time)
        return optuna.load_study(storage=storage, **_study_args(sw, n))
    except KeyError:
        return optuna.create_study(storage=storage, direction="maximize" if sw.greater else "minimize",
                                   load_if_exists=True, **_study_args(sw, n))


def load_study(sw: Sweep):
    """The study as it is, for --status and --finish: nothing is written (no journal record, no database, no empty
    study), and None when the sweep has not started."""
    import optuna

    if sw.s.storage:
        if not _rdb_holds(sw.s.storage, sw.name):
            return None
        storage = sw.s.storage
    else:
        if not sw.dir.journal.is_file():
            return None
        _, why = journal_damage(sw.dir.journal.read_bytes(), sw.dir.journal)
        if why:
            raise PipelineError(why)
        storage = _journal(sw.dir.journal)
    try:
        return optuna.load_study(storage=storage, **_study_args(sw, 0))
    except KeyError:
        return None


def check_space(study, sw: Sweep) -> None:
    """A worker's space must be the one the study started with (Optuna refuses another distribution of a key at the
    trial, after the trial is RUNNING): the space is recorded with the study, and a study recorded without it is
    compared with the distributions of its trials."""
    from optuna.distributions import distribution_to_json

    recorded = study.user_attrs.get("space")
    trials = study.get_trials(deepcopy=False)
    if recorded is None and trials:
        recorded = {}
        for t in trials:
            recorded.update({k: distribution_to_json(d) for k, d in t.distributions.items()})
        changes = [c for c in space_changes(list(sw.space), recorded) if not c.endswith(" added")]
    elif recorded is None:
        study.set_user_attr("space", space_record(list(sw.space)))
        return
    else:
        changes = space_changes(list(sw.space), recorded)
    if changes:
        raise PipelineError(f"sweep {sw.name}: the space changed since its study started ({'; '.join(changes)}); "
                            f"run the workers with the space it started with, or start another study: "
                            f"sweep.name={sw.name}-2 (its trials are new experiments)")


@contextlib.contextmanager
def _lock(path: Path):
    """One worker at a time between counting the trials and asking for the next (no trial beyond N)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def requeue_orphans(study, sw: Sweep) -> list[int]:
    """RUNNING trials whose worker is gone (this machine: its process ended; any machine: no heartbeat for
    HEARTBEAT_STALE_S): marked failed, and their parameters queued again under the same experiment name, so the
    next trial resumes their stage-2 checkpoints. Their trial process, if it outlived its worker, is stopped first."""
    from optuna.trial import TrialState

    host, now, out = socket.gethostname(), time.time(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        a = t.user_attrs
        if a.get("pid") == os.getpid():
            continue
        here = a.get("host") == host
        dead = (here and a.get("pid") and not pid_alive(int(a["pid"]))) or now - float(a.get("beat", 0)) > HEARTBEAT_STALE_S
        if not dead:
            continue
        if here and a.get("child") and pid_alive(int(a["child"])):
            _stop(int(a["child"]))
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"experiment": a.get("experiment", f"{sw.name}-t{t.number}"),
                                                  "retry_of": t.number})
        log.warning("sweep %s: trial %d (%s) lost its worker: queued again (it resumes from its checkpoints)",
                    sw.name, t.number, a.get("experiment"))
        out.append(t.number)
    return out


def _stop(pid: int, grace: float = 30.0) -> None:
    """Stop a trial process and its children (its own process group): SIGTERM, then SIGKILL after `grace` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        end = time.time() + wait
        while time.time() < end and pid_alive(pid):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:  # not our child: poll until gone
                pass
            time.sleep(0.2)


def _die_with_parent() -> None:  # pragma: no cover - runs in the trial process before exec
    """The trial process gets SIGTERM when its worker dies (Linux), even by kill -9."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------- one trial
@dataclass
class Outcome:
    state: str  # complete, pruned, fail
    per_fold: list[float] | None = None
    error: str = ""


def report_epochs(trial, run: layout.RunDir, sw: Sweep, reported: set) -> bool:
    """Stage 2's per-epoch held-out metric of the first sweep.prune_folds folds (their history.csv, written each
    epoch) as the trial's intermediate values, step = fold x 1000 + epoch. True when a value was added."""
    import pandas as pd

    new = False
    for k in range(min(sw.s.prune_folds, sw.n_splits)):
        path = run.fold(k).history
        if not path.exists():
            continue
        try:
            h = pd.read_csv(path)
        except (OSError, ValueError):  # being replaced: read it next time
            continue
        for e, v in enumerate(h.get("score", [])):
            step = k * 1000 + e
            if step not in reported and np.isfinite(v):
                trial.report(float(v), step)
                reported.add(step)
                new = True
    return new


def run_trial(sw: Sweep, trial, exp: str, values: dict) -> Outcome:
    """The trial's experiment through `./run.sh all --until <sweep.through>` in a process of its own (its output in
    runs/.sweeps/<sweep>/logs/<exp>.log), pruned when Optuna says so; its per-fold CV when it finishes."""
    write_text(sw.dir.trial_config(exp), sw.trial_config(exp, values))
    run = layout.RunDir.of(exp)
    cmd = [sys.executable, "-m", "pipeline", "all", "--config", str(sw.dir.trial_config(exp)), "--until",
           sw.s.through]
    sw.dir.logs.mkdir(parents=True, exist_ok=True)
    reported, beat = set(), 0.0
    with open(sw.dir.trial_log(exp), "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        trial.set_user_attr("child", proc.pid)
        try:
            while proc.poll() is None:
                time.sleep(POLL_S)
                if time.time() - beat > HEARTBEAT_S:
                    trial.set_user_attr("beat", beat := time.time())
                if sw.s.pruner != "none" and report_epochs(trial, run, sw, reported) and trial.should_prune():
                    _stop(proc.pid)
                    return Outcome("pruned")
        except BaseException:
            _stop(proc.pid)
            raise
    if proc.returncode != 0:
        tail = [x for x in sw.dir.trial_log(exp).read_text().splitlines() if x.strip()][-3:]
        return Outcome("fail", error=" | ".join(tail)[-400:])
    return Outcome("complete", trial_scores(run, sw.n_splits, sw.s.through, sw.metric))


def _ask(study, sw: Sweep, trials: int):
    """(study, the next trial (a queued retry first), its experiment, its values), or Nones when the study holds
    `trials` trials done, pruned or running. The sampler is seeded by the trial's place in the study."""
    from optuna.trial import TrialState

    with _lock(sw.dir.lock):
        requeue_orphans(study, sw)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        live = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        if not waiting and len(live) >= trials:
            return study, None, None, None
        study = open_study(sw, len(study.get_trials(deepcopy=False)))
        trial = study.ask()
        values = suggest(trial, list(sw.space))
        exp = trial.user_attrs.get("experiment") or f"{sw.name}-t{trial.number}"
        for k, v in (("experiment", exp), ("host", socket.gethostname()), ("pid", os.getpid()), ("beat", time.time())):
            trial.set_user_attr(k, v)
    return study, trial, exp, values


def work(sw: Sweep, trials: int) -> dict:
    """One worker: trials until the study holds `trials` of them (several workers share the count); then the
    sweep's table, nested CV and page. Two failed trials in a row stop the worker (a broken setting, not noise)."""
    from optuna.trial import TrialState

    study = open_study(sw)
    check_space(study, sw)
    failed = 0
    while True:
        study, trial, exp, values = _ask(study, sw, trials)
        if trial is None:
            break
        log.info("sweep %s: trial %d (%s): %s", sw.name, trial.number, exp,
                 ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
        try:
            o = run_trial(sw, trial, exp, values)
        except BaseException:  # interrupted: this trial goes back to the queue (it resumes from its checkpoints)
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"experiment": exp, "retry_of": trial.number})
            write_trials(study, sw)
            raise
        if o.state == "complete":
            trial.set_user_attr("per_fold", o.per_fold)
            study.tell(trial, float(np.mean(o.per_fold)))
            log.info("sweep %s: trial %d done: %s %.4f (per fold %s)", sw.name, trial.number, sw.metric,
                     np.mean(o.per_fold), " ".join(f"{v:.4f}" for v in o.per_fold))
        elif o.state == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
            log.info("sweep %s: trial %d pruned (stage 2's held-out metric behind the other trials')", sw.name,
                     trial.number)
        else:
            trial.set_user_attr("error", o.error)
            study.tell(trial, state=TrialState.FAIL)
            log.warning("sweep %s: trial %d failed: %s (%s)", sw.name, trial.number, o.error, sw.dir.trial_log(exp))
        write_trials(study, sw)
        failed = failed + 1 if o.state == "fail" else 0
        if failed >= 2:
            raise PipelineError(f"sweep {sw.name}: two trials in a row failed; see {sw.dir.logs}/ (last: {o.error})")
    return summary(study, sw)


# ----------------------------------------------------------------------------- the record, status, finish
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "queued"}


def trial_rows(study) -> list[dict]:
    """Every trial of the study: number, experiment, state, parameters, value, per-fold CV, intermediate values."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append({"trial": t.number, "experiment": a.get("experiment", ""), "state": STATES.get(t.state.name, "?"),
                     "params": dict(t.params), "value": t.value, "per_fold": a.get("per_fold"),
                     "intermediate": {int(k): float(v) for k, v in t.intermediate_values.items()},
                     "retry_of": a.get("retry_of"), "error": a.get("error", ""),
                     "worker": f"{a.get('host')}:{a.get('pid')}" if a.get("pid") else ""})
    return rows


def summary(study, sw: Sweep) -> dict:
    rows = trial_rows(study)
    done = {r["experiment"]: r["per_fold"] for r in rows if r["state"] == "complete" and r["per_fold"]}
    sel = nested_cv(done, sw.greater)
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES.values()}
    return {"sweep": sw.name, "metric": sw.metric, "through": sw.s.through, "n_splits": sw.n_splits,
            "counts": counts, "selection": sel, "trials": rows,
            "space": [{"key": p.key, "type": p.kind, "low": p.low, "high": p.high, "log": p.log,
                       "choices": list(p.choices), "when": {k: list(v) for k, v in p.when.items()}} for p in sw.space]}


def write_trials(study, sw: Sweep) -> dict:
    """runs/.sweeps/<sweep>/trials.json (what the leaderboard reads: which experiments are trials, in what state)."""
    s = summary(study, sw)
    old = read_json(sw.dir.trials) if sw.dir.trials.exists() else None
    if not s["space"] and old:  # --status / --finish without --space: the space as recorded
        s["space"] = old.get("space", [])
    if json.loads(json.dumps(s)) != old:  # --status of an unchanged study rewrites nothing
        write_json(sw.dir.trials, s)
    return s


def status_text(s: dict) -> str:
    import pandas as pd

    sel, metric = s["selection"], s["metric"]
    lines = [f"sweep {s['sweep']} ({metric}, trials through stage {s['through']}): "
             + ", ".join(f"{n} {k}" for k, n in s["counts"].items() if n)]
    if s["trials"]:
        t = pd.DataFrame([{"trial": r["trial"], "experiment": r["experiment"], "state": r["state"],
                           "cv": r["value"], **{k: v for k, v in r["params"].items()}} for r in s["trials"]])
        lines.append(t.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep=""))
    if sel.get("naive") is not None:
        lines.append(f"naive winner {sel['winner']}: CV {sel['naive']:.4f} -- selected on the rows it is scored on "
                     f"(optimistic, not ranked as such)")
        lines.append(f"nested sweep CV {sel['nested']:.4f} (fold k scored by the trial best on the other folds: "
                     f"{', '.join(sel['chosen_per_fold'])}): the figure to report")
    return "\n".join(lines)


def finish(sw: Sweep, s: dict) -> dict:
    """The naive winner as an ordinary experiment through stages 1-5 (its submission: submissions/<sweep>-winner.csv,
    an ensemble of the winner that the leaderboard marks as selected on its rows and ranks last; the sweep's own row,
    <sweep>, is its nested CV); its config kept as runs/.sweeps/<sweep>/best.yaml."""
    sel = s["selection"]
    if sel.get("winner") is None:
        raise PipelineError(f"sweep {sw.name}: no finished trial yet (./run.sh sweep --status)")
    cfg_file = sw.dir.trial_config(sel["winner"])
    write_text(sw.dir.best, cfg_file.read_text())
    name = f"{sw.name}{FINISH_SUFFIX}"
    cmd = [sys.executable, "-m", "pipeline", "all", "--config", str(cfg_file), f"ensemble.name={name}"]
    log.info("sweep %s: the winner %s through stages 1-5: %s", sw.name, sel["winner"], " ".join(cmd))
    if subprocess.run(cmd).returncode != 0:
        raise PipelineError(f"sweep {sw.name}: `{' '.join(cmd)}` failed (see its messages above)")
    log.info("sweep %s: submission %s from %s; report the nested sweep CV %.4f (the winner's own %.4f was chosen on "
             "its rows)", sw.name, layout.submission_csv(name), sel["winner"], sel["nested"], sel["naive"])
    return sel


def run(cfg: Config, overrides: list[str], space: str | None = None, trials: int | None = None,
        show: bool = False, finish_: bool = False) -> dict:
    """The sweep command: a worker (default), --status, or --finish."""
    sw = Sweep.of(cfg, overrides, space, need_space=not (show or finish_))
    if not (show or finish_):
        s = work(sw, trials or sw.s.trials)
        study = load_study(sw)
    else:
        study = load_study(sw)
        if study is None:
            where = sw.s.storage and "sweep.storage" or sw.dir.journal
            raise PipelineError(f"sweep {sw.name} has not started (no study in {where}): ./run.sh sweep --space FILE")
        s = write_trials(study, sw)
    from .reports import sweep_page

    page = sweep_page.write(s, _importance(sw, study) if s["counts"]["complete"] >= 2 else {})
    print(status_text(s))
    print(f"sweep page: {page}")
    if finish_:
        finish(sw, s)
    return s


def _importance(sw: Sweep, study) -> dict:
    """Optuna's parameter importance (its default evaluator: PED-ANOVA) over the finished trials; {} when it cannot be
    computed."""
    import optuna

    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError) as e:
        log.info("sweep %s: no parameter importance (%s)", sw.name, e)
        return {}
