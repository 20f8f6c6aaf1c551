"""`./run.sh selfcheck`: the reliability matrix, run on a tiny generated competition, printed as one
table (case, expected, observed, pass) with the totals: kills survived, bad inputs rejected cleanly,
files lost.

Kills. Each stage is SIGKILLed at several points (its start, mid-epoch, before a checkpoint, and on
the write path of its outputs, via `PIPELINE_FAULT`, see `artifacts.fault_point`), in the real CLI in
a subprocess, starting from a copy of an uninterrupted reference run taken just before that stage.
After the kill: every file at its final name loads completely (no partial file is readable), the
outputs of earlier stages are unchanged, and the next stage refuses cleanly. Then the same command
is run again: it must finish and leave outputs equal to the reference run's. "Equal" compares the
bytes of weights, arrays and tables, and JSON/CSV minus wall-clock fields (seconds, images/s, data
wait) and the `env` record; `last.pt` (the resume state, which holds wall times) and the PNG/Markdown
views are not compared. On CPU with a fixed seed every stage is deterministic, so this is bit-identity.

Bad input. Each case breaks one thing in a fresh copy (config, data, artifacts, training) and runs
the command in-process through `cli.main`: the exit code must be non-zero (2; 3 for out-of-memory),
the message must name the key, file or row at fault, and no file under folds/, runs/, submissions/
may be created or changed (except where keeping a file is the point: the last good checkpoint).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..core.files import layout
from ..core.files.artifacts import read_json, sha256_obj
from ..core.report.progress import Progress
from .demo import synthetic_competition

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = tuple(str(p) for p in (layout.FOLDS, layout.RUNS, layout.SUBMISSIONS))
VOLATILE = {"seconds", "images_per_s", "data_wait", "env"}  # wall-clock fields and the environment record
NOT_COMPARED = {".pt", ".png", ".md"}
STAGES = ["folds", "train", "rebalance", "infer", "ensemble"]
CONFIG = """experiment: sc
data: {root: comp, image_ext: .png, check_images: full}
folds: {n_splits: 2}
model: {arch: test_resnet}
aug: {img_size: 16}
train: {epochs: 2, batch_size: 8, workers: 0}
rebalance: {crt_epochs: 2, lws_epochs: 2}
infer: {views: [orig, hflip], search: false, batch_size: 16}
"""
KILLS = {  # stage -> kill points, in the order a run reaches them
    "folds": ["folds:start", "write:comp_k2_s42.csv", "write:comp_k2_s42.json"],
    "train": ["train:start", "train:step:0", "train:before-checkpoint:1", "write:model.safetensors",
              "train:before-summary"],
    "rebalance": ["rebalance:start", "write:features.npz", "rebalance:after-features:1", "write:crt.safetensors",
                  "write:report.csv"],
    "infer": ["infer:start", "infer:after-fold:0", "write:test.npy", "write:summary.json"],
    "ensemble": ["ensemble:start", "write:sc.csv", "write:sc.json"],
}
QUICK_KILLS = {"folds": ["write:comp_k2_s42.csv"], "train": ["train:step:0", "write:model.safetensors"],
               "rebalance": ["write:crt.safetensors"], "infer": ["write:test.npy"], "ensemble": ["write:sc.json"]}


@dataclass
class Result:
    group: str
    case: str
    expected: str
    observed: str
    passed: bool
    kill: bool = False
    lost: int = 0


# ----------------------------------------------------------------------------- file checks
def _strip(o):
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if k not in VOLATILE}
    if isinstance(o, list):
        return [_strip(v) for v in o]
    return o


def file_digest(path: Path) -> str:
    """Content hash of an output, loading it completely (raises on a partial or corrupt file)."""
    suffix = path.suffix
    if suffix == ".json":
        return sha256_obj(_strip(json.loads(path.read_text())))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return sha256_obj({k: [str(z[k].dtype), list(z[k].shape), z[k].tobytes().hex()] for k in sorted(z.files)})
    if suffix == ".npy":
        x = np.load(path, allow_pickle=False)
        return sha256_obj([str(x.dtype), list(x.shape), x.tobytes().hex()])
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        load_file(str(path))
    if suffix == ".csv":
        t = pd.read_csv(path)
        t = t.drop(columns=[c for c in t.columns if c in VOLATILE])  # history.csv's wall-clock columns
        return sha256_obj(t.astype(str).values.tolist() + [list(t.columns)])
    if suffix == ".pt":
        import torch

        torch.load(path, map_location="cpu", weights_only=True)
    if suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            im.verify()
    return sha256_obj(path.read_bytes().hex())


def output_files(root: Path) -> list[Path]:
    """Files at their final names under folds/, runs/, submissions/ (not temp files, locks, image caches
    or the image lists behind records: hidden names; nor the stage logs)."""
    out = []
    for top in OUTPUTS:
        for p in sorted((root / top).rglob("*")) if (root / top).exists() else []:
            rel = p.relative_to(root)
            if p.is_file() and not any(part.startswith(".") for part in rel.parts) and "logs" not in rel.parts:
                out.append(p)
    return out


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): file_digest(p) for p in output_files(root) if p.suffix not in NOT_COMPARED}


def partial_files(root: Path) -> list[str]:
    """Outputs at their final names that do not load completely, and summaries whose outputs are missing."""
    bad = []
    for p in output_files(root):
        try:
            file_digest(p)
        except Exception:  # noqa: BLE001 - any failure to load is what we are counting
            bad.append(str(p.relative_to(root)))
    for name in layout.experiments(root / layout.RUNS):
        run = layout.RunDir.of(name, root / layout.RUNS)
        for fd in (run.fold(int(d.name[4:])) for d in run.dir.glob("fold*")):
            if fd.summary.exists():
                bad += [str(f) for f in (fd.weights, fd.oof) if not f.exists()]
        if run.infer_summary.exists():
            store = read_json(run.infer_summary).get("store") or {}
            need = {(e["features"], "test") for es in store.get("test", {}).values() for e in es}
            need |= {(e["features"], e["fold"]) for es in store.get("oof", {}).values() for e in es}
            bad += [str(p) for p in (run.infer_features(b, part) for b, part in sorted(need, key=str))
                    if not p.exists()]
    return bad


def all_files(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and ".cache" not in p.parts and "logs" not in p.relative_to(root).parts}


# ----------------------------------------------------------------------------- running the CLI
class Sandbox:
    """A tiny competition, an uninterrupted reference run and a snapshot of it after every stage."""

    def __init__(self, base: Path, entry: Callable[[list[str]], int], log: Callable[[str], None] = print):
        # entry: the CLI's main(argv), handed in by the CLI (a tool does not import the CLI)
        self.base, self.entry, self.log = Path(base), entry, log
        self.snap: dict[str, Path] = {}
        self.ref: dict[str, dict[str, str]] = {}
        start = self.base / "snap-empty"
        synthetic_competition(start / "comp", {"a": 10, "b": 8, "c": 6}, size=16, n_test=6)
        (start / "c.yaml").write_text(CONFIG)
        self.snap["empty"] = start
        work = self.copy("empty", "reference")
        for stage in STAGES:  # in this process: a process start (torch + timm imports) is ~9 s on 2 cores
            r = cli_inprocess(self, work, [stage])
            if r.returncode != 0:
                raise RuntimeError(f"the reference run failed at {stage}:\n{r.stderr[-3000:]}")
            self.snap[stage] = self.base / f"snap-{stage}"
            shutil.copytree(work, self.snap[stage], symlinks=True)
            self.ref[stage] = tree_digest(work)
            self.log(f"reference run: {stage} done")

    def copy(self, snapshot: str, name: str) -> Path:
        dst = self.base / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(self.snap[snapshot], dst, symlinks=True)
        return dst

    def cli(self, cwd: Path, args: list[str], fault: str | None = None, fsize: int | None = None,
            wait: bool = True, timeout: int = 300):
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("PIPELINE_FAULT", None)
        if fault:
            env["PIPELINE_FAULT"] = fault
        cmd = [sys.executable, "-m", "pipeline", *args, "--config", "c.yaml"]

        def limit():  # a file-size limit: writes past it fail with EFBIG, like a full disk
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        pre = limit if fsize else None
        if not wait:
            return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, preexec_fn=pre)
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=pre)


def inprocess(entry: Callable[[list[str]], int], folder: Path, argv: list[str], env: dict | None = None,
              level: int = logging.INFO) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGV` run in this process from `folder`: exit code, stdout and stderr (the log lines
    from `level` up included) captured as a subprocess's would be. Kills and resource limits need a real process
    (`Sandbox.cli`); a plain run or a rerun does not, and saves a process start (torch and timm imports:
    ~9 s on 2 cores)."""
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("pipeline")
    old_cwd, old_env, old = os.getcwd(), dict(os.environ), (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    os.chdir(folder)
    os.environ.pop("PIPELINE_FAULT", None)
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = entry(list(argv))
            except Exception:  # as a subprocess would: exit 1 with the traceback on stderr
                import traceback

                traceback.print_exc()
                rc = 1
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
        logger.removeHandler(handler)
        logger.setLevel(old[0])
        logger.propagate = old[1]
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


def cli_inprocess(sb: Sandbox, folder: Path, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return inprocess(sb.entry, folder, [*args, "--config", "c.yaml"], env)


NO_CONFIG = ("weights",)


def run_inprocess(sb: Sandbox, folder: Path, args: list[str], env: dict | None = None) -> tuple[int, str]:
    """`python -m pipeline ARGS --config c.yaml` in this process, quiet: (exit code, stderr: the errors only). The
    commands that read no config (weights) go without it."""
    config = [] if args[0] in NO_CONFIG else ["--config", "c.yaml"]
    r = inprocess(sb.entry, folder, [*args, *config], env, level=logging.ERROR)
    return r.returncode, r.stderr


# ----------------------------------------------------------------------------- kills
def kill_case(sb: Sandbox, stage: str, point: str) -> Result:
    i = STAGES.index(stage)
    before = "empty" if i == 0 else STAGES[i - 1]
    d = sb.copy(before, f"kill-{stage}-{re.sub(r'[^a-z0-9]+', '-', point)}")
    upstream = sb.ref.get(before, {})
    r = sb.cli(d, [stage], fault=point)
    notes, ok = [], True
    if r.returncode != -signal.SIGKILL:
        return Result("kill", f"{stage} @ {point}", "killed, rerun equal", f"not killed (exit {r.returncode})",
                      False, kill=True)
    partial = partial_files(d)
    now = tree_digest(d)
    lost = sum(1 for f, h in upstream.items() if now.get(f) != h)
    notes.append(f"{len(partial)} partial")
    ok &= not partial and not lost
    if i + 1 < len(STAGES):
        snapshot = tree_digest(d)
        rc, err = run_inprocess(sb, d, [STAGES[i + 1]])
        refused = rc == 2 and tree_digest(d) == snapshot
        notes.append(f"{STAGES[i + 1]} refused (exit {rc})" if refused else f"{STAGES[i + 1]} exit {rc}: {err[-200:]}")
        ok &= refused
    r2 = cli_inprocess(sb, d, [stage])  # the killed process's files, rerun (no kill needed: in this process)
    final = tree_digest(d)
    diff = sorted(f for f in set(final) | set(sb.ref[stage]) if final.get(f) != sb.ref[stage].get(f))
    lost += sum(1 for f in sb.ref[stage] if f not in final)
    ok &= r2.returncode == 0 and not diff
    notes.append(f"rerun exit {r2.returncode}, " + ("equal to uninterrupted" if not diff else
                                                    f"{len(diff)} differ: {', '.join(diff[:3])}"))
    shutil.rmtree(d, ignore_errors=True)
    return Result("kill", f"{stage} @ {point}", "killed; no partial file; rerun equal", "; ".join(notes), ok,
                  kill=True, lost=lost)


# ----------------------------------------------------------------------------- bad input
def _edit_csv(path: Path, fn) -> None:
    t = pd.read_csv(path, dtype=str, keep_default_na=False)
    fn(t).to_csv(path, index=False)


def _yaml(text: str, others: dict | None = None):
    def setup(d: Path) -> None:
        (d / "c.yaml").write_text(text)
        for name, body in (others or {}).items():
            (d / name).write_text(body)
    return setup


def _relabel_rare(t):
    t.loc[t["label"] == "c", "label"] = ["c"] + ["b"] * (int((t["label"] == "c").sum()) - 1)
    return t


def _truncated_jpeg(d: Path) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="JPEG")
    (d / "comp/train/img0003.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _symlink_out(d: Path) -> None:
    outside = d / "outside.png"
    shutil.copy(d / "comp/train/img0001.png", outside)
    (d / "comp/train/img0001.png").unlink()
    (d / "comp/train/img0001.png").symlink_to(outside.resolve())


def _run(d: Path, name: str = "sc") -> layout.RunDir:
    """The sandbox's experiment folder."""
    return layout.RunDir.of(name, d / layout.RUNS)


def _member_copy(d: Path, name: str, edit) -> None:
    run = _run(d, name)
    shutil.copytree(_run(d).dir, run.dir)
    s = read_json(run.infer_summary)
    edit(s)
    run.infer_summary.write_text(json.dumps(s))


def _evil(d: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'PWNED'}",))
    (d / "evil.pth").write_bytes(pickle.dumps({"state_dict": Evil()}))


def _replace_image(d: Path, rel: str) -> None:
    """Another picture under the same name (a later mtime, other bytes)."""
    from PIL import Image

    p = d / rel
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(p)
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _same_file_twice(t):
    t.loc[1, "image_id"] = t.loc[0, "image_id"] + ".png"
    return t


def _cut(rel: str, keep: float):
    def f(d: Path) -> None:
        b = (d / rel).read_bytes()
        (d / rel).write_bytes(b[: int(len(b) * keep)])
    return f


def _bytes(rel: str, data: bytes):
    return lambda d: (d / rel).write_bytes(data)


def _folder_instead(rel: str):
    def f(d: Path) -> None:
        (d / rel).unlink()
        (d / rel).mkdir()
    return f


def _weights(name: str, damage):
    """A local pretrained-weights file, then damaged."""
    def f(d: Path) -> None:
        from safetensors.numpy import save_file

        save_file({"w": np.zeros((64, 64), np.float32)}, str(d / name))
        damage(d)
    return f


def _feats(backbone: str, part) -> Callable[[Path], Path]:
    """Where the sandbox's stage 4 keeps a backbone's features of a part."""
    return lambda d: _run(d).infer_features(backbone, part)


def _swap(a, b):
    def f(d: Path) -> None:
        x, y = a(d), b(d)
        t = x.with_name(x.name + ".swap")
        x.rename(t)
        y.rename(x)
        t.rename(y)
    return f


def _feature_edit(where, edit):
    """A stage-4 feature file rewritten as np.save would (`edit` maps its array to the damaged one)."""
    def f(d: Path) -> None:
        x = np.load(where(d))
        np.save(where(d), edit(x.copy()))
    return f


def _feature_cut(where, keep: float):
    def f(d: Path) -> None:
        b = where(d).read_bytes()
        where(d).write_bytes(b[: int(len(b) * keep)])
    return f


def _proba_submission(d: Path) -> None:
    """sample_submission.csv with one probability column per class (ensemble.submission=proba)."""
    _edit_csv(d / "comp/sample_submission.csv", lambda t: t[["image_id"]].assign(a=0.0, b=0.0, c=0.0))


def _nan_row(x: np.ndarray) -> np.ndarray:
    x[0, x.shape[1] // 2] = np.nan
    return x


def _coco(edit=None, names: dict | None = None):
    """comp/train.json: the csv competition as COCO (ids 1.., categories 1.. named by `names`), then `edit`ed."""
    def f(d: Path) -> None:
        t = pd.read_csv(d / "comp/train.csv", dtype=str, keep_default_na=False)
        cats = {c: i + 1 for i, c in enumerate(sorted(t["label"].unique()))}
        data = {"images": [{"id": i + 1, "file_name": f"train/{r.image_id}.png"} for i, r in t.iterrows()],
                "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": cats[r.label]} for i, r in t.iterrows()],
                "categories": [{"id": v, "name": (names or {}).get(k, k)} for k, v in cats.items()]}
        if edit:
            edit(data)
        (d / "comp/train.json").write_text(json.dumps(data))
    return f


COCO = ["data.layout=coco", "data.train_json=train.json"]
GARBAGE = np.random.default_rng(0).bytes(4096)
HUGE_CELL = "x" * 5_000_000
BASE = CONFIG
# (group, case, snapshot to start from, setup, command + overrides, expected message pattern)
BAD_INPUTS = [
    ("config", "unknown key", "empty", None, ["folds", "train.epoch=3"], r"unknown config key 'train.epoch'.*did you mean 'epochs'"),
    ("config", "wrong type", "empty", None, ["folds", "train.epochs=many"], r"'train.epochs'.*expected an integer, got 'many'"),
    ("config", "out-of-range value", "empty", None, ["folds", "train.lr=-1"], r"'train.lr'.*must be > 0"),
    ("config", "missing base file", "empty", _yaml("base: nope.yaml\n" + BASE), ["folds"], r"nope.yaml"),
    ("config", "base cycle", "empty", lambda d: ((d / "c.yaml").write_text("base: b.yaml\n" + BASE),
                                                 (d / "b.yaml").write_text("base: c.yaml\n")), ["folds"], r"cycle"),
    ("config", "malformed YAML", "empty", _yaml(BASE + "train: [1, 2\n"), ["folds"], r"c.yaml"),
    ("config", "augmentation policy timm cannot read", "empty", None, ["folds", "aug.policy=rand-q9"],
     r"'aug.policy'.*timm cannot read"),
    ("config", "deferred re-weighting over class weights", "empty", None,
     ["folds", "train.drw_epoch=1", "train.class_weights=effective_number"], r"'train.drw_epoch'"),
    ("config", "a teacher that is the experiment itself", "empty", None, ["folds", "train.distill.teacher=sc"],
     r"'train.distill.teacher'.*itself"),
    ("data", "a teacher that was never run", "folds", None, ["train", "train.pseudo.teacher=nobody"],
     r"teacher 'nobody'.*run ./run.sh all for it first"),
    ("data", "missing train.csv", "empty", lambda d: (d / "comp/train.csv").unlink(), ["folds"], r"train.csv"),
    ("data", "missing id column", "empty", lambda d: _edit_csv(d / "comp/train.csv", lambda t: t.rename(columns={"image_id": "x"})),
     ["folds"], r"train.csv.*image_id"),
    ("data", "missing label column", "empty", lambda d: _edit_csv(d / "comp/train.csv", lambda t: t.drop(columns="label")),
     ["folds"], r"train.csv.*label"),
    ("data", "duplicate ids", "empty", lambda d: _edit_csv(d / "comp/train.csv", lambda t: pd.concat([t, t.iloc[:1]])),
     ["folds"], r"train.csv.*duplicate.*img0000"),
    ("data", "NaN label", "empty", lambda d: _edit_csv(d / "comp/train.csv", lambda t: t.assign(label=["" if i == 2 else v for i, v in enumerate(t["label"])])),
     ["folds"], r"train.csv.*empty value in column 'label' at row"),
    ("data", "image file missing", "empty", lambda d: (d / "comp/train/img0005.png").unlink(), ["folds"], r"img0005"),
    ("data", "corrupt image (truncated JPEG)", "empty", _truncated_jpeg, ["folds"], r"img0003"),
    ("data", "zero-byte image", "empty", lambda d: (d / "comp/train/img0004.png").write_bytes(b""), ["folds"], r"img0004"),
    ("data", "id with ../", "empty", lambda d: _edit_csv(d / "comp/train.csv", lambda t: t.assign(image_id=["../x"] + list(t["image_id"][1:]))),
     ["folds"], r"\.\./x"),
    ("data", "absolute-path id", "empty", lambda d: _edit_csv(d / "comp/train.csv", lambda t: t.assign(image_id=["/etc/hostname"] + list(t["image_id"][1:]))),
     ["folds"], r"/etc/hostname"),
    ("data", "symlink leaving the data folder", "empty", _symlink_out, ["folds"], r"img0001"),
    ("data", "decompression bomb (90 MP header)", "empty",
     lambda d: __import__("PIL.Image").Image.new("1", (10000, 9000)).save(d / "comp/train/img0002.png"), ["folds"],
     r"decompression bombs.*img0002"),
    ("data", "multi-label target", "empty",
     lambda d: _edit_csv(d / "comp/train.csv", lambda t: t.assign(label=["a b"] + list(t["label"][1:]))), ["folds"],
     r"column 'label' looks multi-label.*'a b'"),
    ("data", "non-integer numeric target", "empty",
     lambda d: _edit_csv(d / "comp/train.csv", lambda t: t.assign(label=[f"{i / 3:.2f}" for i in range(len(t))])),
     ["folds"], r"column 'label' holds non-integer numbers"),
    ("data", "class with fewer images than folds", "empty", lambda d: _edit_csv(d / "comp/train.csv", _relabel_rare),
     ["folds"], r"fewer images than folds.*c \(1\)"),
    ("data", "single class", "empty", lambda d: _edit_csv(d / "comp/train.csv", lambda t: t.assign(label="a")),
     ["folds"], r"1 class"),
    ("data", "test folder empty", "rebalance", lambda d: [p.unlink() for p in (d / "comp/test").iterdir()], ["infer"],
     r"test"),
    ("data", "sample_submission id not in the test folder", "rebalance",
     lambda d: _edit_csv(d / "comp/sample_submission.csv", lambda t: pd.concat([t, pd.DataFrame({"image_id": ["zzz"], "label": ["a"]})])),
     ["infer"], r"sample_submission.csv.*zzz"),
    ("data", "sample_submission with unknown columns", "infer",
     lambda d: _edit_csv(d / "comp/sample_submission.csv", lambda t: t.assign(extra="1")), ["ensemble"],
     r"sample_submission.csv.*columns"),
    # the plan (tools/plan.py): refused by `all` before stage 1 writes anything, every problem named
    ("plan", "sample_submission with a header and no rows (all)", "empty",
     _bytes("comp/sample_submission.csv", b"image_id,label\n"), ["all"], r"nothing was written.*no test images"),
    ("plan", "sample_submission ids without images (all)", "empty",
     lambda d: _edit_csv(d / "comp/sample_submission.csv", lambda t: t.assign(image_id=[f"q{i}" for i in range(len(t))])),
     ["all"], r"nothing was written.*have no image"),
    ("plan", "ensemble member that does not exist (all)", "empty", None, ["all", "ensemble.members=[sc,sc2]"],
     r"ensemble.members: 'sc2' is neither.*did you mean 'sc'"),
    ("plan", "unknown model.arch (folds)", "empty", None, ["folds", "model.arch=resnet10tt"],
     r"unknown timm model 'resnet10tt'"),
    ("plan", "run_also config with a typo'd key (all)", "empty", _yaml(BASE + "run_also: [b.yaml]\n", {"b.yaml": "experiment: sb\nmodle: {arch: x}\n"}),
     ["all"], r"run_also 'b.yaml'.*unknown config key 'modle'"),
    ("artifacts", "infer before train", "folds", None, ["infer"], r"has not been trained"),
    ("artifacts", "rebalance before train", "folds", None, ["rebalance"], r"no finished stage-2 output"),
    ("artifacts", "stage-2 weights of another architecture", "rebalance", None, ["infer", "model.arch=resnet10t"],
     r"trained as test_resnet.*config says resnet10t"),
    ("artifacts", "stage-2 weights of another class count", "rebalance",
     lambda d: _run(d).classes.write_text('["a", "b"]'), ["infer", "infer.oof=off"], r"3 classes.*2 classes"),
    ("artifacts", "ensemble members on different folds", "infer",
     lambda d: _member_copy(d, "sc2", lambda s: s.update(folds_file="0" * 64)), ["ensemble", "ensemble.members=[sc,sc2]"],
     r"different folds files"),
    ("artifacts", "ensemble members with different label encodings", "infer",
     lambda d: _member_copy(d, "sc3", lambda s: s.update(classes=s["classes"][::-1])), ["ensemble", "ensemble.members=[sc,sc3]"],
     r"different label encodings"),
    ("artifacts", "weights file that is a malicious pickle", "folds", _evil, ["train", "model.pretrained_path=evil.pth"],
     r"evil.pth: not a checkpoint this pipeline reads"),
    # reliability, second pass
    ("config", "duplicate YAML key", "empty", _yaml(BASE + "folds: {n_splits: 3}\n"), ["folds"],
     r"c.yaml.*duplicate key 'folds' on lines 3 and 9"),
    ("config", "ensemble name escaping the project", "infer", None, ["ensemble", "ensemble.name=../../escaped"],
     r"'ensemble.name'.*not a plain name"),
    ("config", "folds name escaping the project", "empty", None, ["folds", "folds.name=../../x"],
     r"'folds.name'.*not a plain name"),
    ("config", "TTA scale 0.01", "rebalance", None, ["infer", "infer.scales=[0.01]"], r"'infer.scales'.*must be >= 0.25"),
    ("config", "inner folds above the held-out class sizes", "train", None, ["rebalance", "rebalance.inner_folds=20"],
     r"'rebalance.inner_folds' \(20\): fold 0 holds out"),
    ("data", "two ids naming one file (img0000, img0000.png)", "empty",
     lambda d: _edit_csv(d / "comp/train.csv", _same_file_twice), ["folds"], r"same image file.*'img0000.png'"),
    ("data", "test image missing from the sample submission", "rebalance",
     lambda d: shutil.copy(d / "comp/test/t000.png", d / "comp/test/extra.png"), ["infer"],
     r"not in the sample submission.*extra.png"),
    ("data", "image removed after stage 1 (cache on)", "folds", lambda d: (d / "comp/train/img0005.png").unlink(),
     ["train", "aug.cache=on"], r"image file\(s\) missing: \S*img0005.png"),  # the plan, before any stage
    # fuzz: every external input truncated, empty, of the wrong kind and oversized
    ("fuzz", "train.csv truncated mid-row", "empty", _cut("comp/train.csv", 0.55), ["folds"], r"train.csv"),
    ("fuzz", "train.csv empty", "empty", _bytes("comp/train.csv", b""), ["folds"], r"train.csv"),
    ("fuzz", "train.csv random bytes", "empty", _bytes("comp/train.csv", GARBAGE), ["folds"], r"train.csv"),
    ("fuzz", "train.csv is a folder", "empty", _folder_instead("comp/train.csv"), ["folds"], r"train.csv"),
    ("fuzz", "train.csv with a 5 MB id", "empty",
     lambda d: _edit_csv(d / "comp/train.csv", lambda t: t.assign(image_id=[HUGE_CELL] + list(t["image_id"][1:]))),
     ["folds"], r"train.csv.*cannot be file names"),
    ("fuzz", "sample_submission.csv truncated", "rebalance", _cut("comp/sample_submission.csv", 0.5), ["infer"],
     r"sample_submission.csv"),
    ("fuzz", "sample_submission.csv empty", "rebalance", _bytes("comp/sample_submission.csv", b""), ["infer"],
     r"sample_submission.csv"),
    ("fuzz", "sample_submission.csv random bytes", "rebalance", _bytes("comp/sample_submission.csv", GARBAGE),
     ["infer"], r"sample_submission.csv"),
    ("fuzz", "sample_submission.csv with a 5 MB id", "rebalance",
     lambda d: _edit_csv(d / "comp/sample_submission.csv", lambda t: t.assign(image_id=[HUGE_CELL] + list(t["image_id"][1:]))),
     ["infer"], r"sample_submission.csv.*cannot be file names"),
    ("fuzz", "config truncated", "empty", _cut("c.yaml", 0.1), ["folds"], r"c.yaml"),
    ("fuzz", "config empty", "empty", _bytes("c.yaml", b""), ["folds"], r"c.yaml is empty"),
    ("fuzz", "config random bytes", "empty", _bytes("c.yaml", GARBAGE), ["folds"], r"c.yaml"),
    ("fuzz", "config of 2 MB", "empty", _bytes("c.yaml", (BASE + "#" * 2_000_000 + "\n").encode()), ["folds"],
     r"c.yaml is 2.0 MB"),
    ("fuzz", "image that is a text file", "empty", _bytes("comp/train/img0006.png", b"not an image\n" * 10), ["folds"],
     r"unreadable.*img0006"),
    ("fuzz", "pretrained weights truncated", "folds", _weights("w.safetensors", _cut("w.safetensors", 0.5)),
     ["train", "model.pretrained_path=w.safetensors"], r"w.safetensors"),
    ("fuzz", "pretrained weights empty", "folds", _weights("w.safetensors", _bytes("w.safetensors", b"")),
     ["train", "model.pretrained_path=w.safetensors"], r"w.safetensors"),
    ("fuzz", "pretrained weights random bytes (.pth)", "folds", _bytes("w.pth", GARBAGE),
     ["train", "model.pretrained_path=w.pth"], r"w.pth"),
    ("fuzz", "pretrained weights of another model", "folds", _weights("w.safetensors", lambda d: None),
     ["train", "model.pretrained_path=w.safetensors"], r"w.safetensors.*does not match"),
    # reliability, third pass
    ("data", "COCO train JSON with no images", "empty", _coco(lambda j: j.update(images=[])), ["folds", *COCO],
     r"train.json: its 'images' list is empty"),
    ("data", "COCO annotation with category_id null", "empty",
     _coco(lambda j: j["annotations"][3].update(category_id=None)), ["folds", *COCO],
     r"train.json: 1 annotation.*annotations\[3\] \(category_id: null\)"),
    ("data", "top-k submission of class names with spaces", "empty", _coco(names={"a": "Danaus plexippus"}),
     ["folds", *COCO, "data.category_label=name", "ensemble.submission=topk", "ensemble.top_k=2"],
     r"'Danaus plexippus'.*data.category_label=id"),
    ("config", "top-k metric whose k covers every class", "empty", None,
     ["folds", "eval.metric=top_k_accuracy", "eval.top_k=3"], r"eval.top_k 3 with 3 classes"),
    ("config", "three problems in one config, all named", "empty", None,
     ["folds", "eval.metric=acuracy", "ensemble.method=avg", "train.epocs=3"],
     r"'eval.metric'.*'ensemble.method'.*'train.epocs'"),
    ("fuzz", "pretrained weights empty (.pth)", "folds", _bytes("w.pth", b""),
     ["train", "model.pretrained_path=w.pth"], r"w.pth: the file is empty"),
    ("fuzz", "weights import of an empty .pth", "empty", _bytes("w.pth", b""),
     ["weights", "import", "w.pth", "--arch", "test_resnet", "--out", "x.safetensors"], r"w.pth: the file is empty"),
    ("fuzz", "weights import of random bytes (.pth)", "empty", _bytes("w.pth", GARBAGE),
     ["weights", "import", "w.pth", "--arch", "test_resnet", "--out", "x.safetensors"],
     r"w.pth: not a checkpoint(?!.*weights_only=False)"),
    # reliability, fourth pass: stage 4's stored features are inputs like any head file (#45)
    ("stored", "test features of two folds swapped", "infer",
     _swap(_feats("fold0", "test"), _feats("fold1", "test")), ["ensemble", "--force"],
     r"features/fold[01]/test.npy is not the file stage 4 wrote.*./run.sh infer --force"),
    ("stored", "held-out features of two folds swapped", "infer",
     _swap(_feats("fold0", 0), _feats("fold1", 1)), ["ensemble", "--force"],
     r"features/fold[01]/held[01].npy .*(not the file stage 4 wrote|bytes).*./run.sh infer --force"),
    ("stored", "test features holding twice the rows", "infer",
     _feature_edit(_feats("fold0", "test"), lambda x: np.concatenate([x, x], axis=1)), ["ensemble", "--force"],
     r"features/fold0/test.npy has \d+ bytes, stage 4 wrote \d+"),
    ("stored", "test features with too few rows", "infer",
     _feature_edit(_feats("fold0", "test"), lambda x: x[:, :-2]), ["ensemble", "--force"],
     r"features/fold0/test.npy has \d+ bytes"),
    ("stored", "test features truncated", "infer", _feature_cut(_feats("fold1", "test"), 0.6), ["ensemble", "--force"],
     r"features/fold1/test.npy has \d+ bytes.*truncated"),
    ("stored", "NaN row in test features (label submission)", "infer",
     _feature_edit(_feats("fold0", "test"), _nan_row), ["ensemble", "--force"],
     r"features/fold0/test.npy is not the file stage 4 wrote"),
    ("stored", "NaN row in test features (probabilities)", "infer",
     lambda d: (_proba_submission(d), _feature_edit(_feats("fold1", "test"), _nan_row)(d)),
     ["ensemble", "--force", "ensemble.submission=proba"],
     r"features/fold1/test.npy is not the file stage 4 wrote"),
    ("stored", "NaN row in held-out features", "infer",
     _feature_edit(_feats("fold0", 0), _nan_row), ["ensemble", "--force"],
     r"features/fold0/held0.npy is not the file stage 4 wrote"),
    ("stored", "rows digests of a feature file deleted", "infer",
     lambda d: layout.RunDir.feature_digests(_feats("fold0", "test")(d)).unlink(), ["ensemble", "--force"],
     r"test.digest.npy .*missing or changed"),
    ("stored", "stage-4 rows.npz replaced", "infer",
     lambda d: _run(d).infer_rows.write_bytes(GARBAGE), ["ensemble", "--force"],
     r"infer/rows.npz is missing or changed since stage 4 wrote it"),
]


BAD_GROUPS = ("config", "data", "artifacts", "fuzz", "stored")


def bad_input_case(sb: Sandbox, group: str, case: str, snapshot: str, setup, args: list[str], pattern: str) -> Result:
    d = sb.copy(snapshot, "bad-" + re.sub(r"[^a-z0-9]+", "-", case.lower()))
    if setup:
        setup(d)
    before = all_files(d)
    rc, err = run_inprocess(sb, d, args)
    after = all_files(d)
    changed = sorted(f for f in set(before) | set(after) if before.get(f) != after.get(f))
    message = next((ln for ln in err.splitlines() if ln.startswith("error:")), err.strip()[-200:])
    named = re.search(pattern, err, re.S) is not None
    ok = rc == 2 and named and not changed and not (d / "PWNED").exists()
    observed = f"exit {rc}; {message[:150]}" + (f"; WROTE {changed[:3]}" if changed else "") + \
        ("; PICKLE EXECUTED" if (d / "PWNED").exists() else "")
    shutil.rmtree(d, ignore_errors=True)
    return Result(group, case, "exit 2, names it, writes nothing", observed, ok)


# ----------------------------------------------------------------------------- training and storage
def non_finite_case(sb: Sandbox) -> Result:
    d = sb.copy("folds", "nan-loss")
    rc, err = run_inprocess(sb, d, ["train", "--fold", "0"], env={"PIPELINE_FAULT": "nan-loss:1"})
    import torch

    ckpt = _run(d).fold(0).checkpoint
    kept = ckpt.exists() and torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] == 0
    named = re.search(r"non-finite loss at epoch 2, step \d+", err) is not None
    done = _run(d).fold(0).summary.exists()
    ok = rc == 2 and named and kept and not done
    shutil.rmtree(d, ignore_errors=True)
    return Result("training", "non-finite loss (epoch 2)", "exit 2 naming epoch/step; epoch-1 checkpoint kept",
                  f"exit {rc}; {'named' if named else err[-150:]}; checkpoint {'kept' if kept else 'LOST'}; "
                  f"fold {'marked complete!' if done else 'not marked complete'}", ok, lost=0 if kept else 1)


