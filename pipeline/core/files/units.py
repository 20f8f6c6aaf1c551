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
- `order()`: the order every unit can be made in (deps first);
- `record(key)`: the record a stage writes into its own output: a stage asks its unit, it calls no recipe.

Stage-internal caches (a fold's feature cache, the probe features, a FixRes copy) are units too (`cache`): the
stage that makes them asks their unit whether the copy on disk is current and what record to store with it;
they are left out of `status` (a stale cache shows as its stage's stale output, whose record embeds it).
"""
from __future__ import annotations

import dataclasses
from fnmatch import fnmatchcase as fnmatch
from pathlib import Path
from typing import Callable

from . import layout
from .artifacts import read_json, recorded
from .provenance import (TRAIN_SECTIONS, describe_changes, ensemble_record, feature_record, fixres_record,
                         fold_choices, folds_record, full_record, infer_record, probe_features_record, refuse_stale,
                         report_record, stage3_record, stale_reasons, train_images, train_record)
from ..config import PROBE, Config, wise_name
from ..errors import PipelineError
from ..inputs.data import read_train_table
from ..inputs.pixels import pixels
from ..nets.heads import median_choices
from ..predict.submission import Member, parse_members

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
    cache: bool = False  # a stage-internal cache (made and read by its own stage): not in status, never waited for
    needs: tuple[Path, ...] = ()  # files besides `out` without which the unit counts as not made
    owns: tuple[Path, ...] = ()  # the other files (or folders; a name may hold a * pattern) that are its output

    def owned(self) -> tuple[Path, ...]:
        return (self.out, *self.needs, *self.owns)


class Units:
    """The engine over one experiment's declared units (see the module's docstring)."""

    def __init__(self, units: list[Unit], allow_stale: bool = False):
        self.by_key = {u.key: u for u in units}
        self.allow_stale = allow_stale
        self.read: dict[str, set[str]] = {}  # what each unit's stage asked for (require(by=...)): its declared deps
        self._owned: list | None = None  # owner()'s table, made when first asked
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

    def stage_order(self) -> list[str]:
        """The stages, each after every stage whose units its units read (what `all` runs them in); stages that
        read each other are refused."""
        after = {u.stage: set() for u in self.by_key.values()}
        for u in self.by_key.values():
            after[u.stage] |= {self.by_key[d].stage for d in u.deps} - {u.stage}
        out: list[str] = []
        while len(out) < len(after):
            ready = sorted(s for s, deps in after.items() if s not in out and deps <= set(out))
            if not ready:
                raise ValueError(f"stages {sorted(set(after) - set(out))} read each other's units")
            out.append(ready[0])
        return out

    def own_reasons(self, key: str) -> list[str]:
        """Why the unit differs from what the config would make now, its deps aside ([]: current)."""
        u = self.by_key[key]
        prefix = f"{u.label}: " if u.label else ""
        if not u.out.exists() and u.resume is not None and u.resume.exists():
            return [f"{prefix}interrupted, resumes from {u.resume.name}"]
        if not all(p.exists() for p in u.needs):
            return [f"{prefix}not run"]
        rec = u.record() if u.out.exists() else {}
        if rec is None:  # not compared: made is enough
            return []
        return stale_reasons(u.out, rec, prefix)

    def current(self, key: str) -> bool:
        return not self.own_reasons(key)

    def record(self, key: str) -> dict | None:
        """The record the unit's stage writes into its output now (None: not compared)."""
        return self.by_key[key].record()

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
                    + ", ".join(f"{self.by_key[d].label or self.by_key[d].what or d} (stage {self.by_key[d].stage})"
                                for d in waits)]
        for d in u.deps:
            if self.by_key[d].stage != u.stage:
                self.require(d)
        return self.own_reasons(key)

    def owner(self, path: Path) -> str | None:
        """The key of the unit whose output `path` is (a file it declares, or one inside a folder it declares);
        None: no unit's."""
        if self._owned is None:  # (key, path, a * pattern, a folder): the declarations, looked at once
            self._owned = [(key, p, "*" in p.name, p.is_dir()) for key, u in self.by_key.items() for p in u.owned()]
        for key, p, pattern, folder in self._owned:
            if path == p or (pattern and fnmatch(str(path), str(p))) or (folder and path.is_relative_to(p)):
                return key
        return None

    def unowned(self, run: layout.RunDir) -> list[Path]:
        """The files under the experiment's folder that no declared unit owns (outputs of settings the config no
        longer has: folds beyond folds.n_splits, heads of variants dropped, FixRes copies, a finished fold's resume
        checkpoint, stage-4 files of an older layout), sorted; the config, label encoding, logs, tracking folder and
        lock files are kept. What `./run.sh clean` removes."""
        return [f for f in sorted(run.dir.rglob("*")) if f.is_file() and not kept(run, f) and self.owner(f) is None]

    def status(self, stage: str) -> list[str]:
        """The reasons of every unit of `stage`, in order (empty: the stage is up to date)."""
        return [r for key in self.order() if self.by_key[key].stage == stage and not self.by_key[key].cache
                for r in self.reasons(key)]

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


