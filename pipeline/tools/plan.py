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
import typing
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.files import layout
from ..core.config import (WISE, Config, DataCfg, EnsembleCfg, EvalCfg, Head, ModelCfg, TrainCfg, load_config,
                           wise_alpha_of, wise_name)
from ..core.inputs.data import fold_problems, read_test_table, read_train_table, test_source, train_source
from ..core.errors import PipelineError
from ..core.predict.metrics import TOP_K
from ..core.predict.submission import Member
from .demo import prepare_data, unbuilt_data

log = logging.getLogger("pipeline")

TEST_SIDE_ERROR = ("all", "infer", "ensemble", "status")  # commands for which a broken test side is an error
CHECK_ORDER = ["none", "header", "full"]
KNOWN_HEADS = set(typing.get_args(Head)) - {WISE}  # the variants, probe_<variant> (rebalance.probe), best: stage 4's
# choice; and wise<alpha> (rebalance.wise_alpha)


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


def _who(experiment: str, source: str) -> str:
    """A problem's subject: the experiment and the config file it comes from."""
    return f"experiment {experiment} ({source})"


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
        c.session = cfg.session
        if c.experiment not in {x.experiment for x in configs}:
            configs.append(c)
    return configs


def _check_model(who: str, m: ModelCfg, plan: Plan) -> None:
    import timm

    arch = m.arch
    if not timm.is_model(arch.split(".")[0]) and not timm.is_model(arch):
        near = difflib.get_close_matches(arch, timm.list_models(), n=1, cutoff=0.7)
        plan.problems.append(f"{who}: config model.arch: unknown timm model '{arch}'"
                             + (f"; did you mean '{near[0]}'?" if near else ""))
        return
    if m.pretrained_path:
        from ..core.nets.models import create_model

        if not Path(m.pretrained_path).is_file():
            plan.problems.append(f"{who}: config model.pretrained_path: weights file not found: "
                                 f"{m.pretrained_path} (./run.sh weights import converts one)")
            return
        try:  # the weights are read and fitted to the model now, not after stage 1
            create_model(m, 2)
        except PipelineError as e:
            plan.problems.append(f"{who}: {e}")
    elif m.pretrained:
        why = hub_weights_problem(arch)
        if why:
            plan.problems.append(f"{who}: config model.pretrained: true: {why}; offline, give a local file instead: "
                                 f"./run.sh weights fetch NAME (the catalogue: ./run.sh weights list) or ./run.sh "
                                 f"weights import FILE --arch {arch} --out weights/{arch}.safetensors, then "
                                 f"model.pretrained_path=<that file>")


HUB_PROBE_S = 3.0  # how long the plan waits for the model hub before calling it unreachable


def hub_weights_problem(arch: str) -> str | None:
    """Why timm could not have `arch`'s pretrained weights now (None: it can): not in the local cache (Hugging
    Face's, or torch hub's for a URL), and the hub offline (HF_HUB_OFFLINE) or unreachable in HUB_PROBE_S."""
    import socket
    from urllib.parse import urlparse

    from timm.models import get_pretrained_cfg

    try:
        pc = get_pretrained_cfg(arch)
    except (RuntimeError, ValueError):
        pc = None
    if pc is None or not (pc.hf_hub_id or pc.url):
        return f"timm has no pretrained weights to download for '{arch}'"
    if pc.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache
        from timm.models import _hub  # the file names timm asks the hub for

        repo = pc.hf_hub_id.split("@")[0]
        names = [n for n in dir(_hub) if n.startswith("HF_") and n.endswith("WEIGHTS_NAME")]
        for name in (pc.hf_hub_filename, *(getattr(_hub, n) for n in names)):
            if name and isinstance(try_to_load_from_cache(repo, name), str):
                return None
        host, where = urlparse(constants.ENDPOINT).hostname, f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
        if constants.HF_HUB_OFFLINE:
            return f"its weights ({repo}) are not in {where} and HF_HUB_OFFLINE is set"
    else:
        import torch

        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(pc.url).path).name
        if cached.is_file():
            return None
        host, where = urlparse(pc.url).hostname, f"torch hub's cache ({cached.parent})"
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_S).close()
    except OSError as e:
        return f"its weights are not in {where} and {host} cannot be reached ({e.strerror or e})"
    return None


def config_problems(experiment: str, m: ModelCfg, t: TrainCfg, ensemble_name: str) -> list[str]:
    """The checks of `all`'s plan that one experiment's sections answer alone (its model name and weights, its
    teachers): what a sweep runs for every bound and choice of its space before the study exists."""
    plan = Plan("sweep")
    _check_model(f"experiment {experiment}", m, plan)
    _check_teachers(f"experiment {experiment}", t, [], ensemble_name, plan)
    return plan.problems


def _check_teachers(who: str, t: TrainCfg, earlier: list[str], ensemble_name: str, plan: Plan) -> None:
    for key in ("pseudo", "distill"):
        name = getattr(t, key).teacher
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
        plan.problems.append(f"{who}: config train.{key}.teacher '{name}' {why}")


