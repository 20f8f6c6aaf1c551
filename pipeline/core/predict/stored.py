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
from ..files.artifacts import read_feature_cache, read_json, read_npz, sha256_file
from ..files.featurefile import CheckedFeatures, damage
from ..files.layout import RunDir
from .inference import nested_policy_blocks, policy_probs
from .metrics import RowScores, block_rows, row_scores
from .tta import BASELINE

PARTS = ("test", "oof")  # stage 4's image sets: the test images, the folds' held-out train rows
STORE_VERSION = 3  # stage 4 stores pooled features per backbone and view, each file with what checks it (#45; 2: the
# same without the checks; 1: per-head V x N x C logits)
FEATURE_DTYPES = ("float16", "float32")


def rerun_infer(run: RunDir) -> str:
    """How to make stage 4's outputs anew (a damaged file is never up to date by its record alone)."""
    return f"re-run stage 4 of '{run.name}': ./run.sh infer --force --config <its config> (or ./run.sh all)"


def store_damage(run: RunDir, summary: dict) -> list[str]:
    """Why stage 4's stored outputs are not what its summary's manifest says (empty: intact): every feature file
    (size, sampled digest, its rows' digests), rows.npz and scores.npz (sha256). Cheap: what `status` and the
    up-to-date check of stage 4 run, so a damaged output makes stage 4 stale."""
    store = summary.get("store") or {}
    if store.get("version") != STORE_VERSION:
        return []  # the record's `outputs` makes an older stage 4 stale
    out = []
    for backbone, entry in store.get("backbones", {}).items():
        for part, f in entry.get("files", {}).items():
            why = damage(run.infer_features(backbone, part if part == "test" else int(part)), f)
            if why:
                out.append(why)
    for path, key in ((run.infer_rows, "rows_sha256"), (run.infer_scores, "scores_sha256")):
        if store.get(key) and (not path.exists() or sha256_file(path) != store[key]):
            out.append(f"{path} is missing or changed since stage 4 wrote it")
    return out


def mix_factors(share: float) -> tuple[float, float]:
    """The mix head's two parts' factors (fine-tuned, probe) for a fine-tuned share: 2 x share and 2 x (1 - share),
    so that the share 0.5 is the plain mean (1 and 1, bit-equal to it)."""
    return 2 * share, 2 * (1 - share)


def mix_shares(mix: dict | None, k: int | None) -> tuple[float, float]:
    """The factors of the mix head's two parts (fine-tuned, probe) in the weighted mean of their entries' logits:
    2w and 2(1 - w) for the fine-tuned share w stage 4 chose for fold k's held-out rows (k None: for the test
    images), so that w = 0.5 is the plain mean, 1 and 1; 1 and 1 for a summary written before shares were chosen."""
    w = (mix or {}).get("weights")
    if w is None:
        return 1.0, 1.0
    return mix_factors(w["all"] if k is None else w["per_fold"][k])


def head_ref(run: RunDir, path: Path, keys: list[str] | None = None, inner: list[Path] | None = None,
             split: Path | None = None) -> dict:
    """How stage 4's manifest names a head: a Head file (stage 3's), or the classifier tensors `keys` (weight,
    bias) of a weights file; nested: the head of each inner split and the stage-3 file giving each held-out row's
    split. Paths relative to the run folder, each with its sha256 (the reader refuses a file changed since)."""
    from ..files.artifacts import sha256_file

    def rel(x: Path) -> dict:
        return {"path": str(Path(x).relative_to(run.dir)), "sha256": sha256_file(x)}
    return {"file": rel(path), "keys": keys, "inner": [rel(x) for x in inner] if inner else None,
            "split": rel(split) if split is not None else None}