def kept(run: layout.RunDir, path: Path) -> bool:
    """Files of the experiment's folder that are no unit's output and stay: the resolved config, the label
    encoding, logs, the tracking folder, lock files."""
    return path in (run.config, run.classes) or path.name == ".lock" or path.is_relative_to(run.logs) \
        or path.is_relative_to(run.tracking)


def _stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def experiment_units(cfg: Config) -> Units:
    """Every unit of the experiment `cfg` names, as its config declares them now: the folds file; each fold's
    weights, feature cache and heads; with train.full_fit the full-data model's; the probe features; stage 3's
    report; FixRes copies; stage 4's predictions; the ensemble's submission. Without the folds file (test-only
    inference in a kernel) the records of stages 2-3 are not compared. Each record is computed when first asked
    for, once per Units and state of the same-stage outputs it reads (_Memo)."""
    run, n, px = cfg.run_dir, cfg.folds.n_splits, pixels(cfg)
    has_folds = cfg.folds_csv.exists()
    once = _Memo().once
    trained_rec = once("train", lambda: train_record({s: getattr(cfg, s) for s in TRAIN_SECTIONS}, px, cfg.seed,
                                                     cfg.folds_csv, cfg.session.looks) if has_folds else None)
    imgs = once("images", lambda: train_images(cfg.folds_csv, cfg.data.hash_images, cfg.session.looks))
    classes = once("classes", lambda: read_json(run.classes), lambda: [run.classes])
    summaries = lambda: [run.fold(k).summary for k in range(n)]  # noqa: E731
    heads_files = lambda: [run.fold(k).rebalance_summary for k in range(n)]  # noqa: E731

    def full_rec() -> dict | None:
        choices = fold_choices(run, n, trained_rec()) if has_folds else None
        return full_record(trained_rec(), choices) if choices is not None else None

    def heads_rec(k: int) -> Record:
        def make() -> dict | None:
            if not has_folds:
                return None
            chosen = None if k != layout.FULL_FIT else median_choices(cfg.rebalance.variants,
                                                                      [read_json(p) for p in heads_files()])
            return stage3_record(run, k, classes(), cfg.rebalance, cfg.eval, cfg.model, px, cfg.seed, imgs(), chosen)
        return once(f"heads{k}", make, lambda: [run.unit(k).weights, *(heads_files() if k == layout.FULL_FIT else [])])

    caches, probe = _feature_records(run, _units_of(n, cfg.train.full_fit), cfg.rebalance, cfg.model, px, cfg.seed,
                                     classes, imgs, once)
    full_tested = cfg.train.full_fit and cfg.infer.full_fit_weight > 0
    fixres = {k: (lambda k=k: fixres_record(cfg.infer.fixres, cfg.train, px, cfg.seed, run.unit(k).weights,
                                            cfg.folds_csv, imgs()))
              for k in (_units_of(n, full_tested) if cfg.infer.fixres.size is not None else [])}
    units = [Unit("folds", "", "1", cfg.folds_record,
                  once("folds", lambda: folds_record(cfg.folds, cfg.data, read_train_table(cfg.data))),
                  what="the folds file", fix="re-run ./run.sh folds --force (or set folds.name)",
                  missing=f"{cfg.folds_csv} not found: run ./run.sh folds")]
    units += _stage2_units(run, n, cfg.train.full_fit, has_folds, trained_rec, once("full", full_rec, summaries))
    if (cfg.train.pseudo.teacher or cfg.train.distill.teacher) and has_folds:
        units += _teacher_units(run, _units_of(n, cfg.train.full_fit), trained_rec)
    r = cfg.rebalance
    units += _stage3_units(run, n, cfg.train.full_fit, heads_rec,
                           once("report", lambda: report_record([read_json(p) for p in heads_files()]), heads_files),
                           [*r.variants, *(PROBE + v for v in r.probe), *map(wise_name, r.wise_alpha)], list(r.variants))
    units += _cache_units(run, caches, probe, fixres)
    heads = has_folds and any(h != "joint" for h in cfg.infer.heads)
    infer_rec = once("infer", lambda: infer_record(cfg.infer, cfg.data, run, cfg.folds_name, cfg.folds_csv, n,
                                                   cfg.train.full_fit, cfg.session.looks))
    units.append(_infer_unit(run, n, full_tested, heads, infer_rec,
                             [u.key for u in units if u.cache and u.stage == "3" and u.label != "full"]))
    listed = parse_members(cfg.ensemble.members, cfg.experiment)
    units.append(_ensemble_unit(cfg.ensemble.name or cfg.experiment, bool(cfg.data.sample_submission),
                                once("ensemble", lambda: ensemble_record(cfg.ensemble, cfg.eval, cfg.data,
                                                                         members_made_from(listed))),
                                any(m.exp == cfg.experiment for m in listed)))
    return Units(units, cfg.session.allow_stale)


