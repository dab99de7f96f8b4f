"""Benchmark of `dalle-ar serve`: dynamic batching against one request at a time.

    python bench/serve.py                        # an untrained pipeline of the demo's sizes, ~3 min
    python bench/serve.py --model demo/pipeline  # a trained pipeline
    python bench/serve.py --clients 16 --requests 4 --max-batch 16 --candidates 1 --threads 1

Starts `dalle-ar serve` in its own process on a free 127.0.0.1 port, then sends the same
clients x requests generation requests twice: one at a time (each waits for the previous answer:
every batch holds one request), and from `clients` concurrent clients that each send `requests`
back to back (the server merges what waits into batches of up to --max-batch candidates).
Reports images/s, p50/p95 latency, 200/429/lost counts and the mean batch size the server's
/metrics saw. Speed depends on the model only through its sizes, so the default untrained
pipeline (the shapes demo's sizes: 64 px, 8 x 8 codes, a 3-layer 192-wide prior with guidance
1.5, the demo's small CLIP) measures what the demo's trained one would. The last line is
machine-readable: `batching_speedup=<concurrent images/s / one-at-a-time images/s>`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from dalle_ar.serve.app import GENERATIONS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from run_harness import free_port, stop_process  # noqa: E402  (the tests' process helpers)


def build_demo_sized_pipeline(out: Path) -> Path:
    """An untrained pipeline with the shapes demo's sizes (train/configs/*-shapes.json)."""
    from dalle_ar.dalle import DALLE, DALLEConfig
    from dalle_ar.data.shapes import val_captions
    from dalle_ar.dvae import DiscreteVAE, DVAEConfig
    from dalle_ar.pipeline import TextToImagePipeline
    from dalle_ar.clip import SmallCLIPConfig, build_small_clip
    from dalle_ar.rerank import CLIPReranker
    from dalle_ar.tokenizer import TextTokenizer

    torch.manual_seed(0)
    captions = val_captions(200)
    tok = TextTokenizer.train(captions, vocab_size=512)
    dvae = DiscreteVAE(DVAEConfig(image_size=64, n_hid=16, group_count=4, n_blk_per_group=1, vocab_size=256,
                                  n_init=128))
    dalle = DALLE(DALLEConfig(text_vocab_size=tok.vocab_size, text_len=12, image_vocab_size=256,
                              image_grid=dvae.grid_size, dim=192, depth=3, heads=4, guidance_scale=1.5,
                              temperature=0.8))
    clip, clip_tok, processor = build_small_clip(tok, SmallCLIPConfig(), image_size=64, text_len=12)
    for part in (clip, clip_tok, processor):
        part.save_pretrained(out / "clip-src")
    pipe = TextToImagePipeline(tok, dvae, dalle, CLIPReranker.from_pretrained(out / "clip-src"))
    pipe.save_pretrained(out / "pipeline")
    return out / "pipeline"


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"dalle-ar serve exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    sys.exit("dalle-ar serve did not become ready")


