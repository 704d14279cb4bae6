"""``loopfree bench --train --memory``: an *estimate* of one distillation step's memory per device, not a GPU measurement.

Two kinds of parts, added up the way a step holds them:

* weights and optimiser state, from exact parameter counts of the architecture (:func:`parameter_counts`): the
  student (fp32 master weights, AdamW's two moments, its gradients, the EMA copy), the frozen teacher (in the weight
  dtype: fp32, or bf16/fp16 under mixed precision, as :class:`~loopfree.method.scores.TeacherAndFakeScore` casts it), the
  fake score's LoRA (fp32 weights, gradients, AdamW), the frozen text encoder and VAE (fp32, as the trainer keeps them);
* activations, measured (:func:`measure_activations`): the bytes of the tensors autograd saves for backward (:class:`SavedTensors`,
  each storage once, parameters excluded) in the student's forward — the one pass, encoder once and K decoders — and
  in the fake-score update's forward; and the peak of what one no-grad guided teacher + fake-score pass holds at once
  (:class:`LiveTensors`), which runs while the student's graph is alive. SiD's loss back-propagates through both
  scores: the guided passes' graph (what autograd saves in them) is held too, from their forward to the backward.

Activations are measured at batch 1 on the CPU with random weights of the real shapes, under CPU autocast for
bf16/fp16 with GroupNorm and LayerNorm in float32 as CUDA's autocast runs them (:class:`Float32Norms`). A saved
tensor computed from the batch's inputs grows with the batch; the rest (autocast's low-precision copies of fp32
weights, the hoisted upsamplers' folded kernels) does not: the estimate for B prompts is ``fixed + B · per prompt``.
Measured at a smaller size, the per-prompt part is scaled by the pixel count. fp16 is measured as bf16 (same sizes).

Left out: the allocator's rounding and fragmentation, kernel workspaces (cuDNN, cuBLAS), the CUDA context, and the
activations recomputed during backward under gradient checkpointing (one block at a time).
"""

from __future__ import annotations

import gc
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from loopfree.bench.archs import Arch
from loopfree.training.config import DistillConfig

GIB = 2**30
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# phases of a step: what is held throughout, and what each update adds on top while it runs
HELD, STUDENT, EMA, FAKE = "held throughout", "student update", "EMA update", "fake-score update"


