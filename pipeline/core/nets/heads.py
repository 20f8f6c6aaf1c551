"""Classifier heads on frozen features (Kang et al. 2020, "Decoupling Representation and Classifier
for Long-Tailed Recognition"; Menon et al. 2021, "Long-tail learning via logit adjustment").

Every variant is the same kind of object, so stage 4 applies any of them the same way:
    logits = W @ g(x) + b,   g(x) = x, or (x - center) / |x - center| when `normalize`
  joint         the stage-2 classifier unchanged
  crt           a re-initialised linear classifier trained with class-balanced sampling
  tau           W_c / |W_c|^tau (bias dropped, as in the paper, unless keep_bias)
  lws           learnable per-class scales f_c of the joint classifier: f_c (W_c x + b_c)
  ncm           cosine similarity to L2-normalised class means of centred, normalised features
  ncm_pca       the same after PCA whitening (fit on the fold's training features only)
  knn, knn_pca  cosine k-nearest neighbours over the training features (votes exp(cos / T)), k and T tuned
  logit_adjust  joint logits - s * log(class prior)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PipelineError
from ..engine.loop import Step, run_epoch
from ..predict.metrics import GREATER_IS_BETTER, RowScores, row_scores, score_rows
from ..inputs.samplers import epoch_indices


@dataclass
class Head:
    """logits = W g(x) + b with g(x) = x, or when `normalize`: ((x - center) P) / |(x - center) P| (P: an optional
    PCA-whitening projection). A kNN head (`bank` set) scores instead by the k most similar bank features:
    logit_c = log(sum over those of class c of exp(cos / T) + eps)."""
    weight: np.ndarray  # C x D (C x d with a projection; C x 0 for kNN)
    bias: np.ndarray  # C
    center: np.ndarray | None = None  # D, used when normalize
    normalize: bool = False
    proj: np.ndarray | None = None  # D x d PCA whitening, applied after centring, before L2 normalisation
    bank: np.ndarray | None = None  # N x d normalised training features (kNN)
    bank_y: np.ndarray | None = None  # N labels of the bank
    k: int = 0
    temperature: float = 1.0

    KNN_EPS = 1e-6  # keeps a class with no neighbour finite (log-loss), far below any vote

    def embed(self, feats: np.ndarray) -> np.ndarray:
        x = feats.astype(np.float32)
        if self.normalize:
            if self.center is not None:
                x = x - self.center
            if self.proj is not None:
                x = x @ self.proj
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def logits(self, feats: np.ndarray) -> np.ndarray:
        if self.bank is not None:
            return self.torch_logits(torch.as_tensor(feats)).numpy()
        return self.embed(feats) @ self.weight.T + self.bias

    def torch_embed(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.float()
        if self.normalize:
            if self.center is not None:
                x = x - torch.as_tensor(self.center, device=x.device)
            if self.proj is not None:
                x = x @ torch.as_tensor(self.proj, device=x.device)
            x = F.normalize(x, dim=1)
        return x

    def torch_logits(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.torch_embed(feats)
        if self.bank is not None:
            return knn_logits(x, torch.as_tensor(self.bank, device=x.device),
                              torch.as_tensor(self.bank_y, device=x.device), len(self.bias), self.k,
                              self.temperature)
        return x @ torch.as_tensor(self.weight, device=x.device).T + torch.as_tensor(self.bias, device=x.device)

    def save(self, path: str | Path, record: dict) -> None:
        from safetensors.numpy import save_file

        from ..files.artifacts import atomic_path

        arrays = {"weight": np.ascontiguousarray(self.weight, np.float32),
                  "bias": np.ascontiguousarray(self.bias, np.float32)}
        for name in ("center", "proj", "bank"):
            if getattr(self, name) is not None:
                arrays[name] = np.ascontiguousarray(getattr(self, name), np.float32)
        if self.bank_y is not None:
            arrays["bank_y"] = np.ascontiguousarray(self.bank_y, np.int64)
        # one metadata key: safetensors writes several in hash order, and files must be byte-reproducible
        info = {"normalize": self.normalize, "record": record}
        if self.bank is not None:
            info.update(k=int(self.k), temperature=float(self.temperature))
        meta = {"pipeline": json.dumps(info, sort_keys=True)}
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(arrays, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> tuple["Head", dict]:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"classifier head not found: {path} (run ./run.sh rebalance)")
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        m = {}
        if "pipeline" in meta:
            m = json.loads(meta["pipeline"])
            normalize, record = m["normalize"], m["record"]
        else:  # written before the single-key format
            normalize, record = meta.get("normalize") == "True", json.loads(meta.get("record", "{}"))
        return cls(arrays["weight"], arrays["bias"], arrays.get("center"), normalize, arrays.get("proj"),
                   arrays.get("bank"), arrays.get("bank_y"), int(m.get("k", 0)), float(m.get("temperature", 1.0))), record


# ----------------------------------------------------------------------------- variants
def tau_head(w: np.ndarray, b: np.ndarray, tau: float, keep_bias: bool = False) -> Head:
    norms = np.maximum(np.linalg.norm(w, axis=1), 1e-12) ** tau
    return Head(w / norms[:, None], b / norms if keep_bias else np.zeros_like(b))


def logit_adjust_head(w: np.ndarray, b: np.ndarray, prior: np.ndarray, scale: float) -> Head:
    return Head(w.copy(), b - scale * np.log(np.maximum(prior, 1e-12)))


def pca_whitening(feats: np.ndarray, dim: int | None = None, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """(center, D x d projection) whitening the given (training) features: their covariance after the
    projection is the identity (top `dim` components; default all with non-negligible variance)."""
    x = feats.astype(np.float64)
    c = x.mean(0)
    cov = np.cov(x - c, rowvar=False)
    vals, vecs = np.linalg.eigh(np.atleast_2d(cov))
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    keep = int((vals > eps * max(vals[0], eps)).sum())
    keep = min(keep, dim) if dim else keep
    return c.astype(np.float32), (vecs[:, :keep] / np.sqrt(vals[:keep] + eps)).astype(np.float32)


# ----------------------------------------------------------------------------- features read a block at a time
# A variant's training features may be memory maps of stage 3's cache (float16 or float32 on disk, #49): the fits
# below read them a block of rows at a time, upcast to float32, and give the values an in-memory float32 array gives.
def _block(d: int) -> int:
    return max(1, (1 << 22) // max(d, 1))  # rows of a 16 MB float32 block


def mean_rows(x: np.ndarray) -> np.ndarray:
    """The float32 mean of x's rows, read a block at a time: bit-equal to np.asarray(x, np.float32).mean(0) (numpy
    sums a C-ordered float32 table's rows one after another; the running sum is carried from block to block)."""
    acc = None
    for a in range(0, len(x), _block(x.shape[1])):
        b = np.asarray(x[a:a + _block(x.shape[1])], np.float32)
        acc = np.add.reduce(b if acc is None else np.concatenate([acc[None], b]), axis=0)
    return acc / len(x)