def _feature_records(run: layout.RunDir, ks: list[int], rebalance, model, px, seed: int, classes: Record,
                     imgs: Record, once) -> tuple[dict[int, Record], Record | None]:
    """The records of stage 3's feature caches: each trained unit's (k -> record, recomputed when its weights
    change) and the pretrained backbone's (rebalance.probe or wise_alpha; else None)."""
    caches = {k: once(f"features{k}", lambda k=k: feature_record(run.unit(k).weights, classes(), px,
                                                                 rebalance.aug_views, seed, imgs(), rebalance.features),
                      lambda k=k: [run.unit(k).weights]) for k in ks}
    probe = (once("probe", lambda: probe_features_record(model, px, classes(), imgs()))
             if rebalance.probe or rebalance.wise_alpha else None)
    return caches, probe


class _Memo:
    """Records computed when first asked for, once per state (mtime, size) of the same-stage files they read
    (`watch`): a fold summary rewritten since gives a new record."""

    def __init__(self):
        self.memo: dict = {}

    def once(self, key: str, make: Record, watch: Callable[[], list] = list) -> Record:
        def get():
            at = (key, *map(_stamp, watch()))
            return self.memo[at] if at in self.memo else self.memo.setdefault(at, make())
        return get


def members_made_from(members: list[Member]) -> dict[str, dict]:
    """Each ensemble member's stage-4 record, by its name with the head resolved (stage 5's record holds them)."""
    return {str(m): s["made_from"] for m, s in map(member_summary, members)}


def _units_of(n: int, full: bool) -> list[int]:
    """The trained units' k: every fold, and the full-data model (FULL_FIT) with `full`."""
    return [*range(n), *([layout.FULL_FIT] if full else [])]


def _weights(k: int) -> str:
    return f"weights_{FULL}" if k == layout.FULL_FIT else f"weights{k}"


