"""The loading gate's file checks: JSON files and safetensors weights, each problem one LoopfreeError naming the file.

    config = read_json(root / "vae" / "config.json")
    for file in weight_files(root / "unet", "diffusion_pytorch_model"):
        check_safetensors(file)                      # header parsed, size matches it — no tensor is read
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from loopfree.utils.errors import LoopfreeError


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


def weight_files(folder: Path, stem: str) -> list[Path]:
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


def denoiser_sha256(folder: str | Path, with_record: bool = False) -> str | None:
    """SHA-256 of a pipeline folder's denoiser weights (its UNet's or transformer's safetensors) and, ``with_record``,
    its ``loopfree.json`` (the decoder steps), in name order; None if it has neither."""
    root = Path(folder)
    denoiser = root / "unet" if (root / "unet").is_dir() else root / "transformer"
    record = [root / "loopfree.json"] if with_record else []
    files = sorted(denoiser.glob("*.safetensors")) + [p for p in record if p.is_file()]
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(4 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
