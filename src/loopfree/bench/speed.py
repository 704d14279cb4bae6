"""``loopfree bench``: what one loop-free pass costs next to full UNet steps, measured in one run.

    loopfree bench --arch sd21 --resolution 512

Random weights of the real architecture (speed doesn't depend on weight values). Each row runs once under
``torch.utils.flop_counter`` (its FLOPs; also the warm-up), then is timed: the median over repeats. Two sections,
each a ratio to its first row: the UNet alone (one full UNet step) and end to end — text encoder(s), the UNet
work, VAE decode (or TAESD's, the tiny VAE) — (one full end-to-end step). The one pass is timed with the hoisted decoders (the default) and
with the plain ones. ``--with-50`` adds the 50-step DDIM loop and, beside it, 50-step encoder propagation (Faster
Diffusion: the full UNet at its 9 key steps, the decoders alone at the other 41, batched per segment as
``mode="propagate"`` runs them).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm.auto import tqdm

from loopfree.bench.archs import Arch
from loopfree.training.config import DistillConfig
from loopfree.method.runtime import compile_unet, passes
from loopfree.method.sampler import Conditioning, ddim_loop, default_key_steps, loop_free, propagate
from loopfree.method.schedule import NoiseSchedule, decoder_timesteps
from loopfree.utils.timing import Sections, time_call, synchronize

UNET, END_TO_END = "UNet", "end-to-end (text encoder + UNet + VAE decode)"
# torch's counter has formulas for the GPU SDPA kernels only; the CPU one does the same work
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
             lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}


def sd21_scheduler() -> DDIMScheduler:
    """SD2.1-base's scheduler (leading spacing, steps_offset 1): DDIM timesteps as the teacher would use."""
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )


@dataclass
class Row:
    name: str
    median_s: float
    ratio: float  # median / median of its section's first row (one full step; one iteration with --train)
    peak_mem_gib: float | None  # CUDA only
    gflops: float | None = None  # one call, counted by torch.utils.flop_counter
    section: str = ""  # inference: UNET or END_TO_END


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of ``fn`` (it runs)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)
    with counter:
        fn()
    return counter.get_total_flops()


def text_conditioning(arch: Arch, encoders: list, ids: torch.Tensor, added: dict | None) -> Conditioning:
    """What the pipeline feeds the UNet: the text encoder's last states (SD), or both encoders' penultimate states
    side by side and the second one's pooled projection (SDXL)."""
    if arch.pooled_dim is None:
        return Conditioning(encoders[0](ids).last_hidden_state)
    outs = [enc(ids, output_hidden_states=True) for enc in encoders]
    text = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
    return Conditioning(text, dict(added, text_embeds=outs[-1].text_embeds))


def _cases(arch: Arch, unet, parts: tuple[list, object, object] | None, inputs: tuple, decoders: int, with_50: bool,
           ) -> list[tuple[str, str, Callable[[], object]]]:
    """(section, row name, call) for every row; ``parts``: the text encoders, the VAE and the tiny VAE (TAESD) for
    the end-to-end rows.
    Encoder/decoder calls look up :func:`loopfree.method.runtime.passes` when they run (compiled or eager)."""
    x, text, added = inputs
    cond = Conditioning(text, added)
    scheduler = sd21_scheduler()
    ts = decoder_timesteps(scheduler.config, decoders)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    with torch.inference_mode():
        feats = passes(unet).run_encoder(unet, x, ts[0], text, added)
    K = decoders
    ts50, keys50 = decoder_timesteps(scheduler.config, 50), default_key_steps(50)  # encoder propagation (Faster Diffusion)
    fifty = [(UNET, "full UNet, 50 steps", lambda: ddim_loop(unet, scheduler, x, 50, cond)),
             (UNET, f"propagate, 50 steps, {len(keys50)} key steps", lambda: propagate(unet, schedule, x, ts50, keys50, cond))]
    cases = [
        (UNET, "full UNet, 1 step", lambda: unet(x, ts[0], text, added_cond_kwargs=added)),
        (UNET, f"full UNet, {K} steps", lambda: ddim_loop(unet, scheduler, x, K, cond)),
        *(fifty if with_50 else []),
        (UNET, f"one pass, K={K}", lambda: loop_free(unet, schedule, x, ts, cond)),
        (UNET, f"one pass, K={K}, plain decoders", lambda: loop_free(unet, schedule, x, ts, cond, hoist=False)),
        (UNET, "encoder alone", lambda: passes(unet).run_encoder(unet, x, ts[0], text, added)),
        (UNET, "decoder alone (1 step)", lambda: passes(unet).run_decoders(unet, feats, ts[:1])),
        (UNET, f"{K} decoders batched", lambda: passes(unet).run_decoders(unet, feats, ts)),
        (UNET, f"{K} decoders batched, plain", lambda: passes(unet).run_decoders(unet, feats, ts, False)),
    ]
    if parts is None:
        return cases
    encoders, vae, tiny = parts
    ids = arch.token_ids(x.shape[0], x.device)
    conditioning = lambda: text_conditioning(arch, encoders, ids, added)  # noqa: E731
    image = lambda latents, vae=vae: vae.decode(latents / vae.config.scaling_factor).sample  # noqa: E731
    return cases + [
        (END_TO_END, "end-to-end, 1 step", lambda: image(ddim_loop(unet, scheduler, x, 1, conditioning()))),
        (END_TO_END, f"end-to-end, {K} steps", lambda: image(ddim_loop(unet, scheduler, x, K, conditioning()))),
        (END_TO_END, f"end-to-end, one pass, K={K}", lambda: image(loop_free(unet, schedule, x, ts, conditioning())[0])),
        (END_TO_END, f"end-to-end, one pass, K={K}, tiny VAE", lambda: image(loop_free(unet, schedule, x, ts, conditioning())[0], tiny)),
        (END_TO_END, f"text encoder{'s' if len(encoders) > 1 else ''} alone", conditioning),
        (END_TO_END, "VAE decode alone", lambda: image(x)),
        (END_TO_END, "tiny VAE (TAESD) decode alone", lambda: image(x, tiny)),
    ]


