"""An exported student (``loopfree export``) as a served model: ``loopfree serve --backend onnxruntime --model
EXPORTED``. onnxruntime runs the graph; x_T comes from each item's seed as for a PyTorch student, so a request gets
``loopfree generate``'s images for the same seed (within the export's check). The graph fixed the resolution, K and
its timesteps and guidance 1: a request for another is refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from loopfree.utils.errors import LoopfreeError
from loopfree.export.runtime import ExportedStudent, check_size, onnx_manifest


@dataclass(frozen=True)
class ExportedInfo:
    """What the server reads of an exported folder before loading it (PipelineInfo's part that requests use)."""

    path: Path
    manifest: dict

    @classmethod
    def read(cls, folder: str | Path) -> "ExportedInfo":
        return cls(Path(folder), onnx_manifest(folder))

    @property
    def default_size(self) -> int:
        return self.manifest["height"]

    def check_size(self, height: int, width: int) -> None:
        check_size(self.manifest, height, width)


class ExportedPipe:
    """The calls the engine, the request checks and the page make of a pipeline, answered by an exported graph."""

    device = torch.device("cpu")
    denoiser = SimpleNamespace(dtype=torch.float32)  # x_T's dtype (initial_latents reads it)

    def __init__(self, info: ExportedInfo, threads: int | None = None):
        self.student = ExportedStudent(info.path, threads)
        self.steps = len(self.student.manifest["decoder_timesteps"])

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.student.latent_shape

    def plan_steps(self, mode: str, num_inference_steps: int | None = None) -> SimpleNamespace:
        """K, the graph's decoders; another mode or K is an error naming what the export fixed."""
        if mode != "loop_free":
            raise LoopfreeError(f"an exported student samples loop_free only, not {mode}")
        if num_inference_steps not in (None, self.steps):
            raise LoopfreeError(f"this graph was exported with K = {self.steps} decoders, not {num_inference_steps}")
        return SimpleNamespace(num_steps=self.steps)

    def __call__(self, prompts: list[str], latents: torch.Tensor, height: int, width: int, mode: str,
                 num_inference_steps: int, guidance_scale: float) -> SimpleNamespace:
        self.plan_steps(mode, num_inference_steps)
        if guidance_scale != 1.0:
            raise LoopfreeError(f"an exported student samples unguided (guidance 1), not {guidance_scale:g}")
        return SimpleNamespace(images=[Image.fromarray(im) for im in self.student(prompts, latents.cpu().numpy())])

    def set_progress_bar_config(self, **kwargs) -> None:
        pass

    def to(self, device) -> "ExportedPipe":
        if torch.device(device).type != "cpu":
            raise LoopfreeError("--backend onnxruntime runs on the CPU: drop --device")
        return self
