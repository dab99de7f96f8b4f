"""Image tokenizers side by side: the dVAE and the VQ family, same budget, same `shapes` val scenes.

    python bench/image_tokenizers.py                          # dVAE + the FSQ dVAE, 3 seeds, photos, throughput
    python bench/image_tokenizers.py --minutes 0.5 --seeds 0  # smoke run
    python bench/image_tokenizers.py --sections shapes --kinds vq --vq-config train/configs/vqgan-shapes.json

(a) shapes: each tokenizer trains for --minutes (plain loop, AdamW + warm-up/cosine LR as the
    engine; the LR schedule follows the clock so it ends on time) on 64x64 `shapes` train scenes,
    then reconstructs the val scenes: exact by the spec checker (shapes.check_image), one-object and
    two-object scenes apart, PSNR, codes used. Per seed and the worst over seeds.
(b) photos: 64x64 crops of the scikit-image photos (3 held out), PSNR and codes used.
(c) encode/decode images/s at 64 px (the shipped config) and 256 px (an f16 ImageNet-size VQGAN:
    ch 128, ch_mult 1,1,2,2,4, 2 blocks, attention at 16, 1024 codes; random weights).
--clock cpu measures the budget in this process's CPU seconds / the core count instead of wall
seconds: on a machine shared with other jobs it grants the steps an idle machine would run.
Last line: vq_exact_worst=<fraction> (the VQ config's worst seed, one- and two-object scenes together).
The VQ config (--vq-config) is a stage config JSON: a VQGAN's, or a dVAE-body one ("kind": "dvae", its FSQ quantizer).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from common import pick_threads
from dalle_ar.dvae import DiscreteVAE, DVAEConfig, codebook_usage, psnr
from dalle_ar.engine import TrainConfig, lr_at, param_groups
from dalle_ar.io import config_from_dict
from dalle_ar.vqgan import VQGAN, VQGANConfig
from dvae import model_config as dvae_model_config
from dvae import photo_data, random_crop, shapes_data

ROOT = Path(__file__).resolve().parent.parent
VQ_CONFIG = ROOT / "train" / "configs" / "dvae-fsq-shapes.json"


class Clock:
    """Seconds since start: wall time, or this process's CPU time / cores (--clock cpu)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.t0 = self.now()

    def now(self) -> float:
        return time.process_time() / (os.cpu_count() or 1) if self.kind == "cpu" else time.time()

    def elapsed(self) -> float:
        return self.now() - self.t0


def load_vq_config(path, image_size: int = 64):
    """(VQGANConfig or DVAEConfig, train settings) from a stage config JSON ({"model": {...}, "train": {...}});
    a model section with "kind": "dvae" is a dVAE-body config (e.g. its FSQ quantizer)."""
    d = json.loads(Path(path).read_text())
    model = {**d["model"], "image_size": image_size}
    cls = DVAEConfig if model.get("kind") == "dvae" else VQGANConfig
    return config_from_dict(cls, model), d.get("train", {})


def build_vq(config):
    return DiscreteVAE(config) if isinstance(config, DVAEConfig) else VQGAN(config)


def train(model, next_batch, steps: int, lr: float, warmup: int, budget_s: float, clock: str, log_every: int = 0):
    """AdamW + warm-up/cosine LR as the engine; the LR follows the clock (planned step = steps * elapsed / budget)."""
    cfg = TrainConfig(steps=steps, batch_size=1, lr=lr, min_lr=lr / 10, warmup=warmup)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=cfg.betas)
    model.train()
    c, done, parts = Clock(clock), 0, {}
    while True:
        at = int(steps * c.elapsed() / budget_s) if budget_s else done
        if at >= steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(at, cfg)
        loss, parts = model(next_batch(), step=at)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        done += 1
        if log_every and done % log_every == 0:
            print(f"  step {done:5d} (plan {at:5d}) {c.elapsed():6.1f}s loss {float(loss):.4f} "
                  + " ".join(f"{k} {float(v):.3g}" for k, v in parts.items()), flush=True)
    return {"steps": done, "train_s": c.elapsed()}


