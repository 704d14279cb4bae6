"""Settings of ``loopfree analyze``, importable without torch (the command line reads its defaults here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class AnalysisSetup:
    """How an analysis samples: which prompts, how many images of each, seeds, guidance, batches, device."""

    prompts: str | None = None  # a prompt file (loopfree.training.data.load_prompts); default: the toy world's held-out prompts
    num_prompts: int = 16
    images_per_prompt: int = 4
    seed: int = 0
    guidance: float = 1.0
    batch_size: int = 32  # images per sampler call
    device: str | None = None
    dtype: str = "fp32"

    def settings(self) -> dict[str, Any]:
        return asdict(self)


#: Each analysis' default sampling: teachers are sampled with the paper's guidance 4.5, students without.
FEATURES = AnalysisSetup(guidance=4.5)
NOISE = AnalysisSetup(images_per_prompt=2, guidance=4.5)  # guidance of the teacher's ε; students are sampled unguided
INTERPOLATE = AnalysisSetup()
STEPS = AnalysisSetup(batch_size=16)  # a shared-encoder row decodes N × batch rows at once

FEATURE_STEPS = (1, 2, 4, 8, 15, 25, 50)  # DDIM steps N of the features analysis (paper Fig. 1)
STUDENT_STEPS = (2, 8, 16, 32, 50)  # DDIM steps N of the steps analysis (paper Fig. 10)
METHODS = ("slerp", "lerp")  # text-embedding interpolations
FROM = "a large red circle in the centre of a white image"
TO = "a large blue square in the centre of a white image"
COLUMNS, ROWS = 7, 4  # interpolation weights, x_T rows
