"""Learning curves of the demo's students: the ``eval.jsonl`` that distillation writes every ``--eval-every`` steps,
averaged over training seeds (``curves.json``) and drawn against steps (``curves.png``)::

    curves = {"TiUE": seed_curves([Path("students/tiue-seed0/eval.jsonl"), ...])}
    plot_curves(curves, {"teacher 4-step DDIM": {"alignment": 0.94, ...}}, Path("curves.png"))
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loopfree.utils.figures import figure, save_figure

#: What the curves show, with the direction that is better (for the axis label).
CURVE_METRICS = {"alignment": "higher", "fd": "lower", "diversity": "higher", "accuracy": "higher"}


def read_eval_log(path: Path) -> dict[int, dict[str, float]]:
    """Scores by step from one ``eval.jsonl``; a step scored twice (a resumed run) keeps its last record."""
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[int(record["step"])] = record
    return records


def seed_curves(paths: list[Path]) -> dict[str, dict[str, list]]:
    """Per metric, the steps every run scored, and the mean and sample standard deviation over runs there.

    ``accuracy`` is the mean of the per-attribute accuracies (``accuracy_colour``, ``accuracy_shape``, …), which
    are kept too."""
    logs = [read_eval_log(p) for p in paths]
    steps = sorted(set.intersection(*(set(log) for log in logs)))
    if not steps:
        raise ValueError(f"the runs share no scored step: {', '.join(str(p) for p in paths)}")
    first = logs[0][steps[0]]
    attributes = sorted(k for k in first if k.startswith("accuracy_"))
    curves: dict[str, dict[str, list]] = {}
    for metric in ("alignment", "fd", "diversity", "accuracy", *attributes):
        if metric == "accuracy":
            values = np.array([[np.mean([log[s][a] for a in attributes]) for s in steps] for log in logs])
        else:
            values = np.array([[log[s][metric] for s in steps] for log in logs], dtype=float)
        spread = values.std(axis=0, ddof=1) if len(logs) > 1 else np.zeros(len(steps))
        curves[metric] = {"steps": steps, "mean": values.mean(axis=0).tolist(), "std": spread.tolist()}
    return curves


def plot_curves(curves: dict[str, dict[str, dict[str, list]]], references: dict[str, dict[str, float]], path: Path) -> None:
    """One panel per metric of :data:`CURVE_METRICS`: each student's mean with a band of ± one spread, and the
    ``references`` (teacher rows) as dashed horizontal lines."""
    fig, axes = figure(len(CURVE_METRICS), height=3.6)
    colours = [f"C{i}" for i in range(10)]
    for ax, (metric, better) in zip(axes, CURVE_METRICS.items()):
        for colour, (name, curve) in zip(colours, curves.items()):
            steps, mean, std = (np.array(curve[metric][k]) for k in ("steps", "mean", "std"))
            ax.plot(steps, mean, marker="o", ms=3, color=colour, label=name)
            ax.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.2)
        for style, (name, scores) in zip(("--", ":", "-."), references.items()):
            if metric in scores:
                ax.axhline(scores[metric], color="black", linestyle=style, linewidth=1, label=name)
        if metric == "fd":  # early steps are orders of magnitude off
            ax.set_yscale("log")
        ax.set_title(f"{metric} ({better} is better)")
        ax.set_xlabel("distillation step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)
