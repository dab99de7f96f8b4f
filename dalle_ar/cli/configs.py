"""`dalle-ar configs`: list the shipped configs, print one, or copy them into a folder to edit."""

from __future__ import annotations

import shutil
from pathlib import Path

from dalle_ar.train import CONFIG_DIR, find_config, shipped_configs


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "configs", help="list, show or copy the shipped stage and DeepSpeed configs",
        description="The shipped configs: stage configs <stage>-<data> (model/train/data sections) and DeepSpeed "
                    "configs zero0-3. Pass a name to --config / --deepspeed-config from any directory "
                    "(`--config dvae-shapes`), or copy them out to edit.")
    p.add_argument("names", nargs="*", metavar="NAME", help="configs to show or copy (default: all)")
    p.add_argument("--copy", metavar="DIR", default=None,
                   help="copy the configs into DIR (an existing file of the same name is refused)")
    p.add_argument("--show", action="store_true", help="print the configs' JSON")
    p.set_defaults(func=_configs)


def _configs(args) -> int:
    paths = [find_config(n) for n in args.names] if args.names else sorted(CONFIG_DIR.glob("*.json"))
    if args.copy:
        out = Path(args.copy)
        taken = [str(out / p.name) for p in paths if (out / p.name).exists()]
        if taken:
            raise ValueError(f"--copy: {', '.join(taken)} already exist(s); remove them or choose another DIR")
        out.mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copyfile(p, out / p.name)
            print(out / p.name)
    elif args.show:
        for p in paths:
            print(f"# {p.stem} ({p})\n{p.read_text().rstrip()}\n")
    else:
        print(f"shipped configs ({CONFIG_DIR}):")
        for name in shipped_configs() if not args.names else [p.stem for p in paths]:
            print(f"  {name}")
    return 0
