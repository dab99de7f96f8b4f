"""WebDataset shards: naming them and reading raw samples back (the one tar reader; writers: writers.py).

A sample is a group of tar members sharing a key:

    000042.png         the image (or .jpg)           optional when codes.npy is there
    000042.txt         UTF-8 captions, one per line   required
    000042.json        attributes                     optional
    000042.codes.npy   int16/int32 [h, w] dVAE codes  optional (written by `dalle-ar encode`)

Bad data never crashes a reader and is never silent: every skipped sample or shard is counted
under a short reason ("image: unreadable", "shard: truncated or corrupt", ...).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
from typing import Iterable, Iterator

import braceexpand
import numpy as np
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys, url_opener

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# ---- shard lists --------------------------------------------------------------------------------

def expand_shards(shards) -> list[str]:
    """Shard paths/URLs from a brace pattern ("d/x-{000000..000009}.tar"), a glob, a directory
    (its *.tar files), a `pipe:` URL, or a list of any of these."""
    if isinstance(shards, (str, os.PathLike)):
        s = str(shards)
        if s.startswith("pipe:"):
            return list(braceexpand.braceexpand(s))
        if os.path.isdir(s):
            out = sorted(glob.glob(os.path.join(s, "*.tar")))
        elif any(c in s for c in "*?["):
            out = sorted(glob.glob(s))
        else:
            out = list(braceexpand.braceexpand(s))
    elif isinstance(shards, Iterable):
        out = [u for item in shards for u in expand_shards(item)]
    else:
        raise ValueError(f"shards must be a path, pattern or list of them, got {type(shards).__name__}")
    if not out:
        raise ValueError(f"shards: nothing matches {shards!r}")
    return out


# ---- counting what is skipped ---------------------------------------------------------------------

def count(skipped: dict | None, reason: str, detail: str = "") -> None:
    """Add one to skipped[reason]; warn the first time a reason shows up in this dict."""
    if skipped is None:
        return
    if reason not in skipped:
        log.warning("skipping bad data (%s)%s; further ones are only counted", reason,
                    f": {detail}" if detail else "")
    skipped[reason] = skipped.get(reason, 0) + 1


def tar_error_reason(exn: BaseException) -> str:
    """A short reason for an exception raised while opening or reading a tar."""
    if isinstance(exn, (tarfile.TarError, EOFError)) or "truncat" in str(exn).lower():
        return "shard: truncated or corrupt"
    if isinstance(exn, OSError):
        return "shard: missing or unreadable"
    if isinstance(exn, ValueError) and "duplicate" in str(exn):
        return "shard: duplicate file name"
    return f"shard: {type(exn).__name__}"


class CountingHandler:
    """A webdataset exception handler that counts the error by reason and carries on."""

    def __init__(self, skipped: dict | None, enabled: bool = True):
        self.skipped, self.enabled = skipped, enabled

    def __call__(self, exn: BaseException) -> bool:
        if self.enabled:
            count(self.skipped, tar_error_reason(exn), repr(exn)[:200])
        return True  # continue with the next member/shard


def _tar_members(sources: Iterable[dict], handler) -> Iterator[dict]:
    """Tar members ({"fname", "data", "__url__"}) of opened shards, then {} at each shard's end.

    Replaces webdataset's tar_file_expander for one reason: tarfile silently ends a stream that
    stops at a member boundary, so a truncated shard would lose its tail unnoticed. Here a shard
    must end with its end-of-archive block; if it does not, or reading fails, the incomplete
    last sample is dropped and the error goes to `handler` (which counts it).
    """
    for source in sources:
        url, pending = source["url"], []
        try:
            tar = tarfile.open(fileobj=source["stream"], mode="r|*")
            for info in tar:
                if info.isreg():
                    member = {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
                    if pending and base_plus_ext(info.name)[0] != base_plus_ext(pending[0]["fname"])[0]:
                        yield from pending  # the previous sample is complete
                        pending = []
                    pending.append(member)
                tar.members = []  # stream mode: keep memory flat
            if tar.fileobj.tell() - tar.offset < tarfile.BLOCKSIZE:
                raise tarfile.ReadError("truncated tar: no end-of-archive block")
            yield from pending
        except Exception as exn:  # noqa: BLE001  (handler decides; ours counts and carries on)
            exn.args = exn.args + (url,)
            if not handler(exn):
                return
        finally:
            source["stream"].close()
        yield {}  # shard boundary: samples never merge across shards


def tar_samples(urls: Iterable[str], handler) -> Iterator[dict]:
    """Raw webdataset samples ({"__key__", "__url__", ext: bytes}) from shard URLs, in order."""
    streams = url_opener((dict(url=u) for u in urls), handler=handler)
    return group_by_keys(_tar_members(streams, handler), handler=handler)


# ---- decoding one sample ------------------------------------------------------------------------

class BadSample(Exception):
    """A sample to skip; args[0] is the reason it is counted under."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as RGB: alpha composited on white, 16-bit/float greys rescaled, CMYK converted."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") else max(float(a.max()), 1.0)
        image = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB PIL image, fully loaded (so truncated files fail here, not later)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return to_rgb(image)
    except Exception as e:  # noqa: BLE001  (PIL raises many types for bad bytes)
        raise BadSample("image: unreadable") from e


def decode_captions(data: bytes | None) -> list[str]:
    """`txt` bytes -> non-empty stripped lines."""
    if data is None:
        raise BadSample("caption: missing")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("caption: not utf-8") from e
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise BadSample("caption: empty")
    return captions


def decode_codes(data: bytes) -> np.ndarray:
    try:
        codes = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise BadSample("codes: unreadable") from e
    if codes.ndim != 2 or codes.dtype.kind not in "iu":
        raise BadSample("codes: not a 2-d integer array")
    return codes


def image_bytes(sample: dict) -> bytes | None:
    return next((sample[k] for k in IMAGE_KEYS if k in sample), None)


def iter_raw_samples(shards, *, skipped: dict | None = None, decode_images: bool = True) -> Iterator[dict]:
    """Every good sample of `shards`, in order, as {"key", "image", "captions", "json", "codes"}.

    "image" is an RGB PIL image (encoded bytes if not decode_images; None when the sample has
    none), "json" a dict or None, "codes" an int array or None. Bad samples and shards are skipped
    and counted in `skipped` (reason -> count).
    """
    handler = CountingHandler(skipped)
    for raw in tar_samples(expand_shards(shards), handler):
        try:
            data = image_bytes(raw)
            sample = {"key": raw["__key__"], "captions": decode_captions(raw.get("txt")), "json": None,
                      "codes": decode_codes(raw["codes.npy"]) if "codes.npy" in raw else None,
                      "image": decode_image(data) if decode_images and data is not None else data}
            if "json" in raw:
                try:
                    sample["json"] = json.loads(raw["json"])
                except ValueError as e:
                    raise BadSample("json: unreadable") from e
        except BadSample as e:
            count(skipped, e.args[0], f"{raw.get('__url__')}: {raw.get('__key__')}")
            continue
        yield sample


def shards_have_codes(shards) -> bool:
    """True if the first sample of the first shard carries pre-encoded `codes.npy` (`dalle-ar encode`)."""
    first = expand_shards(shards)[0]
    if first.startswith("pipe:"):
        return False
    sample = next(iter_raw_samples(first, decode_images=False), None)
    return sample is not None and sample["codes"] is not None
