"""FSDP2 sharding of the student (``loopfree distill --shard``): its weights, gradients, Adam moments and EMA are
split across the processes of the launch instead of replicated on each.

    torchrun --nproc_per_node 8 -m loopfree distill --config distill.yaml --shard
    accelerate launch --multi_gpu --num_processes 8 -m loopfree distill --config distill.yaml --shard

Each UNet block (every down block, the mid block, every up block) — an SD3 transformer's: each joint block — is one
``fully_shard`` unit and the student's other layers (conv_in, the time and added embeddings, conv_out; the patch,
text and time embeddings, the final norm and projection) the root unit on its generator
(:class:`~loopfree.method.sampler.Generator`, :class:`~loopfree.method.split_sd3.Generator`): the loop-free forward —
the shared part once, the K per-step parts as one batch — gathers each block once per call and frees it after. Blocks are gathered in the compute dtype (the teacher's), and
gradients reduced in fp32. The frozen teacher and the small LoRA fake score stay replicated (data parallel).

Validation and scoring sample with the sharded student itself (:func:`sample_sharded`: every process runs the same
calls, each block gathered while it runs), never a whole fp32 copy. Checkpoints go through
``torch.distributed.checkpoint`` (each process writes its shards, into the run's staged checkpoint folder; a run
resumed with another process count reads them resharded); the final student is gathered once, to the main
process, into the usual diffusers folder.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from loopfree.method import split
from loopfree.method.runtime import PASSES_ATTR, Passes

SHARDED = "sharded"  # the checkpoint's sub-folder written by torch.distributed.checkpoint
T = TypeVar("T")


def _plain_decoders(unet, feats: split.EncoderFeatures, timesteps, hoist: bool = True) -> torch.Tensor:
    """:func:`~loopfree.method.split.run_decoders` on the plain path whatever ``hoist`` asks: the hoisted one reaches
    inside the up blocks, past their FSDP units."""
    return split.run_decoders(unet, feats, timesteps, hoist=False)


def _student(generator: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The student network in ``generator`` and its attribute name: a UNet Generator's ``unet``, an SD3 one's ``model``."""
    name = "unet" if hasattr(generator, "unet") else "model"
    return name, getattr(generator, name)


def shard_student(generator: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Shard ``generator`` (a generator around the student UNet or SD3 transformer) in place: one unit per block, the
    rest at the root. Collective: every process calls it, with the same (identically initialised) weights."""
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    name, student = _student(generator)
    unet = name == "unet"
    for block in [*student.down_blocks, student.mid_block, *student.up_blocks] if unet else student.transformer_blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(generator, mp_policy=policy)
    register_fsdp_forward_method(generator, "sample")  # sample_sharded: the root's layers gathered around a sampling
    if unet:  # any one-pass call on it, pipelines' too (the SD3 split calls each block's own forward already)
        setattr(student, PASSES_ATTR, Passes(split.run_encoder, _plain_decoders))


def sample_sharded(generator: torch.nn.Module, use: Callable[[], T]) -> T:
    """``use()`` sampling the sharded student in ``generator`` as if it were a plain one (a pipeline around it, any
    mode): the root unit's layers (conv_in, embeddings, conv_out, or their transformer kin) gathered around the call, each block by its own
    unit while it runs, all in the compute dtype; resharded after. Collective: every process makes the same calls."""
    try:
        return generator.sample(use)
    finally:
        generator.reshard()  # the root keeps its layers gathered after a forward: training must gather them afresh


@contextmanager
def swapped(params: list[torch.Tensor], shadows: list[torch.Tensor]) -> Iterator[None]:
    """Inside, ``params`` hold the values of ``shadows`` (an EMA's) and the shadows theirs; traded back after, bit for
    bit. In place, one tensor at a time: each process trades its own shards, with no communication."""
    def trade() -> None:
        with torch.no_grad():
            for p, s in zip(params, shadows, strict=True):
                a, b = (t.to_local() if isinstance(t, DTensor) else t for t in (p, s))
                kept = a.clone()
                a.copy_(b)
                b.copy_(kept)

    trade()
    try:
        yield
    finally:
        trade()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the sharded gradients of ``params`` to a total norm of ``max_norm``; the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def _state(generator: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: list[torch.Tensor]) -> dict:
    model, optim = get_state_dict(generator, optimizer)
    return {"student": model, "optimizer": optim, "ema": {str(i): shadow for i, shadow in enumerate(ema)}}


def save_sharded(directory: Path, generator: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: list[torch.Tensor]) -> None:
    """The student's shards, its optimiser's and its EMA's (DTensors) into ``directory/sharded``. Collective."""
    dcp.save(_state(generator, optimizer, ema), checkpoint_id=str(directory / SHARDED))


def load_sharded(directory: Path, generator: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: list[torch.Tensor]) -> None:
    """Inverse of :func:`save_sharded`, in place. Collective."""
    state = _state(generator, optimizer, ema)
    dcp.load(state, checkpoint_id=str(directory / SHARDED))
    set_state_dict(generator, optimizer, model_state_dict=state["student"], optim_state_dict=state["optimizer"])
    # the EMA's DTensors were loaded in place


def full_weights(generator: torch.nn.Module, ema: list[torch.Tensor] | None, main: bool) -> dict[str, torch.Tensor] | None:
    """The student's whole weights on the CPU of the main process (None elsewhere), keyed like its own state dict;
    with ``ema`` (one shadow per parameter, in order), the EMA's instead of the live ones. Collective."""
    prefix = _student(generator)[0] + "."
    if ema is None:
        full = get_model_state_dict(generator, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix(prefix): v for k, v in full.items()} if main else None
    gathered = {}
    for (name, _), shadow in zip(generator.named_parameters(), ema):  # one whole tensor at a time on the device
        whole = shadow.full_tensor().cpu() if isinstance(shadow, DTensor) else shadow.cpu()
        if main:
            gathered[name.removeprefix(prefix)] = whole
    if main:  # the persistent buffers (an SD3 transformer's position embedding): replicated, not sharded
        keys = _student(generator)[1].state_dict().keys()
        gathered |= {k: b.cpu() for k, b in ((n.removeprefix(prefix), b) for n, b in generator.named_buffers()) if k in keys}
    return gathered if main else None
