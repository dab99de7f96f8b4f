"""Step time, samples/s and peak memory of the training engine under ZeRO 0/2/3 and 1 vs 2 processes.

    python bench/train_engine.py [--steps 12] [--batch-size 8]

A fixed small DALL-E prior (dim 256, depth 4, 16 text + 64 image tokens, random tokens) trains through
`dalle_ar.engine.train`. Every configuration runs in fresh processes (clean peak RSS); the 2-process one
goes through `torchrun`, each rank with half the cores. The first steps (warm-up) are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RUNS = "0x1,2x1,3x1,2x2"  # ZeRO stage x processes; the first is the baseline


def worker(args) -> None:
    """One rank: train, then write this rank's timings and peak RSS to args.out/rank<r>.json."""
    from dalle_ar.dalle import DALLE, DALLEConfig
    from dalle_ar.engine import TrainConfig, init_distributed, train

    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    config = DALLEConfig(text_vocab_size=1000, text_len=16, image_vocab_size=512, image_grid=8, dim=256, depth=4,
                         heads=4)
    model = DALLE(config)

    def make_batches(epoch):
        g = torch.Generator().manual_seed(epoch * 100 + rank)
        for _ in range(1000):
            yield {"text": torch.randint(1, 1000, (args.batch_size, 16), generator=g),
                   "codes": torch.randint(0, 512, (args.batch_size, 8, 8), generator=g)}

    stamps = []
    cfg = TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch_size, warmup=2, zero_stage=args.zero,
                      save_every=0, progress=False, tensorboard=False, export=False, log_every=10**6)
    train(model, lambda m, b, step: m(b["text"], b["codes"]), make_batches, cfg, args.out,
          hooks={"on_step": lambda step, parts: stamps.append(time.perf_counter())})
    timed = stamps[args.warmup - 1:]
    result = {"rank": rank, "world": world, "params": sum(p.numel() for p in model.parameters()),
              "step_s": (timed[-1] - timed[0]) / (len(timed) - 1),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))


def launch(zero: int, procs: int, args, tmp: Path) -> list[dict]:
    out = tmp / f"zero{zero}_p{procs}"
    script = [str(Path(__file__).resolve()), "--worker", "--zero", str(zero), "--out", str(out),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dalle_ar" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // procs))
    if procs == 1:
        cmd = [sys.executable, *script]
    else:
        from dalle_ar.engine import free_port

        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--nproc_per_node", str(procs), "--master_port", str(free_port()), *script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch per process")
    p.add_argument("--runs", default=RUNS, help=f"comma list of ZEROxPROCS (default {RUNS})")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--zero", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    print(f"torch {torch.__version__}, {os.cpu_count()} cores; DALLE dim 256 depth 4, 16 + 64 tokens, "
          f"micro-batch {args.batch_size} per process, {args.steps} timed steps after {args.warmup}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs.split(","):
            zero, procs = map(int, run.split("x"))
            t = time.time()
            ranks = launch(zero, procs, args, Path(tmp))
            step_s = max(r["step_s"] for r in ranks)  # the slowest rank sets the pace
            rows.append({"zero": zero, "procs": procs, "params": ranks[0]["params"], "step_s": step_s,
                         "samples_s": args.batch_size * procs / step_s,
                         "rss": max(r["peak_rss_mb"] for r in ranks), "wall": time.time() - t})
    base = rows[0]
    print(f"params {base['params'] / 1e6:.2f}M")
    print(f"{'ZeRO':>4} {'procs':>5} {'step ms':>8} {'samples/s':>9} {'vs base':>7} "
          f"{'peak RSS/rank MB':>16} {'vs base':>7} {'run s':>6}")
    for r in rows:
        print(f"{r['zero']:>4} {r['procs']:>5} {r['step_s'] * 1e3:>8.1f} {r['samples_s']:>9.1f} "
              f"{r['samples_s'] / base['samples_s']:>6.2f}x {r['rss']:>16.0f} {r['rss'] / base['rss']:>6.2f}x "
              f"{r['wall']:>6.1f}")


if __name__ == "__main__":
    main()