def _cache_units(run: layout.RunDir, features: dict[int, Record], probe: Record | None,
                 fixres: dict[int, Record]) -> list[Unit]:
    """The stage-internal caches: each trained unit's pooled features of stage 3 (`features`: k -> record), the
    pretrained backbone's features (rebalance.probe, wise_alpha; `probe`) and stage 4's FixRes copies (infer.fixres;
    `fixres`: k -> record)."""
    out = [Unit(f"features_{run.unit(k).name}", run.unit(k).name, "3", run.unit(k).features_meta, rec, (_weights(k),),
                "its stage-3 feature cache", REBALANCE, cache=True, needs=(run.unit(k).features,))
           for k, rec in features.items()]
    if probe is not None:
        out.append(Unit("probe_features", "probe", "3", run.probe_features_meta, probe, ("folds",),
                        "the pretrained backbone's features", REBALANCE, cache=True, needs=(run.probe_features,)))
    return out + [Unit(f"fixres_{run.unit(k).name}", run.unit(k).name, "4", run.fixres_meta(run.unit(k).name), rec,
                       (_weights(k),), "its FixRes copy", "re-run ./run.sh infer", cache=True,
                       needs=(run.fixres(run.unit(k).name),)) for k, rec in fixres.items()]


def _infer_unit(run: layout.RunDir, n: int, full: bool, heads: bool, rec: Record, caches: list[str]) -> Unit:
    """Stage 4's predictions: they read every fold's weights, the full-data model's when it joins the test mean
    (`full`), and when a head is not the joint one (`heads`) every fold's heads, stage 3's report (the variants'
    CV behind `best`, the mix head's parts, the WiSE-FT heads), the full-data model's heads and the folds' stage-3
    feature caches (`caches`: the held-out rows' logits the mix head is chosen on are computed from them)."""
    deps = [*(f"weights{k}" for k in range(n)), *([f"weights_{FULL}"] if full else []),
            *(f"heads{k}" for k in range(n) if heads), *(["report"] if heads else []),
            *([f"heads_{FULL}"] if full and heads else []), *(caches if heads else [])]
    return Unit("infer", "", "4", run.infer_summary, rec, tuple(deps), "", f"re-run ./run.sh infer for '{run.name}' "
                f"(or ./run.sh all)", f"experiment '{run.name}' has no stage-4 output ({run.infer_summary}); run "
                f"./run.sh infer", owns=(run.infer_report, run.infer_scores, run.infer_rows, run.infer_features_dir))


def member_summary(member: Member) -> tuple[Member, dict]:
    """An ensemble member's stage-4 summary, and the member with its head resolved (stage 4's primary head when
    it names none); refused when stage 4 has not run or did not predict the head."""
    run = layout.RunDir.of(member.exp)
    if not run.infer_summary.exists():
        raise PipelineError(f"ensemble member '{member}': {run.infer_summary} not found; run ./run.sh infer for "
                            f"'{member.exp}'")
    s = read_json(run.infer_summary)
    member = member.with_head(member.head or s["primary"])
    if member.head not in s["heads"]:
        raise PipelineError(f"ensemble member '{member}': stage 4 predicted heads {s['heads']} only")
    return member, s


def _ensemble_unit(name: str, with_sample: bool, rec: Record, own_member: bool) -> Unit:
    """Stage 5's submission `name`: made from the ensemble's settings, the sample submission and each member's
    stage-4 record; it reads the experiment's own `infer` unit when the experiment is a member (`own_member`; other
    experiments' members are asked of their own units by stage 5); without a sample submission (`with_sample`) its
    record alone says it is made."""
    csv = layout.submission_csv(name)
    return Unit("ensemble", "", "5", layout.submission_record(name), rec, ("infer",) if own_member else (),
                f"ensemble {name}'s submission",
                "re-run ./run.sh ensemble", f"ensemble {name} has no submission ({csv}); run ./run.sh ensemble",
                needs=(csv,) if with_sample else ())


