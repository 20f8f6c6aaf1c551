"""The CV leaderboard over every experiment under runs/ and ensemble under submissions/, and the
comparison of two experiments.

Every figure is recomputed here from the raw per-fold predictions the stages wrote (one code path
for every experiment, so rows are comparable): stage 2's `fold<k>/oof.npz` (joint head, no TTA),
stage 3's held-out heads (each head, no TTA) and stage 4's held-out
rows (the head with the TTA policy), read through core/predict/stored. A row is one (experiment, head, TTA) a
submission could be made from. CVs are only comparable on the same folds file: rows on another
folds file than most rows are marked.
"""
from __future__ import annotations

import fnmatch
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ...core.files import layout
from ...core.files.artifacts import read_json, write_csv, write_text
from ...core.config import AugCfg, Config, ModelCfg, TrainCfg, flatten, load_config
from ...core.errors import PipelineError
from ...core.files.layout import RunDir
from ...core.inputs.data import private_score, read_test_labels
from ...core.predict.metrics import GREATER_IS_BETTER, RowScores, cv, row_scores
from ...core.files.provenance import changed_keys
from ...core.predict.submission import Member
from ...core.predict.inference import FIXRES
from ...core.predict.stored import STORE_VERSION, HeldOut, Stage4
from ...core.predict.tta import BASELINE

log = logging.getLogger("pipeline")

COLUMNS = ["rank", "experiment", "model", "img_size", "epochs", "recipe", "head", "tta", "metric", "cv_mean", "cv_std",
           "cv_pooled", "macro_f1", "balanced_accuracy", "many_acc", "medium_acc", "few_acc", "private", "folds",
           "members", "sweep", "note"]
NOT_COMPARABLE = "folds differ"
LEAKY = "leaky targets (train.distill.leaky_oof): CV optimistic"
SELECTED = "stage 2 chose {} on the scored rows: CV optimistic"
SWEEP_WINNER = "the best of sweep {}'s {} trials, selected on these rows: CV optimistic (the sweep's nested row is not)"
ENSEMBLE_OF_WINNER = ("holds {}, the best of sweep {}'s {} trials, selected on these rows: CV optimistic (the sweep's "
                      "nested row is not)")


def stage2_held_out_choices(summary: dict) -> list[str]:
    """What a fold's stage 2 chose on its held-out rows (summaries before 2026-12-02 lack the field: they kept
    the better of raw and EMA, and with select=best the epoch too)."""
    if "chosen_on_held_out" in summary:
        return summary["chosen_on_held_out"]
    t = summary.get("made_from", {}).get("train")
    if t is None:
        return []
    return ((["epoch"] if t.get("select", "best") == "best" else []) + (["raw/EMA weights"] if t.get("ema") else [])
            + (["early stop"] if t.get("patience") is not None else []))


# ----------------------------------------------------------------------------- one experiment
def experiment_config(run: RunDir) -> Config:
    if not run.config.exists():
        raise PipelineError(f"{run.dir} has no config.yaml: not an experiment folder written by stage 2")
    return load_config(run.config)


def fold_summaries(run: RunDir, n_splits: int) -> list[dict]:
    """Stage-2 summaries of every fold, or [] when a fold is unfinished."""
    paths = [run.fold(k).summary for k in range(n_splits)]
    return [read_json(p) for p in paths] if all(p.exists() for p in paths) else []