def batch_stats(url: str) -> np.ndarray:
    """[sampling batches, candidates in them, then batches of <= 1, 2, 4, 8, 16, 32 candidates] so far,
    from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {(s.name, s.labels.get("le")): s.value
              for f in text_string_to_metric_families(httpx.get(url + "/metrics").text) for s in f.samples}
    return np.array([values.get(("dalle_ar_batch_candidates_count", None), 0.0),
                     values.get(("dalle_ar_batch_candidates_sum", None), 0.0)]
                    + [values.get(("dalle_ar_batch_candidates_bucket", le), 0.0) for le in BUCKETS])


BUCKETS = ("1.0", "2.0", "4.0", "8.0", "16.0", "32.0")


async def run(url: str, prompts: list[str], clients: int, requests: int, candidates: int, concurrent: bool,
              timeout: float) -> dict:
    """Send clients x requests requests; -> outcome counts, latencies, wall time."""
    statuses, latencies = [], []

    async def one(client: httpx.AsyncClient, i: int):
        body = {"prompt": prompts[i % len(prompts)], "n": 1, "candidates": candidates, "seed": i,
                "response_format": "b64_json"}
        t = time.perf_counter()
        try:
            r = await client.post(url + GENERATIONS, json=body)
            statuses.append(r.status_code)
            if r.status_code == 200:
                assert len(r.json()["data"]) == 1
                latencies.append(time.perf_counter() - t)
        except httpx.HTTPError as e:  # lost: neither an answer nor a 429
            statuses.append(type(e).__name__)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        if concurrent:
            async def worker(c: int):
                for r in range(requests):
                    await one(client, c * requests + r)
            await asyncio.gather(*(worker(c) for c in range(clients)))
        else:
            for i in range(clients * requests):
                await one(client, i)
        wall = time.perf_counter() - start
    ok = statuses.count(200)
    return {"sent": len(statuses), "ok": ok, "busy": statuses.count(429),
            "lost": sum(s not in (200, 429) for s in statuses), "wall": wall,
            "images_per_s": ok / wall, "p50": float(np.percentile(latencies, 50)) if latencies else float("nan"),
            "p95": float(np.percentile(latencies, 95)) if latencies else float("nan")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="pipeline directory (default: untrained, the demo's sizes)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--candidates", type=int, default=1, help="candidates per request")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-wait", type=float, default=0.5, help="the server's --batch-wait (seconds)")
    ap.add_argument("--threads", type=int, default=None,
                    help="the server's torch threads (default: 1 when the CPU is busy, else torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=600, help="seconds a client waits for an answer")
    a = ap.parse_args()

    load_before = os.getloadavg()
    threads = a.threads or (1 if a.device == "cpu" and load_before[0] >= (os.cpu_count() or 1) else None)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(a.model) if a.model else build_demo_sized_pipeline(Path(tmp))
        from dalle_ar.data.shapes import val_captions

        prompts = val_captions(32)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [str(Path(sys.executable).with_name("dalle-ar")), "serve", "--model", str(model), "--port", str(port),
               "--max-batch", str(a.max_batch), "--batch-wait", str(a.batch_wait), "--max-queue", str(a.clients * a.requests),
               "--device", a.device]
        if threads:
            cmd += ["--threads", str(threads)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            wait_ready(url, proc)
            asyncio.run(run(url, prompts, 2, 1, a.candidates, True, a.timeout))  # warm-up
            rows = {}
            for mode, concurrent in (("one at a time", False), ("dynamic batching", True)):
                before = batch_stats(url)
                rows[mode] = asyncio.run(run(url, prompts, a.clients, a.requests, a.candidates, concurrent, a.timeout))
                stats = batch_stats(url) - before
                rows[mode]["batch"] = stats[1] / stats[0] if stats[0] else float("nan")
                cumulative = stats[2:]
                rows[mode]["sizes"] = dict(zip((f"<={float(b):g}" for b in BUCKETS),
                                               np.diff(cumulative, prepend=0).astype(int).tolist()))
        finally:
            stop_process(proc)

    load_after = os.getloadavg()
    print(f"\ndalle-ar serve: {a.clients} clients x {a.requests} requests, n=1 of {a.candidates} candidate(s), "
          f"--max-batch {a.max_batch}, --batch-wait {a.batch_wait}, device {a.device}, server threads {threads or torch.get_num_threads()}, "
          f"model {'untrained, demo sizes' if a.model is None else a.model}")
    print(f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f} on {os.cpu_count()} cores\n")
    print(f"{'mode':<18} {'sent':>5} {'200':>5} {'429':>5} {'lost':>5} {'mean batch':>10} {'images/s':>9} "
          f"{'p50 s':>7} {'p95 s':>7} {'wall s':>7}")
    for mode, r in rows.items():
        print(f"{mode:<18} {r['sent']:>5} {r['ok']:>5} {r['busy']:>5} {r['lost']:>5} {r['batch']:>10.1f} "
              f"{r['images_per_s']:>9.2f} {r['p50']:>7.2f} {r['p95']:>7.2f} {r['wall']:>7.1f}")
    for mode, r in rows.items():
        print(f"batches by size, {mode}: " + ", ".join(f"{k}: {v}" for k, v in r["sizes"].items() if v))
    lost = sum(r["lost"] for r in rows.values())
    print(f"\nlost={lost}")
    speedup = rows["dynamic batching"]["images_per_s"] / rows["one at a time"]["images_per_s"]
    print(f"batching_speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
