"""FSDP2 sharding of the student (``loopfree distill --shard``): its weights, gradients, Adam moments and EMA are
split across the processes of the launch instead of replicated on each.

    torchrun --nproc_per_node 8 -m loopfree distill --config distill.yaml --shard
    accelerate launch --multi_gpu --num_processes 8 -m loopfree distill --config distill.yaml --shard

Each UNet block (every down block, the mid block, every up block) is one ``fully_shard`` unit and the student's
other layers (conv_in, the time and added embeddings, conv_out) the root unit on its
:class:`~loopfree.method.sampler.Generator`: the loop-free forward — encoder once, the K decoders as one batch —
gathers each block once per call and frees it after. Blocks are gathered in the compute dtype (the teacher's), and
gradients reduced in fp32. The frozen teacher and the small LoRA fake score stay replicated (data parallel).

Checkpoints go through ``torch.distributed.checkpoint`` (each process writes its shards, into the run's staged
checkpoint folder); the final student is gathered once, to the main process, into the usual diffusers folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

SHARDED = "sharded"  # the checkpoint's sub-folder written by torch.distributed.checkpoint


def shard_student(generator: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Shard ``generator`` (a Generator around the student UNet) in place: one unit per UNet block, the rest at the
    root. Collective: every process calls it, with the same (identically initialised) weights."""
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    unet = generator.unet
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        fully_shard(block, mp_policy=policy)
    fully_shard(generator, mp_policy=policy)


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
    """The student's whole weights on the CPU of the main process (None elsewhere), keyed like its UNet's state dict;
    with ``ema`` (one shadow per parameter, in order), the EMA's instead of the live ones. Collective."""
    if ema is None:
        full = get_model_state_dict(generator, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("unet."): v for k, v in full.items()} if main else None
    gathered = {}
    for (name, _), shadow in zip(generator.named_parameters(), ema):  # one whole tensor at a time on the device
        whole = shadow.full_tensor().cpu() if isinstance(shadow, DTensor) else shadow.cpu()
        if main:
            gathered[name.removeprefix("unet.")] = whole
    return gathered if main else None