def predictions(run: RunDir, K: int) -> dict[tuple[str, bool], dict]:
    """(head, tta) -> OOF {ids, y, fold, rows: metrics.RowScores} [+ test {ids, probs: a function}] from the stages'
    files. Each file's rows x classes is reduced to per-row scores as it is read (one in memory at a time); test
    probabilities are read when asked for (the private score). K: the folds."""
    out = {}

    def per_fold(files: list[HeldOut]) -> dict | None:
        if not all(f.exists() for f in files):
            return None
        ids, ys, parts = [], [], []
        for f in files:
            p = f.scores()  # the per-row scores the stage stored beside the rows (O(rows))
            ids.append(p["ids"])
            ys.append(p["y"])
            parts.append(p["rows"])
        return {"ids": np.concatenate(ids), "y": np.concatenate(ys),
                "fold": np.concatenate([np.full(len(i), k) for k, i in enumerate(ids)]), "rows": RowScores.concat(parts)}

    def stage4(stored: Stage4, plain: bool) -> dict:
        o = stored.rows()
        rows = stored.scores(plain)  # stage 4's own per-row scores; else computed in blocks of rows
        if rows is None:
            rows = (row_scores(o["y"], logits=stored.view_logits(), dtype=np.float64) if plain
                    else row_scores(o["y"], probs=stored.prob_table()))
        return {"ids": o["ids"], "y": o["y"], "fold": o["fold"], "rows": rows}

    def test_probs(stored: Stage4, plain: bool):
        def load():
            return stored.prob_table(plain)  # read a block of rows at a time by the scorer
        return load

    joint = per_fold([HeldOut.of(run, k) for k in range(K)])
    if joint is not None:
        out[("joint", False)] = joint
    if run.rebalance_summary.exists():
        for v in [r["variant"] for r in read_json(run.rebalance_summary)["table"]]:
            p = per_fold([HeldOut.of(run, k, v) for k in range(K)])
            if p is not None:
                out[(v, False)] = p
    s = read_json(run.infer_summary) if run.infer_summary.exists() else None
    if s is not None and s.get("store", {}).get("version") != STORE_VERSION:
        log.warning("leaderboard: %s: stage 4 was written by an older version (per-head logit files): its rows are "
                    "left out until ./run.sh infer re-runs it", run.name)
        s = None
    if s is not None:
        # TTA rows: the OOF probabilities of a searched policy come from each fold's own (nested) choice
        tta = any(p != [BASELINE] for p in [s["policy"], *(s.get("fold_policies") or [])])
        for h in s["heads"]:
            test, oof = Stage4.of(run, h, "test", s), Stage4.of(run, h, "oof", s)
            if (h, False) not in out and oof.exists():  # heads of stage 4's own (best: nested per fold; mix):
                # their no-TTA row is stage 4's plain view
                out[(h, False)] = stage4(oof, True)
            if (h, False) in out and test.exists():
                out[(h, False)]["test"] = {"ids": test.ids(), "probs": test_probs(test, True)}
            if tta and oof.exists():
                out[(h, True)] = stage4(oof, False)
                if test.exists():
                    out[(h, True)]["test"] = {"ids": test.ids(), "probs": test_probs(test, False)}
    return out


