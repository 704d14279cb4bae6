"""Train the toy world's teacher: a small latent text-to-image diffusion model, in four stages.

    loopfree toy train-teacher --out runs/teacher --threads 2

(a) An AutoencoderKL (64x64x3 -> 16x16x4) on fresh toy images; the latent scaling factor
(1 / std of the latents) is written into its config. (b) A UNet2DConditionModel trained jointly
with a CLIP text encoder from scratch on cached latents, with empty-prompt dropout (for
classifier-free guidance), min-SNR loss weights and an EMA of the weights. (c) The EMA weights
are saved as a Stable Diffusion pipeline directory, ``OUT/pipeline`` (safetensors only).
(d) 50-step DDIM samples with guidance are scored by the shipped classifier, ``OUT/eval.json``.
Stages (a) and (b) checkpoint into ``OUT/checkpoints`` every few minutes and when they stop
(:class:`~loopfree.demo.run.TrainingRun`); running the same command again resumes them (raise
``unet_steps`` to train on). Every sample stream is derived from the seed and the step, so a resumed
run draws what an unbroken one would.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from loopfree.utils.devices import cpu_threads
from loopfree.utils.errors import LoopfreeError
from loopfree.pipelines.loading import load_pipeline
from loopfree.utils.outputs import write_json
from loopfree.pipelines.pipeline import LoopFreePipeline
from loopfree.utils.seeding import derive_seed
from loopfree.toy.classifier import load_classifier, matches
from loopfree.evaluation.toy import evaluate_images
from loopfree.demo.run import TrainingRun, clipped_step
from loopfree.toy.settings import MMDiTTeacherConfig, TeacherConfig
from loopfree.toy.tokenizer import build_tokenizer
from loopfree.toy.world import IMAGE_SIZE, Attributes, ToyWorld, heldout_prompts, make_caption, parse_prompt

logger = logging.getLogger(__name__)

#: The teacher's training/inference scheduler: Stable Diffusion's DDIM configuration.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _format(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in scores.items())


def _megabytes(*modules: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 1e6


def make_vae(config: TeacherConfig) -> AutoencoderKL:
    """The autoencoder of ``config``: 3 channels <-> ``latent_channels``, no attention."""
    levels = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=config.vae_groups,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def make_text_encoder(config: TeacherConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A CLIP text transformer over ``tokenizer``'s ids (end-of-text doubles as padding)."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_width,
            intermediate_size=4 * config.text_width,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def make_unet(config: TeacherConfig) -> UNet2DConditionModel:
    """The latent UNet of ``config``, cross-attention at the resolutions ``unet_cross_attention`` marks."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.unet_cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.unet_cross_attention))
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2 ** (len(config.vae_channels) - 1),
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=config.unet_channels,
        layers_per_block=config.unet_layers,
        norm_num_groups=config.unet_groups,
        cross_attention_dim=config.text_width,
        attention_head_dim=config.unet_heads,  # diffusers reads this legacy name as the number of heads
    )


def make_scheduler(config: TeacherConfig) -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_CONFIG, prediction_type=config.prediction_type)


def min_snr_weights(scheduler: DDIMScheduler, gamma: float) -> torch.Tensor:
    """Per-timestep min-SNR-γ loss weights (ε-prediction: min(SNR, γ) / SNR; v: min(SNR, γ) / (SNR + 1)); ones for γ = 0."""
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1.0 - alphas)
    if gamma <= 0:
        return torch.ones_like(snr)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if scheduler.config.prediction_type == "epsilon" else clipped / (snr + 1.0)


