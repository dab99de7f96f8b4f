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
    ("dalle_ar.generate", "add_parser"),          # dalle-ar generate ...
    ("dalle_ar.demo", "add_parser"),              # dalle-ar demo --out DIR
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dalle-ar",
        description="Train and sample DALL-E style text-to-image models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module, fn in COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if not e.name or not e.name.startswith("dalle_ar"):
                raise
            continue  # an area that is not there yet
        getattr(mod, fn)(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"dalle-ar {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
