"""The units of an experiment, declared once, and the one engine that decides what is up to date (#46).

A unit is one output that carries a record (`made_from` in its JSON): the folds file, a fold's stage-2 weights,
the full-data model, a fold's stage-3 heads, the full-data model's heads, stage 3's report, stage 4's
predictions. Each declares (`experiment_units`) where its record is stored, the record the config would make
now (computed when asked, by the recipes of `provenance`), the units it reads (deps), how a refusal names it and
how it is remade. From the declarations alone the engine derives:

- `reasons(key)`: why a unit would be made now: it waits for a dep not yet made (or, in its own stage, not yet
  current); it is not run; or the keys and files that changed. A dep of an *earlier* stage that is stale is
  refused, naming it (`./run.sh status` shows the refusal; --allow-stale warns instead);
- `status(stage)`: the reasons of every unit of a stage (each stage's `status` is this);
- `require(key)`: the finished output a later stage reads, refused when missing or made from other inputs: a
  stage asks the upstream unit, it never rebuilds that stage's recipe;
- `order()`: the order every unit can be made in (deps first).

Stage-internal caches (a fold's feature cache, the probe features, a FixRes copy, a teacher's targets) are the
business of the stage that makes and reads them; they are not units here.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from . import layout
from .artifacts import read_json, recorded
from .provenance import (describe_changes, fold_choices, folds_record, full_record, infer_record, refuse_stale,
                         report_record, stage3_record, stale_reasons, train_images, train_record)
from ..config import Config
from ..errors import PipelineError
from ..inputs.data import read_train_table
from ..inputs.pixels import pixels
from ..nets.heads import median_choices

FULL = "full"


@dataclasses.dataclass(frozen=True)
class Unit:
    """One output with a record. `record()` is what the config would make now (None: not compared, e.g. without
    the folds file: test-only inference); `missing` is the refusal of a later stage when it is not made."""
    key: str  # unique in the experiment: folds, weights0, weights_full, heads0, heads_full, report, infer
    label: str  # how status lines name it: "fold 0", "full fit", "report" ("" for a stage of one unit)
    stage: str  # "1" .. "4"
    out: Path  # the JSON file whose made_from is the record
    record: Callable[[], dict | None]
    deps: tuple[str, ...] = ()
    what: str = ""  # in a refusal: "<out> (<what>) is stale"
    fix: str = ""  # how to remake it, in a refusal
    missing: str = ""  # the refusal when it is not made
    resume: Path | None = None  # an interrupted unit's resume state (stage 2's checkpoint)


class Units:
    """The engine over one experiment's declared units (see the module's docstring)."""

    def __init__(self, units: list[Unit], allow_stale: bool = False):
        self.by_key = {u.key: u for u in units}
        self.allow_stale = allow_stale
        self.read: dict[str, set[str]] = {}  # what each unit's stage asked for (require(by=...)): its declared deps
        for u in units:
            unknown = [d for d in u.deps if d not in self.by_key]
            if unknown:
                raise ValueError(f"unit {u.key} declares unknown deps {unknown}")
        self.order()  # refuses a cycle

    def __getitem__(self, key: str) -> Unit:
        return self.by_key[key]

    def __contains__(self, key: str) -> bool:
        return key in self.by_key

    def order(self) -> list[str]:
        """Every unit's key, deps first (declaration order otherwise); a cycle is refused."""
        out, visiting = [], set()

        def visit(key: str) -> None:
            if key in out:
                return
            if key in visiting:
                raise ValueError(f"units form a cycle through {key}")
            visiting.add(key)
            for d in self.by_key[key].deps:
                visit(d)
            visiting.discard(key)
            out.append(key)
        for key in self.by_key:
            visit(key)
        return out

    def own_reasons(self, key: str) -> list[str]:
        """Why the unit differs from what the config would make now, its deps aside ([]: current)."""
        u = self.by_key[key]
        prefix = f"{u.label}: " if u.label else ""
        if not u.out.exists() and u.resume is not None and u.resume.exists():
            return [f"{prefix}interrupted, resumes from {u.resume.name}"]
        rec = u.record() if u.out.exists() else {}
        if rec is None:  # not compared: made is enough
            return []
        return stale_reasons(u.out, rec, prefix)

    def current(self, key: str) -> bool:
        return not self.own_reasons(key)

    def waits_for(self, key: str) -> list[str]:
        """The deps the unit waits for: not made, or (in its own stage, which makes them first) not current."""
        u = self.by_key[key]
        return [d for d in u.deps if not self.by_key[d].out.exists()
                or (self.by_key[d].stage == u.stage and not self.current(d))]

    def reasons(self, key: str) -> list[str]:
        """Why the unit would be made now ([]: up to date). A stale dep of an earlier stage is refused (raised)."""
        u = self.by_key[key]
        waits = self.waits_for(key)
        if waits:
            return [f"{u.label + ': ' if u.label else ''}waits for "
                    + ", ".join(f"{self.by_key[d].label or self.by_key[d].what} (stage {self.by_key[d].stage})"
                                for d in waits)]
        for d in u.deps:
            if self.by_key[d].stage != u.stage:
                self.require(d)
        return self.own_reasons(key)

    def status(self, stage: str) -> list[str]:
        """The reasons of every unit of `stage`, in order (empty: the stage is up to date)."""
        return [r for key in self.order() if self.by_key[key].stage == stage for r in self.reasons(key)]

    def require(self, key: str, by: str | None = None) -> dict:
        """The unit's finished output (its JSON) for a later stage: refused when it is not made (or waits for a dep
        of its own stage) or was made from other inputs (with allow_stale: a warning). `by`: the unit whose stage
        reads it, which must declare it as a dep (a read it did not declare is a bug: refused)."""
        u = self.by_key[key]
        if by is not None:
            if key not in self.by_key[by].deps:
                raise ValueError(f"unit {by} reads {key}, which it does not declare as a dep")
            self.read.setdefault(by, set()).add(key)
        if not u.out.exists() or self.waits_for(key):
            raise PipelineError(u.missing or f"{u.out} is missing: {u.fix}")
        rec = u.record()
        if rec is not None:
            old = recorded(u.out)
            if old != rec:
                refuse_stale(f"{u.out} ({u.what})" if u.what else u.out, describe_changes(old or {}, rec), u.fix,
                             self.allow_stale)
        return read_json(u.out)