def denoising_loss(unet: UNet2DConditionModel, scheduler: DDIMScheduler, weights: torch.Tensor, z: torch.Tensor,
                   noise: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The teacher's loss: the ``weights[t]``-weighted MSE of the UNet's prediction of ε or v (its scheduler's
    prediction type) on ``z`` noised with ``noise`` at ``t``."""
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z, noise, t)
    pred = unet(scheduler.add_noise(z, noise, t), t, text).sample
    return (weights[t] * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()


def check_size(config: TeacherConfig, tokenizer: CLIPTokenizer) -> float:
    """MB of the teacher's weights; an error if they exceed ``max_megabytes``."""
    if IMAGE_SIZE % 2 ** (len(config.vae_channels) - 1):
        raise LoopfreeError(f"{len(config.vae_channels)} VAE levels do not divide {IMAGE_SIZE} pixels")
    parts = {"vae": make_vae(config), "text_encoder": make_text_encoder(config, tokenizer), "unet": make_unet(config)}
    size = _megabytes(*parts.values())
    logger.info("model: %.1f MB of weights (%s)", size, ", ".join(f"{k} {_megabytes(m):.1f}" for k, m in parts.items()))
    if size > config.max_megabytes:
        raise LoopfreeError(f"the teacher would hold {size:.1f} MB of weights, over max_megabytes={config.max_megabytes}")
    return size


def train_vae(run: TrainingRun, cfg: TeacherConfig) -> AutoencoderKL:
    """Stage (a): reconstruction + KL on fresh toy images, then the latent scaling factor."""
    vae = make_vae(cfg)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    # cosine decay to 0: the last steps are small, so the autoencoder ends on a good point, not a spike
    decay = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.vae_steps) / max(1, cfg.vae_steps)))
    )
    state = {"vae": vae, "optimizer": optimizer, "decay": decay}
    if run.resume("vae", state) < cfg.vae_steps and (run.checkpoints / "latents.safetensors").is_file():
        raise LoopfreeError(f"{run.out}: stage b started on a less trained autoencoder; use a new run folder")

    def step(i: int) -> float:
        images = ToyWorld(derive_seed(cfg.seed, 1, i, bits=32)).sample(cfg.vae_batch).tensor()
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(torch.Generator().manual_seed(derive_seed(cfg.seed, 2, i, bits=32)))).sample
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - posterior.logvar - 1.0).mean()
        return clipped_step(F.mse_loss(recon, images) + cfg.vae_kl_weight * kl, optimizer, vae.parameters(), decay)

    run.train("vae", cfg.vae_steps, step, state)
    vae.eval().requires_grad_(False)
    held_out = ToyWorld(derive_seed(cfg.seed, 3, bits=32)).sample(512)
    with torch.no_grad():
        latents = vae.encode(held_out.tensor()).latent_dist.mean
        recon = vae.decode(latents).sample.clamp(-1, 1)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    hits = matches(load_classifier().predict(recon), held_out.attrs)
    scores = {"reconstruction_mse": F.mse_loss(recon, held_out.tensor()).item(),
              **{f"reconstruction_accuracy_{name}": float(h.mean()) for name, h in hits.items()}}
    run.log({"stage": "vae", "scaling_factor": vae.config.scaling_factor, **scores})
    tqdm.write(f"vae: scaling factor {vae.config.scaling_factor:.4f}, {_format(scores)}")
    return vae


def encode_cache(run: TrainingRun, cfg: TeacherConfig | MMDiTTeacherConfig, vae: AutoencoderKL) -> tuple[torch.Tensor, list[Attributes]]:
    """Scaled latent means of ``latent_cache`` toy images and their attributes (latents stored in
    the checkpoints folder; the images are redrawn from the seed)."""
    world = ToyWorld(derive_seed(cfg.seed, 4, bits=32))
    chunks = [world.sample(min(1024, cfg.latent_cache - i)) for i in range(0, cfg.latent_cache, 1024)]
    attrs = [a for chunk in chunks for a in chunk.attrs]
    path = run.checkpoints / "latents.safetensors"
    if path.is_file():
        latents = load_file(path)["latents"]
        if latents.shape[0] == cfg.latent_cache:
            return latents, attrs
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(chunk.tensor()).latent_dist.mean for chunk in tqdm(chunks, desc="encode latents")]
        ) * vae.config.scaling_factor
    save_file({"latents": latents.contiguous()}, path)
    return latents, attrs


def _sample(
    pipe: LoopFreePipeline, prompts: list[str], per_prompt: int, steps: int, guidance: float, seed: int
) -> torch.Tensor:
    """DDIM samples (N, 3, 64, 64) in [-1, 1], ``per_prompt`` consecutive images per prompt."""
    images = pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=per_prompt,
        generator=torch.Generator().manual_seed(seed), output_type="pt", mode="loop",
    ).images
    return images * 2.0 - 1.0


def train_denoiser(run: TrainingRun, cfg: TeacherConfig, vae: AutoencoderKL, tokenizer: CLIPTokenizer) -> tuple[LoopFreePipeline, int]:
    """Stage (b): UNet + text encoder on the latent cache; returns the pipeline (EMA weights loaded)
    and the step reached."""
    text_encoder, unet, scheduler = make_text_encoder(cfg, tokenizer), make_unet(cfg), make_scheduler(cfg)
    pipe = LoopFreePipeline(vae, text_encoder, tokenizer, unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    latents, attrs = encode_cache(run, cfg, vae)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    ema = EMAModel(params, decay=cfg.ema_decay)
    weights = min_snr_weights(scheduler, cfg.snr_gamma)

    def step(i: int) -> float:
        rng = np.random.default_rng(derive_seed(cfg.seed, 5, i, bits=32))
        rows = rng.integers(len(attrs), size=cfg.unet_batch)
        captions = ["" if rng.random() < cfg.prompt_dropout else make_caption(attrs[r], rng) for r in rows]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        z = latents[torch.from_numpy(rows)]
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, 6, i, bits=32))
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), generator=g)
        noise = torch.randn(z.shape, generator=g)
        loss = clipped_step(denoising_loss(unet, scheduler, weights, z, noise, t, text_encoder(ids)[0]), optimizer, params, warmup)
        ema.step(params)
        return loss

    def draw(prompts: list[str]) -> torch.Tensor:
        unet.eval()
        images = _sample(pipe, prompts, 1, cfg.probe_steps, cfg.guidance_scales[0], cfg.seed)
        unet.train()
        return images

    probe = attribute_probe(run, cfg, ema, params, draw)

    deadline = time.monotonic() + 60 * cfg.minutes if cfg.minutes is not None else None
    unet.train()
    text_encoder.train()
    state = {"unet": unet, "text_encoder": text_encoder, "optimizer": optimizer, "warmup": warmup, "ema": ema}
    done = run.train("unet", cfg.unet_steps, step, state, deadline, probe)
    ema.copy_to(params)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return pipe, done


