"""Stage 5: combine experiments' predictions and write the submission CSV.

Usage:   ./run.sh ensemble [--force] [key=value ...]
Input:   for each member "experiment[:head]" of `ensemble.members` (default: this experiment):
         stage 4's predictions of its head (core/predict/stored.Stage4, from runs/<exp>/infer/);
         the competition's sample_submission.csv
Output:  submissions/<name>.csv    exactly the sample submission's ids, order and columns (without one:
                                   every image of test_dir, sorted, with the id and label columns)
         submissions/<name>.json   members, method, weights, CV of the ensemble and of each member,
                                   and (when test labels are known, as on the demo) the private score
Methods: mean of probabilities; weighted mean with non-negative weights summing to 1, fit on OOF
(log-loss or the metric) and scored honestly: the weights for fold k are fit on the other folds;
geometric mean; rank average. Members must share the folds file, label encoding and image ids.
"""
from __future__ import annotations

import logging
import numpy as np
import pandas as pd
from scipy.optimize import minimize

from ..core.files import layout
from ..core.report import tracking
from ..core.files.artifacts import read_json, sha256_obj, write_csv, write_json
from ..core.config import Config, DataCfg, EnsembleCfg, EvalCfg, load_config
from ..core.inputs.data import private_score, read_sample_submission, read_test_table, test_source
from ..core.errors import PipelineError
from ..core.predict.stored import PARTS, Stage4
from ..core.predict import priors
from ..core.predict.metrics import GREATER_IS_BETTER, block_rows, cv, row_scores, score, score_rows
from ..core.predict.tta import BASELINE
from ..core.predict.submission import (Member, build_submission, combine, mix, parse_members,
                                       submission_without_sample)
from ..core.files.provenance import environment
from ..core.files.units import Units, experiment_units, member_summary

log = logging.getLogger("pipeline")


def load_member(member: Member) -> dict:
    """A member's stage-4 predictions: its head's TTA-policy probabilities, or with `:plain` its no-TTA view's (as
    tables computed on demand: the mean, the geometric mean, the CV and the submission go through them in blocks of
    rows; weights and hill climbing, which revisit every OOF row, read the members' OOF tables whole)."""
    run = layout.RunDir.of(member.exp)
    member, s = member_summary(member)
    m = {"name": str(member), "summary": s}
    for part in PARTS:
        stored = Stage4.of(run, member.head, part, s)
        if part == "oof" and not stored.exists():
            continue
        # a ProbTable: computed from stage 4's features a block of rows at a time by whoever reads it
        m[part] = {**stored.rows(), "probs": stored.prob_table(member.plain)}
    return m


def check_current(members: list[dict], own: str, own_units: Units, allow_stale: bool) -> None:
    """Every member's stage-4 output was made from the settings its experiment has now, asked of its experiment's
    units: `own_units` for the experiment `own` itself, else those of the config it was last trained with
    (runs/<exp>/config.yaml); a member whose config or folds file is not at hand (predictions copied into a kernel)
    is taken as it is."""
    for m in members:
        exp = Member.parse(m["name"]).exp
        path = layout.RunDir.of(exp).config
        units = own_units if exp == own else experiment_units(load_config(path)) if path.exists() else None
        if units is None or not units["folds"].out.exists():
            continue
        units.allow_stale = allow_stale  # the command's --allow-stale
        if units["infer"].out.exists():  # a missing output is load_member's to refuse
            units.require("infer", "ensemble" if exp == own else None)  # another experiment's: read from outside


def status(cfg: Config) -> list[str]:
    """Why stage 5 would do work now (empty: up to date): its unit's reasons (a member not predicted is refused)."""
    units = experiment_units(cfg)
    units.record("ensemble")  # every member predicted, or refused naming it
    return units.status("5")


def check_compatible(members: list[dict]) -> None:
    ref = members[0]
    for m in members[1:]:
        for key, what in (("classes", "label encodings"), ("folds_file", "folds files")):
            if m["summary"][key] != ref["summary"][key]:
                raise PipelineError(f"ensemble members {ref['name']} and {m['name']} have different {what}: "
                                    f"their predictions cannot be combined")
        if not np.array_equal(m["test"]["ids"], ref["test"]["ids"]):
            raise PipelineError(f"ensemble members {ref['name']} and {m['name']} predicted different test image ids")
        if ("oof" in m) != ("oof" in ref) or ("oof" in m and not np.array_equal(m["oof"]["ids"], ref["oof"]["ids"])):
            raise PipelineError(f"ensemble members {ref['name']} and {m['name']} have different OOF image ids")


