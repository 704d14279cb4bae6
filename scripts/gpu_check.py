"""One call that works through ../shared/GPU.md on a lent GPU (about 5-8 minutes on one H100) and prints one table;
on a CPU it runs too, its CUDA rows skipped.

    python scripts/gpu_check.py --out gpu_check.json
    python scripts/gpu_check.py --arch tiny --train-arch tiny --resolution 64 --repeats 1 --demo-steps 1 \\
        --demo-prompts 2 --demo-pairs 8 --demo-teacher-steps 2 --out /tmp/check.json      # the CPU form the test runs

Rows, in GPU.md's order: (1) correctness on the device: fp16 and bf16 one pass against fp32 (relative error of x_0,
``small`` arch), the hoisted decoders against the plain ones (fp32), and the SDXL VAE's fp16 decode finite (its
``force_upcast`` honoured); (2) latency at --resolution for --arch shapes in fp16 (fp32 on a CPU): one full step,
K steps, the one pass, end to end with the VAE and with the tiny VAE, as ms and ratios; (3) one measured distillation
step of --train-arch in bf16 at batch 1, its seconds and peak memory against ``bench --memory``'s estimate; (4) the
toy demo's wall time and its TiUE and one-step rows. The JSON holds every row and the device.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from loopfree.bench.archs import ARCHS
from loopfree.bench.memory import memory_rows
from loopfree.bench.speed import END_TO_END, UNET, inference_rows, sd21_scheduler, train_rows
from loopfree.method.sampler import Conditioning, loop_free
from loopfree.method.schedule import NoiseSchedule, decoder_timesteps
from loopfree.utils.outputs import write_json

NO_CUDA = "skipped: no CUDA"


def row(section: str, name: str, value: float | None, unit: str = "", note: str = "") -> dict:
    return dict(section=section, name=name, value=value, unit=unit, note=note)


def one_pass(arch_name: str, device: torch.device, dtype: torch.dtype, hoist: bool = True) -> torch.Tensor:
    """x_0 of the one pass (K = 4) of ``arch_name``'s UNet (seed 0 weights and inputs) in ``dtype``, as fp32."""
    arch = ARCHS[arch_name]
    unet = arch.build(device, dtype)
    x, text, added = arch.inputs(1, (arch.resolution, arch.resolution), device, dtype)
    scheduler = sd21_scheduler()
    with torch.inference_mode():
        x0 = loop_free(unet, NoiseSchedule.from_scheduler(scheduler), x, decoder_timesteps(scheduler.config, 4),
                       Conditioning(text, added), hoist=hoist)[0]
    return x0.float().cpu()


def correctness(device: torch.device) -> list[dict]:
    section = "1 correctness"
    reference = one_pass("small", device, torch.float32)
    plain = one_pass("small", device, torch.float32, hoist=False)
    rows = [row(section, "hoisted = plain decoders, fp32 (max |Δ|)", float((reference - plain).abs().max()))]
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        if device.type != "cuda":
            rows.append(row(section, f"{name} one pass vs fp32 (relative error)", None, note=NO_CUDA))
            continue
        low = one_pass("small", device, dtype)
        rows.append(row(section, f"{name} one pass vs fp32 (relative error)", float((low - reference).norm() / reference.norm())))
    if device.type != "cuda":
        rows.append(row(section, "SDXL VAE fp16 decode at 1024² finite (force_upcast)", None, note=NO_CUDA))
        return rows
    from diffusers.image_processor import VaeImageProcessor

    from loopfree.pipelines.pipeline import LoopFreePipeline

    vae = ARCHS["sdxl"].build_vae(device, torch.float16)  # AutoencoderKL's config: force_upcast true, as SDXL's
    latents = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(0)).to(device, torch.float16) * 8
    with torch.inference_mode():
        image = LoopFreePipeline.decode(SimpleNamespace(vae=vae, image_processor=VaeImageProcessor(vae_scale_factor=8)), latents, "pt")
    rows.append(row(section, "SDXL VAE fp16 decode at 1024² finite (force_upcast)", float(torch.isfinite(image).all())))
    return rows


