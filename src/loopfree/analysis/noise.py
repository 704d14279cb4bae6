"""``loopfree analyze noise`` (paper Fig. 8, right): the distribution of students' decoder noise predictions
against the teacher's ε at the same timesteps and against N(0, 1).

    loopfree analyze noise                                     # the bundled TiUE student
    loopfree analyze noise --model demo/students/tiue-no-kl-seed0 --model demo/students/tiue-seed0

Each student samples every prompt's images in one pass (its recorded decoder timesteps, no guidance) and gives
K·B noise predictions ε^k_b; the teacher runs a DDIM loop through the same timesteps from the same x_T (with
``--guidance``, as it is sampled) and gives its ε at each. Per model: a histogram of all values with the
Gaussian fitted to them, μ, σ, skew, excess kurtosis, and the KL term of the trainer (per item, averaged: the
trainer's default sums it over the K·B items of a device, i.e. K·B times this). Writes ``noise.png`` and
``noise.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from loopfree.analysis.common import (
    batches, check_model_folders, conditioning, analysis_latents, load, output_folder, per_image, progress, prompt_list,
)
from loopfree.utils.figures import figure, save_figure
from loopfree.analysis.settings import NOISE, AnalysisSetup
from loopfree.method.objective import kl_loss
from loopfree.utils.outputs import write_json
from loopfree.method.sampler import loop_free, propagate
from loopfree.method.schedule import NoiseSchedule

HISTOGRAM_RANGE = (-5.0, 5.0)
BINS = 200


def moments(values: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation, skew and excess kurtosis of all ``values`` (population moments, as
    ``scipy.stats.skew``/``kurtosis`` compute them by default)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    centred = x - x.mean()
    m2, m3, m4 = (np.mean(centred**p) for p in (2, 3, 4))
    return dict(mean=float(x.mean()), std=float(np.sqrt(m2)), skew=float(m3 / m2**1.5), excess_kurtosis=float(m4 / m2**2 - 3))


def statistics(eps: torch.Tensor) -> dict[str, float]:
    """:func:`moments` of the noise predictions (K, B, C, H, W) and the trainer's KL term per item (mean over K·B)."""
    return dict(moments(eps.double().cpu().numpy()), kl_per_item=float(kl_loss(eps.flatten(0, 1), reduction="mean")),
                items=eps.shape[0] * eps.shape[1])


@torch.no_grad()
def student_eps(pipe, setup: AnalysisSetup, prompts: list[str], x_T: torch.Tensor, bar=None) -> tuple[torch.Tensor, list[int]]:
    """The student's K·B decoder noise predictions (K, B, C, H, W) in one pass each, and its decoder timesteps."""
    plan = pipe.plan_steps("loop_free")
    schedule = NoiseSchedule.from_scheduler(pipe.scheduler, plan.final_alpha_cumprod)
    out = [loop_free(pipe.unet, schedule, x, plan.timesteps, conditioning(pipe, chunk, 1.0)[0])[1]
           for chunk, x in batches(prompts, x_T, setup, bar)]
    return torch.cat(out, dim=1), plan.timesteps


@torch.no_grad()
def teacher_eps(pipe, timesteps: list[int], setup: AnalysisSetup, prompts: list[str], x_T: torch.Tensor, bar=None) -> torch.Tensor:
    """The teacher's ε (K, B, C, H, W) at ``timesteps`` along its own DDIM loop through them (guided by ``setup``)."""
    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    out = []
    for chunk, x in batches(prompts, x_T, setup, bar):
        steps: list[torch.Tensor] = []
        propagate(pipe.unet, schedule, x, timesteps, list(range(len(timesteps))), *conditioning(pipe, chunk, setup.guidance),
                  setup.guidance, callback=lambda i, eps: steps.append(eps))
        out.append(torch.stack(steps))
    return torch.cat(out, dim=1)


