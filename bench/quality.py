"""Quality report of a trained pipeline: does the image match the prompt, and how fast is it?

    python bench/quality.py --pipeline /tmp/demo/pipeline                  # shapes, 48 prompts x 16
    python bench/quality.py --pipeline DIR --data digits --out quality.json

Each prompt gets N candidates ONCE per guidance setting (the model's configured guidance_scale,
and 1.0 = no guidance), through the pipeline's own sampling and CLIP reranking. Each candidate is
judged, then three picks are reported:
  reranked  the CLIP top-1 (what the pipeline returns)
  random    the mean over all N candidates: the expected accuracy of a random pick
  oracle    1 if any candidate is right (per column): the upper bound of any reranker
shapes: shapes.check_image on the prompt's attributes (relation over two-object prompts; for
  two objects `place` means they are separate), exact accuracy apart on the held-out pairs (the
  first three prompts), on one-object and on two-object scenes, and the dVAE's reconstruction of
  real val scenes (the decoder's ceiling).
digits: a scikit-learn SVC trained on the real 8x8 scans (every 5th held out, as in the digits
  set) classifies the generations after undoing digits.upscale (crop the margin, undo the
  contrast stretch, area-average to 8x8 in 0..16).
Speed: prior sampling, dVAE decode and CLIP scoring timed apart on a few prompts x N candidates.
The last line is machine-readable: `exact=<fraction>` (shapes) or `accuracy=<fraction>` (digits),
the reranked top-1 with the configured guidance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from common import pick_threads
from dalle_ar.data import digits, shapes
from dalle_ar.io import write_json
from dalle_ar.images import to_pil
from dalle_ar.pipeline import TextToImagePipeline

PICKS = ("reranked", "random", "oracle")


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def print_table(header, rows) -> None:
    cells = [list(header)] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for k, r in enumerate(cells):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def accuracy(judged, tops, column, pick, prompts=None):
    """Mean over prompts of one column for one pick; None where no prompt has the column (relation)."""
    vals = []
    for i in prompts if prompts is not None else range(len(judged)):
        col = [j[column] for j in judged[i]]
        if col[0] is None:
            continue
        col = [float(v) for v in col]
        vals.append({"reranked": col[tops[i]], "random": sum(col) / len(col), "oracle": max(col)}[pick])
    return sum(vals) / len(vals) if vals else None


def scene_kinds(attrs) -> dict:
    """Indices of the one-object and of the two-object scenes."""
    return {"one_object_exact": [i for i, s in enumerate(attrs) if len(s["objects"]) == 1],
            "two_object_exact": [i for i, s in enumerate(attrs) if len(s["objects"]) == 2]}


# ---- judges --------------------------------------------------------------------------------------

def digit_of(prompt: str) -> int:
    return int(re.findall(r"\d", prompt)[-1])  # val_captions: "a handwritten digit 7"


def downsample(image: Image.Image) -> np.ndarray:
    """64x64 RGB -> flat 8x8 in [0, 16], like sklearn's digits: inverts digits.upscale."""
    g = np.asarray(image.convert("L").resize((digits.SIZE, digits.SIZE), Image.Resampling.BILINEAR), np.float32)
    m = digits.MARGIN
    inner = g[m:digits.SIZE - m, m:digits.SIZE - m]
    # upscale stretched v -> (v - 40) * 1.6 and clipped at 0: undo it where it is invertible.
    inner = np.where(inner > 0, inner / 1.6 + 40.0, 0.0).astype(np.float32)
    small = np.asarray(Image.fromarray(inner, "F").resize((8, 8), Image.Resampling.BOX))
    return np.clip(small * (16.0 / 255.0), 0, 16).ravel()


def digits_classifier(report: dict):
    """SVC on the real training scans; report its accuracy on the held-out ones (raw and round-tripped)."""
    from sklearn.svm import SVC

    images, labels = digits.load_scans()
    val = np.arange(len(labels)) % digits.VAL_EVERY == 0
    clf = SVC(gamma=0.001, C=10.0).fit(images[~val].reshape(-1, 64), labels[~val])
    roundtrip = np.stack([downsample(digits.upscale(s)) for s in images[val]])
    report["classifier"] = {"val_scans": int(val.sum()),
                            "raw_8x8": float((clf.predict(images[val].reshape(-1, 64)) == labels[val]).mean()),
                            "upscale_downsample": float((clf.predict(roundtrip) == labels[val]).mean())}
    return clf, images[val], labels[val]


