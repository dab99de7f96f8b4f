"""A tiny deterministic model + data for the engine tests, also runnable as a script under any launcher:

    python tests/engine_toy.py --out DIR --steps N --zero Z [--resume] ...
    deepspeed --num_gpus 2 --master_port P tests/engine_toy.py --out DIR ...   (adds --local_rank)

Regression of a fixed random "teacher" MLP. Each rank writes DIR/toy_<name>_rank<r>.json with the ids of
the batches it trained on (epoch * 1000 + index), the steps it ran and train()'s summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dalle_ar.io import load_config, load_weights, save_pretrained


@dataclass
class ToyConfig:
    in_dim: int = 8
    hidden: int = 32
    out_dim: int = 2


class ToyMLP(nn.Module):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.inp = nn.Linear(config.in_dim, config.hidden)
        self.norm = nn.LayerNorm(config.hidden)
        self.out = nn.Linear(config.hidden, config.out_dim)

    def forward(self, x, y):
        pred = self.out(torch.tanh(self.norm(self.inp(x))))
        loss = nn.functional.mse_loss(pred.float(), y.float())
        return loss, {"mse": loss.detach()}

    def save_pretrained(self, directory, state_dict=None):
        return save_pretrained(directory, self.config, self.state_dict() if state_dict is None else state_dict)

    @classmethod
    def from_pretrained(cls, directory):
        return load_weights(directory, cls(load_config(directory, ToyConfig)))


def make_model(seed: int = 0, config: ToyConfig = ToyConfig()) -> ToyMLP:
    torch.manual_seed(seed)
    return ToyMLP(config)


class ToyData:
    """make_batches(epoch): `per_epoch` batches from a generator seeded by (seed, epoch, rank)."""

    def __init__(self, batch_size=16, per_epoch=7, seed=0, rank=0, config: ToyConfig = ToyConfig()):
        self.batch_size, self.per_epoch, self.seed, self.rank, self.config = batch_size, per_epoch, seed, rank, config
        g = torch.Generator().manual_seed(1234)
        self.w1 = torch.randn(config.in_dim, 16, generator=g)
        self.w2 = torch.randn(16, config.out_dim, generator=g) / 4

    def __call__(self, epoch: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7919 + self.rank * 104_729)
        for i in range(self.per_epoch):
            x = torch.randn(self.batch_size, self.config.in_dim, generator=g)
            y = torch.tanh(x @ self.w1) @ self.w2
            yield {"x": x, "y": y, "id": torch.full((self.batch_size,), epoch * 1000 + i)}


class ToyLoss:
    """loss_fn for the engine: records the batch ids it saw; NaN at `nan_steps` and for batches `nan_ids`."""

    def __init__(self, nan_steps=(), nan_ids=()):
        self.nan_steps, self.nan_ids = set(nan_steps), set(nan_ids)
        self.ids, self.steps = [], []

    def __call__(self, model, batch, step):
        self.ids.append(int(batch["id"][0]))
        self.steps.append(step)
        loss, parts = model(batch["x"], batch["y"])
        if step in self.nan_steps or self.ids[-1] in self.nan_ids:
            loss = loss * float("nan")
        return loss, parts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--per-epoch", type=int, default=7)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--nan-steps", default="", help="comma list of steps whose loss is NaN")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep after each step")
    p.add_argument("--name", default="run", help="tag of the per-rank JSON log")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = p.parse_args(argv)

    from dalle_ar.engine import TrainConfig, init_distributed, train

    init_distributed()
    rank = torch.distributed.get_rank()
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                      min_lr=args.lr / 10, warmup=2, save_every=args.save_every, keep_last=2, log_every=5,
                      zero_stage=args.zero, progress=False, tensorboard=False)
    loss_fn = ToyLoss(int(s) for s in args.nan_steps.split(",") if s)
    hooks = {"on_step": lambda step, parts: time.sleep(args.sleep)} if args.sleep else None
    summary = train(make_model(), loss_fn, ToyData(args.batch_size, args.per_epoch, rank=rank), cfg, args.out,
                    hooks=hooks, resume=args.resume)
    log = {"rank": rank, "world": torch.distributed.get_world_size(), "pid": os.getpid(),
           "ids": loss_fn.ids, "steps": loss_fn.steps, "summary": summary}
    Path(args.out, f"toy_{args.name}_rank{rank}.json").write_text(json.dumps(log, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
