"""TiUE as a LoRA (``loopfree distill --student-lora-rank R``): the student is the frozen teacher plus a peft adapter,
and only the adapter trains — its gradients, Adam moments and EMA are all a run holds of the student. The run's
folder holds the adapter in diffusers' LoRA format and the decoder steps it was trained for::

    loopfree distill --teacher models/sd21 --prompts prompts.txt --out runs/tiue-lora --student-lora-rank 16

    pipe = StableDiffusionPipeline.from_pretrained("models/sd21")
    pipe.load_lora_weights("runs/tiue-lora")                     # plain diffusers: the student's weights
    pipe = load_pipeline("models/sd21", lora="runs/tiue-lora")   # loopfree: the loop-free pipeline, its decoder steps
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from loopfree.method.scores import add_frozen_adapter
from loopfree.pipelines.files import denoiser_sha256
from loopfree.pipelines.pipeline import BASE_RECORD, LORA_WEIGHTS, SIDECAR, STUDENT_ADAPTER
from loopfree.training.config import DistillConfig
from loopfree.utils.outputs import write_json



def student_lora(cfg: DistillConfig) -> LoraConfig:
    """The student's adapter: rank, alpha (default: the rank) and targets (default: the fake score's)."""
    return LoraConfig(r=cfg.student_lora_rank, lora_alpha=cfg.student_lora_alpha or cfg.student_lora_rank,
                      target_modules=cfg.student_lora_targets or cfg.lora_targets, init_lora_weights=True)


def add_student_lora(model: torch.nn.Module, cfg: DistillConfig, weight_dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Freeze ``model`` (in ``weight_dtype``) and give it the student's adapter in float32; the adapter's parameters.
    A fresh adapter changes nothing (its B is zero): the student starts as the teacher."""
    return add_frozen_adapter(model, student_lora(cfg), STUDENT_ADAPTER, weight_dtype)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The student adapter's weights (peft's names)."""
    return get_peft_model_state_dict(model, adapter_name=STUDENT_ADAPTER)


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_peft_model_state_dict(model, state, adapter_name=STUDENT_ADAPTER)


def save_lora(pipeline_class: type, model: torch.nn.Module, out: Path, adapter: str = STUDENT_ADAPTER) -> None:
    """``model``'s ``adapter`` into ``out`` (``LORA_WEIGHTS``) as ``pipeline_class.save_lora_weights`` writes it (its
    LoraConfig as the file's metadata, so alpha comes back on loading)."""
    config = model.peft_config[adapter].to_dict()
    config = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    # peft's own key names, which diffusers loads as they are: its convert_state_dict_to_diffusers renames only the
    # attention projections, and a file mixing both namings loses those on loading
    layers = get_peft_model_state_dict(model, adapter_name=adapter)
    kind = "transformer" if hasattr(model, "transformer_blocks") else "unet"
    pipeline_class.save_lora_weights(str(out), **{f"{kind}_lora_layers": layers, f"{kind}_lora_adapter_metadata": config},
                                     weight_name=LORA_WEIGHTS, safe_serialization=True)


def publish_student_lora(pipe, out: Path, base: str) -> None:
    """The student pipeline ``pipe``'s adapter into ``out`` (``LORA_WEIGHTS``) and its record, ``loopfree.json``: the
    decoder steps, and the base it was distilled on (its folder and the hash of its denoiser's weights)."""
    save_lora(type(pipe), pipe.denoiser, out)
    write_json(out / SIDECAR, {**pipe.record(), "lora_base": os.path.abspath(base), BASE_RECORD: denoiser_sha256(base)})
