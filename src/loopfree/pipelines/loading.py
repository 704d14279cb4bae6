"""The loading gate: every way a model folder can be wrong becomes one :class:`LoopfreeError` naming the file.

``inspect_pipeline`` reads only configs and file headers (milliseconds), so commands call it before any
output is written; ``load_pipeline`` runs the same checks and then loads safetensors weights only — never a
pickled ``.bin``, never a download. Stable Diffusion (XL) folders load as ``LoopFreePipeline`` (``…XLPipeline``);
PixArt-α, SD3 and FLUX folders (:mod:`~loopfree.pipelines.families`) as their transformer pipelines, and
``inspect_pipeline`` accepts them only when asked to (``transformers=True``: the commands that sample them).

    info = inspect_pipeline("runs/tiue")           # what the folder holds, or a one-line error
    pipe = load_pipeline("runs/tiue", dtype=torch.bfloat16)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loopfree.method.flow import check_sigmas
from loopfree.method.schedule import check_timesteps
from loopfree.method.transformer_split import check_shared_blocks
from loopfree.pipelines.families import FAMILIES, family_of, present
from loopfree.pipelines.files import check_safetensors, read_json, weight_files
from loopfree.pipelines.pipeline import (BASE_RECORD, LORA_WEIGHTS, SIDECAR, STUDENT_ADAPTER, STYLE_ADAPTER, LoopFreePipeline,
                                         LoopFreeXLPipeline, StepPlan, check_size, plan_steps)
from loopfree.pipelines.transformer_pipeline import Geometry, geometry, plan_transformer_steps
from loopfree.utils.errors import LoopfreeError, first_line

#: Components with weights, and the weight file stem each one's library writes.
WEIGHTS = {"unet": "diffusion_pytorch_model", "transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
           "text_encoder": "model", "text_encoder_2": "model", "text_encoder_3": "model"}
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # a Stable Diffusion pipeline's components


@dataclass(frozen=True)
class PipelineInfo:
    """What a pipeline folder's config files say, read without loading any weights."""

    path: Path
    xl: bool  # two text encoders and added conditioning
    vae_scale_factor: int
    default_size: int  # the denoiser's sample size × VAE scale factor, in pixels
    scheduler_config: dict
    decoder_timesteps: list[int] | None  # recorded by distillation (loopfree.json)
    final_alpha_cumprod: float | None  # recorded with them (one-step students: 1.0)
    family: str = "sd"  # "sd" (a UNet: SD 1.x/2.x/XL) or a transformer family: "pixart", "sd3", "flux"
    geometry: Geometry | None = None  # transformers: the image sizes they take
    decoder_sigmas: list[float] | None = None  # SD3, FLUX: recorded decoder σ's (loopfree.json)
    shared_blocks: int | None = None  # transformers: N, recorded or the default
    absent: tuple[str, ...] = ()  # optional components the folder lacks (SD3 without T5): loaded as None

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler_config["num_train_timesteps"]

    def check_size(self, height: int, width: int) -> None:
        if self.geometry is not None:
            self.geometry.check(height, width)
        else:
            check_size(height, width, self.vae_scale_factor, self.default_size)

    def plan_steps(self, mode: str, steps: int | None = None, timesteps: list[int] | None = None,
                   key_steps: list[int] | None = None) -> StepPlan:
        """What the loaded pipeline's ``plan_steps`` will say, from the configs alone."""
        if self.family in FAMILIES:
            recorded = self.decoder_timesteps if self.family == "pixart" else self.decoder_sigmas
            return plan_transformer_steps(self.family, mode, steps, timesteps, key_steps, self.scheduler_config, recorded)
        return plan_steps(mode, steps, timesteps, self.scheduler_config, self.decoder_timesteps, self.final_alpha_cumprod,
                          key_steps)


