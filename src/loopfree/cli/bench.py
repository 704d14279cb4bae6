"""``loopfree bench``: one loop-free pass against full UNet steps, or one distillation iteration, timed.

    loopfree bench --arch sd21 --resolution 512
    loopfree bench --train --arch small
    loopfree bench --train --memory --arch sd21 --batch-size 8 --dtype bf16 --gradient-checkpointing
    loopfree bench --train --memory --arch sd21 --objective sid --gradient-checkpointing
    loopfree bench --train --memory --arch sdxl --dtype bf16 --processes 8 --shard --measure-resolution 512
    loopfree bench --arch pixart-1024 --shared-blocks 14 --repeats 1      # a transformer: the one pass at N of L blocks
    loopfree bench --arch flux-dev --timing none --json                   # FLOPs only (counted on the meta device)
    loopfree bench --train --memory --arch flux-dev --dtype bf16 --processes 8 --shard
    loopfree bench --backend all --threads 2 --quality                   # the bundled student: torch, torch.compile, onnxruntime fp32/int8
    loopfree bench --backend all --arch sd21 --resolution 512 --repeats 2
"""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from loopfree.cli import options
from loopfree.utils.errors import LoopfreeError

ARCH_NAMES = ("sd15", "sd21", "sdxl", "small", "tiny")
TRANSFORMER_NAMES = ("pixart-512", "pixart-1024", "sd3-medium", "flux-dev", "pixart-tiny", "sd3-tiny", "flux-tiny")
BACKEND_NAMES = ("torch", "torch-compile", "onnxruntime", "onnxruntime-int8")  # bench.backends.BACKENDS (not imported: torch)
TIMINGS = ("blocks", "whole", "none")  # bench.transformer_cost.TIMINGS (not imported here: it loads torch)
QUALITY_PROMPTS = 64  # --quality: held-out prompts (× 4 images) scored, as the demo's studies


@click.command()
@click.option("--arch", type=click.Choice(ARCH_NAMES + TRANSFORMER_NAMES), default="sd21", show_default=True,
              help="UNet or transformer shape (random weights).")
@options.resolution("Image size: N or WIDTHxHEIGHT (default: the architecture's native).")
@options.device()
@options.dtype()
@click.option("--steps", type=click.IntRange(1, 1000), default=4, show_default=True, help="K, decoders of the one-pass sampler (and DDIM steps of the K-step row).")
@click.option("--repeats", type=click.IntRange(1, 1000), default=3, show_default=True, help="Timed repeats per row (median reported).")
@click.option("--with-50", is_flag=True, help="Also time a 50-step DDIM loop and 50-step encoder propagation (long on a CPU).")
@click.option("--end-to-end/--unet-only", default=True, show_default=True,
              help="Also time text encoder(s) + UNet + VAE decode (the real text encoder and VAE shapes).")
@options.compile_()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--train", is_flag=True, help="Time one distillation iteration instead, split into its sections.")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=1, show_default=True, help="Images (prompts with --train) per call.")
@click.option("--gradient-checkpointing", is_flag=True, help="With --train.")
@click.option("--batch-teacher-fake/--no-batch-teacher-fake", default=True, show_default=True,
              help="With --train: teacher and fake-score passes as one UNet call.")
@click.option("--objective", type=click.Choice(["vsd", "sid"]), default="vsd", show_default=True,
              help="With --train: the student's score loss (sid: gradients through both scores, their graph held).")
@click.option("--memory", is_flag=True,
              help="With --train: estimate the step's memory per device instead (GiB per part: exact parameter counts, "
                   "activations measured at batch 1 on the CPU, whatever --device); not a GPU measurement.")
@click.option("--measure-resolution", type=options.Resolution(), default=None,
              help="With --memory: measure_activations the activations at this image size and scale them by the pixel count "
                   "(default: at --resolution).")
@click.option("--processes", type=click.IntRange(1, 4096), default=1, show_default=True,
              help="With --memory: devices of the data-parallel launch (--batch-size prompts each).")
@click.option("--shard", is_flag=True,
              help="With --memory: FSDP2 full sharding of the student's weights, moments, EMA and gradients over --processes "
                   "(an estimate of the plan; loopfree distill runs data parallel today).")
@click.option("--student-lora-rank", type=click.IntRange(1, None), default=None,
              help="With --memory: a LoRA student of this rank (distill --student-lora-rank) instead of the full one.")
@click.option("--shared-blocks", type=click.IntRange(0), multiple=True,
              help="A transformer --arch: N, the blocks the one pass runs once (repeatable; default: ¼, ½ and ¾ of them).")
