"""Sweep workers on a real PostgreSQL server (#49 item 2): a throwaway server on 127.0.0.1 (Debian's packages, started
by the test), two workers as separate processes on one RDB study (`sweep.storage=postgresql+psycopg://...`), one
killed with SIGKILL mid-trial: the same invariants as the journal's test (no trial run twice, the killed trial
re-queued and resumed from its checkpoint, N trials in all, the nested figure). Skipped, with the reason, where no
server can be started (no binaries, no psycopg, root without a `postgres` user)."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, cli, config_from_items, make_competition
from pipeline.core.files import layout
from pipeline.core.files.artifacts import read_json

from test_sweep import TINY, space_file, worker_at_checkpoint


def _bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of its own in a temporary folder (trust authentication, 127.0.0.1 only, fsync off),
    stopped and removed afterwards; its URL for SQLAlchemy with psycopg 3."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg (3) is not installed: pip install psycopg[binary]")
    as_user: list[str] = []
    home = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(home)
            pytest.skip("running as root and no 'postgres' user to run the server as")
        os.chown(home, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = home / "data", _free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)  # noqa: E731
    made = run(initdb, "-D", str(data), "-A", "trust", "-U", "sweep", "--no-sync")
    started = made.returncode == 0 and run(
        pg_ctl, "-D", str(data), "-l", str(home / "log"), "-w", "-t", "60", "-o",
        f"-p {port} -c listen_addresses=127.0.0.1 -k {home} -c fsync=off", "start").returncode == 0
    if not started:
        log = (home / "log").read_text()[-500:] if (home / "log").exists() else made.stderr[-500:]
        shutil.rmtree(home, ignore_errors=True)
        pytest.skip(f"the PostgreSQL server did not start: {log}")
    try:
        yield f"postgresql+psycopg://sweep@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study_and_a_killed_one_s_trial_is_resumed(workdir, postgres_url):
    root = make_competition(workdir / "comp", {"a": 10, "b": 10, "c": 10}, size=16, n_test=6)
    base = config_from_items(workdir / "base.yaml", [f"data.root={root}", "experiment=s", *TINY, "train.epochs=20",
                                                     "sweep.pruner=none", f"sweep.storage={postgres_url}"])
    space = space_file(workdir / "space.yaml", "train.lr: {type: float, low: 0.005, high: 0.02, log: true}\n")
    args = [sys.executable, "-m", "pipeline", "sweep", "--config", str(base), "--space", str(space), "--trials", "3"]
    first = worker_at_checkpoint(args, workdir, workdir / "runs/s-sweep-t0/fold0/last.pt")
    second = subprocess.Popen(args, cwd=workdir, env=dict(os.environ, PYTHONPATH=str(REPO)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first.send_signal(signal.SIGKILL)  # no clean-up: its trial stays RUNNING in the database
    first.wait()
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    r = cli(args[3:], workdir)  # a third worker: the study is full, it only reports
    assert r.returncode == 0, r.stderr[-3000:]
    s = read_json(layout.SweepDir.of("s-sweep").trials)
    states = [(t["state"], t["experiment"]) for t in s["trials"]]
    assert states.count(("failed", "s-sweep-t0")) == 1, states          # the killed one, marked as such
    done = [e for st, e in states if st == "complete"]
    assert len(done) == 3 and len(set(done)) == 3, states                # N trials, none run twice
    retry = next(t for t in s["trials"] if t.get("retry_of") == 0)
    assert retry["state"] == "complete" and retry["experiment"] == "s-sweep-t0"
    assert retry["params"] == s["trials"][0]["params"]
    logs = "".join(p.read_text() for p in (workdir / "runs/s-sweep-t0/logs").glob("train-*.log"))
    assert "resum" in logs  # the re-queued trial went on from the killed run's checkpoint
    assert s["selection"]["nested"] is not None and s["selection"]["winner"] in done
    assert not layout.SweepDir.of("s-sweep").journal.exists()  # the study lives in the database only
