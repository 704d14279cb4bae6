"""The feature cache: extractor outputs of an image set, stored in the output folder under a key made of
everything they depend on (the feature network's weights hash, the image list or the settings that generated it,
the metric resolution).

    cache = FeatureCache(out)
    outputs, where = cache.get(description, compute)     # where: "computed", "cached" or "reused from …"

Evaluations of several models against one reference are usually kept side by side (``evals/sd21``,
``evals/tiue``): a key missing from ``out/reference`` is looked up in the sibling folders' ``reference`` too and
linked (or copied) in, so the second model evaluated against COCO does not read its 30,000 images again. An
input that changes (an image file's size or time, another network, another resolution) changes the key.
Files are safetensors with the description as metadata; never a pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import load_file, save_file

from loopfree.utils.outputs import write_atomic

CACHE = "reference"


def cache_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


def files_fingerprint(paths: list[Path], root: Path) -> str:
    """A hash of the files' names (relative to ``root``), sizes and modification times: no image is read."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class FeatureCache:
    """Extractor outputs keyed by description, in ``out/reference``."""

    def __init__(self, out: Path):
        self.out = out
        self.folder = out / CACHE

    def find(self, key: str) -> Path | None:
        """The cache file of ``key`` here or in a sibling evaluation folder."""
        own = self.folder / f"{key}.safetensors"
        if own.is_file():
            return own
        siblings = sorted(self.out.parent.glob(f"*/{CACHE}/{key}.safetensors"))
        return next((p for p in siblings if p.parent.parent != self.out), None)

    def _adopt(self, found: Path, own: Path) -> None:
        """Hard-link ``found`` in as ``own`` (a copy where links fail), atomically."""
        try:
            tmp = own.with_name(f".{own.name}.link-{os.getpid()}")
            tmp.unlink(missing_ok=True)
            os.link(found, tmp)
            os.replace(tmp, own)
        except OSError:
            write_atomic(own, lambda t: shutil.copyfile(found, t))

    def get(self, description: dict, compute: Callable[[], dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], str]:
        """The outputs for ``description``: from the cache if there, else ``compute()`` and store them."""
        key = cache_key(description)
        own = self.folder / f"{key}.safetensors"
        found = self.find(key)
        if found is not None:
            self.folder.mkdir(exist_ok=True)
            where = "cached" if found == own else f"reused from {found}"
            if found != own:
                self._adopt(found, own)
            return load_file(own), where
        outputs = compute()
        self.folder.mkdir(exist_ok=True)
        metadata = {"description": json.dumps(description, sort_keys=True)}
        arrays = {name: np.ascontiguousarray(value) for name, value in outputs.items()}
        write_atomic(own, lambda t: save_file(arrays, str(t), metadata=metadata))
        return outputs, "computed"
