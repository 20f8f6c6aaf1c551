"""The one training step and the one epoch loop that every trainer uses: stage 2 (folds and the full-data
model), stage 4's FixRes tuning, stage 3's cRT/LWS heads, `lr-find` and `doctor` (which so times the real
loop, not a copy).

`Step` is what timm's `NativeScaler` is to its train.py, plus what our trainers share around it: autocast,
fp16 loss scaling (bf16 and fp32 need none), gradient accumulation, clipping (of unscaled gradients), the
optimiser step, the per-update schedule and the EMA. `run_epoch` feeds batches through a `loss` function
(what the step computes: a task, as timm's `task/` objects) with a handful of named hooks (fastai's idea,
without its callback maze): `before_batch`, `after_batch` (True ends the epoch: lr-find's divergence stop),
`on_sync` (the host reads the loss back: a divergence check, a progress line).
"""
from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .runtime import autocast


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (on CPU too); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def sync_interval(device: torch.device) -> int:
    """How often stage 2 reads the loss back: host<->device syncs are costly on GPU (every 25 steps there);
    on CPU every step, so a divergence names its exact step."""
    return 25 if device.type == "cuda" else 1


class Step:
    """One optimiser step, shared by every trainer.

    backward(loss, i) scales the loss for fp16 and by 1 / accum_steps; every `accum_steps`-th call updates:
    `before_update` (e.g. drop the backbone's gradients during a head warm-up), unscale + clip, the
    optimiser step through the scaler, zero the gradients, count the update, `on_update(n)` (the per-update
    schedule: timm's `step_update`, a torch scheduler's `step`, lr-find's lr), then the EMA."""

    def __init__(self, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer, device: torch.device,
                 dtype: torch.dtype | None = None, *, accum_steps: int = 1, clip_grad: float | None = None,
                 on_update: Callable[[int], None] | None = None, ema=None,
                 before_update: Callable[[], None] | None = None):
        self.model, self.optimizer, self.device, self.dtype = model, optimizer, device, dtype
        self.accum_steps, self.clip_grad = accum_steps, clip_grad
        self.on_update, self.ema, self.before_update = on_update, ema, before_update
        self.scaler = grad_scaler(dtype, device)
        self.num_updates = 0

    def autocast(self) -> AbstractContextManager:
        return autocast(self.device, self.dtype)

    def backward(self, loss: torch.Tensor, i: int) -> bool:
        """Backward of batch i of the epoch; True when it completed an update."""
        scaled = loss / self.accum_steps
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if (i + 1) % self.accum_steps:
            return False
        self.update()
        return True

    def update(self) -> None:
        if self.before_update is not None:
            self.before_update()
        if self.clip_grad:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            params = (self.model.parameters() if self.model is not None
                      else [p for g in self.optimizer.param_groups for p in g["params"]])
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_updates += 1
        if self.on_update is not None:
            self.on_update(self.num_updates)
        if self.ema is not None:
            self.ema.update(self.model, step=self.num_updates)

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None, num_updates: int) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
        self.num_updates = num_updates


@dataclass
class EpochResult:
    loss_sum: float  # sum over images of the per-batch mean loss x batch size
    seen: int  # images
    steps: int  # batches
    seconds: float
    wait: float  # seconds spent waiting for the loader


def run_epoch(step: Step, batches: Iterable, loss: Callable[[object], tuple[torch.Tensor, int]], *,
              n_batches: int | None = None, sync_every: int | None = 1, bar=None,
              before_batch: Callable[[int], None] | None = None,
              after_batch: Callable[[int, torch.Tensor], bool] | None = None,
              on_sync: Callable[[int, float, int], None] | None = None) -> EpochResult:
    """One pass over `batches`: `loss(batch)` under autocast -> (mean loss, images), then `step.backward`.

    The loss is summed on the device; the host reads it back every `sync_every` batches and after the last
    (`n_batches`), calling `on_sync(i, loss sum so far, images so far)`; sync_every=None: only at the end."""
    step.optimizer.zero_grad(set_to_none=True)  # an accumulation left incomplete by the last epoch is dropped
    loss_sum = torch.zeros((), device=step.device)
    total, seen, wait, i = 0.0, 0, 0.0, -1
    t0 = t_wait = time.perf_counter()
    for i, batch in enumerate(batches):
        wait += time.perf_counter() - t_wait
        if before_batch is not None:
            before_batch(i)
        with step.autocast():
            value, n = loss(batch)
        loss_sum += value.detach() * n
        seen += n
        if sync_every and ((i + 1) % sync_every == 0 or (n_batches is not None and i + 1 == n_batches)):
            total = loss_sum.item()
            if on_sync is not None:
                on_sync(i, total, seen)
        step.backward(value, i)
        if bar is not None:
            bar.update()
        stop = after_batch is not None and after_batch(i, value.detach())
        t_wait = time.perf_counter()
        if stop:
            break
    if step.device.type == "cuda":
        torch.cuda.synchronize(step.device)  # the host clock below times finished work
    seconds = time.perf_counter() - t0
    return EpochResult(loss_sum=loss_sum.item(), seen=seen, steps=i + 1, seconds=seconds, wait=wait)
