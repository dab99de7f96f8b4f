"""The `dalle-ar` command line, the one CLI layer: it parses arguments and calls library functions.

One module per command group, each with `add_parser(subparsers)`:

    data.py       dalle-ar data {shapes,digits,folder,csv}
    tokenizer.py  dalle-ar tokenizer train
    train.py      dalle-ar train {dvae,dalle,clip}, export, encode (and train/train_<stage>.py)
    configs.py    dalle-ar configs (list, show, copy the shipped configs)
    convert.py    dalle-ar convert openai-dvae
    generate.py   dalle-ar pipeline, dalle-ar generate
    demo.py       dalle-ar demo
    serve.py      dalle-ar serve (the HTTP server: dalle_ar.serve, the serve extra)

Library modules never import this package. Handlers import torch-heavy library code when they run,
so that `dalle-ar --help` stays light.
"""

import argparse
import sys

from . import configs, convert, data, demo, generate, serve, tokenizer, train
from .common import parse_args, run_command, use_formatter

# The command groups, in the order `dalle-ar --help` lists them.
COMMANDS = [data, tokenizer, train, configs, convert, generate, demo, serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dalle-ar",
        description="Train and sample DALL-E style text-to-image models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMANDS:
        group.add_parser(sub)
    use_formatter(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    return run_command(args.command, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
