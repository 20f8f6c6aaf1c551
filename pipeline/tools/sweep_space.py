"""A sweep's search space: read from its YAML file and checked whole before any study, journal or trial exists.

Every entry names a config key and a distribution. What is refused, each problem named with the space file and key
(all of them at once): a key that is not a config key or cannot be swept; a key given twice (as config files
refuse); an unknown entry, a `type` other than float / int / categorical; bounds that are not numbers with
low < high; `log` that is not true / false (the string "false" is not false); `step` that is not a positive number,
is combined with `log`, does not divide high - low, or is not an integer for an int; a float distribution on an
integer key; a categorical without choices, or with a choice twice; a `when` on a key not listed above it, or with a
value its parent can never take; and every bound and choice the base config refuses, or that the plan of `all`
refuses (an unknown model name, weights that are missing). A list- or mapping-valued choice (`infer.views:
[[orig], [orig, hflip]]`) is handed to Optuna as its JSON text and decoded for the trial.
"""
from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import ConfigError, load_config, read_yaml, schema
from ..core.errors import PipelineError

KINDS = ("float", "int", "categorical")
ENTRIES = {"type", "low", "high", "log", "step", "choices", "when"}
SCALARS = (str, int, float, bool, type(None))  # what Optuna stores as a categorical choice as it is


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

    def encoded(self) -> list:
        """The choices as Optuna stores them: scalars as they are, lists and mappings as their JSON text."""
        return [c if isinstance(c, SCALARS) else encode(c) for c in self.choices]

    def distribution(self):
        """Optuna's distribution of this parameter (what a study records for it)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "categorical":
            return CategoricalDistribution(self.encoded())
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def can_take(self, v) -> bool:
        if self.kind == "categorical":
            return v in self.choices
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (self.kind == "int" and v != int(v)):
            return False
        return self.low <= v <= self.high


def encode(v) -> str:
    return json.dumps(v, sort_keys=True)


def decode(p: Param, v):
    """A trial's value of `p` as the config takes it (a JSON-encoded list or mapping choice decoded)."""
    if p.kind == "categorical" and isinstance(v, str) and v not in p.choices:
        return json.loads(v)
    return v


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_key(key: str) -> bool:
    """Does the schema give `key` an integer type (int or Optional[int])?"""
    t = next(k.type for k in schema() if k.name == key)
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return t is int or (typing.get_origin(t) in (typing.Union, types.UnionType) and args == [int])


def _param(key: str, spec, where: str) -> Param:
    if not isinstance(spec, dict):
        raise PipelineError(f"{where}: '{key}' must map to {{type: float|int|categorical, ...}}, not {spec!r}")
    unknown = set(spec) - ENTRIES
    kind = spec.get("type")
    if unknown or kind not in KINDS:
        raise PipelineError(f"{where}: '{key}': " + (f"unknown entries {sorted(unknown)}" if unknown else
                                                     f"type must be one of {list(KINDS)}, not {kind!r}"))
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise PipelineError(f"{where}: '{key}': when must map keys of the space to a value or a list of values")
    when = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in when.items()}
    if kind == "categorical":
        extra = set(spec) & {"low", "high", "log", "step"}
        choices = spec.get("choices")
        if extra:
            raise PipelineError(f"{where}: '{key}': a categorical takes choices, not {sorted(extra)}")
        if not isinstance(choices, list) or not choices:
            raise PipelineError(f"{where}: '{key}': a categorical needs a non-empty list of choices")
        seen = [encode(c) for c in choices]
        twice = sorted({c for c in seen if seen.count(c) > 1})
        if twice:
            raise PipelineError(f"{where}: '{key}': lists the choice(s) {twice} twice")
        return Param(key, kind, choices=tuple(choices), when=when)
    if "choices" in spec:
        raise PipelineError(f"{where}: '{key}': choices belong to type: categorical, not {kind}")
    low, high, log_, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    if kind == "int" and not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
        raise PipelineError(f"{where}: '{key}': an int needs integer bounds, got low={low!r} high={high!r}")
    if not _number(low) or not _number(high) or not low < high:
        raise PipelineError(f"{where}: '{key}': needs numbers low < high ({kind}), got low={low!r} high={high!r}")
    if not isinstance(log_, bool):
        raise PipelineError(f"{where}: '{key}': log must be true or false, not {log_!r}")
    if log_ and low <= 0:
        raise PipelineError(f"{where}: '{key}': a log scale needs low > 0, got {low!r}")
    if step is not None:
        if not _number(step) or step <= 0 or (kind == "int" and step != int(step)):
            raise PipelineError(f"{where}: '{key}': step must be a positive {'integer' if kind == 'int' else 'number'}"
                                f", got {step!r}")
        if log_:
            raise PipelineError(f"{where}: '{key}': step and log: true cannot be combined (Optuna samples a log scale "
                                f"without steps): drop one")
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
            raise PipelineError(f"{where}: '{key}': step {step} does not divide high - low = {high - low:g}; e.g. "
                                f"high: {low + math.floor(n) * step:g}")
    if kind == "float" and _int_key(key):
        raise PipelineError(f"{where}: '{key}' is an integer key: use type: int (a float would give the trial "
                            f"values such as 2.7)")
    return Param(key, kind, low, high, log_, step, when=when)


