"""Image grids people look at instead of reading numbers."""

from __future__ import annotations

from PIL import Image, ImageDraw


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None, label_width: int = 0) -> Image.Image:
    """Paste rows of equally sized images into one picture, with an optional text label left of each row."""
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_width + cols * w, len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        if labels is not None:
            draw.text((4, i * h + h // 2 - 5), labels[i], fill="black")
        for j, image in enumerate(row):
            grid.paste(image.convert("RGB"), (label_width + j * w, i * h))
    return grid
