"""WebDataset shards: naming them, writing them, and reading raw samples back.

A sample is a group of tar members sharing a key:

    000042.png         the image (or .jpg)           optional when codes.npy is there
    000042.txt         UTF-8 captions, one per line   required
    000042.json        attributes                     optional
    000042.codes.npy   int16/int32 [h, w] dVAE codes  optional (written by `dalle-ar encode`)

Bad data never crashes a reader and is never silent: every skipped sample or shard is counted
under a short reason ("image: unreadable", "shard: truncated or corrupt", ...).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import braceexpand
import numpy as np
from PIL import Image
from webdataset import TarWriter
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


# ---- writing ------------------------------------------------------------------------------------

def _clean_key(key) -> str:
    """A key webdataset can group by: no dots (they start the extension), no odd characters, short."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", str(key)).strip("_") or "sample"
    if len(key) > 80:  # ustar names stop at 100 characters
        key = key[:60] + "_" + hashlib.sha1(key.encode()).hexdigest()[:12]
    return key


def _encode_image(image, resize: int | None) -> tuple[str, bytes]:
    """(extension, bytes) for a PIL image or encoded bytes. PNG and JPEG bytes pass through
    untouched unless resized; anything else is stored as lossless PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            pil = Image.open(io.BytesIO(bytes(image)))
            pil.load()
        except Exception as e:  # noqa: BLE001
            raise BadSample("image: unreadable") from e
        fmt = {"PNG": "png", "JPEG": "jpg"}.get(pil.format)
        if fmt and (resize is None or max(pil.size) <= resize):
            return fmt, bytes(image)
    elif isinstance(image, Image.Image):
        pil, fmt = image, "png"
    else:
        raise BadSample("image: not an image")
    if resize is not None and max(pil.size) > resize:
        scale = resize / max(pil.size)
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))),
                         Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if fmt == "jpg":
        to_rgb(pil).save(buf, format="JPEG", quality=95)
    else:
        fmt = "png"
        (pil if pil.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16") else to_rgb(pil)).save(buf, format="PNG")
    return fmt, buf.getvalue()


def encode_sample(sample: dict, resize: int | None = None) -> dict:
    """A sample dict (see write_samples) -> tar members {"__key__", ext: bytes}; BadSample if unusable."""
    entry = {"__key__": _clean_key(sample["key"])}
    captions = sample.get("captions")
    if isinstance(captions, str):
        captions = [captions]
    lines = [line.strip() for c in captions or () for line in str(c).splitlines() if line.strip()]
    if not lines:
        raise BadSample("caption: missing")
    entry["txt"] = ("\n".join(lines) + "\n").encode("utf-8")
    if sample.get("image") is not None:
        ext, data = _encode_image(sample["image"], resize)
        entry[ext] = data
    if sample.get("codes") is not None:
        codes = np.asarray(sample["codes"])
        if codes.ndim != 2 or codes.dtype.kind not in "iu":
            raise BadSample("codes: not a 2-d integer array")
        fits16 = codes.size == 0 or (codes.min() >= -32768 and codes.max() < 32768)
        buf = io.BytesIO()
        np.save(buf, codes.astype(np.int16 if fits16 else np.int32), allow_pickle=False)
        entry["codes.npy"] = buf.getvalue()
    if "png" not in entry and "jpg" not in entry and "codes.npy" not in entry:
        raise BadSample("image: missing")
    if sample.get("json") is not None:
        entry["json"] = json.dumps(sample["json"], sort_keys=True).encode("utf-8")
    return entry


class _AtomicShards:
    """`{prefix}-{i:06d}.tar` files of `shard_size` samples each, each written under a temporary
    name and renamed when complete, so a crash never leaves a truncated shard under a final name."""

    def __init__(self, out: Path, prefix: str, shard_size: int):
        self.out, self.prefix, self.shard_size = out, prefix, shard_size
        self.names: list[str] = []
        self.file = self.tar = self.tmp = None
        self.count = 0

    def write(self, entry: dict) -> None:
        if self.tar is None:
            name = f"{self.prefix}-{len(self.names):06d}.tar"
            self.names.append(name)
            self.tmp = self.out / f".{name}.tmp"
            self.file = open(self.tmp, "wb")
            # fixed mtime/owner: the same samples give byte-identical shards
            self.tar = TarWriter(self.file, mtime=0, user="dalle-ar", group="dalle-ar", mode=0o644)
        self.tar.write(entry)
        self.count += 1
        if self.count == self.shard_size:
            self.finish()

    def finish(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.file.close()
            os.replace(self.tmp, self.out / self.names[-1])
            self.tar, self.count = None, 0

    def abort(self) -> None:
        if self.tar is not None:
            try:
                self.tar.close()
            finally:
                self.file.close()
                self.tmp.unlink(missing_ok=True)
            self.names.pop()
            self.tar = None


def write_samples(samples: Iterable[dict], out, *, prefix: str, shard_size: int = 1000,
                  resize: int | None = None) -> dict:
    """Write sample dicts into `out/{prefix}-{i:06d}.tar` shards; return a summary dict.

    Each sample: "key", "image" (PIL image or encoded bytes; optional if "codes" is given),
    "captions" (str or list[str]), optional "json" (dict) and "codes" (int array [h, w]).
    `resize` shrinks images whose longer side exceeds it. Unusable samples are skipped and
    counted in summary["skipped"]; stale shards of an earlier, longer run with the same prefix
    are removed.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if resize is not None and resize < 1:
        raise ValueError(f"resize must be >= 1, got {resize}")
    if not prefix or "/" in prefix:
        raise ValueError(f"prefix must be a non-empty file name prefix, got {prefix!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sink = _AtomicShards(out, prefix, shard_size)
    skipped: dict[str, int] = {}
    seen: set[str] = set()
    written = 0
    try:
        for sample in samples:
            try:
                entry = encode_sample(sample, resize)
                if entry["__key__"] in seen:  # webdataset would merge the two samples
                    raise BadSample("key: duplicate")
            except BadSample as e:
                count(skipped, e.args[0], str(sample.get("key")))
                continue
            seen.add(entry["__key__"])
            sink.write(entry)
            written += 1
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    pattern = re.compile(re.escape(prefix) + r"-(\d{6})\.tar")
    for stale in out.glob(f"{prefix}-*.tar"):
        m = pattern.fullmatch(stale.name)
        if m and int(m.group(1)) >= len(sink.names):
            log.info("removing stale shard %s", stale)
            stale.unlink()
    return {"out": str(out), "prefix": prefix, "written": written, "shards": len(sink.names),
            "files": sink.names, "skipped": skipped}


# ---- writers from a folder or a csv file --------------------------------------------------------

def _read_caption_file(path: Path) -> list[str]:
    try:
        return decode_captions(path.read_bytes() if path.is_file() else None)
    except OSError as e:
        raise BadSample("caption: missing") from e


def _read_image_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise BadSample("image: missing file") from e


def _file_samples(items, skipped: dict) -> Iterator[dict]:
    """(key, image path, caption loader) -> sample dicts, counting files that cannot be read."""
    for key, path, captions in items:
        try:
            yield {"key": key, "captions": captions(), "image": _read_image_file(path)}
        except BadSample as e:
            count(skipped, e.args[0], str(path))


def write_folder(src, out, *, shard_size: int = 1000, resize: int | None = None, prefix: str | None = None) -> dict:
    """Shards from a folder tree of images, each captioned by a same-stem .txt file (one caption a line)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"SRC is not a folder: {src}")
    images = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    skipped: dict[str, int] = {}
    items = ((str(p.relative_to(src).with_suffix("")), p,
              lambda p=p: _read_caption_file(p.with_suffix(".txt"))) for p in images)
    summary = write_samples(_file_samples(items, skipped), out, prefix=prefix or _clean_key(src.resolve().name),
                            shard_size=shard_size, resize=resize)
    return _merge_skipped(summary, skipped)


def write_csv(file, out, *, shard_size: int = 1000, resize: int | None = None, prefix: str | None = None) -> dict:
    """Shards from a csv with columns `path` and `caption`; relative paths are resolved against the
    csv's folder; several rows for one path give that image several captions."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"csv file not found: {file}")
    captions: dict[str, list[str]] = {}
    with open(file, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"path", "caption"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"csv {file}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        for row in reader:
            if row["path"]:
                captions.setdefault(row["path"].strip(), []).append(row["caption"] or "")
    skipped: dict[str, int] = {}

    def items():
        for i, (p, caps) in enumerate(captions.items()):
            path = Path(p) if Path(p).is_absolute() else file.parent / p
            yield f"{i:08d}_{Path(p).stem}", path, lambda caps=caps: caps

    summary = write_samples(_file_samples(items(), skipped), out, prefix=prefix or _clean_key(file.stem),
                            shard_size=shard_size, resize=resize)
    return _merge_skipped(summary, skipped)


def _merge_skipped(summary: dict, skipped: dict) -> dict:
    for k, v in skipped.items():
        summary["skipped"][k] = summary["skipped"].get(k, 0) + v
    return summary
