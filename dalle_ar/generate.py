"""Reranked batch generation from a prompts file (the library behind `dalle-ar generate`).

Reads prompts (one a line), samples N candidates per prompt, keeps the k best by CLIP score, and
writes into OUT:

    images/<line>_<rank>.png   the kept images
    prompts.jsonl              one row per kept image: image, prompt, score, rank, seed, line
    grid.png                   a captioned sheet: per prompt its kept images best first (at most
                               `grid_images`), the rank and reranker score under each, the caption
                               under the row (the first `grid_rows` prompts)

A folder that was partly written resumes: prompts whose rows in prompts.jsonl were made from the
same inputs (prompt, line, seed, candidates, keep, sampling settings, model weights) are not redone;
rows made from other inputs are dropped and redone.
Memory stays bounded: one prompt at a time (its candidates in batches), images go to disk at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

import torch
from PIL import Image
from tqdm.auto import tqdm

from .images import SheetRow, image_sheet
from .io import atomic_path
from .pipeline import TextToImagePipeline

log = logging.getLogger(__name__)


def read_prompts(path) -> tuple[list[tuple[int, str]], list[str]]:
    """(line number, prompt) for each usable line, and messages for bad lines (kept going past)."""
    prompts, problems = [], []
    lines = Path(path).read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    for n, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            problems.append(f"{path}:{n}: not UTF-8 ({e.reason}); skipped")
            continue
        if not text:
            problems.append(f"{path}:{n}: empty prompt; skipped")
            continue
        prompts.append((n, text))
    return prompts, problems


def pipeline_fingerprint(pipe) -> str:
    """sha256 of what decides a pipeline's images: the tokenizer, every weight and config of the prior,
    the dVAE and the reranker (None without one). Hashed from memory, so it holds for pipelines built in
    Python too; about 1 s per GB of weights."""
    import dataclasses
    import hashlib

    h = hashlib.sha256(pipe.tokenizer.to_json().encode())
    parts = [("dvae", pipe.dvae), ("dalle", pipe.dalle)]
    if pipe.reranker is not None:
        parts.append(("clip", pipe.reranker.model))
    for name, module in parts:
        cfg = module.config
        cfg = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg.to_dict()
        h.update(f"{name}:{json.dumps(cfg, sort_keys=True, default=str)}".encode())
        for key, t in sorted(module.state_dict().items()):
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _image_digest(image: Optional[Image.Image]) -> Optional[str]:
    """sha256 of an image's mode, size and pixels (None for no image): part of a row's key."""
    if image is None:
        return None
    import hashlib

    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


def _row_key(**inputs) -> str:
    """The identity of one prompt's rows: every input that decides its images and ranks."""
    import hashlib

    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _load_rows(jsonl: Path, out: Path, wanted: dict[str, int]) -> tuple[set[int], int]:
    """Rows of an earlier run -> (lines done with the same inputs, rows dropped). Rewrites prompts.jsonl
    (atomically) with the rows still valid: a row is kept when its key is one this run would write and
    its image exists; a row cut by a crash, or made from another prompt, seed, keep, model, ... is
    dropped and its prompt redone. The rewrite also repairs a torn last line, which appending would
    otherwise glue to the next row."""
    if not jsonl.is_file():
        return set(), 0
    kept, dropped, done = [], 0, set()
    for text in jsonl.read_text(errors="replace").splitlines():
        try:
            row = json.loads(text)
            ok = wanted.get(row["key"]) == row["line"] and (out / row["image"]).is_file()
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            kept.append(text + "\n")
            done.add(row["line"])
        elif text.strip():
            dropped += 1
    with atomic_path(jsonl) as tmp:
        tmp.write_text("".join(kept))
    return done, dropped