def recipe(m: ModelCfg, a: AugCfg, t: TrainCfg, fixres: float | None, summaries: list[dict], s4: dict | None,
           tta: bool) -> str:
    """The fine-tuning controls in use, in a few words (empty: the plain recipe); `fixres`: infer.fixres.size."""
    out = []
    pw = summaries[0].get("made_from", {}).get("pretrained_weights") if summaries else None
    if pw:  # local weights: their file and the first digits of their sha256 (what stage 2 recorded)
        out.append(f"weights {pw['name']}@{pw['sha256'][:8]}")
    elif m.pretrained:
        out.append("weights: timm hub")
    if m.head_init_scale is not None or m.head_init_bias is not None:
        out.append("head init" + (f" x{m.head_init_scale:g}" if m.head_init_scale is not None else "")
                   + (f" bias {m.head_init_bias:g}" if m.head_init_bias is not None else ""))
    if t.head_init == "probe" and t.epochs > 0:
        out.append("LP-FT")
    if t.bn_stats == "frozen":
        out.append("BN stats frozen")
    if t.backbone_lr_mult != 1.0:
        out.append(f"backbone lr x{t.backbone_lr_mult:g}")
    if t.layer_decay is not None:
        out.append(f"layer decay {t.layer_decay:g}")
    if t.freeze_epochs:
        out.append(f"head warm-up {t.freeze_epochs} ep{' (BN frozen)' if t.freeze_bn else ''}")
    if t.patience is not None:
        ran = [s.get("epochs_trained", t.epochs) for s in summaries]
        out.append(f"early stop p{t.patience} (ran {min(ran)}-{max(ran)} ep)")
    if a.size_schedule:
        out.append("sizes " + " ".join(f"{side}@{e}" for e, side in a.size_schedule))
    if a.policy:
        out.append(f"policy {a.policy}")
    if t.loss != "ce" or t.class_weights != "none" or t.drw_epoch is not None:
        out.append(t.loss + (" + CB weights" if t.class_weights != "none" else "")
                   + (f" + DRW@{t.drw_epoch}" if t.drw_epoch is not None else ""))
    if t.freeze_backbone:
        out.append("linear probe")
    if t.trainable_stages is not None:
        out.append(f"last {t.trainable_stages} stage(s) trained")
    if t.pseudo.teacher:
        n = [s["teacher"]["pseudo_images"] for s in summaries if s.get("teacher")]
        out.append(f"pseudo-labels from {t.pseudo.teacher} (p>={t.pseudo.threshold:g}, "
                   f"{'soft' if t.pseudo.soft else 'hard'}, x{t.pseudo.weight:g}; {min(n, default=0)}-{max(n, default=0)} "
                   f"images/fold)")
    if t.distill.teacher:
        out.append(f"distilled from {t.distill.teacher} (T={t.distill.temperature:g}, alpha={t.distill.alpha:g}"
                   f"{', LEAKY OOF targets' if t.distill.leaky_oof else ''})")
    if s4 is not None and s4.get("full_fit_weight", 0) > 0:
        out.append(f"+ full fit x{s4['full_fit_weight']:g} (test only, no CV of its own)")
    if tta and s4 is not None and any(v.startswith(FIXRES) for v in s4["policy"]):
        out.append(f"FixRes {fixres:g}")
    return "; ".join(out)


def experiment_rows(run: RunDir, preds: dict | None = None) -> list[dict]:
    """Leaderboard rows of one experiment (`preds`: its `predictions`, when already read)."""
    cfg = experiment_config(run)
    e = cfg.eval
    summaries = fold_summaries(run, cfg.folds.n_splits)
    if not summaries:
        return []
    counts = [s["train_counts"] for s in summaries]
    folds_hash = summaries[0]["made_from"]["folds_file"]
    classes = read_json(run.classes)
    s4 = read_json(run.infer_summary) if run.infer_summary.exists() else None
    labelled = read_test_labels(cfg.data) is not None
    rows = []
    for (head, tta), pred in (predictions(run, cfg.folds.n_splits) if preds is None else preds).items():
        ev = cv(pred["y"], None, pred["fold"], counts, e.many_shot, e.few_shot, e.scorer, rows=pred["rows"])
        test = pred.get("test")
        rows.append({"experiment": cfg.experiment, "model": cfg.model.arch + (f" ({cfg.model.pool})"
                                                                              if cfg.model.pool != "avg" else ""),
                     "img_size": cfg.aug.img_size, "epochs": cfg.train.epochs,
                     "recipe": recipe(cfg.model, cfg.aug, cfg.train, cfg.infer.fixres.size, summaries, s4 if "test" in pred else None, tta), "head": head,
                     "tta": "on" if tta else "off", "metric": cfg.eval.scorer, **ev,
                     "private": private_score(cfg.data, cfg.eval.scorer, test["ids"], test["probs"], classes) if test and labelled
                     else None,
                     "folds": f"{cfg.folds_csv.stem}@{folds_hash[:8]}", "folds_sha256": folds_hash,
                     "members": "", "kind": "model", "leaky": bool(cfg.train.distill.teacher and
                                                                    cfg.train.distill.leaky_oof),
                     "selected": ", ".join(stage2_held_out_choices(summaries[0]))})
    return rows


