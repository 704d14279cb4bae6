"""Train the toy world's MMDiT teacher: an SD3-shaped transformer with rectified flow, in three stages.

    loopfree toy train-teacher --arch mmdit --out runs/teacher-mmdit --threads 2

(a) The UNet teacher's autoencoder (bundled) encodes fresh toy images once; their mean and spread become the VAE's
``shift_factor`` and ``scaling_factor``, as SD3's are. (b) An ``SD3Transformer2DModel`` and two CLIP text encoders
with projections are trained from scratch by rectified flow — x_σ = (1 − σ)·z + σ·ε, the model's velocity against
ε − z, σ logit-normal (SD3's objective and sampling) — with empty-prompt dropout and an EMA, checkpointed and resumed
(:class:`~loopfree.demo.run.TrainingRun`). (c) The EMA weights are saved as a ``StableDiffusion3Pipeline`` folder
without T5, ``OUT/pipeline``, and its 50-step Euler samples are scored, ``OUT/eval.json``.

Without T5 the SD3 pipeline appends 256 zero rows to the CLIP tokens; the teacher is trained, probed and evaluated
on one of them standing for 256 (:mod:`loopfree.method.repeated_tokens`, exact), so that plain diffusers' default
call — ``StableDiffusion3Pipeline.from_pretrained(OUT/"pipeline")("a red circle")`` — is what it learned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.training_utils import EMAModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from loopfree.demo.run import TrainingRun, clipped_step
from loopfree.demo.teacher import _megabytes, attribute_probe, encode_cache, evaluate_guidance, save_teacher
from loopfree.method.repeated_tokens import use_repeated_tokens
from loopfree.toy.assets import bundled
from loopfree.toy.settings import MMDiTTeacherConfig
from loopfree.toy.tokenizer import build_tokenizer
from loopfree.toy.world import IMAGE_SIZE, make_caption
from loopfree.utils.devices import cpu_threads
from loopfree.utils.errors import LoopfreeError
from loopfree.utils.outputs import write_json
from loopfree.utils.seeding import derive_seed

logger = logging.getLogger(__name__)


def make_text_encoder(cfg: MMDiTTeacherConfig, tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    """A CLIP text transformer with a pooled projection over ``tokenizer``'s ids (end-of-text doubles as padding)."""
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, projection_dim=cfg.text_projection,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def make_transformer(cfg: MMDiTTeacherConfig) -> SD3Transformer2DModel:
    """The MMDiT of ``cfg`` on the 16x16x4 toy latents; the text width is the two CLIPs' together (no T5 to pad to)."""
    latent = IMAGE_SIZE // 4
    return SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=4, out_channels=4, num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=2 * cfg.text_width,
        caption_projection_dim=cfg.heads * cfg.head_dim, pooled_projection_dim=2 * cfg.text_projection,
        pos_embed_max_size=latent // 2)


def make_scheduler(cfg: MMDiTTeacherConfig) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)


