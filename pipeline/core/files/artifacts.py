"""Atomic file output, hashing and the per-experiment lock.

Every file a stage writes goes through `atomic_path`/`write_*` here: the data is written to a
temporary file in the same folder and moved into place with `os.replace`, so a crash leaves either
the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import glob
import functools
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import PipelineError

log = logging.getLogger("pipeline")


_UMASK = os.umask(0)
os.umask(_UMASK)


def fault_point(name: str) -> None:
    """Test hook for the fault-injection suite (`./run.sh selfcheck`), keyed by `PIPELINE_FAULT`:
    `<name>` kills the process here (SIGKILL, no cleanup), which hits a write path
    deterministically; `oom@<name>` raises the CUDA out-of-memory error here."""
    fault = os.environ.get("PIPELINE_FAULT")
    if fault == name:
        os.kill(os.getpid(), 9)
    if fault == f"oom@{name}":
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated by PIPELINE_FAULT)")


def faulty(batches, before: dict[int, str], after: dict[int, str]):
    """Test hook around a batch iterator: the fault points `before` {batch index: name} are passed before that
    batch is handed out, those `after` once the loop has finished with it (its step taken). Without
    `PIPELINE_FAULT` the iterator itself comes back, so the training loop carries no test code."""
    if not os.environ.get("PIPELINE_FAULT"):
        return batches

    def gen():
        for i, batch in enumerate(batches):
            if i in before:
                fault_point(before[i])
            yield batch
            if i in after:
                fault_point(after[i])
    return gen()


def fault_flag(name: str) -> bool:
    """Test hook: is the fault `name` injected (`PIPELINE_FAULT=<name>`)? E.g. `nan-loss:<epoch>`."""
    return os.environ.get("PIPELINE_FAULT") == name


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`.

    `suffix` keeps the extension for writers that insist on one (np.savez appends '.npz').
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_orphans(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp" + suffix, dir=path.parent)
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
    except Exception as e:
        if not _is_write_error(e):
            raise
        raise PipelineError(f"cannot write {path}: {e} (is the disk full?)") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def _is_write_error(e: Exception) -> bool:
    """Writers that wrap a failed OS write in their own type: safetensors, torch's zip writer."""
    return type(e).__name__ == "SafetensorError" or (isinstance(e, RuntimeError) and "write" in str(e).lower())


def _sweep_orphans(path: Path) -> None:
    """Remove temporary files of `path` left by writers that were killed (their pid is gone)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


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


def recorded(path: Path) -> dict | None:
    """The record stored in an output's summary (`made_from`), or None when the output is missing."""
    return read_json(path).get("made_from") or {} if path.exists() else None


def up_to_date(path: Path, rec: dict) -> bool:
    """Was the output whose summary is `path` made from `rec`? The one comparison behind every
    stage's skip decision and status (provenance builds the records)."""
    return recorded(path) == rec


def write_csv(path: str | os.PathLike, df) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")


