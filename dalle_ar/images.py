"""Images as the package hands them out: float tensors -> PIL images, contact-sheet grids, and the
captioned sheet that `dalle-ar generate` and the demo write (`image_sheet`)."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(images: torch.Tensor) -> list:
    """float [B,3,H,W] in [0,1] -> list of RGB PIL images."""
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(rows: Sequence[Sequence[Image.Image]], pad: int = 2) -> Image.Image:
    """Contact sheet: one row per list, images of one size, black padding."""
    rows = [list(r) for r in rows if len(r)]
    if not rows:
        raise ValueError("image_grid: rows is empty")
    w, h = rows[0][0].size
    ncol = max(len(r) for r in rows)
    sheet = Image.new("RGB", (ncol * (w + pad) + pad, len(rows) * (h + pad) + pad))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            sheet.paste(im.convert("RGB").resize((w, h)), (pad + j * (w + pad), pad + i * (h + pad)))
    return sheet


# ---- the captioned sheet ---------------------------------------------------------------------------

@dataclass
class SheetRow:
    """One prompt on the sheet: its images best first, a label under each (e.g. the reranker score)
    and optionally a verdict per image (True / False frame it green / red; None: no frame)."""

    caption: str
    images: list
    labels: list = field(default_factory=list)
    marks: list = field(default_factory=list)


BACKGROUND, INK, FAINT = (248, 248, 246), (25, 25, 25), (105, 105, 105)
PASS, FAIL = (30, 160, 60), (215, 45, 45)


def image_sheet(rows: Sequence[SheetRow], *, scale: int = 2, max_images: int = 8, width: int = 1200,
                max_height: int = 5000, title: Optional[str] = None) -> Image.Image:
    """A sheet a person can read: one panel per prompt (its images in a row, upscaled `scale`x with
    NEAREST so pixels stay sharp; a label under each image; the caption under the row), panels
    flowing left to right within `width` px. At most `max_images` per panel; panels that would
    make the sheet taller than `max_height` are left out and counted in a last line."""
    rows = [r for r in rows if r.images]
    if not rows:
        raise ValueError("image_sheet: no row has images")
    for name, v in (("scale", scale), ("max_images", max_images), ("width", width), ("max_height", max_height)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"image_sheet: {name} must be an integer >= 1, got {v!r}")
    w0, h0 = rows[0].images[0].size
    cw, ch = w0 * scale, h0 * scale
    text_px = max(12, min(18, 6 + 4 * scale))
    font, small = ImageFont.load_default(size=text_px), ImageFont.load_default(size=text_px - 2)
    line = text_px + 4
    margin, gap, frame = 12, 4, scale + 1
    n = min(max_images, max(len(r.images) for r in rows))
    panel_w = n * (cw + 2 * frame) + (n - 1) * gap
    panel_gap = 20
    per_row = max(1, (width - 2 * margin + panel_gap) // (panel_w + panel_gap))
    wrapped = [_wrap(r.caption, font, panel_w) for r in rows]
    caption_lines = max(len(w) for w in wrapped)
    has_labels = any(r.labels for r in rows)
    panel_h = ch + 2 * frame + (line if has_labels else 0) + caption_lines * line + 6
    title_h = line + 8 if title else 0
    fits = max(1, (max_height - 2 * margin - title_h - line) // (panel_h + panel_gap))
    shown = rows[:fits * per_row]
    nrows = math.ceil(len(shown) / per_row)
    cols = min(per_row, len(shown))
    left_out = len(rows) - len(shown)
    sheet_w = 2 * margin + cols * panel_w + (cols - 1) * panel_gap
    sheet_h = 2 * margin + title_h + nrows * panel_h + (nrows - 1) * panel_gap + (line if left_out else 0)
    sheet = Image.new("RGB", (sheet_w, sheet_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((margin, margin), _fit(title, font, sheet_w - 2 * margin), fill=INK, font=font)
    for k, (row, caption) in enumerate(zip(shown, wrapped)):
        x0 = margin + (k % per_row) * (panel_w + panel_gap)
        y0 = margin + title_h + (k // per_row) * (panel_h + panel_gap)
        for j, im in enumerate(row.images[:n]):
            x = x0 + j * (cw + 2 * frame + gap)
            mark = row.marks[j] if j < len(row.marks) else None
            if mark is not None:
                draw.rectangle([x, y0, x + cw + 2 * frame - 1, y0 + ch + 2 * frame - 1], fill=PASS if mark else FAIL)
            sheet.paste(im.convert("RGB").resize((cw, ch), Image.Resampling.NEAREST), (x + frame, y0 + frame))
            if j < len(row.labels):
                label = _fit(str(row.labels[j]), small, cw + 2 * frame)
                lw = draw.textlength(label, font=small)
                draw.text((x + (cw + 2 * frame - lw) / 2, y0 + ch + 2 * frame + 2), label, fill=FAINT, font=small)
        y = y0 + ch + 2 * frame + (line if has_labels else 0) + 2
        for text in caption:
            draw.text((x0, y), text, fill=INK, font=font)
            y += line
    if left_out:
        draw.text((margin, sheet_h - margin - line + 4), f"... and {left_out} more prompts, not shown",
                  fill=FAINT, font=small)
    return sheet


def _fit(text: str, font, width: float) -> str:
    """text, cut with an ellipsis to fit `width` px."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _wrap(text: str, font, width: float, max_lines: int = 3) -> list[str]:
    """Word-wrap `text` to lines of at most `width` px (the last line cut with an ellipsis)."""
    chars = max(4, int(width / max(1.0, font.getlength("x"))))
    lines = textwrap.wrap(text, chars) or [""]
    while any(font.getlength(s) > width for s in lines) and chars > 4:  # proportional font: tighten
        chars -= 1
        lines = textwrap.wrap(text, chars)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [_fit(" ".join(lines[max_lines - 1:]), font, width)]
    return lines