def time_steps(make_model, next_batch, lr: float, clock: str, n: int = 6) -> float:
    """Seconds a training step takes (on `clock`), timed on a throw-away model after 2 warm-up steps."""
    model = make_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for i in range(n + 2):
        if i == 2:
            c = Clock(clock)
        loss, _ = model(next_batch(), step=i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return c.elapsed() / n


@torch.no_grad()
def reconstruct(model, images_u8: torch.Tensor, batch: int = 128):
    model.eval()
    recons, codes = [], []
    for i in range(0, len(images_u8), batch):
        x = images_u8[i:i + batch].float() / 255
        cds = model.encode(x)
        recons.append(model.decode(cds))
        codes.append(cds)
    return torch.cat(recons), torch.cat(codes)


def judge_shapes(recons, images_u8, codes, vocab, attrs) -> dict:
    from dalle_ar.data.shapes import check_image

    exact = np.array([check_image(r, a)["exact"] for r, a in zip(recons, attrs)])
    two = np.array([len(a["objects"]) == 2 for a in attrs])
    usage = codebook_usage(codes, vocab)
    return {"exact": float(exact.mean()), "exact_one": float(exact[~two].mean()), "exact_two": float(exact[two].mean()),
            "psnr": float(psnr(recons, images_u8.float() / 255)), "codes_used": int(codes.unique().numel()),
            "perplexity": usage["perplexity"]}


def make_tokenizer(kind: str, a, seed: int):
    torch.manual_seed(seed)
    if kind == "dvae":
        return DiscreteVAE(dvae_model_config(a.dvae_args))
    config, _ = load_vq_config(a.vq_config)
    return build_vq(config)


def settings(kind: str, a) -> dict:
    if kind == "dvae":
        return {"lr": a.dvae_args.lr, "batch_size": a.dvae_args.batch_size, "warmup": a.dvae_args.warmup}
    _, t = load_vq_config(a.vq_config)
    return {"lr": t.get("lr", 2e-3), "batch_size": t.get("batch_size", 16), "warmup": t.get("warmup", 50)}


def bench_shapes(kind: str, a, seed: int, data) -> dict:
    train_u8, val_u8, val_attrs = data
    s = settings(kind, a)
    g = torch.Generator().manual_seed(seed)

    def next_batch():
        return train_u8[torch.randint(0, len(train_u8), (s["batch_size"],), generator=g)].float() / 255

    budget = a.minutes * 60 * 0.97
    steps = a.steps
    if not steps:
        step_s = time_steps(lambda: make_tokenizer(kind, a, seed), next_batch, s["lr"], a.clock)
        steps = max(20, int(budget / step_s))
    if kind == "dvae":  # its KL / temperature / decoder-only schedules scale to the steps
        a.dvae_args.steps = steps
    model = make_tokenizer(kind, a, seed)
    info = train(model, next_batch, steps, s["lr"], s["warmup"], budget if not a.steps else 0, a.clock, a.log_every)
    recons, codes = reconstruct(model, val_u8)
    out = {**info, "planned": steps, **judge_shapes(recons, val_u8, codes, model.vocab_size, val_attrs)}
    if a.save:
        model.save_pretrained(Path(a.save) / f"shapes-{kind}-seed{seed}")
    return out


def bench_photos(kind: str, a, seed: int) -> dict:
    train_photos, val_u8 = photo_data(seed=seed)
    s = settings(kind, a)
    g = torch.Generator().manual_seed(seed + 1)

    def next_batch():
        idx = torch.randint(0, len(train_photos), (s["batch_size"],), generator=g).tolist()
        return torch.stack([random_crop(train_photos[i], g) for i in idx]).float() / 255

    budget = a.minutes * 60 * 0.97
    step_s = time_steps(lambda: make_tokenizer(kind, a, seed), next_batch, s["lr"], a.clock)
    steps = max(20, int(budget / step_s))
    if kind == "dvae":
        a.dvae_args.steps = steps
    model = make_tokenizer(kind, a, seed)
    info = train(model, next_batch, steps, s["lr"], s["warmup"], budget, a.clock)
    recons, codes = reconstruct(model, val_u8)
    return {**info, "psnr": float(psnr(recons, val_u8.float() / 255)), "codes_used": int(codes.unique().numel())}


def images_per_s(fn, batch: int, repeats: int) -> float:
    fn()
    t = time.time()
    for _ in range(repeats):
        fn()
    return batch * repeats / (time.time() - t)


@torch.no_grad()
def throughput(model, batch: int, repeats: int) -> dict:
    model.eval()
    x = torch.rand(batch, 3, model.image_size, model.image_size)
    codes = model.encode(x)
    return {"encode": images_per_s(lambda: model.encode(x), batch, repeats),
            "decode": images_per_s(lambda: model.decode(codes), batch, repeats)}


IMAGENET_F16 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=256,
                    embed_dim=256, n_embed=1024)


