"""The stored predictions of stages 2-4 as every later reader gets them: one head's rows, their labels, one view's
logits, the policy's or the no-TTA view's probabilities. Stage 5, the leaderboard, the reports, teachers and sweeps
read through these classes and never open a stage's prediction files themselves, so how a stage stores them (#35:
features instead of per-head logits) is known here and in the stage that writes them only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PipelineError
from ..files.artifacts import read_json, read_npz, read_npz_item
from ..files.layout import RunDir
from .inference import nested_policy_blocks, policy_probs
from .tta import BASELINE

PARTS = ("test", "oof")  # stage 4's image sets: the test images, the folds' held-out train rows


@dataclass(frozen=True)
class Stage4:
    """One head's stage-4 predictions of one part (`test` or `oof`): row ids (and for `oof` labels and folds), every
    TTA view's logits (the fold mean on test rows; fold k's models on its held-out rows), and the policy's
    probabilities merged from them here (the test images: over the policy chosen on every OOF row; fold k's held-out
    rows: over fold k's own policy when it was searched), as stage 4 scored them. Opened after stage 4 finished
    (its summary.json names the policies)."""
    path: Path
    part: str
    policy: tuple[str, ...]
    fold_policies: tuple[tuple[str, ...], ...] | None
    merge: str

    @classmethod
    def of(cls, run: RunDir, head: str, part: str, summary: dict | None = None) -> "Stage4":
        if part not in PARTS:
            raise ValueError(part)
        if summary is None:
            if not run.infer_summary.exists():
                raise PipelineError(f"{run.infer_summary} not found: stage 4 of '{run.name}' has not finished "
                                    f"(run ./run.sh infer)")
            summary = read_json(run.infer_summary)
        fp = summary.get("fold_policies")
        return cls(run.infer_test(head) if part == "test" else run.infer_oof(head), part, tuple(summary["policy"]),
                   tuple(map(tuple, fp)) if fp and part == "oof" else None, summary["merge"])

    def exists(self) -> bool:
        return self.path.exists()

    def ids(self) -> np.ndarray:
        return read_npz(self.path, keys=("ids",))["ids"]

    def rows(self) -> dict[str, np.ndarray]:
        """ids, classes, views, and for `oof` y and fold: everything but the rows x classes arrays."""
        return read_npz(self.path, skip=("view_logits",))

    def views(self) -> list[str]:
        return [str(v) for v in read_npz(self.path, keys=("views",))["views"]]

    def view_logits(self, view: str = BASELINE) -> np.ndarray:
        """N x C logits of one view (that view alone is read, not every view's rows x classes)."""
        views = self.views()
        if view not in views:
            raise PipelineError(f"{self.path}: no view '{view}' (it has {views})")
        return read_npz_item(self.path, "view_logits", views.index(view))

    def probs(self, plain: bool = False) -> np.ndarray:
        """N x C probabilities: the policy's (float32), or with `plain` the no-TTA view's (float64). Only the views
        they merge are read."""
        policy = [BASELINE] if plain else list(self.policy)
        used = sorted(set(policy).union(*self.fold_policies) if self.fold_policies and not plain else policy)
        logits = np.stack([self.view_logits(v) for v in used])
        if self.fold_policies is None or plain:
            return policy_probs(logits, used, policy, self.merge, np.float64 if plain else np.float32)
        fold = read_npz(self.path, keys=("fold",))["fold"]
        out = np.empty(logits.shape[1:], np.float32)
        for a, block in nested_policy_blocks(logits, used, [list(p) for p in self.fold_policies], fold, self.merge):
            out[a:a + len(block)] = block
        return out


@dataclass(frozen=True)
class HeldOut:
    """Fold k's held-out rows as a stage-2 model (`variant` None: its oof.npz logits) or a stage-3 head scores them.
    Stage 3 stores no logits (rows x classes per variant): its file holds the rows (ids, y, each row's inner split)
    and where their features are (`source`: the fold's features.npz, the pretrained backbone's probe_features.npz at
    `rows`, or its own `feats`: a WiSE-FT backbone's); the logits are the head's on them, each row from the head chosen
    without its inner split when the variant was tuned (the cross-fitted logits stage 3 scored)."""
    run: RunDir
    k: int
    variant: str | None = None

    @classmethod
    def of(cls, run: RunDir, k: int, variant: str | None = None) -> "HeldOut":
        return cls(run, k, variant)

    @property
    def path(self) -> Path:
        fd = self.run.fold(self.k)
        return fd.oof if self.variant is None else fd.head_oof(self.variant)

    def exists(self) -> bool:
        return self.path.exists()

    def rows(self) -> dict[str, np.ndarray]:
        """ids, y (stage 3: also each row's inner split), without logits or features."""
        return read_npz(self.path, keys=("ids", "y", "inner"))

    def features(self, o: dict) -> np.ndarray:
        source = str(o["source"])
        if source == "own":
            return o["feats"]
        if source == "probe":
            return read_npz(self.run.probe_features, keys=("feats",))["feats"][o["rows"]]
        return read_npz(self.run.fold(self.k).features, keys=("valid",))["valid"]

    def read(self) -> dict[str, np.ndarray]:
        """ids, y and logits (rows x classes, float32; stage 3: also inner)."""
        o = read_npz(self.path)
        if "logits" in o:
            return o
        from ..nets.heads import Head  # numpy only: no torch for a reader of stage 2's files

        x = self.features(o)
        fd = self.run.fold(self.k)
        inner = [Head.load(p)[0] for p in fd.inner_heads(self.variant)]
        heads, split = (inner, o["inner"]) if inner else ([Head.load(fd.head(self.variant))[0]], np.zeros(len(x), int))
        logits = np.zeros((len(x), len(heads[0].bias)), np.float32)
        for j, head in enumerate(heads):
            mine = split == j
            if mine.any():
                logits[mine] = head.logits(x[mine])
        return {"ids": o["ids"], "y": o["y"], "inner": o["inner"], "logits": logits}