def _check_members(members_cfg: list[str], experiments: list[str], plan: Plan) -> None:
    """ensemble.members (`members_cfg`; empty: the experiment itself, experiments[0])."""
    have = set(experiments) | set(layout.experiments())
    members = []
    for name in members_cfg or [experiments[0]]:
        try:
            members.append(Member.parse(name, "config ensemble.members:"))
        except PipelineError as e:
            plan.problems.append(str(e))
    for exp, head, _ in members:
        if head is not None and head not in KNOWN_HEADS and wise_alpha_of(head) is None:
            plan.problems.append(f"config ensemble.members: '{exp}:{head}': unknown head '{head}' "
                                 f"(one of {sorted(KNOWN_HEADS)} or a WiSE-FT head such as {wise_name(0.5)})")
        if exp in experiments:
            continue
        if not layout.RunDir.of(exp).infer_summary.exists():
            near = difflib.get_close_matches(exp, sorted(have), n=1, cutoff=0.6)
            plan.problems.append(f"config ensemble.members: '{exp}' is neither an experiment this command runs "
                                 f"({', '.join(experiments)}) nor a finished one under {layout.RUNS}/ (no "
                                 f"{layout.RunDir.of(exp).infer_summary})" + (f"; did you mean '{near[0]}'?" if near else ""))


def _check_top_k(where: str, ev: EvalCfg, e: EnsembleCfg, d: DataCfg, labels, plan: Plan) -> None:
    """Top-k settings the classes make meaningless or unreadable: a k that covers every class (the metric is 1.0
    whatever the model), a submission row of more labels than classes, class names that hold a space in a
    space-separated top-k row."""
    classes = sorted({str(v) for v in labels})
    n = len(classes)
    if ev.metric in TOP_K and ev.top_k >= n:
        plan.problems.append(f"{where}: config eval.top_k {ev.top_k} with {n} classes: every class is within "
                             f"the top {ev.top_k}, so {ev.metric} is 1.0 whatever the model; use a k below {n} "
                             f"(or eval.metric accuracy)")
    if e.submission != "topk":
        return
    if e.top_k > n:
        plan.problems.append(f"{where}: config ensemble.top_k {e.top_k} with {n} classes: a row cannot "
                             f"hold more labels than there are classes")
    elif e.top_k == n:
        plan.warnings.append(f"{where}: config ensemble.top_k {n} lists every class in every row (the ranking is "
                             f"the prediction): check that the competition asks for this")
    spaced = [x for x in classes if any(ch.isspace() for ch in x)]
    if spaced:
        fix = ("data.category_label=id (category ids, what iNaturalist-style submissions expect)"
               if d.layout == "coco" and d.category_label == "name" else "labels without spaces")
        plan.problems.append(f"{where}: config ensemble.submission topk writes the top {e.top_k} labels "
                             f"space-separated, but {len(spaced)} class name(s) hold a space ({', '.join(repr(x) for x in spaced[:3])}"
                             f"): the rows could not be read back; use {fix}")


def _check_data(c: Config, command: str, seen_train: dict, seen_test: dict, plan: Plan) -> str:
    """The train table, its images' headers and top-k settings, and the test side; the plan's line about them."""
    d, who = c.data, _who(c.experiment, c.source)
    train_key = (d.root, d.layout, d.train_csv, d.train_dir, d.train_json, d.category_label, d.id_col, d.label_col,
                 d.group_col, d.image_ext, d.check_images)
    # headers only: a full decode of every image (check_images: full) is stage 1's, which also refuses before
    # writing; the plan is there for what would otherwise surface after training
    quick = dataclasses.replace(c, data=dataclasses.replace(d, check_images=min(d.check_images, "header",
                                                                                  key=CHECK_ORDER.index)))
    table, err = _once(seen_train, train_key, lambda: read_train_table(quick.data))
    if err:
        plan.problems.append(f"{who}: {err}")
    else:
        _check_top_k(who, c.eval, c.ensemble, d, table["label"], plan)
        problem, _ = fold_problems(table, c.folds.n_splits, d.group_col is not None, c.folds.rare_classes,
                                   str(train_source(c.data)))
        if problem and not c.folds_csv.exists():  # an existing folds file is what counts (stage 1 re-checks)
            plan.problems.append(f"{who}: {problem}")
        advice = recipe_advice(c.model, c.train, c.aug.img_size, table)
        if advice:
            plan.warnings.append(f"{who}: {advice}")
    test_key = (d.root, d.layout, d.test_dir, d.test_json, d.sample_submission, d.image_ext, d.id_col, d.check_images)
    test, err = _once(seen_test, test_key, lambda: read_test_table(quick.data))
    if err:
        (plan.problems if command in TEST_SIDE_ERROR else plan.warnings).append(
            f"{who}: test side: {err}")
    what = f"{len(table)} train images" if table is not None else "train table unreadable"
    return (f"experiment {c.experiment}: {c.model.arch}, {what}; test: {len(test) if test is not None else '?'} ids "
            f"from {test_source(c.data)}")


