"""CLIP reranking: score N candidate images against their prompt, keep the best k.

    reranker = CLIPReranker.from_pretrained("my-model/clip")        # or a local copy of OpenAI's CLIP
    order, scores = reranker.rerank("a red circle", images, keep=4)  # best first

Ranking adds consensus to the CLIP score (`consensus`, default 1.0; 0 ranks by CLIP alone): each
candidate's mean CLIP-image cosine to the other candidates, both terms z-scored over the prompt's
candidates. A candidate that agrees with most of its siblings is rarely an outlier of the prior
(a minimum-Bayes-risk pick); the CLIP term keeps the prompt in charge.

Any local transformers `CLIPModel` directory works (offline, `local_files_only=True`): a copy of
OpenAI's CLIP, or our own small CLIP (`dalle_ar.clip`) as the CLIP stage exports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

CONSENSUS = 1.0  # default weight of candidate agreement in rerank (why: docs/benchmarks.md, reranker variants)
LIKELIHOOD = 0.0  # default weight of the prior's likelihood ratio in the ranking: off, it picked worse (docs/benchmarks.md)


class CLIPReranker:
    """A CLIPModel + its tokenizer + image processor; scores are logit_scale * cosine similarity."""

    def __init__(self, model, tokenizer, image_processor, path: Optional[str] = None):
        self.model = model.eval()
        self.tokenizer, self.image_processor, self.path = tokenizer, image_processor, path
        self.text_len = model.config.text_config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, path, device=None) -> "CLIPReranker":
        """Load a local CLIP directory (config.json + weights + tokenizer + image processor files)."""
        # transformers loads with a reranker: a pipeline without one does not pay for it.
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no CLIP directory at {path}")
        config = path / "config.json"
        if not config.is_file():
            raise ValueError(f"{path} is not a CLIP directory: no config.json")
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type != "clip":
            raise ValueError(f"{path} holds a {model_type!r} model, not a CLIP (config.json model_type 'clip')")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            image_processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path}: the CLIP's tokenizer or image processor files are missing or broken: {e}") from None
        try:
            model = CLIPModel.from_pretrained(str(path), local_files_only=True).float()
        except Exception as e:  # noqa: BLE001  (transformers: OSError for no weights, others for bad ones)
            raise ValueError(f"{path}: the CLIP's weights are missing or unreadable: {str(e)[:300]}") from None
        return cls(model, tokenizer, image_processor, path=str(path)).to(device or "cpu")

    def to(self, device) -> "CLIPReranker":
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, prompt: str, images: list, batch_size: int = 64) -> torch.Tensor:
        """-> FloatTensor [N] on the CPU: logit_scale * cos(text(prompt), image(images[i]))."""
        return self._score_and_embed(prompt, images, batch_size)[0]

    @torch.no_grad()
    def _score_and_embed(self, prompt: str, images: list, batch_size: int = 64):
        """-> (CLIP scores [N], unit image embeddings [N, D]), both float32 on the CPU."""
        prompt = _check_prompt(prompt)
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images must be a non-empty list of PIL images")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        dev = self.device
        text = self.tokenizer([prompt], max_length=self.text_len, truncation=True, return_tensors="pt")
        text = {k: text[k].to(dev) for k in ("input_ids", "attention_mask")}
        scores, embeds = [], []
        for start in range(0, len(images), batch_size):
            chunk = [im.convert("RGB") for im in images[start:start + batch_size]]
            pixels = self.image_processor(images=chunk, return_tensors="pt")["pixel_values"]
            out = self.model(**text, pixel_values=pixels.to(dev, next(self.model.parameters()).dtype))
            scores.append(out.logits_per_image[:, 0].float().cpu())
            embeds.append(F.normalize(out.image_embeds.float(), dim=-1).cpu())
        return torch.cat(scores), torch.cat(embeds)

    def rerank(self, prompt: str, images: list, keep: int, consensus: float = CONSENSUS
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (indices LongTensor [keep], scores FloatTensor [keep]) of the best images, best first.

        consensus 0: scores are the CLIP scores. consensus w > 0 (with 3+ images): scores are
        z(CLIP score) + w * z(mean cosine of the image's CLIP embedding to the other images'), z-scored
        over these images.
        """
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images must be a non-empty list of PIL images")
        if not isinstance(keep, int) or not 1 <= keep <= len(images):
            raise ValueError(f"keep must be an integer in [1, {len(images)}] (the number of images), got {keep!r}")
        check_consensus(consensus)
        scores, embeds = self._score_and_embed(prompt, images)
        n = len(images)
        if consensus > 0 and n > 2:
            sim = embeds @ embeds.T
            agreement = (sim.sum(1) - sim.diagonal()) / (n - 1)
            scores = _zscore(scores) + consensus * _zscore(agreement)
        order = torch.argsort(scores, descending=True, stable=True)[:keep]
        return order, scores[order]


def check_consensus(consensus) -> float:
    if isinstance(consensus, bool) or not isinstance(consensus, (int, float)) or not 0 <= consensus < float("inf"):
        raise ValueError(f"consensus must be a finite number >= 0, got {consensus!r}")
    return float(consensus)


def check_likelihood(likelihood) -> float:
    if isinstance(likelihood, bool) or not isinstance(likelihood, (int, float)) or not 0 <= likelihood < float("inf"):
        raise ValueError(f"likelihood must be a finite number >= 0, got {likelihood!r}")
    return float(likelihood)


def with_likelihood(scores: Optional[torch.Tensor], log_probs: torch.Tensor, weight: float) -> torch.Tensor:
    """Add the prior's view to candidate scores [N] (None: no CLIP): weight * z(log p(x | caption) -
    log p(x | null caption)), log_probs [N, 2] as `DALLE.generate(return_log_probs=True)` gives them.
    The likelihood ratio (the caption's pointwise mutual information with the candidate) asks how much
    the caption, rather than the prior alone, explains the image; it costs nothing under guidance."""
    pmi = _zscore(log_probs[:, 0].float() - log_probs[:, 1].float())
    return weight * pmi if scores is None else scores + weight * pmi


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the candidates; all-equal values give zeros."""
    return (x - x.mean()) / x.std(unbiased=False).clamp_min(1e-8)


def _check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    return prompt


_MOVED_TO_CLIP = ("SmallCLIPConfig", "build_small_clip", "clip_text_tokenizer", "clip_inputs", "clip_loss",
                  "retrieval_metrics", "retrieval_accuracy")


def __getattr__(name):
    """The small CLIP moved to dalle_ar.clip; `from dalle_ar.rerank import build_small_clip` keeps working."""
    if name in _MOVED_TO_CLIP:
        from . import clip

        return getattr(clip, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
