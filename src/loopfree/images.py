"""Image grids people look at instead of reading numbers."""

from __future__ import annotations

from PIL import Image, ImageDraw


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None) -> Image.Image:
    """Paste rows of equally sized images into one picture, each row named on its left if ``labels``."""
    w, h = rows[0][0].size
    margin = 6 * max(len(label) for label in labels) + 16 if labels else 0
    grid = Image.new("RGB", (margin + max(len(r) for r in rows) * w, len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        if labels:
            draw.text((6, i * h + h // 2 - 6), labels[i], fill="black")
        for j, image in enumerate(row):
            grid.paste(image.convert("RGB"), (margin + j * w, i * h))
    return grid