def _check_components(root: Path, components: dict, required: tuple[str, ...], what: str) -> dict[str, Any]:
    """Every ``required`` component a folder; the JSON files of every tokenizer and the safetensors weights of every
    component listed readable and complete. Returns the configs of the components with weights, by name."""
    for name in required:
        if not present(components, name) or not (root / name).is_dir():
            raise LoopfreeError(f"{str(root)!r} is not a {what} pipeline (no {name} component)")
    listed = [name for name in WEIGHTS if present(components, name)]
    configs = {name: read_json(root / name / "config.json") for name in listed}
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        for file in (root / name).glob("*.json") if present(components, name) else ():
            read_json(file)
    for name in listed:
        for file in weight_files(root / name, WEIGHTS[name]):
            check_safetensors(file)
    return configs


def _read_recorded(root: Path) -> dict:
    """loopfree.json's content (what distillation recorded), {} without one."""
    recorded = read_json(root / SIDECAR) if (root / SIDECAR).is_file() else {}
    if not isinstance(recorded, dict):
        raise LoopfreeError(f"{root / SIDECAR} is not a JSON object")
    return recorded


def _scales(root: Path, configs: dict, scheduler: dict) -> tuple[int, dict]:
    """The VAE's scale factor, and the scheduler config with its number of training timesteps."""
    try:
        return (2 ** (len(configs["vae"]["block_out_channels"]) - 1),
                {**scheduler, "num_train_timesteps": int(scheduler.get("num_train_timesteps", 1000))})
    except (KeyError, TypeError, ValueError) as e:
        raise LoopfreeError(f"{root}: a component config lacks a required entry ({e})") from None


def _inspect_transformer(root: Path, components: dict, family: str) -> PipelineInfo:
    configs = _check_components(root, components, FAMILIES[family].required, FAMILIES[family].name)
    vae_scale, scheduler = _scales(root, configs, read_json(root / "scheduler" / "scheduler_config.json"))
    try:
        size = geometry(family, configs["transformer"], vae_scale)
    except (KeyError, TypeError, ValueError) as e:
        raise LoopfreeError(f"{root / 'transformer' / 'config.json'} lacks a required entry ({e})") from None
    recorded = _read_recorded(root)
    timesteps, sigmas = recorded.get("decoder_timesteps"), recorded.get("decoder_sigmas")
    try:
        n = check_shared_blocks(recorded.get("shared_blocks"), size.num_blocks)
        if timesteps is not None:
            check_timesteps(timesteps, scheduler["num_train_timesteps"])
        if sigmas is not None:
            check_sigmas(sigmas)
    except LoopfreeError as e:
        raise LoopfreeError(f"{root / SIDECAR}: {e}") from None
    absent = tuple(name for name in FAMILIES[family].optional if not present(components, name))
    return PipelineInfo(root, False, vae_scale, size.default_size, scheduler, timesteps, None, family, size, sigmas, n, absent)


def inspect_pipeline(path: str | os.PathLike, transformers: bool = False, lora: str | os.PathLike | None = None,
                     fuse: bool = False, style_lora: str | os.PathLike | None = None) -> PipelineInfo:
    """Check that ``path`` is a complete local Stable Diffusion (XL) pipeline folder with safetensors weights —
    or, with ``transformers``, a PixArt-α, SD3 or FLUX one; without, such a folder gets a one-line refusal. With
    ``lora`` (a LoRA student's folder) the info is of the base with that student's recorded decoder steps;
    ``style_lora`` (any diffusers-format LoRA) is checked too; ``fuse`` (folding them into the weights) needs one."""
    info = _inspect(path, transformers)
    if style_lora is not None:
        style_weights(style_lora)
    if lora is None:
        if fuse and style_lora is None:
            raise LoopfreeError("--fuse folds a LoRA into the model's weights: give --lora or --style-lora")
        return info
    recorded = check_lora(lora)
    try:
        if recorded.get("decoder_timesteps") is not None:
            check_timesteps(recorded["decoder_timesteps"], info.num_train_timesteps)
        if recorded.get("decoder_sigmas") is not None:
            check_sigmas(recorded["decoder_sigmas"])
    except LoopfreeError as e:
        raise LoopfreeError(f"{Path(lora) / SIDECAR}: {e}") from None
    return dataclasses.replace(info, decoder_timesteps=recorded.get("decoder_timesteps"),
                               final_alpha_cumprod=recorded.get("final_alpha_cumprod"),
                               decoder_sigmas=recorded.get("decoder_sigmas"),
                               shared_blocks=recorded.get("shared_blocks", info.shared_blocks))


