"""Reranked batch generation from a prompts file (the library behind `dalle-ar generate`).

Reads prompts (one a line), samples N candidates per prompt, keeps the k best by CLIP score, and
writes into OUT:

    images/<line>_<rank>.png   the kept images
    prompts.jsonl              one row per kept image: image, prompt, score, rank, seed, line
    grid.png                   contact sheet, one row per prompt (the first `grid_rows` prompts)

A folder that was partly written resumes: prompts already in prompts.jsonl are not redone.
Memory stays bounded: one prompt at a time (its candidates in batches), images go to disk at once.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from PIL import Image
from tqdm.auto import tqdm

from .images import image_grid
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


def _done_lines(jsonl: Path) -> set[int]:
    done = set()
    if jsonl.is_file():
        for row in jsonl.read_text().splitlines():
            try:
                done.add(int(json.loads(row)["line"]))
            except (ValueError, KeyError, TypeError):
                continue  # a row cut by a crash: that prompt is redone
    return done


def generate_to_folder(pipe, prompts_file, out, *, candidates: int = 16, keep: int = 1, seed: int = 0,
                       batch_size: int = 16, grid_rows: int = 64,
                       temperature: Optional[float] = None, top_k: Optional[int] = None,
                       top_p: Optional[float] = None, guidance_scale: Optional[float] = None,
                       consensus: Optional[float] = None, progress: bool = True) -> dict:
    """Generate for every prompt of `prompts_file` into `out`; returns a summary dict."""
    if keep > candidates:
        raise ValueError(f"keep={keep} > candidates={candidates}")
    prompts, problems = read_prompts(prompts_file)
    for p in problems:
        log.warning(p)
    if not prompts:
        raise ValueError(f"prompts file {prompts_file}: no usable prompt")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jsonl = out / "prompts.jsonl"
    done = _done_lines(jsonl)
    todo = [(n, p) for n, p in prompts if n not in done]
    bar = tqdm(total=len(todo), desc="prompts", unit="prompt", disable=not progress)
    with open(jsonl, "a") as f:
        for n, p in todo:
            # The seed of a prompt is tied to its line, so a resumed run gives the same images.
            (res,) = pipe([p], num_candidates=candidates, keep=keep, seed=seed + n, batch_size=batch_size,
                          temperature=temperature, top_k=top_k, top_p=top_p,
                          guidance_scale=guidance_scale, consensus=consensus, progress=False)
            rows = []
            for img, score, rank in zip(res.images, res.scores, res.ranks):
                rel = f"images/{n:06d}_{rank}.png"
                tmp = out / (rel + ".tmp")
                img.save(tmp, format="PNG")
                os.replace(tmp, out / rel)
                rows.append({"image": rel, "prompt": p, "score": float(score), "rank": rank,
                             "seed": res.seed, "line": n})
            # One write per prompt, after its images exist: a crash never leaves a row without a file.
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            bar.update(1)
    bar.close()
    grid = write_grid(out, keep=keep, max_rows=grid_rows)
    return {"out": str(out), "prompts": len(prompts), "generated": len(todo), "resumed": len(prompts) - len(todo),
            "bad_lines": problems, "grid": str(grid), "jsonl": str(jsonl)}


def write_grid(out: Path, keep: int, max_rows: int = 64) -> Path:
    rows: dict[int, list] = {}
    for row in (out / "prompts.jsonl").read_text().splitlines():
        try:
            r = json.loads(row)
        except ValueError:
            continue
        if r["line"] in rows or len(rows) < max_rows:
            rows.setdefault(r["line"], []).append((r["rank"], r["image"]))
    sheet = image_grid([[Image.open(out / p) for _, p in sorted(v)] for _, v in sorted(rows.items())])
    sheet.save(out / "grid.png")
    return out / "grid.png"


def generate(model, prompts_file, out, *, device: Optional[str] = None, clip: Optional[str] = None,
             **options) -> dict:
    """Load the pipeline directory `model` (with `clip` replacing its reranker) on `device` (default:
    cuda if available) and run `generate_to_folder` with `options`; returns its summary."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = TextToImagePipeline.from_pretrained(model, device=device, clip=clip)
    return generate_to_folder(pipe, prompts_file, out, **options)
