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


# ---- decode efficiency -----------------------------------------------------------------------

def decode_shapes(model: DALLE, batch: int):
    """The matmuls of each decoding step after the prefill (steps 1 .. N-1), per step: a list of
    ("mm", m, k, n) and ("bmm", batches, m, k, n) with the keys a step attends over (written slots)."""
    c = model.config
    d = c.dim // c.heads
    steps = []
    for i in range(1, model.num_image_tokens):
        keys = c.text_len + i  # the step feeding image code i - 1 at position text_len + i - 1
        layer = [("mm", batch, c.dim, 3 * c.dim), ("bmm", batch * c.heads, 1, d, keys),
                 ("bmm", batch * c.heads, 1, keys, d), ("mm", batch, c.dim, c.dim),
                 ("mm", batch, c.dim, c.ff_mult * c.dim), ("mm", batch, c.ff_mult * c.dim, c.dim)]
        steps.append(layer * c.depth + [("mm", batch, c.dim, c.image_vocab_size)])
    return steps


def shape_flops(shape) -> int:
    return 2 * (shape[1] * shape[2] * shape[3] if shape[0] == "mm" else shape[1] * shape[2] * shape[3] * shape[4])


class MatmulOnlyDecode:
    """The decode steps' own matmuls and nothing else: the model's weights, a KV cache of the
    model's size read over the slots each step attends to, every operand prepared before timing.
    Its time is the reference: efficiency = this time / the real steps' time (same FLOPs)."""

    def __init__(self, model: DALLE, batch: int):
        c, dev = model.config, model.text_emb.weight.device
        d, heads = c.dim // c.heads, c.heads
        g = torch.Generator().manual_seed(3)
        kv = torch.randn(c.depth, 2, batch, heads, model.transformer.max_len, d, generator=g).to(dev)
        blocks = model.transformer.blocks
        self.weights = [(b.attn.qkv.weight.t(), b.attn.proj.weight.t(), b.mlp.fc.weight.t(), b.mlp.proj.weight.t())
                        for b in blocks]
        self.head = (model.image_head.weight if model.image_head is not None else model.image_emb.weight).t()
        self.h = torch.randn(batch, c.dim, generator=g).to(dev)
        self.h4 = torch.randn(batch, c.ff_mult * c.dim, generator=g).to(dev)
        self.q = torch.randn(batch * heads, 1, d, generator=g).to(dev)
        self.keys = [c.text_len + i for i in range(1, model.num_image_tokens)]
        self.kt = {n: [kv[l, 0, :, :, :n].flatten(0, 1).transpose(1, 2) for l in range(c.depth)] for n in self.keys}
        self.v = {n: [kv[l, 1, :, :, :n].flatten(0, 1) for l in range(c.depth)] for n in self.keys}
        p = torch.rand(batch * heads * max(self.keys), generator=g).to(dev)
        self.p = {n: p[:batch * heads * n].view(batch * heads, 1, n) for n in self.keys}

    def run(self):
        mm, bmm, h, h4, q = torch.mm, torch.bmm, self.h, self.h4, self.q
        for n in self.keys:
            p = self.p[n]
            for (wqkv, wproj, wfc, wout), kt, v in zip(self.weights, self.kt[n], self.v[n]):
                mm(h, wqkv)
                bmm(q, kt)
                bmm(p, v)
                mm(h, wproj)
                mm(h, wfc)
                mm(h4, wout)
            mm(h, self.head)


