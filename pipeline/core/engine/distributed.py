"""Data-parallel helpers for `torchrun` (NCCL on GPU, gloo on CPU); a no-op in a single process.

Every collective goes through `Dist`, whose tensors live on the device the process group's backend
needs: the process's GPU for NCCL (which rejects CPU tensors), the CPU for gloo.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = "none"  # nccl, gloo, or none (one process)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where this process's collective tensors must live."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    @classmethod
    def from_env(cls, cuda: bool) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        local = int(os.environ.get("LOCAL_RANK", 0))
        backend = "nccl" if cuda else "gloo"
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(local)  # before NCCL: its communicator binds to the current device
            dist.init_process_group(backend=backend, device_id=torch.device("cuda", local) if cuda else None)
            # torch's advice: destroy the group before exit; left to interpreter teardown, gloo's threads can abort
            # a finished process ("terminate called without an active exception", exit -6)
            atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, backend=dist.get_backend())

    def tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, device=self.device)  # gloo and NCCL both reduce float64

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(device_ids=[self.local_rank] if self.backend == "nccl" else None)

    def gather(self, obj):
        """Every rank's object, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says so (e.g. a non-finite loss)."""
        if self.world == 1:
            return flag
        t = self.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks."""
        if self.world == 1:
            return list(values)
        t = self.tensor(list(values))
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def run_per_device(jobs: list[tuple[object, list[str]]], devices: list[str], on_start=None, poll_s: float = 0.5) -> list:
    """Independent jobs (key, command line), one per device at a time, each in its own process with only
    its device visible (CUDA_VISIBLE_DEVICES); `on_start(key, device)` as each starts. Returns the keys of the
    jobs that failed."""
    import subprocess
    import time

    queue, running, failed = list(jobs), [], []
    while queue or running:
        while queue and len(running) < len(devices):
            free = [d for d in devices if d not in {r[1] for r in running}][0]
            key, cmd = queue.pop(0)
            if on_start is not None:
                on_start(key, free)
            running.append((subprocess.Popen(cmd, env=dict(os.environ, CUDA_VISIBLE_DEVICES=free)), free, key))
        time.sleep(poll_s)
        for r in list(running):
            if r[0].poll() is not None:
                running.remove(r)
                if r[0].returncode != 0:
                    failed.append(r[2])
    return failed
