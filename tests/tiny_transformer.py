"""Tiny random-weight PixArt-α, SD3 (without T5) and FLUX pipelines, built offline for tests."""

from __future__ import annotations

import os

import torch
from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel,
                       PixArtTransformer2DModel, SD3Transformer2DModel)
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from tiny import make_text_encoder, make_tokenizer

KINDS = ("pixart", "sd3", "flux")  # flux-dev: FLUX with the guidance embedding
WORDS = ["a", "red", "blue", "cat", "dog", "photo", "of", "the", "green", "circle"]


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight moved off its initialisation (zero-initialised projections would hide whole blocks)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def make_t5(d_model: int) -> tuple[T5Tokenizer, T5EncoderModel]:
    """A word-level T5 tokenizer (a unigram vocabulary built here) and a one-layer T5 encoder of width ``d_model``."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(3)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return tokenizer, T5EncoderModel(config).eval()


def make_vae(shift: bool) -> AutoencoderKL:
    """A VAE with a scale factor of 2 and 4 latent channels; ``shift``: a shift factor, as SD3's and FLUX's have."""
    torch.manual_seed(0)
    extra = dict(shift_factor=0.1, scaling_factor=1.5) if shift else {}
    return AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         sample_size=16, **extra).eval()


def make_transformer_pipeline(root, kind: str):
    """A tiny LoopFree{PixArt,SD3,Flux}Pipeline with random weights. PixArt's transformer is size-conditioned
    (sample size 128, as PixArt-α 1024), so ask it for small images; SD3 has no T5 (text_encoder_3 None)."""
    from loopfree.pipelines.pipeline_flux import LoopFreeFluxPipeline
    from loopfree.pipelines.pipeline_pixart import LoopFreePixArtPipeline
    from loopfree.pipelines.pipeline_sd3 import LoopFreeSD3Pipeline

    if kind == "pixart":
        tokenizer, text_encoder = make_t5(10)
        transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=6, in_channels=4, out_channels=8,
                                               num_layers=4, cross_attention_dim=12, sample_size=128, patch_size=2,
                                               caption_channels=10)
        return LoopFreePixArtPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=make_vae(False),
                                      transformer=_perturbed(transformer, 1), scheduler=DPMSolverMultistepScheduler())
    clip_tokenizer = make_tokenizer(os.path.join(root, "tok"))
    if kind == "sd3":
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=4,
                                            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=8,
                                            pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
        return LoopFreeSD3Pipeline(
            transformer=_perturbed(transformer, 1), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=make_vae(True),
            text_encoder=make_text_encoder(len(clip_tokenizer), True), tokenizer=clip_tokenizer,
            text_encoder_2=make_text_encoder(len(clip_tokenizer), True, seed=1), tokenizer_2=clip_tokenizer,
            text_encoder_3=None, tokenizer_3=None)
    tokenizer_2, text_encoder_2 = make_t5(12)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                                         num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=16,
                                         guidance_embeds=kind == "flux-dev", axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return LoopFreeFluxPipeline(scheduler=scheduler, vae=make_vae(True), text_encoder=make_text_encoder(len(clip_tokenizer)),
                                tokenizer=clip_tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                transformer=_perturbed(transformer, 1))