def ensemble_rows(sub_dir: Path, runs: Path) -> list[dict]:
    rows = []
    for path in sorted(sub_dir.glob("*.json")) if sub_dir.exists() else []:
        s = read_json(path)
        ens = [r for r in s.get("table", []) if r["member"].startswith("ensemble")]
        if not ens:
            continue
        r = ens[0]
        folds, selected = set(), []
        for m in s["members"]:
            stage2 = RunDir.of(Member.parse(m, f"{path}: member").exp, runs).fold(0).summary
            s2 = read_json(stage2) if stage2.exists() else {}
            folds.add(s2.get("made_from", {}).get("folds_file"))
            selected += [c for c in stage2_held_out_choices(s2) if c not in selected] if s2 else []
        fh = folds.pop() if len(folds) == 1 else None
        rows.append({"experiment": s["name"], "model": f"ensemble ({s['method']})", "img_size": None, "epochs": None,
                     "recipe": "",
                     "head": "", "tta": "", "metric": s["metric"], "cv_mean": r["cv_mean"], "cv_std": r["cv_std"],
                     "per_fold": r.get("per_fold"), "cv_pooled": r["cv_pooled"],
                     **{m: r.get(m) for m in ("macro_f1", "balanced_accuracy", "many_acc", "medium_acc", "few_acc")},
                     "private": s.get("private"), "folds": f"@{fh[:8]}" if fh else "?", "folds_sha256": fh,
                     "members": " + ".join(s["members"]), "kind": "ensemble", "selected": ", ".join(selected),
                     "member_exps": [Member.parse(m, f"{path}: member").exp for m in s["members"]]})
    return rows


def sweep_rows(runs: Path, rows: list[dict]) -> tuple[list[dict], dict[str, tuple[str, str]], dict[str, tuple]]:
    """Each sweep's nested CV as a row of its own (for each fold k, the trial best on the other folds, scored on
    fold k: honest however many trials ran), {trial experiment: (sweep, state)} from runs/.sweeps/*/trials.json, and
    {naive winner: (sweep, finished trials)}."""
    out, trials, winners = [], {}, {}
    for d in layout.sweeps(runs):
        s = read_json(d.trials)
        for t in s["trials"]:
            trials[t["experiment"]] = (s["sweep"], t["state"])
        sel = s["selection"]
        if sel.get("nested") is None:
            continue
        winner = next((r for r in rows if r["experiment"] == sel["winner"]), {})
        per = sel["nested_per_fold"]
        n = sum(t["state"] == "complete" for t in s["trials"])
        winners[sel["winner"]] = (s["sweep"], n)
        out.append({"experiment": s["sweep"], "model": f"sweep, nested over {n} trials", "img_size": None,
                    "epochs": None, "recipe": f"winner {sel['winner']}", "head": "", "tta": "", "metric": s["metric"],
                    "cv_mean": sel["nested"], "cv_std": float(np.std(per)), "per_fold": per, "cv_pooled": None,
                    "private": None, "folds": winner.get("folds", "?"), "folds_sha256": winner.get("folds_sha256"),
                    "members": "", "kind": "sweep", "sweep": s["sweep"], "selected": winner.get("selected", "")})
    return out, trials, winners


