"""The plan of a command, checked whole before anything is written.

`all` and every stage command first build their plan: every experiment they will run (`run_also` configs
loaded and validated), each one's train table and images, model name and pretrained weights file, teachers
(pseudo-labels, distillation), the test side (a readable, non-empty sample submission whose ids all have an
image, or a non-empty test folder), and the ensemble's members (each one an experiment this command runs or a
finished one under runs/). Every problem found is reported at once, naming the key, file or row at fault,
and nothing is written (exit 2). `status` prints the same plan.

Which command reports what: `all` checks everything; a stage command checks its own experiment (no
run_also); `ensemble` also checks the members (stages 1-4 name member problems as warnings: the members
may be trained later); stages 1-3 report a broken test side as a warning (they do not read it; a code
competition may train before its test folder exists), stages 4-5 as an error.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..core import layout
from ..core.config import Config, load_config
from ..core.data import read_test_table, read_train_table, test_source
from ..core.errors import PipelineError
from ..core.heads import VARIANTS
from ..core.submission import parse_members
from .demo import prepare_data

log = logging.getLogger("pipeline")

TEST_SIDE_ERROR = ("all", "infer", "ensemble", "status")  # commands for which a broken test side is an error
CHECK_ORDER = ["none", "header", "full"]
KNOWN_HEADS = set(VARIANTS)


@dataclass
class Plan:
    command: str
    configs: list[Config] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # what will run, in words

    def text(self) -> str:
        out = [f"plan of '{self.command}':"] + [f"  {x}" for x in self.lines]
        out += [f"  warning: {w}" for w in self.warnings]
        out += [f"  PROBLEM: {p}" for p in self.problems]
        return "\n".join(out)


def _configs(cfg: Config, overrides: list[str], plan: Plan, with_run_also: bool) -> list[Config]:
    configs = [cfg]
    if not with_run_also:
        return configs
    here = Path(cfg.source).parent if cfg.source not in ("", "defaults") else Path(".")
    for p in cfg.run_also:
        try:
            c = load_config(here / p, overrides)
        except PipelineError as e:
            plan.problems.append(f"run_also '{p}' (in {cfg.source}): {e}")
            continue
        if c.experiment not in {x.experiment for x in configs}:
            configs.append(c)
    return configs


def _check_model(c: Config, plan: Plan) -> None:
    import timm

    arch = c.model.arch
    if not timm.is_model(arch.split(".")[0]) and not timm.is_model(arch):
        near = difflib.get_close_matches(arch, timm.list_models(), n=1, cutoff=0.7)
        plan.problems.append(f"experiment {c.experiment}: config model.arch: unknown timm model '{arch}'"
                             + (f"; did you mean '{near[0]}'?" if near else ""))
        return
    if c.model.pretrained_path:
        from ..core.models import create_model

        if not Path(c.model.pretrained_path).is_file():
            plan.problems.append(f"experiment {c.experiment}: config model.pretrained_path: weights file not found: "
                                 f"{c.model.pretrained_path} (./run.sh weights import converts one)")
            return
        try:  # the weights are read and fitted to the model now, not after stage 1
            create_model(c, 2)
        except PipelineError as e:
            plan.problems.append(f"experiment {c.experiment}: {e}")


def _check_teachers(c: Config, earlier: list[str], ensemble_name: str, plan: Plan) -> None:
    for key in ("pseudo", "distill"):
        name = getattr(c.train, key).teacher
        if not name or name in earlier:
            continue
        if layout.submission_record(name).exists() or layout.RunDir.of(name).infer_summary.exists():
            continue
        if name == ensemble_name:
            why = "is the ensemble this command makes last, after every experiment's training"
        else:
            why = (f"is neither a finished ensemble ({layout.submission_record(name)}) nor an experiment with stage-4 "
                   f"output ({layout.RunDir.of(name).infer_summary}) nor one this command runs before it; run "
                   f"./run.sh all for it first")
        plan.problems.append(f"experiment {c.experiment}: config train.{key}.teacher '{name}' {why}")


def _check_members(cfg: Config, experiments: list[str], plan: Plan) -> None:
    have = set(experiments) | set(layout.experiments())
    for exp, head in parse_members(cfg):
        if head is not None and head not in KNOWN_HEADS:
            plan.problems.append(f"config ensemble.members: '{exp}:{head}': unknown head '{head}' "
                                 f"(one of {sorted(KNOWN_HEADS)})")
        if exp in experiments:
            continue
        if not layout.RunDir.of(exp).infer_summary.exists():
            near = difflib.get_close_matches(exp, sorted(have), n=1, cutoff=0.6)
            plan.problems.append(f"config ensemble.members: '{exp}' is neither an experiment this command runs "
                                 f"({', '.join(experiments)}) nor a finished one under {layout.RUNS}/ (no "
                                 f"{layout.RunDir.of(exp).infer_summary})" + (f"; did you mean '{near[0]}'?" if near else ""))


def _once(seen: dict, key, fn):
    """Run a check once per distinct input (experiments usually share the competition)."""
    if key not in seen:
        try:
            seen[key] = (fn(), None)
        except PipelineError as e:
            seen[key] = (None, str(e))
    return seen[key]


def build(cfg: Config, overrides: list[str], command: str) -> Plan:
    """Every problem of the command's plan (see the module docstring); nothing is written."""
    plan = Plan(command)
    run_all = command in ("all", "status")
    plan.configs = _configs(cfg, overrides, plan, with_run_also=run_all)
    for c in plan.configs:  # the demo / hold-out competitions are built before their data is checked
        try:
            prepare_data(c)
        except PipelineError as e:
            plan.problems.append(f"experiment {c.experiment}: {e}")
    experiments = [c.experiment for c in plan.configs]
    seen_train, seen_test = {}, {}
    for i, c in enumerate(plan.configs):
        d = c.data
        train_key = (d.root, d.layout, d.train_csv, d.train_dir, d.train_json, d.category_label, d.id_col, d.label_col,
                     d.group_col, d.image_ext, d.check_images)
        # headers only: a full decode of every image (check_images: full) is stage 1's, which also refuses before
        # writing; the plan is there for what would otherwise surface after training
        quick = dataclasses.replace(c, data=dataclasses.replace(d, check_images=min(d.check_images, "header",
                                                                                      key=CHECK_ORDER.index)))
        table, err = _once(seen_train, train_key, lambda: read_train_table(quick))
        if err:
            plan.problems.append(f"experiment {c.experiment}: {err}")
        test_key = (d.root, d.layout, d.test_dir, d.test_json, d.sample_submission, d.image_ext, d.id_col,
                    d.check_images)
        test, err = _once(seen_test, test_key, lambda: read_test_table(quick))
        if err:
            (plan.problems if command in TEST_SIDE_ERROR else plan.warnings).append(
                f"experiment {c.experiment}: test side: {err}")
        _check_model(c, plan)
        _check_teachers(c, experiments[:i], cfg.ensemble.name or cfg.experiment, plan)
        what = f"{len(table)} train images" if table is not None else "train table unreadable"
        where = test_source(c)
        plan.lines.append(f"experiment {c.experiment}: {c.model.arch}, {what}; test: "
                          f"{len(test) if test is not None else '?'} ids from {where}")
    if command in ("all", "ensemble", "status"):
        _check_members(cfg, experiments, plan)
    else:  # stages 1-4 do not read the members (they may be trained later): said, not refused
        side = Plan(command)
        _check_members(cfg, experiments, side)
        plan.warnings += [f"{p} (stage 5 will refuse this)" for p in side.problems]
    if command in ("all", "ensemble", "status"):
        plan.lines.append(f"ensemble {cfg.ensemble.name or cfg.experiment}: {cfg.ensemble.method} of "
                          f"{', '.join(cfg.ensemble.members or [cfg.experiment])} -> "
                          f"{layout.submission_csv(cfg.ensemble.name or cfg.experiment)}")
    return plan


def check(cfg: Config, overrides: list[str], command: str) -> Plan:
    """build(), then refuse (every problem named) or log the warnings."""
    plan = build(cfg, overrides, command)
    for w in plan.warnings:
        log.warning("warning: %s", w)
    if plan.problems:
        raise PipelineError(f"{len(plan.problems)} problem(s) found before any work; nothing was written:\n"
                            + "\n".join(f"  - {p}" for p in plan.problems))
    return plan
