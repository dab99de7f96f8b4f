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

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import __version__
from .image_tokenizer import KINDS, load_image_tokenizer
from .images import image_grid, to_pil  # noqa: F401  (image_grid: dalle_ar.pipeline API, docs/api.md)
from .io import write_json
from .dalle import DALLE
from .rerank import CONSENSUS, CLIPReranker, check_consensus
from .tokenizer import TextTokenizer

PIPELINE_FILE = "pipeline.json"


@dataclass
class PromptResult:
    """What one prompt gave: the kept images best first, their reranker scores (CLIP scores, or with
    consensus > 0 the z-scored mix of CLIPReranker.rerank) and ranks (0 = best)."""

    prompt: str
    images: list
    scores: list
    ranks: list
    seed: int
    candidates: Optional[list] = None  # all N candidates in sampling order, on request
    candidate_scores: Optional[list] = None


def check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: the list is empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts: prompt {i} is empty or not a string: {p!r}")
    return prompts


class TextToImagePipeline:
    """tokenizer -> prior -> image tokenizer's decoder (dVAE or VQGAN) -> CLIP reranker."""

    def __init__(self, tokenizer, image_tokenizer, dalle, reranker=None, device: str | torch.device = "cpu"):
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
        self.to(device)

    @property
    def dvae(self):
        """The image tokenizer (its name before the VQ family joined; kept for 0.1 callers)."""
        return self.image_tokenizer

    @property
    def image_tokenizer_kind(self) -> str:
        return self.image_tokenizer.config.kind

    def to(self, device) -> "TextToImagePipeline":
        self.device = torch.device(device)
        self.image_tokenizer.to(self.device).eval()
        self.dalle.to(self.device).eval()
        if self.reranker is not None:
            self.reranker.to(self.device)
        return self

    # ---- persistence -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory, device="cpu", clip: str | None = None) -> "TextToImagePipeline":
        """Load a pipeline directory; `clip` overrides its clip/ (e.g. a local copy of OpenAI's CLIP)."""
        d = Path(directory)
        if not (d / PIPELINE_FILE).is_file():
            raise ValueError(f"{d} is not a pipeline directory: no {PIPELINE_FILE}")
        for part in ("tokenizer", "dalle"):
            if not (d / part).is_dir():
                raise ValueError(f"pipeline {d}: missing component '{part}/'")
        images = [k for k in KINDS if (d / k).is_dir()]
        if len(images) != 1:
            raise ValueError(f"pipeline {d}: needs exactly one image tokenizer directory of {list(KINDS)}, found {images}")
        if clip is None and (d / "clip").is_dir():
            clip = d / "clip"
        return cls.from_pretrained_parts(d / "tokenizer", d / images[0], d / "dalle", clip, device=device)

    @classmethod
    def from_pretrained_parts(cls, tokenizer, image_tokenizer=None, dalle=None, clip=None, device="cpu", *,
                              dvae=None) -> "TextToImagePipeline":
        """Join separately trained parts (directories; `image_tokenizer` a dVAE or VQGAN one, also accepted
        as `dvae=`, its 0.1 name); without `clip` there is no reranking."""
        if (image_tokenizer is None) == (dvae is None) or dalle is None:
            raise ValueError("from_pretrained_parts needs tokenizer, dalle and one image tokenizer directory "
                             "(image_tokenizer=, or dvae= as in 0.1)")
        image_tokenizer = image_tokenizer if dvae is None else dvae
        reranker = None
        if clip is not None:
            reranker = CLIPReranker.from_pretrained(clip, device=device)
        return cls(TextTokenizer.from_pretrained(tokenizer), load_image_tokenizer(image_tokenizer),
                   DALLE.from_pretrained(dalle), reranker, device=device)

    def save_pretrained(self, directory, clip_dir: str | None = None) -> Path:
        """Write the pipeline layout. The CLIP is copied from `clip_dir` or from the reranker's source."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
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
                                       "components": components})
        return d

    # ---- generation --------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer.encode(prompts, length=self.dalle.config.text_len, truncation="warn")

    @torch.no_grad()
    def sample(self, text: torch.Tensor, n: int, *, generator: torch.Generator, batch_size: int,
               progress=None, **sampling) -> torch.Tensor:
        """n candidate images for ONE prompt's tokens text [1,T], in chunks of batch_size."""
        out = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            codes = self.dalle.generate(text.expand(b, -1).to(self.device), generator=generator, **sampling)
            out.append(self.image_tokenizer.decode(codes).float().cpu())
            if progress is not None:
                progress.update(b)
        return torch.cat(out)

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
        consensus: Optional[float] = None,
        seed: int = 0,
        batch_size: int = 16,
        return_candidates: bool = False,
        progress: bool = True,
    ) -> list[PromptResult]:
        """Sample `num_candidates` images per prompt, keep the `keep` best by the reranker.

        Prompt i samples with its own generator seeded `seed + i`, so a prompt's images do not
        depend on which other prompts share the call. Without a CLIP, candidates keep their
        sampling order and scores are NaN. temperature and guidance_scale None: the prior's
        configured values (DALLEConfig.temperature, DALLEConfig.guidance_scale). consensus: the
        weight of candidate agreement in the ranking (CLIPReranker.rerank; 0 = CLIP score alone;
        None = rerank.CONSENSUS).
        """
        prompts = check_prompts(prompts)
        for name, v in (("num_candidates", num_candidates), ("keep", keep), ("batch_size", batch_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if keep > num_candidates:
            raise ValueError(f"keep={keep} > num_candidates={num_candidates}")
        consensus = CONSENSUS if consensus is None else check_consensus(consensus)
        if temperature is None:
            temperature = self.dalle.config.temperature
        if guidance_scale is None:
            guidance_scale = self.dalle.config.guidance_scale
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale)
        text = self.encode_prompts(prompts)
        bar = tqdm(total=len(prompts) * num_candidates, desc="candidates", unit="img",
                   disable=not progress, leave=False)
        results = []
        for i, prompt in enumerate(prompts):
            g = torch.Generator(device=self.device).manual_seed(seed + i)
            images = to_pil(self.sample(text[i:i + 1], num_candidates, generator=g,
                                        batch_size=batch_size, progress=bar, **sampling))
            if self.reranker is not None:
                order, scores = self.reranker.rerank(prompt, images, keep=num_candidates, consensus=consensus)
                order, scores = order.tolist(), scores.tolist()
            else:
                order, scores = list(range(num_candidates)), [float("nan")] * num_candidates
            all_scores = [0.0] * num_candidates
            for idx, s in zip(order, scores):
                all_scores[idx] = s
            results.append(PromptResult(
                prompt=prompt,
                images=[images[j] for j in order[:keep]],
                scores=scores[:keep],
                ranks=list(range(keep)),
                seed=seed + i,
                candidates=images if return_candidates else None,
                candidate_scores=all_scores if return_candidates else None,
            ))
        bar.close()
        return results