def step_clock():
    """The decode rows' clock: with one torch thread, this process's CPU time, which other jobs on
    a shared machine do not inflate (the scheduler's share does not count; caches they evict
    still do); with more threads or on CUDA, wall time."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def decode_timed(model: DALLE, text, top_k: int, *, legacy: bool, device) -> float:
    """Seconds per decoding step (one model step + one draw), steps 1 .. N-1 of a generation.

    legacy: the previous release's step, kept here to measure against: a static cache (every
    step attends over all slots behind a mask row) and the module path (embed_image, the blocks'
    forward with SDPA, the head). Otherwise `DALLE.generate` itself, stamped by its callback.
    """
    N, T = model.num_image_tokens, model.config.text_len
    stamps, clock = {}, step_clock() if device.type == "cpu" else time.perf_counter

    def stamp(i, _codes):
        if i in (0, N - 1):
            sync(device)
            stamps[i] = clock()

    g = torch.Generator(device).manual_seed(0)
    if not legacy:
        model.generate(text, top_k=top_k, generator=g, callback=stamp)
    else:
        with torch.no_grad():
            noise = torch.rand(text.shape[0], N, generator=g, device=device)
            cache = model.new_cache(static=True)
            logits = model.prefill(text, cache)
            for i in range(N):
                tok = sample_logits(logits, noise[:, i], 1.0, top_k)
                stamp(i, None)
                if i + 1 < N:
                    x = model.embed_image(tok[:, None], i)
                    logits = model._image_logits(model.transformer(x, cache, start=T + i)[:, -1])
    return (stamps[N - 1] - stamps[0]) / (N - 1)


def decode_efficiency(args, device, rows) -> dict:
    """For each image size and batch: before (legacy) and after ms/step, the matmul-only
    reference, interleaved `--decode-reps` times (best of each), -> {(tokens, batch): efficiency}."""
    eff = {}
    shape = argparse.Namespace(dim=256, depth=4, heads=8, text_vocab=1000, text_len=32, image_vocab=512,
                               attn_types="full", conv_kernel=5)
    top_k = shape.image_vocab // 10
    for grid in (8, 16):
        model = make_model(shape, grid, device).eval()
        for batch in (8, 64):
            text = torch.randint(1, shape.text_vocab, (batch, shape.text_len),
                                 generator=torch.Generator().manual_seed(1)).to(device)
            steps = decode_shapes(model, batch)
            flops = sum(shape_flops(s) for step in steps for s in step) / len(steps)
            ref = MatmulOnlyDecode(model, batch)
            ref.run()  # warm-up
            model.generate(text[:, :], top_k=top_k)
            best = {"before": float("inf"), "after": float("inf"), "ref": float("inf")}
            for _ in range(args.decode_reps):
                best["before"] = min(best["before"], decode_timed(model, text, top_k, legacy=True, device=device))
                best["after"] = min(best["after"], decode_timed(model, text, top_k, legacy=False, device=device))
                clock = step_clock() if device.type == "cpu" else time.perf_counter
                sync(device)
                t = clock()
                ref.run()
                sync(device)
                best["ref"] = min(best["ref"], (clock() - t) / len(steps))
            e_before, e_after = best["ref"] / best["before"], best["ref"] / best["after"]
            eff[(grid * grid, batch)] = e_after
            rows.append((f"decode {grid * grid} tok b{batch}",
                         f"{1e3 * best['before']:.2f} -> {1e3 * best['after']:.2f} ms/step",
                         f"matmul-only {1e3 * best['ref']:.2f} ms ({flops / best['ref'] / 1e9:.1f} GFLOP/s), "
                         f"{flops / 1e6:.1f} MFLOP/step",
                         f"efficiency {e_before:.2f} -> {e_after:.2f}",
                         f"{batch / best['before']:,.0f} -> {batch / best['after']:,.0f} img tok/s"))
        del model
    return eff


# ---- threads ---------------------------------------------------------------------------------

COMPETITOR = ("import torch, time; torch.set_num_threads({n}); a = torch.randn(512, 512)\n"
              "end = time.time() + {seconds}\nwhile time.time() < end: a @ a")


def threads_policy(args, device, rows) -> None:
    """Wall time to sample 16 candidates (batch 16, 64 image tokens, the decode shape) with torch's
    default thread count (all cores), the `dalle_ar.threads` policy's pick and 1 thread, first as
    the machine is, then beside a competing process that keeps every core busy with matmuls."""
    import subprocess
    import sys

    from dalle_ar import threads as th

    shape = argparse.Namespace(dim=256, depth=4, heads=8, text_vocab=1000, text_len=32, image_vocab=512,
                               attn_types="full", conv_kernel=5)
    model = make_model(shape, 8, device).eval()
    text = torch.randint(1, 1000, (1, 32), generator=torch.Generator().manual_seed(1)).expand(16, -1)
    cores, before = th.available_cores(), torch.get_num_threads()

    def timed(n):
        torch.set_num_threads(n)
        model.generate(text[:2], top_k=51)  # warm-up at this thread count
        t = time.perf_counter()
        model.generate(text, top_k=51, generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - t

    for label in ("as is", "competing"):
        proc = None
        if label == "competing":
            proc = subprocess.Popen([sys.executable, "-c", COMPETITOR.format(n=cores, seconds=300)])
            time.sleep(3)
        try:
            pick = th.pick_threads(warn=False)
            load = th.load_average()
            times = {f"default {cores}": timed(cores), f"policy {pick}": timed(pick), "1": timed(1)}
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
        rows.append((f"16 candidates, {label} (load {load:.1f}, {cores} cores)",
                     *(f"{k} thr: {v:.2f} s" for k, v in times.items())))
    torch.set_num_threads(before)


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
    p.add_argument("--sections", default="decode,sample,train",
                   help="comma-separated: decode (efficiency at the issue-20 shape), sample (cache vs recompute), "
                        "train (throughput and MFU), threads (the thread policy idle and beside a competing "
                        "process; not in the default set)")
    p.add_argument("--decode-reps", type=int, default=3, help="interleaved timings per decode row (best kept)")
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
    sections = set(args.sections.split(","))
    unknown = sections - {"decode", "sample", "train", "threads"}
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}")

    sizes = [int(n) for n in args.matmul_sizes.split(",")]
    peak = matmul_rate(device, dtype, sizes)
    machine = torch.cuda.get_device_name(device) if cuda else f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} threads"
    print(f"# prior bench: {machine}, torch {torch.__version__}, load avg {load:.2f}"
          + (" (busy: 1 thread; --threads N to override)" if busy else ""))
    print(f"# dense {dtype} matmul (best of n = {args.matmul_sizes}): {peak / 1e9:.1f} GFLOP/s")

    # ---- decode efficiency -------------------------------------------------------------------
    eff = {}
    if "decode" in sections:
        decode_rows = []
        eff = decode_efficiency(args, device, decode_rows)
        print("# decode: dim 256, depth 4, 8 heads, text vocab 1000 x 32, image vocab 512, dense, top-k 51, "
              "no guidance; before = the previous release's step, efficiency = matmul-only time / step time; "
              + ("clock: process CPU time (1 thread)" if step_clock() is time.process_time and not cuda else "clock: wall"))
        print_table(("run", "before -> after", "reference", "efficiency", "throughput"), decode_rows)

    if "threads" in sections and not cuda:
        thread_rows = []
        threads_policy(args, device, thread_rows)
        print("# threads: wall time of DALLE.generate, 16 candidates x 64 tokens (the decode shape)")
        print_table(("run", "torch default", "dalle_ar.threads policy", "one thread"), thread_rows)

    # ---- sampling --------------------------------------------------------------------------
    sample_args = argparse.Namespace(**{**vars(args), "dim": args.sample_dim})
    speedup = {}
    for grid in ((8, 16) if "sample" in sections else ()):
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
    mfu = None
    if "train" in sections:
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

    if "train" in sections:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"# train model dim {args.dim} depth {args.depth} heads {args.heads} ({n_params / 1e6:.1f}M params), "
              f"sample model dim {args.sample_dim}; attn {args.attn_types}; text_len {args.text_len}; "
              f"{'bf16 autocast' if cuda else 'fp32'}; memory = {'max_memory_allocated' if cuda else 'process RSS'}")
    if rows:
        print_table(("run", "throughput", "detail", "peak memory"), rows)
    if mfu is not None:
        print(f"mfu={mfu:.3f}")
    if speedup:
        print(f"cache_speedup_256={speedup[256]:.1f}")
    for batch in (8, 64):
        if eff:
            print(f"decode_efficiency_b{batch}={min(eff[(n, batch)] for n in (64, 256)):.2f}")


def print_table(header, rows) -> None:
    rows = [tuple(header), ("---",) * len(header)] + list(rows)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("| " + " | ".join(s.ljust(w) for s, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    main()