# #47, eighth session (docs/benchmarks/pretrained.md): on sets whose photos are upsampled to aug.img_size and whose
# classes are imbalanced, LP-FT beat the plain short recipe on every set measured (3 of 3, CV and hold-out), while
# either alone left the plain recipe ahead or split (6 sets). Measured at 2x upsampling, imbalance 7-100, 1-4
# epochs; the advice uses the gentler bounds below and says so.
LP_FT_UPSAMPLED = 1.5  # aug.img_size / the photos' median shorter side
LP_FT_IMBALANCE = 5.0  # the train table's largest class / its smallest: LP-FT won at 7, 37, 100; split at 4 (grocery81-32)
LP_FT_KEYS = "train.head_init=probe train.bn_stats=frozen train.backbone_lr_mult=0.3"


def recipe_advice(m: ModelCfg, t: TrainCfg, img_size: int, table, sample: int = 200) -> str | None:
    """A short fine-tune of pretrained weights with the plain recipe on small upsampled photos and imbalanced
    classes: the advice to set LP-FT's keys (None otherwise). Reads the headers of a seeded sample of the photos."""
    from PIL import Image

    from ..core.config import SHORT_FINE_TUNE_EPOCHS

    pretrained = m.pretrained or m.pretrained_path
    if not pretrained or not 1 <= t.epochs <= SHORT_FINE_TUNE_EPOCHS or t.head_init != "random" or \
            t.bn_stats != "batch" or table is None or not len(table):
        return None
    counts = table["label"].value_counts()
    imbalance = counts.max() / counts.min()
    rows = table.sample(min(sample, len(table)), random_state=0)
    sides = []
    for p in rows["path"]:
        try:
            with Image.open(p) as im:
                sides.append(min(im.size))
        except OSError:  # unreadable: stage 1 names it
            continue
    if not sides or imbalance < LP_FT_IMBALANCE or img_size / float(np.median(sides)) < LP_FT_UPSAMPLED:
        return None
    return (f"the photos' median shorter side is {np.median(sides):g} px, upsampled to aug.img_size={img_size}, "
            f"and the classes are imbalanced {imbalance:.0f}:1: on such sets LP-FT beat this short recipe on every "
            f"set measured (3 of 3; docs/pretrained.md); consider {LP_FT_KEYS}")


def _once(seen: dict, key, fn):
    """Run a check once per distinct input (experiments usually share the competition)."""
    if key not in seen:
        try:
            seen[key] = (fn(), None)
        except PipelineError as e:
            seen[key] = (None, str(e))
    return seen[key]


def build(cfg: Config, overrides: list[str], command: str, config_problems: list[str] = ()) -> Plan:
    """Every problem of the command's plan (see the module docstring); nothing is written. `config_problems`: the
    config's own (its faulty keys left at their defaults in `cfg`): they head the list, and nothing is built."""
    plan = Plan(command, problems=list(config_problems))
    write = command != "status" and not config_problems
    run_all = command in ("all", "status")
    plan.configs = _configs(cfg, overrides, plan, with_run_also=run_all)
    unbuilt = {}
    for c in plan.configs:  # the demo / hold-out competitions are built before their data is checked
        if not write:  # status writes nothing: a competition still to build is said, not built
            unbuilt[c.experiment] = unbuilt_data(c.data)
            continue
        try:
            prepare_data(c.data, c.folds.seed)
        except PipelineError as e:
            plan.problems.append(f"{_who(c.experiment, c.source)}: {e}")
    experiments = [c.experiment for c in plan.configs]
    seen_train, seen_test = {}, {}
    for i, c in enumerate(plan.configs):
        who = _who(c.experiment, c.source)
        _check_model(who, c.model, plan)
        _check_teachers(who, c.train, experiments[:i], cfg.ensemble.name or cfg.experiment, plan)
        if unbuilt.get(c.experiment):
            plan.lines.append(f"experiment {c.experiment}: {c.model.arch}; data: {unbuilt[c.experiment]}")
        else:
            plan.lines.append(_check_data(c, command, seen_train, seen_test, plan))
    if command in ("all", "ensemble", "status"):
        _check_members(cfg.ensemble.members, experiments, plan)
    else:  # stages 1-4 do not read the members (they may be trained later): said, not refused
        side = Plan(command)
        _check_members(cfg.ensemble.members, experiments, side)
        plan.warnings += [f"{p} (stage 5 will refuse this)" for p in side.problems]
    if command in ("all", "ensemble", "status"):
        plan.lines.append(f"ensemble {cfg.ensemble.name or cfg.experiment}: {cfg.ensemble.method} of "
                          f"{', '.join(cfg.ensemble.members or [cfg.experiment])} -> "
                          f"{layout.submission_csv(cfg.ensemble.name or cfg.experiment)}")
    return plan


def check(cfg: Config, overrides: list[str], command: str, config_problems: list[str] = ()) -> Plan:
    """build(), then refuse (every problem named, the config's first) or log the warnings."""
    plan = build(cfg, overrides, command, config_problems)
    for w in plan.warnings:
        log.warning("warning: %s", w)
    if plan.problems:
        raise PipelineError(f"{len(plan.problems)} problem(s) found before any work; nothing was written:\n"
                            + "\n".join(f"  - {p}" for p in plan.problems))
    return plan
