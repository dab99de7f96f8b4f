"""Prompts in, CLIP-reranked images out.

A trained pipeline is one directory (see docs/checkpoints.md):

    pipeline.json              which components, package version
    tokenizer/tokenizer.json   text BPE
    dvae/ or vqgan/            the image tokenizer: config.json (its "kind") + model.safetensors
    dalle/                     config.json + model.safetensors
    clip/                      a transformers CLIPModel directory (optional: no reranking without it)

This module joins tokenizer + image tokenizer (dVAE or VQGAN) + prior + reranker for inference;
it never imports DeepSpeed.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import __version__
from .dalle import DALLE
from .image_tokenizer import KINDS, load_image_tokenizer
from .images import image_grid, to_pil  # noqa: F401  (image_grid: dalle_ar.pipeline API, docs/api.md)
from .io import atomic_path, write_json
from .model_card import model_card
from .pipeline_checks import (DTYPES, check_call, check_dtype, check_keep_rows, check_prompts, per_prompt,
                              prompt_generators)
from .rerank import CONSENSUS, LIKELIHOOD, CLIPReranker, check_consensus, check_likelihood, with_likelihood
from .threads import check_threads, threads
from .tokenizer import TextTokenizer

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"
CARD_FILE = "README.md"


@dataclass
class PromptResult:
    """What one prompt gave: the kept images best first, their reranker scores (CLIP scores, or with
    consensus > 0 the z-scored mix of CLIPReranker.rerank) and ranks (0 = best)."""

    prompt: str
    images: list                       # in the call's output_type: PIL images, [H,W,3] float arrays, [3,H,W] tensors or code grids
    scores: list
    ranks: list
    seed: Optional[int]                # None when the call was given a generator
    candidates: Optional[list] = None  # all N candidates in sampling order, on request (same type as images)
    candidate_scores: Optional[list] = None
    codes: Optional[list] = None       # the kept images' code grids, Long[grid, grid]
    candidate_log_probs: Optional[list] = None  # per candidate (log p(codes | prompt), log p(codes | null caption))


class TextToImagePipeline:
    """tokenizer -> prior -> image tokenizer's decoder (dVAE or VQGAN) -> CLIP reranker.

    `device`, `torch_dtype` (the prior's dtype; the image decoder and CLIP stay float32 unless
    `.to(..., decoder_dtype=)` asks) and `num_threads` (CPU threads during a call; None: the
    `dalle_ar.threads` policy) as in diffusers' pipelines.
    """

    def __init__(self, tokenizer, image_tokenizer, dalle, reranker=None, device: str | torch.device = "cpu",
                 torch_dtype=None, num_threads: Optional[int] = None, card: Optional[dict] = None):
        if dalle.config.image_vocab_size != image_tokenizer.vocab_size:
            raise ValueError(
                f"dalle.image_vocab_size={dalle.config.image_vocab_size} does not match the image "
                f"tokenizer's vocab_size={image_tokenizer.vocab_size}"
            )
        if dalle.config.image_grid != image_tokenizer.grid_size:
            raise ValueError(f"dalle.image_grid={dalle.config.image_grid} != image tokenizer grid {image_tokenizer.grid_size}")
        if tokenizer.vocab_size > dalle.config.text_vocab_size:
            raise ValueError(
                f"tokenizer vocab {tokenizer.vocab_size} > dalle.text_vocab_size={dalle.config.text_vocab_size}"
            )
        self.tokenizer, self.image_tokenizer, self.dalle, self.reranker = tokenizer, image_tokenizer, dalle, reranker
        self.num_threads = check_threads(num_threads)
        self.card = dict(card or {})  # model card fields kept in pipeline.json (license, datasets, quality, ...)
        self.to(device=device, dtype=check_dtype(torch_dtype))

    @property
    def dvae(self):
        """The image tokenizer (its name before the VQ family joined; kept for 0.1 callers)."""
        return self.image_tokenizer

    @property
    def image_tokenizer_kind(self) -> str:
        return self.image_tokenizer.config.kind

    def to(self, *args, device=None, dtype=None, decoder_dtype=None) -> "TextToImagePipeline":
        """`.to(device)`, `.to(dtype)`, `.to(device, dtype)` (diffusers style): dtype is the prior's;
        the image decoder changes dtype only with `decoder_dtype`. Dtype names ("bf16") are accepted."""
        for a in args:
            if isinstance(a, torch.dtype) or (isinstance(a, str) and a.removeprefix("torch.") in DTYPES):
                dtype = a
            elif isinstance(a, (str, torch.device)):
                device = a
            else:
                raise ValueError(f"to(): expected a device or a dtype, got {a!r}")
        dtype, decoder_dtype = check_dtype(dtype, "dtype"), check_dtype(decoder_dtype, "decoder_dtype")
        if device is not None or not hasattr(self, "device"):
            self.device = torch.device(device if device is not None else "cpu")
        self.dalle.to(device=self.device, dtype=dtype).eval()
        self.image_tokenizer.to(device=self.device, dtype=decoder_dtype).eval()
        if self.reranker is not None:
            self.reranker.to(self.device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The prior's dtype."""
        return self.dalle.text_emb.weight.dtype

    # ---- persistence -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory, device="cpu", clip: str | None = None, rerank: bool = True, *,
                        torch_dtype=None, num_threads: Optional[int] = None) -> "TextToImagePipeline":
        """Load a pipeline directory; `clip` overrides its clip/ (e.g. a local copy of OpenAI's CLIP);
        `torch_dtype` ("bf16", torch.float16, ...) casts the prior after loading.

        A pipeline whose pipeline.json lists a CLIP must have it: a missing clip/ is a ValueError, never a
        silent run without reranking. `rerank=False` loads no CLIP at all (candidates keep their sampling
        order, scores are NaN)."""
        d = Path(directory)
        if not (d / PIPELINE_FILE).is_file():
            raise ValueError(f"{d} is not a pipeline directory: no {PIPELINE_FILE}")
        try:
            components = json.loads((d / PIPELINE_FILE).read_text())["components"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{d / PIPELINE_FILE}: not a pipeline description ({e})") from None
        for part in ("tokenizer", "dalle"):
            if not (d / part).is_dir():
                raise ValueError(f"pipeline {d}: missing component '{part}/'")
        images = [k for k in KINDS if (d / k).is_dir()]
        if len(images) != 1:
            raise ValueError(f"pipeline {d}: needs exactly one image tokenizer directory of {list(KINDS)}, found {images}")
        if not rerank:
            clip = None
        elif clip is None and (d / "clip").is_dir():
            clip = d / "clip"
        elif clip is None and "clip" in components:
            raise ValueError(f"pipeline {d}: {PIPELINE_FILE} lists a CLIP reranker but {d / 'clip'} is missing; "
                             f"restore it, pass another CLIP (--clip DIR), or sample without reranking (--no-rerank)")
        card = json.loads((d / PIPELINE_FILE).read_text()).get("card")
        return cls.from_pretrained_parts(d / "tokenizer", d / images[0], d / "dalle", clip, device=device,
                                         torch_dtype=torch_dtype, num_threads=num_threads, card=card)

    @classmethod
    def from_pretrained_parts(cls, tokenizer, image_tokenizer=None, dalle=None, clip=None, device="cpu", *,
                              dvae=None, torch_dtype=None, num_threads: Optional[int] = None,
                              card: Optional[dict] = None) -> "TextToImagePipeline":
        """Join separately trained parts (directories; `image_tokenizer` a dVAE or VQGAN one, also accepted
        as `dvae=`, its 0.1 name); without `clip` there is no reranking."""
        if (image_tokenizer is None) == (dvae is None) or dalle is None:
            raise ValueError("from_pretrained_parts needs tokenizer, dalle and one image tokenizer directory "
                             "(image_tokenizer=, or dvae= as in 0.1)")
        image_tokenizer = image_tokenizer if dvae is None else dvae
        torch_dtype = check_dtype(torch_dtype)
        reranker = None
        if clip is not None:
            reranker = CLIPReranker.from_pretrained(clip, device=device)
        return cls(TextTokenizer.from_pretrained(tokenizer), load_image_tokenizer(image_tokenizer),
                   DALLE.from_pretrained(dalle), reranker, device=device, torch_dtype=torch_dtype,
                   num_threads=num_threads, card=card)

    def save_pretrained(self, directory, clip_dir: str | None = None, *, card: Optional[dict] = None) -> Path:
        """Write the pipeline layout and its model card (README.md). The CLIP is copied from
        `clip_dir` or from the reranker's source. `card` adds or replaces model card fields:
        license, datasets (list), description, quality ({figure: value}), training ({stage: notes})."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.card.update(card or {})
        self.tokenizer.save_pretrained(d / "tokenizer")
        kind = self.image_tokenizer_kind
        for other in KINDS:  # one image tokenizer per pipeline: drop another kind's left-over directory
            if other != kind:
                shutil.rmtree(d / other, ignore_errors=True)
        self.image_tokenizer.save_pretrained(d / kind)
        self.dalle.save_pretrained(d / "dalle")
        components = ["tokenizer", kind, "dalle"]
        src = clip_dir or (getattr(self.reranker, "path", None) if self.reranker is not None else None)
        if src is not None:
            if Path(src).resolve() != (d / "clip").resolve():
                shutil.copytree(src, d / "clip", dirs_exist_ok=True)
            components.append("clip")
        write_json(d / PIPELINE_FILE, {"format": "dalle-ar pipeline", "version": __version__,
                                       "components": components, "card": self.card})
        with atomic_path(d / CARD_FILE) as tmp:
            tmp.write_text(model_card(self, components))
        return d

    # ---- generation --------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], truncation: str = "warn") -> torch.Tensor:
        """-> LongTensor [len(prompts), text_len]; a longer prompt is cut with a warning, or refused
        with a ValueError (truncation="error")."""
        return self.tokenizer.encode(prompts, length=self.dalle.config.text_len, truncation=truncation)

    @property
    def image_size(self) -> int:
        """Side in pixels of the (square) images this pipeline makes."""
        return self.image_tokenizer.image_size

    def sampling_options(self, temperature: Optional[float] = None, top_k: Optional[int] = None,
                         top_p: Optional[float] = None, guidance_scale: Optional[float] = None) -> dict:
        """DALLE.generate's sampling keywords; temperature and guidance_scale None -> the prior's
        configured values."""
        c = self.dalle.config
        return dict(temperature=c.temperature if temperature is None else temperature, top_k=top_k, top_p=top_p,
                    guidance_scale=c.guidance_scale if guidance_scale is None else guidance_scale)

    def candidate_noise(self, seed: int, n: int) -> torch.Tensor:
        """The uniforms [n, image tokens] that candidates 0..n-1 of a prompt seeded `seed` sample with.

        Drawn up front, one generator per prompt: a candidate's image depends on its prompt, seed
        and index only, never on the batch it is sampled in (which the server relies on).
        """
        g = torch.Generator(device=self.device).manual_seed(seed)
        return torch.rand(n, self.dalle.num_image_tokens, generator=g, device=self.device)

    def encode_image(self, image, name: str = "init_image") -> torch.Tensor:
        """A PIL image (any mode: converted to RGB; square of any size: resized to the decoder's
        image_size) or a float tensor [C, S, S] in [0, 1] of exactly that size -> codes Long[grid, grid]."""
        size, channels = self.image_tokenizer.image_size, self.image_tokenizer.channels
        if isinstance(image, Image.Image):
            if image.width != image.height:
                raise ValueError(f"{name} must be square (crop it first), got {image.width}x{image.height}")
            image = image.convert("RGB" if channels == 3 else "L")
            if image.size != (size, size):
                image = image.resize((size, size), Image.BICUBIC)
            arr = np.asarray(image, dtype=np.float32) / 255.0
            x = torch.from_numpy(arr.reshape(size, size, channels)).permute(2, 0, 1)
        elif isinstance(image, torch.Tensor):
            if not image.is_floating_point() or tuple(image.shape) != (channels, size, size):
                raise ValueError(f"{name} as a tensor must be float [{channels}, {size}, {size}] in [0, 1] "
                                 f"(or pass a PIL image, which is converted and resized), got "
                                 f"{image.dtype} {list(image.shape)}")
            x = image
        else:
            raise ValueError(f"{name} must be a PIL image or a float tensor, got {type(image).__name__}")
        dtype = next(self.image_tokenizer.parameters()).dtype
        try:
            return self.image_tokenizer.encode(x[None].to(self.device, dtype))[0]
        except ValueError as e:  # values outside [0, 1]
            raise ValueError(f"{name}: {e}") from None

    @torch.no_grad()
    def sample(self, text: torch.Tensor, n: int, *, generator: torch.Generator, batch_size: int,
               progress=None, prime: Optional[torch.Tensor] = None, null_text: Optional[torch.Tensor] = None,
               on_step: Optional[Callable] = None, decode: bool = True, log_probs: bool = False, **sampling):
        """n candidates for ONE prompt's tokens text [1,T], in chunks of batch_size -> (codes Long[n, g, g],
        images float [n,C,H,W] in [0,1] or None without `decode`), + log_probs float [n, 2] when asked
        (`DALLE.generate`'s; without guidance the null caption's column costs one teacher-forced pass).
        prime Long[1, r, g] fixes the first r rows; null_text [1,T] is guidance's unconditional
        caption; on_step(batch_start, i, codes)."""
        codes, images, scores = [], [], []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            cb = None if on_step is None else (lambda i, c, start=start: on_step(start, i, c))
            z = self.dalle.generate(text.expand(b, -1).to(self.device), generator=generator, callback=cb,
                                    prime=None if prime is None else prime.expand(b, -1, -1),
                                    null_text=None if null_text is None else null_text.expand(b, -1),
                                    return_log_probs=log_probs, **sampling)
            if log_probs:
                z, lp = z
                scores.append(self._fill_null_column(lp, z, null_text, 0 if prime is None else prime[0].numel()))
            codes.append(z.cpu())
            if decode:
                images.append(self.image_tokenizer.decode(z).float().cpu())
            if progress is not None:
                progress.update(b)
        out = torch.cat(codes), (torch.cat(images) if decode else None)
        return (*out, torch.cat(scores)) if log_probs else out

    @torch.no_grad()
    def sample_rows(self, text: torch.Tensor, noise: torch.Tensor, *, batch_size: int, progress=None,
                    log_probs: bool = False, **sampling):
        """Images float [B,3,H,W] for rows of prompt tokens text [B,T] and their uniforms noise [B,N]
        (rows may belong to different prompts), in chunks of batch_size; + log_probs [B, 2] when asked."""
        out, scores = [], []
        for start in range(0, text.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            codes = self.dalle.generate(text[rows].to(self.device), noise=noise[rows], return_log_probs=log_probs,
                                        **sampling)
            if log_probs:
                codes, lp = codes
                scores.append(self._fill_null_column(lp, codes))
            out.append(self.image_tokenizer.decode(codes).float().cpu())
            if progress is not None:
                progress.update(codes.shape[0])
        return (torch.cat(out), torch.cat(scores)) if log_probs else torch.cat(out)

    def _fill_null_column(self, log_probs: torch.Tensor, codes: torch.Tensor, null_text=None, start: int = 0):
        """Without guidance generate() leaves log p(codes | null caption) NaN: one teacher-forced pass."""
        if log_probs[:, 1].isnan().any():
            b = codes.shape[0]
            null = (torch.full((b, self.dalle.config.text_len), self.dalle.config.pad_id, dtype=torch.long)
                    if null_text is None else null_text.expand(b, -1))
            log_probs[:, 1] = self.dalle.log_likelihood(null, codes, start=start)
        return log_probs

    def rank(self, prompt: str, images: Optional[list], keep: int, seed: Optional[int],
             consensus: float = CONSENSUS, return_candidates: bool = False, *, outputs: Optional[list] = None,
             codes: Optional[torch.Tensor] = None, log_probs: Optional[torch.Tensor] = None,
             likelihood: float = LIKELIHOOD) -> PromptResult:
        """Rerank one prompt's candidates (PIL `images`, in sampling order) and keep the `keep` best.
        `outputs` (default: the images) are what the result holds, in the same order; `codes` Long[n, g, g]
        the candidates' codes; `log_probs` [n, 2] their likelihoods with and without the prompt, mixed
        in with weight `likelihood` (rerank.with_likelihood). With neither a CLIP nor log_probs,
        candidates keep their sampling order and scores are NaN."""
        outputs = images if outputs is None else outputs
        n = len(outputs)
        scores = None
        if self.reranker is not None:
            order, ranked = self.reranker.rerank(prompt, images, keep=n, consensus=consensus)
            scores = torch.empty(n)
            scores[order] = ranked
        if log_probs is not None and likelihood > 0:
            scores = with_likelihood(scores, log_probs, likelihood)
        if scores is not None:
            order = torch.argsort(scores, descending=True, stable=True)
            order, scores = order.tolist(), scores[order].tolist()
        else:
            order, scores = list(range(n)), [float("nan")] * n
        all_scores = [0.0] * n
        for idx, sc in zip(order, scores):
            all_scores[idx] = sc
        return PromptResult(
            prompt=prompt,
            images=[outputs[j] for j in order[:keep]],
            scores=scores[:keep],
            ranks=list(range(keep)),
            seed=seed,
            candidates=list(outputs) if return_candidates else None,
            candidate_scores=all_scores if return_candidates else None,
            codes=None if codes is None else [codes[j] for j in order[:keep]],
            candidate_log_probs=log_probs.tolist() if return_candidates and log_probs is not None else None,
        )

    def __call__(
        self,
        prompts,
        num_candidates: int = 16,
        keep: int = 1,
        *,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        negative_prompt=None,
        consensus: Optional[float] = None,
        likelihood: Optional[float] = None,
        seed: Optional[int] = None,
        generator=None,
        init_image=None,
        keep_rows: Optional[int] = None,
        output_type: str = "pil",
        batch_size: int = 16,
        return_candidates: bool = False,
        callback_on_step_end: Optional[Callable] = None,
        progress: bool = True,
    ) -> list[PromptResult]:
        """Sample `num_candidates` images per prompt, keep the `keep` best by the reranker.

        Randomness: prompt i samples with its own generator seeded `seed + i` (seed None: 0), so a
        prompt's images do not depend on which other prompts share the call; or pass `generator`
        (one torch.Generator drawn from prompt after prompt, or a list, one per prompt) instead.
        Without a CLIP, candidates keep their sampling order and scores are NaN. temperature and
        guidance_scale None: the prior's configured values (DALLEConfig.temperature,
        DALLEConfig.guidance_scale). consensus: the weight of candidate agreement in the ranking
        (CLIPReranker.rerank; 0 = CLIP score alone; None = rerank.CONSENSUS). likelihood: the weight of
        the prior's likelihood ratio log p(image | prompt) - log p(image | null caption), z-scored over
        the prompt's candidates (rerank.with_likelihood; 0 = off; None = rerank.LIKELIHOOD); it ranks
        the candidates alone when the pipeline has no CLIP.

        negative_prompt (a string, or one per prompt): the unconditional branch of guidance
        (guidance_scale != 1) is conditioned on it instead of the null caption; too long ones are
        truncated like prompts. init_image (a PIL image, or one per prompt; see `encode_image`) with
        keep_rows r (1 .. grid-1; default grid // 2): image completion, the first r rows of the
        image's codes are kept and the rest sampled. output_type: "pil" | "np" ([H,W,C] float32 in
        [0,1]) | "pt" ([C,H,W] float32) | "codes" (Long[grid, grid]). callback_on_step_end(pipe,
        step, total, {"prompt_index", "batch_start", "token", "codes"}) runs after every sampled
        image token (step counts from 0 over the whole call; codes: that batch's codes so far).
        """
        prompts = check_prompts(prompts)
        check_call(num_candidates, keep, batch_size, output_type, callback_on_step_end)
        consensus = CONSENSUS if consensus is None else check_consensus(consensus)
        likelihood = LIKELIHOOD if likelihood is None else check_likelihood(likelihood)
        generators = prompt_generators(prompts, seed, generator, self.device)
        negatives = per_prompt(negative_prompt, prompts, "negative_prompt", allow_empty=True)
        init_images = per_prompt(init_image, prompts, "init_image")
        g = self.dalle.config.image_grid
        keep_rows = check_keep_rows(keep_rows, init_image, g)
        sampling = self.sampling_options(temperature, top_k, top_p, guidance_scale)
        if negatives is not None and sampling["guidance_scale"] == 1:
            log.warning("negative_prompt has no effect without guidance (guidance_scale=1)")
        text = self.encode_prompts(prompts)
        null = self.encode_prompts(negatives) if negatives is not None else None
        primes = None
        if isinstance(init_image, (list, tuple)):
            primes = [self.encode_image(im, f"init_image[{i}]")[None, :keep_rows].cpu()
                      for i, im in enumerate(init_images)]
        elif init_image is not None:
            primes = [self.encode_image(init_image)[None, :keep_rows].cpu()] * len(prompts)
        steps_per_batch = g * g - (keep_rows if primes is not None else 0) * g
        total = len(prompts) * math.ceil(num_candidates / batch_size) * steps_per_batch
        counter = [0]
        bar = tqdm(total=len(prompts) * num_candidates, desc="candidates", unit="img",
                   disable=not progress, leave=False)
        results = []
        with threads(self.num_threads) if self.device.type == "cpu" else nullcontext():
            for i, prompt in enumerate(prompts):
                on_step = None
                if callback_on_step_end is not None:
                    def on_step(batch_start, token, codes, i=i):
                        callback_on_step_end(self, counter[0], total, {"prompt_index": i, "batch_start": batch_start,
                                                                      "token": token, "codes": codes})
                        counter[0] += 1
                decode = output_type != "codes" or self.reranker is not None
                codes, images, *log_probs = self.sample(
                    text[i:i + 1], num_candidates, generator=generators[i], batch_size=batch_size, progress=bar,
                    prime=None if primes is None else primes[i], null_text=None if null is None else null[i:i + 1],
                    on_step=on_step, decode=decode, log_probs=likelihood > 0 or return_candidates, **sampling)
                pil = to_pil(images) if images is not None else None
                results.append(self.rank(prompt, pil, keep, None if generator is not None else (seed or 0) + i,
                                         consensus, return_candidates,
                                         outputs=_convert(output_type, codes, images, pil), codes=codes,
                                         log_probs=log_probs[0] if log_probs else None, likelihood=likelihood))
        bar.close()
        return results



def _convert(output_type: str, codes: torch.Tensor, images: Optional[torch.Tensor], pil: Optional[list]) -> list:
    """One list entry per candidate, in the requested output type."""
    if output_type == "codes":
        return list(codes)
    if output_type == "pil":
        return pil
    if output_type == "pt":
        return list(images)
    return list(images.permute(0, 2, 3, 1).numpy())