def _inspect(path: str | os.PathLike, transformers: bool) -> PipelineInfo:
    root = Path(path)
    if not root.exists():
        raise LoopfreeError(f"model folder {str(path)!r} does not exist")
    if not root.is_dir():
        raise LoopfreeError(f"model folder {str(path)!r} is a file, not a folder")
    if not (root / "model_index.json").is_file():
        raise LoopfreeError(f"{str(path)!r} is not a diffusers pipeline folder (no model_index.json)")
    components = read_json(root / "model_index.json")
    if not isinstance(components, dict):
        raise LoopfreeError(f"{root / 'model_index.json'} is not a JSON object")
    family = family_of(components, path)
    if family is not None and not transformers:
        raise LoopfreeError(f"{str(path)!r} is a {FAMILIES[family].name} pipeline (a transformer denoiser): this command "
                            "takes Stable Diffusion (UNet) pipelines only so far")
    if family is not None:
        return _inspect_transformer(root, components, family)
    xl = present(components, "text_encoder_2")
    configs = _check_components(root, components, REQUIRED + (("text_encoder_2", "tokenizer_2") if xl else ()),
                                "Stable Diffusion")
    vae_scale, scheduler = _scales(root, configs, read_json(root / "scheduler" / "scheduler_config.json"))
    try:
        sample_size = configs["unet"]["sample_size"]
        sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else int(sample_size)
    except (KeyError, TypeError, ValueError) as e:
        raise LoopfreeError(f"{root}: a component config lacks a required entry ({e})") from None
    recorded = _read_recorded(root)
    return PipelineInfo(root, xl, vae_scale, sample_size * vae_scale, scheduler, recorded.get("decoder_timesteps"),
                        recorded.get("final_alpha_cumprod"))