def write_npz(path: str | os.PathLike, **arrays) -> None:
    """Arrays keyed by name; string arrays are stored as unicode (no pickles: allow_pickle=False). The file is what
    np.savez writes (a zip of .npy members, stored), read back with np.load."""
    with atomic_path(path, suffix=".npz") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for k, v in arrays.items():
            with zf.open(f"{k}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, _plain_array(v), allow_pickle=False)


class NpzStream:
    """An npz file written member by member, a large member a batch of rows at a time (`rows`), so the writer never
    holds it whole (#49: stage 3's feature cache). The bytes are write_npz's for the same arrays in the same order;
    `path` is written in place: wrap it in atomic_path."""

    def __init__(self, path: str | os.PathLike):
        self.zf = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)

    def __enter__(self) -> "NpzStream":
        return self

    def __exit__(self, *exc) -> None:
        self.zf.close()

    def array(self, name: str, v) -> None:
        with self.zf.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, _plain_array(v), allow_pickle=False)

    def rows(self, name: str, shape: tuple[int, ...], dtype, batches) -> None:
        """A C-ordered member of `shape` from `batches`: rows of its last axis (k x shape[-1] arrays; a V x N x D
        member takes view 0's rows, then view 1's), in order, each cast to `dtype` as it comes; refused unless they
        fill `shape` exactly."""
        dtype, n, total = np.dtype(dtype), 0, int(np.prod(shape[:-1]))
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        with self.zf.open(f"{name}.npy", "w", force_zip64=True) as f:
            try:
                np.lib.format.write_array_header_1_0(f, header)
            except ValueError:  # a header too long for format 1.0, as write_array falls back
                np.lib.format.write_array_header_2_0(f, header)
            for b in batches:
                b = np.ascontiguousarray(b, dtype)
                if b.ndim != 2 or b.shape[1] != shape[-1] or n + len(b) > total:
                    raise PipelineError(f"{name}: a batch of shape {b.shape} does not fit the member's {shape}")
                f.write(b.tobytes())
                n += len(b)
        if n != total:
            raise PipelineError(f"{name}: {n} rows written, {total} expected")


def _plain_array(v) -> np.ndarray:
    a = np.asarray(v)
    if a.dtype == object:  # pandas string columns: store as fixed unicode, never as pickled objects
        a = np.asarray([str(x) for x in a.tolist()], dtype=str)
    return a


def read_npz(path: str | os.PathLike, keys: tuple[str, ...] | None = None,
             skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The arrays of an npz file (`keys`: only those; `skip`: all but those: large ones stay on disk)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"missing file: {path}")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if (keys is None or k in keys) and k not in skip}


