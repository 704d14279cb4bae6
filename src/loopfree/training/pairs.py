"""Teacher pairs for the regression term (DMD): (prompt, x_T) → the teacher's multi-step DDIM (SD3: Euler) x_0, made once, cached.

Pair i is training prompt ``i mod len(prompts)`` with the initial noise of :func:`pair_seed` (the run's seed, i)
(:func:`~loopfree.utils.seeding.initial_noise`), so runs with other training seeds regress onto other pairs. The cache is a folder named by what decides the pairs (teacher, prompts, steps, guidance, latent
shape, count), so every run with those settings reuses it. It is filled in chunks of :data:`CHUNK` pairs by every
process of a launch at once (and by any other run filling it too), each chunk made by one filler and written
atomically, and an interrupted fill continues where it stopped. Training reads the rows it draws from disk::

    cache = teacher_pairs(cfg, pipe.unet, pipe.scheduler, prompts, encode, (4, 64, 64), device, rank, world)
    x_T, x0 = cache.rows([5, 17, 5])  # only these rows are read
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from diffusers import SD3Transformer2DModel
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from loopfree.method import split_sd3
from loopfree.method.sampler import ddim_loop
from loopfree.pipelines.loading import inspect_pipeline, load_pipeline
from loopfree.training.config import DistillConfig
from loopfree.training.data import load_prompts
from loopfree.training.prompt_encoder import PromptEncoder
from loopfree.utils.outputs import write_atomic, write_json
from loopfree.utils.seeding import derive_seed, initial_noise

CHUNK = 32  # pairs per file: the unit a filler claims, writes and resumes at
POLL_SECONDS = 2.0  # how often a filler with nothing left to claim looks for the chunks others are making


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

    def fill(self, make: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]], rank: int = 0, world: int = 1,
             progress: bool = True) -> int:
        """Write the missing chunks, together with the other fillers, and return once every chunk is on disk; the
        number this one made. ``make(indices)`` returns their (x_T, x_0).

        Filler ``rank`` of ``world`` (a launch's processes) tries the chunks ``j ≡ rank (mod world)`` first, then
        the others from the end, so the processes split the work and whoever is done first relieves the slower ones.
        A chunk is claimed by a non-blocking ``flock`` on its own lock file, held while it is made and written
        (temp file + rename): no chunk is made twice and none is seen half-written, whichever runs and processes
        fill at once. With nothing left to claim it polls the folder for the chunks others hold — no collective, so
        a fill of hours never meets a process group's timeout; a filler that dies drops its lock, and its chunk is
        claimed at the next poll."""
        starts = list(range(0, self.count, CHUNK))
        own = starts[rank::world]
        order = own + [s for s in reversed(starts) if s not in own]
        if not self.missing():
            return 0
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as lock:  # the identity is written once, whoever comes first
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (self.path / "identity.json").is_file():
                write_json(self.path / "identity.json", self.identity)
        made, written = 0, set()
        with tqdm(total=len(starts), desc="teacher pairs", unit="chunk", disable=not progress) as bar:
            while True:
                for start in (s for s in order if s not in written):
                    made += self._claim(start, make)
                    if self._chunk(start).is_file():
                        written.add(start)
                        bar.update()
                if len(written) == len(starts):
                    return made
                time.sleep(POLL_SECONDS)

    def _claim(self, start: int, make: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Make and write chunk ``start`` unless it is written or another filler holds it; whether this one did."""
        if self._chunk(start).is_file():
            return False
        with open(self.path / f".pairs-{start:08d}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # being made by another filler
            if self._chunk(start).is_file():  # written between the look and the lock
                return False
            x_T, x0 = make(list(range(start, min(start + CHUNK, self.count))))
            tensors = {"x_T": x_T.detach().float().cpu().contiguous(), "x0": x0.detach().float().cpu().contiguous()}
            write_atomic(self._chunk(start), lambda tmp: save_file(tensors, str(tmp)))
            return True

    def rows(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs ``indices`` (in that order, repeats allowed) as (x_T, x_0), each (len(indices), C, H, W): only those
        rows are read, sliced from their chunk files (safetensors), so no process holds the whole cache; an error
        naming the cache if a chunk is missing."""
        picked: dict[str, list[torch.Tensor | None]] = {"x_T": [None] * len(indices), "x0": [None] * len(indices)}
        by_chunk: dict[int, list[tuple[int, int]]] = {}
        for position, i in enumerate(indices):
            if not 0 <= i < self.count:
                raise IndexError(f"teacher pair {i} is not among the cache's {self.count}")
            by_chunk.setdefault(i - i % CHUNK, []).append((position, i % CHUNK))
        for start, wanted in by_chunk.items():
            if not self._chunk(start).is_file():
                raise FileNotFoundError(f"teacher pair cache {self.path} is incomplete: fill it first")
            with safe_open(str(self._chunk(start)), framework="pt") as f:
                for name, rows in picked.items():
                    part = f.get_slice(name)
                    for position, row in wanted:
                        rows[position] = part[row : row + 1]
        return torch.cat(picked["x_T"]), torch.cat(picked["x0"])

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All pairs, in index order (:meth:`rows` of every index)."""
        return self.rows(list(range(self.count)))


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
                  latent_shape: tuple[int, int, int], device: torch.device, rank: int = 0, world: int = 1) -> PairCache:
    """The run's pair cache, filled with ``cfg.regression_steps``-step guided DDIM of the teacher ``unet`` (an SD3
    transformer: its Euler sampler)
    (``encode(prompts) -> (cond, uncond)`` as the trainer encodes them): process ``rank`` of the launch's ``world``
    makes its share (:meth:`PairCache.fill`) and returns when the cache is whole."""
    used = pair_prompts(prompts, list(range(min(cfg.regression_pairs, len(prompts)))))
    flow_teacher = isinstance(unet, SD3Transformer2DModel)
    sample = split_sd3.euler_loop if flow_teacher else ddim_loop  # the teacher's own sampler: SD3's Euler, else DDIM
    folder = Path(cfg.teacher) / ("transformer" if flow_teacher else "unet")
    identity = {"teacher": os.path.abspath(cfg.teacher), "weights": weights_stamp(folder),
                "prompts": hashlib.sha256("\n".join(used).encode()).hexdigest(), "steps": cfg.regression_steps,
                "guidance": cfg.regression_guidance, "latent_shape": list(latent_shape), "count": cfg.regression_pairs,
                "seed": cfg.seed}
    cache = PairCache(cfg.regression_cache or default_cache_root(), identity, cfg.regression_pairs)

    def make(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x_T = initial_noise([pair_seed(cfg.seed, i) for i in indices], latent_shape, device)
        cond, uncond = encode(pair_prompts(prompts, indices))
        return x_T, sample(unet, scheduler, x_T, cfg.regression_steps, cond, uncond, cfg.regression_guidance)

    cache.fill(make, rank, world, progress=rank == 0)
    return cache


def prepare_teacher_pairs(cfg: DistillConfig) -> None:
    """Fill the regression term's teacher-pair cache of ``cfg`` in this process (with all its threads), so runs
    started side by side find it made (a run fills a missing cache itself too)."""
    if cfg.regression_weight <= 0:
        return
    pipe = load_pipeline(cfg.teacher)
    resolution = cfg.resolution or inspect_pipeline(cfg.teacher, transformers=True).default_size
    encode = PromptEncoder(pipe, torch.device("cpu"), resolution)
    scale = pipe.vae_scale_factor
    teacher_pairs(cfg, pipe.denoiser, pipe.scheduler, load_prompts(cfg.prompts, cfg.prompt_field).prompts, encode,
                  (pipe.denoiser.config.in_channels, resolution // scale, resolution // scale), torch.device("cpu"))
