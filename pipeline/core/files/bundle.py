"""Export bundles: the manifest that lists every file with its sha256, and its verification.

`./run.sh export` writes a bundle (layout.BundleDir) and its manifest last; `./run.sh predict`
verifies it before reading anything else: every listed file present with its recorded size and
hash, and a format this version reads. A bundle is only ever read.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from . import layout
from .artifacts import sha256_file
from ..errors import PipelineError

log = logging.getLogger("pipeline")

FORMAT = 1  # raise when a bundle's contents change in a way older readers would misread


def file_entries(root: Path, files: list[Path]) -> dict[str, dict]:
    """{path relative to root: {sha256, bytes}} of the files, sorted."""
    return {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(files)}


def read_manifest(bundle: layout.BundleDir) -> dict:
    path = bundle.manifest
    if not bundle.dir.is_dir():
        raise PipelineError(f"bundle folder not found: {bundle.dir}")
    if not path.is_file():
        raise PipelineError(f"{path} not found: {bundle.dir} is not an export bundle (or an unfinished one); "
                            f"make one with ./run.sh export")
    try:
        m = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"{path}: not a valid manifest ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("format"), int) or not isinstance(m.get("files"), dict):
        raise PipelineError(f"{path}: not a bundle manifest (no format number or file list)")
    if m["format"] > FORMAT:
        raise PipelineError(f"{path}: bundle format {m['format']} was made by pipeline {m.get('version', '?')}, "
                            f"newer than this one (reads format {FORMAT} and older): install the wheel in "
                            f"{bundle.wheels} to read it")
    return m


def verify(bundle: layout.BundleDir) -> dict:
    """The manifest, after checking every file it lists: present, of its size, with its sha256."""
    m = read_manifest(bundle)
    root = bundle.dir.resolve()
    for rel, entry in m["files"].items():
        p = bundle.dir / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute() or not p.resolve().is_relative_to(root):
            raise PipelineError(f"{bundle.manifest}: file entry '{rel}' points outside the bundle")
        if not p.is_file():
            raise PipelineError(f"bundle file missing: {p} (listed in {bundle.manifest}); re-upload the bundle")
        if p.stat().st_size != entry["bytes"] or sha256_file(p, fresh=True) != entry["sha256"]:
            raise PipelineError(f"bundle file altered: {p} does not match the sha256 in {bundle.manifest} "
                                f"(a partial upload or a modified file); re-upload the bundle")
    listed = {bundle.dir / rel for rel in m["files"]} | {bundle.manifest}
    extra = [p for p in bundle.dir.rglob("*") if p.is_file() and p not in listed]
    if extra:
        log.warning("warning: %d file(s) in %s are not in its manifest and are ignored: %s", len(extra), bundle.dir,
                    ", ".join(str(p) for p in extra[:3]))
    return m