@torch.no_grad()
def reconstruct(pipe, images: np.ndarray) -> list:
    """uint8 [B,H,W,3] -> the dVAE's reconstructions as PIL images."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(pipe.device)
    return to_pil(torch.cat([pipe.dvae.decode(pipe.dvae.encode(c)) for c in x.split(64)]).float())


# ---- speed ---------------------------------------------------------------------------------------

def clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def time_parts(pipe, prompts, n: int, guidance: float, seed: int) -> dict:
    """Seconds in prior / decode / CLIP for each prompt's batch of n candidates (first one untimed)."""
    text = pipe.encode_prompts(prompts).to(pipe.device)
    t = {"prior": 0.0, "decode": 0.0, "clip": 0.0}
    for k, i in enumerate([0] + list(range(len(prompts)))):  # k = 0: an untimed warm-up pass
        g = torch.Generator(device=pipe.device).manual_seed(seed + i)
        t0 = clock(pipe.device)
        codes = pipe.dalle.generate(text[i:i + 1].expand(n, -1), temperature=pipe.dalle.config.temperature,
                                     guidance_scale=guidance, generator=g)
        t1 = clock(pipe.device)
        images = to_pil(pipe.dvae.decode(codes).float().cpu())
        t2 = clock(pipe.device)
        if pipe.reranker is not None:
            pipe.reranker.score(prompts[i], images)
        t3 = clock(pipe.device)
        if k:
            for part, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2)):
                t[part] += dt
    total = sum(t.values())
    return {"guidance": guidance, "candidates": n * len(prompts), "seconds": total,
            "candidates_per_s": n * len(prompts) / total, **{f"{k}_share": v / total for k, v in t.items()}}


