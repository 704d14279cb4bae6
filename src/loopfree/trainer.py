"""``loopfree distill``: distil a teacher into a TiUE (or one-step) student from text prompts alone (SPEC §3).

    loopfree distill --teacher path/to/sd21-base --prompts prompts.txt --out runs/tiue --max-steps 20000
    accelerate launch --multi_gpu --num_processes 8 -m loopfree distill --config distill.yaml

One step: the student makes x_0 in one pass → VSD against the guided teacher and fake score, plus the KL
regulariser on the student's noise predictions → student update → fake-score (LoRA) update on sg(x_0).
The teacher and the fake score share one frozen UNet: the fake score is that UNet with its LoRA switched on.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel, cast_training_params
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from loopfree.config import DistillConfig, save_config
from loopfree.data import PromptStream, load_prompts
from loopfree.errors import Interrupted, LoopfreeError
from loopfree.images import image_grid
from loopfree.guidance import guided
from loopfree.loading import inspect_pipeline, load_pipeline
from loopfree.losses import fake_score_loss, kl_loss, vsd_loss
from loopfree.sampler import Conditioning, Generator
from loopfree.schedule import NoiseSchedule, decoder_timesteps, diffuse, sample_timesteps
from loopfree.timing import Sections

CHECKPOINT = "checkpoint-"  # complete checkpoints: checkpoint-00000100
PARTIAL = ".tmp-"  # being written; renamed when complete, never resumed from
STATE = "trainer_state.json"
FAKE = "fake_score"  # the LoRA adapter's name; peft's "__base__" rows run the frozen base, i.e. the teacher


@contextmanager
def lora_rows(unet: torch.nn.Module, adapter_names: list[str]) -> Iterator[None]:
    """For the calls inside, row b of the batch goes through adapter ``adapter_names[b]`` (peft mixed batches)."""

    def pass_names(module, args, kwargs):
        return args, {**kwargs, "adapter_names": adapter_names}

    handles = [m.register_forward_pre_hook(pass_names, with_kwargs=True) for m in unet.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def student_timesteps(cfg: DistillConfig, scheduler_config) -> tuple[list[int], float | None]:
    """The student's decoder timesteps and its ā_final override (one-step: [T] and 1.0)."""
    if cfg.student == "one-step":
        return [cfg.one_step_timestep], 1.0
    return cfg.timesteps or decoder_timesteps(scheduler_config, cfg.steps), None


