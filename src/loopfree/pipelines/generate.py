"""Generate images for one prompt into an output folder (``loopfree generate``).

    generate_images("a red circle on a white background", out="images", images_per_prompt=4)

Image i gets x_T from ``image_seed(seed, 0, i)``, so the same seed gives the same images whatever the batch.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from loopfree.utils.errors import LoopfreeError
from loopfree.utils.outputs import OutputFolder, save_image, write_json
from loopfree.utils.seeding import image_seed, initial_latents

BATCH = 8  # images per pipeline call


def generate_images(
    prompt: str, *, model: str | None = None, out: str = "images", overwrite: bool = False, images_per_prompt: int = 1,
    seed: int = 0, steps: int | None = None, timesteps: list[int] | None = None, resolution: tuple[int, int] | None = None,
    mode: str = "loop_free", guidance: float = 1.0, device: str | None = None, dtype: str = "fp32", compile: bool = False,
    key_steps: list[int] | None = None, tiny_vae: str | None = None, lora: str | None = None, fuse: bool = False,
    style_lora: str | None = None, style_scale: float = 1.0, backend: str = "torch", threads: int | None = None,
) -> Path:
    """Sample ``images_per_prompt`` images of ``prompt`` and write ``000.png …`` and ``generate.json``; the folder.
    ``model``: a Stable Diffusion (XL), PixArt-α, SD3 or FLUX pipeline folder (default: the bundled toy student).

    ``dtype``: fp32, bf16 (CPU or GPU) or fp16 (GPU); ``tiny_vae``: an AutoencoderTiny folder decodes; ``compile``: ``torch.compile`` the encoder and the decoder
    (:func:`loopfree.method.runtime.prepare_pipeline`); ``lora``: a LoRA student's folder on ``model``, its base;
    ``style_lora``: any diffusers-format LoRA on it at ``style_scale`` (``fuse``: folded into the weights).
    ``backend="onnxruntime"``: ``model`` is a ``loopfree export`` folder (:func:`generate_exported`)."""
    if backend == "onnxruntime":
        given = {"--steps": steps, "--timesteps": timesteps, "--key-steps": key_steps, "--tiny-vae": tiny_vae, "--lora": lora,
                 "--style-lora": style_lora, "--compile": compile or None, "--fuse": fuse or None, "--device": device}
        given |= {"--mode": None if mode == "loop_free" else mode, "--guidance": None if guidance == 1.0 else guidance,
                  "--dtype": None if dtype == "fp32" else dtype}
        fixed = [name for name, value in given.items() if value is not None]
        if fixed:
            raise LoopfreeError(f"{fixed[0]} does not apply to an exported graph (its sampler, precision and device were fixed by `loopfree export`)")
        return generate_exported(prompt, model, out=out, overwrite=overwrite, images_per_prompt=images_per_prompt, seed=seed,
                                 resolution=resolution, threads=threads)
    if backend != "torch":
        raise LoopfreeError(f"backend must be torch or onnxruntime, got {backend!r}")
    from loopfree.utils.devices import cpu_threads, resolve_device, resolve_dtype
    from loopfree.pipelines.loading import check_tiny_vae, inspect_pipeline, load_pipeline
    from loopfree.method.runtime import prepare_pipeline
    from loopfree.toy.assets import model_folder

    model = str(model_folder(model))
    info = inspect_pipeline(model, transformers=True, lora=lora, fuse=fuse, style_lora=style_lora)  # cheap checks first: nothing is loaded or written if they fail
    height, width = resolution or (info.default_size, info.default_size)
    info.check_size(height, width)
    plan = info.plan_steps(mode, steps, timesteps, key_steps)
    if compile and info.family != "sd":
        raise LoopfreeError("--compile compiles a UNet's encoder and decoder: transformer pipelines run eagerly so far")
    if tiny_vae is not None:
        tiny_vae = os.path.abspath(check_tiny_vae(tiny_vae))
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    lora = os.path.abspath(lora) if lora is not None else None
    style_lora = os.path.abspath(style_lora) if style_lora is not None else None
    adapter = {"lora": lora, "fuse": fuse} if lora else {}  # only when given: older folders still match
    if style_lora:
        adapter |= {"style_lora": style_lora, "style_scale": style_scale, "fuse": fuse}
    settings = dict(prompt=prompt, model=os.path.abspath(model), **adapter, images_per_prompt=images_per_prompt, seed=seed,
                    mode=mode, guidance=guidance, height=height, width=width, dtype=dtype, compile=compile, tiny_vae=tiny_vae)
    folder = OutputFolder(out, "generate", settings, overwrite=overwrite)

    pipe = prepare_pipeline(load_pipeline(model, dtype=torch_dtype, tiny_vae=tiny_vae, lora=lora, fuse=fuse,
                                           style_lora=style_lora, style_scale=style_scale), dev, compile)
    pipe.set_progress_bar_config(disable=True)
    seeds = [image_seed(seed, 0, i) for i in range(images_per_prompt)]
    with cpu_threads(threads), folder:
        files = []
        for start in range(0, images_per_prompt, BATCH):
            chunk = seeds[start : start + BATCH]
            latents = initial_latents(pipe, chunk, height, width, dev)
            images = pipe([prompt] * len(chunk), latents=latents, height=height, width=width, mode=mode, guidance_scale=guidance,
                          num_inference_steps=plan.num_steps, timesteps=plan.timesteps, key_steps=plan.key_steps).images
            for i, image in enumerate(images, start):
                files.append(f"{i:03d}.png")
                save_image(folder.path / files[-1], image)
        write_json(folder.path / "generate.json", dict(settings, steps=plan.num_steps, timesteps=plan.timesteps, key_steps=plan.key_steps,
                                                        device=str(dev), seeds=seeds, files=files))
    return folder.final


def generate_exported(prompt: str, model: str | None, *, out: str = "images", overwrite: bool = False, images_per_prompt: int = 1,
                      seed: int = 0, resolution: tuple[int, int] | None = None, threads: int | None = None) -> Path:
    """:func:`generate_images` with onnxruntime running an exported student's graph (``loopfree export``): the same
    seeds, so the same images as the PyTorch path to within the export's check."""
    from loopfree.export.runtime import ExportedStudent, check_size, onnx_manifest
    from loopfree.utils.seeding import initial_noise

    if model is None:
        raise LoopfreeError("--backend onnxruntime needs --model: a folder written by `loopfree export`")
    manifest = onnx_manifest(model)
    if resolution is not None:
        check_size(manifest, *resolution)
    settings = dict(prompt=prompt, model=os.path.abspath(model), backend="onnxruntime", images_per_prompt=images_per_prompt,
                    seed=seed, height=manifest["height"], width=manifest["width"])
    folder = OutputFolder(out, "generate", settings, overwrite=overwrite)
    student = ExportedStudent(model, threads)
    seeds = [image_seed(seed, 0, i) for i in range(images_per_prompt)]
    with folder:
        images = student([prompt] * len(seeds), initial_noise(seeds, student.latent_shape).numpy())
        files = [f"{i:03d}.png" for i in range(len(seeds))]
        for name, pixels in zip(files, images):
            save_image(folder.path / name, Image.fromarray(pixels))
        write_json(folder.path / "generate.json", dict(settings, source_sha256=manifest["source_sha256"], seeds=seeds, files=files))
    return folder.final
