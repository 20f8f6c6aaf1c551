"""Shared test helpers: a tiny generated competition in a temporary working folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.tools.demo import synthetic_competition as make_competition  # noqa: F401  (used by the tests)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh folder: folds/, runs/ and submissions/ land there, not in the repo."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` in a subprocess, as run.sh does."""
    e = dict(os.environ, PYTHONPATH=str(REPO))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


def cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` run in this process (returncode, stdout, stderr with the log lines): what
    run_cli gives, without a process start (~9 s of imports on 2 cores). Use run_cli where a real process is
    the point (a kill, a resource limit, the console script, progress lines of a non-terminal)."""
    from pipeline.cli import main
    from pipeline.tools.selfcheck import inprocess

    return inprocess(main, cwd, args, env)


def stage4_probs(run, head: str, part: str = "test", plain: bool = False):
    """A head's stage-4 probabilities as every later stage reads them (the policy merged by the reader)."""
    from pipeline.core.predict.stored import Stage4

    return Stage4.of(run, head, part).probs(plain)


def stage4_npz(run, head: str, part: str = "test") -> dict:
    """A head's stage-4 predictions of a part as one dict (what stage 4 stored per head before #35): ids, classes,
    views (and y, fold), and view_logits (V x N x C) computed by the reader from the stored features."""
    from pipeline.core.predict.stored import Stage4

    s = Stage4.of(run, head, part)
    return {**s.rows(), "view_logits": s.table()[:, :]}


def config_from_items(path: Path, items: list[str]) -> Path:
    """A config file from key=value items (a later item replaces an earlier one; dotted keys become sections)."""
    sections = {}
    for item in items:
        key, value = item.split("=", 1)
        sec, _, name = key.rpartition(".")
        sections.setdefault(sec, {})[name] = value
    text = "".join(f"{k}: {v}\n" for k, v in sections.pop("", {}).items())
    text += "".join(f"{s}:\n" + "".join(f"  {k}: {v}\n" for k, v in kv.items()) for s, kv in sections.items())
    path.write_text(text)
    return path