def read_feature_cache(path: str | os.PathLike, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """A stage-3 feature cache (a fold's features.npz, probe_features.npz) as every fit and score reads it: arrays
    stored in float16 (rebalance.features) upcast to float32, the others as they are."""
    return float32_arrays(read_npz(path, keys))


MAP_MIN_BYTES = 1 << 16  # smaller members are read whole (labels, ids, classifiers: no map per small array)


def map_npz(path: str | os.PathLike, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an npz file that write_npz wrote (members stored, not compressed) as read-only memory maps of
    their bytes in the file, in their stored dtype: a reader touches only the rows it reads (#49: a stage-3 cache of
    N x D features costs no N x D of memory). Members under MAP_MIN_BYTES and compressed ones (an npz from
    elsewhere) are read whole."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"missing file: {path}")
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        for info in zf.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if keys is not None and name not in keys:
                continue
            if info.compress_type != zipfile.ZIP_STORED or info.file_size < MAP_MIN_BYTES:
                with zf.open(info) as f:
                    out[name] = np.lib.format.read_array(f, allow_pickle=False)
                continue
            raw.seek(info.header_offset + 26)  # the local header: its name and extra field lengths, then the data
            n_name, n_extra = np.frombuffer(raw.read(4), "<u2")
            start = info.header_offset + 30 + int(n_name) + int(n_extra)
            raw.seek(start)
            version = np.lib.format.read_magic(raw)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = header(raw)
            if dtype.hasobject:
                raise PipelineError(f"{path}: member {name} holds Python objects; refusing to read it")
            out[name] = np.memmap(path, dtype, "r", raw.tell(), shape, "F" if fortran else "C")
    return out


def float32_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float16 arrays upcast to float32 (exactly: every float16 is a float32), the others as they are."""
    return {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in arrays.items()}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20, fresh: bool = False) -> str:
    """Hash of a file's bytes; remembered per (path, inode, size, mtime) so up-to-date checks that hash
    the same weights several times in one process read them once (`fresh`: always read the bytes)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    return _read_sha256(key[0], chunk) if fresh else _file_sha256(*key, chunk)


@functools.lru_cache(maxsize=4096)
def _file_sha256(path: str, ino: int, size: int, mtime_ns: int, chunk: int) -> str:
    """The memo behind sha256_file: a file's identity (inode, size, mtime) is part of the key."""
    return _read_sha256(path, chunk)


def _read_sha256(path: str, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_obj(obj: Any) -> str:
    """Hash of a JSON-able object (key order independent)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()


def hostname() -> str:
    """This machine's name in lock files (`PIPELINE_HOSTNAME` overrides it, e.g. for containers that
    share a hostname on different nodes)."""
    return os.environ.get("PIPELINE_HOSTNAME") or socket.gethostname()


def _lock_timing() -> tuple[float, float]:
    """(heartbeat, stale-after) seconds: a held lock's mtime is refreshed every heartbeat; a lock not
    refreshed for stale-after seconds belongs to a dead holder on any host and is taken over."""
    beat = float(os.environ.get("PIPELINE_LOCK_HEARTBEAT_S", 30))
    return beat, float(os.environ.get("PIPELINE_LOCK_STALE_S", 10 * beat))


@contextlib.contextmanager
def experiment_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Refuse to run two writers on the same experiment folder at once, also across hosts on a
    shared filesystem (folds spread over nodes).

    The lock file names its holder (host and pid) and its mtime is refreshed by a heartbeat while it
    is held. It is taken over when its holder is gone: at once when the holder was a process of this
    host that no longer exists (a killed run), after the stale timeout (10 heartbeats, 5 minutes by
    default) when its heartbeat stopped on any host.
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"cannot create {folder}: {e.strerror or e}") from e
    lock = folder / ".lock"
    beat, stale_after = _lock_timing()
    _acquire(lock, {"host": hostname(), "pid": os.getpid()}, stale_after)
    stop, t = _heartbeat(lock, beat)
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)
        lock.unlink(missing_ok=True)
        for p in created:  # a run that failed before writing anything leaves no empty folders behind
            try:
                p.rmdir()
            except OSError:
                break


def _acquire(lock: Path, me: dict, stale_after: float) -> None:
    """Create the lock file naming its holder; a lock whose holder is gone is taken over, a live one refused."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except PermissionError as e:
            raise PipelineError(f"cannot write in {lock.parent}: {e.strerror}") from e
        except FileExistsError:
            _take_over_or_refuse(lock, me, stale_after)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise PipelineError(f"{lock.parent} is in use by another run: it took the lock {lock} as this one freed it")


def _take_over_or_refuse(lock: Path, me: dict, stale_after: float) -> None:
    """Remove a lock whose holder is gone (killed on this host, or silent past `stale_after`); refuse a live one."""
    try:
        holder = json.loads(lock.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        holder = {}
    if holder.get("host") == me["host"] and not pid_alive(holder.get("pid", -1)):
        lock.unlink(missing_ok=True)  # stale: its holder was killed
    elif not holder and _age(lock) > 30:
        lock.unlink(missing_ok=True)  # empty: its holder was killed between creating and writing it
    elif _age(lock) > stale_after:
        log.warning("taking over %s: its holder (pid %s on %s) has not refreshed it for %.0fs", lock,
                    holder.get("pid"), holder.get("host"), _age(lock))
        lock.unlink(missing_ok=True)
    else:
        raise PipelineError(
            f"{lock.parent} is in use by another run (lock {lock} held by pid {holder.get('pid')} on "
            f"{holder.get('host')}, refreshed {_age(lock):.0f}s ago); wait for it, or remove the lock if that "
            f"process is gone (a lock without heartbeat is taken over after {stale_after:.0f}s)"
        ) from None


def _heartbeat(lock: Path, beat: float) -> tuple[threading.Event, threading.Thread]:
    """A daemon thread refreshing the lock's mtime every `beat` seconds until the event is set."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(beat):
            try:
                os.utime(lock)
            except OSError:
                return

    t = threading.Thread(target=run, name=f"lock-heartbeat:{lock.parent}", daemon=True)
    t.start()
    return stop, t


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
