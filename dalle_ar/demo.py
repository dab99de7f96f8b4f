"""`dalle-ar demo`: the whole recipe on a built-in set, on a CPU, with no download.

    data shards -> BPE tokenizer -> image tokenizer (the dVAE with FSQ codes; "dvae": Gumbel, "vqgan")
                -> code shards -> CLIP -> prior -> pipeline -> reranked images

Every stage goes through the same DeepSpeed engine as `dalle-ar train`. Each finished stage leaves
a `done.json` in its folder, so running the demo again resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from PIL import Image

from .data import digits, shapes
from .generate import generate, read_results, write_grid
from .io import write_json
from .pipeline import TextToImagePipeline
from .tokenizer import TextTokenizer, read_captions
from .train import config_path
from .train.encode import encode_shards
from .train.stages import run_stage

log = logging.getLogger(__name__)

# Budgets: overrides on top of train/configs/<stage>-<data>.json. "default" takes ~22 minutes on
# 2 CPU cores; "fast" is a ~2 minute smoke run (the images will be poor).
BUDGETS = {
    "default": {"data": {"train_size": 12000, "val_size": 1000},
                "dvae": [], "dvae-fsq": [], "vqgan": [], "clip": [], "dalle": [],
                "generate": {"prompts": 48, "candidates": 16, "sheet": 4}},
    "fast": {"data": {"train_size": 2000, "val_size": 200},
             "dvae": ["train.steps=60", "model.hard_codes_from_step=45"], "dvae-fsq": ["train.steps=60", "model.hard_codes_from_step=45"],
             "vqgan": ["train.steps=60"],
             "clip": ["train.steps=40"], "dalle": ["train.steps=60"],
             "generate": {"prompts": 8, "candidates": 4, "sheet": 4}},
}


def _stage(folder: Path, what: str, fn):
    """Run fn() unless folder/done.json says it finished; time it; mark it done."""
    done = folder / "done.json"
    if done.is_file():
        print(f"[demo] {what}: already done ({folder}), skipping")
        return json.loads(done.read_text())
    print(f"[demo] {what} ...", flush=True)
    t = time.time()
    info = fn() or {}
    info = {"seconds": round(time.time() - t, 1), **info}
    folder.mkdir(parents=True, exist_ok=True)
    write_json(done, info)
    print(f"[demo] {what}: done in {info['seconds']} s", flush=True)
    return info


# The demo's image tokenizers: {name: (stage, config name, label)}. Which is the default and why:
# docs/benchmarks.md, "Image tokenizers"; the others are one argument away.
IMAGE_TOKENIZERS = {"dvae": ("dvae", "dvae", "dVAE"), "dvae-fsq": ("dvae", "dvae-fsq", "dVAE (FSQ)"),
                    "vqgan": ("vqgan", "vqgan", "VQGAN")}


def run_demo(out, data: str = "shapes", budget: str = "default", seed: int = 0,
             image_tokenizer: str = "dvae-fsq") -> dict:
    if image_tokenizer not in IMAGE_TOKENIZERS:
        raise ValueError(f"image_tokenizer must be one of {tuple(IMAGE_TOKENIZERS)}, got {image_tokenizer!r}")
    if data not in ("shapes", "digits"):
        raise ValueError(f"data must be 'shapes' or 'digits', got {data!r}")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {sorted(BUDGETS)}, got {budget!r}")
    b = BUDGETS[budget]
    out = Path(out)
    t0 = time.time()
    summary = {}

    # 1. shards
    data_dir = out / "data"
    if data == "shapes":
        summary["data"] = _stage(data_dir, "shapes shards", lambda: shapes.generate_shapes(
            data_dir, train_size=b["data"]["train_size"], val_size=b["data"]["val_size"], seed=seed))
    else:
        summary["data"] = _stage(data_dir, "digits shards", lambda: digits.generate_digits(data_dir, seed=seed))
    train_shards = sorted(str(p) for p in data_dir.glob(f"{data}-train-*.tar"))
    val_shards = sorted(str(p) for p in data_dir.glob(f"{data}-val-*.tar"))

    # 2. tokenizer
    tok_dir = out / "tokenizer"

    def train_tokenizer():
        tok = TextTokenizer.train(read_captions(train_shards), vocab_size=512 if data == "shapes" else 256)
        tok.save_pretrained(tok_dir)
        return {"vocab_size": tok.vocab_size}

    summary["tokenizer"] = _stage(tok_dir, "BPE tokenizer", train_tokenizer)

    def train(stage, folder, shards, extra=(), config=None):
        def fn():
            r = run_stage(stage, shards, folder, val_shards=val_shards,
                          config_file=config_path(f"{config or stage}-{data}.json"),
                          overrides=[*b[config or stage], *extra], resume=True)
            if r.get("interrupted"):  # SIGTERM / SIGINT: the engine saved a checkpoint; not done
                raise KeyboardInterrupt(f"{stage} stopped at step {r.get('steps')}")
            return {"steps": r.get("steps"), "loss": r.get("final_loss"), **r.get("metrics", {})}
        return fn

    runs = out / "runs"
    kind = image_tokenizer
    other = [k for k in IMAGE_TOKENIZERS if k != kind and (runs / k / "done.json").is_file()]
    if other:  # its codes, prior and pipeline would be resumed with the wrong tokenizer
        raise ValueError(f"demo folder {out} was made with the {other[0]} image tokenizer; use another --out for {kind}")
    stage, config, label = IMAGE_TOKENIZERS[kind]
    summary[kind] = _stage(runs / kind, label, train(stage, runs / kind, train_shards, config=config))
    dvae_dir = runs / kind / "export"

    # 3. pre-encode the shards so the prior trains without the dVAE forward pass
    codes_dir = out / "codes"

    def encode():
        return encode_shards(dvae_dir, train_shards, codes_dir / "train")

    summary["encode"] = _stage(codes_dir, f"encode shards with the {kind}", encode)
    code_shards = sorted(str(p) for p in (codes_dir / "train").glob("*.tar"))

    summary["clip"] = _stage(runs / "clip", "CLIP (reranker)",
                             train("clip", runs / "clip", train_shards, [f"data.tokenizer={tok_dir}"]))
    summary["dalle"] = _stage(runs / "dalle", "prior (transformer)",
                              train("dalle", runs / "dalle", code_shards,
                                    [f"data.tokenizer={tok_dir}", f"data.dvae={dvae_dir}"]))

    # 4. assemble the pipeline
    pipe_dir = out / "pipeline"

    def assemble():
        pipe = TextToImagePipeline.from_pretrained_parts(
            tokenizer=tok_dir, image_tokenizer=dvae_dir, dalle=runs / "dalle" / "export", clip=runs / "clip" / "export")
        pipe.save_pretrained(pipe_dir, card={
            "name": f"dalle-ar demo ({data})",
            "datasets": [f"{data} (built into dalle-ar: `dalle-ar data {data}`)"],
            "training": {"recipe": f"`dalle-ar demo --data {data} --budget {budget}` (seed {seed}), "
                                   "configs train/configs/*-" + data + ".json"},
            "description": "A small model trained from scratch on CPU by the built-in demo: a smoke test "
                           "and an example of the layout, not a general text-to-image model."})
        return {"pipeline": str(pipe_dir)}

    summary["pipeline"] = _stage(pipe_dir, "save pipeline", assemble)

    # 5. reranked generation, the library call behind `dalle-ar generate`
    gen_dir = out / "generated"
    prompts_file = out / "prompts.txt"
    if not prompts_file.is_file():
        if data == "shapes":
            prompts = shapes.val_captions(b["generate"]["prompts"], seed=seed)
        else:
            prompts = digits.val_captions(b["generate"]["prompts"], seed=seed)
        prompts_file.write_text("\n".join(prompts) + "\n")

    g = b["generate"]
    summary["generate"] = _stage(gen_dir, "reranked generation", lambda: generate_and_check(
        pipe_dir, prompts_file, gen_dir, data=data, candidates=g["candidates"], sheet=g["sheet"], seed=seed))
    summary["minutes"] = round((time.time() - t0) / 60, 1)
    print("\n" + "\n".join(final_lines(summary, pipe_dir, gen_dir)))
    return summary


def generate_and_check(pipe_dir, prompts_file, gen_dir, *, data: str, candidates: int, sheet: int,
                       seed: int = 0) -> dict:
    """The demo's generation: `generate` keeping every candidate (ranked), so the sheet shows the
    best `sheet` per prompt and the check judges them all; shapes prompts are checked and the sheet
    redrawn with each image's verdict."""
    gen_dir = Path(gen_dir)
    generate(pipe_dir, prompts_file, gen_dir, candidates=candidates, keep=candidates, seed=seed,
             grid_images=sheet, progress=False)
    info = {"grid": str(gen_dir / "grid.png"), "jsonl": str(gen_dir / "prompts.jsonl")}
    if data == "shapes":
        def judge(prompt, image):
            return bool(shapes.check_image(image, shapes.parse_caption(prompt))["exact"])
        info["check"], marks = check_generated(gen_dir, judge, "exact by the shapes checker")
        note = "frame green / red: the shapes checker finds the caption right / wrong"
    else:
        reader, _ = digits.fit_reader()

        def judge(prompt, image):
            return bool(reader.predict(digits.to_scan(image)[None])[0] == digits.digit_of(prompt))
        info["check"], marks = check_generated(gen_dir, judge, "read as the prompted digit by an SVC on the real scans")
        note = "frame green / red: an SVC trained on the real scans reads the prompted digit / another"
    write_grid(gen_dir, max_images=sheet, marks=marks, note=note)
    return info