# ----------------------------------------------------------------------------- weights
def true_class(table, y: np.ndarray) -> np.ndarray:
    """Each row's probability of its true class, read from an N x C table (an array, or a table computed a block of
    rows at a time such as stored.ProbTable or a Mix) a block at a time, in the table's dtype: all the log-loss of a
    weighted mean needs of a member (#49: O(rows) per member, not rows x classes)."""
    out = np.empty(len(y), np.dtype(getattr(table, "dtype", np.float64)))
    step = block_rows(table.shape[1])
    for a in range(0, len(y), step):
        p = np.asarray(table[a:a + step])
        out[a:a + step] = p[np.arange(len(p)), y[a:a + step]]
    return out


def fit_inputs(probs: list, y: np.ndarray, weight_metric: str) -> list[np.ndarray]:
    """What weights are fit on: each member's true-class probabilities for log-loss (streamed), its whole OOF table
    for the metric (a metric of the mix needs every class of every row)."""
    return [true_class(p, y) for p in probs] if weight_metric == "log_loss" else [np.asarray(p) for p in probs]


def _log_loss_of_true(y: np.ndarray, p: np.ndarray) -> float:
    """Log-loss of the true-class probabilities `p` (fit_inputs' form for log_loss), as metrics' log-loss clips."""
    return -float(np.mean(np.log(np.clip(p, 1e-15, 1))))


def fit_weights(probs: list, y: np.ndarray, objective: str, metric: str) -> np.ndarray:
    """Non-negative weights summing to 1 that optimise log-loss (or the metric) of the weighted mean. `probs`: the
    members' N x C OOF tables (arrays or tables read in blocks), or fit_inputs' form of them."""
    n = len(probs)
    if n == 1:
        return np.ones(1)
    given = len(probs[0].shape) == 1 or objective != "log_loss"  # fit_inputs' form already, or whole tables
    p = np.stack([np.asarray(x) for x in probs] if given else fit_inputs(probs, y, objective)).astype(np.float64)

    def loss(w):
        mix = np.tensordot(np.abs(w) / np.abs(w).sum(), p, axes=1)
        if objective == "log_loss":  # p: members x rows, each row's true-class probability
            return -np.mean(np.log(np.clip(mix, 1e-15, 1)))
        v = score(metric, y, mix)
        return -v if GREATER_IS_BETTER[metric] else v

    best = None
    for start in [np.full(n, 1.0 / n)] + [np.eye(n)[i] * 0.7 + 0.3 / n for i in range(n)]:
        res = minimize(loss, start, method="Nelder-Mead" if objective != "log_loss" else "SLSQP",
                       bounds=[(0, 1)] * n, constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}]
                       if objective == "log_loss" else ())
        if best is None or res.fun < best.fun:
            best = res
    w = np.clip(np.abs(best.x), 0, None)
    return w / w.sum()


class FoldMix:
    """OOF probabilities of a weighted ensemble whose weights differ by fold (fold k's rows combined with
    weights[k], fit without them), computed a block of rows at a time like submission.Mix: every CV column (per
    fold and pooled, macro-F1, many/medium/few) is then scored on rows that chose nothing."""
    dtype = np.dtype(np.float64)

    def __init__(self, probs: list, fold: np.ndarray, weights: list[np.ndarray]):
        self.probs, self.fold, self.weights = probs, fold, weights

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.probs[0].shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        f, parts = self.fold[rows], [np.asarray(x[rows]) for x in self.probs]
        out = np.zeros((len(f), self.shape[1]), np.float64)
        for k in np.unique(f):
            sel = f == k
            out[sel] = combine([x[sel] for x in parts], "weighted", self.weights[k])
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, np.float64)
        for a in range(0, len(self), block_rows(self.shape[1])):
            out[a:a + block_rows(self.shape[1])] = self[a:a + block_rows(self.shape[1])]
        return out if dtype is None else out.astype(dtype)


def nested_combine(probs: list, fold: np.ndarray, fold_weights: list[np.ndarray]) -> FoldMix:
    return FoldMix(probs, fold, fold_weights)


