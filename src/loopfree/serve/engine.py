"""The served models and the one thing the server does with them: a batch of (prompt, seed) items → PNGs.

    spec = check_serve_models(model=None, teacher=None, device="cpu", dtype="fp32")   # cheap: configs only
    engine = load_engine(spec)                                                  # weights, warm-up
    pictures = engine.render(Settings("student", 64, 64, "loop_free", 4, 1.0), [Item("a red circle", 3)])

An item's x_T is ``initial_latents(pipe, [item.seed], …)``, so an image depends on its own prompt and seed, not on what
else shares the call — up to the rounding of batched floating-point kernels (docs/serve.md).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from loopfree.utils.devices import resolve_device, resolve_dtype
from loopfree.utils.errors import LoopfreeError
from loopfree.pipelines.loading import PipelineInfo, check_tiny_vae, inspect_pipeline, load_pipeline
from loopfree.utils.seeding import initial_latents
from loopfree.toy.assets import model_folder


@dataclass(frozen=True)
class Settings:
    """What the images of one pipeline call share: requests with equal settings may be batched together."""

    model: str  # a served model's id
    height: int
    width: int
    mode: str
    steps: int  # K decoders (loop_free) or DDIM steps (loop)
    guidance: float


@dataclass(frozen=True)
class Item:
    """One image to make: its prompt and the seed of its x_T."""

    prompt: str
    seed: int


@dataclass(frozen=True)
class Picture:
    """One image made: PNG bytes, the wall time of the pipeline call that made it, and that call's size."""

    png: bytes
    seconds: float
    batch: int


@dataclass(frozen=True)
class EngineSpec:
    """What to load, checked without loading weights: (id, folder info) per model, student first."""

    models: list[tuple[str, PipelineInfo]]
    device: torch.device
    dtype: torch.dtype
    tiny_vae: Path | None = None  # an AutoencoderTiny folder that decodes for every served model
    lora: Path | None = None  # the student's LoRA (distill --student-lora-rank), on models[0]: its base
    fuse: bool = False  # the LoRAs folded into the weights
    style_lora: Path | None = None  # any diffusers-format LoRA on the student (a file or a folder)
    style_scale: float = 1.0  # its weight
    backend: str = "torch"  # onnxruntime: models[0] is an exported student (serve.exported), run by onnxruntime


@dataclass
class Model:
    """A loaded pipeline under its id; ``default_mode`` is what requests that name no mode get."""

    id: str
    info: PipelineInfo
    pipe: Any
    default_mode: str
    created: int  # Unix time it was loaded (the OpenAI model object's ``created``)
    exported: bool = False  # an exported graph: its resolution, K and guidance 1 are fixed


def check_serve_models(model: str | Path | None, teacher: str | Path | None, device: str | None, dtype: str,
                       tiny_vae: str | Path | None = None, lora: str | Path | None = None, fuse: bool = False,
                       style_lora: str | Path | None = None, style_scale: float = 1.0, backend: str = "torch") -> EngineSpec:
    """Check the model folders, device and dtype (a one-line LoopfreeError for each problem), loading nothing.

    Without ``model`` the bundled toy student is served, with the bundled toy teacher unless ``teacher`` names
    another; a given ``model`` gets a teacher only when ``teacher`` names one. With ``lora`` the student is that LoRA
    student on ``model``, its base, named after the LoRA's folder; ``style_lora`` goes onto the student at ``style_scale``
    (``fuse``: folded into its weights). ``backend="onnxruntime"``: ``model`` is a folder of ``loopfree export``,
    served alone on the CPU in fp32."""
    if backend == "onnxruntime":
        return _check_exported(model, teacher, device, dtype, tiny_vae, lora, style_lora)
    student_path = model_folder(model)
    teacher_path = model_folder(teacher, "teacher") if teacher is not None or model is None else None
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    student = inspect_pipeline(student_path, transformers=True, lora=lora, fuse=fuse, style_lora=style_lora)
    models = [(Path(lora or student_path).resolve().name, student)]
    if teacher_path is not None:
        info = inspect_pipeline(teacher_path, transformers=True)
        if info.vae_scale_factor != student.vae_scale_factor:
            raise LoopfreeError(f"the teacher's VAE downsamples by {info.vae_scale_factor}, the student's by "
                                f"{student.vae_scale_factor}: they cannot start from the same x_T")
        name = teacher_path.resolve().name
        models.append((name if name != models[0][0] else f"{name}-teacher", info))
    return EngineSpec(models, dev, torch_dtype, check_tiny_vae(tiny_vae) if tiny_vae is not None else None,
                      Path(lora) if lora is not None else None, fuse, Path(style_lora) if style_lora is not None else None,
                      style_scale)


