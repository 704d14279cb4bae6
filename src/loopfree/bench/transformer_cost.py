"""``loopfree bench --arch pixart-1024``: what the one pass costs a transformer next to full forwards, at real shapes.

    loopfree bench --arch sd3-medium --shared-blocks 6 --shared-blocks 12 --repeats 1

Rows: one full forward (the model's own, at τ_K), the K-step sampler (K full forwards), and for each N the one pass
— the shared part (embeddings, blocks 0..N-1) once, the K per-step parts (blocks N..L-1, final norm and projection)
as one batch — with its two parts. FLOPs are counted exactly (``torch.utils.flop_counter``) on the meta device:
nothing is allocated, so FLUX's 12 B parameters cost nothing to count. The one pass is set against the issue's
bound, ``1 + (K − 1)·(1 − N/L)`` full forwards: its blocks cost exactly that, and it pays the embeddings once and
the final layer K times.

Timing (``timing``): ``"blocks"`` (the default) builds the model with one block of each kind (``reduced``), runs
the three calls on it with the real token counts, splits each call into its blocks' time and the rest (forward
hooks), and adds up the real model's blocks — how a model too large for memory (FLUX: 48 GB in fp32) is timed;
FLOPs are added up the same way, and equal the whole model's count exactly. ``"whole"`` times and counts the whole
model's calls; ``"none"`` counts FLOPs (whole model, meta) and times nothing.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from loopfree.bench.speed import _CPU_SDPA
from loopfree.bench.transformer_archs import TransformerArch
from loopfree.method.transformer_split import check_shared_blocks
from loopfree.utils.timing import synchronize

FRACTIONS = (0.25, 0.5, 0.75)  # the shares of the blocks the table runs once by default
TIMINGS = ("blocks", "whole", "none")


def default_shared_blocks(num_blocks: int) -> list[int]:
    """N = ⌊f·L⌋ for f in ¼, ½, ¾."""
    return [int(f * num_blocks) for f in FRACTIONS]


def target(num_blocks: int, shared_blocks: int, decoders: int) -> float:
    """The issue's bound on one pass ÷ one full forward: N blocks once, L − N blocks K times."""
    return 1 + (decoders - 1) * (1 - shared_blocks / num_blocks)


@dataclass
class Parts:
    """One call's cost (FLOPs or seconds): the whole call, and per block kind one block's cost and its calls."""

    total: float
    block: dict[str, float] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)

    @property
    def rest(self) -> float:
        """What is not in a block: embeddings, final layer, reshapes."""
        return self.total - sum(self.block[k] * n for k, n in self.calls.items())

    @staticmethod
    def median(runs: list["Parts"]) -> "Parts":
        return Parts(statistics.median(r.total for r in runs),
                     {k: statistics.median(r.block[k] for r in runs) for k in runs[0].block}, runs[0].calls)


