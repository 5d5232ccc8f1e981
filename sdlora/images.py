"""The pictures sdlora writes: PNG bytes (with A1111's parameters text), plain and labelled grids.

Used by the trainer's samples, its class images and `sdlora generate`.
"""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Equal-sized images row by row, `columns` to a row, on white."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet


def label_height(width: int) -> int:
    """The height of the band above each column that holds its label, growing with the images."""
    return max(20, width // 16)


def _font(text: str, width: int, largest: int):
    """The largest font up to `largest` px in which `text` fits `width`; Pillow's fixed bitmap font
    where it has no scalable one (before 10.1, or built without FreeType)."""
    try:
        for size in range(largest, 5, -1):
            font = ImageFont.load_default(size=size)
            if font.getlength(text) <= width:
                return font
        return font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def labelled_columns(columns: list[list[Image.Image]], labels: list[str]) -> Image.Image:
    """Columns of equal-sized images side by side, each under a white band holding its label."""
    width, height = columns[0][0].size
    band = label_height(width)
    sheet = Image.new("RGB", (width * len(columns), band + height * len(columns[0])), "white")
    margin = band // 5
    for index, (column, label) in enumerate(zip(columns, labels)):
        header = Image.new("RGB", (width, band), "white")  # drawn apart so a long label is cut at its column
        font = _font(label, width - 2 * margin, int(band * 0.6))
        ImageDraw.Draw(header).text((margin, margin), label, fill="black", font=font)
        sheet.paste(header, (index * width, 0))
        for row, image in enumerate(column):
            sheet.paste(image, (index * width, band + row * height))
    return sheet


def png_bytes(image: Image.Image, text: str | None = None) -> bytes:
    """The image as PNG bytes; `text` goes in its "parameters" chunk, where A1111 keeps how it was made."""
    info = PngInfo()
    if text:
        info.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
