"""What each stage's outputs were made from, so a later stage can refuse stale or foreign inputs.

A record is a plain dict: the config sections the output depends on plus hashes of input files.
Comparing the record stored with an output against the one the current config would produce
says whether it is up to date, and `changed_keys` says what differs.
"""
from __future__ import annotations

from .artifacts import read_json, sha256_file
from .config import Config
from .errors import PipelineError

TRAIN_SECTIONS = ("data", "folds", "model", "aug", "train", "eval")  # what a fold's weights depend on


def train_record(cfg: Config) -> dict:
    d = cfg.to_dict()
    rec = {s: d[s] for s in TRAIN_SECTIONS}
    rec["seed"] = cfg.seed
    rec["folds_file"] = sha256_file(cfg.folds_csv)
    for k in ("cache", "cache_dir"):  # where pixels come from, not what they are
        rec["aug"].pop(k, None)
    rec["train"].pop("workers", None)
    return rec


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def stage2_summary(cfg: Config, k: int, n_classes: int, check_stale: bool = True) -> dict:
    """Fold k's finished stage-2 record, refused when missing, of another architecture or class
    count, or (when the folds file is at hand to compare with) trained from other inputs."""
    path = cfg.fold_dir(k) / "summary.json"
    if not path.exists():
        raise PipelineError(f"fold {k} of experiment '{cfg.experiment}' has no finished stage-2 output ({path}); "
                            f"run ./run.sh train --fold {k}")
    s = read_json(path)
    if s["num_classes"] != n_classes or s["arch"] != cfg.model.arch:
        raise PipelineError(f"{path}: trained as {s['arch']} with {s['num_classes']} classes, but the config "
                            f"says {cfg.model.arch} with {n_classes} classes")
    if check_stale:
        rec = train_record(cfg)
        if s.get("made_from") != rec:
            raise PipelineError(f"{path}: the fold's weights are stale: they were trained with other inputs "
                                f"(changed: {', '.join(changed_keys(s.get('made_from', {}), rec))}); "
                                f"re-run ./run.sh train --force, or restore the config")
    return s
