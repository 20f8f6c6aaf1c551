"""What each stage's outputs were made from: the records behind up-to-date checks and refusals.

A record is a plain dict: the config sections an output depends on plus hashes of its input files.
Every stage stores the record of its outputs (`made_from` in its summary.json) and compares it with
the record the current config would produce: equal means up to date (skipped), different means
stale (re-run), and `changed_keys` says what differs. A stage that finds its *input* stale (made
by an upstream stage from other settings) refuses, naming the input, unless `--allow-stale`.
The environment (package versions, git commit) is stored next to the record but never compared:
upgrading numpy should not retrain a model.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
import os
import platform
import subprocess
from pathlib import Path

from . import layout
from .artifacts import read_json, recorded, sha256_file, sha256_obj, up_to_date, write_json  # noqa: F401 (re-exported)
from ..inputs.augment import pixel_record
from ..config import (MIX, PROBE, SECTION_STAGE, WISE, Config, DataCfg, TrainCfg, keys_without_output, later_keys,
                      off_backbone, schema)
from ..inputs.data import read_folds, read_table, read_test_table
from ..errors import PipelineError
from ..nets.heads import low_median
from ..inputs.taxonomy import source as taxonomy_source

log = logging.getLogger("pipeline")

# what a fold's weights depend on: the sections whose keys change the outputs of stage 1 or 2 (the schema's)
TRAIN_SECTIONS = tuple(s for s, stage in SECTION_STAGE.items() if s and stage in ("1", "2"))
PACKAGES = ("torch", "torchvision", "timm", "albumentations", "numpy", "pandas", "scikit-learn")
# ----------------------------------------------------------------------------- image files
class ImageRecord(dict):
    """An image record ({digest, n, content}: what records store) that also carries, in memory only, the per-file
    entries behind its digest: `keep_image_snapshots` writes them when the stage writes its output, and
    `describe_changes` names the files that changed."""

    def __init__(self, rec: dict, entries: list):
        super().__init__(rec)
        self.entries = entries

    def __deepcopy__(self, memo):
        return ImageRecord(dict(self), self.entries)


def image_record(paths, hash_images: bool, looks: dict | None = None) -> ImageRecord:
    """What a stage's pixels were read from: (size, mtime_ns) of every image file, in order (cheap: one
    stat per file), or with `hash_images` (data.hash_images) the sha256 of every file's bytes. A replaced image makes
    exactly the stages that read it stale; the per-file list is kept (keep_image_snapshots) so the
    reason can name the files. Within a command (`looks`: Session.looks) each image set is looked at once."""
    paths = tuple(map(str, paths))
    memo, key = looks, (paths, hash_images)
    if memo is not None and key in memo:
        return ImageRecord(memo[key], memo[key].entries)
    entries = []
    for p in paths:
        try:
            if hash_images:
                entries.append([p, sha256_file(p)])
            else:
                st = os.stat(p)
                entries.append([p, st.st_size, st.st_mtime_ns])
        except OSError as e:
            raise PipelineError(f"image {p} cannot be read: {e.strerror or e} (was it removed after stage 1? "
                                f"restore it, or re-run ./run.sh folds --force)") from None
    digest = sha256_obj(entries)[:32]
    rec = ImageRecord({"digest": digest, "n": len(entries), "content": bool(hash_images)}, entries)
    if memo is not None:
        memo[key] = rec
    return ImageRecord(rec, entries)


def _image_records(rec, out: list | None = None) -> list[ImageRecord]:
    out = [] if out is None else out
    if isinstance(rec, ImageRecord):
        out.append(rec)
    elif isinstance(rec, dict):
        for v in rec.values():
            _image_records(v, out)
    return out


def keep_image_snapshots(rec: dict) -> None:
    """Store the per-file list behind each image record made in this process (content-addressed, written once);
    a stage calls this as it writes the output the record describes."""
    for r in _image_records(rec):
        path = layout.image_snapshot(r["digest"])
        if not path.exists():
            write_json(path, r.entries)


def _snapshot(rec: dict) -> dict | None:
    """{file: its entry} behind an image record: carried by one made in this process, else stored on disk."""
    entries = rec.entries if isinstance(rec, ImageRecord) else None
    if entries is None and layout.image_snapshot(rec["digest"]).exists():
        entries = read_json(layout.image_snapshot(rec["digest"]))
    return None if entries is None else {e[0]: e[1:] for e in entries}


def _image_change(old: dict, new: dict) -> str:
    a, b = _snapshot(old), _snapshot(new)
    if a is None or b is None:
        return "image files changed (which ones: the earlier list is gone)"
    changed = [p for p in b if p in a and a[p] != b[p]]
    added = [p for p in b if p not in a]
    removed = [p for p in a if p not in b]
    parts = []
    for what, items in (("replaced", changed), ("added", added), ("removed", removed)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{what}: {', '.join(items[:3])}{more}")
    return "; ".join(parts) or "the same files in another order"


def describe_changes(old: dict, new: dict) -> list[str]:
    """changed_keys, with the files named where an image list changed."""
    out = []
    for key in changed_keys(old, new):
        if key.endswith("images.digest"):
            base = key[: -len(".digest")]
            o, n = old, new
            for part in base.split("."):
                o, n = (o or {}).get(part), (n or {}).get(part)
            out.append(f"{base} ({_image_change(o, n)})" if o and n else base)
        elif not key.endswith(("images.n", "images.content")):
            out.append(key)
    return out


def refuse_stale(what: str | Path, changed: list[str], fix: str, allow: bool = False) -> None:
    """Refuse a stale input, naming what changed; `allow` (the command's --allow-stale): warn and go on."""
    msg = (f"{what} is stale: it was made from other inputs (changed: {', '.join(changed) or 'unknown'}); "
           f"{fix}")
    if allow:
        log.warning("warning: %s -- used anyway (--allow-stale)", msg)
        return
    raise PipelineError(msg + ", or pass --allow-stale to use it as it is")


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def stale_reasons(path: Path, rec: dict, what: str = "") -> list[str]:
    """[] when the output recorded at `path` was made from `rec`; else why not (not run, or the
    changed keys), each reason prefixed with `what` (e.g. "fold 2: ")."""
    old = recorded(path)
    if old is None:
        return [f"{what}not run"]
    return [] if old == rec else [f"{what}changed {', '.join(describe_changes(old, rec)) or 'unknown'}"]


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """Package versions and the git commit of the code that made an output (stored, not compared)."""
    env = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            env[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            env[p] = None
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        env["git_commit"] = commit.stdout.strip() or None
        env["git_dirty"] = bool(dirty.stdout.strip()) if commit.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = env["git_dirty"] = None
    return env


# ----------------------------------------------------------------------------- stage 1
def folds_record(folds, data: DataCfg, df) -> dict:
    """What the folds file is made from (`df`: the train table): the table's ids, labels and groups, K, the seed
    and where the data is."""
    table_cols = ["id", "label"] + (["group"] if "group" in df else [])
    return {
        "table": sha256_obj(df[table_cols].astype(str).values.tolist()),
        "n_splits": folds.n_splits, "seed": folds.seed, "group_col": data.group_col,
        "layout": data.layout, "root": data.root,
    }


# ----------------------------------------------------------------------------- stage 2


@functools.lru_cache(maxsize=4)
def _fold_paths(folds_csv: str, sha: str) -> tuple[str, ...]:
    return tuple(read_table(Path(folds_csv))["path"])


def train_images(folds_csv: Path, hash_images: bool, looks: dict | None = None) -> dict:
    """The image record of every train image of the folds file (each fold reads them all: its own rows
    to train, the held-out ones to score)."""
    return image_record(_fold_paths(str(folds_csv), sha256_file(folds_csv)), hash_images, looks)



# keys added after outputs already existed (the schema's `added`): at their default they are left out of records,
# so upgrading the pipeline does not make finished work stale (a non-default value is recorded as usual)
LATER_KEYS = later_keys()


def _drop_later_defaults(d: dict, since: str = "") -> dict:
    """`d`: config sections (a copy of cfg.to_dict()'s); keys of LATER_KEYS (with `since`: those added on or after
    that date) at their defaults removed."""
    defaults = Config().to_dict()
    for section, keys in (later_keys(since) if since else LATER_KEYS).items():
        if section in d:
            for k in keys:
                if d[section].get(k, object()) == defaults[section][k]:
                    d[section].pop(k)
    return d


def recorded_keys(d: dict, section: str, stages: tuple[str, ...]) -> dict:
    """The entries of a config section (`d`: its dict) a record of stages `stages` holds, by the schema: keys whose
    first affected stage is one of them, not those of later stages, of none, or recorded on their own."""
    drop = set()
    for k in schema():
        if k.name.startswith(section + ".") and (k.own_record or k.stage not in stages):
            drop.add(k.name[len(section) + 1:].split(".")[0])  # a subsection's key: the subsection
    return {name: v for name, v in d.items() if name not in drop}


def train_record(sections: dict, px, seed: int, folds_csv: Path, looks: dict | None = None) -> dict:
    """What a fold's stage-2 weights are made from (`sections`: the config's sections of stages 1-2, TRAIN_SECTIONS,
    name -> section; `px`: the resolved Pixels; `looks`: the command's image records)."""
    d = _drop_later_defaults({s: dataclasses.asdict(v) for s, v in sections.items()})
    train, data, model = sections["train"], sections["data"], sections["model"]
    # keys of later stages (test-side data keys), of none ("-": where or how work runs: the image store, workers,
    # trackers, a permission such as folds.rare_classes) and keys with an entry of their own (train.full_fit: the
    # full-data model; train.pseudo / distill: the teacher's section) are not what a fold's weights depend on
    rec = {s: recorded_keys(d[s], s, ("1", "2")) for s in TRAIN_SECTIONS}
    rec["seed"] = seed
    rec["folds_file"] = sha256_file(folds_csv)
    rec["train_images"] = train_images(folds_csv, data.hash_images, looks)
    rec["pixels"] = pixel_record(px)
    if train.select == "last":  # since 2026-12-02 a fixed source, no longer the better one on held-out rows
        rec["train"]["select"] = "last (EMA weights when train.ema)"
    teacher = teacher_section(train, sections["folds"].n_splits, data, looks)
    if teacher is not None:  # only then: records without a teacher stay as they were
        rec["teacher"] = teacher
    if train.taxonomy:  # the taxonomy's bytes (data.taxonomy, or the COCO file's categories); only then
        rec["taxonomy"] = sha256_file(taxonomy_source(data)) if taxonomy_source(data).is_file() else "missing"
    if model.pretrained_path:  # the weights' bytes, not only their file name (only then: older records stay)
        path = Path(model.pretrained_path)
        rec["pretrained_weights"] = {"name": path.name, "sha256": sha256_file(path) if path.is_file() else "missing"}
    return rec


def teacher_section(train: TrainCfg, n_splits: int, data: DataCfg, looks: dict | None = None) -> dict | None:
    """train.pseudo / train.distill: their settings and what the teachers' targets are made from."""
    from .teachers import load_teacher, teacher_record

    out = {}
    for key in ("pseudo", "distill"):
        part = getattr(train, key)
        if not part.teacher:
            continue
        out[key] = {**dataclasses.asdict(part), "record": teacher_record(load_teacher(part.teacher), n_splits)}
        if key == "distill" and part.leaky_oof:
            out[key]["leaky"] = True
    if train.pseudo.teacher:  # the test images are training images now
        test = read_test_table(data)
        out["test_ids"] = sha256_obj([str(i) for i in test["id"]])
        out["test_images"] = image_record(test["path"], data.hash_images, looks)
    return out or None


def fold_choices(run: layout.RunDir, n_splits: int, rec: dict) -> list[dict] | None:
    """What each fold's stage 2 chose (epoch, raw/EMA): the full-data fit repeats it. None until every fold
    is finished from the current settings (`rec`: the train record)."""
    out = []
    for k in range(n_splits):
        path = run.fold(k).summary
        if not up_to_date(path, rec):
            return None
        s = read_json(path)
        out.append({"epoch": s["epoch"], "chosen": s["chosen"]})
    return out


def full_plan(choices: list[dict]) -> dict:
    """train.full_fit: train for the folds' (low) median chosen epoch on the same schedule, and keep the
    weights (raw or EMA) most folds chose (EMA on a tie: it is the smoother of the two)."""
    ema = sum(c["chosen"] == "ema" for c in choices)
    return {"epochs": low_median([c["epoch"] for c in choices]), "source": "ema" if 2 * ema >= len(choices) else "raw"}


def full_record(train_rec: dict, choices: list[dict]) -> dict:
    """The full-data model's record: the folds' train record, the plan it repeats and the choices behind it."""
    return {**train_rec, "full_fit": full_plan(choices), "fold_choices": choices}


# ----------------------------------------------------------------------------- stage 3
def feature_record(weights: Path, classes: list, px, aug_views: int, seed: int, train_imgs: dict,
                   dtype: str = "float32") -> dict:
    """What a fold's cached backbone features depend on: the weights, the pixels fed to them (`px`: Pixels), the
    augmented views (rebalance.aug_views), the train images (`train_imgs`: train_images) and, when not float32, the
    precision it is stored in (`dtype`: rebalance.features)."""
    a = px.aug
    rec = {"format": 3, "weights": sha256_file(weights), "classes": classes,
           "img_size": a.img_size, "resize": a.resize, **pixel_record(px), "aug_views": aug_views,
           "aug": dataclasses.asdict(a) if aug_views else None, "seed": seed, "train_images": train_imgs}
    if rec["aug"]:
        rec["aug"] = recorded_keys(rec["aug"], "aug", ("1", "2"))
    return rec if dtype == "float32" else {**rec, "dtype": dtype}


def section_record(section, name: str) -> dict:
    """A config section as records hold it: its keys, less those added later while at their defaults."""
    return _drop_later_defaults({name: dataclasses.asdict(section)})[name]


PROBE_RECORD_SINCE = "2026-12-04"  # the probe features' record (format 1) holds the model keys of 2026-12-03 whole


def probe_features_record(model, px, classes: list, train_imgs: dict) -> dict:
    """What the pretrained backbone's features (rebalance.probe) depend on: the model section (keys added since the
    record's format at their defaults left out) and the weights' bytes (a local file) or the hub's name, the pixels,
    the train images."""
    path = model.pretrained_path
    weights = ({"name": Path(path).name, "sha256": sha256_file(path) if Path(path).is_file() else "missing"} if path
               else {"hub": model.arch})
    return {"format": 1, "model": _drop_later_defaults({"model": dataclasses.asdict(model)}, PROBE_RECORD_SINCE)["model"],
            "weights": weights, "classes": classes,
            **pixel_record(px), "aug": recorded_keys(dataclasses.asdict(px.aug), "aug", ("1", "2")),
            "train_images": train_imgs}


def stage3_record(run: layout.RunDir, k: int, classes: list, rebalance, eval_, model, px, seed: int, train_imgs: dict,
                  fold_choices: dict | None = None) -> dict:
    """Fold k's (or the full-data model's) stage-3 record, as stage 3 writes it and stage 4 checks it: its sections,
    the features of the fold's weights, and with rebalance.probe or wise_alpha the pretrained backbone's (the full-data
    model has no probe or WiSE-FT heads)."""
    features = feature_record(run.unit(k).weights, classes, px, rebalance.aug_views, seed, train_imgs,
                              rebalance.features)
    probe = (probe_features_record(model, px, classes, train_imgs)
             if (rebalance.probe or rebalance.wise_alpha) and k != layout.FULL_FIT else None)
    return rebalance_record(rebalance, eval_, features, fold_choices, probe)


def rebalance_record(rebalance, eval_, features: dict, fold_choices: dict | None = None,
                     probe: dict | None = None) -> dict:
    """A fold's heads (`features`: feature_record; `probe`: probe_features_record, with rebalance.probe); for the
    full-data model also the folds' choices it repeats."""
    # outputs 2: also the head of each inner split (stage 4 scores held-out rows nested); 3: the held-out rows
    # without logits (predict/stored.HeldOut computes them from the features and heads)
    rec = {"rebalance": section_record(rebalance, "rebalance"), "eval": section_record(eval_, "eval"),
           "features": features, "outputs": 3}
    if probe is not None:
        rec["probe_features"] = probe
    return rec if fold_choices is None else {**rec, "fold_choices": fold_choices}


def report_record(summaries: list[dict]) -> dict:
    """Stage 3's report: the record of each fold's heads it was made from."""
    return {str(s["fold"]): sha256_obj(s["made_from"]) for s in summaries}


# ----------------------------------------------------------------------------- stage 4
def resolve_heads(heads: list[str], run: layout.RunDir, mix: bool = False) -> list[str]:
    """The stage-3 heads stage 4 predicts: the configured ones (infer.heads), every variant for 'best' (stage 4
    chooses among them per fold, nested) and with `mix` (infer.mix) the mix head where stage 3 fit both fine-tuned and
    probe variants, every WiSE-FT head for 'wise'; joint is always added (the baseline)."""
    out = []
    for h in heads:
        if h in ("best", WISE):
            path = run.rebalance_summary
            if not path.exists():
                raise PipelineError(f"infer.heads={h} needs stage 3's report {path}: run ./run.sh rebalance")
            table = read_json(path)["table"]  # best first
            out += [r["variant"] for r in table if r["variant"] not in out and (h == "best" or r["variant"].startswith(WISE))]
            if h == "best" and mix and MIX not in out and all(mix_candidates([r["variant"] for r in table])):
                out.append(MIX)
        elif h not in out:
            out.append(h)
    return out + (["joint"] if "joint" not in out else [])


def mix_candidates(variants: list[str]) -> tuple[list[str], list[str]]:
    """The mix head's two families among stage 3's variants: the fine-tuned ones (on the folds' own backbones) and
    the probe ones (on the pretrained backbone); WiSE-FT heads are in neither."""
    return ([v for v in variants if not off_backbone(v) and v != MIX], [v for v in variants if v.startswith(PROBE)])


def oof_rows(oof: str, folds_name: str, classes: list):
    """The folds table when stage 4 predicts the held-out rows too (`oof`: infer.oof, and the train images at
    hand), else None; infer.oof=on without them is refused."""
    oof_df = None
    if oof != "off" and layout.folds_csv(folds_name).exists():
        df, fclasses = read_folds(folds_name)
        if fclasses != classes:
            raise PipelineError(f"{layout.folds_csv(folds_name)} and the experiment's classes.json have different "
                                f"class lists")
        if Path(df["path"].iloc[0]).exists():
            oof_df = df
    if oof_df is None and oof == "on":
        raise PipelineError("infer.oof=on needs the folds file and the train images; use infer.oof=off "
                            "for test-only inference (e.g. in a Kaggle kernel)")
    return oof_df


def infer_record(infer, data: DataCfg, run: layout.RunDir, folds_name: str, folds_csv: Path, n: int, full_fit: bool,
                 looks: dict | None = None) -> dict:
    """What stage 4's outputs are made from (`infer`: the infer section; `n`: the folds; `full_fit`: train.full_fit):
    its settings, the heads, the test ids and image files, the weights and head files of every fold, and whether
    OOF rows (and so the train images) were predicted."""
    heads = resolve_heads(infer.heads, run, infer.mix)
    test = read_test_table(data)
    oof = oof_rows(infer.oof, folds_name, read_json(run.classes)) is not None
    d = dataclasses.asdict(infer)
    d.pop("mix")  # what it changes is in `heads` (the mix head listed or not)
    shares = d.pop("mix_weights")  # read by the mix head only: recorded with it
    files = [h for h in heads if h not in ("joint", MIX)]  # the head files behind the heads' logits
    if MIX in heads:  # the mix head's parts: any fine-tuned or probe variant stage 3 fit
        table = read_json(run.rebalance_summary)["table"]
        files += [v for v in sum(mix_candidates([r["variant"] for r in table]), []) if v not in files and v != "joint"]
    if not full_fit:
        d.pop("full_fit_weight")  # not read without a full-data model
    if d["fixres"]["size"] is None:
        d.pop("fixres")
    rec = {"infer": d, "heads": heads, "test_ids": sha256_obj([str(i) for i in test["id"]]),
           "test_images": image_record(test["path"], data.hash_images, looks),
           "train_images": train_images(folds_csv, data.hash_images, looks) if oof else None,  # OOF rows, and FixRes tuning, read them
           "weights": [sha256_file(run.fold(k).weights) for k in range(n)],
           "head_files": {h: [sha256_file(run.fold(k).head(h)) for k in range(n)] for h in files},
           "inner_head_files": {h: [[sha256_file(p) for p in run.fold(k).inner_heads(h)] for k in range(n)]
                                for h in files},  # what scores the held-out rows (nested)
           "oof": oof,
           "outputs": 3}  # 3: each feature file checked (#45); 2: pooled features per backbone and view + a manifest
    # (#35); 1: per-head logit files
    if MIX in heads:
        rec["mix_weights"] = shares
    if full_fit and infer.full_fit_weight > 0:  # the full-data model joins the test mean
        full = run.full
        sha = lambda p: sha256_file(p) if p.exists() else "missing"  # noqa: E731
        rec["full"] = {"weights": sha(full.weights), "head_files": {h: sha(full.head(h)) for h in files}}
    return rec


def fixres_lr(fixres, lr: float) -> float:
    """The FixRes tuning's learning rate: infer.fixres.lr, else a tenth of train.lr."""
    return fixres.lr if fixres.lr is not None else lr / 10


def fixres_record(fixres, train: TrainCfg, px, seed: int, weights: Path, folds_csv: Path, train_imgs: dict) -> dict:
    """What a FixRes-tuned copy of a trained unit's `weights` is made from (`fixres`: infer.fixres; `px`: Pixels)."""
    aug = {x: v for x, v in dataclasses.asdict(px.aug).items() if x not in keys_without_output("aug")}
    return {"fixres": dataclasses.asdict(fixres), "lr": fixres_lr(fixres, train.lr), "weights": sha256_file(weights),
            "folds_file": sha256_file(folds_csv), "train_images": train_imgs, "aug": aug,
            **pixel_record(px), "batch_size": train.batch_size, "seed": seed,
            "amp": train.amp, "channels_last": train.channels_last}


# ----------------------------------------------------------------------------- stage 5
def ensemble_record(ensemble, eval_, data: DataCfg, members: dict[str, dict]) -> dict:
    """What an ensemble's submission is made from: its settings, the sample submission, and the
    record of each member's stage-4 output ({"exp:head": made_from})."""
    sample = data.path(data.sample_submission) if data.sample_submission else None
    return {"ensemble": section_record(ensemble, "ensemble"), "eval": section_record(eval_, "eval"),
            "sample_submission": sha256_file(sample) if sample and sample.exists() else None,
            "members": dict(members)}
