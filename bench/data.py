"""Loader throughput on the shapes set at 64 px: samples/s with 0 and 2 workers.

    python bench/data.py [--samples 4000] [--batch-size 64]
"""

import argparse
import tempfile
import time

from dalle_ar.data import ShardLoader
from dalle_ar.data.shapes import generate_shapes


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        generate_shapes(tmp, train_size=args.samples, val_size=0, shard_size=500)
        print(f"generated {args.samples} shapes samples in {time.perf_counter() - t:.1f} s\n")
        print(f"{'workers':>7}  {'decode':>6}  {'samples':>7}  {'seconds':>7}  {'samples/s':>9}")
        for workers in (0, 2):
            loader = ShardLoader(f"{tmp}/shapes-train-*.tar", batch_size=args.batch_size, image_size=64,
                                 num_workers=workers, drop_last=False)
            t = time.perf_counter()
            n = sum(len(b["key"]) for b in loader)  # includes worker start-up, as training sees it
            dt = time.perf_counter() - t
            print(f"{workers:>7}  {'png':>6}  {n:>7}  {dt:>7.2f}  {n / dt:>9.0f}")


if __name__ == "__main__":
    main()
