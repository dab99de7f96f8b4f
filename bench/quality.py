"""Quality report of a trained pipeline: does the image match the prompt, and how fast is it?

    python bench/quality.py --pipeline /tmp/demo/pipeline                  # shapes, 128 prompts x 16
    python bench/quality.py --pipeline DIR --data digits --out quality.json
    python bench/quality.py --pipeline DIR --guidance 1.5,1                # also without guidance

Each prompt gets N candidates ONCE per guidance setting (default: the model's configured
guidance_scale), through the pipeline's own sampling and reranking. Each candidate is judged,
then these picks are reported:
  reranked best of N   the reranker's top-1 (what the pipeline returns)
  single sample        the mean over all N candidates: the expected accuracy of one sample
  best-of-N oracle     1 if any candidate is right (per column): the upper bound of any reranker
and two other rankings of the same candidates: + the prior's likelihood ratio log p(x | prompt) -
log p(x | null caption) with weight --mix, and the likelihood ratio alone (rerank.with_likelihood).
shapes prompts (`evaluation_captions`): canonical captions of validation scenes (shapes spec),
  drawn so that at least a quarter (and >= 32) are two-object scenes and at least a quarter of each
  kind hold a held-out colour/shape pair. shapes.check_image judges them (relation over two-object
  prompts; for two objects `place` means they are separate); the main table gives exact match over
  all prompts, one-object, two-object and held-out-pair prompts; a detail table each attribute;
  the dVAE's reconstruction of real val scenes is the decoder's ceiling.
digits: a scikit-learn SVC trained on the real 8x8 scans (every 5th held out, as in the digits
  set) classifies the generations after undoing digits.upscale (crop the margin, undo the
  contrast stretch, area-average to 8x8 in 0..16).
Speed: prior sampling, dVAE decode and CLIP scoring timed apart on a few prompts x N candidates.
The last line is machine-readable: `exact=<fraction>` (shapes) or `accuracy=<fraction>` (digits),
the reranked top-1 with the first guidance setting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from dalle_ar.rerank import LIKELIHOOD, with_likelihood

PICKS = ("reranked", "random", "oracle", "mix", "likelihood")
PICK_NAMES = {"reranked": "reranked best of {n}", "random": "single sample", "oracle": "best-of-{n} oracle",
              "mix": "  CLIP + consensus + likelihood ratio", "likelihood": "  likelihood ratio alone"}


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
    """Mean over prompts of one column for one pick; None where no prompt has the column (relation).
    tops: {ranking: [index of the pick per prompt]} for the ranked picks."""
    vals = []
    for i in prompts if prompts is not None else range(len(judged)):
        col = [j[column] for j in judged[i]]
        if col[0] is None:
            continue
        col = [float(v) for v in col]
        vals.append(sum(col) / len(col) if pick == "random" else max(col) if pick == "oracle" else col[tops[pick][i]])
    return sum(vals) / len(vals) if vals else None


def ranked_tops(results, weight: float) -> list[int]:
    """Each prompt's top candidate by the pipeline's rule (rerank.with_likelihood) from the candidates'
    CLIP + consensus scores (NaN without a CLIP) and log-likelihoods; weight inf: likelihood ratio alone."""
    tops = []
    for r in results:
        clip = torch.tensor(r.candidate_scores)
        lp = torch.tensor(r.candidate_log_probs)
        scores = None if clip.isnan().all() or weight == float("inf") else clip
        if weight > 0:
            scores = with_likelihood(scores, lp, 1.0 if weight == float("inf") else weight)
        tops.append(0 if scores is None else int(torch.argsort(scores, descending=True, stable=True)[0]))
    return tops


def holds_held_out(attrs) -> bool:
    return any((o["color"], o["shape"]) in shapes.HELD_OUT for o in attrs["objects"])


def evaluation_captions(n: int, seed: int = 0, two_object: float = 0.25, held_out: float = 0.25) -> list[str]:
    """n canonical captions of validation scenes (in the order drawn): max(32, n * two_object) of them
    two-object scenes (all of them when n < 32), the rest one-object, and in each kind at least
    `held_out` of them hold a held-out colour/shape pair (the validation stream holds ~12-23%)."""
    n_two = min(n, max(32, round(n * two_object)))
    want = {1: n - n_two, 2: n_two}
    need_held = {k: round(v * held_out) for k, v in want.items()}
    picked, taken = [], {1: 0, 2: 0}
    held = {1: 0, 2: 0}
    for attrs, _ in shapes.scenes("val", 200 * max(n, 1), seed):
        k, h = len(attrs["objects"]), holds_held_out(attrs)
        room = want[k] - taken[k]
        if room <= 0 or (not h and room <= need_held[k] - held[k]):
            continue  # this kind is full, or its last places are kept for held-out pairs
        picked.append(shapes.caption(attrs))
        taken[k] += 1
        held[k] += h
        if len(picked) == n:
            return picked
    raise RuntimeError(f"evaluation_captions: {n} captions not found in the validation stream")


def scene_kinds(attrs) -> dict:
    """Indices of the one-object and of the two-object scenes."""
    return {"one_object_exact": [i for i, s in enumerate(attrs) if len(s["objects"]) == 1],
            "two_object_exact": [i for i, s in enumerate(attrs) if len(s["objects"]) == 2],
            "held_out_exact": [i for i, s in enumerate(attrs) if holds_held_out(s)]}


# ---- judges --------------------------------------------------------------------------------------

def digits_classifier(report: dict):
    """SVC on the real training scans (digits.fit_reader); its accuracy on the held-out ones goes in the report."""
    clf, report["classifier"] = digits.fit_reader()
    images, labels = digits.load_scans()
    val = np.arange(len(labels)) % digits.VAL_EVERY == 0
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
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", default=None,
                   help="comma list of guidance scales (default: the model's configured one); e.g. 1.5,1")
    p.add_argument("--likelihood", type=float, default=LIKELIHOOD,
                   help="weight of the likelihood ratio in the reranked pick (the pipeline's default)")
    p.add_argument("--mix", type=float, default=1.0,
                   help="weight of the likelihood ratio in the 'CLIP + consensus + likelihood ratio' row")
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
    settings = [float(x) for x in a.guidance.split(",")] if a.guidance else [configured]
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
        prompts = evaluation_captions(a.prompts, a.seed)
        attrs = [shapes.parse_caption(c) for c in prompts]
        columns = ("color", "shape", "size", "place", "relation", "exact")
        subsets = scene_kinds(attrs)  # exact match over one-object, two-object and held-out-pair prompts

        def judge(i, image):
            return shapes.check_image(image, attrs[i])
    else:
        prompts = digits.val_captions(a.prompts, a.seed)
        clf, val_scans, val_labels = digits_classifier(report)
        columns, subsets = ("accuracy",), {}

        def judge(i, image):
            return {"accuracy": bool(clf.predict(digits.to_scan(image)[None])[0] == digits.digit_of(prompts[i]))}

    rows, detail = [], []
    for g in settings:
        results = pipe(prompts, num_candidates=a.candidates, keep=1, guidance_scale=g, seed=a.seed,
                       return_candidates=True, likelihood=0.0)  # CLIP + consensus scores; the mix is redone here
        judged = [[judge(i, im) for im in r.candidates] for i, r in enumerate(tqdm(results, desc="judge", leave=False))]
        tops = {"reranked": ranked_tops(results, a.likelihood), "mix": ranked_tops(results, a.mix),
                "likelihood": ranked_tops(results, float("inf"))}
        entry = {}
        for pick in PICKS:
            entry[pick] = {c: accuracy(judged, tops, c, pick) for c in columns}
            entry[pick].update({k: accuracy(judged, tops, "exact", pick, idx) for k, idx in subsets.items()})
            name = PICK_NAMES[pick].format(n=a.candidates)
            key = "exact" if a.data == "shapes" else "accuracy"
            rows.append([f"{g:g}", name, entry[pick][key]] + [entry[pick][k] for k in subsets])
            detail.append([f"{g:g}", name] + [entry[pick][c] for c in columns])
        report["settings"][str(g)] = entry

    if a.data == "shapes":
        scenes = list(shapes.scenes("val", a.recon, a.seed))
        recon = reconstruct(pipe, np.stack([shapes.render(s) for s, _ in scenes]))
        judged = [[shapes.check_image(im, s)] for im, (s, _) in zip(recon, scenes)]
        tops = {"reranked": [0] * len(judged)}
        entry = {c: accuracy(judged, tops, c, "reranked") for c in columns}
        recon_subsets = scene_kinds([s for s, _ in scenes])
        entry.update({k: accuracy(judged, tops, "exact", "reranked", idx) for k, idx in recon_subsets.items()})
        name = f"dVAE recon ({len(scenes)} real)"
        rows.append(["-", name, entry["exact"]] + [entry[k] for k in recon_subsets])
        detail.append(["-", name] + [entry[c] for c in columns])
    else:
        recon = reconstruct(pipe, np.stack([np.asarray(digits.upscale(s)) for s in val_scans]))
        pred = clf.predict(np.stack([digits.to_scan(im) for im in recon]))
        entry = {"accuracy": float((pred == val_labels).mean())}
        rows.append(["-", f"dVAE recon ({len(recon)} real)", entry["accuracy"]])
    report["reconstruction"] = entry

    print(f"\nquality ({len(prompts)} prompts x {a.candidates} candidates; single sample = mean over the "
          f"candidates, oracle = some candidate right)")
    if a.data == "shapes":
        n1, n2, nh = (len(subsets[k]) for k in ("one_object_exact", "two_object_exact", "held_out_exact"))
        print_table(["guidance", "pick", "exact", f"one-object ({n1})", f"two-object ({n2})",
                     f"with a held-out pair ({nh})"], rows)
        print("\nby attribute (relation over the two-object prompts; for two objects `place` = separate)")
        print_table(["guidance", "pick", *columns], detail)
        report["prompts"] = {"one_object": n1, "two_object": n2, "held_out_pair": nh,
                             "held_out_two_object": len(set(subsets["held_out_exact"]) & set(subsets["two_object_exact"]))}
    else:
        print_table(["guidance", "pick", "accuracy"], rows)
        c = report["classifier"]
        print(f"classifier (SVC on real 8x8 scans) on {c['val_scans']} held-out real scans: raw {c['raw_8x8']:.3f}, "
              f"after upscale + to_scan {c['upscale_to_scan']:.3f}")

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
    final = report["settings"][str(settings[0])]["reranked"][key]
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(f"\ntotal time {report['seconds']} s")
    if a.out:
        write_json(a.out, report)
        print(f"wrote {a.out}")
    print(f"{'exact' if a.data == 'shapes' else 'accuracy'}={final:.4f}")


if __name__ == "__main__":
    main()
