"""dVAE benchmark: reconstruction quality on `shapes` and on real photos, and encode throughput.

    python bench/dvae.py                       # all three sections, 5 minutes of training each
    python bench/dvae.py --minutes 0.5         # smoke run
    python bench/dvae.py --sections shapes --n-hid 48 --vocab 512 --steps 1500

(a) shapes: train a 64x64 -> 8x8 dVAE (same objective, optimizer, weight decay and LR schedule as
    the engine, in a plain loop so the budget is wall-clock) and report val PSNR, codebook usage
    and the share of val reconstructions that keep every attribute (shapes.check_image exact).
(b) photos: 64x64 crops of the RGB photos bundled with scikit-image (3 held out for val).
(c) encode throughput at 64 px (the small config) and 256 px (OpenAI's size: n_hid 256, vocab
    8192, 2 blocks per group; random weights), and the inference convolution layout: encode and
    decode rates of the small config in the default layout vs channels-last, back to back.
The KL and temperature schedules are scaled to the relaxed steps (warm-up and anneal as fractions
of them); the last --hard-codes share of --steps trains the decoder alone on argmax codes.
With --steps 0 (the default) the step plan follows the wall clock, so every schedule ends within
--minutes however fast the steps run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalle_ar.dvae import DiscreteVAE, DVAEConfig, codebook_usage, psnr
from dalle_ar.engine import TrainConfig, lr_at, param_groups

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg",
          "motorcycle_left.png", "motorcycle_right.png", "color.png", "ihc.png", "logo.png",
          "chessboard_RGB.png", "brick.png", "grass.png", "gravel.png")
VAL_PHOTOS = ("chelsea.png", "rocket.jpg", "motorcycle_right.png")
PLAN_SHARE = 0.97  # of the budget the step plan fills (evaluation follows)


def model_config(a, image_size=64) -> DVAEConfig:
    """The schedules scale to the relaxed steps, the last a.hard_codes of a.steps train the decoder alone."""
    relaxed = a.steps - int(a.hard_codes * a.steps)
    return DVAEConfig(image_size=image_size, n_hid=a.n_hid, group_count=a.groups, n_blk_per_group=a.blocks,
                      vocab_size=a.vocab, n_init=a.n_init, loss=a.loss, kl_weight=a.kl_weight,
                      logit_init_scale=a.logit_init_scale,
                      kl_warmup_steps=int(a.kl_warmup * relaxed), temp_start=1.0, temp_end=a.temp_end,
                      temp_anneal_steps=int(a.temp_anneal * relaxed), straight_through=a.straight_through,
                      hard_codes_from_step=relaxed if a.hard_codes > 0 else None)


def as_input(images_u8: torch.Tensor, device) -> torch.Tensor:
    """uint8 batch -> [0,1] floats in channels-last layout, as the dvae stage feeds the model."""
    return (images_u8.to(device).float() / 255).contiguous(memory_format=torch.channels_last)


# ---- data ------------------------------------------------------------------------------------------

def shapes_data(n_train: int, n_val: int, seed: int = 0):
    """uint8 [N,3,64,64] train images, and val images with their attributes (rendered in memory:
    the same pixels generate_shapes writes into the shards)."""
    from dalle_ar.data.shapes import render, scenes

    def stack(split, n):
        attrs = [a for a, _ in scenes(split, n, seed)]
        return torch.from_numpy(np.stack([render(a) for a in attrs])).permute(0, 3, 1, 2).contiguous(), attrs

    train, _ = stack("train", n_train)
    val, val_attrs = stack("val", n_val)
    return train, val, val_attrs


def photo_data(n_val_crops: int = 64, seed: int = 0):
    """(list of uint8 [3,H,W] train photos, uint8 [N,3,64,64] fixed val crops). Each photo is shrunk
    so its short side is 128 px: a 64 px crop then holds a recognisable part of the scene."""
    import skimage

    root = Path(skimage.__file__).parent / "data"
    photos = {}
    for name in PHOTOS:
        if not (root / name).is_file():
            continue
        im = Image.open(root / name).convert("RGB")
        scale = 128 / min(im.size)
        im = im.resize((max(64, round(im.width * scale)), max(64, round(im.height * scale))), Image.Resampling.BICUBIC)
        photos[name] = torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()
    train = [p for n, p in photos.items() if n not in VAL_PHOTOS]
    g = torch.Generator().manual_seed(seed)
    val = torch.stack([random_crop(photos[n], g) for n in VAL_PHOTOS if n in photos
                       for _ in range(n_val_crops // len(VAL_PHOTOS))])
    return train, val


def random_crop(image: torch.Tensor, g: torch.Generator, size: int = 64) -> torch.Tensor:
    _, h, w = image.shape
    y, x = (int(torch.randint(0, d - size + 1, (1,), generator=g)) for d in (h, w))
    return image[:, y:y + size, x:x + size]


# ---- training and evaluation --------------------------------------------------------------------------

def train(model: DiscreteVAE, next_batch, a, device) -> dict:
    """AdamW + warm-up/cosine LR + grad clipping as in the engine; stops at a.steps or a.minutes.

    With a budget-fitted plan (a.step_s set by fit_steps) the schedules follow the clock: each step
    runs at the planned step its wall time corresponds to, so the relaxed phase, the decoder-only
    phase and both LR cosines end on time even when steps run slower or faster than timed."""
    hard = model.config.hard_codes_from_step  # the LR schedule starts over for the decoder-only phase
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, min_lr=a.lr / 10, warmup=a.warmup,
                      restart_at=hard or 0)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    budget = a.minutes * 60
    planned = clock_schedule(a.steps, hard, getattr(a, "step_s", None), budget * PLAN_SHARE)
    model.train()
    t0, step, relaxed, parts = time.time(), 0, 0, {}
    while time.time() - t0 < budget:
        at = planned(time.time() - t0) if planned else step
        if at >= a.steps:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(at, cfg)
        loss, parts = model(as_input(next_batch(), device), step=at)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        relaxed += not model.hard_codes(at)
        if a.log_every and step % a.log_every == 0:
            print(f"  step {step:5d} (plan {at:5d})  {time.time() - t0:6.1f}s  loss {float(loss):.4f}  "
                  + "  ".join(f"{k} {float(v):.3g}" for k, v in parts.items()), flush=True)
    return {"steps": step, "relaxed_steps": relaxed, "train_s": time.time() - t0,
            "train_psnr": float(parts.get("psnr", float("nan")))}


def clock_schedule(steps: int, hard, step_s, seconds: float):
    """elapsed seconds -> planned step, piecewise linear so the relaxed phase takes its planned share
    of `seconds` (from the timed seconds per relaxed and decoder-only step) and the plan ends at
    `seconds`; None without timings (an explicit --steps runs step by step)."""
    if not step_s:
        return None
    relaxed = hard or steps
    t_relaxed = relaxed * step_s[0] / (relaxed * step_s[0] + (steps - relaxed) * step_s[1]) * seconds

    def planned(elapsed: float) -> int:
        if elapsed < t_relaxed or relaxed == steps:
            return int(relaxed * elapsed / t_relaxed)
        return int(relaxed + (steps - relaxed) * (elapsed - t_relaxed) / (seconds - t_relaxed))

    return planned


@torch.no_grad()
def evaluate(model: DiscreteVAE, images_u8: torch.Tensor, device, batch: int = 128):
    model.eval()
    recons, codes, scores = [], [], []
    for i in range(0, len(images_u8), batch):
        x = images_u8[i:i + batch].to(device).float() / 255
        c = model.encode(x)
        r = model.decode(c)
        scores.append(float(psnr(r, x)) * len(x))
        codes.append(c.cpu())
        recons.append(r.cpu())
    usage = codebook_usage(torch.cat(codes), model.config.vocab_size)
    return {"val_psnr": sum(scores) / len(images_u8), "perplexity": usage["perplexity"],
            "used": usage["used_fraction"]}, torch.cat(recons)


def with_steps(a, device, next_batch):
    """`a` with a.steps set (from the time budget when it is 0) and the KL / temperature steps scaled to it."""
    if a.steps:
        return a
    steps, step_s = fit_steps(a, device, next_batch)
    return argparse.Namespace(**{**vars(a), "steps": steps, "step_s": step_s})


def fit_steps(a, device, next_batch) -> tuple[int, tuple]:
    """(steps that fit a.minutes, (seconds a relaxed step, seconds a decoder-only step)), timed on 10
    relaxed and 10 decoder-only steps of a throw-away model (each after 3 warm-up)."""
    model = DiscreteVAE(model_config(argparse.Namespace(**{**vars(a), "steps": 100}))).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    per_step = []
    for step in (0, 100):  # relaxed, then (when configured) decoder-only
        for i in range(13):
            if i == 3:
                t = time.time()
            loss, _ = model(as_input(next_batch(), device), step=step + i)
            opt.zero_grad()
            loss.backward()
            opt.step()
        float(loss.detach())  # waits for the device
        per_step.append((time.time() - t) / 10)
    mean = (1 - a.hard_codes) * per_step[0] + a.hard_codes * per_step[1]
    steps = max(20, int(a.minutes * 60 * PLAN_SHARE / mean))
    print(f"  {per_step[0] * 1000:.0f} ms a relaxed step, {per_step[1] * 1000:.0f} ms a decoder-only step -> "
          f"{steps} steps in {a.minutes} min", flush=True)
    return steps, tuple(per_step)


def bench_shapes(a, device) -> dict:
    from dalle_ar.data.shapes import check_image

    train_u8, val_u8, val_attrs = shapes_data(a.train_size, a.val_size, a.seed)
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)

    def next_batch():
        return train_u8[torch.randint(0, len(train_u8), (a.batch_size,), generator=g)]

    a = with_steps(a, device, next_batch)
    model = DiscreteVAE(model_config(a)).to(device)
    info = train(model, next_batch, a, device)
    metrics, recons = evaluate(model, val_u8, device)
    checks = [check_image(r, attrs) for r, attrs in zip(recons, val_attrs)]
    metrics["exact"] = float(np.mean([c["exact"] for c in checks]))
    for k in ("color", "shape", "size", "place"):
        metrics[k] = float(np.mean([bool(c[k]) for c in checks]))
    if a.save:
        model.save_pretrained(Path(a.save) / "shapes-dvae")
    return {**info, **metrics}


def bench_photos(a, device) -> dict:
    train_photos, val_u8 = photo_data(seed=a.seed)
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed + 1)

    def next_batch():
        idx = torch.randint(0, len(train_photos), (a.batch_size,), generator=g).tolist()
        crops = torch.stack([random_crop(train_photos[i], g) for i in idx])
        flip = torch.rand(len(crops), generator=g) < 0.5
        crops[flip] = crops[flip].flip(-1)
        return crops

    a = with_steps(a, device, next_batch)
    model = DiscreteVAE(model_config(a)).to(device)
    info = train(model, next_batch, a, device)
    metrics, _ = evaluate(model, val_u8, device)
    return {**info, **metrics}


def images_per_s(fn, batch: int, device, repeats: int) -> float:
    """batch * repeats / seconds of `repeats` calls of fn() after one untimed warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    t = time.time()
    for _ in range(repeats):
        fn()
    sync()
    return batch * repeats / (time.time() - t)


