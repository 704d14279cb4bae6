"""UNet features of every sampling step, read with forward hooks on the UNet's public blocks, and the mean cosine
similarity between adjacent steps (paper Fig. 1c).

Encoder features are what the decoder receives from E (``split.EncoderFeatures``): the mid-block output and the
skip tensors (``conv_in``'s output, then every down block's residuals); decoder features are each up block's
output. The hooks see diffusers' own forward and ``split.run_encoder``/``run_decoders(..., hoist=False)`` alike (the hoisted
decoders call no up block as a module), and are removed on exit::

    tracker = AdjacentSimilarity()
    with unet_features(unet, tracker.update):
        pipe.denoise("loop", plan, x_T, cond)        # one UNet pass per step
    tracker.mean("encoder"), tracker.mean("decoder")

A transformer's features are its blocks' image-token outputs (:func:`block_features`): the first N blocks are the
split's shared part ("encoder"), the rest its per-step part ("decoder"), each block one tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel


@dataclass
class StepFeatures:
    """The features of one UNet pass over a batch of rows."""

    encoder: list[torch.Tensor] = field(default_factory=list)  # mid-block output, then the skip tensors
    decoder: list[torch.Tensor] = field(default_factory=list)  # each up block's output, in order


@contextmanager
def unet_features(unet: UNet2DConditionModel, on_step: Callable[[StepFeatures], None]) -> Iterator[None]:
    """Call ``on_step`` with the features of every UNet pass made inside (one decoder timestep per pass)."""
    step = StepFeatures()
    skips: list[torch.Tensor] = []

    def started(module, args, out):
        skips[:] = [out]

    def down(module, args, out):
        skips.extend(out[1])

    def mid(module, args, out):
        step.encoder[:] = [out]

    def up(module, args, out):
        step.decoder.append(out)
        if module is unet.up_blocks[-1]:
            on_step(StepFeatures(step.encoder[:1] + skips, list(step.decoder)))
            step.encoder.clear()
            step.decoder.clear()

    handles = [unet.conv_in.register_forward_hook(started)]
    handles += [block.register_forward_hook(down) for block in unet.down_blocks]
    if unet.mid_block is not None:
        handles.append(unet.mid_block.register_forward_hook(mid))
    handles += [block.register_forward_hook(up) for block in unet.up_blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def denoiser_blocks(pipe) -> list[torch.nn.Module]:
    """A transformer pipeline's blocks in the order N counts them (FLUX: double-, then single-stream)."""
    from loopfree.method import split_flux

    model = pipe.transformer
    return split_flux.blocks(model) if pipe.family == "flux" else list(model.transformer_blocks)


@contextmanager
def block_features(blocks: list[torch.nn.Module], shared_blocks: int, on_step: Callable[[StepFeatures], None]) -> Iterator[None]:
    """Call ``on_step`` with every transformer pass's block outputs (image tokens; MMDiT blocks return the text
    stream first), blocks 0..N−1 as ``encoder``, the rest as ``decoder``."""
    outputs: list[torch.Tensor] = []

    def hook(module, args, out):
        outputs.append(out[1] if isinstance(out, tuple) else out)
        if module is blocks[-1]:
            on_step(StepFeatures(outputs[:shared_blocks], outputs[shared_blocks:]))
            outputs.clear()

    handles = [block.register_forward_hook(hook) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of ``a`` with the same row of ``b``, over all its other dimensions (float64)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


class AdjacentSimilarity:
    """Mean cosine similarity between the features of adjacent steps of trajectories, per feature tensor.

    ``update`` takes the steps of one trajectory in order; ``reset`` starts the next trajectory (another batch).
    A part's mean weighs its tensors equally: the mean over tensors of the mean over step pairs and rows.
    """

    def __init__(self):
        self.previous: StepFeatures | None = None
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def reset(self) -> None:
        self.previous = None

    def update(self, step: StepFeatures) -> None:
        step = StepFeatures([t.detach() for t in step.encoder], [t.detach() for t in step.decoder])
        if self.previous is not None:
            for part in ("encoder", "decoder"):
                now, before = getattr(step, part), getattr(self.previous, part)
                if not now:  # a transformer split at N = 0 or L
                    continue
                cos = torch.stack([cosine_rows(a, b).sum() for a, b in zip(now, before)]).cpu()
                self.sums[part] = self.sums.get(part, 0) + cos
                self.counts[part] = self.counts.get(part, 0) + now[0].shape[0]
        self.previous = step

    def per_tensor(self, part: str) -> list[float] | None:
        """Mean similarity of each of ``part``'s tensors; None before two steps were seen."""
        if part not in self.sums:
            return None
        return (self.sums[part] / self.counts[part]).tolist()

    def mean(self, part: str) -> float | None:
        """Mean similarity of ``part`` ("encoder" or "decoder"); None before two steps were seen."""
        values = self.per_tensor(part)
        return None if values is None else sum(values) / len(values)
