"""Matplotlib figures written as PNGs (object API: no global pyplot state, no display needed)."""

from __future__ import annotations

from pathlib import Path

from loopfree.utils.outputs import write_atomic


def figure(panels: int, height: float = 3.4):
    """A figure with ``panels`` axes side by side; ``(fig, axes)``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4 * panels, height), layout="constrained")
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def save_figure(fig, path: Path) -> None:
    """The figure as a PNG, written atomically."""
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
