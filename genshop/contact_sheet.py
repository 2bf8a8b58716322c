"""A contact sheet: one labelled block of thumbnails per brief under a legend, saved as PNG.

Thumbnails wrap at as many columns as the shortest row has images (at most
``MAX_COLUMNS``), so a sheet of 8-, 4- and 4-variant briefs is three full-width blocks
rather than two half-empty rows.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

THUMB_HEIGHT = 128
LABEL_WIDTH = 260
PAD = 6
MAX_COLUMNS = 8
LINE_HEIGHT = 14


def make_contact_sheet(rows: list[tuple[str, list[Image.Image]]], captions: list[list[str]] | None = None,
                       legend: str | None = None) -> Image.Image:
    """Lay out ``rows`` of (label, images) under ``legend``; small images are scaled up (nearest) to THUMB_HEIGHT."""
    font = ImageFont.load_default()
    caption_h = LINE_HEIGHT if captions else 0
    thumbs = [[image.convert("RGB").resize((max(1, round(image.width * THUMB_HEIGHT / image.height)), THUMB_HEIGHT),
                                           Image.NEAREST) for image in images] for _label, images in rows]
    columns = min(min((len(row) for row in thumbs if row), default=1), MAX_COLUMNS)
    cell_w = max((t.width for row in thumbs for t in row), default=0) + PAD
    cell_h = THUMB_HEIGHT + caption_h + PAD
    width = LABEL_WIDTH + columns * cell_w + PAD
    legend_text = _wrap(legend, (width - 2 * PAD) // 6) if legend else ""  # the default font is about 6 px a character
    top = PAD + (legend_text.count("\n") + 1) * LINE_HEIGHT + PAD if legend else PAD
    heights = [max(1, -(-len(row) // columns)) * cell_h for row in thumbs]
    sheet = Image.new("RGB", (width, top + sum(heights) + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    if legend:
        draw.multiline_text((PAD, PAD), legend_text, fill="black", font=font)
    y = top
    for r, ((label, _), row) in enumerate(zip(rows, thumbs)):
        draw.multiline_text((PAD, y + 4), _wrap(label, 38), fill="black", font=font)
        for c, thumb in enumerate(row):
            x, cy = LABEL_WIDTH + (c % columns) * cell_w, y + (c // columns) * cell_h
            sheet.paste(thumb, (x, cy))
            if captions:
                draw.text((x, cy + THUMB_HEIGHT + 1), captions[r][c][:24], fill="dimgray", font=font)
        y += heights[r]
    return sheet


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:8])


def save_contact_sheet(rows: list[tuple[str, list[Image.Image]]], path: str | Path,
                       captions: list[list[str]] | None = None, legend: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_contact_sheet(rows, captions, legend).save(path)
    return path
