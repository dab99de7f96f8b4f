"""The `dalle-ar` command line: parses arguments and calls library functions.

Each area registers its own sub-commands through an `add_parser(subparsers)` function in its
module; heavy imports (torch, transformers, deepspeed) happen inside the handlers so that
`dalle-ar --help` stays fast.
"""

import argparse
import importlib
import sys

# (module, function) pairs, each adding one top-level sub-command.
COMMANDS = [
    ("dalle_ar.data.cli", "add_parser"),          # dalle-ar data {shapes,digits,folder,csv}
    ("dalle_ar.tokenizer.cli", "add_parser"),     # dalle-ar tokenizer train
    ("dalle_ar.train.cli", "add_train_parser"),   # dalle-ar train {dvae,dalle,clip}
    ("dalle_ar.train.cli", "add_export_parser"),  # dalle-ar export CKPT_DIR --out DIR
    ("dalle_ar.train.cli", "add_encode_parser"),  # dalle-ar encode --dvae DIR --shards ... --out DIR
    ("dalle_ar.convert", "add_parser"),           # dalle-ar convert openai-dvae ...
    ("dalle_ar.generate", "add_pipeline_parser"), # dalle-ar pipeline --tokenizer --dvae --dalle [--clip] --out
    ("dalle_ar.generate", "add_parser"),          # dalle-ar generate ...
    ("dalle_ar.demo", "add_parser"),              # dalle-ar demo --out DIR
    ("dalle_ar.serve.cli", "add_parser"),         # dalle-ar serve --model DIR [--port 8000 ...]
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dalle-ar",
        description="Train and sample DALL-E style text-to-image models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module, fn in COMMANDS:
        getattr(importlib.import_module(module), fn)(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parse_args, except that `key=value` overrides may also come after options (argparse alone
    stops collecting a positional list at the first option)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"dalle-ar {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