class Distiller:
    """Teacher ε_ψ, fake score ε_φ (teacher + LoRA), student ε_θ (+ EMA), their optimisers, and one step."""

    def __init__(self, cfg: DistillConfig, unet: UNet2DConditionModel, scheduler, accelerator: Accelerator,
                 latent_size: int | tuple[int, int]):
        self.cfg, self.acc = cfg, accelerator
        self.latent_size = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
        self.schedule = NoiseSchedule.from_scheduler(scheduler)
        self.timesteps, self.final_alpha = student_timesteps(cfg, scheduler.config)
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

        # -- student ε_θ: a full trainable copy of the teacher, with an EMA
        student = copy.deepcopy(unet).to(accelerator.device).train().requires_grad_(True)
        self.student_params = list(student.parameters())
        self.ema = EMAModel(self.student_params, decay=cfg.ema_decay, use_ema_warmup=False)
        # -- teacher ε_ψ frozen; fake score ε_φ = the same base weights + LoRA (paper: r 64, alpha 108, to_q/to_v)
        base = unet.to(accelerator.device).requires_grad_(False)
        if weight_dtype != torch.float32:
            base.to(weight_dtype)
        base.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_targets), FAKE)
        cast_training_params(base, dtype=torch.float32)
        self.lora_params = [p for p in base.parameters() if p.requires_grad]
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
            base.enable_gradient_checkpointing()
        self.student, self.base = student, base

        def adam(params, lr):
            return torch.optim.AdamW(
                params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon
            )

        schedule = NoiseSchedule.from_scheduler(scheduler, self.final_alpha)
        self.generator, self.fake, self.opt_student, self.opt_fake = accelerator.prepare(
            Generator(student, schedule, self.timesteps), base, adam(self.student_params, cfg.lr_student),
            adam(self.lora_params, cfg.lr_fake),
        )
        self.latent_channels = unet.config.in_channels
        # checkpoints hold the student, the LoRA and the EMA (save_weights), never a copy of the frozen teacher
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())

    @contextmanager
    def teacher(self) -> Iterator[None]:
        """The frozen base with the LoRA switched off is the teacher."""
        self.base.disable_adapters()
        try:
            yield
        finally:
            self.base.enable_adapters()

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
        """The base UNet's noise prediction (adapters as currently routed), in float32."""
        unet = self.base
        out = unet(x_t.to(unet.dtype), t, c.text.to(unet.dtype), added_cond_kwargs=c.added).sample.float()
        return self.schedule.to_epsilon(out, x_t, t)

    @torch.no_grad()
    def guided_teacher_and_fake(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ε_ψ and ε_φ at (x_t, t), both with classifier-free guidance (SPEC §3.2).

        Unconditional and conditional halves always share a call; with ``batch_teacher_fake`` the teacher's and
        the fake score's passes share one too (teacher rows skip the LoRA), else they are two calls.
        """
        c = Conditioning.cat([uncond, cond])
        x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
        if self.cfg.batch_teacher_fake:
            with lora_rows(self.base, ["__base__"] * len(x2) + [FAKE] * len(x2)):
                eps = self._eps(torch.cat([x2, x2]), torch.cat([t2, t2]), Conditioning.cat([c, c]))
            eps_teacher, eps_fake = eps.chunk(2)
        else:
            with self.teacher():
                eps_teacher = self._eps(x2, t2, c)
            eps_fake = self._eps(x2, t2, c)
        return guided(*eps_teacher.chunk(2), self.cfg.guidance), guided(*eps_fake.chunk(2), self.cfg.guidance)

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.alpha_bar(t.cpu()).to(t.device, torch.float32)

    def step(self, cond: Conditioning, uncond: Conditioning, sections: Sections | None = None) -> dict[str, float]:
        """One distillation iteration on a batch of prompts; returns the logged scalars."""
        cfg, acc = self.cfg, self.acc
        sections = sections or Sections(acc.device)
        B, device = cond.text.shape[0], acc.device
        x_T = torch.randn(B, self.latent_channels, *self.latent_size, device=device)

        # -- student forward (SPEC §2): x_0 and its K·B noise predictions, with gradient
        with sections("student forward+backward"), acc.autocast():
            x0, eps = self.generator(x_T, cond.text, cond.added)
            x0 = x0.float()

        # -- VSD (SPEC §3.2): guided teacher and fake score on a fresh noising of sg(x_0)
        with sections("teacher+fake guided passes"), acc.autocast():
            t = sample_timesteps(B, cfg.vsd_t_min, cfg.vsd_t_max, device=device)
            alpha_bar = self._alpha_bar(t)
            x_t = diffuse(x0.detach(), torch.randn_like(x0), alpha_bar)
            eps_teacher, eps_fake = self.guided_teacher_and_fake(x_t, t, cond, uncond)

        # -- student update on L_vsd + λ_KL · L_KL (SPEC §3.3-3.4)
        with sections("student forward+backward"):
            loss_vsd = vsd_loss(x0, eps_teacher, eps_fake, alpha_bar)
            loss_kl = kl_loss(eps.flatten(0, 1), cfg.kl_reduction)
            acc.backward(loss_vsd + cfg.kl_weight * loss_kl)
            grad_student = acc.clip_grad_norm_(self.student_params, cfg.max_grad_norm)
            self.opt_student.step()
            self.opt_student.zero_grad(set_to_none=True)
            self.ema.step(self.student_params)

        # -- fake-score update (SPEC §3.5): denoising MSE on sg(x_0), empty prompt with p = 0.1
        with sections("fake-score update"):
            t = sample_timesteps(B, 0, len(self.schedule.alphas_cumprod) - 1, device=device)
            alpha_bar = self._alpha_bar(t)
            noise = torch.randn_like(x0)
            x_t = diffuse(x0.detach(), noise, alpha_bar)
            drop = torch.rand(B, device=device) < cfg.fake_cfg_dropout
            c = cond.where(~drop, uncond)
            with acc.autocast():
                out = self.fake(x_t.to(self.base.dtype), t, c.text.to(self.base.dtype), added_cond_kwargs=c.added).sample
            loss_fake = fake_score_loss(self.schedule.to_epsilon(out.float(), x_t, t), noise, alpha_bar)
            acc.backward(loss_fake)
            grad_fake = acc.clip_grad_norm_(self.lora_params, cfg.max_grad_norm)
            self.opt_fake.step()
            self.opt_fake.zero_grad(set_to_none=True)

        return {
            "loss/vsd": loss_vsd.item(), "loss/kl": loss_kl.item(), "loss/fake_mse": loss_fake.item(),
            "grad_norm/student": float(grad_student), "grad_norm/fake": float(grad_fake),
            "lr/student": self.opt_student.param_groups[0]["lr"], "lr/fake": self.opt_fake.param_groups[0]["lr"],
        }

    # -- checkpoint parts that accelerate doesn't write itself: student, LoRA, EMA
    def save_weights(self, directory: Path) -> None:
        self.student.save_pretrained(directory / "student", safe_serialization=True)
        save_file(get_peft_model_state_dict(self.base, adapter_name=FAKE), directory / "fake_lora.safetensors")
        named = dict(zip((n for n, _ in self.student.named_parameters()), self.ema.shadow_params))
        save_file({k: v.contiguous() for k, v in named.items()}, directory / "ema.safetensors")

    def load_weights(self, directory: Path, ema_step: int) -> None:
        self.student.load_state_dict(load_file(directory / "student" / "diffusion_pytorch_model.safetensors"))
        set_peft_model_state_dict(self.base, load_file(directory / "fake_lora.safetensors"), adapter_name=FAKE)
        ema = load_file(directory / "ema.safetensors")
        for (name, _), shadow in zip(self.student.named_parameters(), self.ema.shadow_params):
            shadow.data.copy_(ema[name])
        self.ema.optimization_step = ema_step


class PromptEncoder:
    """Prompts → (conditional, unconditional) conditioning through the teacher's frozen text encoder(s).

    The unconditional side is the same for every prompt, so it is encoded once; with ``cache`` every prompt is too.
    """

    def __init__(self, pipe, device: torch.device, resolution: int, cache: bool):
        self.pipe, self.device, self.size = pipe, device, (resolution, resolution)
        self.cache: dict[str, Conditioning] | None = {} if cache else None
        with torch.no_grad():
            self.uncond = pipe.encode_conditioning([""], None, 1, True, device, self.size)[1]

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> Conditioning:
        return self.pipe.encode_conditioning(prompts, None, 1, False, self.device, self.size)[0]

    def __call__(self, prompts: list[str]) -> tuple[Conditioning, Conditioning]:
        if self.cache is None:
            cond = self._encode(prompts)
        else:
            missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
            if missing:
                encoded = self._encode(missing)
                self.cache.update((p, encoded.rows(i, i + 1)) for i, p in enumerate(missing))
            cond = Conditioning.cat([self.cache[p] for p in prompts])
        return cond, self.uncond.repeat(len(prompts))


def find_checkpoint(out: Path, resume: str) -> Path | None:
    """``latest``: the newest complete checkpoint in ``out/checkpoints`` (None if there is none); else the path."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE).is_file():
            raise LoopfreeError(f"--resume {resume!r} is not a complete loopfree checkpoint (no {STATE})")
        return path
    root = out / "checkpoints"
    done = [p for p in root.glob(CHECKPOINT + "*") if (p / STATE).is_file()] if root.is_dir() else []
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT):]), default=None)


