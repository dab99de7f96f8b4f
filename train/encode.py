"""`dalle-ar encode`: pre-encode shards with a frozen image tokenizer (dVAE or VQGAN).

Each output sample keeps its key, captions (`txt`) and attributes (`json`) and gains `codes.npy`
(int16 [h, w]), so the prior trains without a dVAE forward pass (as dalle-mini and LlamaGen do).
The images go through the loader's own decode/resize/crop, so the codes equal what the dVAE
gives on the fly for the same sample.
"""

from __future__ import annotations

import logging
import re

import torch

from dalle_ar.data import expand_shards, iter_raw_samples, preprocess_image, write_samples
from dalle_ar.image_tokenizer import load_image_tokenizer

log = logging.getLogger(__name__)


def codes_prefix(shards) -> str:
    """`train-codes` for input shards named `train-000000.tar` ... (whatever pattern, glob or folder named
    them), `NAME-codes` for a single `NAME.tar`."""
    names = re.findall(r"[^\s/:]+\.tar", expand_shards(shards)[0])  # the file name, also inside `pipe:` commands
    m = re.fullmatch(r"(.+?)-?\d*\.tar", names[-1]) if names else None
    stem = re.sub(r"[^A-Za-z0-9_\-]", "_", m.group(1)) if m else "shards"
    return f"{stem}-codes"


def encode_shards(dvae_dir, shards, out, *, batch_size: int = 64, shard_size: int = 5000,
                  keep_images: bool = False, device=None, prefix: str | None = None, overwrite: bool = False) -> dict:
    """Write `out/{prefix}-NNNNNN.tar` code shards (prefix: `codes_prefix(shards)` unless given)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dvae = load_image_tokenizer(dvae_dir).to(device).eval()
    size = dvae.image_size
    skipped: dict[str, int] = {}
    upscaled = [0]  # images smaller than the dVAE's image size on their shorter side

    def encoded():
        pending = []

        def flush():
            x = torch.stack([p[1] for p in pending]).to(device)
            with torch.no_grad():
                codes = dvae.encode(x).to(torch.int16).cpu().numpy()
            for (sample, _), c in zip(pending, codes):
                yield {**sample, "codes": c}
            pending.clear()

        for sample in iter_raw_samples(shards, skipped=skipped):
            image = sample.pop("image")
            if hasattr(image, "size") and min(image.size) < size:
                upscaled[0] += 1
            try:
                tensor = preprocess_image(image, size, random_crop=False)
            except Exception as e:  # noqa: BLE001  (bad bytes: counted, never a crash)
                skipped[f"image: {type(e).__name__}"] = skipped.get(f"image: {type(e).__name__}", 0) + 1
                continue
            if keep_images:
                sample["image"] = image
            pending.append((sample, tensor))
            if len(pending) == batch_size:
                yield from flush()
        if pending:
            yield from flush()

    summary = write_samples(encoded(), out, prefix=prefix or codes_prefix(shards), shard_size=shard_size,
                            source=f"dalle-ar encode {shards}", overwrite=overwrite)
    summary["skipped_on_read"] = skipped
    summary["upscaled"] = upscaled[0]
    if upscaled[0]:
        log.warning("%d images were smaller than the dVAE's image size %d on their shorter side and were upscaled",
                    upscaled[0], size)
    return summary
