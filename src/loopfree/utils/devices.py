"""Devices and precisions by name: ``cpu``/``cuda:N``/``mps`` and ``fp32``/``fp16``/``bf16``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from loopfree.utils.vocabulary import DTYPES

from loopfree.utils.errors import LoopfreeError

TORCH_DTYPES = dict(zip(DTYPES, (torch.float32, torch.float16, torch.bfloat16)))


def resolve_device(name: str | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``; default: cuda if available. Unknown/unavailable → LoopfreeError."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LoopfreeError(f"unknown device {name!r} (use cpu, cuda, cuda:N or mps)") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise LoopfreeError(f"unsupported device {name!r} (use cpu, cuda, cuda:N or mps)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoopfreeError(f"device {name!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LoopfreeError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LoopfreeError("device 'mps' requested but MPS is not available on this machine")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for ``name`` on ``device``; fp16 needs a GPU (CPU kernels for it are missing or slow)."""
    if name not in DTYPES:
        raise LoopfreeError(f"unknown dtype {name!r} (use {', '.join(DTYPES)})")
    if name == "fp16" and device.type == "cpu":
        raise LoopfreeError("fp16 needs a GPU; use --dtype bf16 on a CPU")
    return TORCH_DTYPES[name]


@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``n`` inside, restored after (None: unchanged)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Inside, with ``enabled``, CUDA matmuls and cuDNN convolutions may use TF32 (Ampere and newer GPUs; diffusers'
    training scripts' ``--allow_tf32``), restored after; else torch's own settings. Nothing changes on a CPU."""
    if not enabled:
        yield
        return
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    before = [f.allow_tf32 for f in flags]
    for f in flags:
        f.allow_tf32 = True
    try:
        yield
    finally:
        for f, value in zip(flags, before):
            f.allow_tf32 = value
