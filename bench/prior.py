"""Benchmark of the prior: cached vs recomputed sampling, training throughput and MFU, peak memory.

    python bench/prior.py                 # CPU, fp32, about 2 minutes on 2 cores
    python bench/prior.py --device cuda   # bf16 autocast
    python bench/prior.py --threads 2     # CPU threads (default: torch's; 1 when the CPU is busy)

Sampling: batch 8 at 8x8 (64) and 16x16 (256) image tokens, with the KV cache (`DALLE.generate`)
and by recomputing the whole prefix at every step (what a cache-less implementation does). The
per-token cost of the first and the last quarter of the image shows whether a step's cost grows
with the sequence. Training: forward + backward + AdamW steps; model FLOPs = 6 * (block params) *
tokens + the output heads + 12 * depth * dim * seq per token for attention (PaLM appendix B),
as a fraction of a dense matmul rate measured in the same run, before and after training (the
better of the two; fp32 on CPU, bf16 on CUDA). On CUDA the recompute rows also pay the attention
backend's planning for each new sequence length (~60 ms each on an H100 with cuDNN SDPA).
The last two lines are machine-readable: `mfu=<fraction>` and `cache_speedup_256=<ratio>`.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from contextlib import contextmanager, nullcontext

import torch

from common import pick_threads
from dalle_ar.dalle import DALLE, DALLEConfig, sample_logits
from dalle_ar.engine import param_groups


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, dtype, sizes=(1024, 2048), reps: int = 6) -> float:
    """Dense n x n @ n x n matmul FLOP/s: the best of `reps` timings over the sizes (best, so that
    other processes on a shared machine lower the reference as little as they can)."""
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        a @ b
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


class PeakMemory:
    """Peak memory of a block: torch.cuda.max_memory_allocated on CUDA, else the process RSS
    polled every 2 ms by a thread (torch ops release the GIL, so it sees them)."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @contextmanager
    def measure(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self.peak, done = self._rss(), threading.Event()

        def poll():
            while not done.wait(0.002):
                self.peak = max(self.peak, self._rss())

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.peak = max(self.peak, self._rss())


def make_model(args, grid: int, device) -> DALLE:
    torch.manual_seed(0)
    cfg = DALLEConfig(text_vocab_size=args.text_vocab, text_len=args.text_len, image_vocab_size=args.image_vocab,
                      image_grid=grid, dim=args.dim, depth=args.depth, heads=args.heads,
                      attn_types=tuple(args.attn_types.split(",")), conv_kernel=args.conv_kernel, null_prob=0.1)
    return DALLE(cfg).to(device)


@torch.no_grad()
def sample_timed(model: DALLE, text, *, cached: bool, autocast) -> tuple[float, float, float]:
    """Sample one image per prompt at temperature 1 -> (total s, first-quarter and last-quarter
    s/token). Cached: prefill + one `step` per token, the loop of `DALLE.generate`. Recompute: the
    whole [text ; image so far] prefix through the transformer for every token, no cache.

    The device is synchronised only at the quarter marks, so a GPU's launch queue stays full.
    The first quarter starts after token 0 (the prefill).
    """
    model.eval()
    B, N, device = text.shape[0], model.num_image_tokens, text.device
    noise = torch.rand(B, N, generator=torch.Generator().manual_seed(0)).to(device)
    codes = torch.zeros(B, N, dtype=torch.long, device=device)
    cache = model.new_cache() if cached else None
    q = N // 4
    marks = {0, 1, q + 1, N - q, N}
    stamps = {}
    with autocast():
        for i in range(N + 1):
            if i in marks:
                sync(device)
                stamps[i] = time.perf_counter()
            if i == N:
                break
            if cached:
                logits = model.prefill(text, cache) if i == 0 else model.step(codes[:, i - 1], i - 1, cache)
            else:
                x = torch.cat([model.embed_text(text), model.embed_image(codes[:, :i])], dim=1)
                logits = model._image_logits(model.transformer(x)[:, -1])
            codes[:, i] = sample_logits(logits, noise[:, i])
    return stamps[N] - stamps[0], (stamps[q + 1] - stamps[1]) / q, (stamps[N] - stamps[N - q]) / q


def train_flops_per_step(model: DALLE, batch: int) -> float:
    c = model.config
    seq = c.text_len + model.num_image_tokens - 1
    block_params = sum(p.numel() for p in model.transformer.parameters())
    heads = c.dim * ((c.text_vocab_size + c.text_len) * (c.text_len - 1) + c.image_vocab_size * model.num_image_tokens)
    attention = 12 * c.depth * c.dim * seq * seq  # QK^T and AV, forward + backward, per sample
    return batch * (6 * block_params * seq + 6 * heads + attention)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--text-vocab", type=int, default=4096)
    p.add_argument("--image-vocab", type=int, default=1024)
    p.add_argument("--attn-types", default="full", help="comma-separated, cycled over layers")
    p.add_argument("--conv-kernel", type=int, default=5)
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--sample-dim", type=int, default=256, help="model width for sampling (recompute is slow)")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-grid", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=4)
    p.add_argument("--matmul-sizes", default="1024,2048", help="matmul sizes for the reference rate")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, or 1 when the CPU is already busy)")
    args = p.parse_args(argv)
    busy, load = pick_threads(args.threads, args.device)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    mem = PeakMemory(device)
    rows = []

    sizes = [int(n) for n in args.matmul_sizes.split(",")]
    peak = matmul_rate(device, dtype, sizes)
    machine = torch.cuda.get_device_name(device) if cuda else f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} threads"
    print(f"# prior bench: {machine}, torch {torch.__version__}, load avg {load:.2f}"
          + (" (busy: 1 thread; --threads N to override)" if busy else ""))
    print(f"# dense {dtype} matmul (best of n = {args.matmul_sizes}): {peak / 1e9:.1f} GFLOP/s")

    # ---- sampling --------------------------------------------------------------------------
    sample_args = argparse.Namespace(**{**vars(args), "dim": args.sample_dim})
    speedup = {}
    for grid in (8, 16):
        model = make_model(sample_args, grid, device)
        text = torch.randint(1, args.text_vocab, (args.sample_batch, args.text_len),
                             generator=torch.Generator().manual_seed(1)).to(device)
        with autocast():  # warm-up: allocator, kernels of every shape
            model.generate(text, top_k=1)
        results = {}
        for cached in (True, False):
            with mem.measure():
                total, first, last = sample_timed(model, text, cached=cached, autocast=autocast)
            results[cached] = total
            rows.append((f"sample {grid}x{grid} b{args.sample_batch} {'cached' if cached else 'recompute'}",
                         f"{args.sample_batch * grid * grid / total:,.0f} img tok/s",
                         f"first/last quarter {1e3 * first:.2f}/{1e3 * last:.2f} ms/step",
                         f"peak {mem.peak / 2**20:,.0f} MiB"))
        # generate() itself (validation, guidance-free path) on the same prompts, for the record.
        sync(device)
        t = time.perf_counter()
        with autocast():
            model.generate(text, generator=torch.Generator(device).manual_seed(0))
        sync(device)
        rows.append((f"sample {grid}x{grid} b{args.sample_batch} generate()",
                     f"{args.sample_batch * grid * grid / (time.perf_counter() - t):,.0f} img tok/s", "", ""))
        speedup[grid * grid] = results[False] / results[True]
        rows.append((f"  cache speedup at {grid * grid} tokens", f"{speedup[grid * grid]:.1f}x", "", ""))
        del model

    # ---- training --------------------------------------------------------------------------
    model = make_model(args, args.train_grid, device).train()
    opt = torch.optim.AdamW(param_groups(model, 4.5e-2), lr=1e-4, betas=(0.9, 0.96))
    g = torch.Generator().manual_seed(2)
    text = torch.randint(1, args.text_vocab, (args.train_batch, args.text_len), generator=g).to(device)
    codes = torch.randint(0, args.image_vocab, (args.train_batch, args.train_grid, args.train_grid), generator=g).to(device)

    def train_step():
        with autocast():
            loss, _ = model(text, codes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_step()  # warm-up: optimizer state, allocator
    with mem.measure():
        sync(device)
        t = time.perf_counter()
        for _ in range(args.train_steps):
            train_step()
        sync(device)
        step_s = (time.perf_counter() - t) / args.train_steps
    seq = args.text_len + args.train_grid ** 2 - 1
    flops = train_flops_per_step(model, args.train_batch) / step_s
    peak_after = matmul_rate(device, dtype, sizes)  # again, and keep the better: load varies
    print(f"# dense {dtype} matmul after training: {peak_after / 1e9:.1f} GFLOP/s")
    peak = max(peak, peak_after)
    mfu = flops / peak
    rows.append((f"train {args.train_grid}x{args.train_grid} b{args.train_batch} seq {seq}",
                 f"{args.train_batch * seq / step_s:,.0f} tok/s",
                 f"{step_s * 1e3:.0f} ms/step, {flops / 1e9:.1f} GFLOP/s = {mfu:.2f} of {peak / 1e9:.0f}",
                 f"peak {mem.peak / 2**20:,.0f} MiB"))

    n_params = sum(p.numel() for p in model.parameters())
    print(f"# train model dim {args.dim} depth {args.depth} heads {args.heads} ({n_params / 1e6:.1f}M params), "
          f"sample model dim {args.sample_dim}; attn {args.attn_types}; text_len {args.text_len}; "
          f"{'bf16 autocast' if cuda else 'fp32'}; memory = {'max_memory_allocated' if cuda else 'process RSS'}")
    rows = [("run", "throughput", "detail", "peak memory"), ("---",) * 4] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("| " + " | ".join(s.ljust(w) for s, w in zip(r, widths)) + " |")
    print(f"mfu={mfu:.3f}")
    print(f"cache_speedup_256={speedup[256]:.1f}")


if __name__ == "__main__":
    main()