def oom_case(sb: Sandbox) -> Result:
    d = sb.copy("folds", "oom")
    rc, err = run_inprocess(sb, d, ["train"], env={"PIPELINE_FAULT": "oom@train:step:0"})
    ok = rc == 3 and all(k in err for k in ("train.batch_size", "train.accum_steps", "aug.img_size"))
    shutil.rmtree(d, ignore_errors=True)
    return Result("training", "GPU out of memory (simulated)", "exit 3 with batch/size/accumulation advice",
                  f"exit {rc}; {err.strip().splitlines()[0][:120] if err.strip() else ''}", ok)


def disk_full_case(sb: Sandbox) -> Result:
    d = sb.copy("folds", "disk-full")
    r = sb.cli(d, ["train"], fsize=64 * 1024)
    lost = sum(1 for f, h in sb.ref["folds"].items() if tree_digest(d).get(f) != h)
    partial = partial_files(d)
    clear = r.returncode == 2 and re.search(r"error: cannot write runs/sc/", r.stderr) is not None
    r2 = cli_inprocess(sb, d, ["train"])
    final = tree_digest(d)
    equal = r2.returncode == 0 and final == sb.ref["train"]
    shutil.rmtree(d, ignore_errors=True)
    msg = next((ln for ln in r.stderr.splitlines() if ln.startswith("error:")), r.stderr[-150:])
    return Result("storage", "disk full while training (64 KiB file limit)",
                  "exit 2 'cannot write'; earlier outputs intact; rerun equal",
                  f"exit {r.returncode}; {msg[:110]}; {len(partial)} partial; rerun "
                  f"{'equal' if equal else 'DIFFERS'}", clear and not partial and not lost and equal, lost=lost)


