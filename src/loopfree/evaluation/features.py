"""Images in, feature vectors out: the metric protocol's image preparation and the Inception network.

Both sides (generated and reference) are read the same way: RGB, centre-cropped to a square, resized to the
metric resolution with PIL's Lanczos filter (GigaGAN / clean-fid: 256), as uint8. The Inception network is the
TorchScript file StyleGAN3 and clean-fid use (``inception-2015-12-05.pt``), fed as clean-fid does: each channel
resized to 299 × 299 with PIL bicubic in float, clipped to [0, 255], then ``net(x, return_features=True)``
→ (N, 2048). Nothing is downloaded: the file is the user's, loaded with ``torch.jit.load``.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from loopfree.utils.errors import LoopfreeError
from loopfree.evaluation.settings import INCEPTION_URL

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INCEPTION_SIZE, INCEPTION_DIM = 299, 2048
READ_BATCH = 64


class Extractor(Protocol):
    """Maps a batch of prepared uint8 images (N, R, R, 3) to named per-image arrays, at least ``features``."""

    kind: str
    resolution: int
    sha256: str  # of the network's weights: part of every feature-cache key

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def prepare(image: Image.Image, size: int) -> np.ndarray:
    """``image`` as RGB, centre-cropped to a square and resized to ``size`` × ``size`` (Lanczos), uint8."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.LANCZOS)
    return np.asarray(image)


def read_prepared(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return prepare(image, size)
    except (OSError, ValueError) as e:
        raise LoopfreeError(f"cannot read the image {path} ({e.__class__.__name__}); delete or replace it") from None


def image_batches(paths: list[Path], size: int, desc: str, batch_size: int = READ_BATCH) -> Iterator[np.ndarray]:
    """Prepared images of ``paths`` in order, ``batch_size`` at a time (decoded on a few threads), with a bar."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, tqdm(total=len(paths), desc=desc, unit="img") as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            yield np.stack(list(pool.map(lambda p: read_prepared(p, size), chunk)))
            bar.update(len(chunk))


def extract(extractor: Extractor | None, batches: Iterable[np.ndarray], clip=None, prompts: list[str] | None = None) -> dict[str, np.ndarray]:
    """Every output of ``extractor`` over all ``batches``, concatenated; with a ``clip`` scorer also ``clip``, the
    cosine of each image and its entry in ``prompts``."""
    parts: dict[str, list[np.ndarray]] = {}
    start = 0
    for batch in batches:
        outputs = extractor(batch) if extractor is not None else {}
        if clip is not None:
            outputs["clip"] = clip(batch, prompts[start : start + len(batch)])
        for name, value in outputs.items():
            parts.setdefault(name, []).append(value)
        start += len(batch)
    return {name: np.concatenate(values) for name, values in parts.items()}


def find_images(folder: str | os.PathLike) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted); an error if there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise LoopfreeError(f"--reference-images {folder}: {'not a folder' if root.exists() else 'does not exist'}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."))
    if not paths:
        raise LoopfreeError(f"--reference-images {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def resize_for_inception(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, R, R, 3) → float (N, 3, 299, 299) in [0, 255]: per channel, PIL bicubic in float, clipped."""
    if images.shape[1:3] == (INCEPTION_SIZE, INCEPTION_SIZE):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float()
    size = (INCEPTION_SIZE, INCEPTION_SIZE)
    out = np.stack([[np.asarray(Image.fromarray(image[..., c].astype(np.float32)).resize(size, Image.BICUBIC)) for c in range(3)]
                    for image in images])
    return torch.from_numpy(out.clip(0, 255))


class InceptionExtractor:
    """The Inception-v3 TorchScript network's pool features (N, 2048) at ``resolution``."""

    kind = "inception"

    def __init__(self, path: str | None, resolution: int, device: torch.device):
        hint = f"download inception-2015-12-05.pt (the TorchScript Inception network of StyleGAN2-ADA/3 and clean-fid) from {INCEPTION_URL}"
        if path is None:
            raise LoopfreeError(f"FID, KID, precision/recall and density/coverage need --inception FILE: {hint}")
        if not Path(path).is_file():
            raise LoopfreeError(f"--inception {path} {'is a folder' if Path(path).exists() else 'does not exist'}: {hint}")
        try:
            net = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError, OSError) as e:
            raise LoopfreeError(f"--inception {path} is not a TorchScript file ({e.__class__.__name__}): {hint}") from None
        try:
            with torch.no_grad():
                shape = tuple(net(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE), return_features=True).shape)
        except Exception as e:  # any TorchScript module: whatever its forward raises means the wrong file
            shape = f"an error ({e.__class__.__name__})"
        if shape != (1, INCEPTION_DIM):
            raise LoopfreeError(f"--inception {path} is not the Inception feature network: net(x, return_features=True) gave "
                                f"{shape}, expected (1, {INCEPTION_DIM}); {hint}")
        self.path, self.resolution, self.device = str(Path(path).absolute()), resolution, device
        self.sha256 = file_sha256(path)
        self.net = net.to(device)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = resize_for_inception(images).to(self.device)
        return {"features": self.net(x, return_features=True).float().cpu().numpy()}
