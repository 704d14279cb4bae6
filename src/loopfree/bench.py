"""``loopfree bench``: what one loop-free pass costs next to full UNet steps, measured in one run.

    loopfree bench --arch sd21 --resolution 512

Random weights of the real architecture (speed doesn't depend on weight values); a warm-up, then the
median over repeats. Every row is reported as a ratio to one full UNet step.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from loopfree.archs import Arch
from loopfree.sampler import Conditioning, ddim_loop, loop_free
from loopfree.schedule import NoiseSchedule, decoder_timesteps
from loopfree.timing import Sections, measure, synchronize
from loopfree.split import decode, encode

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
    ratio: float  # median / median of the first row (one full UNet step; one iteration with --train)
    peak_mem_gib: float | None  # CUDA only


def inference_rows(
    arch: Arch, size: tuple[int, int], device: torch.device, dtype: torch.dtype, repeats: int, decoders: int = 4,
    with_50: bool = False, batch: int = 1,
) -> list[Row]:
    """Full UNet 1/K/50 steps, the one-pass sampler and its parts, each timed on the same UNet."""
    unet = arch.build(device, dtype)
    x, text, added = arch.inputs(batch, size, device, dtype)
    cond = Conditioning(text, added)
    scheduler = sd21_scheduler()
    ts = decoder_timesteps(scheduler.config, decoders)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    with torch.inference_mode():
        feats = encode(unet, x, ts[0], text, added)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("full UNet, 1 step", lambda: unet(x, ts[0], text, added_cond_kwargs=added)),
        (f"full UNet, {decoders} steps", lambda: ddim_loop(unet, scheduler, x, decoders, cond)),
    ]
    if with_50:
        cases.append(("full UNet, 50 steps", lambda: ddim_loop(unet, scheduler, x, 50, cond)))
    cases += [
        (f"one pass, K={decoders}", lambda: loop_free(unet, schedule, x, ts, cond)),
        ("encoder alone", lambda: encode(unet, x, ts[0], text, added)),
        ("decoder alone (1 step)", lambda: decode(unet, feats, ts[:1])),
        (f"{decoders} decoders batched", lambda: decode(unet, feats, ts)),
    ]
    rows: list[Row] = []
    with torch.inference_mode():
        for name, fn in tqdm(cases, desc="bench", unit="row"):
            median, peak = measure(fn, device, repeats)
            rows.append(Row(name, median, median / rows[0].median_s if rows else 1.0, peak))
    return rows


def format_table(rows: list[Row], title: str, ratio_label: str = "× 1 step") -> str:
    lines = [title, f"{'':28s} {'median':>10s} {ratio_label:>9s} {'peak mem':>9s}"]
    for r in rows:
        mem = f"{r.peak_mem_gib:.2f} GiB" if r.peak_mem_gib is not None else "n/a"
        lines.append(f"{r.name:28s} {r.median_s * 1000:8.1f} ms {r.ratio:9.2f} {mem:>9s}")
    return "\n".join(lines)



def train_rows(
    arch: Arch, size: tuple[int, int], device: torch.device, dtype: str, repeats: int, batch: int = 1, decoders: int = 4,
    gradient_checkpointing: bool = False, batch_teacher_fake: bool = True,
) -> list[Row]:
    """Seconds per distillation iteration, split into its sections (SPEC §3), with paper defaults otherwise."""
    from accelerate import Accelerator

    from loopfree.config import DistillConfig
    from loopfree.distiller import Distiller

    cfg = DistillConfig(
        teacher="-", prompts="-", out="-", batch_size=batch, steps=decoders, dtype=dtype,
        gradient_checkpointing=gradient_checkpointing, batch_teacher_fake=batch_teacher_fake,
    )
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.mixed_precision)
    distiller = Distiller(cfg, arch.build(device), sd21_scheduler(), acc, (size[0] // arch.vae_scale_factor, size[1] // arch.vae_scale_factor))
    _, text, added = arch.inputs(batch, size, device, torch.float32)
    cond = Conditioning(text, added)
    uncond = Conditioning(torch.zeros_like(text), added)

    distiller.step(cond, uncond)  # warm-up
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_step: list[dict[str, float]] = []
    for _ in tqdm(range(repeats), desc="bench --train", unit="step"):
        sections = Sections(device, enabled=True)
        t0 = time.perf_counter()
        distiller.step(cond, uncond, sections)
        synchronize(device)
        per_step.append({"one iteration": time.perf_counter() - t0, **sections.seconds})
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    total = statistics.median(s["one iteration"] for s in per_step)
    return [
        Row(name, m, m / total, peak if name == "one iteration" else None)
        for name in per_step[0]
        for m in [statistics.median(s[name] for s in per_step)]
    ]
