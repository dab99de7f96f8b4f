"""`dalle-ar pipeline` (assemble trained parts) and `dalle-ar generate` (reranked batch generation)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import add_threads_argument

DESCRIPTION = ("Reranked batch generation: for each prompt of a prompts file (one a line), sample N candidates, "
               "keep the k best by CLIP score and write images/, prompts.jsonl and grid.png into OUT "
               "(a partly written OUT resumes).")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pipeline", help="assemble trained parts into a pipeline directory",
                              description="Join a tokenizer, an image tokenizer (dVAE or VQGAN), a prior and (optionally) a CLIP, each a "
                                          "directory (e.g. a run's export/), into one pipeline folder that "
                                          "`dalle-ar generate --model` and TextToImagePipeline.from_pretrained load.")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (dalle-ar tokenizer train --out)")
    p.add_argument("--dvae", "--image-tokenizer", dest="dvae", required=True,
                   help="image tokenizer directory: a dVAE or a VQGAN (config.json + model.safetensors)")
    p.add_argument("--dalle", required=True, help="prior directory (config.json + model.safetensors)")
    p.add_argument("--clip", default=None, help="CLIP directory (own or a local pretrained CLIP); none: no reranking")
    p.add_argument("--out", required=True, help="pipeline directory to write")
    p.set_defaults(func=_assemble)

    p = subparsers.add_parser("generate", help="reranked batch generation from a prompts file",
                              description=DESCRIPTION)
    p.add_argument("--model", required=True, help="pipeline directory (from `dalle-ar demo` or save_pretrained)")
    p.add_argument("--prompts", required=True, help="text file, one prompt a line")
    p.add_argument("--out", required=True, help="output folder (resumed if partly written)")
    p.add_argument("--candidates", type=int, default=16, help="images sampled per prompt (N)")
    p.add_argument("--keep", type=int, default=1, help="best images kept per prompt (k)")
    p.add_argument("--batch-size", type=int, default=16, help="candidates sampled at once")
    p.add_argument("--seed", type=int, default=0, help="random seed (the same seed samples the same images)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (> 0); default: the model's recommended value")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k likeliest codes at each step (default: the model's; none: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the likeliest codes whose probabilities sum to p (default: the model's; none: all)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (1 = off); default: the model's recommended value")
    p.add_argument("--consensus", type=float, default=None,
                   help="weight of the candidates' agreement in the ranking (0: CLIP score alone); "
                        "default: the pipeline's (1.0)")
    p.add_argument("--likelihood", type=float, default=None,
                   help="weight of the prior's likelihood ratio log p(image | prompt) - log p(image | null caption) "
                        "in the ranking; default 0 (off: on the shapes demo it picked worse than CLIP + consensus)")
    p.add_argument("--negative-prompt", default=None,
                   help="guidance's unconditional branch reads this caption instead of the null one "
                        "(needs --guidance-scale != 1)")
    p.add_argument("--init-image", default=None, metavar="PATH",
                   help="image completion: keep the first --keep-rows rows of this image's codes for every "
                        "prompt and sample the rest (any mode; a square image is resized to the model's size)")
    p.add_argument("--keep-rows", type=int, default=None, metavar="R",
                   help="rows of codes kept from --init-image, 1 .. grid-1 (default: half)")
    p.add_argument("--clip", default=None, help="a local CLIP directory to rerank with instead of the model's")
    p.add_argument("--no-rerank", action="store_true",
                   help="load no CLIP: keep candidates in sampling order (scores are null)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="the prior's dtype: fp32, bf16 or fp16 (GPUs; default: as saved)")
    add_threads_argument(p)
    p.set_defaults(func=_generate)


# Handlers: the pipeline pulls in torch and transformers, so it loads when a command runs.

def _generate(args) -> int:
    from dalle_ar.generate import generate

    if args.keep_rows is not None and args.init_image is None:
        raise ValueError("--keep-rows needs --init-image")
    summary = generate(args.model, args.prompts, args.out, device=args.device, clip=args.clip,
                       torch_dtype=args.dtype, num_threads=args.threads, rerank=not args.no_rerank,
                       candidates=args.candidates, keep=args.keep, seed=args.seed, batch_size=args.batch_size,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       guidance_scale=args.guidance_scale, consensus=args.consensus, likelihood=args.likelihood,
                       negative_prompt=args.negative_prompt, init_image=args.init_image,
                       keep_rows=args.keep_rows)
    print(json.dumps(summary, indent=2))
    print(f"grid: {summary['grid']}\nprompts.jsonl: {summary['jsonl']}")
    return 0


def _assemble(args) -> int:
    for name in ("tokenizer", "dvae", "dalle", "clip"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_dir():
            raise ValueError(f"--{name}: {path} is not a directory")
    from dalle_ar.pipeline import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained_parts(args.tokenizer, args.dvae, args.dalle, args.clip)
    print(f"pipeline: {pipe.save_pretrained(args.out)}")
    return 0