def unwritable_case(sb: Sandbox) -> Result:
    d = sb.copy("folds", "unwritable")
    shutil.rmtree(d / layout.RUNS, ignore_errors=True)  # stage 1 left only its log there
    if os.geteuid() == 0:  # root ignores permissions: block the folder with a file instead
        (d / layout.RUNS).write_text("not a folder")
        how = f"{layout.RUNS}/ is a file (root ignores permissions)"
    else:
        (d / layout.RUNS).mkdir()
        os.chmod(d / layout.RUNS, 0o555)
        how = f"{layout.RUNS}/ read-only"
    rc, err = run_inprocess(sb, d, ["train"])
    lost = sum(1 for f, h in sb.ref["folds"].items() if tree_digest(d).get(f) != h)
    if (d / layout.RUNS).is_dir():
        os.chmod(d / layout.RUNS, 0o755)
    ok = rc == 2 and "cannot" in err and "runs" in err and not lost
    shutil.rmtree(d, ignore_errors=True)
    return Result("storage", f"unwritable output folder ({how})", "exit 2 naming the folder; earlier outputs intact",
                  f"exit {rc}; {err.strip().splitlines()[0][:120] if err.strip() else ''}", ok, lost=lost)


def stale_pixels_case(sb: Sandbox) -> Result:
    """A test image replaced under its name after `all`: status names it, stage 4 and 5 re-run, 1-3 stay."""
    d = sb.copy("ensemble", "stale-pixels")
    _replace_image(d, "comp/test/t001.png")
    st = cli_inprocess(sb, d, ["status"])
    lines = {ln.split()[1]: ln for ln in st.stdout.splitlines() if ln.startswith("  ")}
    named = "t001.png" in lines.get("infer", "") and all("up to date" in lines.get(s, "") for s in STAGES[:3])
    r = cli_inprocess(sb, d, ["all"])
    ran = re.findall(r"stage \d \((\w+)\) of 'sc' is stale", r.stderr)
    ok = st.returncode == 0 and named and r.returncode == 0 and ran == ["infer", "ensemble"]
    shutil.rmtree(d, ignore_errors=True)
    return Result("staleness", "test image replaced under the same name after `all`",
                  "status names the file in stage 4; `all` re-runs stages 4-5 only",
                  f"status {'names t001.png' if named else 'DOES NOT NAME IT: ' + str(lines)[:120]}; all re-ran {ran}", ok)


