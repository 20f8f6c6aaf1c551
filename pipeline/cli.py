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
from pathlib import Path

from .core import layout, provenance
from .core.artifacts import fault_point
from .core.config import Config, load_config
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
EXTRA = {
    "all": "run what is stale of stages 1-5 (and of the experiments in run_also), skip what is up to date, "
           "then print the score table and write reports/",
    "status": "say, per stage, whether its outputs are up to date and if not why (what changed)",
    "leaderboard": "rank every experiment under runs/ by CV -> reports/leaderboard.{csv,md} "
                   "[--sort COL] [--filter GLOB] [--best]",
    "compare": "compare A B: config differences next to per-fold metric differences",
    "report": "report [EXP ...]: pictures and a page per experiment -> reports/<exp>/",
    "cache": "the decoded-image stores: images, side, size on disk, last use [--clear: remove them]",
    "doctor": "a one-minute check of this machine: a few training and inference steps in every mode "
              "(fp32/bf16/fp16, channels_last, compile, DDP, fold per GPU) as a table, the fastest mode [--quick]",
    "selfcheck": "the fault-injection and bad-input matrix on a tiny competition, as a table [--quick]",
    "lr-find": "the learning-rate range test on one fold -> reports/<exp>/lr_find.{png,csv} and a suggested "
               "train.lr [--fold K] [--steps N]",
    "export": "pack the ensemble for offline inference (a Kaggle code competition) -> exports/<name>/ "
              "[--out DIR] [--zip] [--onnx]",
    "predict": "the submission from a bundle alone: --bundle DIR --test-dir DIR [--sample-submission FILE] "
               "--out FILE [--batch-size N] [--device auto|cpu|cuda] [--time-budget MIN] [--tmp-dir DIR]",
    "weights": "weights import SRC --arch NAME --out FILE: a checkpoint in another naming -> timm-named "
               ".safetensors for model.pretrained_path (+ its record: source sha256, mapping, mean/std)",
    "help": "show this help",
}


COMMON = ["--config FILE   experiment config (default: configs/demo.yaml)",
          "--root DIR      the project folder (default: $PIPELINE_ROOT, else the current folder)",
          "key=value       override any config entry, e.g. train.epochs=3"]
STAGE_OPTS = ["--force         redo work that is already done",
              "--allow-stale   use inputs made from other settings (warns instead of refusing)"]
