"""Prompts in, CLIP-reranked images out.

A trained pipeline is one directory (see docs/checkpoints.md):

    pipeline.json              which components, package version
    tokenizer/tokenizer.json   text BPE
    dvae/                      config.json + model.safetensors
    dalle/                     config.json + model.safetensors
    clip/                      a transformers CLIPModel directory (optional: no reranking without it)

This module joins tokenizer + dVAE + prior + reranker for inference; it never imports DeepSpeed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import __version__
from .images import image_grid, to_pil  # noqa: F401  (image_grid: dalle_ar.pipeline API, docs/api.md)
from .io import write_json
from .dalle import DALLE
from .dvae import DiscreteVAE
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
    """tokenizer -> prior -> dVAE decoder -> CLIP reranker."""

    def __init__(self, tokenizer, dvae, dalle, reranker=None, device: str | torch.device = "cpu"):
        if dalle.config.image_vocab_size != dvae.config.vocab_size:
            raise ValueError(
                f"dalle.image_vocab_size={dalle.config.image_vocab_size} does not match "
                f"dvae.vocab_size={dvae.config.vocab_size}"
            )
        if dalle.config.image_grid != dvae.grid_size:
            raise ValueError(f"dalle.image_grid={dalle.config.image_grid} != dvae grid {dvae.grid_size}")
        if tokenizer.vocab_size > dalle.config.text_vocab_size:
            raise ValueError(
                f"tokenizer vocab {tokenizer.vocab_size} > dalle.text_vocab_size={dalle.config.text_vocab_size}"
            )
        self.tokenizer, self.dvae, self.dalle, self.reranker = tokenizer, dvae, dalle, reranker
        self.to(device)

    def to(self, device) -> "TextToImagePipeline":
        self.device = torch.device(device)
        self.dvae.to(self.device).eval()
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
        for part in ("tokenizer", "dvae", "dalle"):
            if not (d / part).is_dir():
                raise ValueError(f"pipeline {d}: missing component '{part}/'")
        if clip is None and (d / "clip").is_dir():
            clip = d / "clip"
        return cls.from_pretrained_parts(d / "tokenizer", d / "dvae", d / "dalle", clip, device=device)

    @classmethod
    def from_pretrained_parts(cls, tokenizer, dvae, dalle, clip=None, device="cpu") -> "TextToImagePipeline":
        """Join separately trained parts (directories); without `clip` there is no reranking."""
        reranker = None
        if clip is not None:
            reranker = CLIPReranker.from_pretrained(clip, device=device)
        return cls(TextTokenizer.from_pretrained(tokenizer), DiscreteVAE.from_pretrained(dvae),
                   DALLE.from_pretrained(dalle), reranker, device=device)

    def save_pretrained(self, directory, clip_dir: str | None = None) -> Path:
        """Write the pipeline layout. The CLIP is copied from `clip_dir` or from the reranker's source."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(d / "tokenizer")
        self.dvae.save_pretrained(d / "dvae")
        self.dalle.save_pretrained(d / "dalle")
        components = ["tokenizer", "dvae", "dalle"]
        src = clip_dir or (getattr(self.reranker, "path", None) if self.reranker is not None else None)
        if src is not None:
            if Path(src).resolve() != (d / "clip").resolve():
                shutil.copytree(src, d / "clip", dirs_exist_ok=True)
            components.append("clip")
        write_json(d / PIPELINE_FILE, {"format": "dalle-ar pipeline", "version": __version__,
                                       "components": components})
        return d

    # ---- generation --------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], truncation: str = "warn") -> torch.Tensor:
        """-> LongTensor [len(prompts), text_len]; a longer prompt is cut with a warning, or refused
        with a ValueError (truncation="error")."""
        return self.tokenizer.encode(prompts, length=self.dalle.config.text_len, truncation=truncation)

    @property
    def image_size(self) -> int:
        """Side in pixels of the (square) images this pipeline makes."""
        return self.dvae.config.image_size

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

    @torch.no_grad()
    def sample(self, text: torch.Tensor, noise: torch.Tensor, *, batch_size: int, progress=None,
               **sampling) -> torch.Tensor:
        """Images float [B,3,H,W] for rows of prompt tokens text [B,T] and their uniforms noise [B,N]
        (rows may belong to different prompts), in chunks of batch_size."""
        out = []
        for start in range(0, text.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            codes = self.dalle.generate(text[rows].to(self.device), noise=noise[rows], **sampling)
            out.append(self.dvae.decode(codes).float().cpu())
            if progress is not None:
                progress.update(codes.shape[0])
        return torch.cat(out)

    def rank(self, prompt: str, images: list, keep: int, seed: int, consensus: float = CONSENSUS,
             return_candidates: bool = False) -> PromptResult:
        """Rerank one prompt's candidates (sampling order) and keep the `keep` best. Without a CLIP,
        candidates keep their sampling order and scores are NaN."""
        n = len(images)
        if self.reranker is not None:
            order, scores = self.reranker.rerank(prompt, images, keep=n, consensus=consensus)
            order, scores = order.tolist(), scores.tolist()
        else:
            order, scores = list(range(n)), [float("nan")] * n
        all_scores = [0.0] * n
        for idx, s in zip(order, scores):
            all_scores[idx] = s
        return PromptResult(
            prompt=prompt,
            images=[images[j] for j in order[:keep]],
            scores=scores[:keep],
            ranks=list(range(keep)),
            seed=seed,
            candidates=list(images) if return_candidates else None,
            candidate_scores=all_scores if return_candidates else None,
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
        sampling = self.sampling_options(temperature, top_k, top_p, guidance_scale)
        text = self.encode_prompts(prompts)
        bar = tqdm(total=len(prompts) * num_candidates, desc="candidates", unit="img",
                   disable=not progress, leave=False)
        results = []
        for i, prompt in enumerate(prompts):
            rows = text[i:i + 1].expand(num_candidates, -1)
            images = to_pil(self.sample(rows, self.candidate_noise(seed + i, num_candidates),
                                        batch_size=batch_size, progress=bar, **sampling))
            results.append(self.rank(prompt, images, keep, seed + i, consensus, return_candidates))
        bar.close()
        return results