# ----------------------------------------------------------------------------- the table
def build(runs: Path, submissions: Path | None = None) -> pd.DataFrame:
    """Every row; `submissions` defaults to the submissions/ folder beside `runs`. Trials of a sweep carry its name;
    only its finished ones are rows (pruned, failed and running trials are never ranked)."""
    rows = []
    for name in layout.experiments(runs):
        try:
            rows += experiment_rows(RunDir.of(name, runs))
        except (PipelineError, KeyError, ValueError) as e:  # one broken folder must not hide the others
            log.warning("leaderboard: skipped %s (%s)", runs / name, e)
    rows += ensemble_rows(submissions if submissions is not None else Path(runs).parent / layout.SUBMISSIONS.name, runs)
    nested, trials, winners = sweep_rows(runs, rows)
    rows = [dict(r, sweep=trials[r["experiment"]][0]) if r["experiment"] in trials else r for r in rows
            if trials.get(r["experiment"], ("", "complete"))[1] == "complete"] + nested
    t = pd.DataFrame(rows)
    if t.empty:
        return pd.DataFrame(columns=COLUMNS)
    t["leaky"] = t["leaky"].fillna(False).astype(bool) if "leaky" in t else False
    ref_folds = t["folds_sha256"].value_counts().idxmax()
    ref_metric = t["metric"].value_counts().idxmax()
    notes = []
    for _, r in t.iterrows():
        n = []
        if r["folds_sha256"] != ref_folds:
            n.append(NOT_COMPARABLE)
        if r["metric"] != ref_metric:
            n.append("other metric")
        if r["leaky"]:
            n.append(LEAKY)
        if isinstance(r.get("selected"), str) and r["selected"]:
            n.append(SELECTED.format(r["selected"]))
        if r["experiment"] in winners and r.get("kind") != "sweep":
            n.append(SWEEP_WINNER.format(*winners[r["experiment"]]))
        held = [e for e in (r.get("member_exps") if isinstance(r.get("member_exps"), list) else []) if e in winners]
        if r.get("kind") == "ensemble" and held:  # e.g. sweep --finish: the naive winner's own ensemble
            n += [ENSEMBLE_OF_WINNER.format(e, *winners[e]) for e in held]
        notes.append(", ".join(n))
    t["note"] = notes
    t = t.drop(columns=["member_exps"], errors="ignore")
    return t.astype({"img_size": "Int64", "epochs": "Int64"})


def rank(t: pd.DataFrame, sort: str | None = None, pattern: str | None = None, best: bool = False) -> pd.DataFrame:
    """Filter (`pattern`: a glob on the experiment name, or COLUMN=GLOB), sort (default: CV mean,
    best first; rows with another folds file or metric go last) and number the rows."""
    if t.empty:
        return t
    if pattern:
        col, _, glob = pattern.partition("=") if "=" in pattern else ("experiment", "", pattern)
        if col not in t:
            raise PipelineError(f"--filter {pattern}: no column '{col}' (columns: {', '.join(COLUMNS[1:])})")
        t = t[t[col].astype(str).map(lambda v: fnmatch.fnmatch(v, glob))]
    metric = t["metric"].value_counts().idxmax() if len(t) else "accuracy"
    col = sort or "cv_mean"
    if col not in t:
        raise PipelineError(f"--sort {col}: no such column (columns: {', '.join(COLUMNS[1:])})")
    if col in ("cv_mean", "cv_pooled", "private"):
        ascending = not GREATER_IS_BETTER[metric]
    elif pd.api.types.is_numeric_dtype(t[col]):
        ascending = col == "cv_std"
    else:
        ascending = True
    t = t.assign(_last=t["note"] != "").sort_values(["_last", col], ascending=[True, ascending], kind="stable",
                                                    na_position="last")
    if best:
        t = t.drop_duplicates("experiment", keep="first")
    t = t.drop(columns="_last").reset_index(drop=True)
    t.insert(0, "rank", np.arange(1, len(t) + 1))
    return t


def to_text(t: pd.DataFrame) -> str:
    if t.empty:
        return "no finished experiments under runs/"
    view = t.copy()
    view["cv"] = [f"{m:.4f} ± {s:.4f}" for m, s in zip(view["cv_mean"], view["cv_std"])]
    for c in ("img_size", "epochs"):
        view[c] = [("" if pd.isna(v) else str(v)) for v in view[c]]
    cols = ["rank", "experiment", "model", "img_size", "epochs", "recipe", "head", "tta", "cv", "cv_pooled", "macro_f1",
            "balanced_accuracy", "many_acc", "medium_acc", "few_acc", "private", "folds", "members", "note"]
    if "sweep" in view:
        view["sweep"] = view["sweep"].fillna("")
        cols.insert(cols.index("members") + 1, "sweep")
    return view[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="")