COMMAND_HELP = {  # command -> (module whose docstring says what it reads and writes, or a text; options; example)
    "folds": ("pipeline.stages.folds", COMMON + STAGE_OPTS, "./run.sh folds folds.n_splits=5"),
    "train": ("pipeline.stages.train", COMMON + STAGE_OPTS + ["--fold K        only fold K",
              "--gpus 0,1,...  one fold per GPU in parallel"], "./run.sh train --fold 0 train.epochs=3"),
    "rebalance": ("pipeline.stages.rebalance", COMMON + STAGE_OPTS + ["--fold K        only fold K"],
                  "./run.sh rebalance rebalance.variants=[joint,crt,tau]"),
    "infer": ("pipeline.stages.infer", COMMON + STAGE_OPTS, "./run.sh infer infer.views=[orig,hflip] infer.scales=[1,1.15]"),
    "ensemble": ("pipeline.stages.ensemble", COMMON + STAGE_OPTS,
                 "./run.sh ensemble ensemble.members=[exp_a,exp_b:crt] ensemble.method=weighted"),
    "lr-find": ("pipeline.tools.lr_find", COMMON + ["--fold K        the fold whose training rows it uses (default 0)",
                "--steps N       at most N steps (default 100)"], "./run.sh lr-find model.arch=convnext_tiny"),
    "export": ("pipeline.tools.export", COMMON + ["--out DIR       the bundle folder (default exports/<name>/)",
               "--zip           also <out>.zip", "--onnx          also fold<k>/model.onnx (needs onnx)"],
               "./run.sh export --zip"),
    "predict": ("pipeline.tools.predict", ["--bundle DIR|ZIP, --test-dir DIR, --out FILE (required)",
                "--sample-submission FILE", "--batch-size N", "--device auto|cpu|cuda",
                "--time-budget MIN  drop the least useful TTA views to finish in time", "--tmp-dir DIR"],
                "pipeline predict --bundle /kaggle/input/b --test-dir /kaggle/input/c/test "
                "--sample-submission /kaggle/input/c/sample_submission.csv --out /kaggle/working/submission.csv"),
    "all": ("Runs what is stale of stages 1-5 for the config's experiment and those of its run_also, in order, "
            "skipping what is up to date; then prints the score table and writes reports/ and the leaderboard.\n"
            "Reads: the competition data and every earlier output. Writes: what stages 1-5 write (the folds file, the "
            "experiment's run folder, the submission) and the reports.", COMMON + ["--force         redo every stage"], "./run.sh all --config configs/my.yaml"),
    "status": ("Says per stage whether its outputs are up to date, and if not why (the config keys or input "
               "files that changed, replaced images named). Reads only; writes nothing.", COMMON,
               "./run.sh status train.lr=0.01"),
    "leaderboard": ("pipeline.tools.leaderboard", ["--sort COL", "--filter GLOB or COL=GLOB", "--best  one row per "
                    "experiment", "--root DIR"], "./run.sh leaderboard --filter 'convnext*' --best"),
    "compare": ("Config differences of two experiments next to their per-fold metric differences and whether each "
                "exceeds fold-to-fold noise. Reads runs/<a>/, runs/<b>/; writes nothing.", ["--root DIR"],
                "./run.sh compare exp_a exp_b"),
    "report": ("pipeline.tools.experiment_page", ["EXP ... (default: every experiment)", "--root DIR"],
               "./run.sh report demo-resnet10t"),
    "cache": ("pipeline.tools.image_cache", ["--clear         remove the stores", "aug.cache_dir=DIR"],
              "./run.sh cache --clear"),
    "doctor": ("pipeline.tools.doctor", COMMON + ["--quick         no torch.compile"], "./run.sh doctor --quick"),
    "selfcheck": ("pipeline.tools.selfcheck", ["--quick         one kill point per stage"], "./run.sh selfcheck --quick"),
    "weights": ("pipeline.tools.weights", ["import SRC      the checkpoint to convert (torch file or .safetensors)",
                "--arch NAME     the timm architecture it is for", "--out FILE      the .safetensors to write",
                "--mean R,G,B, --std R,G,B, --crop-pct F   the weights' preprocessing (default: timm's for --arch)"],
                "./run.sh weights import lite0.pth --arch tf_efficientnet_lite0 --out weights/lite0.safetensors"),
}


def command_help(name: str) -> str:
    """`<command> --help`: what it reads and writes, its options, one example."""
    import importlib

    text, options, example = COMMAND_HELP[name]
    if text.startswith("pipeline."):
        text = (importlib.import_module(text).__doc__ or "").strip()
    lines = [f"{name}: {EXTRA.get(name) or next(s.summary for s in STAGES if s.name == name)}", "", text, "",
             "options:"] + [f"  {o}" for o in options] + ["", "example:", f"  {example}"]
    return "\n".join(lines)


def _find_stage(name: str) -> Stage | None:
    for s in STAGES:
        if name in (s.name, s.number):
            return s
    return None