Record = Callable[[], "dict | None"]
REFIT = "re-run ./run.sh train (or ./run.sh all), or restore the config"
REBALANCE = "re-run ./run.sh rebalance (or ./run.sh all)"


def experiment_units(cfg: Config) -> Units:
    """Every unit of the experiment `cfg` names, as its config declares them now: the folds file; each fold's
    weights and heads; with train.full_fit the full-data model's; stage 3's report; stage 4's predictions.
    Without the folds file (test-only inference in a kernel) the records of stages 2-3 are not compared.
    The records are computed when first asked for, once per Units."""
    run, n, name = cfg.run_dir, cfg.folds.n_splits, cfg.experiment
    has_folds = cfg.folds_csv.exists()
    memo: dict = {}

    def once(key: str, make: Record) -> Record:
        return lambda: memo[key] if key in memo else memo.setdefault(key, make())

    trained_rec = once("train", lambda: train_record(cfg) if has_folds else None)

    def full_rec() -> dict | None:
        choices = fold_choices(run, n, trained_rec()) if has_folds else None
        return full_record(trained_rec(), choices) if choices is not None else None

    def heads_rec(k: int) -> Record:
        def make() -> dict | None:
            if not has_folds:
                return None
            chosen = None if k != layout.FULL_FIT else median_choices(
                cfg.rebalance.variants, [read_json(run.fold(j).rebalance_summary) for j in range(n)])
            imgs = train_images(cfg.folds_csv, cfg.data.hash_images, cfg.session.looks)
            return stage3_record(run, k, read_json(run.classes), cfg.rebalance, cfg.eval, cfg.model, pixels(cfg),
                                 cfg.seed, imgs, chosen)
        return once(f"heads{k}", make)

    units = [Unit("folds", "", "1", cfg.folds_record,
                  once("folds", lambda: folds_record(cfg.folds, cfg.data, read_train_table(cfg.data))),
                  what="the folds file", fix="re-run ./run.sh folds --force (or set folds.name)",
                  missing=f"{cfg.folds_csv} not found: run ./run.sh folds")]
    units += _stage2_units(run, n, cfg.train.full_fit, has_folds, trained_rec, once("full", full_rec))
    units += _stage3_units(run, n, cfg.train.full_fit, heads_rec,
                           once("report", lambda: report_record([read_json(run.fold(k).rebalance_summary)
                                                                 for k in range(n)])))
    infer_deps = [*(f"weights{k}" for k in range(n)),
                  *([f"weights_{FULL}"] if cfg.train.full_fit and cfg.infer.full_fit_weight > 0 else []),
                  *(f"heads{k}" for k in range(n) if has_folds and any(h != "joint" for h in cfg.infer.heads))]
    units.append(Unit("infer", "", "4", run.infer_summary, once("infer", lambda: infer_record(cfg)), tuple(infer_deps),
                      "", f"re-run ./run.sh infer for '{name}' (or ./run.sh all)",
                      f"experiment '{name}' has no stage-4 output ({run.infer_summary}); run ./run.sh infer"))
    return Units(units, cfg.session.allow_stale)


