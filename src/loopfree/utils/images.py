"""Image grids people look at instead of reading numbers."""

from __future__ import annotations

from PIL import Image, ImageDraw

LINE = 14  # pixels per line of label text (PIL's default font)


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None, column_labels: list[str] | None = None,
               title: str | None = None, scale: int = 1) -> Image.Image:
    """Paste rows of equally sized images into one picture, each row named on its left if ``labels``, each column
    above it if ``column_labels``, a ``title`` line on top; ``scale`` enlarges the images (pixels kept sharp)."""
    w, h = rows[0][0].width * scale, rows[0][0].height * scale
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    margin = int(max(measure(label) for label in labels)) + 16 if labels else 0
    top = LINE * (bool(title) + bool(column_labels))
    columns = max(len(r) for r in rows)
    width = max(margin + columns * w, int(measure(title)) + 12 if title else 0)
    grid = Image.new("RGB", (width, top + len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((6, 1), title, fill="black")
    for j, label in enumerate(column_labels or []):
        draw.text((margin + j * w + 4, top - LINE + 1), label, fill="black")
    for i, row in enumerate(rows):
        if labels:
            draw.text((6, top + i * h + h // 2 - 6), labels[i], fill="black")
        for j, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((w, h), Image.NEAREST), (margin + j * w, top + i * h))
    return grid