def _check_exported(model, teacher, device, dtype, tiny_vae, lora, style_lora) -> EngineSpec:
    from loopfree.serve.exported import ExportedInfo

    if model is None:
        raise LoopfreeError("--backend onnxruntime needs --model: a folder written by `loopfree export`")
    given = [name for name, unset in (("--teacher", teacher is None), ("--tiny-vae", tiny_vae is None), ("--lora", lora is None),
                                      ("--style-lora", style_lora is None), ("--dtype", dtype == "fp32"),
                                      ("--device", device in (None, "cpu"))) if not unset]
    if given:
        raise LoopfreeError(f"{', '.join(given)} does not apply to --backend onnxruntime (the export fixed them: one fp32 graph, CPU)")
    info = ExportedInfo.read(model)
    return EngineSpec([(Path(model).resolve().name, info)], torch.device("cpu"), torch.float32, backend="onnxruntime")


class Engine:
    """Loaded pipelines by id on one device; ``render`` is called from one thread at a time (the batcher's)."""

    def __init__(self, models: list[Model], device: torch.device):
        self.models = {m.id: m for m in models}
        self.student = models[0]
        self.teacher = models[1] if len(models) > 1 else None
        self.device = device

    def render(self, settings: Settings, items: list[Item]) -> list[Picture]:
        """One pipeline call for ``items`` (any prompts, one ``settings``); their images as PNGs, in order."""
        model = self.models[settings.model]
        latents = initial_latents(model.pipe, [item.seed for item in items], settings.height, settings.width, self.device)
        start = time.perf_counter()
        images = model.pipe([item.prompt for item in items], latents=latents, height=settings.height, width=settings.width,
                            mode=settings.mode, num_inference_steps=settings.steps, guidance_scale=settings.guidance).images
        seconds = time.perf_counter() - start  # PIL images: the device's work is done
        return [Picture(png_bytes(image), seconds, len(items)) for image in images]

    def default_settings(self, model: Model) -> Settings:
        size = model.info.default_size
        return Settings(model.id, size, size, model.default_mode, model.pipe.plan_steps(model.default_mode).num_steps, 1.0)


def png_bytes(image) -> bytes:
    """A PIL image as PNG bytes (the same encoding ``loopfree generate`` writes)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def load_engine(spec: EngineSpec) -> Engine:
    """Load every model of ``spec`` onto its device and warm each up with one image (the first call of a
    process pays for kernel set-up; no request should)."""
    models = []
    if spec.backend == "onnxruntime":
        from loopfree.serve.exported import ExportedPipe

        (name, info), = spec.models
        models.append(Model(name, info, ExportedPipe(info, torch.get_num_threads()), "loop_free", int(time.time()), exported=True))
    else:
        for i, (name, info) in enumerate(spec.models):
            own = dict(lora=spec.lora, fuse=spec.fuse, style_lora=spec.style_lora, style_scale=spec.style_scale) if i == 0 else {}
            pipe = load_pipeline(info.path, dtype=spec.dtype, tiny_vae=spec.tiny_vae, **own)
            pipe.to(spec.device)
            pipe.set_progress_bar_config(disable=True)
            models.append(Model(name, info, pipe, "loop_free" if i == 0 else "loop", int(time.time())))
    size = spec.models[0][1].default_size
    if len(models) > 1 and models[1].pipe.latent_shape(size, size) != models[0].pipe.latent_shape(size, size):
        raise LoopfreeError("the teacher's and the student's denoisers take different latents: "
                            "they cannot start from the same x_T")
    engine = Engine(models, spec.device)
    for model in models:
        settings = engine.default_settings(model)
        engine.render(settings if model is engine.student else replace(settings, steps=1), [Item("warm-up", 0)])
    return engine
