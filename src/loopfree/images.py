"""Image grids people look at instead of reading numbers."""

from __future__ import annotations

from PIL import Image


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Paste rows of equally sized images into one picture."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (max(len(r) for r in rows) * w, len(rows) * h), "white")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(image.convert("RGB"), (j * w, i * h))
    return grid