def fold_scores(metric: str, probs: list, y: np.ndarray, fold: np.ndarray, fold_weights: list) -> list[float]:
    """The metric of each fold's rows under the weights fit without them (one streamed pass of the members)."""
    rs = row_scores(y, probs=nested_combine(probs, fold, fold_weights))
    return [score_rows(metric, y[fold == k], rs.take(fold == k)) for k in np.unique(fold)]


def honest_cv(probs: list, y: np.ndarray, fold: np.ndarray, weight_metric: str, metric: str,
              fit: list[np.ndarray] | None = None) -> tuple[list[float], list]:
    """Per-fold metric of the weighted ensemble, each fold scored with weights fit on the others, and those
    per-fold weights (a distillation or pseudo-label teacher uses fold k's for its fold-k targets). The members'
    tables are read a block of rows at a time (log-loss weights: no rows x classes held). `fit`:
    fit_inputs(probs) when the caller has them."""
    fit = fit if fit is not None else fit_inputs(probs, y, weight_metric)
    weights = [fit_weights([p[fold != k] for p in fit], y[fold != k], weight_metric, metric) for k in np.unique(fold)]
    return fold_scores(metric, probs, y, fold, weights), weights


def oof_cv(ev: EvalCfg, probs: np.ndarray, y: np.ndarray, fold: np.ndarray, per_fold: list[float] | None = None) -> dict:
    """The shared CV of OOF probabilities; fold k trained on the OOF rows of the other folds.
    `per_fold` replaces the per-fold values (the weighted ensemble's honest ones)."""
    counts = [np.bincount(y[fold != k], minlength=probs.shape[1]) for k in range(int(fold.max()) + 1)]
    m = cv(y, probs, fold, counts, ev.many_shot, ev.few_shot, ev.scorer)
    if per_fold is not None:
        m.update(cv_mean=float(np.mean(per_fold)), cv_std=float(np.std(per_fold)), per_fold=[float(v) for v in per_fold])
    return m


# ----------------------------------------------------------------------------- hill climbing
def candidates(members: list[str], experiment: str) -> list[dict]:
    """hill_climb's pool: every (member experiment, head, TTA policy) stage 4 scored on OOF. A member named
    `exp` offers every head stage 4 predicted, `exp:head` that head; each with its policy and without TTA
    (`members`: ensemble.members, empty: `experiment`)."""
    out = []
    for member in parse_members(members, experiment):
        s = load_member(member._replace(head=None, plain=False))["summary"]
        for h in ([member.head] if member.head else s["heads"]):
            # `exp:head:plain` offers that view alone; otherwise the policy, and the no-TTA view when they differ
            forms = [True] if member.plain else [False] + ([True] if s["policy"] != [BASELINE] else [])
            for plain in forms:
                m = load_member(Member(member.exp, h, plain))
                if "oof" not in m:
                    raise PipelineError("ensemble.method=hill_climb needs OOF predictions (stage 4 with infer.oof on)")
                out.append({**m, "candidate": m["name"], "oof_probs": m["oof"]["probs"],
                            "test_probs": m["test"]["probs"]})
    return out


def objective(weight_metric: str, metric: str) -> callable:
    """Lower is better: log-loss (`weight_metric` log_loss), or the metric (negated when greater is better), of N x C
    probabilities; log-loss also of fit_inputs' true-class probabilities (a vector: the streamed form)."""
    if weight_metric == "log_loss":
        return lambda y, p: _log_loss_of_true(y, p if p.ndim == 1 else p[np.arange(len(y)), y])
    sign = -1.0 if GREATER_IS_BETTER[metric] else 1.0
    return lambda y, p: sign * score(metric, y, p)


def hill_climb(probs: list[np.ndarray], y: np.ndarray, loss, steps: int) -> list[int]:
    """Caruana et al. 2004: forward selection with replacement. Start from the best single candidate, then
    add the candidate whose inclusion most lowers the loss of the running mean; stop when none lowers it.
    Returns the chosen multiset as candidate indices, in the order added. `probs`: N x C tables, or (log-loss)
    fit_inputs' true-class probabilities: the running mean of those is the mean's true-class probability."""
    values = [loss(y, p) for p in probs]
    chosen = [int(np.argmin(values))]
    mix, best = probs[chosen[0]].astype(np.float64), values[chosen[0]]
    for _ in range(steps):
        n = len(chosen)
        trials = [loss(y, (mix * n + p) / (n + 1)) for p in probs]
        j = int(np.argmin(trials))
        if not trials[j] < best - 1e-12:
            break
        chosen.append(j)
        mix, best = (mix * n + probs[j]) / (n + 1), trials[j]
    return chosen