def final_lines(summary: dict, pipe_dir, gen_dir) -> list[str]:
    """What the demo prints last: its time, where its outputs are, and its own quality check."""
    return [f"[demo] finished in {summary['minutes']} min",
            f"[demo] pipeline:      {pipe_dir}",
            f"[demo] grid.png:      {Path(gen_dir) / 'grid.png'}",
            f"[demo] prompts.jsonl: {Path(gen_dir) / 'prompts.jsonl'}",
            f"[demo] {quality_line(summary['generate'].get('check'))}"]


def check_generated(gen_dir, judge, what: str) -> tuple[dict, dict]:
    """Judge every generated image of gen_dir/prompts.jsonl with judge(prompt, image) -> bool.
    -> (rates: the reranked pick, a single sample = the mean over the candidates, the best of N, and
    `what` the judge checks; image path -> verdict)."""
    marks, picks, singles, best = {}, [], [], []
    results = read_results(gen_dir)
    for rows in results.values():
        ok = [judge(r["prompt"], Image.open(Path(gen_dir) / r["image"])) for r in rows]
        marks.update({r["image"]: v for r, v in zip(rows, ok)})
        picks.append(ok[0])
        singles.append(sum(ok) / len(ok))
        best.append(any(ok))
    n = max(1, len(results))
    check = {"what": what, "prompts": len(results), "candidates": max((len(v) for v in results.values()), default=0),
             "reranked": sum(picks) / n, "single_sample": sum(singles) / n, "best_of_n": sum(best) / n}
    return check, marks


def quality_line(check) -> str:
    """The demo's one-line quality summary."""
    if not check:
        return "check: none (no generated prompts were checked)"
    n = check["candidates"]
    return (f"check: {check['reranked']:.0%} of {check['prompts']} prompts {check['what']} (reranked best of "
            f"{n}; a single sample {check['single_sample']:.0%}, the best of {n} {check['best_of_n']:.0%})")
