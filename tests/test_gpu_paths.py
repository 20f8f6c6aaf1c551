"""The GPU code paths, run on CPU: autocast (bf16, fp16 + loss scaling), channels_last, torch.compile
and DDP go through the same functions on both devices; `doctor` trains a few steps in each mode;
collectives live on the backend's device; fold locks work across hosts."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from pipeline.core.files.artifacts import experiment_lock
from pipeline.core.config import load_config
from pipeline.core.engine.distributed import Dist
from pipeline.core.errors import PipelineError
from pipeline.core.engine.loop import grad_scaler
from pipeline.core.engine.runtime import amp_dtype, memory_format
from pipeline.tools import doctor

TINY = ["model.arch=test_resnet", "aug.img_size=32", "train.batch_size=8", "train.workers=0"]


def test_config_means_the_same_on_cpu_and_gpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    cfg = load_config(None, ["train.amp=bf16", "train.channels_last=on"])
    assert amp_dtype(cfg.train.amp, cpu) == torch.bfloat16 and memory_format(cfg.train, cpu) == torch.channels_last
    assert amp_dtype("fp16", cpu) == torch.float16
    assert isinstance(grad_scaler(torch.float16, cpu), torch.amp.GradScaler) and grad_scaler(torch.bfloat16, cpu) is None
    auto = load_config(None, [])                          # auto: fp32 + NCHW on CPU (bit-identical runs)
    assert amp_dtype(auto.train.amp, cpu) is None and memory_format(auto.train, cpu) == torch.contiguous_format
    assert memory_format(auto.train, cuda) == torch.channels_last
    assert load_config(None, ["train.channels_last=true"]).train.channels_last == "on"   # YAML booleans still work
    assert Dist().device == cpu and Dist(world=2, backend="nccl", local_rank=1).device == torch.device("cuda", 1)


@pytest.mark.slow
def test_doctor_trains_every_cpu_mode_and_outputs_agree_with_fp32():
    cfg = load_config(None, TINY)
    only = ["fp32", "bf16", "fp16", "channels_last", "bf16+channels_last", "compile"]
    t, rec, code = doctor.check(doctor.Bench.of(cfg), steps=2, only=only, log=lambda m: None)
    assert list(t["mode"]) == only and code == 0, t.to_string()
    assert t["ok"].all(), t[["mode", "error"]].to_string()     # loss finite and weights changed in each mode
    assert (t["train_img_s"] > 0).all() and (t["infer_img_s"] > 0).all()
    vs = dict(zip(t["mode"], t["vs_fp32"]))
    assert vs["fp32"] == 0 and vs["channels_last"] < 1e-4 and vs["compile"] < 1e-4   # same math
    assert 0 < vs["bf16"] < doctor.TOLERANCE["bf16"] and vs["fp16"] < doctor.TOLERANCE["fp16"]
    assert rec.startswith("fastest passing mode:") and "configured mode (" in rec and "passes" in rec


def test_doctor_exits_non_zero_when_the_configured_mode_fails(monkeypatch):
    real = doctor.measure

    def broken(bench, mode, steps=6, dist=None):
        if mode.compile:
            raise RuntimeError("inductor: no C++ compiler")
        return real(bench, mode, steps, dist)

    monkeypatch.setattr(doctor, "measure", broken)
    t, rec, code = doctor.check(doctor.Bench.of(load_config(None, [*TINY, "train.compile=true"])), steps=1, only=["fp32"],
                                log=lambda m: None)
    assert code == 1 and "FAILS" in rec
    row = t[t["mode"] == "configured"].iloc[0]
    assert not row["ok"] and "no C++ compiler" in row["error"]


@pytest.mark.slow
def test_two_gloo_processes_through_the_collective_helper():
    r = doctor.run_processes(doctor.Bench.of(load_config(None, TINY)), doctor.Mode("ddp x2", processes=2), steps=2, timeout=300)
    assert r["ok"], r.get("error")
    assert r["train_img_s"] > 0 and abs(r["loss"]) < 1e3


def _holder(folder, host, beat):
    code = ("import time, sys; from pipeline.core.files.artifacts import experiment_lock\n"
            f"with experiment_lock({str(folder)!r}):\n    print('held', flush=True); time.sleep(120)")
    env = dict(os.environ, PYTHONPATH=str(REPO), PIPELINE_HOSTNAME=host, PIPELINE_LOCK_HEARTBEAT_S=str(beat))
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.slow
def test_fold_lock_held_on_another_host_is_taken_over_only_after_its_heartbeat_stops(tmp_path, monkeypatch):
    folder = tmp_path / "runs" / "exp" / "fold0"
    holder = _holder(folder, "node-a", 0.2)
    monkeypatch.setenv("PIPELINE_HOSTNAME", "node-b")
    monkeypatch.setenv("PIPELINE_LOCK_STALE_S", "1.5")
    try:
        time.sleep(2.0)                                        # older than the timeout, but its heartbeat runs
        with pytest.raises(PipelineError, match=r"held by pid \d+ on node-a, refreshed 0s ago"):
            with experiment_lock(folder):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)                     # the holder dies on its host: no cleanup
        holder.wait()
    assert (folder / ".lock").exists()
    with pytest.raises(PipelineError, match="node-a"):        # not yet stale: refused
        with experiment_lock(folder):
            pass
    time.sleep(2.0)
    with experiment_lock(folder):                              # stale on another host: taken over
        assert '"node-b"' in (folder / ".lock").read_text()
    assert not (folder / ".lock").exists()
