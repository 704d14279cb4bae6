"""``loopfree analyze interpolate`` (paper Fig. 9): images along the interpolation between two prompts' text
embeddings, each row from one fixed x_T.

    loopfree analyze interpolate                                  # the bundled student, two toy prompts
    loopfree analyze interpolate --model runs/tiue --from "a photo of a cat" --to "a photo of a dog" --method lerp

Column j has weight w_j = j/(columns-1) on the ``--to`` prompt: ``lerp`` is (1-w)·a + w·b, ``slerp`` the
spherical interpolation of the whole embedding (L·D values) — with the pooled embedding of SDXL interpolated
the same way and its time ids kept. w = 0 and 1 are exactly the two prompts' embeddings, so the end columns
are the prompts' own images. Writes ``interpolate.png`` (the weights above the columns) and ``interpolate.json``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from loopfree.analysis.common import check_model_folders, analysis_latents, load, output_folder, progress, to_images, to_pil
from loopfree.analysis.settings import COLUMNS, FROM, INTERPOLATE, METHODS, ROWS, TO, AnalysisSetup
from loopfree.utils.errors import LoopfreeError
from loopfree.utils.images import image_grid
from loopfree.utils.outputs import save_image, write_json
from loopfree.method.sampler import Conditioning


def lerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """(1-w)·a + w·b."""
    return (1 - w) * a + w * b


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation of ``a`` and ``b`` as whole vectors (lerp where they are nearly parallel)."""
    x, y = a.double().flatten(), b.double().flatten()
    theta = torch.arccos((x @ y / (x.norm() * y.norm())).clamp(-1, 1))
    if theta < 1e-4:
        return lerp(a, b, w)
    mixed = (torch.sin((1 - w) * theta) * x + torch.sin(w * theta) * y) / torch.sin(theta)
    return mixed.reshape(a.shape).to(a.dtype)


def interpolated(cond: Conditioning, weights: list[float], method: str) -> Conditioning:
    """Rows 0 and 1 of ``cond`` (the two prompts) mixed at each weight: one row per weight."""
    mix = slerp if method == "slerp" else lerp
    text = torch.stack([mix(cond.text[0], cond.text[1], w) for w in weights])
    added = None
    if cond.added is not None:
        added = {"text_embeds": torch.stack([mix(cond.added["text_embeds"][0], cond.added["text_embeds"][1], w) for w in weights]),
                 "time_ids": cond.added["time_ids"][:1].expand(len(weights), -1)}
    return Conditioning(text, added)


@torch.no_grad()
def interpolation_latents(pipe, source: str, target: str, weights: list[float], method: str, mode: str, plan,
                          setup: AnalysisSetup, rows: int, bar=None) -> torch.Tensor:
    """x_0 latents (rows, columns, C, h, w): row r from the x_T of image r of one prompt (as ``loopfree generate``
    draws it for the same seed), column j at weights[j]."""
    guide = setup.guidance != 1.0
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    cond, uncond = pipe.encode_conditioning([source, target], None, 1, guide, pipe.device, (size, size))
    mixed = interpolated(cond, weights, method)
    x_T = analysis_latents(pipe, 1, replace(setup, images_per_prompt=rows))
    out = []
    for r in range(rows):
        x = x_T[r : r + 1].expand(len(weights), *x_T.shape[1:])
        negative = uncond.rows(0, 1).repeat(len(weights)) if guide else None
        out.append(pipe.denoise(mode, plan, x, mixed, negative, setup.guidance))
        if bar is not None:
            bar.update(len(weights))
    return torch.stack(out)


def run_interpolate(model: str | None = None, source: str = FROM, target: str = TO, method: str = "slerp", columns: int = COLUMNS,
                    rows: int = ROWS, mode: str = "loop_free", steps: int | None = None, setup: AnalysisSetup = INTERPOLATE,
                    out: str = "analysis/interpolate", overwrite: bool = False) -> Path:
    """Interpolate between ``source`` and ``target`` with ``model`` (default: the bundled student); the folder."""
    from loopfree.toy.assets import bundled

    if not source.strip() or not target.strip():
        raise LoopfreeError("--from and --to must both be non-empty prompts")
    if method not in METHODS:
        raise LoopfreeError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if columns < 2 or rows < 1:
        raise LoopfreeError(f"need at least 2 columns and 1 row, got {columns} and {rows}")
    (model,) = check_model_folders(str(model) if model else str(bundled("student")))
    weights = [j / (columns - 1) for j in range(columns)]
    settings = dict(model=model, source=source, target=target, method=method, weights=weights, mode=mode, steps=steps,
                    **setup.settings())
    folder = output_folder(out, "interpolate", settings, overwrite)
    pipe = load(model, setup)
    plan = pipe.plan_steps(mode, steps)
    with folder, progress(rows * columns, "interpolate", "img") as bar:
        latents = interpolation_latents(pipe, source, target, weights, method, mode, plan, setup, rows, bar)
        images = [to_pil(pipe, to_images(pipe, row)) for row in latents]
        grid = image_grid(images, [f"x_T {r}" for r in range(rows)], [f"w={w:.2f}" for w in weights],
                          f"{method}: w=0 '{source}'  ->  w=1 '{target}'", scale=max(1, 128 // images[0][0].width))
        save_image(folder.path / "interpolate.png", grid)
        write_json(folder.path / "interpolate.json", dict(settings, steps=plan.num_steps, timesteps=plan.timesteps))
    return folder.final