def _stage2_units(run: layout.RunDir, n: int, full_fit: bool, has_folds: bool, fold_rec: Record,
                  full_rec: Record) -> list[Unit]:
    """Each fold's weights (all made from one record) and, with train.full_fit, the full-data model's."""
    name = run.name
    out = [Unit(f"weights{k}", f"fold {k}", "2", run.fold(k).summary, fold_rec, ("folds",) if has_folds else (),
                "the fold's stage-2 weights", REFIT,
                f"fold {k} of experiment '{name}' has no finished stage-2 output ({run.fold(k).summary}); run "
                f"./run.sh train --fold {k}", run.fold(k).checkpoint, owns=_trained_files(run.fold(k)))
           for k in range(n)]
    if full_fit:
        out.append(Unit(f"weights_{FULL}", "full fit", "2", run.full.summary, full_rec,
                        tuple(f"weights{k}" for k in range(n)), "the full-data model", REFIT,
                        f"train.full_fit is on but the full-data model of '{name}' is not finished "
                        f"({run.full.summary}); run ./run.sh train", run.full.checkpoint,
                        owns=_trained_files(run.full)))
    return out


def _trained_files(fd: layout.FoldDir) -> tuple[Path, ...]:
    """A trained unit's files: its weights, held-out logits and history, and until it is finished its resume
    checkpoint and the best weights so far (a finished unit never reads them). Its teacher's targets are a unit of
    their own (_teacher_units)."""
    unfinished = () if fd.summary.exists() else (fd.checkpoint, fd.best("*"), fd.oof_of("*"))
    return (fd.weights, fd.oof, fd.history, *unfinished)


def _teacher_units(run: layout.RunDir, ks: list[int], train_rec: Record) -> list[Unit]:
    """train.pseudo / train.distill: each trained unit's teacher targets (the teachers' fold-k probabilities, a
    stage-2 cache made before the unit trains), made from the teachers' record in the stage-2 record and the fold."""
    def rec(k: int) -> Record:
        return lambda: {"teacher": train_rec()["teacher"], "fold": k}
    return [Unit(f"teacher_{run.unit(k).name}", run.unit(k).name, "2", run.unit(k).teacher_meta, rec(k), ("folds",),
                 "its teacher targets", REFIT, cache=True, needs=(run.unit(k).teacher_targets,)) for k in ks]


def _stage3_units(run: layout.RunDir, n: int, full_fit: bool, heads_rec: Callable[[int], Record],
                  report_rec: Record, names: list[str], full_names: list[str]) -> list[Unit]:
    """Each fold's heads, stage 3's report over them and, with train.full_fit, the full-data model's heads (`names`:
    the variants stage 3 fits on a fold, probe and WiSE-FT ones included; `full_names`: on the full-data model)."""
    name, heads = run.name, tuple(f"heads{k}" for k in range(n))
    out = [Unit(f"heads{k}", f"fold {k}", "3", run.fold(k).rebalance_summary, heads_rec(k), (f"weights{k}",),
                "the fold's rebalanced heads", REBALANCE,
                f"fold {k} of experiment '{name}' has no rebalanced heads ({run.fold(k).rebalance_summary}); run "
                f"./run.sh rebalance", owns=_head_files(run.fold(k), names)) for k in range(n)]
    out.append(Unit("report", "report", "3", run.rebalance_summary, report_rec, heads, "stage 3's report", REBALANCE,
                    f"experiment '{name}' has no stage-3 report ({run.rebalance_summary}); run ./run.sh rebalance",
                    owns=(run.rebalance_csv, run.rebalance_md)))
    if full_fit:
        out.append(Unit(f"heads_{FULL}", "full fit", "3", run.full.rebalance_summary, heads_rec(layout.FULL_FIT),
                        (f"weights_{FULL}", *heads), "the full-data model's heads", REBALANCE,
                        f"the full-data model of '{name}' has no rebalanced heads ({run.full.rebalance_summary}); "
                        f"run ./run.sh rebalance", owns=_head_files(run.full, full_names)))
    return out


def _head_files(fd: layout.FoldDir, names: list[str]) -> tuple[Path, ...]:
    """The files of a unit's stage-3 heads `names`: each head, its inner splits' heads and its held-out rows."""
    return tuple(p for v in names for p in (fd.head(v), fd.inner_head(v, "*"), fd.head_oof(v)))


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
