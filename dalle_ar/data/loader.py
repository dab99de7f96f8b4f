"""Batches from WebDataset shards: split by rank and worker, shuffled, reproducible, robust.

    shard list -> shuffle shards (seed, epoch) -> split by node -> split by worker -> read tars
      -> decode + crop + pick a caption + encode text -> shuffle buffer -> batch  (all in the workers)

Every (seed, epoch, rank, worker) gives one fixed order. Without `resampled`, each sample is read
exactly once per epoch over all ranks x workers; with it, shards are drawn with replacement and
an epoch is `epoch_samples` samples per rank (equal steps on every rank). Bad samples and shards
are skipped and counted; the workers ship their counts inside the batches, and `loader.skipped`
adds them up.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.utils import pytorch_worker_info

from .shards import (BadSample, CountingHandler, count, decode_captions, decode_codes, decode_image,
                     expand_shards, image_bytes, tar_samples, to_rgb)

log = logging.getLogger(__name__)

SKIPS = "__skipped__"  # private batch key carrying a worker's new skip counts to the main process


def preprocess_image(image, size: int, random_crop: bool = False, rng: random.Random | None = None) -> torch.Tensor:
    """PIL image (any mode) or encoded bytes -> float [3, size, size] in [0, 1]:
    shorter side resized to `size`, then a centre (or random) square crop."""
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    image = to_rgb(image)
    w, h = image.size
    if min(w, h) != size:  # already-right images (the shapes set) stay pixel-exact
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    if random_crop:
        rng = rng or random
        left, top = rng.randint(0, w - size), rng.randint(0, h - size)
    else:
        left, top = (w - size) // 2, (h - size) // 2
    if (w, h) != (size, size):
        image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _collate(samples: list[dict]) -> dict:
    batch = {"key": [s["key"] for s in samples], "caption": [s["caption"] for s in samples]}
    for name in ("image", "text", "codes"):
        if all(name in s for s in samples):
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


class _ShardStream(torch.utils.data.IterableDataset):
    """The per-worker pipeline. Rebuilt at each iteration, so `epoch` set in the main process
    reaches fresh workers through pickling."""

    def __init__(self, urls, opts: dict):
        super().__init__()
        self.urls, self.o, self.epoch = urls, opts, 0

    def _shard_urls(self, rank, world, worker, workers):
        """(urls this worker reads, sample filter or None). Shards are split when there are enough
        of them; otherwise every worker reads all shards and keeps every n-th sample."""
        o = self.o
        urls = list(self.urls)
        if o["resampled"]:
            rng = random.Random(f"shards:{o['seed']}:{self.epoch}:{rank}:{worker}")
            return (urls[rng.randrange(len(urls))] for _ in itertools.count()), None  # endless draws
        if o["shardshuffle"]:  # same permutation on every rank and worker, so the split stays disjoint
            random.Random(f"shards:{o['seed']}:{self.epoch}").shuffle(urls)
        if len(urls) >= world * workers:
            # wds.split_by_node / split_by_worker read the rank and worker themselves
            return list(wds.split_by_worker(wds.split_by_node(urls))), None
        return urls, (rank * workers + worker, world * workers)

    def _decode(self, raw: dict, rng: random.Random) -> dict:
        o = self.o
        captions = decode_captions(raw.get("txt"))
        sample = {"key": raw["__key__"], "caption": rng.choice(captions)}
        if o["decode_images"]:
            data = image_bytes(raw)
            if data is None:
                raise BadSample("image: missing")
            image = decode_image(data)
            try:
                sample["image"] = preprocess_image(image, o["image_size"], o["random_crop"], rng)
            except Exception as e:  # noqa: BLE001  (odd sizes/modes: a bad sample, never a crash)
                raise BadSample("image: unreadable") from e
        if "codes.npy" in raw:
            sample["codes"] = torch.from_numpy(decode_codes(raw["codes.npy"]).astype(np.int64))
        if o["text_encoder"] is not None:
            text = torch.as_tensor(o["text_encoder"](sample["caption"]), dtype=torch.long)
            sample["text"] = text[0] if text.dim() == 2 and text.shape[0] == 1 else text
        return sample

    def _quota(self, worker, workers):
        """Samples this worker yields this epoch (None = all): whole batches dealt round-robin, so
        the rank's total is exactly epoch_samples (less a dropped last partial batch)."""
        n, b = self.o["epoch_samples"], self.o["batch_size"]
        if n is None:
            return None
        sizes = [b] * (n // b) + ([n % b] if n % b and not self.o["drop_last"] else [])
        return sum(sizes[worker::workers])

    def __iter__(self) -> Iterator[dict]:
        o = self.o
        rank, world, worker, workers = pytorch_worker_info()  # RANK/WORLD_SIZE env or torch.distributed
        urls, sample_split = self._shard_urls(rank, world, worker, workers)
        skipped: dict[str, int] = {}  # this worker's counts this epoch
        shipped: dict[str, int] = {}  # the part already sent to the main process
        # in sample-split mode every worker reads every shard: let one of them count shard errors
        handler = CountingHandler(skipped, enabled=sample_split is None or sample_split[0] == 0)
        rng = random.Random(f"samples:{o['seed']}:{self.epoch}:{rank}:{worker}")
        quota = self._quota(worker, workers)
        dry = {"shards": 0}  # shards opened since the last good sample

        def watched(urls):
            for url in urls:
                dry["shards"] += 1
                if o["resampled"] and dry["shards"] > 50 + 10 * len(self.urls):  # endless draws, nothing good
                    log.error("resampled loader: %d shards in a row gave no good sample; stopping", dry["shards"])
                    return
                yield url

        def decoded():
            for i, raw in enumerate(tar_samples(watched(urls), handler)):
                if sample_split and i % sample_split[1] != sample_split[0]:
                    continue
                try:
                    sample = self._decode(raw, rng)
                except BadSample as e:
                    count(skipped, e.args[0], f"{raw.get('__url__')}: {raw.get('__key__')}")
                    continue
                dry["shards"] = 0
                yield sample

        def new_skips() -> dict:
            delta = {k: v - shipped.get(k, 0) for k, v in skipped.items() if v != shipped.get(k, 0)}
            shipped.update(skipped)
            return delta

        stream = decoded()
        if o["shuffle_buffer"] > 1:
            stream = wds.shuffle(o["shuffle_buffer"], min(100, o["shuffle_buffer"]), rng=rng)(stream)
        batch, sent = [], 0
        for sample in stream:
            if quota is not None and sent >= quota:
                break
            batch.append(sample)
            sent += 1
            if len(batch) == o["batch_size"]:
                yield {**_collate(batch), SKIPS: new_skips()}
                batch = []
        if batch and not o["drop_last"]:
            yield {**_collate(batch), SKIPS: new_skips()}
        if delta := new_skips():  # counts that came after the last batch
            yield {SKIPS: delta}


class ShardLoader:
    """Iterable of dict batches from WebDataset shards (see the module docstring).

    Each batch: "key" list[str], "caption" list[str] (one caption picked per sample), "image" float
    [B,3,S,S] in [0,1] (if decode_images), "text" Long [B,T] (if text_encoder), "codes" Long
    [B,h,w] (if the shards carry codes.npy). `text_encoder` must be picklable when num_workers > 0.
    """

    def __init__(self, shards, *, batch_size: int, image_size: int = 64, decode_images: bool = True,
                 text_encoder: Callable | None = None, num_workers: int = 0, shuffle_buffer: int = 1000,
                 shardshuffle: bool = True, seed: int = 0, resampled: bool = False,
                 epoch_samples: int | None = None, random_crop: bool = False, drop_last: bool = True):
        for name, value, low in (("batch_size", batch_size, 1), ("image_size", image_size, 1),
                                 ("num_workers", num_workers, 0), ("shuffle_buffer", shuffle_buffer, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if epoch_samples is not None and epoch_samples < 1:
            raise ValueError(f"epoch_samples must be >= 1 or None, got {epoch_samples}")
        self.urls = expand_shards(shards)
        self.num_workers = num_workers
        self.dataset = _ShardStream(self.urls, dict(
            batch_size=batch_size, image_size=image_size, decode_images=decode_images, text_encoder=text_encoder,
            shuffle_buffer=shuffle_buffer, shardshuffle=bool(shardshuffle), seed=seed, resampled=resampled,
            epoch_samples=epoch_samples, random_crop=random_crop, drop_last=drop_last))
        self._skipped: dict[str, int] = {}

    @property
    def skipped(self) -> dict[str, int]:
        """Samples/shards skipped so far (reason -> count), over all workers and epochs."""
        return dict(self._skipped)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict]:
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers)
        before = sum(self._skipped.values())
        for batch in loader:
            for reason, n in batch.pop(SKIPS, {}).items():
                self._skipped[reason] = self._skipped.get(reason, 0) + n
            if "key" in batch:
                yield batch
        new = sum(self._skipped.values()) - before
        if new:
            log.warning("epoch %d: skipped %d bad samples/shards; totals so far: %s",
                        self.dataset.epoch, new, self._skipped)