class StackedRows:
    """Several N_i x D tables (arrays or memory maps: a model's training features and their augmented views) as one
    of sum(N_i) rows, gathered in float32 a batch of rows at a time (no concatenated copy)."""

    def __init__(self, parts: list):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        out = np.empty((len(idx), self.parts[0].shape[1]), np.float32)
        part = np.searchsorted(self.starts, idx, side="right") - 1
        for j in np.unique(part):
            sel = part == j
            out[sel] = self.parts[j][idx[sel] - self.starts[j]]
        return out


def _space(feats: np.ndarray, center: bool, whiten: bool, pca_dim: int | None) -> Head:
    """A Head holding the feature normalisation (centring, PCA whitening, L2) fit on training features."""
    if whiten:
        c, proj = pca_whitening(feats, pca_dim)
    else:
        c, proj = (mean_rows(feats) if center else np.zeros(feats.shape[1])).astype(np.float32), None
    return Head(np.zeros((0, 0), np.float32), np.zeros(0, np.float32), c, True, proj)


def ncm_head(feats: np.ndarray, y: np.ndarray, n_classes: int, center: bool = True, scale: float = 1.0,
             whiten: bool = False, pca_dim: int | None = None) -> Head:
    """Nearest class mean (cosine) in the normalised feature space (`whiten`: PCA-whitened first). Each class's
    rows are embedded and summed a block at a time in row order (np.add.at: the sums a class's rows in one table
    would give; whitened: one block, the matrix product's rounding depends on its shape)."""
    space = _space(feats, center, whiten, pca_dim)
    d = space.proj.shape[1] if space.proj is not None else feats.shape[1]
    step = max(len(feats), 1) if whiten else _block(feats.shape[1])  # whitening holds every row anyway (its fit)
    sums = np.zeros((n_classes, d), np.float32)
    for a in range(0, len(feats), step):
        np.add.at(sums, y[a:a + step], space.embed(feats[a:a + step]))
    counts = np.bincount(y, minlength=n_classes)
    means = np.zeros((n_classes, d), np.float32)
    for k in np.flatnonzero(counts):
        m = (sums[k] / counts[k]).astype(np.float32)  # np.mean's float32 result
        means[k] = m / max(np.linalg.norm(m), 1e-12)
    return Head(scale * means, np.zeros(n_classes, np.float32), space.center, True, space.proj)