def _stage2_units(run: layout.RunDir, n: int, full_fit: bool, has_folds: bool, fold_rec: Record,
                  full_rec: Record) -> list[Unit]:
    """Each fold's weights (all made from one record) and, with train.full_fit, the full-data model's."""
    name = run.name
    out = [Unit(f"weights{k}", f"fold {k}", "2", run.fold(k).summary, fold_rec, ("folds",) if has_folds else (),
                "the fold's stage-2 weights", REFIT,
                f"fold {k} of experiment '{name}' has no finished stage-2 output ({run.fold(k).summary}); run "
                f"./run.sh train --fold {k}", run.fold(k).checkpoint) for k in range(n)]
    if full_fit:
        out.append(Unit(f"weights_{FULL}", "full fit", "2", run.full.summary, full_rec,
                        tuple(f"weights{k}" for k in range(n)), "the full-data model", REFIT,
                        f"train.full_fit is on but the full-data model of '{name}' is not finished "
                        f"({run.full.summary}); run ./run.sh train", run.full.checkpoint))
    return out


def _stage3_units(run: layout.RunDir, n: int, full_fit: bool, heads_rec: Callable[[int], Record],
                  report_rec: Record) -> list[Unit]:
    """Each fold's heads, stage 3's report over them and, with train.full_fit, the full-data model's heads."""
    name, heads = run.name, tuple(f"heads{k}" for k in range(n))
    out = [Unit(f"heads{k}", f"fold {k}", "3", run.fold(k).rebalance_summary, heads_rec(k), (f"weights{k}",),
                "the fold's rebalanced heads", REBALANCE,
                f"fold {k} of experiment '{name}' has no rebalanced heads ({run.fold(k).rebalance_summary}); run "
                f"./run.sh rebalance") for k in range(n)]
    out.append(Unit("report", "report", "3", run.rebalance_summary, report_rec, heads, "stage 3's report", REBALANCE,
                    f"experiment '{name}' has no stage-3 report ({run.rebalance_summary}); run ./run.sh rebalance"))
    if full_fit:
        out.append(Unit(f"heads_{FULL}", "full fit", "3", run.full.rebalance_summary, heads_rec(layout.FULL_FIT),
                        (f"weights_{FULL}", *heads), "the full-data model's heads", REBALANCE,
                        f"the full-data model of '{name}' has no rebalanced heads ({run.full.rebalance_summary}); "
                        f"run ./run.sh rebalance"))
    return out


def trained(units: Units, k: int, arch: str, n_classes: int, by: str) -> dict:
    """Fold k's (or, k = FULL_FIT, the full-data model's) finished stage-2 summary for a later stage: refused when
    it was trained as another architecture or class count, when it is not made, or made from other inputs (`by`:
    the unit that reads it)."""
    u = units[f"weights_{FULL}" if k == layout.FULL_FIT else f"weights{k}"]
    if u.out.exists():
        s = read_json(u.out)
        if s["num_classes"] != n_classes or s["arch"] != arch:
            raise PipelineError(f"{u.out}: trained as {s['arch']} with {s['num_classes']} classes, but the config "
                                f"says {arch} with {n_classes} classes")
    return units.require(u.key, by)
