"""`./run.sh doctor [--config FILE] [--quick]`: a one-minute check of the machine you will train on.

For the configured model and image size it runs a few real training steps (forward, backward,
optimiser step) and inference batches in every mode the machine supports -- fp32, bf16 and fp16
autocast, channels_last, torch.compile, data-parallel with 2 processes through torchrun (gloo on CPU,
NCCL with 2+ GPUs), one fold per GPU -- and prints a table: mode, passes or the error, training and
inference images/s, peak memory, the share of time spent waiting for data, and how far the mode's
logits lie from fp32's on the same weights. It recommends the fastest passing mode and, on GPU, the
largest batch that fits. Exit status 1 when the configured mode fails.

Images come from the competition's image store when its folds file exists (real decoding and
augmentation, so the data-wait share is real), else from random pixels.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..core.report.progress import progress
from ..core.config import Config, ModelCfg, TrainCfg
from ..core.engine.distributed import Dist
from ..core.engine.loop import Step, run_epoch, sync_interval
from ..core.nets.models import Normalize, create_model, logits, norm_stats, to_input
from ..core.engine.runtime import (amp_dtype, autocast, make_loader, maybe_compile, memory_format, pick_device,
                                   prepare_model, workers)
from ..core.inputs.pixels import Pixels, pixels

TOLERANCE = {"fp32": 1e-4, "bf16": 0.15, "fp16": 0.05}  # max |logit - fp32 logit| / max(1, max |fp32 logit|)


@dataclass(frozen=True)
class Mode:
    name: str
    amp: str = "off"
    channels_last: str = "off"
    compile: bool = False
    processes: int = 1  # 2: DDP through torchrun
    fold_per_gpu: bool = False

    @property
    def precision(self) -> str:
        return {"off": "fp32"}.get(self.amp, self.amp)


def modes_for(device: torch.device, quick: bool = False) -> list[Mode]:
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    out = [Mode("fp32"), Mode("bf16", "bf16"), Mode("fp16", "fp16"), Mode("channels_last", channels_last="on"),
           Mode("bf16+channels_last", "bf16", "on")]
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        out = [m for m in out if m.amp != "bf16"]
    if not quick:
        out += [Mode("compile", compile=True), Mode("compile+bf16+channels_last", "bf16", "on", True)]
    if device.type == "cpu" or gpus >= 2:
        out.append(Mode("ddp x2", processes=2))
    if gpus >= 2:
        out.append(Mode("fold per GPU x2", "bf16", "on", fold_per_gpu=True))
    return out


@dataclass(frozen=True)
class Bench:
    """What the doctor measures with, read from the config once (`Bench.of`): the model, the train section (a mode
    replaces its precision, memory format, compilation, batch size), the pixels, the competition's folds (None:
    random pixels), the device, and the config as YAML for the modes that run in processes of their own."""
    model: ModelCfg
    train: TrainCfg
    px: Pixels
    folds_name: str | None
    device: str
    yaml: str

    @classmethod
    def of(cls, cfg: Config) -> "Bench":
        return cls(cfg.model, cfg.train, pixels(cfg), cfg.folds_name if cfg.folds_csv.exists() else None, cfg.device,
                   cfg.to_yaml())


def with_mode(bench: Bench, mode: Mode, batch: int | None = None) -> Bench:
    t = dataclasses.replace(bench.train, amp=mode.amp, channels_last=mode.channels_last, compile=mode.compile,
                            batch_size=batch or bench.train.batch_size)
    return dataclasses.replace(bench, train=t)


# ----------------------------------------------------------------------------- one mode, one process
def batches(bench: Bench, n: int, device: torch.device):
    """(uint8 NHWC batch, labels) x n: the competition's images when its folds file exists."""
    b, s = bench.train.batch_size, bench.px.aug.img_size
    if bench.folds_name is not None:
        from ..core.inputs.augment import open_store, train_transform
        from ..core.inputs.data import read_folds
        from ..core.inputs.images import ImageDataset

        df, classes = read_folds(bench.folds_name)
        rows = np.resize(np.arange(len(df)), n * b)
        ds = ImageDataset(open_store(bench.px, df["path"]).subset(rows), df["y"].values[rows], train_transform(bench.px))
        return make_loader(ds, batch_size=b, n_workers=workers(bench.train), cuda=device.type == "cuda"), len(classes)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8, generator=g),
             torch.randint(0, 10, (b,), generator=g)) for _ in range(n)]
    return data, 10


