"""What each stage's outputs were made from, so a later stage can refuse stale or foreign inputs.

A record is a plain dict: the config sections the output depends on plus hashes of input files.
Comparing the record stored with an output against the one the current config would produce
says whether it is up to date, and `changed_keys` says what differs.
"""
from __future__ import annotations

from .artifacts import sha256_file
from .config import Config

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
