"""Our own small CLIP, trained by the CLIP stage so the demo reranks without a download.

A transformers `CLIPModel` with a small `CLIPConfig`, whose text side reads our BPE through a
`PreTrainedTokenizerFast` that appends an end-of-text token (CLIP pools the text at that token).
The CLIP stage (train/stage_clip.py) feeds it batches through `clip_inputs` + `clip_loss`; its export is
a plain CLIPModel directory that `dalle_ar.rerank.CLIPReranker` loads like OpenAI's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, processors
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

EOS = "<eos>"  # appended to every caption for the small CLIP's text pooling


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
    return SmallCLIPModel(config), clip_tokenizer, processor


class SmallCLIPModel(CLIPModel):
    """CLIPModel with a 1-element logit_scale instead of a 0-dim one: DeepSpeed's initial parameter
    broadcast views each parameter as bytes, which fails on a 0-dim tensor. It saves as a plain
    CLIPModel directory."""

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
