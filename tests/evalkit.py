"""Stand-ins with the real call conventions for ``loopfree eval`` tests: an Inception-signature TorchScript file, a
tiny random CLIP folder, a tiny Stable Diffusion folder; and the metric protocol re-implemented independently."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tiny import make_pipeline, make_tokenizer

PROMPTS = ["a red cat", "a blue dog", "a photo of the green circle", "a red circle", "the photo of a dog", "a blue cat"]


class FakeInception(nn.Module):
    """``net(x, return_features=True)`` on float images in [0, 255] → (N, 2048), resizing to 299 inside."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 7, stride=8)
        self.fc = nn.Linear(8 * 4 * 4, 2048)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(img.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = F.adaptive_avg_pool2d(torch.relu(self.conv((x - 128) / 128)), 4).flatten(1)
        features = self.fc(x)
        return features if return_features else features[:, :1008]


def make_inception(path) -> str:
    torch.jit.script(FakeInception().eval()).save(str(path))
    return str(path)


def make_clip(path) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = make_tokenizer(os.path.join(path, "tok"))
    n = len(tok)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=8,
    )
    CLIPModel(config).eval().save_pretrained(path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(path)
    return str(path)


def make_tiny_vae(path):
    """A tiny diffusers AutoencoderTiny (TAESD's class), ×4 like the toy VAE, saved at ``path``."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    vae = AutoencoderTiny(latent_channels=4, encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                          num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1))  # ×4, as the toy VAE
    vae.save_pretrained(path, safe_serialization=True)
    return path


def make_sd(path) -> str:
    make_pipeline(os.path.join(path, "parts")).save_pretrained(path)
    return str(path)


def make_reference_images(folder, n: int = 12, seed: int = 0) -> str:
    """Random images of assorted sizes and formats (JPEG, PNG, a grey one)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        h, w = rng.integers(16, 40, size=2)
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        image = image.convert("L") if i == 0 else image
        image.save(os.path.join(folder, f"im{i:02d}.{'jpg' if i % 3 == 0 else 'png'}"))
    return str(folder)


def protocol_images(paths, size: int) -> np.ndarray:
    """The metric protocol written out again: RGB, centre square, Lanczos to ``size``, uint8."""
    out = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        out.append(np.array(image.crop(box).resize((size, size), Image.LANCZOS) if s != size else image.crop(box)))
    return np.stack(out)


def inception_features(net, images: np.ndarray) -> np.ndarray:
    """clean-fid's feeding: each channel bicubic-resized to 299 in float, clipped, then net(x, return_features=True)."""
    chans = [[np.clip(np.array(Image.fromarray(im[:, :, c].astype(np.float32)).resize((299, 299), Image.BICUBIC)), 0, 255)
              for c in range(3)] for im in images]
    with torch.no_grad():
        return net(torch.tensor(np.array(chans)), return_features=True).double().numpy()
