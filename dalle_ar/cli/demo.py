"""`dalle-ar demo`: the whole recipe on a built-in set, on a CPU, with no download."""

from __future__ import annotations

BUDGET_NAMES = ("default", "fast")  # the keys of dalle_ar.demo.BUDGETS (a test holds them equal)
IMAGE_TOKENIZER_NAMES = ("dvae", "dvae-fsq", "vqgan")  # the keys of dalle_ar.demo.IMAGE_TOKENIZERS (same)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train and sample the whole pipeline on a built-in set (CPU, no download)",
                              description=__doc__)
    p.add_argument("--out", required=True, help="demo folder (re-running resumes finished stages)")
    p.add_argument("--data", choices=["shapes", "digits"], default="shapes",
                   help="built-in set: procedural shapes, or scikit-learn's handwritten digits")
    p.add_argument("--budget", choices=sorted(BUDGET_NAMES), default="default",
                   help="default: ~22 min on 2 CPU cores; fast: ~2 min smoke run")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of every stage")
    p.add_argument("--tokenizer", choices=IMAGE_TOKENIZER_NAMES, default="dvae-fsq", dest="image_tokenizer",
                   help="image tokenizer to train: the dVAE with FSQ codes (default), the Gumbel dVAE or a VQGAN "
                        "(why: docs/benchmarks.md, 'Image tokenizers')")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from dalle_ar.demo import run_demo  # trains every stage: torch, transformers, DeepSpeed

    run_demo(args.out, data=args.data, budget=args.budget, seed=args.seed, image_tokenizer=args.image_tokenizer)
    return 0
