"""``loopfree analyze steps`` (paper Fig. 10): a one-pass student sampled as it was trained and as a multi-step
DDIM model, from the same prompts and x_T.

    loopfree analyze steps                                        # the bundled student; N = 2, 8, 16, 32, 50
    loopfree analyze steps --model runs/tiue --prompts prompts.txt --steps 2,8,50

Rows: the one pass (its recorded decoder timesteps, K = 4 by default), then for every N a DDIM loop with a full
UNet pass per step (``mode="loop"``) and with the encoder shared by all N steps (``mode="propagate"``, key
steps [0]). Columns: the first image of each of the first prompts. With a quality figure (toy world) every row
is scored on all the images and the score is written beside its name. Writes ``steps.png`` and ``steps.json``.
"""

from __future__ import annotations

from pathlib import Path

from loopfree.analysis.common import initial_latents, per_image, progress, sample, start, to_images, to_pil
from loopfree.analysis.settings import STEPS, STUDENT_STEPS, Sampling
from loopfree.images import image_grid
from loopfree.outputs import save_image, write_json

GRID_COLUMNS = 8


def settings_rows(pipe, steps: list[int]) -> list[tuple[str, str, object]]:
    """(name, mode, plan) of every row: the one pass, then full-UNet and shared-encoder DDIM for each N."""
    one_pass = pipe.plan_steps("loop_free")
    rows = [(f"one pass, K={one_pass.num_steps}", "loop_free", one_pass)]
    for n in steps:
        rows.append((f"DDIM {n}, full UNet", "loop", pipe.plan_steps("loop", n)))
        rows.append((f"DDIM {n}, shared encoder", "propagate", pipe.plan_steps("propagate", n, key_steps=[0])))
    return rows


def run_steps(model: str | None = None, steps: list[int] = STUDENT_STEPS, setup: Sampling = STEPS,
              out: str = "analysis/steps", overwrite: bool = False) -> Path:
    """Sample ``model`` (default: the bundled student) every way and write steps.png/json to ``out``; the folder."""
    run = start("steps", model, "student", steps, setup, out, overwrite)
    pipe, image_prompts = run.pipe, per_image(run.prompts, setup)
    x_T = initial_latents(pipe, len(run.prompts), setup)
    shown = slice(0, GRID_COLUMNS * setup.images_per_prompt, setup.images_per_prompt)
    plans = settings_rows(pipe, run.steps)
    rows, grid, labels = [], [], []
    with run.folder, progress(len(plans) * len(image_prompts), "steps") as bar:
        for name, mode, plan in plans:
            images = to_images(pipe, sample(pipe, mode, plan, setup, image_prompts, x_T, bar))
            scores = run.quality(images, image_prompts) if run.quality is not None else {}
            rows.append(dict(name=name, mode=mode, steps=plan.num_steps, timesteps=plan.timesteps, key_steps=plan.key_steps, **scores))
            grid.append(to_pil(pipe, images[shown]))
            labels.append("   ".join([name, *(f"{k} {v:.3g}" for k, v in scores.items())]))
        save_image(run.folder.path / "steps.png", image_grid(grid, labels, scale=max(1, 96 // grid[0][0].width)))
        write_json(run.folder.path / "steps.json",
                   dict(model=run.model, steps=run.steps, settings=setup.settings(), prompts=run.prompts, rows=rows))
    return run.folder.final
