"""A contact sheet: one labelled row of thumbnails per brief, saved as PNG."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

THUMB_HEIGHT = 128
LABEL_WIDTH = 260
PAD = 6


def make_contact_sheet(rows: list[tuple[str, list[Image.Image]]], captions: list[list[str]] | None = None) -> Image.Image:
    """Lay out ``rows`` of (label, images); small images are scaled up (nearest) to THUMB_HEIGHT."""
    font = ImageFont.load_default()
    caption_h = 14 if captions else 0
    thumbs = []
    for _label, images in rows:
        scaled = []
        for image in images:
            width = max(1, round(image.width * THUMB_HEIGHT / image.height))
            scaled.append(image.convert("RGB").resize((width, THUMB_HEIGHT), Image.NEAREST))
        thumbs.append(scaled)
    row_width = max((sum(t.width + PAD for t in row) for row in thumbs), default=0)
    sheet = Image.new("RGB", (LABEL_WIDTH + row_width + PAD, len(rows) * (THUMB_HEIGHT + caption_h + PAD) + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    y = PAD
    for r, ((label, _), row) in enumerate(zip(rows, thumbs)):
        draw.multiline_text((PAD, y + 4), _wrap(label, 38), fill="black", font=font)
        x = LABEL_WIDTH
        for c, thumb in enumerate(row):
            sheet.paste(thumb, (x, y))
            if captions:
                draw.text((x, y + THUMB_HEIGHT + 1), captions[r][c][:24], fill="dimgray", font=font)
            x += thumb.width + PAD
        y += THUMB_HEIGHT + caption_h + PAD
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
                       captions: list[list[str]] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_contact_sheet(rows, captions).save(path)
    return path
