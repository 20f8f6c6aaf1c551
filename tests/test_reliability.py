"""Reliability: the selfcheck matrix as tests. Kills hit the real CLI in a subprocess (SIGKILL via
PIPELINE_FAULT), at one write path or mid-epoch point per stage here (`./run.sh selfcheck` runs every
point); every bad input runs through the CLI's entry point and must exit 2, name it and write nothing."""
import json

import pytest

from pipeline.cli import main
from pipeline.tools import selfcheck
from pipeline.core.files.artifacts import atomic_path, write_json
from pipeline.core.errors import PipelineError


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    return selfcheck.Sandbox(tmp_path_factory.mktemp("selfcheck"), entry=main, log=lambda m: None)


KILLS = [(stage, point) for stage, points in selfcheck.QUICK_KILLS.items() for point in points]


@pytest.mark.slow
@pytest.mark.parametrize("stage,point", KILLS, ids=[f"{s}@{p}" for s, p in KILLS])
def test_kill_then_rerun_equals_uninterrupted_run(sandbox, stage, point):
    r = selfcheck.kill_case(sandbox, stage, point)
    assert r.passed and r.lost == 0, r.observed


@pytest.mark.parametrize("case", selfcheck.BAD_INPUTS, ids=[c[1] for c in selfcheck.BAD_INPUTS])
def test_bad_input_is_rejected_cleanly(sandbox, case):
    r = selfcheck.bad_input_case(sandbox, *case)
    assert r.passed, r.observed


@pytest.mark.parametrize("fn", [selfcheck.non_finite_case, selfcheck.oom_case, selfcheck.disk_full_case,
                                selfcheck.unwritable_case, selfcheck.lock_case, selfcheck.stale_pixels_case,
                                selfcheck.test_side_case],
                         ids=["non-finite loss", "oom", "disk full", "unwritable", "concurrent runs",
                              "replaced test image", "test-side setting"])
@pytest.mark.slow
def test_training_and_storage_faults(sandbox, fn):
    r = fn(sandbox)
    assert r.passed and r.lost == 0, r.observed


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("crash while writing")   # not a write error: re-raised as it is
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    with pytest.raises(PipelineError, match=r"cannot write .*summary.json: .*\(is the disk full\?\)"):
        with atomic_path(target) as tmp:
            raise type("SafetensorError", (Exception,), {})("Error while serializing")
    assert json.loads(target.read_text()) == {"v": 1}


def test_orphaned_temp_files_of_killed_writers_are_swept(tmp_path):
    target = tmp_path / "oof.npz"
    dead = tmp_path / ".oof.npz.999999999.abc.tmp.npz"          # a pid that cannot exist
    dead.write_text("half")
    mine = tmp_path / f".oof.npz.{__import__('os').getpid()}.xyz.tmp.npz"   # a live writer's: kept
    mine.write_text("busy")
    write_json(target, {})
    assert not dead.exists() and mine.exists()


def test_the_matrix_table_has_the_totals(sandbox):
    rows = [selfcheck.Result("kill", "a", "e", "o", True, kill=True),
            selfcheck.Result("data", "b", "e", "o", False), selfcheck.Result("storage", "c", "e", "o", True, lost=0)]
    text = selfcheck.table(rows)
    assert "| kill | a | e | o | yes |" in text and "| data | b | e | o | NO |" in text
    assert "kills survived: 1/1; bad inputs rejected cleanly: 0/1; other cases passed: 1/1; files lost: 0" in text


def test_a_lock_on_a_new_folder_leaves_no_empty_folders_when_the_run_fails(tmp_path):
    from pipeline.core.files.artifacts import experiment_lock

    target = tmp_path / "runs" / "exp" / "fold0"
    with pytest.raises(PipelineError):
        with experiment_lock(target):
            raise PipelineError("an image went missing")
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs").mkdir()
    with experiment_lock(target):
        (target / "summary.json").write_text("{}")
    assert (target / "summary.json").exists() and not (target / ".lock").exists()


def test_npz_files_are_what_np_savez_writes_and_read_back_in_part(tmp_path):
    import numpy as np

    from pipeline.core.files.artifacts import read_npz, write_npz

    table = np.random.default_rng(0).normal(size=(3, 100, 7)).astype(np.float32)
    write_npz(tmp_path / "x.npz", ids=np.array(["a", "b"], dtype=object), view_logits=table, probs=table[1])
    back = np.load(tmp_path / "x.npz", allow_pickle=False)                # no pickles: strings stored as unicode
    assert np.array_equal(back["view_logits"], table) and np.array_equal(back["probs"], table[1])
    assert back["ids"].tolist() == ["a", "b"]
    assert set(read_npz(tmp_path / "x.npz", skip=("view_logits",))) == {"ids", "probs"}
