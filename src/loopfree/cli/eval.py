"""``loopfree eval``: generate images for a prompt set and score them like the paper; ``--report`` tabulates runs.

    loopfree eval --model runs/tiue --prompts captions_val2014.json --num-prompts 30000 --out evals/tiue \\
        --reference-images coco/val2014 --inception inception-2015-12-05.pt --clip clip-vit-g-14
    loopfree eval --features toy --out evals/toy-student --images-per-prompt 16
    loopfree eval --model sd21-base --mode propagate --steps 50 --key-steps 0,1,2,3,5,10,15,25,35 --guidance 7.5 … --out evals/fasterd
    loopfree eval --report evals/sd21 evals/tiue
"""

from __future__ import annotations

from pathlib import Path

import click

from loopfree.cli import options
from loopfree.utils.errors import LoopfreeError

METRIC_HELP = "Comma-separated: fid,kid,clip,pr,dc,latency,alignment (default: fid,kid,clip,pr,dc,latency; toy: alignment,fid,pr,dc,latency)."


@click.command()
@click.argument("dirs", nargs=-1, type=click.Path())
@click.option("--report", is_flag=True, help="Print the results of the evaluation folders DIRS as one table, and stop.")
@options.model(options.ANY_MODEL)
@click.option("--prompts", type=click.Path(), default=None,
              help="Prompt source: txt/jsonl/csv/tsv/parquet/datasets folder, COCO captions JSON, DrawBench CSV, PartiPrompts TSV "
                   "(default with --features toy: the toy world's held-out prompts).")
@click.option("--prompt-field", default=None, help="Column or dotted JSON field holding the prompt.")
@click.option("--out", type=click.Path(), default=None, help="Output folder (images, manifest.jsonl, results.json, results.md).")
@options.overwrite()
@click.option("--num-prompts", type=int, default=None, help="A seeded subset of this many prompts (default: all).")
@options.images_per_prompt()
@options.seed()
@click.option("--batch-size", type=click.IntRange(1, 4096), default=8, show_default=True, help="Images per pipeline call.")
@options.resolution("Generated image size: N or WIDTHxHEIGHT (default: the model's).")
@options.steps()
@options.timesteps()
@options.mode()
@options.key_steps()
@options.guidance()
@options.dtype()
@options.device()
@click.option("--reference-images", type=click.Path(), default=None, help="Folder of real images to compare with (e.g. COCO val2014).")
@click.option("--reference-model", type=click.Path(), default=None, help="A pipeline whose samples of the same prompts and seeds are the reference.")
@click.option("--reference-steps", type=click.IntRange(1, 1000), default=50, show_default=True, help="DDIM steps of --reference-model.")
@click.option("--reference-guidance", type=float, default=4.5, show_default=True, callback=options.number_check(0.0, 100.0),
              help="Guidance of --reference-model.")
@click.option("--inception", type=click.Path(), default=None, help="inception-2015-12-05.pt (TorchScript) for FID/KID/PR/DC.")
@click.option("--clip", type=click.Path(), default=None, help="A local transformers CLIP folder for the CLIP score.")
@click.option("--features", type=click.Choice(("inception", "toy")), default="inception", show_default=True,
              help="Feature space: the Inception network, or the toy world's attribute classifier.")
@click.option("--metrics", default=None, help=METRIC_HELP)
@click.option("--metric-resolution", type=click.IntRange(1, 4096), default=256, show_default=True,
              help="Both sides are centre-cropped and resized (Lanczos) to this before the Inception network.")
@click.option("--tiny-vae", type=click.Path(), default=None,
              help="A local AutoencoderTiny (TAESD) folder that decodes the model's images instead of its VAE.")
@click.option("--card", type=click.Path(), default=None,
              help="A published student folder whose model card (README.md) gets this evaluation's row.")
@options.lora()
@options.fuse()
@options.style_lora
@options.threads()
@click.option("--latency-repeats", type=click.IntRange(1, 1000), default=5, show_default=True, help="Timed batch-1 calls (median).")
def eval(dirs, report, model, prompts, prompt_field, out, overwrite, num_prompts, images_per_prompt, seed, batch_size, resolution, steps,
         timesteps, mode, key_steps, guidance, dtype, device, reference_images, reference_model, reference_steps, reference_guidance, inception, clip,
         features, metrics, metric_resolution, tiny_vae, card, lora, fuse, style_lora, style_scale, threads, latency_repeats) -> None:
    """Generate images for a prompt set and score them: FID, KID, CLIP, precision/recall/F1, density/coverage, latency."""
    if report:
        if not dirs:
            raise LoopfreeError("--report needs one or more evaluation folders")
        from loopfree.evaluation.results import report as tabulate

        click.echo(tabulate(list(dirs)))
        return
    if dirs:
        raise LoopfreeError(f"unexpected argument {dirs[0]!r}: folders are only taken with --report")
    if out is None:
        raise LoopfreeError("--out is required: the folder for the images and results")
    if card is not None and not (Path(card) / "model_index.json").is_file():
        raise LoopfreeError(f"--card {card} is not a published model folder (no model_index.json)")
    from loopfree.evaluation.settings import EvalConfig

    cfg = EvalConfig(
        out=out, model=model, lora=lora, fuse=fuse, style_lora=style_lora, style_scale=style_scale, prompts=prompts, prompt_field=prompt_field, num_prompts=num_prompts, images_per_prompt=images_per_prompt,
        seed=seed, batch_size=batch_size, resolution=resolution, steps=steps, timesteps=timesteps, mode=mode, key_steps=key_steps, guidance=guidance,
        dtype=dtype, device=device, reference_images=reference_images, reference_model=reference_model, reference_steps=reference_steps,
        reference_guidance=reference_guidance, inception=inception, clip=clip, features=features, tiny_vae=tiny_vae,
        metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()) if metrics is not None else None,
        metric_resolution=metric_resolution, latency_repeats=latency_repeats, overwrite=overwrite,
    )
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from loopfree.evaluation.results import table
    from loopfree.evaluation.run import run_eval
    from loopfree.utils.devices import cpu_threads

    bars = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # loading bars would bury the generation and feature bars
    transformers_logging.disable_progress_bar()
    try:
        with cpu_threads(threads):
            results = run_eval(cfg)
    finally:
        if bars[0]:
            diffusers_logging.enable_progress_bar()
        if bars[1]:
            transformers_logging.enable_progress_bar()
    if results is not None:
        if card is not None:
            from loopfree.pipelines.card import add_card_results

            add_card_results(Path(card), Path(out).name, results)
        click.echo(table([(Path(out).name, results)]))
        click.echo(f"wrote {Path(out) / 'results.json'} and results.md")
