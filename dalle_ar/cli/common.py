"""What the command modules share: argument parsing that lets `key=value` overrides follow options,
the help formatter that shows every option's default, and running a handler as a command (errors as
`dalle-ar CMD: error: ...`, exit 2)."""

import argparse
import sys


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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; an option's help ends with its default where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings and "default" not in text):
            text += " (default: %(default)s)"
        return text


def use_formatter(parser: argparse.ArgumentParser) -> None:
    """Give `parser` and every sub-parser below it the HelpFormatter."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                use_formatter(sub)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for torch (default: the cores this process may use, less the busy ones "
                        "by load average, at least 1; a warning when the machine is busy)")


def run_command(command: str, fn, *args) -> int:
    """fn(*args) as a command: bad input (ValueError, or an OSError such as a missing file or an --out that
    is a file) is `dalle-ar COMMAND: error: ...` with exit 2; Ctrl-C is exit 130, both without a traceback."""
    try:
        return int(fn(*args) or 0)
    except KeyboardInterrupt:
        print(f"\ndalle-ar {command}: interrupted; what was written so far is kept (run the same command "
              f"again to continue)", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"dalle-ar {command}: error: {e}", file=sys.stderr)
        return 2