def measure(bench: Bench, mode: Mode, steps: int = 6, dist: Dist | None = None) -> dict:
    """Train `steps` steps (after 2 warm-up steps) and run inference in one mode."""
    dist = dist or Dist()
    c = with_mode(bench, mode)
    device = pick_device(c.device, dist)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    data, n_classes = batches(c, steps + 2, device)
    torch.manual_seed(0)
    model = prepare_model(c.train, create_model(c.model, n_classes, pretrained=False), device)
    norm = Normalize(*norm_stats(c.model, model)).to(device)
    dtype, fmt = amp_dtype(c.train.amp, device), memory_format(c.train, device)
    probe = torch.randint(0, 256, (8, c.px.aug.img_size, c.px.aug.img_size, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    net = maybe_compile(c.train, net)
    with torch.no_grad():  # the untrained weights through this mode (compiled too): compared with fp32's
        net.eval()
        with autocast(device, dtype):
            first = net(to_input(probe, norm, device, fmt)).float().cpu()
    step = Step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), device, dtype)  # stage 2's step and loop
    before = [p.detach().clone() for p in model.parameters()]
    losses = []

    def loss(batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(net(to_input(x, norm, device, fmt)).float(),
                                                 y.to(device, non_blocking=True)), len(y)

    def keep(i, value) -> bool:
        losses.append(value)
        return False

    net.train()
    it = iter(data)
    every = sync_interval(device)  # as stage 2 syncs
    run_epoch(step, itertools.islice(it, 2), loss, after_batch=keep, sync_every=every)  # warm-up: compile, autotune
    timed = run_epoch(step, it, loss, after_batch=keep, sync_every=every)
    train_s, seen, wait = timed.seconds, timed.seen, timed.wait
    finite = not dist.any(not all(torch.isfinite(v).item() for v in losses))
    changed = any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    total_seen = dist.sum([seen])[0]
    model.eval()
    infer_rate = _inference_rate(model, to_input(next(iter(data))[0], norm, device, fmt), dtype, steps, device)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode.name, "ok": bool(finite and changed), "error": "" if finite and changed else
            ("non-finite loss" if not finite else "weights did not change"),
            "train_img_s": total_seen / train_s, "infer_img_s": infer_rate * dist.world, "peak_mb": peak / 1e6,
            "data_wait": wait / train_s, "loss": float(torch.stack(losses).float().mean()),
            "first_logits": first.numpy().tolist()}