# ---- main ----------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True, help="pipeline directory")
    p.add_argument("--data", choices=["shapes", "digits"], default="shapes")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recon", type=int, default=256, help="real val images the dVAE reconstructs (shapes)")
    p.add_argument("--speed-prompts", type=int, default=4, help="prompts (x candidates) timed for speed")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, or 1 when the CPU is already busy)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    a = p.parse_args(argv)
    start = time.perf_counter()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    busy, load = pick_threads(a.threads, device.type)
    pipe = TextToImagePipeline.from_pretrained(a.pipeline, device=device)
    configured = float(pipe.dalle.config.guidance_scale)
    settings = [configured] + ([1.0] if configured != 1.0 else [])
    machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "processor": platform.processor() or platform.machine(), "load_avg": round(load, 2)}
    print(f"machine: {machine['cpus']} CPUs ({machine['processor']}), torch {machine['torch']} "
          f"({machine['torch_threads']} threads), device {machine['device']}, load avg {load:.2f}"
          + (" (busy: 1 thread; --threads N to override)" if busy else ""))
    print(f"pipeline: {a.pipeline}  data: {a.data}  prompts: {a.prompts}  candidates: {a.candidates}  "
          f"guidance: {settings}  seed: {a.seed}" + ("" if pipe.reranker else "  (no CLIP: reranked = first)"))
    report = {"machine": machine, "args": vars(a), "settings": {}}

    if a.data == "shapes":
        prompts = shapes.val_captions(a.prompts, a.seed)
        attrs = [shapes.parse_caption(c) for c in prompts]
        columns = ("color", "shape", "size", "place", "relation", "exact")
        held = list(range(min(len(shapes.HELD_OUT), len(prompts))))
        # Exact match over subsets of the prompts: the held-out pairs, one-object and two-object scenes.
        subsets = {"held_out_exact": held, **scene_kinds(attrs)}

        def judge(i, image):
            return shapes.check_image(image, attrs[i])
    else:
        prompts = digits.val_captions(a.prompts, a.seed)
        clf, val_scans, val_labels = digits_classifier(report)
        columns, held, subsets = ("accuracy",), [], {}

        def judge(i, image):
            return {"accuracy": bool(clf.predict(downsample(image)[None])[0] == digit_of(prompts[i]))}

    rows = []
    for g in settings:
        results = pipe(prompts, num_candidates=a.candidates, keep=1, guidance_scale=g, seed=a.seed,
                       return_candidates=True)
        judged = [[judge(i, im) for im in r.candidates] for i, r in enumerate(tqdm(results, desc="judge", leave=False))]
        tops = [next(j for j, im in enumerate(r.candidates) if im is r.images[0]) for r in results]
        entry = {}
        for pick in PICKS:
            entry[pick] = {c: accuracy(judged, tops, c, pick) for c in columns}
            entry[pick].update({k: accuracy(judged, tops, "exact", pick, idx) for k, idx in subsets.items()})
            rows.append([f"{g:g}", pick] + list(entry[pick].values()))
        report["settings"][str(g)] = entry

    if a.data == "shapes":
        scenes = list(shapes.scenes("val", a.recon, a.seed))
        recon = reconstruct(pipe, np.stack([shapes.render(s) for s, _ in scenes]))
        judged = [[shapes.check_image(im, s)] for im, (s, _) in zip(recon, scenes)]
        tops = [0] * len(judged)
        entry = {c: accuracy(judged, tops, c, "reranked") for c in columns}
        recon_subsets = {"held_out_exact": held, **scene_kinds([s for s, _ in scenes])}
        entry.update({k: accuracy(judged, tops, "exact", "reranked", idx) for k, idx in recon_subsets.items()})
        rows.append(["-", f"dVAE recon ({len(scenes)} real)"] + list(entry.values()))
    else:
        recon = reconstruct(pipe, np.stack([np.asarray(digits.upscale(s)) for s in val_scans]))
        pred = clf.predict(np.stack([downsample(im) for im in recon]))
        entry = {"accuracy": float((pred == val_labels).mean())}
        rows.append(["-", f"dVAE recon ({len(recon)} real)", entry["accuracy"]])
    report["reconstruction"] = entry

    print(f"\nquality ({len(prompts)} prompts x {a.candidates} candidates; random = mean over candidates, "
          f"oracle = any candidate right)")
    print_table(["guidance", "pick", *columns, *(["held-out exact", "1-object exact", "2-object exact"] if held else [])],
                rows)
    if a.data == "shapes":
        n2 = len(subsets["two_object_exact"])
        print(f"relation and 2-object exact over {n2} two-object prompts, 1-object exact over the other "
              f"{len(prompts) - n2}; held-out exact over the first {len(held)} prompts {[prompts[i] for i in held]}")
    else:
        c = report["classifier"]
        print(f"classifier (SVC on real 8x8 scans) on {c['val_scans']} held-out scans: raw {c['raw_8x8']:.3f}, "
              f"after upscale + downsample {c['upscale_downsample']:.3f}")

    speed = [time_parts(pipe, prompts[:a.speed_prompts], a.candidates, g, a.seed)
             for g in tqdm(settings, desc="speed", leave=False)]
    report["speed"] = speed
    size = pipe.dvae.config.image_size
    print(f"\nspeed (N = {a.candidates} candidates per prompt at {size} px, {a.speed_prompts} prompts, "
          f"{machine['device']}, {machine['torch_threads']} threads)")
    print_table(["guidance", "candidates", "seconds", "candidates/s", "prior", "dVAE decode", "CLIP"],
                [[f"{s['guidance']:g}", s["candidates"], s["seconds"], s["candidates_per_s"],
                  *(f"{100 * s[k + '_share']:.0f}%" for k in ("prior", "decode", "clip"))] for s in speed])

    key = "exact" if a.data == "shapes" else "accuracy"
    final = report["settings"][str(configured)]["reranked"][key]
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(f"\ntotal time {report['seconds']} s")
    if a.out:
        write_json(a.out, report)
        print(f"wrote {a.out}")
    print(f"{'exact' if a.data == 'shapes' else 'accuracy'}={final:.4f}")


if __name__ == "__main__":
    main()