def help_text() -> str:
    lines = ["usage: ./run.sh <command> [--config FILE] [--fold K] [--force] [key=value ...]", "",
             "stages:"]
    for s in STAGES:
        lines.append(f"  {s.number} {s.name:<10} {s.summary}")
    lines.append("")
    lines.append("other commands:")
    for k, v in EXTRA.items():
        lines.append(f"  {k:<12} {v}")
    lines.append(f"  {'test':<12} run the test suite (run.sh only: pytest)")
    lines += ["", "<command> --help (or help <command>): what it reads and writes, its options, an example"]
    lines += ["", "options:",
              f"  --config FILE   experiment config (default: {DEFAULT_CONFIG})",
              "  --fold K        only fold K (train, rebalance)",
              "  --force         redo work that is already done",
              "  --allow-stale   use inputs made from other settings (warns instead of refusing)",
              "  --gpus 0,1,...  train: run folds in parallel, one process per GPU",
              "  --root DIR      the project folder (default: $PIPELINE_ROOT, else the current folder)",
              "  key=value       override any config entry, e.g. train.epochs=3"]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline", add_help=False)
    p.add_argument("command", nargs="?", default="help")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--fold", type=int, default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--allow-stale", action="store_true")
    p.add_argument("--sort", default=None)
    p.add_argument("--filter", default=None)
    p.add_argument("--best", action="store_true")
    p.add_argument("--clear", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--gpus", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--zip", action="store_true")
    p.add_argument("--onnx", action="store_true")
    p.add_argument("--bundle", default=None)
    p.add_argument("--test-dir", default=None)
    p.add_argument("--sample-submission", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--time-budget", type=float, default=None)
    p.add_argument("--tmp-dir", default=None)
    p.add_argument("--root", default=None)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--arch", default=None)
    p.add_argument("--mean", default=None)
    p.add_argument("--std", default=None)
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("overrides", nargs="*")
    args, unknown = p.parse_known_args(argv)
    bad = [u for u in unknown if u.startswith("-")]
    if bad:
        raise PipelineError(f"unknown option(s) {bad}; see ./run.sh help")
    args.overrides += unknown
    return args


def prepare(cfg: Config) -> None:
    from .tools.demo import prepare_data

    prepare_data(cfg)


def run_stage(stage: Stage, cfg: Config, fold: int | None, force: bool, gpus: str | None = None):
    if fold is not None and not stage.per_fold:
        raise PipelineError(f"--fold applies to train and rebalance, not to {stage.name}")
    mod = importlib.import_module(stage.module)
    fault_point(f"{stage.name}:start")
    t0 = time.perf_counter()
    kwargs = {"force": force}
    if stage.per_fold:
        kwargs["fold"] = fold
    if gpus:
        if stage.name != "train":
            raise PipelineError("--gpus applies to train only")
        kwargs["gpus"] = gpus
    with stage_log(cfg, stage.name):
        out = mod.run(cfg, **kwargs)
        log.info("stage %s (%s) of '%s' finished in %.1fs", stage.number, stage.name, cfg.experiment,
                 time.perf_counter() - t0)
    return out


@contextlib.contextmanager
def stage_log(cfg: Config, stage: str):
    """Append what the stage logs to runs/<exp>/logs/<stage>-<time>.log, headed by the exact command line
    and the config, as well as to the terminal. Only the main process of a DDP run writes one."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    path = cfg.run_dir.log(stage, time.strftime("%Y%m%d-%H%M%S"))
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
        log.info("config: %s (resolved: %s); working folder %s", cfg.source, cfg.run_dir.config, Path.cwd())
        yield
    except BaseException as e:  # in the file only: the terminal gets the error from main()
        handler.stream.write(f"{time.strftime('%H:%M:%S')} stage {stage} failed: {type(e).__name__}: {e}\n")
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()


def all_configs(cfg: Config, overrides: list[str]) -> list[Config]:
    """This experiment and those named in its run_also (paths relative to its config file)."""
    here = Path(cfg.source).parent if cfg.source not in ("", "defaults") else Path(".")
    configs = [cfg]
    for p in cfg.run_also:
        c = load_config(here / p, overrides)
        if c.experiment not in {x.experiment for x in configs}:
            configs.append(c)
    return configs


def stage_status(stage: Stage, cfg: Config) -> list[str]:
    """Why the stage would do work now; [] when its outputs are up to date."""
    return importlib.import_module(stage.module).status(cfg)


def run_all(cfg: Config, force: bool, overrides: list[str]) -> dict:
    """Like `dvc repro`: each stage whose outputs are stale (or missing) runs, the others are
    skipped. Stages run in order, so a stage is judged after everything upstream is current."""
    configs = all_configs(cfg, overrides)
    ran, skipped = [], []
    jobs = [(c, s) for c in configs for s in STAGES if s.name != "ensemble"] + [(cfg, _find_stage("ensemble"))]
    for c, stage in jobs:
        prepare(c)
        tag = f"{c.experiment}:{stage.name}"
        reasons = ["--force"] if force else stage_status(stage, c)
        if reasons:
            log.info("stage %s (%s) of '%s' is stale: %s", stage.number, stage.name, c.experiment, "; ".join(reasons))
            run_stage(stage, c, None, force)
        else:
            log.info("stage %s (%s) of '%s' is up to date, skipped", stage.number, stage.name, c.experiment)
        (ran if reasons else skipped).append(tag)
    log.info("all: ran %s; up to date %s", " ".join(ran) or "nothing", " ".join(skipped) or "nothing")
    from .tools import experiment_page, leaderboard, score_table

    score_table.print_summary(cfg)
    for c in configs:
        experiment_page.write(c.experiment)
    leaderboard.write(layout.RUNS, layout.REPORTS)
    print(final_words(cfg, configs))
    return {"ran": ran, "skipped": skipped}


def final_words(cfg: Config, configs: list[Config]) -> str:
    """The last lines of `all`, in plain words: where the submission is, its CV, what to try next."""
    from .core.artifacts import read_json

    name = cfg.ensemble.name or cfg.experiment
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
                 ", ".join(str(layout.experiment_page(c.experiment)) for c in configs))
    lines.append(f"Next: `./run.sh leaderboard` ranks every experiment; `./run.sh export --zip` packs this one for a "
                 f"Kaggle code competition; after editing {cfg.source if cfg.source != 'defaults' else 'a config'}, "
                 f"`./run.sh status` says what would re-run.")
    return "\n".join(lines)


def print_status(cfg: Config, overrides: list[str]) -> None:
    from .tools import plan

    p = plan.build(cfg, overrides, "status")
    print(p.text())
    for c in all_configs(cfg, overrides):
        upstream_stale = None
        print(f"experiment {c.experiment}:")
        for stage in STAGES:
            if stage.name == "ensemble" and c is not cfg:
                continue
            if upstream_stale:
                state = f"waits for stage {upstream_stale}"
            else:
                try:
                    reasons = stage_status(stage, c)
                except PipelineError as e:
                    reasons = [str(e)]
                state = "up to date" if not reasons else "stale: " + "; ".join(reasons)
                if reasons:
                    upstream_stale = f"{stage.number} ({stage.name})"
            print(f"  {stage.number} {stage.name:<10} {state}")


def run_report_command(args: argparse.Namespace) -> int:
    """leaderboard / compare / report: they read runs/ and submissions/, no config needed."""
    from .tools import experiment_page, leaderboard

    runs, reports = layout.RUNS, layout.REPORTS
    if args.command == "leaderboard":
        if args.overrides:
            raise PipelineError(f"leaderboard takes options only (--sort, --filter, --best), not {args.overrides}")
        table = leaderboard.write(runs, reports, sort=args.sort, pattern=args.filter, best=args.best)
        print(leaderboard.to_text(table))
        return 0
    if args.command == "compare":
        if len(args.overrides) != 2:
            raise PipelineError("usage: ./run.sh compare EXP_A EXP_B")
        print(leaderboard.compare(runs, *args.overrides))
        return 0
    names = args.overrides or layout.experiments(runs)
    if not names:
        raise PipelineError("no experiments under runs/ to report on")
    for name in names:
        print(experiment_page.write(name, reports))
    return 0


def enter_project(args: argparse.Namespace, root: Path) -> None:
    """--root: work in the project folder (runs/, folds/, ... are relative to it). Paths on the command line
    that exist where the command was typed keep meaning those files."""
    if not root.is_dir():
        raise PipelineError(f"--root {root}: no such folder")
    if args.command == "weights" and len(args.overrides) == 2 and Path(args.overrides[1]).exists():
        args.overrides[1] = str(Path(args.overrides[1]).resolve())
    for name in ("config", "bundle", "test_dir", "sample_submission", "out", "tmp_dir"):
        v = getattr(args, name)
        if v and not Path(v).is_absolute() and (Path(v).exists() or name in ("out", "tmp_dir")):
            setattr(args, name, str(Path(v).resolve()))
    os.chdir(root)


def run_predict(args: argparse.Namespace) -> int:
    """predict reads a bundle and test images only: no config, no project folder."""
    from .tools import predict

    missing = [o for o, v in (("--bundle", args.bundle), ("--test-dir", args.test_dir), ("--out", args.out)) if not v]
    if missing or args.overrides:
        raise PipelineError(f"usage: predict --bundle DIR --test-dir DIR [--sample-submission FILE] --out FILE "
                            f"(missing {missing}{', unexpected ' + str(args.overrides) if args.overrides else ''})")
    if args.batch_size is not None and args.batch_size < 1:
        raise PipelineError("--batch-size must be at least 1")
    if args.time_budget is not None and args.time_budget <= 0:
        raise PipelineError("--time-budget is in minutes and must be positive")
    predict.run(args.bundle, args.test_dir, args.out, args.sample_submission, args.batch_size, args.device,
                args.time_budget, args.tmp_dir)
    return 0


def run_weights(args: argparse.Namespace) -> int:
    """weights import: a checkpoint file in, a timm-named one out; no config, no project outputs."""
    from .tools import weights

    weights.run(args.overrides, args.arch, args.out, args.mean, args.std, args.crop_pct)
    return 0


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.help or args.command == "help":
        name = args.command if args.command != "help" else (args.overrides[0] if args.overrides else None)
        stage = _find_stage(name) if name else None
        name = stage.name if stage else name
        print(command_help(name) if name in COMMAND_HELP else help_text())
        return 0
    root = args.root or os.environ.get("PIPELINE_ROOT")
    if root:
        enter_project(args, Path(root))
    provenance.allow_stale(args.allow_stale)
    if args.command in ("leaderboard", "compare", "report"):
        return run_report_command(args)
    if args.command == "predict":
        return run_predict(args)
    if args.command == "weights":
        return run_weights(args)
    if args.command == "cache" and args.config == DEFAULT_CONFIG and not Path(DEFAULT_CONFIG).exists():
        args.config = None  # outside a project folder: the default cache_dir, or the one given as key=value
    cfg = load_config(args.config, args.overrides)
    if args.command == "cache":
        from .tools import image_cache

        print(image_cache.run(cfg.aug.cache_dir, clear=args.clear))
        return 0
    if args.command == "export":
        from .tools import export

        export.run(cfg, out=args.out, zip_=args.zip, onnx=args.onnx)
        return 0
    if args.command == "lr-find":
        from .tools import lr_find

        if args.steps < 5:
            raise PipelineError("--steps must be at least 5")
        prepare(cfg)
        lr_find.run(cfg, fold=args.fold or 0, steps=args.steps)
        return 0
    if args.command == "doctor":
        from .tools import doctor

        return doctor.main(cfg, quick=args.quick)
    if args.command == "all":
        if args.fold is not None:
            raise PipelineError("--fold does not apply to 'all'")
        from .tools import plan

        plan.check(cfg, args.overrides, "all")
        run_all(cfg, args.force, args.overrides)
        return 0
    if args.command == "status":
        prepare(cfg)
        print_status(cfg, args.overrides)
        return 0
    stage = _find_stage(args.command)
    if stage is None:
        raise PipelineError(f"unknown command '{args.command}'; see ./run.sh help")
    from .tools import plan

    plan.check(cfg, args.overrides, stage.name)
    run_stage(stage, cfg, args.fold, args.force, args.gpus)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["selfcheck"] and not {"-h", "--help"} & set(argv):
        from .tools import selfcheck

        return selfcheck.main(argv[1:], entry=main)
    try:
        with provenance.one_look():  # each image set is stat'ed once per command
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