def multiset_weights(chosen: list[int], n: int) -> np.ndarray:
    return np.bincount(chosen, minlength=n) / len(chosen)


def honest_hill_climb(e: EnsembleCfg, metric: str, probs: list, y: np.ndarray, fold: np.ndarray,
                      fit: list[np.ndarray] | None = None) -> tuple[list, list]:
    """Per fold k: the multiset climbed on the other folds' OOF rows, scored on fold k's. (per-fold metric,
    per-fold chosen multisets). `fit`: fit_inputs(probs) when the caller has them."""
    loss = objective(e.weight_metric, metric)
    fit = fit if fit is not None else fit_inputs(probs, y, e.weight_metric)
    picks = [hill_climb([p[fold != k] for p in fit], y[fold != k], loss, e.hill_climb_steps) for k in np.unique(fold)]
    return fold_scores(metric, probs, y, fold, [multiset_weights(c, len(probs)) for c in picks]), picks


def run_hill_climb(e: EnsembleCfg, ev: EvalCfg, experiment: str,
                   configured: list[dict]) -> tuple[list[dict], np.ndarray, list[dict], dict]:
    """ensemble.method=hill_climb: the candidates with a non-zero weight, their weights (counts / size of the
    multiset climbed on every OOF row), the report rows (each candidate, the plain mean of the configured
    members, the honest hill-climbing CV) and what to record. With log-loss (ensemble.weight_metric) the climb
    reads each candidate's true-class probabilities: its OOF table is streamed, never held whole (#49)."""
    pool = candidates(e.members, experiment)
    check_compatible(pool)
    y, fold = pool[0]["oof"]["y"], pool[0]["oof"]["fold"]
    probs = [c["oof_probs"] for c in pool]
    rows = [{"member": c["candidate"], **oof_cv(ev, c["oof_probs"], y, fold), "_test": c["test_probs"]} for c in pool]
    mean_probs = [m["oof"]["probs"] for m in configured]
    mean = oof_cv(ev, mix(mean_probs, "mean"), y, fold)
    rows.append({"member": "mean of the members (reference)", **mean,
                 "_test": mix([m["test"]["probs"] for m in configured], "mean")})
    fit_loss, fit = objective(e.weight_metric, ev.scorer), fit_inputs(probs, y, e.weight_metric)
    chosen = hill_climb(fit, y, fit_loss, e.hill_climb_steps)
    w = multiset_weights(chosen, len(pool))
    _, picks = honest_hill_climb(e, ev.scorer, probs, y, fold, fit)
    ens = oof_cv(ev, nested_combine(probs, fold, [multiset_weights(p, len(pool)) for p in picks]), y, fold)
    keep = [i for i in range(len(pool)) if w[i] > 0]
    rows.append({"member": "ensemble (hill_climb)", **ens, "_test": mix([pool[i]["test_probs"] for i in keep],
                                                                         "weighted", w[keep])})
    fold_weights = [{pool[i]["candidate"]: float(c) / len(p) for i, c in zip(*np.unique(p, return_counts=True))}
                    for p in picks]
    end = mix(probs, "weighted", w)  # the climbed mix as the submission combines it (clipped, renormalised)
    climb = {"chosen": [pool[i]["candidate"] for i in chosen], "start": pool[chosen[0]]["candidate"],
             "fold_weights": fold_weights,
             "candidates": [c["candidate"] for c in pool],
             "per_fold_chosen": [[pool[i]["candidate"] for i in p] for p in picks],
             "cv_gain_over_mean": float(ens["cv_mean"] - mean["cv_mean"]), "mean_cv": mean["cv_mean"],
             "fit_loss_start": fit_loss(y, fit[chosen[0]]),
             "fit_loss_end": fit_loss(y, true_class(end, y) if e.weight_metric == "log_loss" else np.asarray(end))}
    counts = {n: climb["chosen"].count(n) for n in dict.fromkeys(climb["chosen"])}
    log.info("hill climbing chose %d step(s) from %d candidates: %s; honest CV %.4f vs mean of the members %.4f "
             "(%+.4f)", len(chosen), len(pool), ", ".join(f"{n} x{c}" for n, c in counts.items()), ens["cv_mean"],
             mean["cv_mean"], climb["cv_gain_over_mean"])
    return [pool[i] for i in keep], w[keep], rows, climb