def write(runs: Path, reports: Path, sort: str | None = None, pattern: str | None = None,
          best: bool = False) -> pd.DataFrame:
    t = rank(build(runs), sort, pattern, best)
    out = t[[c for c in COLUMNS if c in t]] if not t.empty else t
    write_csv(layout.leaderboard_csv(reports), out)
    lines = ["# Leaderboard", "",
             "CV = mean ± std of the per-fold metric; pooled = the metric on all OOF rows at once. "
             f"Rows marked '{NOT_COMPARABLE}' use another folds file than most rows: their CV is not comparable. "
             "Rows with a note come last: their CV is not comparable or was selected on the rows it scores.",
             "", "| " + " | ".join(out.columns) + " |", "|" + "---|" * len(out.columns)]
    for _, r in out.iterrows():
        lines.append("| " + " | ".join(_cell(v) for v in r.values) + " |")
    write_text(layout.leaderboard_md(reports), "\n".join(lines) + "\n")
    return t


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------- compare
def compare(runs: Path, a: str, b: str) -> str:
    """Config differences of two experiments next to their metric differences per fold, and
    whether the mean difference exceeds fold-to-fold noise (paired over folds when they share a
    folds file: |mean diff| > 2 standard errors of the per-fold differences)."""
    cfgs = {n: experiment_config(RunDir.of(n, runs)) for n in (a, b)}
    da, db = (flatten(cfgs[n].to_dict()) for n in (a, b))
    keys = [k for k in changed_keys(cfgs[a].to_dict(), cfgs[b].to_dict()) if k not in ("experiment", "run_also")]
    out = [f"# {a} vs {b}", "", "## Config differences", ""]
    out += [f"  {k}: {da.get(k)!r} -> {db.get(k)!r}" for k in keys] or ["  (none besides the name)"]
    rows = {n: {(r["head"], r["tta"]): r for r in experiment_rows(RunDir.of(n, runs))} for n in (a, b)}
    for n in (a, b):
        if not rows[n]:
            raise PipelineError(f"experiment '{n}' has unfinished folds: nothing to compare yet")
    common = [k for k in rows[a] if k in rows[b]]
    same_folds = next(iter(rows[a].values()))["folds_sha256"] == next(iter(rows[b].values()))["folds_sha256"]
    metric = cfgs[a].eval.scorer
    out += ["", f"## Metric differences ({metric}, B - A)", ""]
    if not same_folds:
        out += ["  warning: the two experiments use different folds files; per-fold differences are not paired "
                "and the CVs are not strictly comparable", ""]
    table = []
    for key in common:
        ra, rb = rows[a][key], rows[b][key]
        pa, pb = np.array(ra["per_fold"]), np.array(rb["per_fold"])
        k = min(len(pa), len(pb))
        if same_folds and len(pa) == len(pb):
            d = pb - pa
            se = d.std(ddof=1) / np.sqrt(k) if k > 1 else np.inf
        else:
            d = np.array([pb.mean() - pa.mean()])
            se = np.sqrt(pa.var(ddof=1) / len(pa) + pb.var(ddof=1) / len(pb)) if k > 1 else np.inf
        diff = float(pb.mean() - pa.mean())
        better_b = diff > 0 if GREATER_IS_BETTER[metric] else diff < 0
        verdict = ("B better" if better_b else "A better") if abs(diff) > 2 * se else "within fold noise"
        row = {"head": key[0], "tta": key[1], "A": ra["cv_mean"], "B": rb["cv_mean"], "diff": diff,
               "2*SE": 2 * se, "std A": pa.std(), "std B": pb.std(), "verdict": verdict}
        if same_folds:
            row.update({f"fold{i}": float(x) for i, x in enumerate(d)})
        table.append(row)
    out.append(pd.DataFrame(table).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return "\n".join(out)