def generate_to_folder(pipe, prompts_file, out, *, candidates: int = 16, keep: int = 1, seed: int = 0,
                       batch_size: int = 16, grid_rows: int = 64, grid_images: int = 8,
                       temperature: Optional[float] = None, top_k: Optional[int] = None,
                       top_p: Optional[float] = None, guidance_scale: Optional[float] = None,
                       consensus: Optional[float] = None, likelihood: Optional[float] = None,
                       negative_prompt: Optional[str] = None, init_image=None, keep_rows: Optional[int] = None, progress: bool = True) -> dict:
    """Generate for every prompt of `prompts_file` into `out`; returns a summary dict.

    init_image (a path or a PIL image) + keep_rows: complete that image for every prompt (its
    first keep_rows rows of codes kept); negative_prompt: guidance's unconditional caption.

    Resumable: a prompt whose rows in prompts.jsonl were made from the same inputs (prompt text, line,
    seed, candidates, keep, batch size, sampling settings, negative prompt, init image and keep_rows, and
    the pipeline's weights) is not redone;
    rows made from other inputs are dropped ("dropped_rows" in the summary) and their prompts redone.
    Scores are null in JSON when the pipeline has no reranker."""
    if keep > candidates:
        raise ValueError(f"keep={keep} > candidates={candidates}")
    if init_image is not None and not isinstance(init_image, Image.Image):
        init_image = load_image(init_image)
    prompts, problems = read_prompts(prompts_file)
    for p in problems:
        log.warning(p)
    if not prompts:
        raise ValueError(f"prompts file {prompts_file}: no usable prompt")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    jsonl = out / "prompts.jsonl"
    settings = dict(candidates=candidates, keep=keep, batch_size=batch_size, temperature=temperature, top_k=top_k,
                    top_p=top_p, guidance_scale=guidance_scale, consensus=consensus, negative_prompt=negative_prompt,
                    likelihood=likelihood, keep_rows=keep_rows, init_image=_image_digest(init_image), model=pipeline_fingerprint(pipe))
    keys = {n: _row_key(prompt=p, line=n, seed=seed + n, **settings) for n, p in prompts}
    done, dropped = _load_rows(jsonl, out, {k: n for n, k in keys.items()})
    if dropped:
        log.warning("%s: %d row(s) were made from other inputs (prompt, seed, keep, model, ...) or cut by a "
                    "crash; their prompts are redone", jsonl, dropped)
    todo = [(n, p) for n, p in prompts if n not in done]
    # The bar is closed on errors too, so that an error message starts a line of its own.
    with tqdm(total=len(todo), desc="prompts", unit="prompt", disable=not progress) as bar, open(jsonl, "a") as f:
        for n, p in todo:
            # The seed of a prompt is tied to its line, so a resumed run gives the same images.
            (res,) = pipe([p], num_candidates=candidates, keep=keep, seed=seed + n, batch_size=batch_size,
                          temperature=temperature, top_k=top_k, top_p=top_p,
                          guidance_scale=guidance_scale, consensus=consensus, likelihood=likelihood,
                          negative_prompt=negative_prompt, init_image=init_image, keep_rows=keep_rows, progress=False)
            rows = []
            for img, score, rank in zip(res.images, res.scores, res.ranks):
                rel = f"images/{n:06d}_{rank}.png"
                tmp = out / (rel + ".tmp")
                img.save(tmp, format="PNG")
                os.replace(tmp, out / rel)
                score = float(score)
                rows.append({"image": rel, "prompt": p, "score": score if math.isfinite(score) else None,
                             "rank": rank, "seed": res.seed, "line": n, "key": keys[n]})
            # One write per prompt, after its images exist: a crash never leaves a row without a file.
            f.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
            f.flush()
            bar.update(1)
    grid = write_grid(out, max_rows=grid_rows, max_images=grid_images)
    return {"out": str(out), "prompts": len(prompts), "generated": len(todo), "resumed": len(prompts) - len(todo),
            "dropped_rows": dropped, "bad_lines": problems, "grid": str(grid), "jsonl": str(jsonl)}


def read_results(out: Path, max_rows: Optional[int] = None) -> dict[int, list[dict]]:
    """prompts.jsonl of `out` grouped by prompt line (the first `max_rows` lines), each best first."""
    rows: dict[int, list] = {}
    for row in (Path(out) / "prompts.jsonl").read_text().splitlines():
        try:
            r = json.loads(row)
        except ValueError:
            continue  # a row cut by a crash
        if r["line"] in rows or max_rows is None or len(rows) < max_rows:
            rows.setdefault(r["line"], []).append(r)
    return {n: sorted(v, key=lambda r: r["rank"]) for n, v in sorted(rows.items())}


def write_grid(out, max_rows: int = 64, max_images: int = 8, marks: Optional[dict] = None,
               note: str = "") -> Path:
    """Write out/grid.png from out/prompts.jsonl: the sheet of `image_sheet`. `marks` (image path as in
    the jsonl -> True / False) frames images green / red; `note` ends the title line."""
    marks = marks or {}
    results = read_results(out, max_rows)
    sheet_rows = [SheetRow(caption=rs[0]["prompt"],
                           images=[Image.open(Path(out) / r["image"]) for r in rs[:max_images]],
                           labels=[f"#{r['rank'] + 1}  " + ("-" if r["score"] is None else f"{r['score']:.2f}")
                                   for r in rs[:max_images]],
                           marks=[marks.get(r["image"]) for r in rs[:max_images]]) for rs in results.values()]
    shown = max(len(r.images) for r in sheet_rows)
    title = (f"{len(sheet_rows)} prompts, best first ({shown} shown per prompt); under each image: rank "
             f"and reranker score" + (f"; {note}" if note else ""))
    path = Path(out) / "grid.png"
    tmp = path.with_suffix(".png.tmp")
    image_sheet(sheet_rows, max_images=max_images, title=title).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def load_image(path) -> Image.Image:
    """An image file, fully read (ValueError naming init_image when it is missing or not an image)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError) as e:  # missing, unreadable or not an image (PIL's UnidentifiedImageError)
        raise ValueError(f"init_image {path}: cannot read it as an image ({e})") from None


def generate(model, prompts_file, out, *, device: Optional[str] = None, clip: Optional[str] = None,
             rerank: bool = True, torch_dtype=None, num_threads: Optional[int] = None, **options) -> dict:
    """Load the pipeline directory `model` (with `clip` replacing its reranker, or no reranker with
    rerank=False) on `device` (default: cuda if available), the prior in `torch_dtype`, with
    `num_threads` CPU threads (None: the `dalle_ar.threads` policy), and run `generate_to_folder` with
    `options`; returns its summary."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = TextToImagePipeline.from_pretrained(model, device=device, clip=clip, rerank=rerank,
                                               torch_dtype=torch_dtype, num_threads=num_threads)
    return generate_to_folder(pipe, prompts_file, out, **options)
