"""Fine-tune the toy teacher on a shifted toy domain (issue 31's transfer test): the teacher's own loss (ε or v, as its
scheduler predicts, with min-SNR weights and empty-prompt dropout: :mod:`loopfree.demo.teacher`) on fresh images of the
domain; the text encoder and the autoencoder stay frozen. The whole UNet gives a fine-tuned teacher — a pipeline folder, as a
community fine-tune of SD2.1 is — and ``lora_rank`` a style LoRA in diffusers' format instead::

    loopfree toy fine-tune --domain night --out runs/night                    # OUT/pipeline: the fine-tuned teacher
    loopfree toy fine-tune --domain night --out runs/night-lora --lora-rank 8  # OUT/pytorch_lora_weights.safetensors

The run checkpoints into ``OUT/checkpoints`` and resumes (:class:`~loopfree.demo.run.TrainingRun`); each step's images,
captions, timesteps and noise come from the seed and the step, so a resumed run draws what an unbroken one would.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig

from loopfree.demo.run import TrainingRun, clipped_step
from loopfree.demo.teacher import denoising_loss, min_snr_weights, save_teacher
from loopfree.pipelines.files import read_json
from loopfree.pipelines.loading import inspect_pipeline, load_pipeline
from loopfree.pipelines.pipeline import STYLE_ADAPTER
from loopfree.toy.assets import model_folder
from loopfree.toy.settings import TOY_DISTILL, TeacherConfig
from loopfree.toy.world import ToyWorld, check_domain
from loopfree.training.student_lora import save_lora
from loopfree.utils.devices import cpu_threads
from loopfree.utils.errors import LoopfreeError
from loopfree.utils.outputs import write_json
from loopfree.utils.seeding import derive_seed

PIPELINE = "pipeline"  # the full fine-tune's output folder inside OUT


@dataclass
class FineTuneConfig:
    """A fine-tune of a toy UNet teacher on one domain."""

    out: str  # run folder (resumed if it holds checkpoints)
    teacher: str | None = None  # the teacher pipeline folder (default: the bundled toy teacher)
    domain: str = "night"  # the shifted domain (loopfree.toy.world.DOMAINS)
    steps: int = 1000  # optimiser steps
    batch: int = 32  # images per step (the teacher's batch)
    lr: float | None = None  # peak learning rate, cosine to 0 (default: 1e-4 whole UNet, 1e-3 LoRA)
    lora_rank: int | None = None  # a style LoRA of this rank instead of the whole UNet
    lora_targets: list[str] = field(default_factory=lambda: list(TOY_DISTILL["lora_targets"]))  # the fake score's
    prompt_dropout: float = TeacherConfig.prompt_dropout  # empty prompts, for guidance: as the teacher trained
    snr_gamma: float = TeacherConfig.snr_gamma  # min-SNR weights: as the teacher trained
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None: torch's choice)
    checkpoint_minutes: float = 5.0

    def __post_init__(self) -> None:
        check_domain(self.domain)
        if self.domain == "base":
            raise LoopfreeError("fine-tune on a shifted domain: base is the world the teacher was trained on")
        if self.steps < 1 or self.batch < 1 or (self.lora_rank is not None and self.lora_rank < 1):
            raise LoopfreeError("steps, batch and lora_rank must be at least 1")
        if self.lr is not None and not 0 < self.lr < 1:
            raise LoopfreeError(f"lr must be in (0, 1), got {self.lr}")


def fine_tune(cfg: FineTuneConfig) -> Path:
    """Run ``cfg`` to the end (resuming); the folder of what it made: ``OUT/pipeline`` or OUT (the LoRA)."""
    with cpu_threads(cfg.threads), torch.random.fork_rng(devices=[]):
        return _fine_tune(cfg)


def _fine_tune(cfg: FineTuneConfig) -> Path:
    out = Path(cfg.out)
    teacher = str(model_folder(cfg.teacher, "teacher"))
    if inspect_pipeline(teacher, transformers=True).family != "sd":
        raise LoopfreeError(f"{teacher}: fine-tune takes a UNet teacher (a Stable Diffusion pipeline folder)")
    pipe = load_pipeline(teacher)
    saved = out / "fine_tune.json"
    settings = {**asdict(cfg), "teacher": str(Path(teacher).resolve()), "threads": None}
    if saved.is_file() and read_json(saved)["settings"] != settings:
        raise LoopfreeError(f"{out} holds a fine-tune with other settings: use another --out")
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    pipe.text_encoder.requires_grad_(False)
    vae.requires_grad_(False)
    if cfg.lora_rank is None:
        params = list(unet.parameters())
    else:
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=cfg.lora_targets,
                                    init_lora_weights=True), STYLE_ADAPTER)
        params = [p for p in unet.parameters() if p.requires_grad]
    lr = cfg.lr or (1e-4 if cfg.lora_rank is None else 1e-3)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    weights = min_snr_weights(scheduler, cfg.snr_gamma)
    tokenizer = pipe.tokenizer

    def step(i: int) -> float:
        sample = ToyWorld(derive_seed(cfg.seed, 11, i, bits=32), cfg.domain).sample(cfg.batch)
        rng = np.random.default_rng(derive_seed(cfg.seed, 12, i, bits=32))
        captions = ["" if rng.random() < cfg.prompt_dropout else c for c in sample.captions]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, 13, i, bits=32))
        with torch.no_grad():
            z = vae.encode(sample.tensor()).latent_dist.mean * vae.config.scaling_factor
            text = pipe.text_encoder(ids)[0]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        return clipped_step(denoising_loss(unet, scheduler, weights, z, noise, t, text), optimizer, params, decay)

    run = TrainingRun(out, cfg.checkpoint_minutes)
    write_json(saved, {"settings": settings, "done": False})
    started = time.monotonic()
    unet.train()
    done = run.train("unet", cfg.steps, step, {"unet": unet, "optimizer": optimizer, "decay": decay})
    unet.eval().requires_grad_(False)
    if cfg.lora_rank is None:
        result = out / PIPELINE
        save_teacher(result, pipe)
    else:
        result = out
        save_lora(type(pipe), unet, out, STYLE_ADAPTER)
    write_json(saved, {"settings": settings, "done": done == cfg.steps, "steps": done, "lr": lr,
                       "wall_s_last_session": time.monotonic() - started})
    return result