def save_teacher(folder: Path, pipe: DiffusionPipeline) -> float:
    """Stage (c): write the pipeline directory (the toy tokenizer in CLIP's files for each); its size in MB. Only
    safetensors weights are allowed."""
    pipe.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            build_tokenizer(folder / name, max_length=getattr(pipe, name).model_max_length)
    files = [p for p in folder.rglob("*") if p.is_file()]
    unsafe = [str(p) for p in files if p.suffix in WEIGHT_SUFFIXES and p.suffix != ".safetensors"]
    if unsafe:
        raise LoopfreeError(f"non-safetensors weights written: {unsafe}")
    size = sum(p.stat().st_size for p in files) / 1e6
    print(f"teacher pipeline: {folder} ({size:.2f} MB)")
    return size


def evaluate_teacher(path: str | Path, config: TeacherConfig) -> dict:
    """Stage (d): per guidance scale, the toy-world scores of ``eval_steps``-step DDIM samples of the
    pipeline at ``path`` on ``eval_prompts`` held-out prompts."""
    pipe = load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    return evaluate_guidance(config, lambda prompts, guidance: _sample(
        pipe, prompts, config.eval_images_per_prompt, config.eval_steps, guidance, config.seed))


def attribute_probe(run: TrainingRun, cfg: TeacherConfig | MMDiTTeacherConfig, ema: EMAModel, params: list,
                    draw: Callable[[list[str]], torch.Tensor]) -> Callable[[int], None]:
    """The denoiser stage's step hook: every ``probe_every`` steps, ``draw(prompts)``'s images of ``probe_prompts``
    held-out prompts with the EMA weights swapped in, their per-attribute accuracy logged."""
    classifier = load_classifier()
    prompts = heldout_prompts(cfg.probe_prompts, seed=derive_seed(cfg.seed, 7, bits=32))

    def probe(done: int) -> None:
        if not cfg.probe_every or done % cfg.probe_every:
            return
        ema.store(params)
        ema.copy_to(params)
        images = draw(prompts)
        ema.restore(params)
        hits = matches(classifier.predict(images), [parse_prompt(p) for p in prompts])
        scores = {name: float(h.mean()) for name, h in hits.items()}
        run.log({"stage": "probe", "step": done, "guidance": cfg.guidance_scales[0], **scores})
        tqdm.write(f"probe @ {done}: {_format(scores)}")

    return probe


def evaluate_guidance(cfg: TeacherConfig | MMDiTTeacherConfig,
                      draw: Callable[[list[str], float], torch.Tensor]) -> dict:
    """Per guidance scale, the toy-world scores of ``draw(prompts, guidance)``'s images (``eval_images_per_prompt``
    consecutive ones per prompt) of ``eval_prompts`` held-out prompts."""
    prompts = heldout_prompts(cfg.eval_prompts, seed=cfg.seed)
    aligned = [p for p in prompts for _ in range(cfg.eval_images_per_prompt)]
    results = {}
    for guidance in tqdm(cfg.guidance_scales, desc="evaluate"):
        results[str(guidance)] = scores = evaluate_images(draw(prompts, guidance), aligned, seed=cfg.seed)
        tqdm.write(f"guidance {guidance}: {_format({k: v for k, v in scores.items() if k.startswith(('accuracy', 'align'))})}")
    return results


def train_teacher(out_dir: str | Path, config: TeacherConfig | None = None) -> dict:
    """All four stages into ``out_dir``; returns (and writes to ``eval.json``) the evaluation. The process's
    thread count and global random state are as they were afterwards."""
    config = config or TeacherConfig()
    with cpu_threads(config.threads), torch.random.fork_rng(devices=[]):
        return _train_teacher(Path(out_dir), config)


def _train_teacher(out: Path, config: TeacherConfig) -> dict:
    tokenizer = build_tokenizer()
    check_size(config, tokenizer)
    run = TrainingRun(out, config.checkpoint_minutes, config.log_every)
    write_json(out / "teacher_config.json", asdict(config))
    started = time.monotonic()
    torch.manual_seed(config.seed)  # module initialisation
    vae = train_vae(run, config)
    pipe, steps = train_denoiser(run, config, vae, tokenizer)
    size = save_teacher(out / "pipeline", pipe)
    scores = evaluate_teacher(out / "pipeline", config)
    report = {
        "unet_steps": steps,
        "megabytes": size,
        "eval_steps": config.eval_steps,
        "eval_prompts": config.eval_prompts,
        "eval_images_per_prompt": config.eval_images_per_prompt,
        "wall_s": time.monotonic() - started,
        "guidance": scores,
    }
    write_json(out / "eval.json", report)
    return report
