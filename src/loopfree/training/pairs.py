"""Teacher pairs for the regression term (DMD): (prompt, x_T) → the teacher's multi-step DDIM x_0, made once, cached.

Pair i is training prompt ``i mod len(prompts)`` with the initial noise of :func:`pair_seed` (the run's seed, i)
(:func:`~loopfree.utils.seeding.initial_noise`), so runs with other training seeds regress onto other pairs. The cache is a folder named by what decides the pairs (teacher, prompts, steps, guidance, latent
shape, count), so every run with those settings reuses it; it is filled in chunks, each written atomically, and an
interrupted fill continues where it stopped::

    cache = teacher_pairs(cfg, pipe.unet, pipe.scheduler, prompts, encode, (4, 64, 64), device)  # fills what is missing
    x_T, x0 = cache.load()
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from loopfree.method.sampler import ddim_loop
from loopfree.pipelines.loading import inspect_pipeline, load_pipeline
from loopfree.training.config import DistillConfig
from loopfree.training.data import load_prompts
from loopfree.training.prompt_encoder import PromptEncoder
from loopfree.utils.outputs import write_atomic, write_json
from loopfree.utils.seeding import derive_seed, initial_noise

CHUNK = 32  # pairs per file: the fill's resumable unit


def default_cache_root() -> Path:
    """``$LOOPFREE_CACHE/pairs``, else ``~/.cache/loopfree/pairs`` (XDG)."""
    base = os.environ.get("LOOPFREE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "loopfree")
    return Path(base).expanduser() / "pairs"


class PairCache:
    """``count`` teacher pairs under ``root/<hash of identity>``: ``x_T`` and ``x0``, each (count, C, H, W)."""

    def __init__(self, root: str | Path, identity: dict, count: int):
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.path, self.identity, self.count = Path(root) / key, identity, count

    def _chunk(self, start: int) -> Path:
        return self.path / f"pairs-{start:08d}.safetensors"

    def missing(self) -> list[int]:
        """The first index of every chunk not yet written."""
        return [s for s in range(0, self.count, CHUNK) if not self._chunk(s).is_file()]

    def fill(self, make: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write the missing chunks; ``make(indices)`` returns their (x_T, x_0)."""
        if not self.missing():
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as lock:  # runs started together fill it once: the others wait, then reuse
            fcntl.flock(lock, fcntl.LOCK_EX)
            write_json(self.path / "identity.json", self.identity)
            for start in tqdm(self.missing(), desc="teacher pairs", unit="chunk"):
                x_T, x0 = make(list(range(start, min(start + CHUNK, self.count))))
                tensors = {"x_T": x_T.detach().float().cpu().contiguous(), "x0": x0.detach().float().cpu().contiguous()}
                write_atomic(self._chunk(start), lambda tmp: save_file(tensors, str(tmp)))

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All pairs, in index order; an error naming the cache if a chunk is missing."""
        if self.missing():
            raise FileNotFoundError(f"teacher pair cache {self.path} is incomplete: fill it first")
        parts = [load_file(str(self._chunk(s))) for s in range(0, self.count, CHUNK)]
        return torch.cat([p["x_T"] for p in parts]), torch.cat([p["x0"] for p in parts])


def weights_stamp(folder: Path) -> list[list]:
    """Name, size and modification time of every weight file in ``folder``: a teacher replaced at the same path gets
    pairs of its own instead of the old teacher's."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.glob("*.safetensors"))]


PAIR_STREAM = 0x70616972  # "pair": keeps pair seeds apart from image seeds (an image seed would need image 1.9e9)


def pair_seed(seed: int, index: int) -> int:
    """The initial-noise seed of teacher pair ``index`` in a run with training seed ``seed``."""
    return derive_seed(seed, index, PAIR_STREAM)


def pair_prompts(prompts: list[str], indices: list[int]) -> list[str]:
    """The training prompt of each pair index."""
    return [prompts[i % len(prompts)] for i in indices]


@torch.no_grad()
def teacher_pairs(cfg: DistillConfig, unet, scheduler, prompts: list[str], encode: Callable[[list[str]], tuple],
                  latent_shape: tuple[int, int, int], device: torch.device, fill: bool = True) -> PairCache:
    """The run's pair cache, filled (by the one process given ``fill``) with ``cfg.regression_steps``-step guided DDIM
    of the teacher ``unet``: ``encode(prompts) -> (cond, uncond)`` as the trainer encodes them."""
    used = pair_prompts(prompts, list(range(min(cfg.regression_pairs, len(prompts)))))
    identity = {"teacher": os.path.abspath(cfg.teacher), "weights": weights_stamp(Path(cfg.teacher) / "unet"),
                "prompts": hashlib.sha256("\n".join(used).encode()).hexdigest(), "steps": cfg.regression_steps,
                "guidance": cfg.regression_guidance, "latent_shape": list(latent_shape), "count": cfg.regression_pairs,
                "seed": cfg.seed}
    cache = PairCache(cfg.regression_cache or default_cache_root(), identity, cfg.regression_pairs)

    def make(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x_T = initial_noise([pair_seed(cfg.seed, i) for i in indices], latent_shape, device)
        cond, uncond = encode(pair_prompts(prompts, indices))
        return x_T, ddim_loop(unet, scheduler, x_T, cfg.regression_steps, cond, uncond, cfg.regression_guidance)

    if fill:
        cache.fill(make)
    return cache


def prepare_teacher_pairs(cfg: DistillConfig) -> None:
    """Fill the regression term's teacher-pair cache of ``cfg`` in this process (with all its threads), so runs
    started side by side find it made (a run fills a missing cache itself too)."""
    if cfg.regression_weight <= 0:
        return
    pipe = load_pipeline(cfg.teacher)
    resolution = cfg.resolution or inspect_pipeline(cfg.teacher).default_size
    encode = PromptEncoder(pipe, torch.device("cpu"), resolution)
    scale = pipe.vae_scale_factor
    teacher_pairs(cfg, pipe.unet, pipe.scheduler, load_prompts(cfg.prompts, cfg.prompt_field).prompts, encode,
                  (pipe.unet.config.in_channels, resolution // scale, resolution // scale), torch.device("cpu"))
