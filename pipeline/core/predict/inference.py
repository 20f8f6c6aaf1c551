"""Applying a trained member to images: TTA views at each scale, every head, fold means, the policy.

Stage 4 (with the training folders at hand) and `./run.sh predict` (with an exported bundle only)
both predict through these functions, so a bundle reproduces stage 4's test probabilities exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..nets import models
from ..inputs.augment import load_transform
from ..config import InferCfg, TrainCfg
from ..errors import PipelineError
from ..nets.heads import Head
from ..inputs.images import ImageDataset
from .metrics import RowScores, block_rows, row_scores
from ..engine.runtime import autocast, make_loader, memory_format, workers
from .tta import VIEWS, combine_views, merge, per_view, sizes, view_name
from ..inputs.pixels import Pixels


FIXRES = "fixres:"  # names a view of the FixRes-tuned model (infer.fixres): `fixres:orig@1.15`


def view_label(view: str, scale: float, fixres: bool = False) -> str:
    """How a view is named in stage 4's files, reports and bundles: `hflip@1.15`, `fixres:orig@1.15`."""
    return (FIXRES if fixres else "") + view_name(view, scale)


def tta_names(infer: InferCfg) -> list[str]:
    """Every view to predict: the configured views at each scale (always with the no-TTA baseline), then with
    infer.fixres the configured views at its size with the FixRes-tuned models."""
    pairs = [(s, v) for s in infer.scales for v in infer.views]
    pairs = pairs if (1.0, "orig") in pairs else [(1.0, "orig")] + pairs
    names = [view_label(v, s) for s, v in pairs]
    if infer.fixres.size is not None:
        names += [view_label(v, infer.fixres.size, fixres=True) for v in infer.views]
    return names


def default_policy(infer: InferCfg, names: list[str]) -> list[str]:
    """The configured views at the configured scales, and every FixRes view (the baseline is there for the report
    only, unless configured)."""
    def wanted(view, scale, fixres):
        return fixres or (scale in infer.scales and view in infer.views)
    return [n for n in names if wanted(*parse_view(n))]


def parse_view(name: str) -> tuple[str, float, bool]:
    """`hflip@1.15` -> ("hflip", 1.15, False); `fixres:orig@1.15` -> ("orig", 1.15, True): the inverse of
    view_label."""
    fixres = name.startswith(FIXRES)
    view, _, scale = name.removeprefix(FIXRES).partition("@")
    try:
        s = float(scale)
    except ValueError:
        s = None
    if view not in VIEWS or s is None:
        raise PipelineError(f"TTA view '{name}' is not [fixres:]view@scale with a view of {sorted(VIEWS)}")
    return view, s, fixres


def policy_logits(forward, x: torch.Tensor, views: list[str], crop: int) -> list[torch.Tensor]:
    """Logits of each named view of a batch (several crops of one view are averaged)."""
    out = []
    for v in views:
        parts = [forward(c) for c in VIEWS[v](x, crop)]
        out.append(torch.stack(parts).mean(0) if len(parts) > 1 else parts[0])
    return out


@torch.no_grad()
def view_features(model, x: torch.Tensor, views: list[str], crop: int, dtype, fmt=torch.contiguous_format):
    """Pooled features of each view of a normalised batch (the backbone under autocast)."""
    def forward(c):
        c = c.contiguous(memory_format=fmt)
        with autocast(c.device, dtype):
            return models.features(model, c).float()
    return policy_logits(forward, x, views, crop)


def joint_head(model) -> Head:
    """The model's own classifier as a Head."""
    clf = model.get_classifier()
    return Head(clf.weight.detach().cpu().numpy(), clf.bias.detach().cpu().numpy())


@dataclass(frozen=True)
class Loading:
    """How an image set goes through a model: its pixels, the loader's batch size and workers, the memory format."""
    px: Pixels
    batch_size: int
    workers: int
    fmt: torch.memory_format = torch.contiguous_format

    @classmethod
    def of(cls, px: Pixels, infer: InferCfg, train: TrainCfg, device) -> "Loading":
        """Stage 4's loading (infer.batch_size, train.workers, train.channels_last on `device`)."""
        return cls(px, infer.batch_size, workers(train), memory_format(train, device))


def feature_batches(load: Loading, model, norm, store, scale: float, views: list[str], device, dtype,
                    on_batch: Callable[[int], None] | None = None, sink=None) -> list[list]:
    """Per loader batch, the pooled features of every view of one scale (V tensors of b x D, on the device): a
    head's logits are computed from them when asked (`PolicyFeatures`), so the backbone runs once however many
    heads there are, and memory holds features (rows x D), not every head's rows x classes. With `sink`, each
    batch goes to sink(first row, tensors) instead and nothing is kept (stage 4 streams them to disk)."""
    _, crop = sizes(load.px.aug.img_size, load.px.crop_pct, scale)
    loader = make_loader(ImageDataset(store, None, load_transform(load.px, crop)), batch_size=load.batch_size,
                         n_workers=load.workers, cuda=device.type == "cuda")
    out, start = [], 0
    for x, _ in loader:
        feats = view_features(model, norm(x.to(device, non_blocking=True)), views, crop, dtype, load.fmt)
        if sink is None:
            out.append(feats)
        else:
            sink(start, feats)
        start += len(x)
        if on_batch is not None:
            on_batch(len(x))
    return out