# ----------------------------------------------------------------------------- entry
def run(cfg: Config, force: bool = False) -> dict:
    name = cfg.ensemble.name or cfg.experiment
    members = [load_member(m) for m in parse_members(cfg.ensemble.members, cfg.experiment)]
    check_compatible(members)
    units = experiment_units(cfg)
    check_current(members, cfg.experiment, units, cfg.session.allow_stale)
    made_from = units.record("ensemble")
    out, csv = layout.submission_record(name), layout.submission_csv(name)
    if csv.exists() and not force and units.current("ensemble"):
        log.info("ensemble %s is up to date, skipped (--force redoes it)", name)
        return read_json(out)
    classes = members[0]["summary"]["classes"]
    test = read_test_table(cfg.data, require_images=False)
    members, weights, rows, climb, fold_weights = combine_oof(cfg.ensemble, cfg.eval, cfg.experiment, members)
    test_probs = mix([m.get("test_probs", m["test"]["probs"]) for m in members], cfg.ensemble.method, weights)
    test_probs, prior = test_prior(cfg.ensemble, cfg.seed, members, weights, test_probs, classes)
    if not np.array_equal(test["id"].astype(str).values, members[0]["test"]["ids"].astype(str)):
        raise PipelineError(f"the test ids of {test_source(cfg.data)} differ from the members' predictions (order or set): "
                            f"re-run ./run.sh infer, or check the sample submission")
    private = private_score(cfg.data, cfg.eval.scorer, members[0]["test"]["ids"], test_probs, classes)
    if prior is not None:  # the private score the submission would have had without the prior
        unadjusted = prior.pop("_unadjusted")
        prior["private_without"] = (private_score(cfg.data, cfg.eval.scorer, members[0]["test"]["ids"], unadjusted,
                                                  classes) if private is not None else None)
    table = pd.DataFrame(rows)
    row_tests = table.pop("_test").tolist() if "_test" in table else (  # each row's test probabilities
        [m["test"]["probs"] for m in members] + [test_probs])
    if private is not None and not table.empty:
        table["private"] = [private_score(cfg.data, cfg.eval.scorer, members[0]["test"]["ids"], p, classes) for p in row_tests]
    names = [m.get("candidate", m["name"]) for m in members]
    result = {"name": name, "members": names, "method": cfg.ensemble.method,
              "weights": dict(zip(names, weights.tolist())), "fold_weights": fold_weights, "metric": cfg.eval.scorer,
              "hill_climb": climb, "prior": prior,
              "table": table.to_dict(orient="records"), "private": private,
              "made_from": made_from, "env": environment()}
    sub = write_submission(cfg.data, cfg.ensemble, csv, members[0]["test"]["ids"], test_probs, classes)
    result["submission"] = str(csv)
    result["submission_sha256"] = sha256_obj(sub.astype(str).values.tolist())
    write_json(out, result)
    report(tracking.Tracking.of(cfg), cfg.ensemble.method, cfg.eval.scorer, name, table, private)
    log.info("wrote %s", result["submission"])
    return result


def combine_oof(e: EnsembleCfg, ev: EvalCfg, experiment: str,
                members: list[dict]) -> tuple[list[dict], np.ndarray, list[dict], dict | None, list | None]:
    """The members' combination chosen on OOF rows: (members, weights, a CV row per member and the ensemble,
    the hill climb's record, per-fold weights fit without that fold (weighted, hill_climb) or None)."""
    method = e.method
    rows, climb, fold_weights = [], None, None
    weights = np.full(len(members), 1.0 / len(members))
    if method == "hill_climb":
        members, weights, rows, climb = run_hill_climb(e, ev, experiment, members)
        fold_weights = climb.pop("fold_weights")
    elif "oof" in members[0]:
        y, fold = members[0]["oof"]["y"], members[0]["oof"]["fold"]
        oofs = [m["oof"]["probs"] for m in members]  # tables read a block of rows at a time
        for m, p in zip(members, oofs):
            rows.append({"member": m["name"], **oof_cv(ev, p, y, fold)})
        if method == "weighted":
            fit = fit_inputs(oofs, y, e.weight_metric)  # log-loss: each member's true-class probabilities
            weights = fit_weights(fit, y, e.weight_metric, ev.scorer)
            _, fw = honest_cv(oofs, y, fold, e.weight_metric, ev.scorer, fit)
            fold_weights = [dict(zip([m["name"] for m in members], w.tolist())) for w in fw]
            ens = oof_cv(ev, nested_combine(oofs, fold, fw), y, fold)  # every column from per-fold weights
        else:
            ens = oof_cv(ev, mix(oofs, method), y, fold)
        rows.append({"member": f"ensemble ({method})", **ens})
    elif method == "weighted":
        raise PipelineError("ensemble.method=weighted needs OOF predictions (stage 4 with infer.oof on)")
    return members, weights, rows, climb, fold_weights


