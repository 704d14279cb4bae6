"""One distillation iteration with its infrastructure: the three networks, optimisers, EMA, autocast, clipping.

The losses are the objective's (:mod:`loopfree.method.objective`); the teacher and fake score are
:class:`~loopfree.method.scores.TeacherAndFakeScore`. The loop around it is :mod:`loopfree.training.trainer`::

    distiller = Distiller(cfg, pipe.unet, pipe.scheduler, accelerator, latent_size=64)
    logs = distiller.step([Batch(cond, uncond)])    # one Batch per micro-batch (--gradient-accumulation-steps)

With N micro-batches of B prompts a step draws its randomness (x_T, the noisings) for its N·B prompts at once, as
one batch of N·B would, and hands each micro-batch its rows: with the same draws the step is that batch's step.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch
from accelerate import Accelerator
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from loopfree.training.clip_loss import ClipAlignment
from loopfree.training.config import DistillConfig
from loopfree.training.student_lora import adapter_state, add_student_lora, load_adapter_state
from loopfree.training.sharding import (clip_grad_norm, full_weights, load_sharded, sample_sharded, save_sharded, shard_student,
                                        swapped)
from loopfree.method.objective import (SiD, VSD, FakeScore, FakeScoreLoss, Noising, StudentLoss, clip_weight_at,
                                       regression_loss)
from loopfree.method import flow, split_sd3
from loopfree.method.sampler import Conditioning, Generator
from loopfree.method.schedule import NoiseSchedule, decoder_timesteps
from loopfree.method.scores import TeacherAndFakeScore
from loopfree.utils.errors import LoopfreeError
from loopfree.utils.timing import Sections

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
T = TypeVar("T")


def student_timesteps(cfg: DistillConfig, scheduler, recorded: list | None = None) -> tuple[list, float | None]:
    """The student's decoder timesteps and its ā_final override (one-step: [T] and 1.0); a ``recorded`` plan of the
    initial student (``--student-init``) is kept when ``cfg`` asks for its K and no explicit timesteps. A flow
    teacher's (SD3): decoder σ's, the scheduler's for K (one-step: [1.0], x_0 = x_T − v)."""
    scheduler_config = scheduler.config
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if cfg.timesteps is not None:
            raise LoopfreeError("a rectified-flow teacher's student is planned by --steps (decoder sigmas), not --timesteps")
        if cfg.student == "one-step":
            return [1.0], None
        if recorded and len(recorded) == cfg.steps:
            return list(recorded), None
        return flow.decoder_sigmas(scheduler_config, cfg.steps), None
    if cfg.student == "one-step":
        return [cfg.one_step_timestep], 1.0
    if cfg.timesteps is None and recorded and len(recorded) == cfg.steps:
        return list(recorded), None
    return cfg.timesteps or decoder_timesteps(scheduler_config, cfg.steps), None


def fake_lora(cfg: DistillConfig) -> LoraConfig:
    """The fake score's LoRA on the teacher's UNet."""
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_targets)


def losses(cfg: DistillConfig, schedule: NoiseSchedule) -> tuple[StudentLoss, FakeScoreLoss]:
    """The student's loss (VSD or SiD + λ·KL) and the fake score's, with ``cfg``'s settings."""
    score_loss = SiD(cfg.sid_alpha) if cfg.objective == "sid" else VSD()
    return (StudentLoss(schedule, score_loss, cfg.guidance, cfg.guidance_fake, cfg.t_min, cfg.t_max, cfg.kl_weight,
                        cfg.kl_reduction),
            FakeScoreLoss(schedule, cfg.fake_cfg_dropout, cfg.guidance_fake_train))


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """The learning-rate multiplier at ``step`` (0-based): linear warm-up from 0 over ``warmup`` steps, then constant
    or a linear / half-cosine decay to 0 at ``total`` (diffusers' ``get_scheduler`` schedules, stateless)."""
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(1, total - warmup), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


@dataclass
class Batch:
    """One micro-batch: its prompts' conditioning and the empty prompt's, the prompts themselves (the CLIP loss) and
    teacher pairs (conditioning, x_T, teacher x_0) for the regression term."""

    cond: Conditioning
    uncond: Conditioning
    prompts: list[str] | None = None
    pairs: tuple[Conditioning, torch.Tensor, torch.Tensor] | None = None


