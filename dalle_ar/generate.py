"""Reranked batch generation from a prompts file (the library behind `dalle-ar generate`).

Reads prompts (one a line), samples N candidates per prompt, keeps the k best by CLIP score, and
writes into OUT:

    images/<line>_<rank>.png   the kept images
    prompts.jsonl              one row per kept image: image, prompt, score, rank, seed, line
    grid.png                   a captioned sheet: per prompt its kept images best first (at most
                               `grid_images`), the rank and reranker score under each, the caption
                               under the row (the first `grid_rows` prompts)

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

from .images import SheetRow, image_sheet
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
                       batch_size: int = 16, grid_rows: int = 64, grid_images: int = 8,
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
    grid = write_grid(out, max_rows=grid_rows, max_images=grid_images)
    return {"out": str(out), "prompts": len(prompts), "generated": len(todo), "resumed": len(prompts) - len(todo),
            "bad_lines": problems, "grid": str(grid), "jsonl": str(jsonl)}


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
                           labels=[f"#{r['rank'] + 1}  {r['score']:.2f}" for r in rs[:max_images]],
                           marks=[marks.get(r["image"]) for r in rs[:max_images]]) for rs in results.values()]
    shown = max(len(r.images) for r in sheet_rows)
    title = (f"{len(sheet_rows)} prompts, best first ({shown} shown per prompt); under each image: rank "
             f"and reranker score" + (f"; {note}" if note else ""))
    path = Path(out) / "grid.png"
    tmp = path.with_suffix(".png.tmp")
    image_sheet(sheet_rows, max_images=max_images, title=title).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def generate(model, prompts_file, out, *, device: Optional[str] = None, clip: Optional[str] = None,
             **options) -> dict:
    """Load the pipeline directory `model` (with `clip` replacing its reranker) on `device` (default:
    cuda if available) and run `generate_to_folder` with `options`; returns its summary."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = TextToImagePipeline.from_pretrained(model, device=device, clip=clip)
    return generate_to_folder(pipe, prompts_file, out, **options)
