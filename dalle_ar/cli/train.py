"""`dalle-ar train STAGE ...`, `dalle-ar export ...` and `dalle-ar encode ...`.

The same contract for every stage (users and cluster scripts rely on it):

    dalle-ar train STAGE --train-shards PATTERN [--val-shards PATTERN] --out DIR
        [--config FILE.json] [--deepspeed-config FILE.json] [--steps N] [--batch-size B]
        [--save-every N] [--resume] [--init-from EXPORT_DIR] [--threads N] [key=value ...]

The entry scripts train/train_{dvae,dalle,clip}.py run the same code under `deepspeed` or `torchrun`.
"""

from __future__ import annotations

import argparse
import json

from dalle_ar.train import STAGE_NAMES

from .common import add_threads_argument, parse_args, run_command, split_shards, use_formatter


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-shards", default=None,
                   help="training shards: a folder (its *.tar), brace pattern, glob, comma list or pipe: URLs "
                        "(required, except with --resume, which reads the run's stage.json)")
    p.add_argument("--val-shards", default=None,
                   help="validation shards (metrics every train.eval_every steps and at the end, sample grids)")
    p.add_argument("--out", required=True, help="run folder: stage.json, checkpoints/, tb/, samples/, export/")
    p.add_argument("--config", default=None,
                   help="the stage's JSON config (model/train/data sections): a file or a shipped config's name "
                        "(dvae-shapes; `dalle-ar configs` lists them)")
    p.add_argument("--deepspeed-config", default=None,
                   help="DeepSpeed JSON: a file or a shipped name (zero0..zero3; default: zero<train.zero_stage>)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch per process")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint with the run's recorded config (stage.json); "
                        "only steps, save/log/eval cadence and paths may change")
    p.add_argument("--init-from", default=None, metavar="EXPORT_DIR",
                   help="start from these exported weights (an export/ or a pipeline directory) with a fresh "
                        "optimizer and schedule: fine-tuning; the model config must match (docs/training.md)")
    add_threads_argument(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override a config field: model.dim=256, train.lr=3e-4, ds.zero_optimization.stage=3")


class StageHelp(argparse.Action):
    """-h/--help of one stage: the options, then what the stage needs and its config keys with defaults
    (read from the stage's config classes, so it loads torch: only when asked for)."""

    def __init__(self, option_strings, dest, stage: str = "", **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.stage = stage

    def __call__(self, parser, namespace, values, option_string=None):
        from dalle_ar.train.stages import describe_stage

        parser.print_help()
        print("\n" + describe_stage(self.stage))
        parser.exit()


def stage_parser(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("-h", "--help", action=StageHelp, stage=stage,
                   help="show this help, what the stage needs and its config keys with defaults, and exit")
    add_train_arguments(p)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a stage (dvae, dalle, clip) through the DeepSpeed engine",
                              description="\n\n".join(__doc__.split("\n\n")[1:3])
                              + "\n\n`dalle-ar train STAGE --help` lists what the stage needs and its config keys.")
    sub = p.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage in STAGE_NAMES:
        s = sub.add_parser(stage, help=f"train the {stage} stage", add_help=False,
                           description=f"Train the {stage} stage (docs/training.md).")
        stage_parser(s, stage)
        s.set_defaults(func=_train)

    p = subparsers.add_parser("export", help="consolidate a run's newest checkpoint into config.json + model.safetensors")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="a run folder (from `dalle-ar train`) or its checkpoints/")
    p.add_argument("--out", required=True, help="folder to write config.json + model.safetensors (and the "
                                                "stage's extra files) into")
    p.set_defaults(func=_export)

    p = subparsers.add_parser("encode", help="pre-encode shards with an image tokenizer (adds codes.npy to each sample)")
    p.add_argument("--dvae", "--image-tokenizer", dest="dvae", required=True,
                   help="image tokenizer directory: a dVAE or a VQGAN (config.json + model.safetensors)")
    p.add_argument("--shards", required=True,
                   help="input shards: a folder (its *.tar), a brace pattern, a glob or a comma list")
    p.add_argument("--out", required=True, help="output folder for the code shards")
    p.add_argument("--prefix", default=None,
                   help="output shard name prefix (default: the input shards' prefix + '-codes', e.g. train-codes)")
    p.add_argument("--batch-size", type=int, default=64, help="images encoded at once")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per output shard")
    p.add_argument("--keep-images", action="store_true", help="also copy the image bytes")
    p.add_argument("--overwrite", action="store_true",
                   help="replace code shards of this prefix that other input shards wrote (refused otherwise)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.set_defaults(func=_encode)


def entry_main(stage: str, argv=None) -> int:
    """main() of train/train_<stage>.py: the train command for one stage, under any launcher."""
    p = argparse.ArgumentParser(prog=f"python -m dalle_ar.train.train_{stage}", add_help=False,
                                description=f"Train the {stage} stage (the same as `dalle-ar train {stage}`).")
    stage_parser(p, stage)
    use_formatter(p)
    args = parse_args(p, argv)
    args.stage = stage
    return run_command(f"train {stage}", _train, args)


# Handlers: the stages pull in torch, transformers and DeepSpeed, so they load when a command runs.

def _train(args) -> int:
    from dalle_ar.train.stages import run_stage

    result = run_stage(args.stage, split_shards(args.train_shards), args.out, val_shards=split_shards(args.val_shards),
                       config_file=args.config, ds_config=args.deepspeed_config, overrides=args.overrides,
                       steps=args.steps, batch_size=args.batch_size, save_every=args.save_every, resume=args.resume,
                       init_from=args.init_from, threads=args.threads)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _export(args) -> int:
    from dalle_ar.train.stages import export_run

    out = export_run(args.ckpt_dir, args.out)
    print(f"exported to {out}")
    return 0


def _encode(args) -> int:
    from dalle_ar.train.encode import encode_shards

    summary = encode_shards(args.dvae, split_shards(args.shards), args.out, batch_size=args.batch_size,
                            shard_size=args.shard_size, keep_images=args.keep_images, device=args.device,
                            prefix=args.prefix, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0
