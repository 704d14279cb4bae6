"""The loading gate: every way a model folder can be wrong becomes one :class:`LoopfreeError` naming the file.

``inspect_pipeline`` reads only configs and file headers (milliseconds), so commands call it before any
output is written; ``load_pipeline`` runs the same checks and then loads safetensors weights only — never a
pickled ``.bin``, never a download.

    info = inspect_pipeline("runs/tiue")           # what the folder holds, or a one-line error
    pipe = load_pipeline("runs/tiue", dtype=torch.bfloat16)
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loopfree.utils.errors import LoopfreeError, first_line
from loopfree.pipelines.pipeline import LoopFreePipeline, LoopFreeXLPipeline, StepPlan, check_size, plan_steps

#: Components a Stable Diffusion (XL) pipeline needs, and the weight file stem each one's library writes.
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model", "text_encoder_2": "model"}
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def read_json(path: Path) -> Any:
    """A JSON file's content; a missing, unreadable or malformed file is one line naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoopfreeError(f"{path} is missing") from None
    except PermissionError:
        raise LoopfreeError(f"cannot read {path} (permission denied)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LoopfreeError(f"cannot read {path} ({e.__class__.__name__})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LoopfreeError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None


def check_safetensors(path: Path) -> None:
    """An error unless ``path`` is a complete, readable safetensors file (header parsed, size matches it)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            header = f.read(n) if n is not None and 2 <= n <= min(size - 8, 100_000_000) else None
    except FileNotFoundError:
        raise LoopfreeError(f"{path} is missing") from None
    except PermissionError:
        raise LoopfreeError(f"cannot read {path} (permission denied)") from None
    except IsADirectoryError:
        raise LoopfreeError(f"{path} is a folder, not a weights file") from None
    except OSError as e:
        raise LoopfreeError(f"cannot read {path} ({e.strerror or e.__class__.__name__})") from None
    try:
        entries = json.loads(header) if header is not None else None
        end = max((v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, AttributeError):
        entries = None
    if entries is None:
        what = "empty" if size == 0 else "truncated" if size < 16 else "not a safetensors file (bad header)"
        raise LoopfreeError(f"{path} is {what}")
    expected = 8 + len(header) + end
    if size != expected:
        raise LoopfreeError(f"{path} is {'truncated' if size < expected else 'corrupt'}: {size} bytes, its header describes {expected}")


def _weight_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of one component (one file or the shards an index names); errors name the file."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = read_json(index).get("weight_map", {})
        if not isinstance(shards, dict) or not shards:
            raise LoopfreeError(f"{index} names no weight shards")
        return [folder / name for name in sorted(set(shards.values()))]
    if single.exists():
        return [single]
    pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.ckpt")]
    if pickles:
        raise LoopfreeError(f"{folder} holds only pickled weights ({pickles[0]}); loopfree loads safetensors only — "
                            f"convert them with diffusers/transformers save_pretrained(safe_serialization=True)")
    raise LoopfreeError(f"{single} is missing")


@dataclass(frozen=True)
class PipelineInfo:
    """What a pipeline folder's config files say, read without loading any weights."""

    path: Path
    xl: bool  # two text encoders and added conditioning
    vae_scale_factor: int
    default_size: int  # UNet sample size × VAE scale factor, in pixels
    scheduler_config: dict
    decoder_timesteps: list[int] | None  # recorded by distillation (loopfree.json)
    final_alpha_cumprod: float | None  # recorded with them (one-step students: 1.0)

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler_config["num_train_timesteps"]

    def check_size(self, height: int, width: int) -> None:
        check_size(height, width, self.vae_scale_factor, self.default_size)

    def plan_steps(self, mode: str, steps: int | None = None, timesteps: list[int] | None = None,
                   key_steps: list[int] | None = None) -> StepPlan:
        """What the loaded pipeline's ``plan_steps`` will say, from the configs alone."""
        return plan_steps(mode, steps, timesteps, self.scheduler_config, self.decoder_timesteps, self.final_alpha_cumprod,
                          key_steps)


def inspect_pipeline(path: str | os.PathLike) -> PipelineInfo:
    """Check that ``path`` is a complete local Stable Diffusion (XL) pipeline folder with safetensors weights."""
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
    xl = "text_encoder_2" in components
    for name in REQUIRED + (("text_encoder_2", "tokenizer_2") if xl else ()):
        if name not in components or not (root / name).is_dir():
            raise LoopfreeError(f"{str(path)!r} is not a Stable Diffusion pipeline (no {name} component)")
    configs = {name: read_json(root / name / "config.json") for name in WEIGHTS if name in components}
    scheduler = read_json(root / "scheduler" / "scheduler_config.json")
    for name in ("tokenizer", "tokenizer_2"):
        for file in (root / name).glob("*.json") if name in components else ():
            read_json(file)
    for name, stem in WEIGHTS.items():
        if name in components:
            for file in _weight_files(root / name, stem):
                check_safetensors(file)
    try:
        vae_scale = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
        sample_size = configs["unet"]["sample_size"]
        sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else int(sample_size)
        scheduler = {**scheduler, "num_train_timesteps": int(scheduler.get("num_train_timesteps", 1000))}
    except (KeyError, TypeError, ValueError) as e:
        raise LoopfreeError(f"{root}: a component config lacks a required entry ({e})") from None
    recorded = read_json(root / "loopfree.json") if (root / "loopfree.json").is_file() else {}
    if not isinstance(recorded, dict):
        raise LoopfreeError(f"{root / 'loopfree.json'} is not a JSON object")
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
    for file in _weight_files(root, "diffusion_pytorch_model"):
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


def load_pipeline(path: str | os.PathLike, dtype: torch.dtype | None = None, tiny_vae: str | os.PathLike | None = None):
    """Load a local Stable Diffusion (XL) pipeline folder as the matching loop-free pipeline (safetensors only);
    ``tiny_vae``: an ``AutoencoderTiny`` folder that decodes instead of the pipeline's VAE (fast, approximate)."""
    info = inspect_pipeline(path)
    tiny = check_tiny_vae(tiny_vae) if tiny_vae is not None else None
    cls = LoopFreeXLPipeline if info.xl else LoopFreePipeline
    kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True}
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
    return pipe
