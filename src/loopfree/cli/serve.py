"""``loopfree serve``: the web page and the OpenAI-compatible image API for a student.

    loopfree serve                                          # bundled toy student and teacher
    loopfree serve --model runs/tiue --teacher path/to/sd21-base --device cuda --port 8000
    loopfree serve --backend onnxruntime --model exported/student      # a folder of `loopfree export`
"""

from __future__ import annotations

import click

from loopfree.cli import options
from loopfree.utils.errors import LoopfreeError

SERVE_EXTRA = ("gradio", "fastapi", "uvicorn", "pydantic")  # pyproject's [serve] extra


@click.command()
@options.model("The student to serve: a local diffusers pipeline folder, Stable Diffusion (XL), PixArt-α, SD3 or "
               f"FLUX, or a bundled model's name ({', '.join(options.MODELS)}; default: the bundled toy student).")
@click.option("--teacher", type=click.Path(), default=None,
              help="A teacher folder for the page's side-by-side (default: the bundled toy teacher when --model is not given).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True, help="Port (0: any free port).")
@options.device()
@options.dtype()
@click.option("--max-batch", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Most images in one pipeline call; waiting requests with the same settings share a call.")
@click.option("--max-queue", type=click.IntRange(1, 1_000_000), default=64, show_default=True,
              help="Most requests waiting; more are answered 429.")
@options.threads()
@click.option("--tiny-vae", type=click.Path(), default=None,
              help="A local AutoencoderTiny (TAESD) folder that decodes for every served model: fast, approximate.")
@options.lora()
@options.fuse()
@options.style_lora
@click.option("--backend", type=click.Choice(("torch", "onnxruntime")), default="torch", show_default=True,
              help="onnxruntime: --model is a folder of `loopfree export`, its graph run by onnxruntime on the CPU.")
def serve(model, teacher, host, port, device, dtype, max_batch, max_queue, threads, tiny_vae, lora, fuse, style_lora,
          style_scale, backend) -> None:
    """Serve a web page at / and an OpenAI-compatible image API at /v1/images/generations.

    SIGTERM or Ctrl-C finishes the requests in flight, then exits with code 0."""
    try:
        from loopfree.serve.app import serve as run
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in SERVE_EXTRA:
            raise
        raise LoopfreeError(f"loopfree serve needs {e.name}: pip install 'loopfree[serve]'") from None

    def ready(url: str) -> None:
        click.echo(f"loopfree serve: {url} (page at /, API at /v1/images/generations)")

    run(model=model, teacher=teacher, host=host, port=port, device=device, dtype=dtype, max_batch=max_batch,
        max_queue=max_queue, threads=threads, on_ready=ready, tiny_vae=tiny_vae, lora=lora, fuse=fuse,
        style_lora=style_lora, style_scale=style_scale, backend=backend)
    click.echo("loopfree serve: stopped; every accepted request was answered")