def _storage(t: torch.Tensor) -> torch.UntypedStorage:
    return t.untyped_storage()  # one Python object per storage, alive as long as the storage


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class Derived(TorchDispatchMode):
    """Inside, the storages of every tensor an operator computes from ``inputs`` or from what was computed from them."""

    def __init__(self, inputs: Iterable[torch.Tensor]):
        super().__init__()
        self.storages = weakref.WeakSet(_storage(t) for t in inputs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(_storage(t) in self.storages for t in _tensors((args, kwargs))):
            self.storages.update(_storage(t) for t in _tensors(out))
        return out


class SavedTensors:
    """Inside the ``with`` block, the bytes of every tensor autograd saves for backward, each storage counted once
    (a view counts its whole storage); storages of ``exclude`` (parameters: counted elsewhere) count zero. Of them,
    ``fixed``: the bytes not computed from ``inputs`` (the batch), e.g. low-precision copies of weights. The saved
    tensors are held until the block ends, so no address is reused while counting."""

    def __init__(self, exclude: Iterable[torch.Tensor] = (), inputs: Iterable[torch.Tensor] = ()):
        self._skip = {_storage(p).data_ptr() for p in exclude}
        self._seen: set[int] = set()
        self._held: list[torch.Tensor] = []
        self.bytes = self.fixed = 0
        self._derived = Derived(inputs)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # the graph keeps a detached alias: the same storage, without the reference cycle that saving an output
        # together with its grad_fn would make (and leak)
        alias = t.detach()
        s = _storage(t)
        if s.data_ptr() not in self._skip and s.data_ptr() not in self._seen:
            self._seen.add(s.data_ptr())
            self._held.append(alias)
            self.bytes += s.nbytes()
            self.fixed += 0 if s in self._derived.storages else s.nbytes()
        return alias

    def __enter__(self) -> "SavedTensors":
        self._derived.__enter__()
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._derived.__exit__(*exc)
        self._held.clear()


class LiveTensors(TorchDispatchMode):
    """Peak bytes of the tensor storages that operators inside the ``with`` block allocate and that are alive at
    once. A storage first seen as an operator's input existed before (weights, inputs) and counts zero; a storage is
    freed when its Python object is (torch keeps one per storage). Kernels' internal workspaces are not seen."""

    def __init__(self):
        super().__init__()
        self._known: weakref.WeakSet = weakref.WeakSet()
        self.now = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                self._known.add(_storage(t))
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = _storage(t)
                if s not in self._known:
                    self._known.add(s)
                    self.now += s.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(s, self._free, s.nbytes())
        return out


class Float32Norms(TorchFunctionMode):
    """GroupNorm and LayerNorm on float32 inputs while CPU autocast is on, as CUDA's autocast runs them (CPU's
    keeps them in the lower precision), so the CPU measurement saves what a GPU step saves."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.group_norm, F.layer_norm) and torch.is_autocast_enabled("cpu"):
            up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a  # noqa: E731
            args, kwargs = tree_map(up, args), tree_map(up, kwargs)
        return func(*args, **kwargs)


@contextmanager
def autocast(dtype: str) -> Iterator[None]:
    """What ``accelerate.autocast`` does for ``dtype`` on a GPU, on the CPU: nothing for fp32."""
    if dtype not in HALF:
        yield
        return
    with torch.autocast("cpu", dtype=HALF[dtype]), Float32Norms():
        yield


# -- parameters by role, counted exactly -------------------------------------------------------------------------


def parameter_counts(arch: Arch, cfg: DistillConfig) -> dict[str, int]:
    """Parameters of the UNet (student = teacher shape), the fake score's LoRA (``cfg``'s rank and targets), a LoRA
    student's adapter (0 without one), the text encoder(s) and the VAE; built on the meta device (nothing allocated)."""
    from loopfree.bench.archs import parameter_count
    from loopfree.training.distiller import fake_lora
    from loopfree.training.student_lora import student_lora
    from loopfree.method.scores import FAKE

    with torch.device("meta"):
        unet = arch.build("meta").requires_grad_(False)
        unet.add_adapter(fake_lora(cfg), FAKE)
        lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
        if cfg.student_lora_rank is not None:
            with warnings.catch_warnings():  # a second adapter on one model: what we mean here
                warnings.filterwarnings("ignore", "Already found a `peft_config`")
                unet.add_adapter(student_lora(cfg), "student")
        adapter = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n) - lora
        base = sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)
        blocks = [sum(p.numel() for n, p in b.named_parameters() if "lora_" not in n)
                  for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks] if b is not None]
    return {"unet": base, "lora": lora, "student_lora": adapter, "text_encoders": sum(parameter_count(arch, "text_encoders")),
            "vae": parameter_count(arch, "vae"), "largest_block": max(blocks), "root": base - sum(blocks)}


# -- activations, measured ---------------------------------------------------------------------------------------


@dataclass
class Activations:
    """Bytes of a step's measured parts: ``*_fixed`` does not grow with the batch, ``*_per`` is per prompt."""

    student_fixed: int  # saved for the student's backward (the one pass and its loss)
    student_per: int
    fake_fixed: int  # saved for the fake-score update's backward
    fake_per: int
    guided_per: int  # peak held by one no-grad guided teacher + fake-score pass, all of it counted per prompt
    guided_graph_fixed: int = 0  # saved for the backward through the guided passes (SiD; VSD: none)
    guided_graph_per: int = 0

    def at(self, batch: int, scale: float = 1.0) -> "Activations":
        """At ``batch`` prompts, the per-prompt parts times ``scale`` (a pixel-count ratio)."""
        return Activations(*(round(getattr(self, f.name) * (1 if f.name.endswith("_fixed") else batch * scale))
                             for f in fields(self)))

    @property
    def student(self) -> int:
        return self.student_fixed + self.student_per

    @property
    def fake(self) -> int:
        return self.fake_fixed + self.fake_per

    @property
    def guided_graph(self) -> int:
        return self.guided_graph_fixed + self.guided_graph_per