@click.option("--timing", type=click.Choice(TIMINGS), default=None,
              help="A transformer --arch: time it by blocks (one of each kind, summed; the default), whole, or none "
                   "(FLOPs only).")
@click.option("--backend", "backends", type=click.Choice(BACKEND_NAMES + ("all",)), multiple=True,
              help="Time the whole one pass (tokens to pixels) by these runtimes instead, each in its own process "
                   "(repeatable; all: torch, torch-compile, onnxruntime, onnxruntime-int8): the bundled student, or --model, or "
                   "random weights of --arch.")
@options.model()
@click.option("--threads", type=click.IntRange(1, 256), default=2, show_default=True, help="With --backend: CPU threads of each runtime.")
@click.option("--quality", is_flag=True, help="With --backend: also score each backend's images of the demo's 64 × 4 (a toy student).")
def bench(arch, resolution, device, dtype, steps, repeats, with_50, end_to_end, compile_, as_json, train, batch_size,
          gradient_checkpointing, batch_teacher_fake, objective, memory, measure_resolution, processes, shard,
          student_lora_rank, shared_blocks, timing, backends, model, threads, quality) -> None:
    """Time one loop-free pass against full UNet steps (random weights, real shapes); --train: one distillation step;
    --backend: the whole pass by torch and onnxruntime."""
    if backends:
        _backends(list(backends), model, arch, resolution, batch_size, repeats, threads, quality, as_json)
        return
    _refuse_given(("model", "threads", "quality"), "the UNet and transformer tables (they go with --backend)")
    if student_lora_rank is not None and (not memory or shard or arch in TRANSFORMER_NAMES):
        raise LoopfreeError("--student-lora-rank goes with --memory for a UNet --arch, unsharded (distill refuses --shard with it)")
    if arch in TRANSFORMER_NAMES:
        _transformer(arch, resolution, device, dtype, steps, repeats, as_json, train, batch_size, memory, processes,
                     shard, list(shared_blocks), timing or "blocks")
        return
    if shared_blocks or timing:
        raise LoopfreeError("--shared-blocks and --timing go with a transformer --arch (pixart-*, sd3-*, flux-*)")
    from loopfree.bench.archs import ARCHS
    from loopfree.bench.speed import format_table, inference_rows, train_rows
    from loopfree.utils.devices import resolve_device, resolve_dtype
    from loopfree.pipelines.pipeline import check_size

    spec = ARCHS[arch]
    height, width = resolution or (spec.resolution, spec.resolution)
    check_size(height, width, spec.vae_scale_factor, spec.resolution)
    if (memory or measure_resolution) and not train:
        raise LoopfreeError("--memory estimates a distillation step's memory: add --train")
    if objective != "vsd" and not train:
        raise LoopfreeError("--objective is the distillation step's score loss: add --train")
    if (measure_resolution or processes > 1 or shard) and not memory:
        raise LoopfreeError("--measure-resolution, --processes and --shard go with --memory")
    if shard and processes < 2:
        raise LoopfreeError("--shard divides the student over --processes: give --processes 2 or more")
    if memory:
        if compile_:
            raise LoopfreeError("--compile times the sampler; it does not apply to --memory")
        if measure_resolution:
            check_size(*measure_resolution, spec.vae_scale_factor, spec.resolution)
        _memory(arch, spec, (height, width), dtype, batch_size, steps, gradient_checkpointing, batch_teacher_fake,
                measure_resolution, as_json, processes, shard, objective, student_lora_rank)
        return
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    size = f"{width}x{height}"
    if train:
        if compile_:
            raise LoopfreeError("--compile times the sampler; it does not apply to --train")
        if dev.type == "cpu" and dtype == "fp16":
            raise LoopfreeError("fp16 mixed precision needs a GPU; use --dtype bf16 on a CPU")
        rows = train_rows(spec, (height, width), dev, dtype, repeats, batch_size, steps, gradient_checkpointing, batch_teacher_fake,
                          objective)
        title = (f"loopfree bench --train: {arch}, {size}, {dev}, {dtype}, batch {batch_size}, K={steps}, {objective}, "
                 f"teacher+fake {'batched' if batch_teacher_fake else 'separate'}, median of {repeats}")
        click.echo(json.dumps(dict(arch=arch, rows=[asdict(r) for r in rows]), indent=2) if as_json else format_table(rows, title, "share"))
        return
    rows = inference_rows(spec, (height, width), dev, torch_dtype, repeats, steps, with_50, batch_size, end_to_end, compile_)
    if as_json:
        click.echo(json.dumps(dict(arch=arch, resolution=size, device=str(dev), dtype=dtype, compile=compile_,
                                   rows=[asdict(r) for r in rows]), indent=2))
    else:
        compiled = ", compiled" if compile_ else ""
        click.echo(format_table(rows, f"loopfree bench: {arch}, {size}, {dev}, {dtype}{compiled}, batch {batch_size}, median of {repeats}"))


