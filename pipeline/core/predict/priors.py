"""Test-time class priors: the train set is often long-tailed and the test set is not, and its prior is unknown.
Estimated from the test predictions themselves and used to re-weight them (p(y|x) * q(y) / p(y), renormalised):

- `em`: Saerens, Latinne & Decaestecker 2002 (the EM of "Adjusting the outputs of a classifier to new a priori
  probabilities"), on probabilities calibrated by one temperature first (Alexandari et al. 2020: EM needs
  calibrated posteriors; Sulc & Matas 2019 used it for +3.4 points on PlantCLEF 2017);
- `bbse`: black-box shift estimation (Lipton et al. 2018), its soft form: the confusion matrix of the OOF
  probabilities against the labels, solved for the weights that explain the mean test prediction.

Honest by construction when measured with `shift_report`: fold k's held-out rows share the train prior, so they
are re-sampled to other priors (uniform, reversed, a Dirichlet draw), and the temperature and BBSE's confusion
matrix come from the other folds' rows only (no label of fold k is read).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import chi2

from ..errors import PipelineError
from .metrics import block_rows

METHODS = ("none", "em", "bbse")
SHIFTS = ("none", "uniform", "reversed", "dirichlet")
BBSE_MAX_CLASSES = 4000  # its C x C confusion matrix is solved densely (4,000 classes: 128 MB, seconds)
FLOOR = 1e-12
EM_PSEUDO_ROWS = 1.0  # per class: the weight of the train prior in the estimates (EM's MAP prior, BBSE's blend)
SIGNIFICANCE = 0.01  # the likelihood-ratio test's level below which an estimated prior is applied


def _blocks(table):
    """(start, rows) blocks of an N x C table (an array, or a table sliced by rows such as a Mix or a ProbTable)."""
    step = block_rows(table.shape[1])
    for a in range(0, len(table), step):
        yield a, np.asarray(table[a:a + step], np.float64)


def tempered(p: np.ndarray, t: float) -> np.ndarray:
    """softmax(log p / t): probabilities at temperature t (t > 1 softens)."""
    logp = np.log(np.clip(p, FLOOR, 1.0)) / t
    logp -= logp.max(1, keepdims=True)
    q = np.exp(logp)
    return q / q.sum(1, keepdims=True)


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the log-loss of `probs` on labels `y` (0.05 to 20, on a log scale)."""
    logp = np.log(np.clip(probs, FLOOR, 1.0))
    rows = np.arange(len(y))

    def loss(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z -= z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[rows, y]))

    return float(np.exp(minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def class_prior(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Class frequencies of labels y; a class without rows gets a floor, so re-weighting never divides by 0."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    if counts.sum() == 0:
        raise PipelineError("no labelled rows to take the train prior from")
    p = np.maximum(counts / counts.sum(), FLOOR)
    return p / p.sum()


def source_prior(method: str, oof_probs, oof_y: np.ndarray, t: float = 1.0) -> np.ndarray:
    """The prior the probabilities were made under. EM: the mean of the (calibrated) OOF probabilities, the prior
    the model itself predicts on train rows (the label frequencies differ from it by the model's own bias, and EM
    would read that bias as a shift: on no-shift rows it then moved 0.2-0.4 in L1 and cost accuracy); BBSE: the
    label frequencies (its weights are ratios of label shares)."""
    if method != "em":
        return class_prior(oof_y, oof_probs.shape[1])
    total = np.zeros(oof_probs.shape[1])
    for _, p in _blocks(oof_probs):
        total += (tempered(p, t) if t != 1.0 else p).sum(0)
    q = np.maximum(total / len(oof_probs), FLOOR)
    return q / q.sum()


def reweight(probs: np.ndarray, train_prior: np.ndarray, test_prior: np.ndarray) -> np.ndarray:
    """p(y|x) under the test prior: p(y|x) q(y) / p(y), renormalised per row."""
    q = probs * (test_prior / train_prior)
    return q / np.maximum(q.sum(1, keepdims=True), FLOOR)


def em_prior(probs, train_prior: np.ndarray, t: float = 1.0, tol: float = 1e-6,
             max_iter: int = 100) -> tuple[np.ndarray, int]:
    """Saerens et al.'s EM: the test prior q that makes the mean re-weighted posterior equal q, as a MAP estimate
    with EM_PSEUDO_ROWS x C rows spread as the train prior (without it a class the test rows barely show is driven
    to ~0, and a test row of that class gets a log-loss of tens: grocery81 with a long-tailed train set, 81 classes,
    log-loss -3 to -9 after the adjustment). `probs` is read a block of rows at a time (any table sliced by rows).
    Returns (q, iterations)."""
    q = train_prior.copy()
    pseudo = EM_PSEUDO_ROWS * len(q)
    for it in range(1, max_iter + 1):
        total = pseudo * train_prior
        for _, p in _blocks(probs):
            total = total + reweight(tempered(p, t) if t != 1.0 else p, train_prior, q).sum(0)
        new = np.maximum(total / (len(probs) + pseudo), FLOOR)
        new /= new.sum()
        done = np.abs(new - q).sum() < tol
        q = new
        if done:
            break
    return q, it


def bbse_prior(oof_probs: np.ndarray, oof_y: np.ndarray, test_probs, train_prior: np.ndarray) -> np.ndarray:
    """Soft black-box shift estimation: C[i, j] = mean over the source rows of p_i(x) [y = j]; the weights w with
    C w = the mean test prediction (least squares, clipped at 0) give the test prior w * p(y), renormalised."""
    n = oof_probs.shape[1]
    if n > BBSE_MAX_CLASSES:
        raise PipelineError(f"ensemble.prior=bbse solves a {n} x {n} confusion matrix (more than "
                            f"{BBSE_MAX_CLASSES} classes); use ensemble.prior=em")
    onehot = np.zeros((len(oof_y), n))
    onehot[np.arange(len(oof_y)), oof_y] = 1.0
    conf = oof_probs.T @ onehot / len(oof_y)
    mu = np.zeros(n)
    for _, p in _blocks(test_probs):
        mu += p.sum(0)
    mu /= len(test_probs)
    w = np.clip(np.linalg.lstsq(conf, mu, rcond=None)[0], 0.0, None)
    q = np.maximum(w * train_prior, FLOOR)
    q /= q.sum()
    pseudo = EM_PSEUDO_ROWS * n  # the same pull towards the train prior as EM's (clipped weights give classes 0)
    return (len(test_probs) * q + pseudo * train_prior) / (len(test_probs) + pseudo)


def estimate(method: str, test_probs, train_prior: np.ndarray, oof_probs: np.ndarray | None = None,
             oof_y: np.ndarray | None = None, t: float = 1.0) -> np.ndarray:
    """The test prior by `method` (em: on probabilities at temperature t; bbse: from the OOF confusion matrix)."""
    if method == "em":
        return em_prior(test_probs, train_prior, t)[0]
    if method == "bbse":
        return bbse_prior(oof_probs, oof_y, test_probs, train_prior)
    raise PipelineError(f"unknown prior method '{method}' (one of {list(METHODS)})")


def log_likelihood_ratio(test_probs, train_prior: np.ndarray, q: np.ndarray, t: float = 1.0) -> float:
    """2 (log L(q) - log L(train prior)) of the test rows, L(q) = prod_i sum_c p_c(x_i) q_c / p_c: under no shift
    about chi-square with C - 1 degrees of freedom (q the maximum-likelihood prior, as EM's is; BBSE's is not, which
    only makes the test stricter)."""
    ratio = q / train_prior
    total = 0.0
    for _, p in _blocks(test_probs):
        total += float(np.log(np.maximum((tempered(p, t) if t != 1.0 else p) @ ratio, FLOOR)).sum())
    return 2.0 * total


def adjusted(method: str, test_probs, train_prior: np.ndarray, oof_probs: np.ndarray, oof_y: np.ndarray,
             t: float) -> tuple[np.ndarray, dict]:
    """(the test probabilities re-weighted to the estimated prior, a record: the prior, its L1 distance from the
    train prior, the likelihood-ratio test's p-value and whether it was applied). EM's posteriors are its
    calibrated ones (temperature t); BBSE re-weights the probabilities as they are. A shift the test rows do not
    support (p-value above SIGNIFICANCE) is not applied: the prior of a test set that looks like the train set is
    noise, and re-weighting by it costs accuracy (the no-shift rows of `shift_report`)."""
    q = estimate(method, test_probs, train_prior, oof_probs, oof_y, t)
    lr = log_likelihood_ratio(test_probs, train_prior, q, t if method == "em" else 1.0)
    p_value = float(chi2.sf(max(lr, 0.0), len(q) - 1))
    record = {"prior": q, "l1_from_train": float(np.abs(q - train_prior).sum()), "p_value": p_value,
              "applied": p_value < SIGNIFICANCE}
    if not record["applied"]:
        return np.asarray(test_probs, np.float64), record
    out = np.empty(test_probs.shape)
    for a, p in _blocks(test_probs):
        out[a:a + len(p)] = reweight(tempered(p, t) if method == "em" and t != 1.0 else p, train_prior, q)
    return out, record


# ----------------------------------------------------------------------------- honest measurement
def shifted_prior(shift: str, prior: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A target prior: the source's ("none"), uniform, reversed (the largest class gets the smallest share) or a
    Dirichlet(1) draw."""
    if shift == "none":
        return prior
    if shift == "uniform":
        return np.full(len(prior), 1.0 / len(prior))
    if shift == "reversed":
        order = np.argsort(-prior, kind="stable")
        out = np.empty_like(prior)
        out[order] = prior[order[::-1]]
        return out
    if shift == "dirichlet":
        return rng.dirichlet(np.ones(len(prior)))
    raise ValueError(f"unknown shift '{shift}' (one of {list(SHIFTS)})")


def resample(y: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices of y (drawn with replacement within each class) whose class shares follow `target`, as many rows
    as y has; classes absent from y are left out (the shares of the others renormalised)."""
    present = np.bincount(y, minlength=len(target)) > 0
    share = np.where(present, target, 0.0)
    counts = rng.multinomial(len(y), share / share.sum())
    by_class = {c: np.flatnonzero(y == c) for c in np.flatnonzero(counts)}
    return np.concatenate([rng.choice(by_class[c], counts[c], replace=True) for c in by_class])


def _scores(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    return float(np.mean(p.argmax(1) == y)), float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1))))


def shift_report(method: str, probs: np.ndarray, y: np.ndarray, fold: np.ndarray, seed: int = 0,
                 shifts: tuple[str, ...] = SHIFTS) -> list[dict]:
    """Per shift, the mean over folds of accuracy and log-loss before and after the prior adjustment: fold k's
    held-out rows split in two halves, the second re-sampled to the shifted prior; the temperature and BBSE's
    confusion matrix from the other folds' rows only, the source prior without labels (EM: model k's mean prediction
    on the first half; BBSE: the other folds' label shares). `probs` are OOF probabilities (each row from the model
    that did not train on it)."""
    n = probs.shape[1]
    rng = np.random.default_rng(seed)
    per_shift = {s: [] for s in shifts}
    for k in np.unique(fold):
        out, held = fold != k, fold == k
        t = fit_temperature(probs[out], y[out]) if method == "em" else 1.0
        # fold k's rows in two halves: EM's source prior is model k's own mean calibrated prediction on the first
        # (no labels: the prior that model predicts on rows drawn like its training rows; the other folds' rows
        # come from other models, each with its own bias, which EM read as a shift on rows with none: applied on
        # every fold, -0.3 to -11 points); the test rows are drawn from the second. BBSE: the other folds' labels.
        own = rng.permutation(np.flatnonzero(held))
        first, second = own[: len(own) // 2], own[len(own) // 2:]
        prior = (source_prior(method, probs[first], y[first], t) if method == "em"
                 else source_prior(method, probs[out], y[out], t))
        for s in shifts:
            rows = second
            if s != "none":  # no shift: the half as it is (a re-sample's repeated rows are not new evidence)
                rows = second[resample(y[second], shifted_prior(s, class_prior(y[out], n), rng), rng)]
            p, yk = probs[rows], y[rows]
            after, rec = adjusted(method, p, prior, probs[out], y[out], t)
            true = np.bincount(yk, minlength=n) / len(yk)
            per_shift[s].append((*_scores(p, yk), *_scores(after, yk), np.abs(rec["prior"] - true).sum(),
                                 np.abs(prior - true).sum(), rec["applied"]))
    rows = []
    for s, vals in per_shift.items():
        a = np.mean(vals, axis=0)
        rows.append({"shift": s, "accuracy": a[0], "accuracy_adjusted": a[2], "accuracy_gain": a[2] - a[0],
                     "log_loss": a[1], "log_loss_adjusted": a[3], "log_loss_gain": a[1] - a[3],
                     "prior_l1_estimated": a[4], "prior_l1_train": a[5], "applied_share": a[6]})
    return [{k: float(v) if k != "shift" else v for k, v in r.items()} for r in rows]
