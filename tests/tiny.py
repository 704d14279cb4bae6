"""Tiny random-weight components with the real architectures' shapes, built offline for tests."""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


def unet_config(kind: str = "sd") -> dict:
    """SD1-like, SD2-like (linear projections) or SDXL-like (text_time added conditioning) UNet config."""
    cfg = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    if kind == "sd2":  # SD2.x (v-prediction 768 and ε base): linear projections, per-block head dims
        cfg.update(use_linear_projection=True, attention_head_dim=(2, 4))
    if kind == "sdxl":
        cfg.update(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=8 + 6 * 4,  # pooled text (8) + 6 time ids × 4
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
        )
    return cfg


def make_unet(kind: str = "sd", seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(kind)).eval()
    # random init leaves conv_out at zero-ish scale; perturb every weight so outputs depend on all blocks
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def sdxl_added_cond(batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"text_embeds": torch.randn(batch, 8, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}


def make_scheduler(prediction_type: str = "epsilon", **kw) -> DDIMScheduler:
    """SD2.1-base's scheduler config (leading spacing, steps_offset 1, set_alpha_to_one False)."""
    cfg = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    cfg.update(kw)
    return DDIMScheduler(**cfg)


def make_tokenizer(path) -> CLIPTokenizer:
    """A small word-level CLIP tokenizer written to ``path`` (vocab + merges built here, no download)."""
    import json

    words = ["a", "red", "blue", "cat", "dog", "photo", "of", "the", "green", "circle"]
    chars = sorted(set("".join(words)) | set("bcdefghijklmnopqrstuvwxyz"))
    vocab: dict[str, int] = {}
    for tok in ["!", *chars, *[c + "</w>" for c in chars]]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    for special in ["<|startoftext|>", "<|endoftext|>"]:
        vocab[special] = len(vocab)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"), model_max_length=8)


def make_text_encoder(vocab_size: int, with_projection: bool = False, hidden: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=8, projection_dim=8,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def make_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16,
    ).eval()


def make_pipeline(root, kind: str = "sd", prediction_type: str = "epsilon"):
    """A tiny LoopFreePipeline (kind "sd") or LoopFreeXLPipeline (kind "sdxl") with random weights."""
    from loopfree.pipelines.pipeline import LoopFreePipeline, LoopFreeXLPipeline

    tok = make_tokenizer(os.path.join(root, "tok"))
    parts = dict(vae=make_vae(), unet=make_unet(kind), scheduler=make_scheduler(prediction_type), tokenizer=tok)
    if kind == "sdxl":
        return LoopFreeXLPipeline(
            text_encoder=make_text_encoder(len(tok), hidden=8), text_encoder_2=make_text_encoder(len(tok), True, hidden=8, seed=1),
            tokenizer_2=tok, **parts,
        )
    return LoopFreePipeline(text_encoder=make_text_encoder(len(tok)), **parts)


PROMPTS = "a red cat\na blue dog\n\na green circle\nthe red dog\na red cat\nthe blue circle\n"


def make_teacher_folder(root, kind: str = "sd", prediction_type: str = "epsilon"):
    """A tiny teacher pipeline saved at ``root/pipe`` and a prompt file ``root/prompts.txt``; returns ``root``."""
    make_pipeline(root, kind, prediction_type).save_pretrained(root / "pipe")
    (root / "prompts.txt").write_text(PROMPTS)
    return root


def distill_config(teacher_root, out, **kw):
    """A quick ``DistillConfig`` for the tiny teacher: batch 2, LoRA rank 4, 4 steps, checkpoint every 2."""
    from loopfree.training.config import load_config

    base = dict(teacher=str(teacher_root / "pipe"), prompts=str(teacher_root / "prompts.txt"), out=str(out), batch_size=2,
                lora_rank=4, log_with="none", checkpoint_every=2, max_steps=4, lr_student=1e-3)
    return load_config(None, {**base, **kw})