def latency(arch: str, resolution: int, device: torch.device, repeats: int) -> list[dict]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    section = f"2 latency, {arch} {resolution}², batch 1, {str(dtype).removeprefix('torch.')}"
    out = []
    for r in inference_rows(ARCHS[arch], (resolution, resolution), device, dtype, repeats):
        if r.section in (UNET, END_TO_END) and ("decoder" not in r.name or r.section == END_TO_END):
            out.append(row(section, f"{'UNet' if r.section == UNET else 'e2e'}: {r.name}", r.median_s * 1000, "ms",
                           f"{r.ratio:.2f}× its section's 1 step"))
    return out


def training(arch: str, device: torch.device, repeats: int) -> list[dict]:
    section = f"3 distillation step, {arch}, bf16, batch 1"
    spec = ARCHS[arch]
    size = (spec.resolution, spec.resolution)
    rows = train_rows(spec, size, device, "bf16", repeats)
    step = next(r for r in rows if r.name == "one iteration")
    estimate = next(r for r in memory_rows(spec, size, "bf16", measure_size=(size[0] // 2, size[1] // 2)) if r.kind == "total")
    return [row(section, "one iteration", step.median_s, "s"),
            row(section, "peak memory, measured", step.peak_mem_gib, "GiB", "" if device.type == "cuda" else NO_CUDA),
            row(section, "peak memory, bench --memory estimate", estimate.gib, "GiB")]


def demo(steps: int, prompts: int, pairs: int | None, teacher_steps: int) -> list[dict]:
    from loopfree.demo.demo import run_demo
    from loopfree.toy.settings import DemoConfig

    section = f"4 toy demo, {steps} steps"
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        table = run_demo(DemoConfig(out=out, max_steps=steps, num_prompts=prompts, teacher_steps=teacher_steps,
                                    distill={"regression_pairs": pairs} if pairs else {}))
        wall = time.perf_counter() - t0
    rows = [row(section, "wall time", wall, "s")]
    for r in table:
        rows.append(row(section, f"{r['name']}: alignment / fd / diversity", r["alignment"], "",
                        f"fd {r['fd']:.1f}, diversity {r['diversity']:.2f}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file of every row")
    p.add_argument("--arch", default="sd21", choices=sorted(ARCHS), help="latency shapes (GPU.md: sd21)")
    p.add_argument("--resolution", type=int, default=512, help="latency image size (GPU.md: 512)")
    p.add_argument("--train-arch", default="sd21", choices=sorted(ARCHS), help="distillation-step shapes, at their native size")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per latency row and training step")
    p.add_argument("--demo-steps", type=int, default=300, help="the demo's distillation steps (its default: 300)")
    p.add_argument("--demo-prompts", type=int, default=16, help="the demo's held-out prompts (its default: 16)")
    p.add_argument("--demo-pairs", type=int, default=None, help="the demo's regression pairs (default: the recipe's)")
    p.add_argument("--demo-teacher-steps", type=int, default=50, help="DDIM steps of the demo's reference teacher rows")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    rows: list[dict] = []
    for part in (lambda: correctness(device), lambda: latency(args.arch, args.resolution, device, args.repeats),
                 lambda: training(args.train_arch, device, args.repeats),
                 lambda: demo(args.demo_steps, args.demo_prompts, args.demo_pairs, args.demo_teacher_steps)):
        t0 = time.perf_counter()
        rows += part()
        print(f"[{time.perf_counter() - t0:6.1f} s] {rows[-1]['section']}", file=sys.stderr)
    print(f"gpu_check on {name} (torch {torch.__version__}, {os.cpu_count()} CPU cores)")
    for section in dict.fromkeys(r["section"] for r in rows):
        print(f"\n{section}")
        for r in (r for r in rows if r["section"] == section):
            value = "–" if r["value"] is None else f"{r['value']:.4g} {r['unit']}".strip()
            print(f"  {r['name']:58s} {value:>14s}  {r['note']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"device": name, "cuda": device.type == "cuda", "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