def _memory(arch, spec, size, dtype, batch_size, steps, gradient_checkpointing, batch_teacher_fake, measure_size, as_json,
            processes, shard, objective, student_lora_rank) -> None:
    """``--train --memory``: the estimate's table (or JSON). The measurement runs on the CPU whatever --device says."""
    from loopfree.bench.memory import format_memory_table, memory_rows

    rows = memory_rows(spec, size, dtype, batch_size, steps, gradient_checkpointing, batch_teacher_fake, measure_size,
                       processes=processes, shard=shard, objective=objective, student_lora_rank=student_lora_rank)
    height, width = size
    if as_json:
        click.echo(json.dumps(dict(arch=arch, resolution=f"{width}x{height}", dtype=dtype, batch_size=batch_size, steps=steps,
                                   objective=objective, student_lora_rank=student_lora_rank,
                                   gradient_checkpointing=gradient_checkpointing, processes=processes, shard=shard, estimate=True,
                                   measured_at=None if measure_size is None else f"{measure_size[1]}x{measure_size[0]}",
                                   rows=[asdict(r) for r in rows]), indent=2))
        return
    at = f", activations measured at {measure_size[1]}x{measure_size[0]}" if measure_size else ""
    title = (f"loopfree bench --train --memory: {arch}, {width}x{height}, {dtype}, batch {batch_size}, K={steps}, {objective}, "
             f"gradient checkpointing {'on' if gradient_checkpointing else 'off'}{at}, per device of {processes}"
             f"{' (FSDP2 sharded)' if shard else ''}{f', LoRA student r {student_lora_rank}' if student_lora_rank else ''} — an estimate")
    click.echo(format_memory_table(rows, title))


def _backends(backends, model, arch, resolution, batch_size, repeats, threads, quality, as_json) -> None:
    """--backend: the rows, as a table or JSON."""
    ctx = click.get_current_context()
    arch_given = ctx.get_parameter_source("arch") not in (None, click.core.ParameterSource.DEFAULT)
    _refuse_given(("device", "dtype", "steps", "with_50", "end_to_end", "compile_", "train", "gradient_checkpointing",
                   "batch_teacher_fake", "objective", "memory", "measure_resolution", "processes", "shard",
                   "student_lora_rank", "shared_blocks", "timing"), "--backend (the exported student's own settings: fp32, CPU)")
    if arch_given and model:
        raise LoopfreeError("give --model (a student folder) or --arch (random weights), not both")
    if arch_given and arch in TRANSFORMER_NAMES:
        raise LoopfreeError(f"--backend times UNet students; {arch} is a transformer")
    if quality and arch_given:
        raise LoopfreeError("--quality scores a trained toy student's images: drop --arch (random weights)")
    from loopfree.bench.backends import BACKENDS, backend_rows, format_backend_table

    scorer = None
    if quality:  # the demo's evaluation images: 64 held-out prompts × 4, seed 0 (the studies' setting)
        from loopfree.demo.demo import RowScorer
        from loopfree.pipelines.loading import inspect_pipeline
        from loopfree.toy.assets import model_folder
        from loopfree.toy.settings import EVAL_POOL
        from loopfree.toy.world import heldout_prompts

        size = inspect_pipeline(model_folder(model)).default_size
        scorer = RowScorer(heldout_prompts(EVAL_POOL, seed=0), QUALITY_PROMPTS, 4, 0, size)

    chosen = list(BACKENDS) if "all" in backends else list(dict.fromkeys(backends))
    if "torch" in chosen:  # first: the rows' ratios are to it
        chosen.insert(0, chosen.pop(chosen.index("torch")))
    from tqdm.auto import tqdm

    stages = len(chosen) + bool({"onnxruntime", "onnxruntime-int8"} & set(chosen)) + ("onnxruntime-int8" in chosen) + quality
    bar = tqdm(total=stages, desc="bench --backend", unit="stage")
    begun: list[str] = []

    def progress(stage: str) -> None:  # a stage begins: the one before it is done
        bar.update(bool(begun))
        begun.append(stage)
        bar.set_postfix_str(stage)

    rows, facts = backend_rows(chosen, model, arch if arch_given else None, resolution, batch_size, repeats, threads, scorer,
                               progress=progress)
    bar.update()
    bar.close()
    name = arch if arch_given else (model or "bundled toy student")
    if as_json:
        click.echo(json.dumps(dict(model=name, **facts, rows=[asdict(r) for r in rows]), indent=2))
    else:
        click.echo(format_backend_table(rows, f"loopfree bench --backend: {name}, {facts['width']}x{facts['height']}, batch "
                                              f"{batch_size}, {threads} threads, median of {repeats}"))


