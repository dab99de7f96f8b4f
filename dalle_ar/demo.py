"""`dalle-ar demo`: the whole recipe on a built-in set, on a CPU, with no download.

    data shards -> BPE tokenizer -> image tokenizer (dVAE, or VQGAN with image_tokenizer="vqgan")
                -> code shards -> CLIP -> prior -> pipeline -> reranked images

Every stage goes through the same DeepSpeed engine as `dalle-ar train`. Each finished stage leaves
a `done.json` in its folder, so running the demo again resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .data import digits, shapes
from .generate import generate
from .io import write_json
from .pipeline import TextToImagePipeline
from .tokenizer import TextTokenizer, read_captions
from .train import config_path
from .train.encode import encode_shards
from .train.stages import run_stage

log = logging.getLogger(__name__)

# Budgets: overrides on top of train/configs/<stage>-<data>.json. "default" fits ~15 minutes on
# 2 CPU cores; "fast" is a ~2 minute smoke run (the images will be poor).
BUDGETS = {
    "default": {"data": {"train_size": 12000, "val_size": 1000},
                "dvae": [], "vqgan": [], "clip": [], "dalle": [],
                "generate": {"prompts": 48, "candidates": 16}},
    "fast": {"data": {"train_size": 2000, "val_size": 200},
             "dvae": ["train.steps=60", "model.hard_codes_from_step=45"], "vqgan": ["train.steps=60"],
             "clip": ["train.steps=40"], "dalle": ["train.steps=60"],
             "generate": {"prompts": 8, "candidates": 4}},
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


# The demo's image tokenizer: the dVAE, the one docs/benchmarks.md measured better for this budget
# (bench/tokenizers.py); the VQGAN is one argument away.
IMAGE_TOKENIZERS = ("dvae", "vqgan")


def run_demo(out, data: str = "shapes", budget: str = "default", seed: int = 0, image_tokenizer: str = "dvae") -> dict:
    if image_tokenizer not in IMAGE_TOKENIZERS:
        raise ValueError(f"image_tokenizer must be one of {IMAGE_TOKENIZERS}, got {image_tokenizer!r}")
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

    def train(stage, folder, shards, extra=()):
        def fn():
            r = run_stage(stage, shards, folder, val_shards=val_shards,
                          config_file=config_path(f"{stage}-{data}.json"),
                          overrides=[*b[stage], *extra], resume=True)
            return {"steps": r.get("steps"), "loss": r.get("final_loss"), **r.get("metrics", {})}
        return fn

    runs = out / "runs"
    kind = image_tokenizer
    other = [k for k in IMAGE_TOKENIZERS if k != kind and (runs / k / "done.json").is_file()]
    if other:  # its codes, prior and pipeline would be resumed with the wrong tokenizer
        raise ValueError(f"demo folder {out} was made with the {other[0]} image tokenizer; use another --out for {kind}")
    summary[kind] = _stage(runs / kind, {"dvae": "dVAE", "vqgan": "VQGAN"}[kind], train(kind, runs / kind, train_shards))
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
        pipe.save_pretrained(pipe_dir)
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

    def reranked_generation():
        generate(pipe_dir, prompts_file, gen_dir, candidates=b["generate"]["candidates"], keep=1, seed=seed)
        return {"grid": str(gen_dir / "grid.png"), "jsonl": str(gen_dir / "prompts.jsonl")}

    summary["generate"] = _stage(gen_dir, "reranked generation", reranked_generation)
    summary["minutes"] = round((time.time() - t0) / 60, 1)
    print(f"\n[demo] finished in {summary['minutes']} min")
    print(f"[demo] pipeline:      {pipe_dir}")
    print(f"[demo] grid.png:      {gen_dir / 'grid.png'}")
    print(f"[demo] prompts.jsonl: {gen_dir / 'prompts.jsonl'}")
    return summary