class PolicyFeatures:
    """The features of the named views of one model (plain or FixRes-tuned) over one image set, one loader per
    scale; `logits(heads)` gives what `predict_policy` gives, for any heads, without running the model again."""

    def __init__(self, load: Loading, model, norm, store, views: list[str], device, dtype,
                 on_batch: Callable[[int], None] | None = None, sink=None):
        """`sink(positions, first row, tensors)`: each batch's features of the views at those positions are handed
        over as they come, none kept (then only the sink has them)."""
        pairs = [(s, v) for v, s, _ in map(parse_view, views)]
        self.n_views, self.n = len(views), len(store)
        self.groups = [(at, feature_batches(load, model, norm, store, scale, vs, device, dtype,
                                            on_batch=None if on_batch is None else (lambda n, k=len(vs): on_batch(n * k)),
                                            sink=None if sink is None else (lambda a, f, at=at: sink(at, a, f))))
                       for scale, at, vs in by_scale(pairs)]

    def array(self) -> np.ndarray:
        """V x N x D float32: every view's pooled features in the order of the names given (on the CPU)."""
        dim = self.groups[0][1][0][0].shape[1] if self.groups and self.groups[0][1] else 0
        out = np.zeros((self.n_views, self.n, dim), np.float32)
        for at, batches in self.groups:
            start = 0
            for feats in batches:
                for v, f in zip(at, feats):
                    out[v, start:start + len(f)] = f.cpu().numpy()
                start += len(feats[0])
        return out

    def logits(self, heads: dict[str, Head]) -> dict[str, np.ndarray]:
        return {h: self.nested([head], np.zeros(self.n, np.int64)) for h, head in heads.items()}

    def nested(self, heads: list[Head], split: np.ndarray) -> np.ndarray:
        """V x N x C logits (float32), row i from heads[split[i]]: each head runs on whole batches (as `logits`
        does) and each batch's rows are written straight into the one output array."""
        out = np.zeros((self.n_views, self.n, len(heads[0].bias)), np.float32)
        for at, batches in self.groups:
            start = 0
            for feats in batches:
                rows = slice(start, start + len(feats[0]))
                for j, head in enumerate(heads):
                    mine = split[rows] == j
                    if mine.any():
                        for v, f in zip(at, feats):
                            out[v, rows][mine] = head.torch_logits(f).cpu().numpy()[mine]
                start = rows.stop
        return out


def predict_policy(load: Loading, model, norm, heads: dict[str, Head], store, views: list[str], device, dtype,
                   on_batch: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Logits (V x N x C, float32: the heads' own precision) of every head for the named views (all of one model:
    plain or FixRes-tuned), one loader per scale."""
    return PolicyFeatures(load, model, norm, store, views, device, dtype, on_batch).logits(heads)


def by_scale(pairs: list[tuple[float, str]]) -> list[tuple[float, list[int], list[str]]]:
    """(scale, positions in `pairs`, views) per scale, in ascending scale order: one loader per scale."""
    out = []
    for scale in sorted(set(s for s, _ in pairs)):
        at = [i for i, (s, _) in enumerate(pairs) if s == scale]
        out.append((scale, at, [pairs[i][1] for i in at]))
    return out


def view_index(names: list[str], policy: list[str]) -> list[int]:
    """Where the policy's views are among the predicted ones (`names`), or a clear error for one not predicted."""
    missing = [n for n in policy if n not in names]
    if missing:
        raise PipelineError(f"TTA policy views {missing} were not predicted (have {names})")
    return [names.index(n) for n in policy]


def policy_probs(view_logits: np.ndarray, names: list[str], policy: list[str], how: str,
                 dtype=np.float64) -> np.ndarray:
    """N x C probabilities of the policy's views (rows of `view_logits`, named by `names`) merged (in float64, in
    blocks of rows; returned in `dtype`)."""
    sel = view_index(names, policy)
    n = view_logits.shape[1]
    out = np.empty((n, view_logits.shape[2]), dtype)
    step = block_rows(view_logits.shape[2])  # merging is per row: blocks give the same numbers in less memory
    for a in range(0, n, step):
        out[a:a + step] = merge(view_logits[sel, a:a + step], how)
    return out


def nested_policy_blocks(logits, names: list[str], fold_policies: list[list[str]], fold: np.ndarray, merge: str):
    """OOF probabilities (float64) in blocks of rows, fold k's rows merged over fold k's policy (chosen without
    them): yields (first row, block)."""
    step = block_rows(logits.shape[2])
    for a in range(0, logits.shape[1], step):
        block, f = logits[:, a:a + step], fold[a:a + step]
        out = np.empty(block.shape[1:], np.float64)
        for k, pol in enumerate(fold_policies):
            if (f == k).any():
                out[f == k] = policy_probs(block[:, f == k], names, pol, merge)
        yield a, out


def policies_rows(view_logits, names: list[str], policies: list[list[str]], how: str,
                  y: np.ndarray) -> list[RowScores]:
    """metrics.RowScores of each policy's merged probabilities (float64, as `policy_probs`) in one pass over the
    rows: each block's view logits (a stored table computes them from features) and each view's probabilities are
    computed once for every policy (the same numbers as one policy at a time); O(rows) memory."""
    need = sorted({i for policy in policies for i in view_index(names, policy)})
    sel = [[need.index(names.index(n)) for n in policy] for policy in policies]
    parts: list[list[RowScores]] = [[] for _ in policies]
    step = block_rows(view_logits.shape[2])
    for a in range(0, view_logits.shape[1], step):
        views = per_view(view_logits[need, a:a + step], how)
        for i, at in enumerate(sel):
            parts[i].append(row_scores(y[a:a + step], combine_views(views[at], how)))
    return [RowScores.concat(p) for p in parts]
