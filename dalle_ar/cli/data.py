"""`dalle-ar data {folder,csv,shapes,digits}`: write WebDataset shards.

Each command prints a JSON summary (samples written, skipped by reason); the writers of your own
images save it as OUT/PREFIX-summary.json (one per prefix: a second writer never overwrites it, and
shards another source wrote under the same prefix are refused without --overwrite), the built-in
sets as OUT/summary.json.
"""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    data = subparsers.add_parser("data", help="write WebDataset shards (built-in sets or your images)")
    sub = data.add_subparsers(dest="data_command", metavar="SOURCE", required=True)

    def common(p, shard_size, source=None):
        p.add_argument("--out", required=True,
                       help="output folder for the .tar shards (one folder per split: shards/train/, shards/val/)")
        p.add_argument("--shard-size", type=int, default=shard_size, help="samples per shard")
        if source:  # the writers of your own images
            p.add_argument("--resize", type=int, default=None, metavar="N",
                           help="shrink the longer side to N px (default: keep the size)")
            p.add_argument("--prefix", default=None,
                           help=f"shard name prefix: PREFIX-000000.tar ... and PREFIX-summary.json "
                                f"(default: the {source}'s name)")
            p.add_argument("--overwrite", action="store_true",
                           help="replace shards of this prefix that another source wrote (refused otherwise)")

    p = sub.add_parser("folder", help="images with same-stem .txt captions (one caption a line)")
    p.add_argument("src", metavar="SRC", help="folder of images (searched recursively)")
    common(p, 1000, "folder")
    p.set_defaults(func=_folder)

    p = sub.add_parser("csv", help="a csv with columns path,caption (paths relative to the csv)")
    p.add_argument("file", metavar="FILE", help="csv file")
    common(p, 1000, "csv")
    p.set_defaults(func=_csv)

    p = sub.add_parser("shapes", help="the built-in procedural shapes set (coloured shapes on a plain background)",
                       description="The built-in procedural shapes set: one or two coloured shapes on a plain "
                                   "64x64 background, captioned by colour, size, shape and place "
                                   "(dalle_ar.data.shapes documents the grammar). Writes shapes-train-*.tar and "
                                   "shapes-val-*.tar into OUT.")
    common(p, 1000)
    p.add_argument("--train-size", type=int, default=20000, help="training samples")
    p.add_argument("--val-size", type=int, default=1000, help="validation samples")
    p.add_argument("--seed", type=int, default=0, help="random seed (the same seed writes the same shards)")
    p.set_defaults(func=_shapes)

    p = sub.add_parser("digits", help="scikit-learn's 1797 handwritten digit scans at 64x64")
    common(p, 500)
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split and augmentation")
    p.set_defaults(func=_digits)


def _report(out, summary: dict, whole_folder: bool = False) -> int:
    """Print the summary; the built-in sets own their folder and also save it as OUT/summary.json (your
    own images' writers save PREFIX-summary.json themselves, so two writers never overwrite each other's)."""
    if whole_folder:
        from dalle_ar.io import write_json  # torch: loaded by the commands, not by --help

        write_json(f"{out}/summary.json", summary)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def _folder(args) -> int:
    from dalle_ar.data.writers import write_folder

    return _report(args.out, write_folder(args.src, args.out, shard_size=args.shard_size, resize=args.resize,
                                          prefix=args.prefix, overwrite=args.overwrite))


def _csv(args) -> int:
    from dalle_ar.data.writers import write_csv

    return _report(args.out, write_csv(args.file, args.out, shard_size=args.shard_size, resize=args.resize,
                                       prefix=args.prefix, overwrite=args.overwrite))


def _shapes(args) -> int:
    from dalle_ar.data.shapes import generate_shapes

    return _report(args.out, generate_shapes(args.out, train_size=args.train_size, val_size=args.val_size,
                                             shard_size=args.shard_size, seed=args.seed), whole_folder=True)


def _digits(args) -> int:
    from dalle_ar.data.digits import generate_digits

    return _report(args.out, generate_digits(args.out, seed=args.seed, shard_size=args.shard_size), whole_folder=True)