def knn_head(feats: np.ndarray, y: np.ndarray, n_classes: int, k: int, temperature: float, center: bool = True,
             whiten: bool = False, pca_dim: int | None = None) -> Head:
    """Cosine k-nearest neighbours over the training features (the bank), votes exp(cos / T)."""
    space = _space(feats, center, whiten, pca_dim)
    return Head(np.zeros((n_classes, 0), np.float32), np.zeros(n_classes, np.float32), space.center, True,
                space.proj, space.embed(feats), y.astype(np.int64), int(k), float(temperature))


def knn_logits(x: torch.Tensor, bank: torch.Tensor, bank_y: torch.Tensor, n_classes: int, k: int,
               temperature: float) -> torch.Tensor:
    """log of the exp(cos / T) votes of the k most similar bank rows per class (x and bank L2-normalised)."""
    sims = x @ bank.T
    top, idx = sims.topk(min(k, bank.shape[0]), dim=1)
    votes = torch.zeros(x.shape[0], n_classes, device=x.device, dtype=x.dtype)
    votes.scatter_add_(1, bank_y[idx], torch.exp((top - 1.0) / temperature))  # -1: no overflow at small T
    return torch.log(votes + Head.KNN_EPS)


def knn_candidates(feats_tr: np.ndarray, y_tr: np.ndarray, feats_va: np.ndarray, n_classes: int, ks: list[int],
                   temps: list[float], center: bool, whiten: bool, pca_dim: int | None) -> tuple[dict, dict]:
    """({(k, T): head}, {(k, T): a function computing its held-out logits}) for every grid point; the held-out
    rows' max(k) nearest bank rows are found once (in blocks of rows), each candidate's votes when asked."""
    base = knn_head(feats_tr, y_tr, n_classes, max(ks), temps[0], center, whiten, pca_dim)
    x = base.torch_embed(torch.as_tensor(feats_va))  # as Head.torch_logits does: the same numbers
    bank, bank_y = torch.as_tensor(base.bank), torch.as_tensor(base.bank_y)
    kmax = min(max(ks), bank.shape[0])
    parts = [(x[a:a + 2048] @ bank.T).topk(kmax, dim=1) for a in range(0, len(x), 2048)]
    top = torch.cat([t for t, _ in parts]) if parts else torch.zeros(0, kmax)
    idx = torch.cat([i for _, i in parts]) if parts else torch.zeros(0, kmax, dtype=torch.int64)

    def votes(k: int, t: float) -> np.ndarray:
        k = min(k, kmax)
        v = torch.zeros(x.shape[0], n_classes, dtype=x.dtype)
        v.scatter_add_(1, bank_y[idx[:, :k]], torch.exp((top[:, :k] - 1.0) / t))
        return torch.log(v + Head.KNN_EPS).numpy()

    heads, logits = {}, {}
    for k in ks:
        for t in temps:
            key = (int(k), float(t))
            heads[key] = Head(base.weight, base.bias, base.center, True, base.proj, base.bank, base.bank_y, *key)
            logits[key] = lambda key=key: votes(*key)
    return heads, logits


