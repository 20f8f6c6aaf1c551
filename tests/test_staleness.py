"""Records hold the image files a stage read: a replaced image makes exactly the stages that read it stale,
naming the file; test-side settings never make stage-2 weights stale."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import make_competition
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.stages import ensemble as ens_stage
from pipeline.stages import folds as folds_stage
from pipeline.stages import infer as infer_stage
from pipeline.stages import rebalance as rebalance_stage
from pipeline.stages import train as train_stage

BASE = ["data.image_ext=.png", "model.arch=test_resnet", "aug.img_size=32", "aug.cache=off", "train.batch_size=8",
        "train.epochs=1", "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0", "rebalance.crt_epochs=2",
        "rebalance.lws_epochs=2", "infer.views=[orig]", "experiment=st"]
STAGES = [("folds", folds_stage), ("train", train_stage), ("rebalance", rebalance_stage), ("infer", infer_stage),
          ("ensemble", ens_stage)]


def cfg_of(root, *extra):
    return load_config(None, [f"data.root={root}", *BASE, *extra])


def run_all(cfg):
    for _, mod in STAGES:
        mod.run(cfg)


def stale(cfg) -> dict:
    """Each stage's reasons to run, or the refusal of a stage whose input is stale (as ./run.sh status shows)."""
    out = {}
    for name, mod in STAGES:
        try:
            out[name] = mod.status(cfg)
        except PipelineError as e:
            out[name] = [f"refused: {e}"]
    return out


def replace_image(path, seed=1):
    """Another picture under the same name, with a later mtime."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.fixture
def done(workdir):
    root = make_competition(workdir / "comp", {"a": 8, "b": 6, "c": 6}, size=24, n_test=6)
    cfg = cfg_of(root)
    run_all(cfg)
    assert all(not r for r in stale(cfg).values())
    return cfg


@pytest.mark.slow
def test_a_replaced_test_image_makes_stage_4_stale_naming_it(done):
    replace_image(done.data_path("test") / "t001.png")
    s = stale(done)
    assert s["folds"] == s["train"] == s["rebalance"] == []
    assert len(s["infer"]) == 1 and "test_images (replaced:" in s["infer"][0] and "t001.png" in s["infer"][0]
    infer_stage.run(done)
    assert stale(done)["ensemble"]  # its member's predictions changed
    ens_stage.run(done)
    assert all(not r for r in stale(done).values())


def test_a_replaced_train_image_makes_stages_2_to_4_stale_naming_it(done):
    replace_image(done.data_path("train") / "img0003.png")
    s = stale(done)
    assert s["folds"] == []
    for stage in ("train", "rebalance"):
        assert any("train_images (replaced:" in r and "img0003.png" in r for r in s[stage]), (stage, s[stage])
    assert "stale" in s["infer"][0] and "img0003.png" in s["infer"][0]  # its stage-2 input is stale


def test_test_side_settings_do_not_make_stage_2_stale(done, workdir):
    shutil.copy(done.data_path("sample_submission.csv"), workdir / "comp" / "sample_copy.csv")
    other = cfg_of(done.data.root, "data.sample_submission=sample_copy.csv", "data.check_images=full")
    s = stale(other)
    assert s["folds"] == s["train"] == s["rebalance"] == [] and s["infer"] == []


def test_content_hashes_ignore_a_touched_but_identical_file(workdir):
    root = make_competition(workdir / "comp", {"a": 10, "b": 8}, size=24, n_test=4)
    for hashed, want_stale in ((True, False), (False, True)):
        cfg = cfg_of(root, f"data.hash_images={str(hashed).lower()}", f"experiment=h{int(hashed)}")
        folds_stage.run(cfg, force=True)
        train_stage.run(cfg)
        p = root / "train" / "img0002.png"
        st = os.stat(p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # same bytes, a new date (a copy, a checkout)
        assert bool(train_stage.status(cfg)) is want_stale, hashed