def test_side_case(sb: Sandbox) -> Result:
    """A new sample submission path (same content) must not make stage-2 weights stale."""
    d = sb.copy("ensemble", "test-side")
    shutil.copy(d / "comp/sample_submission.csv", d / "comp/sample_copy.csv")
    st = cli_inprocess(sb, d, ["status", "data.sample_submission=sample_copy.csv"])
    lines = {ln.split()[1]: ln for ln in st.stdout.splitlines() if ln.startswith("  ")}
    ok = st.returncode == 0 and all("up to date" in lines.get(s, "") for s in STAGES[:4])
    shutil.rmtree(d, ignore_errors=True)
    return Result("staleness", "only data.sample_submission changed (same ids)", "stages 1-4 stay up to date",
                  "; ".join(f"{s}: {lines.get(s, '?').split(None, 2)[-1][:40]}" for s in STAGES[:4]), ok)


def lock_case(sb: Sandbox) -> Result:
    d = sb.copy("folds", "lock")
    first = sb.cli(d, ["train", "train.epochs=200"], wait=False)
    lock = _run(d).fold(0).dir / ".lock"
    t0 = time.time()
    while not lock.exists() and time.time() - t0 < 120 and first.poll() is None:
        time.sleep(0.1)
    rc, err = run_inprocess(sb, d, ["train", "train.epochs=200"])
    named = f"held by pid {first.pid}" in err
    first.send_signal(signal.SIGKILL)
    first.wait()
    r2 = cli_inprocess(sb, d, ["train", "--fold", "1", "train.epochs=1"])  # a killed holder's lock is taken over
    took_over = r2.returncode == 0
    r3 = cli_inprocess(sb, d, ["train", "--fold", "0", "train.epochs=1"])
    shutil.rmtree(d, ignore_errors=True)
    ok = rc == 2 and named and took_over and r3.returncode == 0
    return Result("storage", "two runs of one experiment at once", "second refuses naming the holder's pid; "
                  "after the holder is killed its lock is taken over",
                  f"second: exit {rc}, {'names pid ' + str(first.pid) if named else err[-120:]}; after SIGKILL: "
                  f"exit {r2.returncode}/{r3.returncode}", ok, kill=True)