def _refuse_given(names: tuple[str, ...], why: str) -> None:
    """A one-line error naming the options of ``names`` given on the command line, if any."""
    ctx = click.get_current_context()
    given = [p.opts[0] for p in ctx.command.params if p.name in names
             and ctx.get_parameter_source(p.name) not in (None, click.core.ParameterSource.DEFAULT)]
    if given:
        raise LoopfreeError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to {why}")


_UNET_ONLY = ("with_50", "end_to_end", "compile_", "gradient_checkpointing", "batch_teacher_fake", "objective",
              "measure_resolution")


def _transformer(arch, resolution, device, dtype, steps, repeats, as_json, train, batch_size, memory, processes, shard,
                 shared_blocks, timing) -> None:
    """A transformer --arch: the one-pass cost table, or (``--train --memory``) the parameter-count memory estimate."""
    from loopfree.bench.transformer_archs import TRANSFORMER_ARCHS
    from loopfree.pipelines.pipeline import check_size

    spec = TRANSFORMER_ARCHS[arch]
    if train and not memory:
        raise LoopfreeError("a transformer's distillation step isn't built yet: --train goes with --memory for a transformer arch")
    if memory:
        _refuse_given(_UNET_ONLY + ("resolution", "steps", "repeats", "batch_size", "shared_blocks", "timing"),
                      "a transformer's memory estimate (parameter counts only: its activations are not measured yet)")
        if shard and processes < 2:
            raise LoopfreeError("--shard divides the student over --processes: give --processes 2 or more")
        _transformer_memory(arch, spec, dtype, processes, shard, as_json)
        return
    _refuse_given(_UNET_ONLY + ("processes", "shard"), "a transformer's one-pass cost table")
    from loopfree.bench.transformer_cost import cost_rows, format_cost_table
    from loopfree.utils.devices import resolve_device, resolve_dtype

    height, width = resolution or (spec.resolution, spec.resolution)
    check_size(height, width, 2 * spec.vae_scale_factor, spec.resolution)  # a 2×2 patch of latents per token
    dev = resolve_device(device)
    rows = cost_rows(spec, (height, width), shared_blocks, steps, batch_size, dev, resolve_dtype(dtype, dev), timing, repeats)
    info = dict(arch=arch, model=type(spec.build("meta")).__name__, resolution=f"{width}x{height}",
                image_tokens=spec.tokens((height, width)), text_tokens=spec.text_len, blocks=len(spec.block_kinds()),
                decoders=steps, batch_size=batch_size, device=str(dev), dtype=dtype, timing=timing,
                repeats=None if timing == "none" else repeats)
    if as_json:
        click.echo(json.dumps(dict(info, rows=[asdict(r) for r in rows]), indent=2))
        return
    how = {"blocks": "timed by blocks", "whole": "timed whole", "none": "FLOPs only"}[timing]
    click.echo(format_cost_table(rows, (
        f"loopfree bench: {arch} ({info['model']}, {info['blocks']} blocks), {info['resolution']}: {info['image_tokens']} "
        f"image + {info['text_tokens']} text tokens, {dev}, {dtype}, batch {batch_size}, K={steps}, {how}"
        f"{'' if timing == 'none' else f', median of {repeats}'}")))


def _transformer_memory(arch, spec, dtype, processes, shard, as_json) -> None:
    from loopfree.bench.transformer_memory import format_memory_table, memory_rows

    rows = memory_rows(spec, dtype, processes, shard)
    name = f"{arch}, {dtype}, {processes} device{'s' * (processes > 1)}{', FSDP2' if shard else ''}"
    if as_json:
        click.echo(json.dumps(dict(name=name, arch=arch, dtype=dtype, processes=processes, shard=shard, estimate=True,
                                   activations="not measured", rows=[asdict(r) for r in rows]), indent=2))
        return
    click.echo(format_memory_table(rows, f"loopfree bench --train --memory: {name}, per device — parameter counts only"))
