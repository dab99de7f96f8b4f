"""Writing WebDataset shards: samples -> size-capped tar shards, atomically; from a folder or a csv."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image
from webdataset import TarWriter

from .shards import IMAGE_SUFFIXES, BadSample, count, decode_captions, to_rgb

log = logging.getLogger(__name__)


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
