"""Images as the package hands them out: float tensors -> PIL images, and contact-sheet grids."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image


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
