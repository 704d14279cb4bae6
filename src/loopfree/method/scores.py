"""The frozen teacher ε_ψ and the fake score ε_φ, sharing one UNet (SPEC §3).

The fake score is the teacher with a LoRA adapter named ``fake_score`` switched on (paper: r 64, alpha 108,
on ``to_q``/``to_v``), so a run holds two UNets (student, teacher), not three. Both guided passes can run as
one UNet call: rows routed to peft's ``__base__`` skip the LoRA (the teacher), the others use it.

    scores = TeacherAndFakeScore(unet, schedule, LoraConfig(r=64, lora_alpha=108, target_modules=["to_q", "to_v"]))
    eps_psi, eps_phi = scores.pair(x_t, t, cond, uncond)       # each (2, B, C, H, W): [uncond; cond]

Which network a pass is (adapters on or off, per-row routing) and whether the LoRA takes gradients is the
:class:`Routing` the pass ran under. Gradient checkpointing (:meth:`TeacherAndFakeScore.enable_gradient_checkpointing`)
recomputes a block during backward, after the pass's ``with`` blocks have exited: each recompute runs under the
routing its forward had, so teacher rows stay off the LoRA and the student's loss gives the LoRA no gradient.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Iterator

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.checkpoint import checkpoint

from loopfree.method import repeated_tokens
from loopfree.method.sampler import Conditioning
from loopfree.method.schedule import NoiseSchedule

FAKE = "fake_score"  # the LoRA adapter's name
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch: the frozen base, i.e. the teacher


@contextmanager
def lora_rows(model: torch.nn.Module, adapter_names: list[str]) -> Iterator[None]:
    """Inside, row b of every LoRA layer's input goes through adapter ``adapter_names[b]`` (``__base__``: none).

    peft's mixed-batch inference passes ``adapter_names`` to each ``LoraLayer.forward``; models that peft does
    not wrap (diffusers' ``add_adapter``) have no public way to pass it, so it is handed to the LoRA layers by
    forward pre-hooks that live only for the ``with`` block. ``tests/test_scores.py`` pins the peft behaviour
    this relies on.
    """

    def pass_names(module, args, kwargs):
        return args, {**kwargs, "adapter_names": adapter_names}

    handles = [m.register_forward_pre_hook(pass_names, with_kwargs=True) for m in model.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class Routing:
    """Which network a pass through the shared UNet is, row by row, and whether the LoRA takes its gradients."""

    rows: tuple[str, ...] | None = None  # the adapter of each row (``__base__``: the teacher); None: as ``adapters``
    adapters: bool = True  # False: every row is the teacher
    lora_grad: bool = True  # False: the LoRA takes no gradient (the student's loss)


def add_frozen_adapter(model: torch.nn.Module, lora: LoraConfig, name: str, weight_dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Freeze ``model`` in ``weight_dtype`` (the compute dtype) and give it the LoRA adapter ``name`` in float32; the
    adapter's parameters, the only ones that train."""
    model.requires_grad_(False)
    if weight_dtype != torch.float32:
        model.to(weight_dtype)
    model.add_adapter(lora, name)
    cast_training_params(model, dtype=torch.float32)
    return [p for p in model.parameters() if p.requires_grad]


class TeacherAndFakeScore:
    """ε_ψ and ε_φ on one frozen base UNet; only the LoRA (``params``) trains."""

    def __init__(self, unet: UNet2DConditionModel | SD3Transformer2DModel, schedule: NoiseSchedule, lora: LoraConfig,
                 weight_dtype: torch.dtype = torch.float32, batch_pair: bool = True):
        self.schedule, self.batch_pair = schedule, batch_pair
        self.params = add_frozen_adapter(unet, lora, FAKE, weight_dtype)
        self.base = unet
        self.trainable: torch.nn.Module = unet  # the fake score for training steps (the trainer wraps it for DDP)
        self.routing = Routing()

    @contextmanager
    def routed(self, routing: Routing) -> Iterator[None]:
        """Inside, the UNet runs under ``routing``; the routing before is restored on exit."""
        before = self.routing
        self._apply(routing)
        try:
            with lora_rows(self.base, list(routing.rows)) if routing.rows else nullcontext():
                yield
        finally:
            self._apply(before)

    def _apply(self, routing: Routing) -> None:
        self.routing = routing
        if routing.adapters:
            self.base.enable_adapters()
        else:
            self.base.disable_adapters()
        for p in self.params:
            p.requires_grad_(routing.lora_grad)

    def teacher(self) -> AbstractContextManager[None]:
        """Inside, the base UNet is the teacher (adapters off)."""
        return self.routed(replace(self.routing, adapters=False))

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint the UNet's blocks (non-reentrant); a block's recompute runs under the routing of its forward."""

        def checkpointed(module: torch.nn.Module, *args):
            contexts = lambda: (nullcontext(), self.routed(self.routing))  # noqa: E731 - called at the block's forward
            return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)

        self.base.enable_gradient_checkpointing(checkpointed)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, c: Conditioning, model: torch.nn.Module | None = None) -> torch.Tensor:
        """The network's noise prediction (adapters as currently routed) in float32: v-predictions and flow
        velocities converted, a flow model called on x_σ = c_t x_t at σ_t·T (the schedule's ``model_input``)."""
        net = model if model is not None else self.base
        dtype = self.base.dtype
        x, step = self.schedule.model_input(x_t, t).to(dtype), self.schedule.model_timestep(t)
        if isinstance(self.base, UNet2DConditionModel):
            out = net(x, step, c.text.to(dtype), added_cond_kwargs=c.added).sample
        elif isinstance(self.base, SD3Transformer2DModel):  # rectified flow: a velocity; zero text rows run as one
            c, attention = repeated_tokens.compact_zero_rows(self.base, c)
            out = net(hidden_states=x, timestep=step, encoder_hidden_states=c.text.to(dtype),
                      pooled_projections=c.added["pooled_projections"].to(dtype), joint_attention_kwargs=attention).sample
        else:
            raise TypeError(f"scores of a {type(self.base).__name__} are not built yet (UNets and SD3 transformers)")
        return self.schedule.to_epsilon(out.float(), x_t, t)

    def fake(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning,
             keep: torch.Tensor) -> torch.Tensor:
        """ε_φ with gradients to the LoRA, through the (possibly DDP-wrapped) trainable module. Row n of ``x_t`` takes
        prompt n mod B of ``cond`` (B rows; ``x_t`` may repeat the batch), or ``uncond``'s where ``keep[n]`` is False."""
        reps = x_t.shape[0] // cond.text.shape[0]
        c = Conditioning.cat([cond] * reps).where(keep, Conditioning.cat([uncond] * reps))
        return self.eps(x_t, t, c, self.trainable)

    def pair(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε_ψ, ε_φ), each (2, B, …) = [unconditional; conditional], for classifier-free guidance, the LoRA frozen
        (the student's loss; gradients to x_t as the caller's grad mode says: the objective decides).

        The unconditional and conditional halves always share a call; with ``batch_pair`` the teacher's and the
        fake score's passes share one too (teacher rows skip the LoRA), else they are two calls.
        """
        c = Conditioning.cat([uncond, cond])
        x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
        frozen = replace(self.routing, lora_grad=False)
        if self.batch_pair:
            with self.routed(replace(frozen, rows=(BASE,) * len(x2) + (FAKE,) * len(x2))):
                eps = self.eps(torch.cat([x2, x2]), torch.cat([t2, t2]), Conditioning.cat([c, c]))
            eps_teacher, eps_fake = eps.chunk(2)
        else:
            with self.routed(replace(frozen, adapters=False)):
                eps_teacher = self.eps(x2, t2, c)
            with self.routed(frozen):
                eps_fake = self.eps(x2, t2, c)
        return torch.stack(eps_teacher.chunk(2)), torch.stack(eps_fake.chunk(2))

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return get_peft_model_state_dict(self.base, adapter_name=FAKE)

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        set_peft_model_state_dict(self.base, state, adapter_name=FAKE)