def test_prior(e: EnsembleCfg, seed: int, members: list[dict], weights: np.ndarray, test_probs,
               classes: list) -> tuple[object, dict | None]:
    """With ensemble.prior (em, bbse): the test probabilities re-weighted to the class prior estimated from them,
    when the likelihood-ratio test finds a shift (core/predict/priors), and a record: the estimate, the test, and
    the honest measurement per shift (each fold's OOF rows re-sampled to other priors, calibrated without them).
    The ensemble's OOF rows are its members' mixed with the final weights (for weighted / hill_climb fit on every
    fold: the shift report's temperature is then a little optimistic; the prior itself is estimated on test rows)."""
    if e.prior == "none":
        return test_probs, None
    if "oof" not in members[0]:
        raise PipelineError(f"ensemble.prior={e.prior} needs OOF predictions (stage 4 with infer.oof on): the "
                            f"temperature, the train prior and the shift report come from them")
    y, fold = members[0]["oof"]["y"], members[0]["oof"]["fold"]
    oof = np.asarray(mix([m["oof"]["probs"] for m in members], e.method, weights), np.float64)
    t = priors.fit_temperature(oof, y) if e.prior == "em" else 1.0
    source = priors.source_prior(e.prior, oof, y, t)
    log.info("ensemble.prior=%s: estimating the test prior (temperature %.3f) and measuring it on re-sampled OOF "
             "rows", e.prior, t)
    adjusted, rec = priors.adjusted(e.prior, test_probs, source, oof, y, t)
    shifts = priors.shift_report(e.prior, oof, y, fold, seed)
    order = np.argsort(-np.abs(rec["prior"] - source))[:10]
    out = {"method": e.prior, "temperature": t, "applied": bool(rec["applied"]), "p_value": rec["p_value"],
           "l1_from_train": rec["l1_from_train"], "train_prior": source.tolist(), "estimated": rec["prior"].tolist(),
           "largest_changes": {str(classes[i]): [float(source[i]), float(rec["prior"][i])] for i in order},
           "shifts": shifts, "_unadjusted": test_probs}
    log.info("test prior (%s): %s (likelihood-ratio p = %.3g, L1 %.3f from the train prior)\n"
             "measured on each fold's OOF rows re-sampled to a shifted prior (mean over folds):\n%s", e.prior,
             "applied" if out["applied"] else "not applied: no shift beyond noise", rec["p_value"],
             rec["l1_from_train"], pd.DataFrame(shifts).to_string(index=False, float_format="%.4f"))
    return adjusted, out


def write_submission(d: DataCfg, e: EnsembleCfg, csv, ids: np.ndarray, probs: np.ndarray, classes: list) -> pd.DataFrame:
    """submissions/<name>.csv: the sample submission's ids, order and columns; without one, every image of
    test_dir, sorted (as predict writes it)."""
    if d.sample_submission:
        sub = build_submission(read_sample_submission(d), ids, probs, classes, e.submission,
                               d.label_col, str(d.path(d.sample_submission)), e.top_k)
    else:
        sub = submission_without_sample(ids, probs, classes, e.submission, d.id_col, d.label_col, e.top_k)
    write_csv(csv, sub)
    return sub


def report(tr: tracking.Tracking, method: str, metric: str, name: str, table: pd.DataFrame,
           private: float | None) -> None:
    """The CV table in the log (and the tracker), and the private score when the test labels are known."""
    if not table.empty:
        final = {"cv": float(table["cv_mean"].iloc[-1]), "cv_std": float(table["cv_std"].iloc[-1])}
        if private is not None:
            final["private"] = private
        tracking.report(tr, "ensemble", table.drop(columns="per_fold"), final)
        log.info("ensemble %s (%s), %s:\n%s", name, method, metric,
                 table.drop(columns="per_fold").to_string(index=False, float_format="%.4f"))
    if private is not None:
        log.info("private leaderboard (held-out test labels): %s %.4f", metric, private)