def measure_activations(arch: Arch, cfg: DistillConfig, latent: tuple[int, int], batch: int = 1) -> Activations:
    """The measured parts at ``batch`` prompts (divided by it) of ``latent`` (height, width) latents, on random weights of ``arch`` on the CPU,
    built as the :class:`~loopfree.training.distiller.Distiller` builds them: the student's graph (its forward and loss; the
    guided scores its loss asks for are measured apart), then, the student let go, the teacher + fake score's guided
    pass (and for SiD its graph) and the fake-score update's graph. One UNet's weights are in RAM at a time."""
    from loopfree.bench.speed import sd21_scheduler
    from loopfree.training.distiller import WEIGHT_DTYPES, fake_lora, losses, student_timesteps
    from loopfree.method.sampler import Conditioning, Generator
    from loopfree.method.schedule import NoiseSchedule, sample_timesteps
    from loopfree.method.scores import TeacherAndFakeScore

    size = (latent[0] * arch.vae_scale_factor, latent[1] * arch.vae_scale_factor)
    x, text, added = arch.inputs(batch, size, "cpu", torch.float32)
    inputs = [x, text, *(added or {}).values()]
    scheduler = sd21_scheduler()
    schedule = NoiseSchedule.from_scheduler(scheduler)
    timesteps, final_alpha_cumprod = student_timesteps(cfg, scheduler)

    student = arch.build().train().requires_grad_(True)
    if cfg.student_lora_rank is not None:  # the frozen base in the compute dtype, the adapter trained
        from loopfree.training.student_lora import add_student_lora

        add_student_lora(student, cfg, WEIGHT_DTYPES.get(cfg.dtype, torch.float32))
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    generator = Generator(student, NoiseSchedule.from_scheduler(scheduler, final_alpha_cumprod), timesteps)
    student_loss, fake_loss = losses(cfg, schedule)
    no_scores = lambda x_t, t: (torch.zeros(2, *x_t.shape), torch.zeros(2, *x_t.shape))  # noqa: E731
    with SavedTensors(student.parameters(), inputs) as graph:
        with autocast(cfg.dtype):
            x0, eps = generator(x, text, added)
        student_loss(x0.float(), eps, no_scores, student_loss.draw(x))
    del student, generator, x0, eps
    gc.collect()

    scores = TeacherAndFakeScore(arch.build(), schedule, fake_lora(cfg), WEIGHT_DTYPES.get(cfg.dtype, torch.float32),
                                 cfg.batch_teacher_fake)
    if cfg.gradient_checkpointing:
        scores.enable_gradient_checkpointing()
    cond, uncond = Conditioning(text, added), Conditioning(torch.zeros_like(text), added)
    t = sample_timesteps(batch, cfg.t_min, cfg.t_max)
    with LiveTensors() as guided, autocast(cfg.dtype), torch.no_grad():
        scores.pair(torch.randn_like(x), t, cond, uncond)
    x_t = torch.randn_like(x).requires_grad_(student_loss.score_loss.through_scores)
    with SavedTensors(scores.base.parameters(), [x_t, *inputs]) as guided_graph, autocast(cfg.dtype):
        if x_t.requires_grad:
            scores.pair(x_t, t, cond, uncond)

    def fake(x_t: torch.Tensor, t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        with autocast(cfg.dtype):
            return scores.fake(x_t, t, cond, uncond, keep)

    with SavedTensors(scores.base.parameters(), inputs) as fake_graph:
        fake_loss(x, fake, fake_loss.draw(x))
    per = lambda saved: round((saved.bytes - saved.fixed) / batch)  # noqa: E731
    return Activations(graph.fixed, per(graph), fake_graph.fixed, per(fake_graph), round(guided.peak / batch),
                       guided_graph.fixed, per(guided_graph))


# -- the table -----------------------------------------------------------------------------------------------------


@dataclass
class MemoryRow:
    name: str
    gib: float
    phase: str  # HELD, STUDENT, EMA, FAKE; "" for the total
    kind: str  # "counted" (from parameter counts), "measured" (activations), "peak" (of a phase) or "total"


def memory_rows(arch: Arch, size: tuple[int, int], dtype: str = "fp32", batch: int = 1, decoders: int = 4,
                gradient_checkpointing: bool = False, batch_teacher_fake: bool = True,
                measure_size: tuple[int, int] | None = None,
                measured: Callable[[Arch, DistillConfig, tuple[int, int]], Activations] = measure_activations,
                processes: int = 1, shard: bool = False, objective: str = "vsd",
                student_lora_rank: int | None = None) -> list[MemoryRow]:
    """Estimated memory of one distillation step per device, ``batch`` prompts per device at ``size`` (height, width)
    pixels, paper defaults otherwise: the parts held throughout; per update, what it adds while it runs and its peak;
    the total, held + the largest peak. ``measure_size``: measure_activations activations there (pixels), extrapolate
    to ``size``. ``processes``: data parallel over that many devices — DDP's gradient buckets (a fp32 copy of the
    gradients) on each, or with ``shard`` FSDP2's full sharding per UNet block: the student's weights, moments, EMA and
    gradients 1/N each, plus the gathered blocks in use (the root's own parameters and two blocks, one prefetched);
    the teacher, LoRA, text encoder and VAE replicated. ``objective``: the student's score loss (vsd, sid); SiD's
    guided passes hold their graph from their forward to the backward, on top of their peak. ``student_lora_rank``: a
    LoRA student (``distill --student-lora-rank``, the fake score's targets): its frozen base, a copy of the teacher in
    the compute dtype, and the adapter in place of the student's fp32 weights, moments, EMA and gradients."""
    from loopfree.bench.speed import train_config
    from loopfree.training.distiller import WEIGHT_DTYPES

    if student_lora_rank is not None and shard:
        raise ValueError("a LoRA student is not sharded (distill --shard refuses it)")
    cfg = train_config(batch, decoders, dtype, gradient_checkpointing, batch_teacher_fake, objective, student_lora_rank)
    n = parameter_counts(arch, cfg)
    f = arch.vae_scale_factor
    at = measure_size or size
    # fp16 has bf16's sizes; it is measured as bf16 (the CPU's fp16 kernels are few)
    on_cpu = replace(cfg, dtype="bf16") if dtype == "fp16" else cfg
    act = measured(arch, on_cpu, (at[0] // f, at[1] // f)).at(batch, (size[0] * size[1]) / (at[0] * at[1]))
    fp32, teacher = 4, torch.finfo(WEIGHT_DTYPES.get(dtype, torch.float32)).bits // 8
    shards = processes if shard else 1
    adapter = student_lora_rank is not None
    student, lora = (n["student_lora"] if adapter else n["unet"]) * fp32 / shards, n["lora"] * fp32
    part = f", 1/{shards}" if shard else ""
    what = f"student LoRA (r {student_lora_rank})" if adapter else "student"
    weight_dtype = "fp32" if teacher == 4 else dtype
    prompts = f"{batch} prompt{'s' * (batch != 1)}"
    gathered = (n["root"] + 2 * n["largest_block"]) * teacher if shard else 0  # gathered in the compute dtype, as the teacher
    sid = objective == "sid"  # the backward runs through the guided passes: their graph is held from their forward
    rows = [
        *([MemoryRow(f"student's frozen base (a copy of the teacher, {weight_dtype})", n["unet"] * teacher, HELD, "counted")]
          if adapter else []),
        MemoryRow(f"{what} weights (fp32{part})", student, HELD, "counted"),
        MemoryRow(f"{what} AdamW moments (2 × fp32{part})", 2 * student, HELD, "counted"),
        MemoryRow(f"{what} EMA (fp32{part})", student, HELD, "counted"),
        *([MemoryRow("DDP gradient buckets (fp32)", student, HELD, "counted")] if processes > 1 and not shard else []),
        MemoryRow(f"teacher weights (frozen, {weight_dtype})", n["unet"] * teacher, HELD, "counted"),
        MemoryRow("fake-score LoRA: weights + AdamW (3 × fp32)", 3 * lora, HELD, "counted"),
        MemoryRow("text encoder + VAE (frozen, fp32)", (n["text_encoders"] + n["vae"]) * fp32, HELD, "counted"),
        MemoryRow(f"graph: activations, {prompts}", act.student_per, STUDENT, "measured"),
        MemoryRow("graph: computed from weights only, not per prompt", act.student_fixed, STUDENT, "measured"),
        MemoryRow(f"gradients (fp32{part}), during backward", student, STUDENT, "counted"),
        *([MemoryRow(f"gathered: root + 2 blocks ({'fp32' if teacher == 4 else dtype}, FSDP2)", gathered, STUDENT, "counted")]
          if shard else []),
        *([MemoryRow(f"guided passes' graph (SiD), {prompts}", act.guided_graph_per, STUDENT, "measured"),
           MemoryRow("guided passes' graph: from weights only, not per prompt", act.guided_graph_fixed, STUDENT, "measured")]
          if sid else []),
        MemoryRow("guided teacher + fake pass" + (", its peak besides its graph" if sid else " (no grad), its peak"),
                  act.guided_per, STUDENT, "measured"),
        MemoryRow("peak: graph + max(gradients, guided pass" + (" + its graph)" if sid else ")") + (" + gathered" if shard else ""),
                  act.student + max(student, act.guided_per + act.guided_graph) + gathered, STUDENT, "peak"),
        MemoryRow(f"a fp32 copy of the {what} (foreach update{part})", student, EMA, "counted"),
        MemoryRow("peak", student, EMA, "peak"),
        MemoryRow(f"graph: activations, {prompts}", act.fake, FAKE, "measured"),
        MemoryRow("LoRA gradients (fp32)", lora, FAKE, "counted"),
        MemoryRow("peak: graph + gradients", act.fake + lora, FAKE, "peak"),
    ]
    held = sum(r.gib for r in rows if r.phase == HELD)
    rows.append(MemoryRow("total: held + the largest peak", held + max(r.gib for r in rows if r.kind == "peak"), "", "total"))
    return [MemoryRow(r.name, r.gib / GIB, r.phase, r.kind) for r in rows]


ESTIMATE_NOTE = ("An estimate, not a GPU measurement: exact parameter counts, and (*) tensor bytes measured at batch 1 on "
                 "the CPU (what autograd saves; the guided pass's peak), per prompt × the batch. Left out: workspaces, the "
                 "allocator's overhead, the CUDA context, activations recomputed under gradient checkpointing.")


def format_memory_table(rows: list[MemoryRow], title: str, note: str = ESTIMATE_NOTE, width: int = 56) -> str:
    """One block per phase, GiB per part (measured parts marked), then the total and ``note``; names ``width`` wide."""
    lines = [title, "", f"{'':{width}s} {'GiB':>8s}"]
    for phase in dict.fromkeys(r.phase for r in rows if r.phase):
        lines.append(phase)
        lines += [f"  {r.name + (' *' if r.kind == 'measured' else ''):{width - 2}s} {r.gib:8.2f}" for r in rows if r.phase == phase]
    total = next(r for r in rows if r.kind == "total")
    lines += [f"{total.name:{width}s} {total.gib:8.2f}", "", note]
    return "\n".join(lines)
