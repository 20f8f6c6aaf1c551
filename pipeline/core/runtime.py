"""Runtime choices shared by the stages: device, mixed precision, DataLoader construction."""
from __future__ import annotations

import os

import torch

from .config import Config
from .distributed import Dist
from .errors import PipelineError


def pick_device(cfg: Config, dist: Dist) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("config device=cuda but no CUDA device is available")
    if cfg.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.train.amp == "off":
        return None
    if cfg.train.amp == "fp16":
        return torch.float16
    if cfg.train.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def workers(cfg: Config) -> int:
    if cfg.train.workers is not None:
        return cfg.train.workers
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(dataset, batch_sampler=None, batch_size=None, n_workers=0, cuda=False, indices=None):
    from torch.utils.data import DataLoader, Subset

    if indices is not None:
        dataset = Subset(dataset, indices)
    # its own generator: creating an iterator must not draw from the global RNG that dropout uses,
    # or a resumed run (which creates its persistent workers at another epoch) would drift
    return DataLoader(dataset, batch_sampler=batch_sampler, batch_size=batch_size if batch_sampler is None else 1,
                      shuffle=False, num_workers=n_workers, pin_memory=cuda, generator=torch.Generator(),
                      persistent_workers=n_workers > 0 and batch_sampler is not None)