def dvae_defaults() -> argparse.Namespace:
    """bench/dvae.py's defaults (the shipped shapes dVAE recipe)."""
    from dvae import main as _  # noqa: F401  (keeps the import explicit)
    return argparse.Namespace(steps=0, batch_size=16, lr=3e-3, warmup=20, n_hid=16, groups=4, blocks=1, vocab=256,
                              n_init=128, loss="mse", kl_weight=0.1, logit_init_scale=10.0, kl_warmup=0.5,
                              temp_end=1 / 16, temp_anneal=0.75, straight_through=False, hard_codes=0.24)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="shapes,photos,throughput")
    p.add_argument("--kinds", default="dvae,vq", help="dvae (bench/dvae.py's recipe), vq (--vq-config)")
    p.add_argument("--vq-config", default=str(VQ_CONFIG),
                   help="a VQ-family stage config: the FSQ dVAE (default) or a VQGAN (train/configs/vqgan-shapes.json)")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=0, help="fixed steps instead of a time budget")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--save", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    busy, load = pick_threads(a.threads, "cpu")
    a.dvae_args = dvae_defaults()
    kinds, seeds = a.kinds.split(","), [int(s) for s in a.seeds.split(",")]
    vq, _ = load_vq_config(a.vq_config)
    print(f"{torch.get_num_threads()} threads, load {load:.1f}, clock {a.clock}; VQ config {a.vq_config}: "
          f"{sum(t.numel() for t in build_vq(vq).parameters()) / 1e6:.2f}M params, grid {vq.grid_size}, "
          f"{vq.quantizer} {vq.vocab_size} codes", flush=True)
    results = {"load_start": load}
    worst = None
    if "shapes" in a.sections:
        data = shapes_data(a.train_size, a.val_size, 0)
        rows = results["shapes"] = {}
        for kind in kinds:
            for seed in seeds:
                r = rows[f"{kind}/{seed}"] = bench_shapes(kind, a, seed, data)
                r["load"] = os.getloadavg()[0]
                print(f"{kind} seed {seed}: " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in r.items()), flush=True)
        print(f"\n{'tokenizer':10s} {'seed':>4s} {'steps':>6s} {'train s':>8s} {'exact':>6s} {'1-obj':>6s} {'2-obj':>6s} "
              f"{'PSNR':>6s} {'codes':>6s} {'load':>5s}")
        for key, r in rows.items():
            kind, seed = key.split("/")
            print(f"{kind:10s} {seed:>4s} {r['steps']:6d} {r['train_s']:8.1f} {r['exact']:6.3f} {r['exact_one']:6.3f} "
                  f"{r['exact_two']:6.3f} {r['psnr']:6.2f} {r['codes_used']:6d} {r['load']:5.1f}")
        for kind in kinds:
            rs = [rows[f"{kind}/{s}"] for s in seeds]
            w = {k: min(r[k] for r in rs) for k in ("exact", "exact_one", "exact_two")}
            print(f"{kind:10s} worst  exact {w['exact']:.3f}  one-object {w['exact_one']:.3f}  two-object {w['exact_two']:.3f}")
            results[f"{kind}_worst"] = w
            if kind == "vq":
                worst = w["exact"]
    if "photos" in a.sections:
        rows = results["photos"] = {kind: bench_photos(kind, a, seeds[0]) for kind in kinds}
        print(f"\n{'photos':10s} {'steps':>6s} {'PSNR':>6s} {'codes':>6s}")
        for kind, r in rows.items():
            print(f"{kind:10s} {r['steps']:6d} {r['psnr']:6.2f} {r['codes_used']:6d}")
    if "throughput" in a.sections:
        torch.manual_seed(0)
        small = {"vq": build_vq(vq), "dvae": DiscreteVAE(dvae_model_config(a.dvae_args))}
        big = VQGAN(VQGANConfig(image_size=256, **IMAGENET_F16))
        tp = results["throughput"] = {f"{k} 64px": throughput(m, 64, 3) for k, m in small.items()}
        tp["vqgan f16 ImageNet 256px"] = throughput(big, 4, 2)
        tp["vqgan f16 ImageNet 64px"] = throughput(VQGAN(VQGANConfig(image_size=64, **IMAGENET_F16)), 16, 2)
        print(f"\n{'throughput (images/s)':28s} {'encode':>8s} {'decode':>8s}   (load {os.getloadavg()[0]:.1f})")
        for k, r in tp.items():
            print(f"{k:28s} {r['encode']:8.2f} {r['decode']:8.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({k: v for k, v in results.items()}, indent=1, default=str))
    if worst is not None:
        print(f"vq_exact_worst={worst:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