def check_inputs(cfg: DistillConfig) -> tuple[int, list[str]]:
    """Everything that can be wrong with the user's input, checked before anything is written."""
    try:
        info = inspect_pipeline(cfg.teacher)
    except LoopfreeError as e:
        raise LoopfreeError(f"teacher: {e}") from None
    prompts = load_prompts(cfg.prompts, cfg.prompt_field).prompts
    resolution = cfg.resolution or info.default_size
    try:
        info.check_size(resolution, resolution)
    except LoopfreeError as e:
        raise LoopfreeError(f"--resolution: {e}") from None
    if cfg.dtype == "fp16" and not torch.cuda.is_available():
        raise LoopfreeError("fp16 mixed precision needs a CUDA device; use --dtype bf16 on a CPU")
    if cfg.resume not in (None, "latest"):
        find_checkpoint(Path(cfg.out), cfg.resume)
    if cfg.log_with == "wandb" and importlib.util.find_spec("wandb") is None:
        raise LoopfreeError("--log-with wandb needs the wandb package: pip install wandb")
    return resolution, prompts


class _StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint after the current step and stops."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum


def distill(cfg: DistillConfig) -> Path:
    """Run the whole distillation described by ``cfg``; returns the directory of the final pipeline."""
    resolution, prompts = check_inputs(cfg)
    out = Path(cfg.out)
    acc = Accelerator(
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),  # CPU data parallel uses gloo
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.log_with == "none" else cfg.log_with,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    main = acc.is_main_process
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise LoopfreeError(f"{acc.distributed_type.value} is not supported yet: launch with plain data parallel (--multi_gpu)")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise LoopfreeError(f"launched as {launched} processes but accelerate runs {acc.num_processes}: check the launch configuration")

    # -- models: same initial weights on every process, then a different random stream per process
    set_seed(cfg.seed)
    pipe = load_pipeline(cfg.teacher)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False).to(acc.device)
    distiller = Distiller(cfg, pipe.unet, pipe.scheduler, acc, resolution // pipe.vae_scale_factor)
    set_seed(cfg.seed, device_specific=True)
    stream = PromptStream(prompts, cfg.batch_size, cfg.seed, acc.process_index, acc.num_processes)
    encode = PromptEncoder(pipe, acc.device, resolution, cfg.cache_prompt_embeds)
    validation_prompts = cfg.validation_prompts or prompts[:4]

    # -- resume: weights, optimisers, RNG states (accelerate), EMA, data position, step
    step = 0
    checkpoint = find_checkpoint(out, cfg.resume) if cfg.resume else None
    if checkpoint is not None:
        state = json.loads((checkpoint / STATE).read_text())
        acc.load_state(str(checkpoint), load_kwargs={"weights_only": True})
        distiller.load_weights(checkpoint, state["ema_step"])
        stream.load_state_dict(state["stream"])
        step = state["step"]
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "distill_config.yaml")
    if cfg.log_with != "none":
        acc.init_trackers("loopfree", config={k: str(v) for k, v in asdict(cfg).items()})

    def save_checkpoint() -> None:
        final = out / "checkpoints" / f"{CHECKPOINT}{step:08d}"
        partial = out / "checkpoints" / f"{PARTIAL}{CHECKPOINT}{step:08d}"
        if main:
            shutil.rmtree(partial, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(partial))
        if main:
            distiller.save_weights(partial)
            state = {"step": step, "stream": stream.state_dict(), "ema_step": distiller.ema.optimization_step}
            (partial / STATE).write_text(json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            os.rename(partial, final)
            done = sorted((out / "checkpoints").glob(CHECKPOINT + "*"))
            for old in done[: max(0, len(done) - (cfg.checkpoints_total_limit or len(done)))]:
                shutil.rmtree(old)
        acc.wait_for_everyone()

    # -- the loop
    stop = _StopFlag()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="distill", unit="step", disable=not main)
    t_last = time.perf_counter()
    while step < cfg.max_steps:
        cond, uncond = encode(stream.next_batch())
        logs = distiller.step(cond, uncond)
        step += 1
        now = time.perf_counter()
        logs["it_per_s"], t_last = 1.0 / max(now - t_last, 1e-9), now
        acc.log(logs, step=step)
        bar.update()
        bar.set_postfix(vsd=f"{logs['loss/vsd']:.3g}", kl=f"{logs['loss/kl']:.3g}", fake=f"{logs['loss/fake_mse']:.3g}")
        if cfg.validate_every and step % cfg.validate_every == 0 and main:
            validate(pipe, distiller, validation_prompts, out / "validation" / f"step-{step:08d}.png", acc)
        signum = int(acc.reduce(torch.tensor(stop.signum, device=acc.device), "max").item())
        if signum or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            save_checkpoint()
        if signum:
            bar.close()
            acc.end_training()
            raise Interrupted(f"interrupted: checkpoint saved at step {step}; continue with --resume latest", signum)
    bar.close()
    if cfg.checkpoint_every and not (out / "checkpoints" / f"{CHECKPOINT}{step:08d}").is_dir():
        save_checkpoint()
    check_replicas_agree(distiller, acc)

    # -- the final pipeline: EMA (or raw) student weights, decoder timesteps recorded
    if main:
        save_pipeline(pipe, distiller, out, ema=cfg.save_ema)
    acc.wait_for_everyone()
    acc.end_training()
    return out