@torch.no_grad()
def _inference_rate(model, xb: torch.Tensor, dtype, steps: int, device: torch.device) -> float:
    """Images/s of evaluation logits on one batch, after 2 warm-up passes."""
    for _ in range(2):
        logits(model, xb, dtype)
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        logits(model, xb, dtype)
    _sync(device)
    return steps * len(xb) / (time.perf_counter() - t1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- processes
def run_processes(bench: Bench, mode: Mode, steps: int, timeout: int = 600) -> dict:
    """A mode that needs several processes: DDP through torchrun, or one process per GPU."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="doctor-") as tmp:
        path = os.path.join(tmp, "cfg.yaml")
        with open(path, "w") as f:
            f.write(bench.yaml)
        worker = ["-m", "pipeline.tools.doctor", "--worker", path, mode.name, str(steps)]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
        if mode.fold_per_gpu:
            procs = [subprocess.Popen([sys.executable, *worker], env=dict(env, CUDA_VISIBLE_DEVICES=str(i)),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
            outs = [p.communicate(timeout=timeout) for p in procs]
            codes = [p.returncode for p in procs]
        else:
            port = 29400 + os.getpid() % 1000
            p = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={mode.processes}",
                                f"--master_port={port}", *worker], env=env, capture_output=True, text=True,
                               timeout=timeout)
            outs, codes = [(p.stdout, p.stderr)], [p.returncode]
    results = [json.loads(line.split(" ", 1)[1]) for out, _ in outs for line in out.splitlines()
               if line.startswith("DOCTOR ")]
    if any(codes) or not results:
        err = next((e for (_, e), c in zip(outs, codes) if c), outs[0][1])
        return {"mode": mode.name, "ok": False, "error": (err.strip().splitlines() or ["failed"])[-1][:200]}
    r = dict(results[0])
    if mode.fold_per_gpu:  # independent processes: their rates add up
        r["train_img_s"] = sum(x["train_img_s"] for x in results)
        r["infer_img_s"] = sum(x["infer_img_s"] for x in results)
    r["mode"] = mode.name
    return r


def worker_main(argv: list[str]) -> int:
    from ..core.config import load_config

    path, name, steps = argv
    bench = Bench.of(load_config(path))
    device = pick_device(bench.device, Dist())
    mode = next(m for m in modes_for(device) + [Mode("fold per GPU x2", "bf16", "on", fold_per_gpu=True)]
                if m.name == name)
    dist = Dist.from_env(device.type == "cuda")
    r = measure(bench, Mode("x", mode.amp, mode.channels_last, mode.compile), int(steps), dist)
    if dist.main:
        print("DOCTOR " + json.dumps(r), flush=True)
    return 0


# ----------------------------------------------------------------------------- the check
def largest_batch(bench: Bench, mode: Mode, limit: int = 8) -> int | None:
    """GPU: the largest power-of-two multiple of train.batch_size (up to `limit` x) a few steps fit in."""
    best = None
    b = bench.train.batch_size
    while b <= bench.train.batch_size * limit:
        try:
            measure(with_mode(bench, mode, b), mode, steps=1)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        best, b = b, b * 2
    return best


def configured_mode(t: TrainCfg, device: torch.device) -> Mode:
    dtype = amp_dtype(t.amp, device)
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[dtype]
    cl = "on" if memory_format(t, device) == torch.channels_last else "off"
    return Mode("configured", amp, cl, t.compile)


def check(bench: Bench, quick: bool = False, steps: int = 6, only: list[str] | None = None,
          log=lambda m: print(m, file=sys.stderr, flush=True)) -> tuple[pd.DataFrame, str, int]:
    """(table, recommendation, exit status)."""
    device = pick_device(bench.device, Dist())
    modes = modes_for(device, quick)
    if only:
        modes = [m for m in modes if m.name in only]
    mine = configured_mode(bench.train, device)
    same = [m for m in modes if (m.amp, m.channels_last, m.compile, m.processes) ==
            (mine.amp, mine.channels_last, mine.compile, 1)]
    if not same:
        modes.append(mine)
    mine_name = same[0].name if same else "configured"
    rows, ref = [], None
    for i, m in enumerate(progress(modes, len(modes), "doctor", "mode")):
        log(f"doctor: mode {i + 1}/{len(modes)}: {m.name} ...")
        try:
            r = run_processes(bench, m, steps) if m.processes > 1 or m.fold_per_gpu else measure(bench, m, steps)
        except Exception as e:  # noqa: BLE001 - a mode that fails is a row of the table, not a crash
            r = {"mode": m.name, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        if m.name == "fp32" and r.get("ok"):
            ref = np.asarray(r["first_logits"])
        rows.append(r)
    for r in rows:
        if ref is not None and "first_logits" in r:
            out = np.asarray(r.pop("first_logits"))
            r["vs_fp32"] = float(np.abs(out - ref).max() / max(1.0, np.abs(ref).max()))
            m = next(x for x in modes if x.name == r["mode"])
            if r["vs_fp32"] > TOLERANCE[m.precision]:
                r["ok"], r["error"] = False, f"logits differ from fp32 by {r['vs_fp32']:.3g} (> {TOLERANCE[m.precision]})"
        r.pop("first_logits", None)
    t = pd.DataFrame(rows)
    passing = t[t["ok"]]
    rec = "no mode passed"
    if len(passing):
        best = passing.sort_values("train_img_s", ascending=False).iloc[0]
        rec = f"fastest passing mode: {best['mode']} ({best['train_img_s']:.0f} train img/s)"
        if device.type == "cuda":
            bmode = next(m for m in modes if m.name == best["mode"])
            lb = largest_batch(bench, bmode) if not (bmode.processes > 1 or bmode.fold_per_gpu) else None
            if lb:
                rec += f"; largest batch that fits: {lb} (train.batch_size; tried up to 8x {bench.train.batch_size})"
    ok_mine = bool(t.loc[t["mode"] == mine_name, "ok"].all())
    rec += f"\nconfigured mode ({mine_name}: amp={mine.amp}, channels_last={mine.channels_last}, " \
           f"compile={mine.compile}): {'passes' if ok_mine else 'FAILS'}"
    return t, rec, 0 if ok_mine else 1


def table_text(t: pd.DataFrame) -> str:
    cols = [c for c in ("mode", "ok", "train_img_s", "infer_img_s", "peak_mb", "data_wait", "vs_fp32", "error")
            if c in t]
    view = t[cols].copy()
    view["ok"] = view["ok"].map({True: "passes", False: "FAILS"})
    return view.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep="")


def main(cfg: Config, quick: bool = False) -> int:
    device = pick_device(cfg.device, Dist())
    print(f"doctor: {cfg.model.arch} at {cfg.aug.img_size} px, batch {cfg.train.batch_size}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, torch "
          f"{torch.__version__}, {os.cpu_count()} CPU cores", flush=True)
    t, rec, code = check(Bench.of(cfg), quick)
    print(table_text(t))
    print(rec)
    return code


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker_main(sys.argv[2:]))