def split_logits(heads: list, split: np.ndarray, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Row i of `x` scored by heads[split[i]] (a tuned stage-3 head, nested: each held-out row by the head chosen
    without its inner split), float32."""
    out = np.zeros((len(x), n_classes), np.float32)
    for j, head in enumerate(heads):
        mine = split == j
        if mine.any():
            out[mine] = head.logits(x[mine])
    return out


class HeadRows:
    """A linear head's logits of stored features as an N x C float32 table computed on demand: `rows[a:b]` is that
    block (memory: the block); what row_scores and top_k read block by block instead of a dense table."""
    dtype = np.dtype(np.float32)

    def __init__(self, head, feats: np.ndarray):
        self.head, self.feats = head, feats

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.feats), len(self.head.bias)

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, rows) -> np.ndarray:
        return self.head.logits(np.asarray(self.feats[rows], np.float32))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def stage2_logits(o: dict):
    """A stage-2 held-out file's logits: its pooled features x the fold's classifier (`feats`, `weight`, `bias`;
    HeadRows), or the dense `logits` it stored (a model whose classifier is not one linear layer, and files written
    before #35)."""
    if "logits" in o:
        return o["logits"]
    from ..nets.heads import Head

    return HeadRows(Head(np.asarray(o["weight"], np.float32), np.asarray(o["bias"], np.float32)), o["feats"])


class StoredFiles:
    """The files a manifest names, opened once and checked against their recorded sha256 on first use."""

    def __init__(self, run: RunDir):
        self.run, self.heads, self.feats, self.splits = run, {}, {}, {}

    def path(self, f: dict) -> Path:
        from ..files.artifacts import sha256_file

        p = self.run.dir / f["path"]
        if not p.exists():
            raise PipelineError(f"{p} is missing (stage 4 of '{self.run.name}' read it): re-run ./run.sh infer")
        if sha256_file(p) != f["sha256"]:
            raise PipelineError(f"{p} changed after stage 4 of '{self.run.name}' used it (an earlier stage was re-run): "
                                f"re-run ./run.sh infer")
        return p

    def head(self, f: dict, keys: list[str] | None):
        from ..nets.heads import Head  # numpy only but for kNN heads

        key = f["path"]
        if key not in self.heads:
            p = self.path(f)
            if keys is None:
                self.heads[key] = Head.load(p)[0]
            else:
                from safetensors import safe_open

                with safe_open(str(p), framework="numpy") as t:
                    self.heads[key] = Head(t.get_tensor(keys[0]).astype(np.float32),
                                           t.get_tensor(keys[1]).astype(np.float32))
        return self.heads[key]

    def features(self, backbone: str, part: str | int, entry: dict, n_rows: int) -> CheckedFeatures:
        """A backbone's features of a part, checked against the manifest's `entry` (its `files`) and the `n_rows`
        rows.npz gives it, before anything is computed from them; every block read is checked row by row."""
        key = (backbone, part)
        if key not in self.feats:
            files = entry.get("files", {})
            if str(part) not in files:
                raise PipelineError(f"stage 4 of '{self.run.name}' recorded no {part} features of {backbone}: "
                                    f"{rerun_infer(self.run)}")
            self.feats[key] = CheckedFeatures(self.run.infer_features(backbone, part), files[str(part)], n_rows,
                                              rerun_infer(self.run))
        return self.feats[key]

    def split(self, ref: dict, ids: np.ndarray) -> np.ndarray:
        """Each of `ids`' inner split (stage 3's held-out file)."""
        key = ref["split"]["path"]
        if key not in self.splits:
            o = read_npz(self.path(ref["split"]), keys=("ids", "inner"))
            self.splits[key] = ({str(i): n for n, i in enumerate(o["ids"])}, o["inner"])
        where, inner = self.splits[key]
        return inner[[where[str(i)] for i in ids]]


class InMemory:
    """What LogitTable reads when the features were just computed (`./run.sh predict`): backbones' feature arrays
    (V x N x D, already in the stored precision) and heads by name, so a bundle's logits come from the same
    arithmetic as stage 4's stored ones."""

    def __init__(self):
        self.feats, self.heads = {}, {}

    def features(self, backbone: str, part, entry: dict | None = None, n_rows: int | None = None) -> np.ndarray:
        return self.feats[(backbone, part)]

    def head(self, f: dict, keys):
        return self.heads[f["path"]]


class LogitTable:
    """One head's logits of one part as a V x N x C float32 table computed from stage 4's stored features on
    demand: `table[views, a:b]` gives rows a..b of those views (memory: that block). Test rows: per view, the
    weighted mean over the backbones that predicted it (float64, as stage 4 summed), of each one's features x its
    head; held-out rows: fold k's rows from fold k's entry (the mix head: the weighted mean of its two parts'), each
    row from the head of its inner split when nested."""

    def __init__(self, store: dict, head: str, part: str, rows: dict, files: "StoredFiles | InMemory"):
        self.files = files
        self.entries, self.part = store[part][head], part
        self.backbones = store["backbones"]
        self.n_views = len(store["views"])
        self.n_classes = len(rows["classes"])
        self.n = len(rows["ids"])
        self.ids = rows["ids"]
        self.fold = rows.get("fold")
        self.rows_in = {"test": self.n}  # the rows of each feature file this table reads (its check's shape)
        if part == "oof":  # each row's place among its fold's held-out rows (the backbone's held<k> file)
            self.pos = np.zeros(self.n, np.int64)
            for k in np.unique(self.fold):
                self.rows_in[int(k)] = int((self.fold == k).sum())
                self.pos[self.fold == k] = np.arange(self.rows_in[int(k)])

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.n_views, self.n, self.n_classes

    dtype = np.dtype(np.float32)

    def __getitem__(self, key) -> np.ndarray:
        views, rows = key
        views = range(self.n_views)[views] if isinstance(views, slice) else list(views)
        a, b, _ = rows.indices(self.n)
        out = np.empty((len(views), max(b - a, 0), self.n_classes), np.float32)
        for i, v in enumerate(views):
            out[i] = self._test(v, a, b) if self.part == "test" else self._oof(v, a, b)
        return out

    def _logits(self, e: dict, v: int, part, rows) -> np.ndarray:
        at = self.backbones[e["features"]]["views"].index(v)
        x = np.asarray(self.files.features(e["features"], part, self.backbones[e["features"]],
                                           self.rows_in[part])[at, rows], np.float32)
        ref = e["head"]
        if ref["inner"] is None:
            return self.files.head(ref["file"], ref["keys"]).logits(x)
        ids = self.ids[self.fold == e["fold"]][rows]
        return split_logits([self.files.head(f, None) for f in ref["inner"]], self.files.split(ref, ids), x,
                            self.n_classes)

    def _test(self, v: int, a: int, b: int) -> np.ndarray:
        total, weight = np.zeros((b - a, self.n_classes), np.float64), 0.0
        for e in self.entries:
            if v in self.backbones[e["features"]]["views"]:
                total += e["weight"] * self._logits(e, v, "test", slice(a, b)).astype(np.float64)
                weight += e["weight"]
        if weight <= 0:
            raise PipelineError("a TTA view was predicted by no model")
        return total / weight

    def _oof(self, v: int, a: int, b: int) -> np.ndarray:
        out = np.zeros((b - a, self.n_classes), np.float32)
        fold, pos = self.fold[a:b], self.pos[a:b]
        per_fold: dict = {}  # a fold scored by several entries (the mix head's two parts): the mean of their logits,
        # weighted by their `weight` where stage 4 gave them unequal ones (the mix head's share)
        for e in self.entries:
            if v in self.backbones[e["features"]]["views"]:
                per_fold.setdefault(e["fold"], []).append(e)
        for k, entries in per_fold.items():
            mine = fold == k
            if not mine.any():
                continue
            p = pos[mine]
            rows = slice(int(p[0]), int(p[-1]) + 1)
            weights = [e.get("weight", 1.0) for e in entries]
            if len(entries) == 1:
                out[mine] = self._logits(entries[0], v, k, rows)
            elif len(set(weights)) == 1:
                out[mine] = sum(self._logits(e, v, k, rows).astype(np.float64) for e in entries) / len(entries)
            else:
                out[mine] = sum(w * self._logits(e, v, k, rows).astype(np.float64)
                                for w, e in zip(weights, entries)) / sum(weights)
        return out


@dataclass(frozen=True)
class Stage4:
    """One head's stage-4 predictions of one part (`test` or `oof`): row ids (and for `oof` labels and folds), every
    TTA view's logits (the fold mean on test rows; fold k's models on its held-out rows), and the policy's
    probabilities merged from them here (the test images: over the policy chosen on every OOF row; fold k's held-out
    rows: over fold k's own policy when it was searched), as stage 4 scored them. Stage 4 stores pooled features per
    backbone and view, not logits: the logits are computed here from them and the heads its manifest names
    (`LogitTable`). Opened after stage 4 finished (its summary.json holds the manifest and the policies)."""
    run: RunDir
    head: str
    part: str
    store: dict
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
        store = summary.get("store")
        if not store or store.get("version") != STORE_VERSION:
            raise PipelineError(f"stage 4 of '{run.name}' was written by an older version (per-head logit files): "
                                f"re-run ./run.sh infer")
        fp = summary.get("fold_policies")
        return cls(run, head, part, store, tuple(summary["policy"]),
                   tuple(map(tuple, fp)) if fp and part == "oof" else None, summary["merge"])

    def exists(self) -> bool:
        return self.head in self.store.get(self.part, {})

    def ids(self) -> np.ndarray:
        return self.rows()["ids"]

    def rows(self) -> dict[str, np.ndarray]:
        """ids, classes, views, and for `oof` y and fold: everything but the rows x classes arrays."""
        o = read_npz(self._checked(self.run.infer_rows, "rows_sha256"))
        if self.part == "test":
            out = {"ids": o["test_ids"]}
        else:
            if "oof_ids" not in o:
                raise PipelineError(f"stage 4 of '{self.run.name}' predicted no held-out rows (infer.oof off)")
            out = {"ids": o["oof_ids"], "y": o["oof_y"], "fold": o["oof_fold"]}
        return {**out, "classes": o["classes"], "views": np.array(self.store["views"])}

    def _checked(self, path: Path, key: str) -> Path:
        """`path` after checking it is the file stage 4 wrote (its sha256 in the manifest)."""
        if not path.exists() or (self.store.get(key) and sha256_file(path) != self.store[key]):
            raise PipelineError(f"{path} is missing or changed since stage 4 wrote it: {rerun_infer(self.run)}")
        return path

    def views(self) -> list[str]:
        return list(self.store["views"])

    def table(self) -> LogitTable:
        if not self.exists():
            raise PipelineError(f"stage 4 of '{self.run.name}' has no {self.part} predictions of head '{self.head}'")
        return LogitTable(self.store, self.head, self.part, self.rows(), StoredFiles(self.run))

    def scores(self, plain: bool) -> RowScores | None:
        """The held-out rows' per-row scores stage 4 stored (infer/scores.npz; float64, `plain`: without TTA, else
        the policy, fold k's rows by fold k's own when searched), or None where it stored none."""
        if self.part != "oof" or not self.run.infer_scores.exists():
            return None
        prefix = f"{self.head}__{'plain' if plain else 'policy'}__"
        o = read_npz(self._checked(self.run.infer_scores, "scores_sha256"))
        return RowScores.of_arrays({k[len(prefix):]: v for k, v in o.items() if k.startswith(prefix)})

    def view_logits(self, view: str = BASELINE) -> np.ndarray:
        """N x C logits of one view (that view alone is computed, not every view's rows x classes)."""
        views = self.views()
        if view not in views:
            raise PipelineError(f"stage 4 of '{self.run.name}': no view '{view}' (it has {views})")
        return self.table()[[views.index(view)], :][0]

    def probs(self, plain: bool = False) -> np.ndarray:
        """N x C probabilities: the policy's (float32), or with `plain` the no-TTA view's (float64), computed in
        blocks of rows from the views they merge."""
        return np.asarray(self.prob_table(plain))

    def prob_table(self, plain: bool = False) -> "ProbTable":
        """`probs` as an N x C table computed on demand, a block of rows at a time (memory: the block)."""
        policies = [[BASELINE]] if plain else ([list(self.policy)] if self.fold_policies is None
                                               else [list(p) for p in self.fold_policies])
        return ProbTable(self.table(), self.views(), policies, self.merge, np.float64 if plain else np.float32)


class ProbTable:
    """A head's N x C probabilities computed from its LogitTable on demand: `probs[a:b]` merges rows a..b of the
    views a policy uses (one policy; or one per fold, fold k's held-out rows merged over fold k's, chosen without
    them); np.asarray(probs) the whole table, a block of rows at a time. Stage 5 and the leaderboard read members
    through it, so their memory is a block, not rows x classes per member."""

    def __init__(self, table: LogitTable, names: list[str], policies: list[list[str]], merge: str, dtype):
        used = sorted({names.index(v) for p in policies for v in p if v in names})
        self.table, self.views, self.policies, self.merge = table, used, policies, merge
        self.names = [names[i] for i in used]
        self.dtype = np.dtype(dtype)
        for p in policies:  # refused here, not at the first block
            policy_probs(np.zeros((len(used), 0, 0)), self.names, p, merge)

    @property
    def shape(self) -> tuple[int, int]:
        return self.table.shape[1:]

    def __len__(self) -> int:
        return self.table.shape[1]

    def __getitem__(self, rows) -> np.ndarray:
        if not isinstance(rows, slice):
            raise TypeError("ProbTable: rows by slice (np.asarray(table) for the whole table)")
        logits = self.table[self.views, rows]
        if len(self.policies) == 1:
            return policy_probs(logits, self.names, self.policies[0], self.merge, self.dtype)
        fold = self.table.fold[rows]
        out = np.empty(logits.shape[1:], self.dtype)
        for a, block in nested_policy_blocks(logits, self.names, self.policies, fold, self.merge):
            out[a:a + len(block)] = block
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        step = block_rows(self.shape[1])
        for a in range(0, len(self), step):
            out[a:a + step] = self[a:a + step]
        return out if dtype is None else out.astype(dtype)


@dataclass(frozen=True)
class HeldOut:
    """Fold k's held-out rows as a stage-2 model (`variant` None: its oof.npz features x its classifier) or a stage-3
    head scores them.
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
            return read_feature_cache(self.run.probe_features, keys=("feats",))["feats"][o["rows"]]
        return read_feature_cache(self.run.fold(self.k).features, keys=("valid",))["valid"]

    def read(self) -> dict[str, np.ndarray]:
        """ids, y and logits (rows x classes, float32; stage 3: also inner)."""
        o = self.lazy()
        return {**o, "logits": np.asarray(o["logits"], np.float32)}

    def scores(self) -> dict:
        """ids, y and `rows`: the held-out rows' metrics.RowScores (float64 softmax), as the stage stored them
        beside the rows (O(rows): no logits computed), else computed from the logits in blocks of rows."""
        o = read_npz(self.path, skip=("feats", "weight", "bias", "logits"))
        rows = RowScores.of_arrays(o)
        if rows is None:
            lazy = self.lazy()
            rows = row_scores(lazy["y"], logits=lazy["logits"], dtype=np.float64)
        return {"ids": o["ids"], "y": o["y"], "rows": rows}

    def lazy(self) -> dict:
        """ids, y (stage 3: inner) and `logits`: a stage-2 fold's as HeadRows (its features x its classifier), a
        stage-3 variant's dense (each row from its inner split's head)."""
        o = read_npz(self.path)
        if self.variant is None:
            return {**o, "logits": stage2_logits(o)}
        if "logits" in o:
            return o
        from ..nets.heads import Head  # numpy only: no torch for a reader of stage 2's files

        x = self.features(o)
        fd = self.run.fold(self.k)
        inner = [Head.load(p)[0] for p in fd.inner_heads(self.variant)]
        if not inner:
            return {"ids": o["ids"], "y": o["y"], "inner": o["inner"],
                    "logits": HeadRows(Head.load(fd.head(self.variant))[0], x)}
        return {"ids": o["ids"], "y": o["y"], "inner": o["inner"],
                "logits": split_logits(inner, o["inner"], x, len(inner[0].bias))}
