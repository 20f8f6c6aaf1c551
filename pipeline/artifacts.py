"""Atomic file output, hashing and the per-experiment lock.

Every file a stage writes goes through `atomic_path`/`write_*` here: the data is written to a
temporary file in the same folder and moved into place with `os.replace`, so a crash leaves either
the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import PipelineError


_UMASK = os.umask(0)
os.umask(_UMASK)


def fault_point(name: str) -> None:
    """Test hook: `PIPELINE_FAULT=<name>` kills the process here (SIGKILL, no cleanup).

    It lets fault-injection tests hit a write path deterministically.
    """
    if os.environ.get("PIPELINE_FAULT") == name:
        os.kill(os.getpid(), 9)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`.

    `suffix` keeps the extension for writers that insist on one (np.savez appends '.npz').
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise PipelineError(f"cannot write {path}: {e.strerror or e}") from e
    tmp = Path(tmp)
    try:
        yield tmp
        fault_point(f"write:{path.name}")
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        raise PipelineError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"missing file: {path}") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path} is not valid JSON: {e}") from None


def write_csv(path: str | os.PathLike, df) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Arrays keyed by name; string arrays are stored as unicode (no pickles: allow_pickle=False)."""
    arrays = {k: _plain_array(v) for k, v in arrays.items()}
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _plain_array(v) -> np.ndarray:
    a = np.asarray(v)
    if a.dtype == object:  # pandas string columns: store as fixed unicode, never as pickled objects
        a = np.asarray([str(x) for x in a.tolist()], dtype=str)
    return a


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"missing file: {path}")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


_HASHES: dict[tuple, str] = {}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hash of a file's bytes; remembered per (path, inode, size, mtime) so up-to-date checks that hash
    the same weights several times in one process read them once."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def sha256_obj(obj: Any) -> str:
    """Hash of a JSON-able object (key order independent)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()


@contextlib.contextmanager
def experiment_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Refuse to run two writers on the same experiment folder at once.

    The lock file names its holder (host and pid). A lock left by a process that no longer
    exists on this host (a killed run) is taken over.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder.get("host") == me["host"] and not _pid_alive(holder.get("pid", -1)):
                lock.unlink(missing_ok=True)  # stale: its holder was killed
                continue
            raise PipelineError(
                f"{folder} is in use by another run (lock {lock} held by pid {holder.get('pid')} on "
                f"{holder.get('host')}); wait for it or remove the lock if that process is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
