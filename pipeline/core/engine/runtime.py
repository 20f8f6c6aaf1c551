"""Runtime choices shared by the stages: device, mixed precision, memory format, compilation, backend
flags, DataLoader construction.

One code path for every device: autocast (bf16 or fp16), channels_last and torch.compile mean the
same on CPU and GPU and run on both, so the CPU test suite exercises the GPU code paths. What cannot
exist on a CPU (set_device, pinned memory, cuDNN and TF32 flags) is a one-line `if cuda` here.
"""
from __future__ import annotations

import os

import torch

from ..config import TrainCfg
from .distributed import Dist
from ..errors import PipelineError


def pick_device(want: str, dist: Dist) -> torch.device:
    if want == "cuda" and not torch.cuda.is_available():
        raise PipelineError("config device=cuda but no CUDA device is available")
    if want != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The one autocast of every forward pass (training, inference, features, doctor): `dtype` None is fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32). auto: bf16 on GPUs that support it, else fp16; fp32 on CPU.
    bf16 on CPU runs (and is tested) but is opt-in: on this project's CPUs (AVX512-BF16) it trains
    1.4x faster than fp32 and scores within seed noise of it, yet oneDNN's bf16 kernels do not give
    bit-identical weights from run to run, which the CPU resume guarantee needs (docs/reliability.md)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def memory_format(train: TrainCfg, device: torch.device | None = None) -> torch.memory_format:
    """channels_last on GPU by default; on CPU only when asked (fp32 convolutions are slower in NHWC
    there, and bf16 + NHWC is not bit-identical from run to run)."""
    on = train.channels_last == "on" or (train.channels_last == "auto" and device is not None
                                              and device.type == "cuda")
    return torch.channels_last if on else torch.contiguous_format


def prepare_model(train: TrainCfg, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model on its device in the configured memory format (the same on CPU and GPU)."""
    return model.to(device=device, memory_format=memory_format(train, device))


def maybe_compile(train: TrainCfg, net: torch.nn.Module) -> torch.nn.Module:
    """torch.compile where asked (inductor: a C++ compiler on CPU, Triton on GPU)."""
    return torch.compile(net) if train.compile else net


def set_backend_flags(train: TrainCfg, device: torch.device) -> None:
    """cuDNN autotuning and TF32 (GPU only; CPU runs are deterministic with a fixed seed anyway).
    deterministic auto/off: cudnn.benchmark picks the fastest kernels (runs are then not bitwise
    reproducible on GPU); on: deterministic cuDNN kernels, slower."""
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = train.deterministic != "on"
    torch.backends.cudnn.deterministic = train.deterministic == "on"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = train.tf32


def workers(train: TrainCfg) -> int:
    if train.workers is not None:
        return train.workers
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(dataset, batch_sampler=None, batch_size=None, n_workers=0, cuda=False, indices=None,
                persistent: bool = False):
    """A DataLoader with pinned memory on GPU, prefetching workers and (for loaders iterated every
    epoch) persistent workers."""
    from torch.utils.data import DataLoader, Subset

    if indices is not None:
        dataset = Subset(dataset, indices)
    # its own generator: creating an iterator must not draw from the global RNG that dropout uses,
    # or a resumed run (which creates its persistent workers at another epoch) would drift
    return DataLoader(dataset, batch_sampler=batch_sampler, batch_size=batch_size if batch_sampler is None else 1,
                      shuffle=False, num_workers=n_workers, pin_memory=cuda, generator=torch.Generator(),
                      persistent_workers=n_workers > 0 and (persistent or batch_sampler is not None),
                      prefetch_factor=(4 if cuda else 2) if n_workers > 0 else None)

