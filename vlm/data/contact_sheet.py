"""Contact sheets: a grid of sample images with their captions, for MLflow galleries."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont, ImageOps


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def contact_sheet(samples: list[tuple], *, cols: int = 6, tile: int = 160, caption_lines: int = 3) -> Image.Image:
    """Lay out `(image, caption[, label])` tuples in a grid; captions wrap under each tile."""
    font = _font(11)
    line_h = 13
    rows = (len(samples) + cols - 1) // cols
    cell_h = tile + 6 + line_h * (caption_lines + 1)
    sheet = Image.new("RGB", (cols * (tile + 8) + 8, rows * cell_h + 8), "white")
    draw = ImageDraw.Draw(sheet)
    chars = max(8, tile // 6)
    for i, sample in enumerate(samples):
        image, caption = sample[0], sample[1]
        label = sample[2] if len(sample) > 2 else None
        x = 8 + (i % cols) * (tile + 8)
        y = 8 + (i // cols) * cell_h
        thumb = ImageOps.contain(image.convert("RGB"), (tile, tile))  # up- or downscaled to fit
        sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        draw.rectangle((x - 1, y - 1, x + tile, y + tile), outline=(210, 210, 210))
        text_y = y + tile + 4
        if label is not None:
            draw.text((x, text_y), str(label), fill=(120, 120, 120), font=font)
            text_y += line_h
        for line in textwrap.wrap(caption or "", chars)[:caption_lines]:
            draw.text((x, text_y), line, fill=(0, 0, 0), font=font)
            text_y += line_h
    return sheet
