"""`./run.sh predict`: the submission from an export bundle alone (a Kaggle code competition's notebook).

Usage:   python -m pipeline predict --bundle DIR|ZIP --test-dir DIR [--sample-submission FILE] --out FILE
                [--batch-size N] [--device auto|cpu|cuda] [--time-budget MIN] [--tmp-dir DIR]
Input:   the bundle (verified first: every file of its manifest present and unaltered), the test images
         (the sample submission's ids, or without one every image in the folder)
Output:  --out only (written atomically), plus a temporary folder (the decoded test images) that is
         removed at the end. Needs no runs/, folds/, train images, config or internet; the bundle and
         the test folder are only read.
Every member predicts with each of its folds' models and its own TTA policy exactly as stage 4 did
(the fold mean of the logits per view, the policy's views merged by its rule), and the members are
combined as stage 5 did, so the submission equals stage 5's on the same images.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.files import bundle as bundle_io
from ..core.files import layout
from ..core.nets import models
from ..core.files.artifacts import read_json, write_csv
from ..core.config import Config, load_config
from ..core.inputs.data import read_sample_submission, read_test_table
from ..core.engine.distributed import Dist
from ..core.errors import PipelineError
from ..core.nets.heads import Head
from ..core.inputs.images import ImageStore
from ..core.inputs.pixels import pixels
from ..core.predict.inference import Loading, PolicyFeatures, joint_head, parse_view, policy_probs, predict_policy
from ..core.predict.stored import InMemory, LogitTable
from ..core.predict.metrics import GREATER_IS_BETTER
from ..core.report.progress import Progress
from ..core.engine.runtime import amp_dtype, pick_device, prepare_model
from ..core.predict.submission import build_submission, combine, submission_without_sample

log = logging.getLogger("pipeline")


@dataclass
class Member:
    name: str
    info: dict
    cfg: Config
    files: layout.BundleMember
    weight: float
    policy: list[str] = field(default_factory=list)

    @property
    def folds(self) -> int:
        return len(self.info["folds"])

    def units(self) -> list[tuple[int, float]]:
        """(fold index or FULL_FIT, share of the test mean) of every model of the member (the mix head's models:
        their part's factor, stage 4's)."""
        full = self.info.get("full")
        return [(k, float(f.get("weight", 1.0))) for k, f in enumerate(self.info["folds"])] + (
            [(layout.FULL_FIT, full["weight"])] if full else [])

    def loading(self, device) -> Loading:
        return Loading.of(pixels(self.cfg), self.cfg.infer, self.cfg.train, device)


# ----------------------------------------------------------------------------- the bundle
def open_bundle(path: Path, tmp: Path) -> tuple[layout.BundleDir, dict]:
    """The verified bundle: a folder, or a .zip extracted into the temporary folder."""
    if path.is_file() and zipfile.is_zipfile(path):
        dest = tmp / "bundle"
        with zipfile.ZipFile(path) as z:
            for entry in z.namelist():
                if Path(entry).is_absolute() or ".." in Path(entry).parts:
                    raise PipelineError(f"{path}: zip entry '{entry}' points outside the bundle")
            z.extractall(dest)
        path = dest
    elif path.is_file():
        raise PipelineError(f"{path}: not a bundle folder or zip (make one with ./run.sh export)")
    b = layout.BundleDir(path)
    return b, bundle_io.verify(b)


def load_members(b: layout.BundleDir, manifest: dict, overrides: list[str]) -> list[Member]:
    out = []
    for name in manifest["members"]:
        files = b.member(name)
        info = read_json(files.info)
        cfg = load_config(files.config, overrides)
        out.append(Member(name, info, cfg, files, float(manifest["weights"][name]), list(info["policy"])))
    return out


# ----------------------------------------------------------------------------- predicting
def fold_model(m: Member, k: int, device, fixres: bool = False) -> tuple[torch.nn.Module, torch.nn.Module,
                                                                          dict[str, Head]]:
    """Fold k's (or the full-data model's) model, plain or FixRes-tuned, its input normalisation and head."""
    weights = m.files.fixres_weights(k) if fixres else m.files.weights(k)
    model = models.load_trained(m.cfg.model, weights, m.info["num_classes"]).to(device)
    prepare_model(m.cfg.train, model, device)
    f = m.info["full"] if k == layout.FULL_FIT else m.info["folds"][k]
    norm = models.Normalize(f["mean"], f["std"]).to(device)
    head = joint_head(model) if m.info["head_in_weights"] else Head.load(m.files.head(k))[0]
    return model, norm, {m.info["head"]: head}


def predict_member(m: Member, store: ImageStore, device, bar: Progress) -> np.ndarray:
    """N x C probabilities as stage 4's reader gives them: each model's pooled features per view in the stored
    precision (infer.features), its head's logits from them, the weighted model mean per view (the same LogitTable
    arithmetic, in the same order), the policy merged."""
    dtype = amp_dtype(m.cfg.train.amp, device)
    src = InMemory()
    manifest = {"views": m.policy, "backbones": {}, "test": {m.info["head"]: []}}
    for k, weight in m.units():
        for fixres in (False, True):
            at = [i for i, v in enumerate(m.policy) if parse_view(v)[2] == fixres]
            if not at:
                continue
            model, norm, heads = fold_model(m, k, device, fixres)
            feats = PolicyFeatures(m.loading(device), model, norm, store, [m.policy[i] for i in at], device, dtype,
                                   on_batch=bar.update).array()
            name = f"{k}{'.fixres' if fixres else ''}"
            src.feats[(name, "test")] = feats.astype(m.cfg.infer.features)
            src.heads[name] = heads[m.info["head"]]
            manifest["backbones"][name] = {"views": at}
            manifest["test"][m.info["head"]].append({"features": name, "weight": weight,
                                                     "head": {"file": {"path": name}, "keys": None, "inner": None}})
    table = LogitTable(manifest, m.info["head"], "test", {"ids": np.arange(len(store)),
                                                          "classes": np.arange(m.info["num_classes"])}, src)
    return policy_probs(table, m.policy, m.policy, m.info["merge"], np.float32)


def view_costs(m: Member, store: ImageStore, device, n: int) -> dict[str, float]:
    """Seconds per image of each policy view of a member (one fold; a short warm-up first)."""
    model, norm, heads = fold_model(m, 0, device)  # a FixRes copy costs what the plain model does
    dtype = amp_dtype(m.cfg.train.amp, device)
    sub = store.subset(np.arange(min(n, len(store))))
    costs = {}
    predict_policy(m.loading(device), model, norm, heads, store.subset(np.arange(min(2, len(store)))), ["orig@1"], device,
                   dtype)
    for v in m.policy:
        t0 = time.perf_counter()
        predict_policy(m.loading(device), model, norm, heads, sub, [v], device, dtype)
        costs[v] = (time.perf_counter() - t0) / len(sub)
    return costs


def fit_budget(members: list[Member], costs: dict[str, dict[str, float]], n_images: int, seconds_left: float,
               metric: str) -> list[str]:
    """Drop policy views, least useful on OOF first (each view's CV alone, from stage 4), until the
    estimated time fits; every member keeps at least one view. Returns what was dropped."""
    def estimate():
        return sum(costs[m.name][v] * n_images * len(m.units()) for m in members for v in m.policy)

    sign = 1 if GREATER_IS_BETTER[metric] else -1
    dropped = []
    before = estimate()
    while estimate() > seconds_left:
        options = [(sign * m.info["view_cv"].get(v, float("-inf") * sign), m, v)
                   for m in members if len(m.policy) > 1 for v in m.policy]
        if not options:
            log.warning("warning: even one view per member is estimated at %.1f min, more than the %.1f min left; "
                        "predicting anyway", estimate() / 60, seconds_left / 60)
            break
        _, m, v = min(options, key=lambda o: o[0])
        m.policy.remove(v)
        dropped.append(f"{m.name} {v} (OOF {metric} alone {m.info['view_cv'].get(v, float('nan')):.4f})")
    if dropped:
        log.warning("time budget: all views were estimated at %.1f min, %.1f min are left; dropped %s; "
                    "estimate now %.1f min", before / 60, seconds_left / 60, "; ".join(dropped), estimate() / 60)
    else:
        log.info("time budget: estimated %.1f min for every view, %.1f min left: nothing dropped", before / 60,
                 seconds_left / 60)
    return dropped


# ----------------------------------------------------------------------------- entry
def check_paths(bundle: Path, test_dir: Path, out: Path) -> None:
    o = out.resolve()
    for inside in (bundle, test_dir):
        if o == inside.resolve() or o.is_relative_to(inside.resolve()):
            raise PipelineError(f"--out {out} lies inside {inside}: predict writes nothing into its inputs")
    if out.is_dir():
        raise PipelineError(f"--out {out} is a folder; give the submission file's path")


def run(bundle: str | Path, test_dir: str | Path, out: str | Path, sample_submission: str | Path | None = None,
        batch_size: int | None = None, device: str = "auto", time_budget: float | None = None,
        tmp_dir: str | Path | None = None) -> dict:
    t_start = time.perf_counter()
    bundle, test_dir, out = Path(bundle), Path(test_dir), Path(out)
    check_paths(bundle, test_dir, out)
    tmp = Path(tempfile.mkdtemp(prefix="pipeline-predict-", dir=tmp_dir))
    try:
        b, manifest = open_bundle(bundle, tmp)
        sample = Path(sample_submission).resolve() if sample_submission else None
        overrides = [f"data.root={Path.cwd()}", f"data.test_dir={test_dir.resolve()}",
                     f"data.sample_submission={sample if sample else 'null'}", f"device={device}",
                     f"aug.cache_dir={tmp / 'images'}", "aug.cache=on"]
        if batch_size:
            overrides.append(f"infer.batch_size={batch_size}")
        members = load_members(b, manifest, overrides)
        cfg0 = members[0].cfg
        test = read_test_table(cfg0.data)  # with a sample submission: every image of the folder listed in it
        dev = pick_device(cfg0.device, Dist())
        t_images = time.perf_counter()
        stores: dict[int, ImageStore] = {}
        for m in members:
            side = m.cfg.aug.store_side
            if side not in stores:
                stores[side] = ImageStore(list(test["path"]), side, "on", tmp / "images")
        dropped = []
        t_budget0 = time.perf_counter()
        if time_budget:
            costs = {m.name: view_costs(m, stores[m.cfg.aug.store_side], dev, m.cfg.infer.batch_size) for m in members}
            left = time_budget * 60 * 0.95 - (time.perf_counter() - t_start)
            dropped = fit_budget(members, costs, len(test), left, manifest["metric"])
        n_views = sum(len(m.policy) * len(m.units()) for m in members) * len(test)
        t0 = time.perf_counter()
        with Progress(n_views, f"predict {manifest['name']}", "view-img") as bar:
            # float32, as stage 4 stores them: stage 5 combined exactly these values (rank ties included)
            probs = [predict_member(m, stores[m.cfg.aug.store_side], dev, bar).astype(np.float32) for m in members]
        seconds = time.perf_counter() - t0
        seconds_with_decode = seconds + (t_budget0 - t_images)
        ens = combine(probs, manifest["method"], np.array([m.weight for m in members]))
        classes = members[0].info["classes"]
        ids = test["id"].values
        if sample:
            sub = build_submission(read_sample_submission(cfg0.data), ids, ens, classes, manifest["submission"],
                                   manifest["data"]["label_col"], str(sample), manifest.get("top_k", 5))
        else:
            sub = submission_without_sample(ids, ens, classes, manifest["submission"], manifest["data"]["id_col"],
                                            manifest["data"]["label_col"], manifest.get("top_k", 5))
        write_csv(out, sub)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"out": str(out), "ids": ids, "probs": ens, "members": {m.name: p for m, p in zip(members, probs)},
              "policies": {m.name: m.policy for m in members}, "dropped": dropped, "seconds": seconds,
              "images_per_s": len(test) / seconds, "view_images_per_s": n_views / seconds,
              "view_images_per_s_with_decode": n_views / seconds_with_decode,
              "total_seconds": time.perf_counter() - t_start}
    log.info("wrote %s: %d images, %d member(s), %.1f images/s (%.1f view-images/s) on %s, %.1fs in all%s", out,
             len(test), len(members), result["images_per_s"], result["view_images_per_s"], dev,
             result["total_seconds"], f"; dropped views to fit the time budget: {len(dropped)}" if dropped else "")
    return result
