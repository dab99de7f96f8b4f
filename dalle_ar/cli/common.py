"""What the command modules share: argument parsing that lets `key=value` overrides follow options."""

import argparse


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parse_args, except that `key=value` overrides may also come after options (argparse alone
    stops collecting a positional list at the first option)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def split_shards(text):
    """A comma list of shards -> a list; a brace pattern (or one path) stays a string."""
    if text is None:
        return None
    return [s for s in text.split(",") if s] if "," in text and "{" not in text else text