def check_replicas_agree(distiller: Distiller, acc: Accelerator) -> None:
    """Data-parallel replicas must hold the same student: compare a checksum across processes."""
    checksum = torch.stack([p.detach().double().sum() for p in distiller.student_params]).sum().reshape(1)
    sums = acc.gather(checksum.to(acc.device)).cpu()
    if not torch.all(sums == sums[0]):
        raise RuntimeError(f"student weights differ across processes: checksums {sums.tolist()}")
    if acc.num_processes > 1 and acc.is_main_process:
        print(f"{acc.num_processes} processes hold identical student weights (checksum {sums[0].item():.10g})")


def student_pipeline(pipe, distiller: Distiller, ema: bool):
    """A pipeline of the teacher's components with the student UNet (a copy with EMA weights if ``ema``)."""
    unet = distiller.student
    if ema:
        unet = copy.deepcopy(unet)
        distiller.ema.copy_to(unet.parameters())
    student = type(pipe)(**{**pipe.components, "unet": unet})
    student.decoder_timesteps = distiller.timesteps
    student.final_alpha_cumprod = distiller.final_alpha
    return student


def save_pipeline(pipe, distiller: Distiller, out: Path, ema: bool) -> None:
    student_pipeline(pipe, distiller, ema).save_pretrained(out)


@torch.no_grad()
def validate(pipe, distiller: Distiller, prompts: list[str], path: Path, acc: Accelerator, seeds: int = 4) -> None:
    """A grid of the current student's samples: one row per prompt, one column per seed."""
    student = student_pipeline(pipe, distiller, ema=False)
    student.set_progress_bar_config(disable=True)
    rows = []
    for prompt in prompts:
        gens = [torch.Generator(acc.device).manual_seed(s) for s in range(seeds)]
        rows.append(student([prompt] * seeds, generator=gens).images)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(rows)
    grid.save(path)
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), int(path.stem.split("-")[1]), dataformats="HWC")