def _balanced_batches(y: np.ndarray, n_classes: int, seed: int, epoch: int, batch: int):
    idx = epoch_indices("class_balanced", y, n_classes, seed, epoch, 1)
    return [idx[i:i + batch] for i in range(0, len(idx), batch)]


def train_linear(feats: np.ndarray, y: np.ndarray, n_classes: int, epochs: int, lr: float, weight_decay: float,
                 seed: int, checkpoints: list[int], batch: int = 256, init: tuple | None = None,
                 scales_only: bool = False) -> dict[int, Head]:
    """cRT (a new linear layer) or LWS (per-class scales of `init`), trained with class-balanced
    sampling, SGD with momentum and a cosine schedule. Returns the head at each checkpoint epoch. `feats`: an
    N x D table or StackedRows (each batch's rows are gathered in float32 as it comes)."""
    torch.manual_seed(seed)
    rows = feats if isinstance(feats, StackedRows) else StackedRows([feats])
    y_all = torch.as_tensor(y)
    d = rows.parts[0].shape[1]
    if scales_only:
        w0, b0 = (torch.tensor(np.asarray(a), dtype=torch.float32) for a in init)  # a copy: init may be a read-only map
        f = torch.ones(n_classes, requires_grad=True)
        params = [f]
        forward = lambda x: f * (x @ w0.T + b0)  # noqa: E731
    else:
        lin = torch.nn.Linear(d, n_classes)
        params = list(lin.parameters())
        forward = lin
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0 if scales_only else weight_decay)
    steps = epochs * max(1, -(-len(y) // batch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    step = Step(None, opt, torch.device("cpu"), on_update=lambda n: sched.step())  # stage 2's step, fp32 on CPU

    def loss(idx):
        return F.cross_entropy(forward(torch.from_numpy(rows.take(idx))), y_all[idx]), len(idx)

    out = {}
    for epoch in range(1, epochs + 1):
        run_epoch(step, _balanced_batches(y, n_classes, seed, epoch, batch), loss, sync_every=None)
        if epoch in checkpoints:
            with torch.no_grad():
                if scales_only:
                    out[epoch] = Head((f[:, None] * w0).numpy().copy(), (f * b0).numpy().copy())
                else:
                    out[epoch] = Head(lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy())
    return out


def probe_head(feats: np.ndarray, y: np.ndarray, n_classes: int, c: float = 1.0, max_iter: int = 1000) -> Head:
    """A linear probe: multinomial logistic regression (scikit-learn, L-BFGS, L2 with inverse strength `c`) on frozen
    features, LP-FT's first step (Kumar et al. 2022). A class without a training row gets zero weights and a bias
    below every other (its probability stays small, as a fresh head's would be)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    present = np.unique(y)
    w = np.zeros((n_classes, feats.shape[1]), np.float32)
    b = np.zeros(n_classes, np.float32)
    if len(present) == 1:  # one class: its logit first, the others far below
        b[:] = -10.0
        b[present[0]] = 0.0
        return Head(w, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter bounds the time; the fit is a start point
        lr = LogisticRegression(C=c, max_iter=max_iter).fit(np.asarray(feats, np.float64), y)
    coef, icpt = lr.coef_, lr.intercept_
    if len(present) == 2:  # scikit-learn's binary form: one row for the second class
        coef, icpt = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])
    w[lr.classes_] = coef
    b[lr.classes_] = icpt
    missing = np.setdiff1d(np.arange(n_classes), lr.classes_)
    b[missing] = b[lr.classes_].min() - 10.0
    return Head(w, b)


def checkpoint_epochs(epochs: int, n: int = 4) -> list[int]:
    return sorted({max(1, round(epochs * (i + 1) / n)) for i in range(n)})


# ----------------------------------------------------------------------------- honest tuning
def cross_fit(candidates: dict, y: np.ndarray, inner: np.ndarray, metric: str) -> tuple[RowScores, object, list, dict]:
    """Choose a hyper-parameter without scoring on the rows that chose it.

    candidates: {param: logits of the held-out rows (an array, or a table computed a block of rows at a time such
    as stored.HeadRows), or a function giving them}. `inner` gives each held-out row an inner fold. Each inner
    fold's rows are scored with the param chosen on the other inner folds (cross-fitting), so the assembled
    per-row scores (metrics.RowScores, float64 softmax) are an honest out-of-fold estimate. Also returns the
    param chosen on all held-out rows (what the saved head uses), the per-inner-fold choices, and the curve of
    `metric` on all rows against param. Each candidate is reduced to per-row scores as it comes: memory holds one
    block of one candidate's rows x classes at a time (a table) or one candidate's (an array).
    """
    params = list(candidates)

    def logits(p):
        c = candidates[p]
        return c() if callable(c) else c

    rows = {p: row_scores(y, logits=logits(p), dtype=np.float64) for p in params}
    pick = (lambda vals: int(np.argmax(vals))) if GREATER_IS_BETTER[metric] else (lambda vals: int(np.argmin(vals)))
    splits = np.unique(inner)
    per_split = []
    for j in splits:
        tune = inner != j
        per_split.append(params[pick([score_rows(metric, y[tune], rows[p].take(tune)) for p in params])])
    curve = {p: score_rows(metric, y, rows[p]) for p in params}
    final = params[pick([curve[p] for p in params])]
    which = np.empty(len(y), np.int64)
    for j, chosen in zip(splits, per_split):
        which[inner == j] = params.index(chosen)
    return RowScores.pick([rows[p] for p in params], which), final, per_split, curve


# ----------------------------------------------------------------------------- the variants
NCM_SCALES = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0]  # cosine -> logit temperature (chosen by log-loss)


@dataclass
class FitInputs:
    """What a variant's heads are fit from: stage 3's feature cache of one model's training rows."""
    w: np.ndarray  # the joint (stage-2) classifier
    b: np.ndarray
    train: np.ndarray  # training features
    train_y: np.ndarray
    views: list  # extra augmented views of the training features (cRT / LWS)
    n_classes: int
    seed: int
    valid: np.ndarray | None = None  # held-out features, when tuning (kNN scores its candidates on them at once)

    @property
    def prior(self) -> np.ndarray:
        counts = np.bincount(self.train_y, minlength=self.n_classes)
        return counts / counts.sum()


def _joint(r, f: FitInputs, values=None):
    return {None: Head(f.w, f.b)}, None


def _tau(r, f: FitInputs, values=None):
    grid = values or ([r.tau] if r.tau is not None else r.tau_grid)
    return {t: tau_head(f.w, f.b, t) for t in grid}, None


def _logit_adjust(r, f: FitInputs, values=None):
    return {s: logit_adjust_head(f.w, f.b, f.prior, s) for s in values or r.la_grid}, None


def _ncm(whiten: bool):
    def fit(r, f: FitInputs, values=None):
        base = ncm_head(f.train, f.train_y, f.n_classes, center=r.ncm_center, whiten=whiten, pca_dim=r.pca_dim)
        return {s: Head(base.weight * s, base.bias, base.center, True, base.proj) for s in values or NCM_SCALES}, None
    return fit


def _knn(whiten: bool):
    def fit(r, f: FitInputs, values=None):
        if values is not None:
            return {tuple(v): knn_head(f.train, f.train_y, f.n_classes, *v, center=r.ncm_center, whiten=whiten,
                                       pca_dim=r.pca_dim) for v in values}, None
        # every (k, T) at once: the similarities to the held-out rows are computed once
        return knn_candidates(f.train, f.train_y, f.valid, f.n_classes, r.knn_k_grid, r.knn_t_grid, r.ncm_center,
                              whiten, r.pca_dim)
    return fit


def _linear(scales_only: bool):
    def fit(r, f: FitInputs, values=None):
        x = StackedRows([f.train, *f.views])  # the views' rows after the train rows, as one table
        y = np.concatenate([f.train_y] * (1 + len(f.views)))
        epochs, lr = (r.lws_epochs, r.lws_lr) if scales_only else (r.crt_epochs, r.crt_lr)
        return train_linear(x, y, f.n_classes, epochs, lr, r.crt_weight_decay, f.seed,
                            values or checkpoint_epochs(epochs), init=(f.w, f.b), scales_only=scales_only), None
    return fit


@dataclass(frozen=True)
class Variant:
    """A stage-3 head: `fit(rebalance section, FitInputs, values)` -> ({value: head}, held-out logits of each or
    None); values None: every candidate of the configured grid, else those values only. `tuned`: the name of
    the value stage 3 chooses (None: nothing to choose); `rule`: what chooses it ("metric": the competition
    metric; "log_loss": a calibration choice); `fixed(r)`: a value the config fixes (no tuning) or None;
    `record(rec)`: the choice's record made JSON-ready (tuple values)."""
    fit: Callable
    tuned: str | None
    rule: str = "metric"
    help: str = ""
    fixed: Callable | None = None
    record: Callable | None = None


def _knn_record(rec: dict) -> None:
    """(k, T) tuples -> JSON lists, and readable curve keys."""
    rec["k_t"] = list(rec["k_t"])
    rec["chosen_per_inner_fold"] = [list(c) for c in rec.get("chosen_per_inner_fold", [])]
    rec["curve"] = {f"k={a},T={b:g}": c for (a, b), c in rec.get("curve", {}).items()}


VARIANTS: dict[str, Variant] = {
    "joint": Variant(_joint, None, help="the stage-2 classifier as trained (the baseline)"),
    "crt": Variant(_linear(False), "epochs", help="classifier re-trained class-balanced (Kang et al. 2020)"),
    "tau": Variant(_tau, "tau", help="classifier weights divided by their norm^tau", fixed=lambda r: r.tau),
    "lws": Variant(_linear(True), "epochs", help="learnable per-class weight scaling"),
    "ncm": Variant(_ncm(False), "scale", "log_loss", help="nearest class mean (cosine)"),
    "logit_adjust": Variant(_logit_adjust, "scale", help="logits minus scale x log prior (Menon et al. 2021)"),
    "ncm_pca": Variant(_ncm(True), "scale", "log_loss", help="NCM on PCA-whitened features"),
    "knn": Variant(_knn(False), "k_t", help="k nearest neighbours, cosine votes exp(cos / T)", record=_knn_record),
    "knn_pca": Variant(_knn(True), "k_t", help="kNN on PCA-whitened features", record=_knn_record),
}
TUNED = {v: spec.tuned for v, spec in VARIANTS.items() if spec.tuned}  # variant: the value stage 3 tunes


def low_median(values: list):
    """The lower middle value (always one of the values: a checkpoint epoch, a grid point)."""
    v = sorted(values)
    return v[(len(v) - 1) // 2]


def median_choices(variants: list[str], summaries: list[dict]) -> dict:
    """{variant: the (low) median of the values the given folds' stage 3 chose}: for a model with no held-out
    rows of its own (the full-data fit), or a fold's head that must not depend on that fold (a teacher's)."""
    return {v: low_median([s["variants"][v][TUNED[v]] for s in summaries]) for v in variants if v in TUNED}


def heads_with_choices(r, feats: dict, n_classes: int, chosen: dict, seed: int) -> dict[str, Head]:
    """Every variant of `r` (the rebalance config section) fit on the training features `feats` (stage 3's
    cache: train, train_y, views, joint_weight, joint_bias) with a given value per tuned variant."""
    f = FitInputs(w=feats["joint_weight"], b=feats["joint_bias"], train=feats["train"], train_y=feats["train_y"],
                  views=list(feats["views"]), n_classes=n_classes, seed=seed)
    out = {}
    for v in r.variants:
        spec = VARIANTS[v]
        heads, _ = spec.fit(r, f, None if spec.tuned is None else [chosen[v]])
        out[v] = next(iter(heads.values()))
    return out