def check_tiny_vae(path: str | os.PathLike) -> Path:
    """``path`` if it is a local diffusers ``AutoencoderTiny`` folder (TAESD) with safetensors weights."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise LoopfreeError(f"tiny VAE {str(path)!r} is not a diffusers model folder (no config.json)")
    config = read_json(root / "config.json")
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderTiny":
        raise LoopfreeError(f"tiny VAE {str(path)!r} is not an AutoencoderTiny (TAESD) folder")
    for file in weight_files(root, "diffusion_pytorch_model"):
        check_safetensors(file)
    return root


def load_tiny_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The checked ``AutoencoderTiny`` folder ``path`` loaded in ``dtype`` (safetensors only, no download)."""
    root = check_tiny_vae(path)
    from diffusers import AutoencoderTiny

    try:
        return AutoencoderTiny.from_pretrained(str(root), use_safetensors=True, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:  # whatever the gate could not foresee
        raise LoopfreeError(f"cannot load the tiny VAE in {str(path)!r}: {first_line(e)}") from None


def _transformer_class(family: str) -> type:
    from loopfree.pipelines.pipeline_flux import LoopFreeFluxPipeline
    from loopfree.pipelines.pipeline_pixart import LoopFreePixArtPipeline
    from loopfree.pipelines.pipeline_sd3 import LoopFreeSD3Pipeline

    return {"pixart": LoopFreePixArtPipeline, "sd3": LoopFreeSD3Pipeline, "flux": LoopFreeFluxPipeline}[family]


def check_lora(path: str | os.PathLike) -> dict:
    """The record (``loopfree.json``) of a LoRA student's folder (``distill --student-lora-rank``), else a LoopfreeError."""
    root = Path(path)
    if not (root / LORA_WEIGHTS).is_file():
        raise LoopfreeError(f"{str(path)!r} holds no LoRA student ({LORA_WEIGHTS} is missing)")
    check_safetensors(root / LORA_WEIGHTS)
    recorded = read_json(root / SIDECAR)
    if not isinstance(recorded, dict) or BASE_RECORD not in recorded:
        raise LoopfreeError(f"{root / SIDECAR} does not record a LoRA student's decoder steps and base")
    return recorded


def load_pipeline(path: str | os.PathLike, dtype: torch.dtype | None = None, tiny_vae: str | os.PathLike | None = None,
                  lora: str | os.PathLike | None = None, fuse: bool = False, style_lora: str | os.PathLike | None = None,
                  style_scale: float = 1.0):
    """Load a local pipeline folder as the matching loop-free pipeline (safetensors only): Stable Diffusion (XL),
    PixArt-α, SD3 or FLUX; ``tiny_vae``: an ``AutoencoderTiny`` folder that decodes instead of the pipeline's VAE
    (fast, approximate); ``lora``: a LoRA student's folder, loaded onto this base (diffusers' ``load_lora_weights``),
    which then samples as that student (its recorded decoder steps); ``style_lora``: any diffusers-format LoRA of the
    denoiser (a file, or a folder holding ``LORA_WEIGHTS``), loaded beside it at ``style_scale``; ``fuse``: folded
    into the weights (no LoRA layers left: as fast as a full student)."""
    info = inspect_pipeline(path, transformers=True, lora=lora, fuse=fuse, style_lora=style_lora)
    tiny = check_tiny_vae(tiny_vae) if tiny_vae is not None else None
    recorded = check_lora(lora) if lora is not None else None
    if info.family in FAMILIES:
        cls = _transformer_class(info.family)
    else:
        cls = LoopFreeXLPipeline if info.xl else LoopFreePipeline
    kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True, **dict.fromkeys(info.absent)}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if cls is LoopFreePipeline:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:  # whatever the gate could not foresee
        first = first_line(e)
        raise LoopfreeError(f"cannot load the model in {str(path)!r}: {first}") from None
    if tiny is not None:
        pipe.vae = load_tiny_vae(tiny, dtype or torch.float32)
    adapters = {}
    if recorded is not None:
        _load_lora(pipe, Path(lora) / LORA_WEIGHTS, STUDENT_ADAPTER, path)
        pipe.use_record(recorded)
        adapters[STUDENT_ADAPTER] = 1.0
    if style_lora is not None:
        _load_lora(pipe, style_weights(style_lora), STYLE_ADAPTER, path)
        adapters[STYLE_ADAPTER] = style_scale
    if adapters:
        pipe.set_adapters(list(adapters), list(adapters.values()))
        if fuse:
            pipe.fuse_lora(adapter_names=list(adapters))
            pipe.unload_lora_weights()  # the fused weights stay; the adapters' layers go
    return pipe


def _load_lora(pipe, weights: Path, name: str, base: str | os.PathLike) -> None:
    try:
        pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name=name)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise LoopfreeError(f"cannot load the LoRA in {str(weights)!r} onto {str(base)!r}: {first_line(e)}") from None


def style_weights(path: str | os.PathLike) -> Path:
    """The weights file of a diffusers-format LoRA given as a file or a folder holding ``LORA_WEIGHTS`` (not a LoRA
    student: that is ``--lora``), else a LoopfreeError."""
    root = Path(path)
    if (root / SIDECAR).is_file() and (root / LORA_WEIGHTS).is_file():
        raise LoopfreeError(f"{str(path)!r} is a LoRA student (it records decoder steps): give it as --lora")
    weights = root / LORA_WEIGHTS if root.is_dir() else root
    if not weights.is_file() or weights.suffix != ".safetensors":
        raise LoopfreeError(f"{str(path)!r} is not a LoRA: give a .safetensors file or a folder holding {LORA_WEIGHTS}")
    check_safetensors(weights)
    return weights