# ----------------------------------------------------------------------------- the matrix
def run_matrix(base: Path, entry: Callable[[list[str]], int], quick: bool = False,
               log: Callable[[str], None] = print) -> list[Result]:
    sb = Sandbox(base, entry, log)
    results = []

    n_cases = sum(map(len, (QUICK_KILLS if quick else KILLS).values())) + len(BAD_INPUTS) + 7
    bar = Progress(n_cases, "selfcheck", "case")

    def add(r: Result) -> None:
        results.append(r)
        bar.update()
        log(f"[{'pass' if r.passed else 'FAIL'}] {len(results)}/{n_cases} {r.group}: {r.case} -- {r.observed}")
    for stage, points in (QUICK_KILLS if quick else KILLS).items():
        for point in points:
            add(kill_case(sb, stage, point))
    for case in BAD_INPUTS:
        add(bad_input_case(sb, *case))
    for fn in (non_finite_case, oom_case, disk_full_case, unwritable_case, lock_case, stale_pixels_case,
               test_side_case):
        add(fn(sb))
    bar.close()
    return results


def table(results: list[Result]) -> str:
    t = pd.DataFrame([{"group": r.group, "case": r.case, "expected": r.expected, "observed": r.observed,
                       "pass": "yes" if r.passed else "NO"} for r in results])
    kills = [r for r in results if r.kill]
    bad = [r for r in results if r.group in BAD_GROUPS]
    lines = ["| group | case | expected | observed | pass |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d.replace('|', '/')} | {e} |" for a, b, c, d, e in t.values]
    lines += ["", f"kills survived: {sum(r.passed for r in kills)}/{len(kills)}; "
                  f"bad inputs rejected cleanly: {sum(r.passed for r in bad)}/{len(bad)}; "
                  f"other cases passed: {sum(r.passed for r in results if r not in kills and r not in bad)}/"
                  f"{len([r for r in results if r not in kills and r not in bad])}; "
                  f"files lost: {sum(r.lost for r in results)}"]
    return "\n".join(lines)


def main(argv: list[str], entry: Callable[[list[str]], int]) -> int:
    """`./run.sh selfcheck [--quick]`; `entry` is the CLI's main, which the bad-input cases call."""
    quick = "--quick" in argv
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="selfcheck-") as tmp:
        results = run_matrix(Path(tmp), entry, quick=quick, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(table(results))
    print(f"\n{len(results)} cases in {time.time() - t0:.0f}s on {os.cpu_count()} CPU core(s)")
    return 0 if all(r.passed for r in results) else 1