def _when_problems(path, params: list[Param]) -> list[str]:
    out, names = [], [p.key for p in params]
    for i, p in enumerate(params):
        late = [k for k in p.when if k not in names[:i]]
        if late:
            out.append(f"{path}: '{p.key}': when names {late}, which are not keys of the space listed above it")
            continue
        for k, allowed in p.when.items():
            parent = params[names.index(k)]
            never = [v for v in allowed if not parent.can_take(v)]
            if never:
                out.append(f"{path}: '{p.key}': when {k} is {never}: a value '{k}' never takes "
                           + (f"(its choices: {list(parent.choices)})" if parent.kind == "categorical"
                              else f"(it lies in [{parent.low}, {parent.high}])"))
    return out


def read_space(path: Path, base: Path | None, overrides: list[str], check_plan=None) -> list[Param]:
    """The search space, every key a config key and every bound or choice a value the base config accepts (each
    problem named with the space file and key; none is found only after trials ran). `check_plan(cfg)` -> problems:
    the checks `all` runs before any work (model names, weights), run for every bound and choice."""
    if not Path(path).is_file():
        raise PipelineError(f"sweep space file not found: {path} (--space, or sweep.space in the config)")
    if not Path(path).read_bytes().strip():
        raw = None
    else:
        try:
            raw = read_yaml(Path(path))
        except PipelineError as e:
            raise PipelineError(f"sweep space: {e}") from None
    if not raw:
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
    problems += _when_problems(path, params)
    for p in params:
        for v in p.probes():
            try:
                cfg = load_config(base, [*overrides, f"{p.key}={json.dumps(v)}"])
            except ConfigError as e:
                problems += [f"{path}: '{p.key}' = {v!r}: {x}" for x in e.problems]
                continue
            except PipelineError as e:
                problems.append(f"{path}: '{p.key}' = {v!r}: {e}")
                continue
            problems += [f"{path}: '{p.key}' = {v!r}: {x}" for x in (check_plan(cfg) if check_plan else [])]
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
            values[p.key] = decode(p, trial.suggest_categorical(p.key, p.encoded()))
        elif p.kind == "int":
            values[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            values[p.key] = trial.suggest_float(p.key, float(p.low), float(p.high), step=p.step, log=p.log)
    return values


def space_changes(params: list[Param], recorded: dict) -> list[str]:
    """How the space differs from the one a study recorded ({key: Optuna distribution as JSON}): keys added, removed
    or with another distribution (empty: the same space)."""
    from optuna.distributions import distribution_to_json

    now = {p.key: distribution_to_json(p.distribution()) for p in params}
    out = [f"'{k}' added" for k in now if k not in recorded]
    out += [f"'{k}' removed" for k in recorded if k not in now]
    out += [f"'{k}' was {recorded[k]}, now {now[k]}" for k in now if k in recorded and recorded[k] != now[k]]
    return out


def space_record(params: list[Param]) -> dict:
    from optuna.distributions import distribution_to_json

    return {p.key: distribution_to_json(p.distribution()) for p in params}
