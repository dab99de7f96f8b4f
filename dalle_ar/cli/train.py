"""`dalle-ar train STAGE ...`, `dalle-ar export ...` and `dalle-ar encode ...`.

The same contract for every stage (users and cluster scripts rely on it):

    dalle-ar train STAGE --train-shards PATTERN [--val-shards PATTERN] --out DIR
        [--config FILE.json] [--deepspeed-config FILE.json] [--steps N] [--batch-size B]
        [--save-every N] [--resume] [key=value ...]

The entry scripts train/train_{dvae,dalle,clip}.py run the same code under `deepspeed` or `torchrun`.
"""

from __future__ import annotations

import argparse
import json

from dalle_ar.train import STAGE_NAMES

from .common import parse_args, split_shards


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-shards", required=True, help="brace pattern or comma list of shard paths/URLs")
    p.add_argument("--val-shards", default=None, help="validation shards (sample grids, metrics)")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, tb/, samples/, export/")
    p.add_argument("--config", default=None, help="the stage's JSON config (model/train/data sections)")
    p.add_argument("--deepspeed-config", default=None,
                   help="DeepSpeed JSON (default: train/configs/zero<train.zero_stage>.json)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch per process")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override a config field: model.dim=256, train.lr=3e-4, ds.zero_optimization.stage=3")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a stage (dvae, dalle, clip) through the DeepSpeed engine",
                              description="\n\n".join(__doc__.split("\n\n")[1:3]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=list(STAGE_NAMES))
    add_train_arguments(p)
    p.set_defaults(func=_train)

    p = subparsers.add_parser("export", help="consolidate a run's newest checkpoint into config.json + model.safetensors")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="a run folder (from `dalle-ar train`) or its checkpoints/")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_export)

    p = subparsers.add_parser("encode", help="pre-encode shards with an image tokenizer (adds codes.npy to each sample)")
    p.add_argument("--dvae", "--image-tokenizer", dest="dvae", required=True,
                   help="image tokenizer directory: a dVAE or a VQGAN (config.json + model.safetensors)")
    p.add_argument("--shards", required=True, help="brace pattern or comma list of input shards")
    p.add_argument("--out", required=True, help="output folder for the code shards")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=5000)
    p.add_argument("--keep-images", action="store_true", help="also copy the image bytes")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_encode)


def entry_main(stage: str, argv=None) -> int:
    """main() of train/train_<stage>.py: the train command for one stage, under any launcher."""
    p = argparse.ArgumentParser(prog=f"train_{stage}.py", description=f"Train the {stage} stage.")
    add_train_arguments(p)
    args = parse_args(p, argv)
    args.stage = stage
    return _train(args)


# Handlers: the stages pull in torch, transformers and DeepSpeed, so they load when a command runs.

def _train(args) -> int:
    from dalle_ar.train.stages import run_stage

    result = run_stage(args.stage, split_shards(args.train_shards), args.out, val_shards=split_shards(args.val_shards),
                       config_file=args.config, ds_config=args.deepspeed_config, overrides=args.overrides,
                       steps=args.steps, batch_size=args.batch_size, save_every=args.save_every, resume=args.resume)
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
                            shard_size=args.shard_size, keep_images=args.keep_images, device=args.device)
    print(json.dumps(summary, indent=2))
    return 0
