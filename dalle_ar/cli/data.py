"""`dalle-ar data {folder,csv,shapes,digits}`: write WebDataset shards.

Each command prints a JSON summary (samples written, skipped by reason) and saves it as
OUT/summary.json.
"""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    data = subparsers.add_parser("data", help="write WebDataset shards (built-in sets or your images)")
    sub = data.add_subparsers(dest="data_command", metavar="SOURCE", required=True)

    def common(p, shard_size, source=None):
        p.add_argument("--out", required=True, help="output folder for the .tar shards")
        p.add_argument("--shard-size", type=int, default=shard_size, help="samples per shard")
        if source:  # the writers of your own images
            p.add_argument("--resize", type=int, default=None, metavar="N", help="shrink the longer side to N px")
            p.add_argument("--prefix", default=None, help=f"shard name prefix (default: the {source}'s name)")

    p = sub.add_parser("folder", help="images with same-stem .txt captions (one caption a line)")
    p.add_argument("src", metavar="SRC", help="folder of images (searched recursively)")
    common(p, 1000, "folder")
    p.set_defaults(func=_folder)

    p = sub.add_parser("csv", help="a csv with columns path,caption (paths relative to the csv)")
    p.add_argument("file", metavar="FILE", help="csv file")
    common(p, 1000, "csv")
    p.set_defaults(func=_csv)

    p = sub.add_parser("shapes", help="the built-in procedural shapes set (specs/shapes.md)")
    common(p, 1000)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_shapes)

    p = sub.add_parser("digits", help="scikit-learn's 1797 handwritten digit scans at 64x64")
    common(p, 500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_digits)


def _report(out, summary: dict) -> int:
    from dalle_ar.io import write_json  # torch: loaded by the commands, not by --help

    write_json(f"{out}/summary.json", summary)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def _folder(args) -> int:
    from dalle_ar.data.writers import write_folder

    return _report(args.out, write_folder(args.src, args.out, shard_size=args.shard_size, resize=args.resize,
                                          prefix=args.prefix))


def _csv(args) -> int:
    from dalle_ar.data.writers import write_csv

    return _report(args.out, write_csv(args.file, args.out, shard_size=args.shard_size, resize=args.resize,
                                       prefix=args.prefix))


def _shapes(args) -> int:
    from dalle_ar.data.shapes import generate_shapes

    return _report(args.out, generate_shapes(args.out, train_size=args.train_size, val_size=args.val_size,
                                             shard_size=args.shard_size, seed=args.seed))


def _digits(args) -> int:
    from dalle_ar.data.digits import generate_digits

    return _report(args.out, generate_digits(args.out, seed=args.seed, shard_size=args.shard_size))
