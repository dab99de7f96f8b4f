"""The model card (README.md) a pipeline directory carries: Hugging Face model card fields + usage."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .io import config_to_dict

if TYPE_CHECKING:
    from .pipeline import TextToImagePipeline


def model_card(pipe: TextToImagePipeline, components: list) -> str:
    """The pipeline directory's README.md: YAML front matter (Hugging Face model card fields) + usage."""
    card = pipe.card
    datasets = card.get("datasets") or []
    quality = card.get("quality") or {}
    dalle = config_to_dict(pipe.dalle.config)
    lines = ["---", "library_name: dalle-ar", "pipeline_tag: text-to-image",
             f"license: {card.get('license', 'mit')}", "tags:", "  - text-to-image", "  - dall-e",
             "  - autoregressive"]
    if datasets:
        lines += ["datasets:"] + [f"  - {json.dumps(str(d))}" for d in datasets]
    if quality:
        lines += ["model-index:", "  - name: dalle-ar", "    results:", "      - task:",
                  "          type: text-to-image", "        metrics:"]
        lines += [f"          - name: {json.dumps(str(k))}\n            type: {json.dumps(str(k))}\n"
                  f"            value: {json.dumps(v)}" for k, v in quality.items()]
    lines += ["---", "", f"# {card.get('name', 'dalle-ar text-to-image pipeline')}", ""]
    lines += [card.get("description", "A DALL-E (2021) style pipeline: BPE text tokens, a decoder-only transformer "
                                      "prior over [text ; image codes], an image tokenizer decoder (dVAE or VQGAN)"
                                      + (" and CLIP reranking." if "clip" in components else "."))]
    lines += ["", "```python", "from dalle_ar import TextToImagePipeline", "",
              'pipe = TextToImagePipeline.from_pretrained("path/to/this/folder")',
              'results = pipe(["a prompt"], num_candidates=16, keep=4)',
              'results[0].images[0].save("best.png")', "```", "",
              "or `dalle-ar generate --model path/to/this/folder --prompts prompts.txt --out out/`.", "",
              "## Components", "", "| part | summary |", "| --- | --- |",
              f"| tokenizer | BPE, {pipe.tokenizer.vocab_size} tokens, captions cut to {dalle['text_len']} |",
              f"| prior | {pipe.dalle.num_parameters() / 1e6:.2f}M params: dim {dalle['dim']}, depth {dalle['depth']}, "
              f"heads {dalle['heads']}, attention {', '.join(dalle['attn_types'])}, "
              f"{dalle['image_grid']}x{dalle['image_grid']} image codes of {dalle['image_vocab_size']} |",
              f"| image decoder | {pipe.image_tokenizer_kind}, {pipe.image_tokenizer.image_size} px, "
                  f"vocab {pipe.image_tokenizer.vocab_size} |",
              f"| reranker | {'CLIP (clip/)' if 'clip' in components else 'none'} |", "",
              f"Sampling defaults: temperature {dalle['temperature']}, guidance scale {dalle['guidance_scale']}.", ""]
    if datasets or card.get("training"):
        lines += ["## Training", ""]
        lines += [f"- data: {', '.join(map(str, datasets))}"] if datasets else []
        lines += [f"- {k}: {v}" for k, v in (card.get("training") or {}).items()]
        lines += [""]
    if quality:
        lines += ["## Quality", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in quality.items()] + [""]
    lines += ["## Configs", "", "prior (`dalle/config.json`):", "", "```json", json.dumps(dalle, indent=2), "```", "",
              f"image decoder (`{pipe.image_tokenizer_kind}/config.json`):", "", "```json",
              json.dumps(config_to_dict(pipe.image_tokenizer.config), indent=2), "```", ""]
    return "\n".join(lines)
