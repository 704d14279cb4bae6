"""Nested training state (optimisers, EMA, counters) as one safetensors file: tensors + JSON, never a pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loopfree.utils.outputs import write_atomic


def save_state(path: str | Path, state: Any) -> None:
    """Write ``state`` (dicts, lists, tensors, numbers, strings) atomically to ``path``."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = obj.detach().cpu().clone().contiguous()
            return {"__tensor__": key}
        if isinstance(obj, dict):
            return {"__dict__": [[encode(k), encode(v)] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return [encode(v) for v in obj]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot store a {type(obj).__name__} in a safetensors state file")

    meta = json.dumps(encode(state))
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"state": meta}))


def load_state(path: str | Path) -> Any:
    """Read a file written by ``save_state``."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()["state"]

    def decode(obj: Any) -> Any:
        if isinstance(obj, dict) and "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if isinstance(obj, dict):
            return {decode(k): decode(v) for k, v in obj["__dict__"]}
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        return obj

    return decode(json.loads(meta))