def inference_rows(
    arch: Arch, size: tuple[int, int], device: torch.device, dtype: torch.dtype, repeats: int, decoders: int = 4,
    with_50: bool = False, batch: int = 1, end_to_end: bool = True, compile: bool = False,
) -> list[Row]:
    """Every row of :func:`_cases` on the same models: FLOPs from one eager call each (also the warm-up), then
    (``compile``: after ``torch.compile``, with a warm-up call that compiles) the median over ``repeats``."""
    unet = arch.build(device, dtype)
    parts = (arch.build_text_encoders(device, dtype), arch.build_vae(device, dtype), arch.build_tiny_vae(device, dtype)) if end_to_end else None
    cases = _cases(arch, unet, parts, arch.inputs(batch, size, device, dtype), decoders, with_50)
    rows: list[Row] = []
    with torch.inference_mode():
        flops = [count_flops(fn) for *_, fn in tqdm(cases, desc="bench: FLOPs", unit="row")]
        if compile:
            compile_unet(unet)
        for (section, name, fn), flop in zip(tqdm(cases, desc="bench: time", unit="row"), flops):
            median, peak = time_call(fn, device, repeats, warmup=1 if compile else 0)
            base = next((r.median_s for r in rows if r.section == section), median)
            rows.append(Row(name, median, median / base, peak, flop / 1e9, section))
    return rows


def format_table(rows: list[Row], title: str, ratio_label: str = "× 1 step") -> str:
    """One block per section: median, ratio to the section's first row, GFLOP and its ratio, peak memory."""
    lines = [title]
    for section in dict.fromkeys(r.section for r in rows):
        part = [r for r in rows if r.section == section]
        base_flops = part[0].gflops
        lines += ["", *([section] if section else []), f"{'':34s} {'median':>10s} {ratio_label:>9s} {'GFLOP':>9s} {'× FLOP':>7s} {'peak mem':>9s}"]
        for r in part:
            mem = f"{r.peak_mem_gib:.2f} GiB" if r.peak_mem_gib is not None else "n/a"
            flop = f"{r.gflops:9.4g} {r.gflops / base_flops:7.2f}" if r.gflops is not None and base_flops else f"{'n/a':>9s} {'':7s}"
            lines.append(f"  {r.name:32s} {r.median_s * 1000:8.1f} ms {r.ratio:9.2f} {flop} {mem:>9s}")
    return "\n".join(lines)


def train_config(batch: int, decoders: int, dtype: str, gradient_checkpointing: bool, batch_teacher_fake: bool,
                 objective: str = "vsd", student_lora_rank: int | None = None) -> DistillConfig:
    """The distillation settings a training benchmark runs: the paper's defaults but for these."""
    return DistillConfig(teacher="-", prompts="-", out="-", batch_size=batch, steps=decoders, dtype=dtype,
                         gradient_checkpointing=gradient_checkpointing, batch_teacher_fake=batch_teacher_fake,
                         objective=objective, student_lora_rank=student_lora_rank)


def train_rows(
    arch: Arch, size: tuple[int, int], device: torch.device, dtype: str, repeats: int, batch: int = 1, decoders: int = 4,
    gradient_checkpointing: bool = False, batch_teacher_fake: bool = True, objective: str = "vsd",
) -> list[Row]:
    """Seconds per distillation iteration, split into its sections (SPEC §3), with paper defaults otherwise."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cfg = train_config(batch, decoders, dtype, gradient_checkpointing, batch_teacher_fake, objective)
    AcceleratorState._reset_state()  # accelerate keeps one state per process: the step's own precision, whatever ran before
    try:
        return _train_rows(Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.mixed_precision), cfg, arch, size,
                           device, repeats, batch)
    finally:  # and a later Accelerator (a distill run) may choose another
        AcceleratorState._reset_state()


def _train_rows(acc, cfg, arch: Arch, size: tuple[int, int], device: torch.device, repeats: int, batch: int) -> list[Row]:
    from loopfree.training.distiller import Batch, Distiller

    distiller = Distiller(cfg, arch.build(device), sd21_scheduler(), acc, (size[0] // arch.vae_scale_factor, size[1] // arch.vae_scale_factor))
    _, text, added = arch.inputs(batch, size, device, torch.float32)
    cond = Conditioning(text, added)
    uncond = Conditioning(torch.zeros_like(text), added)

    batches = [Batch(cond, uncond)]
    distiller.step(batches)  # warm-up
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_step: list[dict[str, float]] = []
    for _ in tqdm(range(repeats), desc="bench --train", unit="step"):
        sections = Sections(device, enabled=True)
        t0 = time.perf_counter()
        distiller.step(batches, sections)
        synchronize(device)
        per_step.append({"one iteration": time.perf_counter() - t0, **sections.seconds})
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    total = statistics.median(s["one iteration"] for s in per_step)
    return [
        Row(name, m, m / total, peak if name == "one iteration" else None)
        for name in per_step[0]
        for m in [statistics.median(s[name] for s in per_step)]
    ]
