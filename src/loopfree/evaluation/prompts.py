"""Where ``loopfree eval`` takes its prompts from, and which of them a ``--num-prompts`` subset keeps.

    source = prompt_source("captions_val2014.json", field=None, seed=0)
    indices = source.select(30_000, seed=0)      # a seeded subset; image i of prompt p depends on p, not on the subset

Every source ``loopfree distill`` reads (:func:`loopfree.training.data.load_prompts`: txt, jsonl, csv, parquet, datasets
folders) plus COCO captions JSON and DrawBench / PartiPrompts CSV/TSV; without a file, the toy world's held-out
prompts (already a seeded draw, so a subset is their first N, as in ``loopfree demo``).
"""

from __future__ import annotations

import os

import hashlib
from dataclasses import dataclass

import numpy as np

from loopfree.utils.errors import LoopfreeError


@dataclass(frozen=True)
class PromptSource:
    """All prompts of a source in its own order (index p = a prompt's position here)."""

    name: str
    prompts: list[str]
    presampled: bool = False  # the source is itself a seeded draw: a subset is a prefix

    @property
    def sha256(self) -> str:
        """A hash of the prompts themselves (what decides the images), whatever file format held them."""
        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()

    def select(self, n: int | None, seed: int) -> list[int]:
        """Indices of the prompts to evaluate, ascending: all, or ``n`` of them drawn with ``seed`` (the draw for
        a smaller ``n`` is a subset of the draw for a larger one)."""
        total = len(self.prompts)
        if n is None:
            return list(range(total))
        if n > total:
            raise LoopfreeError(f"--num-prompts {n} is more than the {total} prompts of {self.name}")
        if self.presampled:
            return list(range(n))
        return sorted(np.random.default_rng(seed).permutation(total)[:n].tolist())


def prompt_source(path: str | None, field: str | None, seed: int) -> PromptSource:
    """The prompts of ``path`` (see the module docstring); ``None``: the toy world's held-out prompts for ``seed``."""
    if path is None:
        from loopfree.toy.settings import EVAL_POOL
        from loopfree.toy.world import heldout_prompts

        return PromptSource(f"the toy world's {EVAL_POOL} held-out prompts (seed {seed})", heldout_prompts(EVAL_POOL, seed), True)
    from loopfree.training.data import load_prompts

    return PromptSource(os.path.abspath(path), load_prompts(path, field).prompts)