def plot(rows: list[dict], histograms: list[np.ndarray]):
    """Step histograms (density) of every model's values, each with its fitted Gaussian dashed, and N(0, 1)."""
    fig, (ax,) = figure(1, height=4.2)
    fig.set_figwidth(10.5)
    edges = np.linspace(*HISTOGRAM_RANGE, BINS + 1)
    x = np.linspace(*HISTOGRAM_RANGE, 400)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"]
    for i, (row, density) in enumerate(zip(rows, histograms)):
        colour = "tab:gray" if row["role"] == "teacher" else colours[i % len(colours)]
        ax.stairs(density, edges, color=colour, label=f"{row['name']}  (σ {row['std']:.2f}, kurt {row['excess_kurtosis']:+.2f})")
        fitted = np.exp(-0.5 * ((x - row["mean"]) / row["std"]) ** 2) / (row["std"] * np.sqrt(2 * np.pi))
        ax.plot(x, fitted, "--", color=colour, linewidth=1)
    ax.plot(x, np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi), color="black", linewidth=1.5, label="N(0, 1)")
    ax.set_xlabel("predicted noise value")
    ax.set_ylabel("density")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    ax.set_title("decoder noise predictions (dashed: fitted Gaussian)")
    return fig


def _row(name: str, role: str, path: str, timesteps: list[int], eps: torch.Tensor) -> tuple[dict, np.ndarray]:
    values = eps.double().cpu().numpy().ravel()
    density, _ = np.histogram(values, bins=BINS, range=HISTOGRAM_RANGE)
    density = density / (values.size * (HISTOGRAM_RANGE[1] - HISTOGRAM_RANGE[0]) / BINS)
    outside = float(np.mean((values < HISTOGRAM_RANGE[0]) | (values > HISTOGRAM_RANGE[1])))
    return dict(name=name, role=role, model=path, timesteps=timesteps, **statistics(eps), outside_plot=outside), density


def run_noise(models: list[str] | None = None, teacher: str | None = None, setup: AnalysisSetup = NOISE,
              out: str = "analysis/noise", overwrite: bool = False) -> Path:
    """Compare the noise predictions of ``models`` (default: the bundled student) with ``teacher``'s (default: the
    bundled teacher) and N(0, 1); writes noise.png/json to ``out``; the folder."""
    from loopfree.toy.assets import bundled

    models = check_model_folders(*(models or [str(bundled("student"))]))
    (teacher,) = check_model_folders(str(teacher) if teacher else str(bundled("teacher")))
    prompts = prompt_list(setup)
    image_prompts = per_image(prompts, setup)
    folder = output_folder(out, "noise", dict(models=models, teacher=teacher, **setup.settings()), overwrite)
    names = [Path(m).name if [Path(n).name for n in models].count(Path(m).name) == 1 else m for m in models]
    rows, histograms, teacher_rows = [], [], {}
    with folder, progress(2 * len(models) * len(image_prompts), "noise", "img") as bar:
        teacher_pipe = load(teacher, setup)
        x_T = analysis_latents(teacher_pipe, len(prompts), setup)
        for name, model in zip(names, models):
            eps, timesteps = student_eps(load(model, setup), setup, image_prompts, x_T, bar)
            row, density = _row(name, "student", model, timesteps, eps)
            rows.append(row)
            histograms.append(density)
            if tuple(timesteps) not in teacher_rows:
                teacher_rows[tuple(timesteps)] = _row(f"teacher ε (guidance {setup.guidance:g}) at τ={timesteps}", "teacher", teacher, timesteps,
                                                      teacher_eps(teacher_pipe, timesteps, setup, image_prompts, x_T, bar))
            else:
                bar.update(len(image_prompts))
        for row, density in teacher_rows.values():
            rows.append(row)
            histograms.append(density)
        save_figure(plot(rows, histograms), folder.path / "noise.png")
        write_json(folder.path / "noise.json", dict(rows=rows, settings=setup.settings(), prompts=prompts,
                                                     reference=dict(name="N(0, 1)", mean=0.0, std=1.0, skew=0.0, excess_kurtosis=0.0)))
    return folder.final
