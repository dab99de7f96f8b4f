"""The built-in `digits` set: scikit-learn's 1797 real 8x8 handwritten digit scans at 64x64.

Real scans (not drawings), bundled with scikit-learn, so nothing downloads. Every 5th scan is
validation. Images are upscaled smoothly (bicubic), then contrast-stretched so strokes are white
on black. Each sample has several captions ("a handwritten digit 7", "the number seven", ...).
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image

from .writers import write_samples

SIZE = 64
MARGIN = 6  # black border, so strokes do not touch the frame
VAL_EVERY = 5
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten digit {d}", "the number {w}", "a handwritten {w}", "the digit {d} written by hand")


def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """(images float [1797, 8, 8] in [0, 16], labels int [1797]) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits set needs scikit-learn: pip install dalle-ar[digits] "
                          "(or pip install scikit-learn)") from e
    data = load_digits()
    return data.images, data.target


def upscale(scan: np.ndarray) -> Image.Image:
    """8x8 scan in [0, 16] -> 64x64 RGB: bicubic upscaling, a contrast stretch, a black margin."""
    small = Image.fromarray((scan * (255.0 / 16.0)).astype(np.uint8), "L")
    inner = SIZE - 2 * MARGIN
    big = np.asarray(small.resize((inner, inner), Image.Resampling.BICUBIC), np.float32)
    big = np.clip((big - 40.0) * 1.6, 0, 255).astype(np.uint8)  # crisper strokes, black background
    canvas = Image.new("L", (SIZE, SIZE))
    canvas.paste(Image.fromarray(big, "L"), (MARGIN, MARGIN))
    return canvas.convert("RGB")


def captions(digit: int) -> list[str]:
    return [t.format(d=digit, w=WORDS[digit]) for t in TEMPLATES]


def val_captions(n: int, seed: int = 0) -> list[str]:
    """n canonical prompts cycling over the ten classes (class order shuffled by seed)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    order = list(range(10))
    random.Random(seed).shuffle(order)
    return [TEMPLATES[0].format(d=order[i % 10]) for i in range(n)]


def generate_digits(out, seed: int = 0, shard_size: int = 500) -> dict:
    """Write digits-train-*.tar (1437 scans) and digits-val-*.tar (360) into `out`.

    The split is fixed (every 5th scan is validation); the seed only orders the samples.
    """
    images, labels = load_scans()
    summary = {"seed": seed}
    for split in ("train", "val"):
        index = [i for i in range(len(labels)) if (i % VAL_EVERY == 0) == (split == "val")]
        random.Random(f"{seed}:{split}").shuffle(index)

        def samples():
            for i in index:
                buf = io.BytesIO()
                upscale(images[i]).save(buf, format="PNG")
                d = int(labels[i])
                yield {"key": f"{split}_{i:05d}", "image": buf.getvalue(), "captions": captions(d),
                       "json": {"digit": d, "index": i}}

        summary[split] = write_samples(samples(), out, prefix=f"digits-{split}", shard_size=shard_size)
    return summary
