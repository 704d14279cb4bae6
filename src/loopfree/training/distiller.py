"""One distillation iteration with its infrastructure: the three networks, optimisers, EMA, autocast, clipping.

The losses are the objective's (:mod:`loopfree.method.objective`); the teacher and fake score are
:class:`~loopfree.method.scores.TeacherAndFakeScore`. The loop around it is :mod:`loopfree.training.trainer`::

    distiller = Distiller(cfg, pipe.unet, pipe.scheduler, accelerator, latent_size=64)
    logs = distiller.step(cond, uncond)                      # + pairs=(cond, x_T, x_0 teacher) for λ_reg > 0
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from loopfree.training.clip_loss import ClipAlignment
from loopfree.training.config import DistillConfig
from loopfree.training.sharding import clip_grad_norm, full_weights, load_sharded, save_sharded, shard_student
from loopfree.method.objective import SiD, VSD, FakeScoreLoss, StudentLoss, regression_loss
from loopfree.method.sampler import Conditioning, Generator
from loopfree.method.schedule import NoiseSchedule, decoder_timesteps
from loopfree.method.scores import TeacherAndFakeScore
from loopfree.utils.timing import Sections

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def student_timesteps(cfg: DistillConfig, scheduler_config, recorded: list[int] | None = None) -> tuple[list[int], float | None]:
    """The student's decoder timesteps and its ā_final override (one-step: [T] and 1.0); a ``recorded`` plan of the
    initial student (``--student-init``) is kept when ``cfg`` asks for its K and no explicit timesteps."""
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
            FakeScoreLoss(schedule, cfg.fake_cfg_dropout))


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


@contextmanager
def frozen(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Inside, ``params`` take no gradient (the fake score inside the student's SiD loss)."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class Distiller:
    """Teacher ε_ψ, fake score ε_φ (teacher + LoRA), student ε_θ (+ EMA), their optimisers, and one step."""

    def __init__(self, cfg: DistillConfig, unet: UNet2DConditionModel, scheduler, accelerator: Accelerator,
                 latent_size: int | tuple[int, int], init: tuple[UNet2DConditionModel, list[int] | None] | None = None):
        """``init``: a distilled student's UNet and recorded decoder timesteps to start from (else the teacher)."""
        self.cfg, self.acc = cfg, accelerator
        self.latent_size = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
        self.latent_channels = unet.config.in_channels
        schedule = NoiseSchedule.from_scheduler(scheduler)
        self.timesteps, self.final_alpha_cumprod = student_timesteps(cfg, scheduler.config, init[1] if init else None)

        # -- student ε_θ: a full trainable copy of the teacher (sharded with cfg.shard), with an EMA
        student = copy.deepcopy(unet)
        if init is not None:
            student.load_state_dict(init[0].state_dict())
        student = student.to(accelerator.device).train().requires_grad_(True)
        # -- teacher ε_ψ and fake score ε_φ on the same frozen weights
        lora = fake_lora(cfg)
        weight_dtype = WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)
        self.scores = TeacherAndFakeScore(unet.to(accelerator.device), schedule, lora, weight_dtype, cfg.batch_teacher_fake)
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
            self.scores.base.enable_gradient_checkpointing()
        self.student = student
        self.lora_params = self.scores.params

        def adam(params, lr):  # fused: one kernel for all tensors (on a CPU 17× faster than the per-tensor loop)
            return torch.optim.AdamW(
                params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
                fused=accelerator.device.type in ("cpu", "cuda"),
            )

        student_schedule = NoiseSchedule.from_scheduler(scheduler, self.final_alpha_cumprod)
        # sharded: FSDP2's units fire on each block's own forward, which the plain decoder path calls
        generator = Generator(student, student_schedule, self.timesteps, hoist=not cfg.shard)
        if cfg.shard:
            shard_student(generator, weight_dtype)
        self.student_params = list(student.parameters())  # sharded: DTensors, 1/N of each on this process
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
        if cfg.clip_loss_weight > 0:
            self.clip = ClipAlignment(cfg.clip, cfg.tiny_vae, cfg.clip_loss_weight, accelerator.device, weight_dtype)
        self.iteration = 0  # steps taken: the learning-rate schedules' position (set on resume)
        # checkpoints hold the student, the LoRA and the EMA (save_weights), never a copy of the frozen teacher
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())

    def step(self, cond: Conditioning, uncond: Conditioning, sections: Sections | None = None,
             pairs: tuple[Conditioning, torch.Tensor, torch.Tensor] | None = None,
             prompts: list[str] | None = None) -> dict[str, float]:
        """One distillation iteration on a batch of prompts; ``pairs`` (conditioning, x_T, teacher x_0) feed the
        regression term, the batch's ``prompts`` the CLIP loss. Returns the logged scalars."""
        acc, cfg = self.acc, self.cfg
        sections = sections or Sections(acc.device)
        for opt, schedule, lr in ((self.opt_student, cfg.lr_schedule, cfg.lr_student), (self.opt_fake, cfg.lr_fake_schedule, cfg.lr_fake)):
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(schedule, self.iteration, cfg.lr_warmup_steps, cfg.max_steps)
        x_T = torch.randn(cond.text.shape[0], self.latent_channels, *self.latent_size, device=acc.device)

        # -- student forward (SPEC §2): x_0 and its K·B noise predictions, with gradient
        with sections("student forward+backward"), acc.autocast():
            x0, eps = self.generator(x_T, cond.text, cond.added)

        def scores(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with sections("teacher+fake guided passes"), acc.autocast(), frozen(self.lora_params):
                return self.scores.pair(x_t, t, cond, uncond)

        # -- student update on L_score + λ_KL · L_KL (+ λ_reg · L_reg on teacher pairs)
        student = self.student_loss(x0.float(), eps, scores)
        loss = student["loss"]
        if pairs is not None:
            pair_cond, pair_x_T, pair_x0 = pairs
            with sections("student forward+backward"), acc.autocast():
                x0_pairs, _ = self.generator(pair_x_T, pair_cond.text, pair_cond.added)
            student["regression"] = regression_loss(x0_pairs, pair_x0)
            loss = loss + cfg.regression_weight * student["regression"]
        if self.clip is not None:
            with sections("CLIP loss"), acc.autocast():
                student["clip"] = self.clip(x0, self.clip.text_embeds(prompts))
            loss = loss + student["clip"]
        with sections("student forward+backward"):
            acc.backward(loss)
            grad_student = (clip_grad_norm(self.student_params, cfg.max_grad_norm) if cfg.shard
                            else acc.clip_grad_norm_(self.student_params, cfg.max_grad_norm))
            self.opt_student.step()
            self.opt_student.zero_grad(set_to_none=True)
            self.ema.step(self.student_params)

        # -- fake-score update on sg(x_0)
        def fake(x_t: torch.Tensor, t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
            with acc.autocast():
                return self.scores.fake(x_t, t, cond.where(keep, uncond))

        with sections("fake-score update"):
            for _ in range(cfg.fake_updates):
                loss_fake = self.fake_loss(x0.detach(), fake)
                acc.backward(loss_fake)
                grad_fake = acc.clip_grad_norm_(self.lora_params, cfg.max_grad_norm)
                self.opt_fake.step()
                self.opt_fake.zero_grad(set_to_none=True)
        self.iteration += 1

        logs = {f"loss/{cfg.objective}": student["score"].item(), "loss/kl": student["kl"].item(),
                "loss/fake_mse": loss_fake.item(), "grad_norm/student": float(grad_student), "grad_norm/fake": float(grad_fake),
                "lr/student": self.opt_student.param_groups[0]["lr"], "lr/fake": self.opt_fake.param_groups[0]["lr"]}
        for term in ("regression", "clip"):
            if term in student:
                logs[f"loss/{term}"] = student[term].item()
        return logs

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
        if not self.cfg.shard:
            self.student.save_pretrained(directory / "student", safe_serialization=True, max_shard_size=max_shard_size)
            named = dict(zip((n for n, _ in self.student.named_parameters()), self.ema.shadow_params))
            save_file({k: v.contiguous() for k, v in named.items()}, directory / "ema.safetensors")

    def load_weights(self, directory: Path, ema_step: int) -> None:
        """Inverse of :meth:`save_weights`; the student through diffusers' own loading (any sharding). Every process
        calls it."""
        self.scores.load_lora_state_dict(load_file(directory / "fake_lora.safetensors"))
        self.ema.optimization_step = ema_step
        if self.cfg.shard:
            load_sharded(directory, self.generator, self.opt_student, self.ema.shadow_params)
            return
        saved = UNet2DConditionModel.from_pretrained(directory / "student", use_safetensors=True)
        self.student.load_state_dict(saved.state_dict())
        del saved
        ema = load_file(directory / "ema.safetensors")
        for (name, _), shadow in zip(self.student.named_parameters(), self.ema.shadow_params):
            shadow.data.copy_(ema[name])

    def full_student(self, ema: bool) -> UNet2DConditionModel | None:
        """The student as a plain UNet on the main process (None elsewhere): a copy with the EMA weights if ``ema``,
        else the live one (sharded: a gathered copy). Every process calls it (sharded: a collective gather)."""
        main = self.acc.is_main_process
        if self.cfg.shard:
            weights = full_weights(self.generator, self.ema.shadow_params if ema else None, main)
            if not main:
                return None
            unet = UNet2DConditionModel.from_config(self.student.config)
            unet.load_state_dict(weights)
            return unet.to(self.acc.device)
        if not main:
            return None
        if not ema:
            return self.student
        unet = copy.deepcopy(self.student)
        self.ema.copy_to(unet.parameters())
        return unet