class Distiller:
    """Teacher ε_ψ, fake score ε_φ (teacher + LoRA), student ε_θ (+ EMA), their optimisers, and one step."""

    def __init__(self, cfg: DistillConfig, unet: UNet2DConditionModel | SD3Transformer2DModel, scheduler, accelerator: Accelerator,
                 latent_size: int | tuple[int, int], init: tuple[UNet2DConditionModel, list[int] | None] | None = None):
        """``init``: a distilled student's UNet and recorded decoder timesteps to start from (else the teacher)."""
        self.cfg, self.acc = cfg, accelerator
        self.latent_size = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
        self.latent_channels = unet.config.in_channels
        schedule = NoiseSchedule.from_scheduler(scheduler)
        self.timesteps, self.final_alpha_cumprod = student_timesteps(cfg, scheduler, init[1] if init else None)

        # -- student ε_θ: a full trainable copy of the teacher (sharded with cfg.shard), or a frozen copy with a LoRA
        # (cfg.student_lora_rank: only the adapter trains), with an EMA of what trains
        weight_dtype = WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)
        student = copy.deepcopy(unet)
        if init is not None:
            student.load_state_dict(init[0].state_dict())
        student = student.to(accelerator.device).train()
        if cfg.student_lora_rank:
            add_student_lora(student, cfg, weight_dtype)
        else:
            student.requires_grad_(True)
        # -- teacher ε_ψ and fake score ε_φ on the same frozen weights
        lora = fake_lora(cfg)
        self.scores = TeacherAndFakeScore(unet.to(accelerator.device), schedule, lora, weight_dtype, cfg.batch_teacher_fake)
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
            self.scores.enable_gradient_checkpointing()
        self.student = student
        self.lora_params = self.scores.params

        def adam(params, lr):  # fused: one kernel for all tensors (on a CPU 17× faster than the per-tensor loop)
            return torch.optim.AdamW(
                params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
                fused=accelerator.device.type in ("cpu", "cuda"),
            )

        if isinstance(student, SD3Transformer2DModel):  # sharded: a unit per joint block, whose own forward the split calls
            generator = split_sd3.Generator(student, self.timesteps, cfg.shared_blocks,
                                            scheduler.config.num_train_timesteps)
        else:
            student_schedule = NoiseSchedule.from_scheduler(scheduler, self.final_alpha_cumprod)
            # sharded: FSDP2's units fire on each block's own forward, which the plain decoder path calls
            generator = Generator(student, student_schedule, self.timesteps, hoist=not cfg.shard)
        if cfg.shard:
            shard_student(generator, weight_dtype)
        self.student_params = [p for p in student.parameters() if p.requires_grad]  # sharded: DTensors, 1/N of each here
        opt_student, opt_fake = adam(self.student_params, cfg.lr_student), adam(self.lora_params, cfg.lr_fake)
        if cfg.shard:  # the student is ours to keep; accelerate wraps only the replicated fake score
            self.generator, self.opt_student = generator, opt_student
            self.scores.trainable, self.opt_fake = accelerator.prepare(self.scores.base, opt_fake)
        else:  # data parallel: accelerate wraps the student too
            self.generator, self.scores.trainable, self.opt_student, self.opt_fake = accelerator.prepare(
                generator, self.scores.base, opt_student, opt_fake)
        self.ema = EMAModel(self.student_params, decay=cfg.ema_decay, use_ema_warmup=False, foreach=True)  # sharded as they are
        self.student_loss, self.fake_loss = losses(cfg, schedule)
        self.clip = None  # the CLIP hinge's frozen tiny decoder and CLIP model, in the compute dtype
        if cfg.clip_margin > 0:
            self.clip = ClipAlignment(cfg.clip, cfg.tiny_vae, cfg.clip_margin, accelerator.device, weight_dtype)
        self.iteration = 0  # steps taken: the learning-rate schedules' position (set on resume)
        # checkpoints hold the student, the LoRA and the EMA (save_weights), never a copy of the frozen teacher
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())

    def step(self, batches: list[Batch], sections: Sections | None = None) -> dict[str, float]:
        """One distillation iteration on ``cfg.gradient_accumulation_steps`` micro-batches of as many prompts each: the
        gradients of all of them, then one update of each network. Returns the logged scalars, as of one batch of the
        step's prompts."""
        acc, cfg = self.acc, self.cfg
        if len(batches) != cfg.gradient_accumulation_steps:
            raise ValueError(f"a step takes {cfg.gradient_accumulation_steps} micro-batches, got {len(batches)}")
        sections = sections or Sections(acc.device)
        for opt, schedule, lr in ((self.opt_student, cfg.lr_schedule, cfg.lr_student), (self.opt_fake, cfg.lr_fake_schedule, cfg.lr_fake)):
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(schedule, self.iteration, cfg.lr_warmup_steps, cfg.max_steps)
        n, b = len(batches), batches[0].cond.text.shape[0]
        # every draw of the step, for its n·b prompts in the order one batch of them makes it (n = 1: the draws as ever)
        x_T = torch.randn(n * b, self.latent_channels, *self.latent_size, device=acc.device)
        noising = self.student_loss.draw(x_T)
        fake_noisings = [self.fake_loss.draw(x_T) for _ in range(cfg.fake_updates)]
        rows = [(m * b, (m + 1) * b) for m in range(n)]  # micro-batch m's rows of the draws

        # -- student update on L_score + λ_KL · L_KL (+ λ_reg · L_reg on teacher pairs, + w_s · L_clip)
        logs: dict[str, float] = {}
        x0s = []
        for m, batch in enumerate(batches):
            with acc.no_sync(self.generator) if m < n - 1 else nullcontext():  # gradients all-reduced once, at the last
                x0, terms = self._student_backward(batch, x_T[slice(*rows[m])], noising.rows(*rows[m]), 1 / n, sections)
            x0s.append(x0)
            for name, value in terms.items():  # as of one batch of the step's prompts: means, a summed KL summed
                logs[name] = logs.get(name, 0.0) + value * (1 if name == "loss/kl" and cfg.kl_reduction == "sum" else 1 / n)
        with sections("student forward+backward"):
            grad_student = (clip_grad_norm(self.student_params, cfg.max_grad_norm) if cfg.shard
                            else acc.clip_grad_norm_(self.student_params, cfg.max_grad_norm))
            self.opt_student.step()
            self.opt_student.zero_grad(set_to_none=True)
            self.ema.step(self.student_params)

        # -- fake-score updates on sg(x_0)
        with sections("fake-score update"):
            for fake_noising in fake_noisings:
                loss_fake = 0.0
                for m, (batch, x0) in enumerate(zip(batches, x0s)):
                    with acc.no_sync(self.scores.trainable) if m < n - 1 else nullcontext():
                        loss = self.fake_loss(x0, self._fake(batch), fake_noising.rows(*rows[m]))
                        acc.backward(loss / n)
                    loss_fake += loss.item() / n
                grad_fake = acc.clip_grad_norm_(self.lora_params, cfg.max_grad_norm)
                self.opt_fake.step()
                self.opt_fake.zero_grad(set_to_none=True)
        self.iteration += 1
        return {**logs, "loss/fake_mse": loss_fake, "grad_norm/student": float(grad_student), "grad_norm/fake": float(grad_fake),
                "lr/student": self.opt_student.param_groups[0]["lr"], "lr/fake": self.opt_fake.param_groups[0]["lr"]}

    def _student_backward(self, batch: Batch, x_T: torch.Tensor, noising: Noising, share: float,
                          sections: Sections) -> tuple[torch.Tensor, dict[str, float]]:
        """The student loss of one micro-batch, ``share`` of the step's prompts, back-propagated; returns sg(x_0) and the
        loss terms."""
        acc, cfg = self.acc, self.cfg
        # -- student forward (SPEC §2): x_0 and its K·B noise predictions, with gradient
        with sections("student forward+backward"), acc.autocast():
            x0, eps = self.generator(x_T, batch.cond.text, batch.cond.added)

        def scores(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with sections("teacher+fake guided passes"), acc.autocast():
                return self.scores.pair(x_t, t, batch.cond, batch.uncond)

        student = self.student_loss(x0.float(), eps, scores, noising, share)
        loss = student["loss"]
        terms = {f"loss/{cfg.objective}": student["score"], "loss/kl": student["kl"]}
        if batch.pairs is not None:
            pair_cond, pair_x_T, pair_x0 = batch.pairs
            with sections("student forward+backward"), acc.autocast():
                x0_pairs, _ = self.generator(pair_x_T, pair_cond.text, pair_cond.added)
            terms["loss/regression"] = regression_loss(x0_pairs, pair_x0)
            loss = loss + share * cfg.regression_weight * terms["loss/regression"]
        if self.clip is not None:
            with sections("CLIP loss"), acc.autocast():
                terms["loss/clip"] = self.clip(x0, self.clip.text_embeds(batch.prompts))
            weight = clip_weight_at(self.iteration, cfg.clip_weight, cfg.clip_weight_steps or cfg.max_steps)
            loss = loss + share * weight * terms["loss/clip"]
        with sections("student forward+backward"):
            acc.backward(loss)
        return x0.detach(), {name: value.item() for name, value in terms.items()}

    def _fake(self, batch: Batch) -> FakeScore:
        """The fake score ε_φ on ``batch``'s prompts (FakeScore), under autocast."""

        def fake(x_t: torch.Tensor, t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
            with self.acc.autocast():
                return self.scores.fake(x_t, t, batch.cond, batch.uncond, keep)

        return fake

    # -- checkpoint parts that accelerate doesn't write itself: student, LoRA, EMA
    def save_weights(self, directory: Path, max_shard_size: str | int = "10GB") -> None:
        """The student as a diffusers model folder (sharded above ``max_shard_size``), the LoRA and the EMA; with
        ``shard``, the student's, its optimiser's and the EMA's shards (torch.distributed.checkpoint). Every process
        calls it; only the main one writes the replicated parts."""
        if self.cfg.shard:
            save_sharded(directory, self.generator, self.opt_student, self.ema.shadow_params)
        if not self.acc.is_main_process:
            return
        save_file(self.scores.lora_state_dict(), directory / "fake_lora.safetensors")
        if self.cfg.shard:
            return
        if self.cfg.student_lora_rank:
            save_file(adapter_state(self.student), directory / "student_lora.safetensors")
        else:
            self.student.save_pretrained(directory / "student", safe_serialization=True, max_shard_size=max_shard_size)
        named = dict(zip(self._trained_names(), self.ema.shadow_params, strict=True))
        save_file({k: v.contiguous() for k, v in named.items()}, directory / "ema.safetensors")

    def _trained_names(self) -> list[str]:
        """The names of the student's trained parameters (all of them, or its adapter's), as ``student_params``."""
        return [n for n, p in self.student.named_parameters() if p.requires_grad]

    def load_weights(self, directory: Path, ema_step: int) -> None:
        """Inverse of :meth:`save_weights`; the student through diffusers' own loading (any sharding). Every process
        calls it."""
        self.scores.load_lora_state_dict(load_file(directory / "fake_lora.safetensors"))
        self.ema.optimization_step = ema_step
        if self.cfg.shard:
            load_sharded(directory, self.generator, self.opt_student, self.ema.shadow_params)
            return
        if self.cfg.student_lora_rank:
            load_adapter_state(self.student, load_file(directory / "student_lora.safetensors"))
        else:
            saved = type(self.student).from_pretrained(directory / "student", use_safetensors=True)
            self.student.load_state_dict(saved.state_dict())
            del saved
        ema = load_file(directory / "ema.safetensors")
        for name, shadow in zip(self._trained_names(), self.ema.shadow_params, strict=True):
            shadow.data.copy_(ema[name])

    def with_student(self, use: Callable[[UNet2DConditionModel], T], ema: bool) -> T | None:
        """``use(unet)`` with the student as a plain UNet, for validation and scoring during the run: its EMA weights
        if ``ema`` (traded in place with the live ones and back, bit for bit). Data parallel: on the main process
        (None elsewhere). Sharded: on every process together, with the sharded student itself under autocast —
        each block gathered in the compute dtype while it runs, never a whole fp32 copy — so ``use`` must make the
        same calls on every process. ``use`` gets the live student module: it must leave it as it found it. Every
        process calls it."""
        if not (self.cfg.shard or self.acc.is_main_process):
            return None
        with swapped(self.student_params, self.ema.shadow_params) if ema else nullcontext():
            if not self.cfg.shard:
                return use(self.student)
            with self.acc.autocast():
                return sample_sharded(self.generator, lambda: use(self.student))

    def full_student(self, ema: bool) -> UNet2DConditionModel | None:
        """The student as a plain UNet on the main process (None elsewhere), to publish: a copy with the EMA weights
        if ``ema``, else the live one (sharded: gathered to the CPU, then a copy on the device). Every process calls
        it (sharded: a collective gather)."""
        main = self.acc.is_main_process
        if self.cfg.shard:
            weights = full_weights(self.generator, self.ema.shadow_params if ema else None, main)
            if not main:
                return None
            unet = type(self.student).from_config(self.student.config)
            unet.load_state_dict(weights)
            return unet.to(self.acc.device)
        if not main:
            return None
        if not ema:
            return self.student
        unet = copy.deepcopy(self.student)
        self.ema.copy_to([p for p in unet.parameters() if p.requires_grad])
        return unet
