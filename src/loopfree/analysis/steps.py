"""``loopfree analyze steps`` (paper Fig. 10): a one-pass student sampled as it was trained and as a multi-step
DDIM model, from the same prompts and x_T; on a teacher, the training-free encoder propagation (Faster Diffusion)
against its DDIM loop.

    loopfree analyze steps                                        # the bundled student; N = 2, 8, 16, 32, 50
    loopfree analyze steps --model path/to/teacher --guidance 4.5 --steps 50

Rows: the one pass (its recorded decoder timesteps, K = 4 by default), then for every N three DDIM loops that
share the encoder more and more: a full UNet pass per step (``mode="loop"``), encoder propagation with Faster
Diffusion's key steps (``mode="propagate"``) and the encoder once for all N steps (key steps [0]). Columns: the
first image of each of the first prompts. Every row records its sampling time per image (text encoding and
denoising, not the VAE) and, with a quality figure (toy world; ``--clip``: the CLIP score of ``loopfree eval``), its
scores on all the images, also written beside its name. Writes ``steps.png`` and ``steps.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

from loopfree.analysis.common import analysis_latents, per_image, progress, denoise_all, start, to_images, to_pil
from loopfree.analysis.settings import STEPS, STUDENT_STEPS, AnalysisSetup
from loopfree.utils.images import image_grid
from loopfree.utils.outputs import save_image, write_json
from loopfree.method.sampler import default_key_steps
from loopfree.utils.timing import synchronize

GRID_COLUMNS = 6


def settings_rows(pipe, steps: list[int]) -> list[tuple[str, str, object]]:
    """(name, mode, plan) of every row: the one pass, then full-UNet, Faster Diffusion and shared-encoder DDIM for
    each N (Faster Diffusion only where its key steps are not all N steps)."""
    one_pass = pipe.plan_steps("loop_free")
    rows = [(f"one pass, K={one_pass.num_steps}", "loop_free", one_pass)]
    for n in steps:
        rows.append((f"DDIM {n}, full UNet", "loop", pipe.plan_steps("loop", n)))
        keys = default_key_steps(n)
        if 1 < len(keys) < n:
            rows.append((f"DDIM {n}, encoder at {len(keys)} key steps", "propagate", pipe.plan_steps("propagate", n, key_steps=keys)))
        rows.append((f"DDIM {n}, shared encoder", "propagate", pipe.plan_steps("propagate", n, key_steps=[0])))
    return rows


def label(name: str, scores: dict[str, float]) -> str:
    """A row's name and its scores: ``fd 105``, ``alignment 0.797``."""
    return "   ".join([name, *(f"{k} {v:.0f}" if abs(v) >= 100 else f"{k} {v:.3g}" for k, v in scores.items())])


def run_steps(model: str | None = None, steps: list[int] = STUDENT_STEPS, setup: AnalysisSetup = STEPS,
              out: str = "analysis/steps", overwrite: bool = False, clip: str | None = None) -> Path:
    """Sample ``model`` (default: the bundled student) every way and write steps.png/json to ``out``; the folder.
    ``clip``: a local CLIP folder, for every row's ``clip_score``."""
    run = start("steps", model, "student", steps, setup, out, overwrite, clip)
    pipe, image_prompts = run.pipe, per_image(run.prompts, setup)
    x_T = analysis_latents(pipe, len(run.prompts), setup)
    shown = slice(0, GRID_COLUMNS * setup.images_per_prompt, setup.images_per_prompt)
    plans = settings_rows(pipe, run.steps)
    rows, grid, labels = [], [], []
    with run.folder, progress(sum(plan.num_steps for _, _, plan in plans) * len(image_prompts), "steps") as bar:
        for name, mode, plan in plans:
            started = time.perf_counter()
            latents = denoise_all(pipe, mode, plan, setup, image_prompts, x_T, bar)
            synchronize(pipe.device)
            ms = 1000 * (time.perf_counter() - started) / len(image_prompts)
            images = to_images(pipe, latents)
            scores = run.quality(images, image_prompts) if run.quality is not None else {}
            rows.append(dict(name=name, mode=mode, steps=plan.num_steps, timesteps=plan.timesteps, key_steps=plan.key_steps,
                             ms_per_image=ms, **scores))
            grid.append(to_pil(pipe, images[shown]))
            labels.append(label(name, scores))
        save_image(run.folder.path / "steps.png", image_grid(grid, labels, scale=max(1, 96 // grid[0][0].width)))
        write_json(run.folder.path / "steps.json",
                   dict(model=run.model, steps=run.steps, settings=setup.settings(), prompts=run.prompts, clip=run.clip, rows=rows))
    return run.folder.final
