"""Run an exported student (``loopfree export``) with onnxruntime: the tokenizer in Python (``tokenizers``), the
rest — text encoder to uint8 pixels — in the graph. Imports neither torch nor diffusers, so a target machine needs
only ``pip install onnxruntime tokenizers numpy``::

    student = ExportedStudent("exported/student")
    x_T = np.random.default_rng(0).standard_normal((2, *student.latent_shape), dtype=np.float32)
    images = student(["a red circle", "a blue square"], x_T)  # (2, H, W, 3) uint8
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loopfree.utils.errors import LoopfreeError

MANIFEST = "export.json"  # an exported folder's description: inputs, shapes, timesteps, tokenizers, source hash


def require(*modules: str) -> None:
    """An error naming the install command unless every one of ``modules`` can be imported."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise LoopfreeError(f"{missing[0]} is not installed: pip install onnx onnxscript onnxruntime (or loopfree[export])")


def read_manifest(folder: str | Path) -> dict:
    """The manifest of an exported folder, or an error naming what is wrong with the folder."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise LoopfreeError(f"{folder} is not an exported student (no {MANIFEST}); make one with `loopfree export`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise LoopfreeError(f"{path} is unreadable ({e})") from None


def onnx_manifest(folder: str | Path) -> dict:
    """The manifest of an exported folder that holds an ONNX graph (what onnxruntime runs), else an error."""
    manifest = read_manifest(folder)
    if manifest["format"] != "onnx":
        raise LoopfreeError(f"{folder} holds a {manifest['format']} export; the onnxruntime backend runs onnx")
    return manifest


def check_size(manifest: dict, height: int, width: int) -> None:
    """An error unless ``height`` × ``width`` is the size the graph was exported at."""
    if (height, width) != (manifest["height"], manifest["width"]):
        raise LoopfreeError(f"this graph was exported at {manifest['width']}x{manifest['height']}; export again for {width}x{height}")


def tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` saved by the exporter with the pipeline's padding and truncation built in."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def encode(tok, prompts: list[str]) -> np.ndarray:
    """(B, L) int64 token ids of ``prompts`` from a tokenizer of :func:`tokenizer`."""
    return np.array([e.ids for e in tok.encode_batch(prompts)], dtype=np.int64)


class ExportedStudent:
    """An ONNX-exported student: ``(prompts, x_T) → uint8 images`` (see the module docstring)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        self.manifest = onnx_manifest(folder)
        require("onnxruntime")
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.folder / self.manifest["graph"]), options, providers=["CPUExecutionProvider"])
        self.tokenizers = {name: tokenizer(self.folder / file) for name, file in self.manifest["tokenizers"].items()}

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """One image's x_T shape (C, h, w)."""
        return tuple(self.manifest["latent_shape"])

    def token_ids(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """The graph's token inputs for ``prompts``: (B, L) int64 per tokenizer."""
        return {name: encode(tok, prompts) for name, tok in self.tokenizers.items()}

    def __call__(self, prompts: list[str], x_T: np.ndarray) -> np.ndarray:
        if len(prompts) != len(x_T) or tuple(x_T.shape[1:]) != self.latent_shape:
            raise LoopfreeError(f"x_T must have shape ({len(prompts)}, {', '.join(map(str, self.latent_shape))}), got {tuple(x_T.shape)}")
        limit = self.manifest["max_batch"]
        feeds = [dict(self.token_ids(prompts[i : i + limit]), x_T=np.ascontiguousarray(x_T[i : i + limit], dtype=self.manifest["x_T_dtype"]))
                 for i in range(0, len(prompts), limit)]
        return np.concatenate([self.session.run(["images"], feed)[0] for feed in feeds])
