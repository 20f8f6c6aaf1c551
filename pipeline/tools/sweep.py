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
    ./run.sh sweep --finish                           the winner through stages 3-5: submissions/<sweep>.csv
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..core.config import Config, ConfigError, SweepCfg, load_config, schema
from ..core.errors import PipelineError
from ..core.files import layout
from ..core.files.artifacts import pid_alive, read_json, write_json, write_text
from ..core.predict.stored import Stage4
from ..core.predict.metrics import GREATER_IS_BETTER, score

log = logging.getLogger("pipeline")

KINDS = ("float", "int", "categorical")
HEARTBEAT_S = 10  # a running trial's worker writes its heartbeat this often
HEARTBEAT_STALE_S = 600  # a running trial without a heartbeat for this long is taken for dead (another machine)
POLL_S = 1.0


# ----------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class Param:
    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: dict = field(default_factory=dict)  # {other key of the space: allowed values}

    def probes(self) -> list:
        """The values to check against the schema: the bounds, or every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def active(self, values: dict) -> bool:
        return all(values.get(k) in allowed for k, allowed in self.when.items())


def _param(key: str, spec, where: str) -> Param:
    if not isinstance(spec, dict):
        raise PipelineError(f"{where}: '{key}' must map to {{type: float|int|categorical, ...}}, not {spec!r}")
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices", "when"}
    kind = spec.get("type")
    if unknown or kind not in KINDS:
        raise PipelineError(f"{where}: '{key}': " + (f"unknown entries {sorted(unknown)}" if unknown else
                                                     f"type must be one of {list(KINDS)}, not {kind!r}"))
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise PipelineError(f"{where}: '{key}': when must map keys of the space to a value or a list of values")
    when = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in when.items()}
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise PipelineError(f"{where}: '{key}': a categorical needs a non-empty list of choices")
        return Param(key, kind, choices=tuple(choices), when=when)
    low, high, log_ = spec.get("low"), spec.get("high"), bool(spec.get("log", False))
    num = (int,) if kind == "int" else (int, float)
    if not isinstance(low, num) or not isinstance(high, num) or isinstance(low, bool) or not low < high:
        raise PipelineError(f"{where}: '{key}': needs numbers low < high ({kind}), got low={low!r} high={high!r}")
    if log_ and low <= 0:
        raise PipelineError(f"{where}: '{key}': a log scale needs low > 0, got {low!r}")
    return Param(key, kind, low, high, log_, spec.get("step"), when=when)


def read_space(path: Path, base: Path | None, overrides: list[str]) -> list[Param]:
    """The search space, every key a config key and every bound or choice a value the base config accepts (each
    problem named with the space file and key; none is found only after trials ran)."""
    if not Path(path).is_file():
        raise PipelineError(f"sweep space file not found: {path} (--space, or sweep.space in the config)")
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise PipelineError(f"{path}: the space must map config keys to distributions (see ./run.sh sweep --help)")
    keys = {k.name for k in schema()}
    params, problems = [], []
    for key_, spec in raw.items():
        if key_ not in keys:
            near = _near(str(key_), sorted(keys))
            problems.append(f"{path}: '{key_}' is not a config key" + (f"; did you mean '{near}'?" if near else ""))
            continue
        if key_ in ("experiment", "run_also") or key_.startswith("sweep."):
            problems.append(f"{path}: '{key_}' cannot be swept (it names or runs experiments, not what they learn)")
            continue
        try:
            params.append(_param(key_, spec, str(path)))
        except PipelineError as e:
            problems.append(str(e))
    names = [p.key for p in params]
    for i, p in enumerate(params):
        late = [k for k in p.when if k not in names[:i]]
        if late:
            problems.append(f"{path}: '{p.key}': when names {late}, which are not keys of the space listed above it")
        for v in p.probes():
            try:
                load_config(base, [*overrides, f"{p.key}={json.dumps(v)}"])
            except ConfigError as e:
                problems += [f"{path}: '{p.key}' = {v!r}: {x}" for x in e.problems]
            except PipelineError as e:
                problems.append(f"{path}: '{p.key}' = {v!r}: {e}")
    if problems:
        raise PipelineError(f"{len(problems)} problem(s) in the sweep space; no trial was run:\n"
                            + "\n".join(f"  - {x}" for x in problems))
    return params


def _near(word: str, options: list[str]) -> str | None:
    import difflib

    got = difflib.get_close_matches(word, options, n=1, cutoff=0.7)
    return got[0] if got else None


def suggest(trial, params: list[Param]) -> dict:
    """The trial's values of the active parameters (a conditional one only where its `when` holds)."""
    values = {}
    for p in params:
        if not p.active(values):
            continue
        if p.kind == "categorical":
            values[p.key] = trial.suggest_categorical(p.key, list(p.choices))
        elif p.kind == "int":
            values[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            values[p.key] = trial.suggest_float(p.key, float(p.low), float(p.high), step=p.step, log=p.log)
    return values


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
    o, probs = stored.rows(), stored.probs()
    return [float(score(metric, o["y"][o["fold"] == k], probs[o["fold"] == k])) for k in range(n_splits)]


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
        name = layout.check_name(cfg.sweep.name or f"{cfg.experiment}-sweep", "sweep.name")
        base = Path(cfg.source) if cfg.source not in ("", "defaults") else None
        path = space or cfg.sweep.space
        if path and not space and base is not None and not Path(path).is_absolute():
            path = base.parent / path  # sweep.space is relative to its config file
        params = tuple(read_space(Path(path), base, overrides)) if path else ()
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
        from ..core.config import config_to_yaml

        extra = [f"{k}={json.dumps(v)}" for k, v in values.items()]
        c = load_config(self.base, [*self.overrides, *extra, f"experiment={exp}", "run_also=[]",
                                    "ensemble.members=[]", "ensemble.name=''"])
        return config_to_yaml(c)


def open_study(sw: Sweep, n: int = 0):
    """The sweep's Optuna study (created on first use): TPE seeded with sweep.seed + n (`n`: the trials the study
    holds when the next one is asked for, so workers that start together draw different parameters and one worker
    is reproducible), the pruner, the direction of the metric; a journal file under runs/.sweeps/<sweep>/ unless
    sweep.storage names an RDB URL."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sw.dir.dir.mkdir(parents=True, exist_ok=True)
    storage = sw.s.storage or JournalStorage(JournalFileBackend(str(sw.dir.journal)))
    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=sw.s.startup_trials, n_warmup_steps=1),
              "hyperband": optuna.pruners.HyperbandPruner(min_resource=1),
              "none": optuna.pruners.NopPruner()}[sw.s.pruner]
    sampler = optuna.samplers.TPESampler(seed=sw.s.seed + n, n_startup_trials=sw.s.startup_trials)
    return optuna.create_study(study_name=sw.name, storage=storage, sampler=sampler, pruner=pruner,
                               direction="maximize" if sw.greater else "minimize", load_if_exists=True)


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
    if not s["space"] and sw.dir.trials.exists():  # --status / --finish without --space: the space as recorded
        s["space"] = read_json(sw.dir.trials).get("space", [])
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
    """The naive winner as an ordinary experiment through stages 1-5 (its submission: submissions/<sweep>.csv); its
    config kept as runs/.sweeps/<sweep>/best.yaml."""
    sel = s["selection"]
    if sel.get("winner") is None:
        raise PipelineError(f"sweep {sw.name}: no finished trial yet (./run.sh sweep --status)")
    cfg_file = sw.dir.trial_config(sel["winner"])
    write_text(sw.dir.best, cfg_file.read_text())
    cmd = [sys.executable, "-m", "pipeline", "all", "--config", str(cfg_file), f"ensemble.name={sw.name}"]
    log.info("sweep %s: the winner %s through stages 1-5: %s", sw.name, sel["winner"], " ".join(cmd))
    if subprocess.run(cmd).returncode != 0:
        raise PipelineError(f"sweep {sw.name}: `{' '.join(cmd)}` failed (see its messages above)")
    log.info("sweep %s: submission %s from %s; report the nested sweep CV %.4f (the winner's own %.4f was chosen on "
             "its rows)", sw.name, layout.submission_csv(sw.name), sel["winner"], sel["nested"], sel["naive"])
    return sel


def run(cfg: Config, overrides: list[str], space: str | None = None, trials: int | None = None,
        show: bool = False, finish_: bool = False) -> dict:
    """The sweep command: a worker (default), --status, or --finish."""
    sw = Sweep.of(cfg, overrides, space, need_space=not (show or finish_))
    if not (show or finish_):
        s = work(sw, trials or sw.s.trials)
    else:
        if not sw.s.storage and not sw.dir.journal.exists():
            raise PipelineError(f"sweep {sw.name} has not started ({sw.dir.journal} not found): ./run.sh sweep "
                                f"--space FILE")
        s = write_trials(open_study(sw), sw)
    from .reports import sweep_page

    page = sweep_page.write(s, _importance(sw) if s["counts"]["complete"] >= 2 else {})
    print(status_text(s))
    print(f"sweep page: {page}")
    if finish_:
        finish(sw, s)
    return s


def _importance(sw: Sweep) -> dict:
    """Optuna's parameter importance (its default evaluator: PED-ANOVA) over the finished trials; {} when it cannot be
    computed."""
    import optuna

    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(open_study(sw)).items()}
    except (ValueError, RuntimeError) as e:
        log.info("sweep %s: no parameter importance (%s)", sw.name, e)
        return {}
