"""The `dalle-ar` command line, the one CLI layer: it parses arguments and calls library functions.

One module per command group, each with `add_parser(subparsers)`:

    data.py       dalle-ar data {shapes,digits,folder,csv}
    tokenizer.py  dalle-ar tokenizer train
    train.py      dalle-ar train {dvae,dalle,clip}, export, encode (and train/train_<stage>.py)
    convert.py    dalle-ar convert openai-dvae
    generate.py   dalle-ar pipeline, dalle-ar generate
    demo.py       dalle-ar demo

Library modules never import this package. Handlers import torch-heavy library code when they run,
so that `dalle-ar --help` stays light.
"""

import argparse
import sys

from . import convert, data, demo, generate, tokenizer, train
from .common import parse_args

# The command groups, in the order `dalle-ar --help` lists them.
COMMANDS = [data, tokenizer, train, convert, generate, demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dalle-ar",
        description="Train and sample DALL-E style text-to-image models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMANDS:
        group.add_parser(sub)
    return parser


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
