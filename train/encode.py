"""`dalle-ar encode`: pre-encode shards with a frozen image tokenizer (dVAE or VQGAN).

Each output sample keeps its key, captions (`txt`) and attributes (`json`) and gains `codes.npy`
(int16 [h, w]), so the prior trains without a dVAE forward pass (as dalle-mini and LlamaGen do).
The images go through the loader's own decode/resize/crop, so the codes equal what the dVAE
gives on the fly for the same sample.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dalle_ar.data import iter_raw_samples, preprocess_image, write_samples
from dalle_ar.image_tokenizer import load_image_tokenizer

log = logging.getLogger(__name__)


def encode_shards(dvae_dir, shards, out, *, batch_size: int = 64, shard_size: int = 5000,
                  keep_images: bool = False, device=None, prefix: str | None = None) -> dict:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dvae = load_image_tokenizer(dvae_dir).to(device).eval()
    size = dvae.image_size
    skipped: dict[str, int] = {}

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

    name = prefix or Path(str(shards if isinstance(shards, str) else shards[0])).name.split("-")[0] + "-codes"
    summary = write_samples(encoded(), out, prefix=name, shard_size=shard_size)
    summary["skipped_on_read"] = skipped
    return summary
