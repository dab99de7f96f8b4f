"""CLIP reranking: score N candidate images against their prompt, keep the best k.

    reranker = CLIPReranker.from_pretrained("my-model/clip")        # or a local copy of OpenAI's CLIP
    order, scores = reranker.rerank("a red circle", images, keep=4)  # best first

Ranking adds consensus to the CLIP score (`consensus`, default 1.0; 0 ranks by CLIP alone): each
candidate's mean CLIP-image cosine to the other candidates, both terms z-scored over the prompt's
candidates. A candidate that agrees with most of its siblings is rarely an outlier of the prior
(a minimum-Bayes-risk pick); the CLIP term keeps the prompt in charge.

Any local transformers `CLIPModel` directory works (offline, `local_files_only=True`). For a
self-contained demo we also train our own small CLIP (`build_small_clip`): a transformers
`CLIPModel` with a small `CLIPConfig`, whose text side reads our BPE through a
`PreTrainedTokenizerFast` that appends an end-of-text token (CLIP pools the text at that token).
The trainer (train/stages.py, CLIPStage) feeds it batches through `clip_inputs` + `clip_loss`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

EOS = "<eos>"  # appended to every caption for the small CLIP's text pooling
CONSENSUS = 1.0  # default weight of candidate agreement in rerank (docs/benchmarks.md: reranker variants)


# ---- the reranker --------------------------------------------------------------------------------

class CLIPReranker:
    """A CLIPModel + its tokenizer + image processor; scores are logit_scale * cosine similarity."""

    def __init__(self, model, tokenizer, image_processor, path: Optional[str] = None):
        self.model = model.eval()
        self.tokenizer, self.image_processor, self.path = tokenizer, image_processor, path
        self.text_len = model.config.text_config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, path, device=None) -> "CLIPReranker":
        """Load a local CLIP directory (config.json + weights + tokenizer + image processor files)."""
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


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the candidates; all-equal values give zeros."""
    return (x - x.mean()) / x.std(unbiased=False).clamp_min(1e-8)


def _check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    return prompt


# ---- our own small CLIP ------------------------------------------------------------------------------

@dataclass
class SmallCLIPConfig:
    """Sizes of the demo's CLIP (image size and text length come from the data config)."""

    embed_dim: int = 64          # joint embedding (projection) size
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    patch_size: int = 8          # 64x64 images -> 8x8 patches
    mlp_ratio: int = 4
    logit_scale_init: float = 2.6592  # ln(1/0.07), as CLIP

    def __post_init__(self):
        for name in ("embed_dim", "text_width", "text_layers", "text_heads", "vision_width", "vision_layers",
                     "vision_heads", "patch_size", "mlp_ratio"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SmallCLIPConfig.{name} must be an integer >= 1, got {v!r}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width={self.text_width} is not a multiple of text_heads={self.text_heads}")
        if self.vision_width % self.vision_heads:
            raise ValueError(f"vision_width={self.vision_width} is not a multiple of vision_heads={self.vision_heads}")


def clip_text_tokenizer(tokenizer, text_len: int):
    """Our TextTokenizer as a transformers PreTrainedTokenizerFast that appends `<eos>` to every caption.

    The eos id must not be 2: transformers' CLIPTextModel then falls back to legacy pooling (the
    position of the largest token id).
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.to_json())
    eos = EOS
    backend.add_special_tokens([eos])
    if backend.token_to_id(eos) == 2:
        eos = "<clip_eos>"
        backend.add_special_tokens([eos])
    backend.post_processor = processors.TemplateProcessing(single=f"$A {eos}",
                                                           special_tokens=[(eos, backend.token_to_id(eos))])
    unk = json.loads(backend.to_str())["model"].get("unk_token")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=tokenizer.pad_token, eos_token=eos,
                                   unk_token=unk, model_max_length=text_len)


def build_small_clip(tokenizer, cfg: SmallCLIPConfig, image_size: int, text_len: int):
    """-> (CLIPModel, clip_tokenizer, CLIPProcessor) for `image_size` images and `text_len` tokens."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPProcessor

    if not isinstance(image_size, int) or image_size < 1 or image_size % cfg.patch_size:
        raise ValueError(f"image_size={image_size!r} must be a positive multiple of patch_size={cfg.patch_size}")
    if not isinstance(text_len, int) or text_len < 2:
        raise ValueError(f"text_len must be an integer >= 2 (caption + eos), got {text_len!r}")
    clip_tokenizer = clip_text_tokenizer(tokenizer, text_len)
    eos_id = clip_tokenizer.eos_token_id
    config = CLIPConfig(
        text_config=dict(vocab_size=len(clip_tokenizer), hidden_size=cfg.text_width,
                         intermediate_size=cfg.mlp_ratio * cfg.text_width, num_hidden_layers=cfg.text_layers,
                         num_attention_heads=cfg.text_heads, max_position_embeddings=text_len,
                         pad_token_id=clip_tokenizer.pad_token_id, bos_token_id=eos_id, eos_token_id=eos_id),
        vision_config=dict(hidden_size=cfg.vision_width, intermediate_size=cfg.mlp_ratio * cfg.vision_width,
                           num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                           image_size=image_size, patch_size=cfg.patch_size),
        projection_dim=cfg.embed_dim, logit_scale_init_value=cfg.logit_scale_init)
    # The PIL image processor: no torchvision needed. Images already image_size pass through
    # resize/crop unchanged, so `score` (PIL) and `clip_inputs` (tensors) agree.
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer)
    return _small_clip_class()(config), clip_tokenizer, processor