@torch.no_grad()
def encode_throughput(config: DVAEConfig, batch: int, device, repeats: int) -> float:
    torch.manual_seed(0)
    model = DiscreteVAE(config).to(device).eval()
    x = torch.rand(batch, 3, config.image_size, config.image_size, device=device)
    return images_per_s(lambda: model.encode(x), batch, device, repeats)


@torch.no_grad()
def layout_speed(config: DVAEConfig, batch: int, device, repeats: int = 5) -> dict:
    """encode and decode images/s of this config with the inference convolutions in the default
    layout vs channels-last (the model's default), measured back to back in this run."""
    from dalle_ar.dvae import Conv2d

    torch.manual_seed(0)
    model = DiscreteVAE(config).to(device).eval()
    x = torch.rand(batch, 3, config.image_size, config.image_size, device=device)
    codes = torch.randint(0, config.vocab_size, (batch, model.grid_size, model.grid_size), device=device)
    out, default = {}, Conv2d.inference_memory_format
    try:
        for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            Conv2d.inference_memory_format = fmt
            out[name] = {"encode_per_s": images_per_s(lambda: model.encode(x), batch, device, repeats),
                         "decode_per_s": images_per_s(lambda: model.decode(codes), batch, device, repeats)}
    finally:
        Conv2d.inference_memory_format = default
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="shapes,photos,throughput")
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget of each training run")
    p.add_argument("--steps", type=int, default=0,
                   help="optimizer steps; the schedules scale to it (0: as many as fit --minutes, timed on 10 steps)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--n-hid", type=int, default=16)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--n-init", type=int, default=128)
    p.add_argument("--loss", choices=["mse", "logit_laplace"], default="mse")
    p.add_argument("--kl-weight", type=float, default=0.1, help="0.1 suits mse (the paper's 6.6 is for logit-Laplace)")
    p.add_argument("--logit-init-scale", type=float, default=10.0)
    p.add_argument("--kl-warmup", type=float, default=0.5, help="KL warm-up as a fraction of the relaxed steps")
    p.add_argument("--temp-end", type=float, default=1 / 16)
    p.add_argument("--temp-anneal", type=float, default=0.75,
                   help="temperature anneal as a fraction of the relaxed steps")
    p.add_argument("--straight-through", action="store_true")
    p.add_argument("--hard-codes", type=float, default=0.24,
                   help="final share of --steps that trains the decoder alone on argmax codes (0: none)")
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--tp-batch", type=int, default=64, help="encode throughput batch (256 px on CPU: see --tp-batch-256)")
    p.add_argument("--tp-batch-256", type=int, default=None, help="batch at 256 px (default: 64 on GPU, 4 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--save", default=None, help="directory to save the trained shapes dVAE into")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    a = p.parse_args(argv)
    if not 0 <= a.hard_codes < 1:
        p.error(f"--hard-codes must be in [0, 1), got {a.hard_codes}")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    sections = a.sections.split(",")
    c = model_config(a)
    print(f"device {device} ({torch.get_num_threads()} threads); config: n_hid {c.n_hid}, groups {c.group_count}, "
          f"blocks {c.n_blk_per_group}, vocab {c.vocab_size}, n_init {c.n_init}, "
          f"{sum(t.numel() for t in DiscreteVAE(c).parameters()) / 1e6:.2f}M params; steps {a.steps}, batch "
          f"{a.batch_size}, lr {a.lr}, beta {c.kl_weight} over {c.kl_warmup_steps}, tau 1 -> {c.temp_end:.4g} over "
          f"{c.temp_anneal_steps} (of the relaxed steps), last {a.hard_codes:.0%} decoder-only on argmax codes; "
          f"budget {a.minutes} min a run", flush=True)

    rows = {}
    if "shapes" in sections:
        rows["shapes"] = bench_shapes(a, device)
    if "photos" in sections:
        rows["photos"] = bench_photos(a, device)
    print(f"\n{'data':8s} {'steps':>6s} {'relaxed':>8s} {'train s':>8s} {'val PSNR':>9s} {'perplexity':>11s} {'used':>6s} "
          f"{'exact':>6s} {'color':>6s} {'shape':>6s} {'size':>6s} {'place':>6s}")
    for name, r in rows.items():
        extra = " ".join(f"{r[k]:6.3f}" if k in r else f"{'-':>6s}" for k in ("exact", "color", "shape", "size", "place"))
        print(f"{name:8s} {r['steps']:6d} {r['relaxed_steps']:8d} {r['train_s']:8.1f} {r['val_psnr']:9.2f} {r['perplexity']:11.1f} "
              f"{r['used']:6.3f} {extra}")

    if "throughput" in sections:
        openai = DVAEConfig(image_size=256, n_hid=256, group_count=4, n_blk_per_group=2, vocab_size=8192, n_init=128)
        b256 = a.tp_batch_256 or (64 if device.type == "cuda" else 4)
        rows["throughput"] = {"64px_small": encode_throughput(c, a.tp_batch, device, 5),
                              "256px_openai": encode_throughput(openai, b256, device, 2)}
        print(f"\nencode throughput ({device}): {rows['throughput']['64px_small']:.1f} images/s at 64 px "
              f"(batch {a.tp_batch}, this config); {rows['throughput']['256px_openai']:.2f} images/s at 256 px "
              f"(batch {b256}, OpenAI size)")
        lay = rows["layout"] = layout_speed(c, a.tp_batch, device)
        print(f"\ninference convolution layout (this config, batch {a.tp_batch}; same run)")
        print(f"{'layout':14s} {'encode img/s':>13s} {'decode img/s':>13s}")
        for name, r in lay.items():
            print(f"{name:14s} {r['encode_per_s']:13.1f} {r['decode_per_s']:13.1f}")
        cl, co = lay["channels_last"], lay["contiguous"]
        print(f"channels_last speed-up: encode x{cl['encode_per_s'] / co['encode_per_s']:.2f}, "
              f"decode x{cl['decode_per_s'] / co['decode_per_s']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