def encode(text_encoders: list[CLIPTextModelWithProjection], ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The context and pooled embedding ``StableDiffusion3Pipeline.encode_prompt`` makes without T5 and with
    ``max_sequence_length=1``: both CLIPs' penultimate hidden states side by side, one zero row, the pooled side by side."""
    outs = [encoder(ids, output_hidden_states=True) for encoder in text_encoders]
    context = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
    context = torch.cat([context, context.new_zeros(context.shape[0], 1, context.shape[-1])], dim=1)
    return context, torch.cat([o.text_embeds for o in outs], dim=-1)


def build_pipeline(cfg: MMDiTTeacherConfig, vae: AutoencoderKL, tokenizer: CLIPTokenizer) -> StableDiffusion3Pipeline:
    """A fresh (untrained) teacher around ``vae``, its joint attentions counting the zero row ``context_rows`` times."""
    pipe = StableDiffusion3Pipeline(
        transformer=make_transformer(cfg), scheduler=make_scheduler(cfg), vae=vae,
        text_encoder=make_text_encoder(cfg, tokenizer), tokenizer=tokenizer,
        text_encoder_2=make_text_encoder(cfg, tokenizer), tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    use_repeated_tokens(pipe.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: StableDiffusion3Pipeline, prompts: list[str], per_prompt: int, steps: int, guidance: float,
           seed: int, context_rows: int) -> torch.Tensor:
    """Euler samples (N, 3, 64, 64) in [-1, 1], ``per_prompt`` consecutive images per prompt; the transformer must
    carry :class:`~loopfree.method.repeated_tokens.RepeatedTokenJointAttention` (one zero row stands for
    ``context_rows``, the pipeline's 256)."""
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=per_prompt,
                  generator=torch.Generator().manual_seed(seed), output_type="pt", max_sequence_length=1,
                  joint_attention_kwargs={"repeats": context_rows}).images
    return images * 2.0 - 1.0


def cache_latents(run: TrainingRun, cfg: MMDiTTeacherConfig, vae: AutoencoderKL) -> tuple[torch.Tensor, list]:
    """Stage (a): the cached toy latents, shifted and scaled to unit spread; the factors go into ``vae``'s config."""
    latents, attrs = encode_cache(run, cfg, vae)  # scaled by the UNet teacher's factor
    raw = latents / vae.config.scaling_factor
    shift = float(raw.mean())
    scale = float(1.0 / (raw - shift).std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    run.log({"stage": "latents", "shift_factor": shift, "scaling_factor": scale})
    return (raw - shift) * scale, attrs


def train_transformer(run: TrainingRun, cfg: MMDiTTeacherConfig, pipe: StableDiffusion3Pipeline,
                      latents: torch.Tensor, attrs: list) -> int:
    """Stage (b): rectified flow on the cached latents; the EMA weights are in ``pipe`` afterwards. The step reached."""
    model, encoders, tokenizer = pipe.transformer, [pipe.text_encoder, pipe.text_encoder_2], pipe.tokenizer
    params = [p for m in (model, *encoders) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    ema = EMAModel(params, decay=cfg.ema_decay)

    def step(i: int) -> float:
        rng = np.random.default_rng(derive_seed(cfg.seed, 5, i, bits=32))
        rows = rng.integers(len(attrs), size=cfg.batch)
        captions = ["" if rng.random() < cfg.prompt_dropout else make_caption(attrs[r], rng) for r in rows]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        z = latents[torch.from_numpy(rows)]
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, 6, i, bits=32))
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(len(rows), generator=g))  # logit-normal
        sigma = cfg.shift * u / (1 + (cfg.shift - 1) * u)  # the scheduler's shift, as its sigmas carry it
        noise = torch.randn(z.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        context, pooled = encode(encoders, ids)
        v = model((1 - s) * z + s * noise, encoder_hidden_states=context, pooled_projections=pooled,
                  timestep=sigma * 1000, joint_attention_kwargs={"repeats": cfg.context_rows}).sample
        loss = clipped_step(F.mse_loss(v, noise - z), optimizer, params, warmup)  # rectified flow: the velocity dx/dσ = ε − z
        ema.step(params)
        return loss

    probe = attribute_probe(run, cfg, ema, params, lambda prompts: sample(
        pipe, prompts, 1, cfg.probe_steps, cfg.guidance_scales[0], cfg.seed, cfg.context_rows))

    deadline = time.monotonic() + 60 * cfg.minutes if cfg.minutes is not None else None
    for m in (model, *encoders):
        m.train()
    state = {"transformer": model, "text_encoder": encoders[0], "text_encoder_2": encoders[1], "optimizer": optimizer,
             "warmup": warmup, "ema": ema}
    done = run.train("transformer", cfg.steps, step, state, deadline, probe)
    ema.copy_to(params)
    for m in (model, *encoders):
        m.eval().requires_grad_(False)
    return done


def evaluate_teacher(path: str | Path, cfg: MMDiTTeacherConfig) -> dict:
    """Per guidance scale, the toy-world scores of ``eval_steps``-step Euler samples of the pipeline at ``path`` on
    ``eval_prompts`` held-out prompts, ``eval_images_per_prompt`` each."""
    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    use_repeated_tokens(pipe.transformer)
    pipe.set_progress_bar_config(disable=True)
    return evaluate_guidance(cfg, lambda prompts, guidance: sample(
        pipe, prompts, cfg.eval_images_per_prompt, cfg.eval_steps, guidance, cfg.seed, cfg.context_rows))


def train_teacher(out_dir: str | Path, config: MMDiTTeacherConfig | None = None) -> dict:
    """All three stages into ``out_dir``; returns (and writes to ``eval.json``) the evaluation. The process's thread
    count and global random state are as they were afterwards."""
    config = config or MMDiTTeacherConfig()
    with cpu_threads(config.threads), torch.random.fork_rng(devices=[]):
        return _train_teacher(Path(out_dir), config)


def _train_teacher(out: Path, cfg: MMDiTTeacherConfig) -> dict:
    tokenizer = build_tokenizer()
    run = TrainingRun(out, cfg.checkpoint_minutes, cfg.log_every)
    write_json(out / "teacher_config.json", asdict(cfg))
    started = time.monotonic()
    vae = AutoencoderKL.from_pretrained(bundled("teacher") / "vae").requires_grad_(False)
    torch.manual_seed(cfg.seed)  # module initialisation
    pipe = build_pipeline(cfg, vae, tokenizer)
    size = _megabytes(pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, vae)
    logger.info("model: %.1f MB of weights", size)
    if size > cfg.max_megabytes:
        raise LoopfreeError(f"the teacher would hold {size:.1f} MB of weights, over max_megabytes={cfg.max_megabytes}")
    latents, attrs = cache_latents(run, cfg, vae)
    steps = train_transformer(run, cfg, pipe, latents, attrs)
    size = save_teacher(out / "pipeline", pipe)
    report = {"steps": steps, "megabytes": size, "eval_steps": cfg.eval_steps, "eval_prompts": cfg.eval_prompts,
              "eval_images_per_prompt": cfg.eval_images_per_prompt, "guidance": evaluate_teacher(out / "pipeline", cfg),
              "wall_s": time.monotonic() - started}
    write_json(out / "eval.json", report)
    return report