_SMALL_CLIP = None


def _small_clip_class():
    """CLIPModel with a 1-element logit_scale instead of a 0-dim one (built lazily: transformers is
    imported on first use). DeepSpeed's initial parameter broadcast views each parameter as bytes,
    which fails on a 0-dim tensor; the export is a plain CLIPModel directory again."""
    global _SMALL_CLIP
    if _SMALL_CLIP is None:
        from transformers import CLIPModel

        class SmallCLIPModel(CLIPModel):
            def __init__(self, config):
                super().__init__(config)
                self.logit_scale = torch.nn.Parameter(self.logit_scale.detach().reshape(1))
                self._register_load_state_dict_pre_hook(_logit_scale_1d)

            def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
                sd = dict(self.state_dict() if state_dict is None else state_dict)
                sd["logit_scale"] = sd["logit_scale"].reshape(())
                out = super().save_pretrained(save_directory, *args, state_dict=sd, **kwargs)
                config = Path(save_directory) / "config.json"  # name the plain class it loads as
                config.write_text(json.dumps(json.loads(config.read_text()) | {"architectures": ["CLIPModel"]},
                                             indent=2, sort_keys=True) + "\n")
                return out

        _SMALL_CLIP = SmallCLIPModel
    return _SMALL_CLIP


def _logit_scale_1d(state_dict, prefix, *args, **kwargs):
    """Accept a plain CLIPModel state dict (0-dim logit_scale) too."""
    key = prefix + "logit_scale"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


def clip_inputs(images: torch.Tensor, captions: list[str], clip_tokenizer, processor, text_len: int) -> dict:
    """Training batch -> CLIPModel inputs, in torch (no PIL round trip).

    images: float [B,3,H,W] in [0,1]; resized (shortest side, bicubic) and centre-cropped to the
    processor's crop size if needed, then normalised with its mean/std: the processor's maths.
    """
    import torch.nn.functional as F

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B,3,H,W], got {tuple(images.shape)}")
    if len(captions) != images.shape[0]:
        raise ValueError(f"captions: {len(captions)} for {images.shape[0]} images")
    ip = getattr(processor, "image_processor", processor)
    crop_h, crop_w = ip.crop_size["height"], ip.crop_size["width"]
    x = images.float()
    h, w = x.shape[-2:]
    if (h, w) != (crop_h, crop_w):
        side = ip.size.get("shortest_edge", min(crop_h, crop_w))
        scale = side / min(h, w)
        x = F.interpolate(x, size=(max(side, round(h * scale)), max(side, round(w * scale))), mode="bicubic",
                          antialias=True, align_corners=False).clamp(0, 1)
        top, left = (x.shape[-2] - crop_h) // 2, (x.shape[-1] - crop_w) // 2
        x = x[..., top:top + crop_h, left:left + crop_w]
    mean = torch.tensor(ip.image_mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std, device=x.device).view(1, 3, 1, 1)
    text = clip_tokenizer(list(captions), padding="max_length", max_length=text_len, truncation=True,
                          return_tensors="pt")
    return {"input_ids": text["input_ids"].to(images.device),
            "attention_mask": text["attention_mask"].to(images.device),
            "pixel_values": ((x - mean) / std).to(images.dtype)}


def clip_loss(model, input_ids, attention_mask, pixel_values) -> tuple[torch.Tensor, dict]:
    """Symmetric InfoNCE over the batch (CLIPModel's own loss) -> (loss, parts).

    `model` may be the DeepSpeed engine: the loss comes from calling it (ZeRO needs its forward).
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, return_loss=True)
    acc = _top1(out.logits_per_image.detach())
    return out.loss, {"loss_clip": out.loss.detach(), **acc}


def _top1(logits_per_image: torch.Tensor) -> dict:
    target = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return {"image_to_text_top1": (logits_per_image.argmax(1) == target).float().mean(),
            "text_to_image_top1": (logits_per_image.argmax(0) == target).float().mean()}


@torch.no_grad()
def retrieval_metrics(model, input_ids, attention_mask, pixel_values) -> dict:
    """Top-1 retrieval within the batch: {"image_to_text_top1", "text_to_image_top1", "mean_top1"}."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    acc = {k: float(v) for k, v in _top1(out.logits_per_image.float()).items()}
    return acc | {"mean_top1": (acc["image_to_text_top1"] + acc["text_to_image_top1"]) / 2}


def retrieval_accuracy(model, input_ids, attention_mask, pixel_values) -> float:
    """Mean of image->text and text->image top-1 accuracy within the batch (a float in [0, 1])."""
    return retrieval_metrics(model, input_ids, attention_mask, pixel_values)["mean_top1"]