def metered(fn: Callable[[], object], kinds: dict[torch.nn.Module, str], read: Callable[[], float]) -> Parts:
    """``fn()``'s cost by ``read`` (a running total: seconds, FLOPs), and that of each block call of ``kinds``."""
    spent: dict[str, list[float]] = {}
    start: dict[torch.nn.Module, float] = {}

    def before(module, *_):
        start[module] = read()

    def after(module, *_):
        spent.setdefault(kinds[module], []).append(read() - start[module])

    hooks = [h for m in kinds for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        t0 = read()
        fn()
        total = read() - t0
    finally:
        for h in hooks:
            h.remove()
    return Parts(total, {k: statistics.fmean(v) for k, v in spent.items()}, Counter({k: len(v) for k, v in spent.items()}))


@dataclass
class Split:
    """The cost of one full forward and of the one pass's two parts at one N."""

    full: float
    shared: float
    per_step: float


def _measure(arch: TransformerArch, model: torch.nn.Module, args: tuple, ns: list[int], read: Callable[[], float],
             reduced: bool, runs: int = 1) -> dict[int, Split]:
    """Per N, the three calls' costs by ``read`` (median of ``runs``): on the whole model, or (``reduced``) on one
    block of each kind, the real model's blocks added up."""
    calls = arch.calls(model, *args)
    kinds = dict(zip(arch.blocks(model), arch.block_kinds(reduced))) if reduced else {}
    med = lambda fn: Parts.median([metered(fn, kinds, read) for _ in range(runs)])  # noqa: E731
    with torch.inference_mode():
        full = med(calls.full)
        if not reduced:
            feats = {n: calls.shared(n) for n in ns}
            return {n: Split(full.total, med(lambda: calls.shared(n)).total, med(lambda: calls.per_step(feats[n])).total)
                    for n in ns}
        shared, feats = med(lambda: calls.shared(0)), calls.shared(0)
        per_step = med(lambda: calls.per_step(feats))
    real = arch.block_kinds()
    return {n: Split(full.rest + sum(full.block[k] for k in real), shared.total + sum(full.block[k] for k in real[:n]),
                     per_step.rest + sum(per_step.block[k] for k in real[n:])) for n in ns}


def count_split(arch: TransformerArch, args: tuple, ns: list[int], reduced: bool) -> dict[int, Split]:
    """FLOPs per N, counted on the meta device: the whole model's calls, or added up by blocks (``reduced``)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)
    model = arch.build("meta", reduced=reduced)
    args = (*args[:3], "meta", args[4])
    with counter:
        return _measure(arch, model, args, ns, counter.get_total_flops, reduced)


def time_split(arch: TransformerArch, args: tuple, ns: list[int], reduced: bool, repeats: int) -> dict[int, Split]:
    """Seconds per N (median of ``repeats`` after one warm-up), on the whole model or by blocks (``reduced``)."""
    device = torch.device(args[3])

    def clock() -> float:
        synchronize(device)
        return time.perf_counter()

    model = arch.build(device, args[4], reduced=reduced)
    _measure(arch, model, args, ns[:1], clock, reduced)  # warm-up
    return _measure(arch, model, args, ns, clock, reduced, repeats)


@dataclass
class CostRow:
    name: str
    gflops: float
    ratio: float  # ÷ one full forward's FLOPs
    median_s: float | None = None  # None: not timed
    time_ratio: float | None = None  # ÷ one full forward's time
    shared_blocks: int | None = None  # N, one-pass rows
    target: float | None = None  # the bound on ``ratio``: 1 + (K − 1)(1 − N/L), one-pass rows
    meets_target: bool | None = None
    time_vs_flops: float | None = None  # time_ratio ÷ ratio: 1 where the time follows the count


def cost_rows(arch: TransformerArch, size: tuple[int, int], shared_blocks: list[int] | None = None, decoders: int = 4,
              batch: int = 1, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              timing: str = "blocks", repeats: int = 1) -> list[CostRow]:
    """The table's rows (module docstring) for ``batch`` images of ``size`` (height, width) and K = ``decoders``."""
    L = len(arch.block_kinds())
    ns = [check_shared_blocks(n, L) for n in shared_blocks] if shared_blocks else default_shared_blocks(L)
    args = (batch, size, decoders, device, dtype)
    flops = count_split(arch, args, ns, reduced=timing == "blocks")
    seconds = None if timing == "none" else time_split(arch, args, ns, timing == "blocks", repeats)
    full_f, full_s = flops[ns[0]].full, seconds and seconds[ns[0]].full

    def row(name: str, f: float, s: float | None, n: int | None = None) -> CostRow:
        r = CostRow(name, f / 1e9, f / full_f, s, None if s is None else s / full_s, n)
        if n is not None and name.startswith("one pass"):
            r.target = target(L, n, decoders)
            r.meets_target = r.ratio <= r.target
        if n is not None and s is not None:
            r.time_vs_flops = r.time_ratio / r.ratio
        return r

    K = decoders
    rows = [row("full forward", full_f, full_s), row(f"{K}-step sampler ({K} full forwards)", K * full_f, full_s and K * full_s)]
    for n in ns:
        f, s = flops[n], seconds and seconds[n]
        rows += [row(f"one pass, N={n}/{L}", f.shared + f.per_step, s and s.shared + s.per_step, n),
                 row(f"  shared part (N={n}, once)", f.shared, s and s.shared, n),
                 row(f"  {K} per-step parts (N={n}, batched)", f.per_step, s and s.per_step, n)]
    return rows


def format_cost_table(rows: list[CostRow], title: str) -> str:
    """GFLOP and × one full forward, the bound and whether it is met, then the time and its ratios (n/a untimed)."""
    head = f"{'':38s} {'GFLOP':>10s} {'× full':>7s} {'bound':>7s} {'met':>3s} {'median':>10s} {'× full':>7s} {'time÷FLOP':>9s}"
    lines = [title, "", head]
    for r in rows:
        flop = f"{r.gflops:10,.0f}" if r.gflops >= 100 else f"{r.gflops:10.4g}"
        bound = f"{r.target:7.4f} {'yes' if r.meets_target else 'no':>3s}" if r.target is not None else f"{'':11s}"
        timed = (f"{r.median_s:8.2f} s {r.time_ratio:7.3f} " + (f"{r.time_vs_flops:9.3f}" if r.time_vs_flops else f"{'':9s}")
                 if r.median_s is not None else f"{'n/a':>10s} {'':7s} {'':9s}")
        lines.append(f"  {r.name:36s} {flop} {r.ratio:7.4f} {bound} {timed}")
    return "\n".join(lines)
