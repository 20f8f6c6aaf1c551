"""Stage 4's stored features are checked against what stage 4 wrote (#45): a damaged, swapped, truncated or
non-finite file is refused naming it and the command to re-run, or makes stage 4 stale; never a traceback, never a
silent change. The selfcheck matrix (group `stored`) runs the damage cases through the CLI."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.files.featurefile import CheckedFeatures, digest_path, row_digest, sample_digest, write_features
from test_staleness import STAGES, cfg_of, make_competition, run_all, stale

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is installed by ./run.sh test (requirements-test.txt)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


def write(path, x: np.ndarray, dtype: str = "float16") -> dict:
    return write_features(path, dtype, len(x), x.shape[1],
                          lambda sink: [sink(v, 0, x[v].astype(np.float32)) for v in range(len(x))], "test")


def read_all(path, entry, n) -> np.ndarray:
    f = CheckedFeatures(path, entry, n, "re-run it")
    return np.stack([np.concatenate([f[v, slice(a, a + 7)] for a in range(0, n, 7)]) for v in range(f.shape[0])])


def test_a_changed_row_the_sampled_digest_misses_is_refused_at_the_block_that_reads_it(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3000, 64)).astype(np.float16)  # 768 kB: most bytes lie outside the sampled chunks
    p = tmp_path / "f" / "test.npy"
    entry = write(p, x)
    assert np.array_equal(read_all(p, entry, 3000), x.astype(np.float32))
    mm = np.load(p, mmap_mode="r+")
    size, header = p.stat().st_size, p.stat().st_size - x.nbytes
    sampled = [(0, 1 << 16), (size - (1 << 16), size)] + [(size * i // 64, size * i // 64 + 4096) for i in range(64)]
    row = next(r for r in range(1500, 3000)
               if not any(a <= header + ((3000 + r) * 64 + 3) * 2 < b for a, b in sampled))
    for value, kind in ((np.nan, "not finite"), (mm[1, row, 3] + 0.5, "not what stage 4 wrote")):
        mm[1, row, 3] = value
        mm.flush()
        assert sample_digest(p) == entry["sample"], "the change should lie outside the sampled bytes"
        f = CheckedFeatures(p, entry, 3000, "re-run it")
        f[1, slice(0, row)]  # rows before it read fine
        with pytest.raises(PipelineError, match=rf"test.npy: 1 row\(s\) of view 1 {kind} \(first: row {row}.*re-run it"):
            f[1, slice(row - 3, row + 3)]


def test_the_file_level_checks_name_the_file_before_any_mapping(tmp_path):
    rng = np.random.default_rng(1)
    p, q = tmp_path / "a" / "test.npy", tmp_path / "b" / "test.npy"
    ea, eb = write(p, rng.normal(size=(1, 6, 8)).astype(np.float16)), write(q, rng.normal(size=(1, 6, 8)).astype(np.float16))
    with pytest.raises(PipelineError, match="holds 6 rows where stage 4's rows.npz has 12"):
        CheckedFeatures(p, ea, 12, "x")
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(PipelineError, match=r"a/test.npy has \d+ bytes, stage 4 wrote \d+ \(truncated"):
        CheckedFeatures(p, ea, 6, "x")
    q.write_bytes(q.read_bytes())  # the same bytes: fine
    CheckedFeatures(q, eb, 6, "x")
    digest_path(q).write_bytes(digest_path(q).read_bytes()[:-8])
    with pytest.raises(PipelineError, match="test.digest.npy .*missing or changed"):
        CheckedFeatures(q, eb, 6, "x")


def test_non_finite_model_output_is_refused_while_writing_and_nothing_is_left(tmp_path):
    x = np.ones((1, 5, 4), np.float32)
    x[0, 3, 1] = np.inf
    p = tmp_path / "test.npy"
    with pytest.raises(PipelineError, match=r"not finite at rows \[3\] of view 0 \(the model's output\)"):
        write(p, x, "float32")
    x[0, 3, 1] = 7e4  # finite in float32, not in float16
    with pytest.raises(PipelineError, match="beyond float16's range: set infer.features=float32"):
        write(p, x)
    assert not list(tmp_path.iterdir())


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_feature_files_are_refused_or_read_exactly(tmp_path_factory, data):
    """Random damage (bytes overwritten anywhere, the file cut or extended, the sidecar's bytes changed): the reader
    either refuses it naming the file, or returns exactly what stage 4 wrote."""
    d = tmp_path_factory.mktemp("fz")
    n, dim = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 24))
    dtype = data.draw(st.sampled_from(["float16", "float32"]))
    x = np.random.default_rng(data.draw(st.integers(0, 99))).normal(size=(2, n, dim)).astype(dtype)
    p = d / "fold0" / "held0.npy"
    entry = write(p, x, dtype)
    target = data.draw(st.sampled_from([p, digest_path(p)]))
    b = bytearray(target.read_bytes())
    how = data.draw(st.sampled_from(["overwrite", "cut", "extend"]))
    if how == "overwrite":
        at = data.draw(st.integers(0, len(b) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=16))
        b[at:at + len(chunk)] = chunk
    elif how == "cut":
        b = b[:data.draw(st.integers(0, len(b) - 1))]
    else:
        b += data.draw(st.binary(min_size=1, max_size=64))
    target.write_bytes(bytes(b))
    try:
        got = read_all(p, entry, n)
    except PipelineError as e:
        assert str(target.name) in str(e) or "held0.npy" in str(e), str(e)
        assert "re-run it" in str(e)
        return
    assert np.array_equal(got, x.astype(np.float32), equal_nan=False)


def test_row_digests_do_not_depend_on_the_block_they_are_computed_in():
    x = np.random.default_rng(2).normal(size=(1000, 300)).astype(np.float16)
    whole = row_digest(x)[0]
    parts = np.concatenate([row_digest(x[a:a + 13])[0] for a in range(0, 1000, 13)])
    assert np.allclose(whole, parts, rtol=0, atol=1e-9)


@pytest.fixture
def done(workdir):
    root = make_competition(workdir / "comp", {"a": 8, "b": 6, "c": 6}, size=24, n_test=6)
    cfg = cfg_of(root)
    run_all(cfg)
    return cfg


def test_a_damaged_stage4_output_makes_stage_4_stale_and_a_rerun_restores_the_submission(done):
    from pipeline.core.files import layout

    sub = layout.submission_csv(done.ensemble.name or done.experiment)
    before = sub.read_bytes()
    p = done.run_dir.infer_features("fold1", "test")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    s = stale(done)
    assert s["folds"] == s["train"] == s["rebalance"] == []
    assert len(s["infer"]) == 1 and "damaged output" in s["infer"][0] and "fold1/test.npy" in s["infer"][0]
    with pytest.raises(PipelineError, match=r"fold1/test.npy has \d+ bytes.*./run.sh infer --force"):
        dict(STAGES)["ensemble"].run(done, force=True)
    assert sub.read_bytes() == before  # the refusal wrote nothing
    dict(STAGES)["infer"].run(done)  # not skipped: its output was damaged
    assert stale(done)["infer"] == []
    dict(STAGES)["ensemble"].run(done, force=True)
    assert sub.read_bytes() == before
