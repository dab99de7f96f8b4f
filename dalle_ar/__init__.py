"""dalle-ar: the DALL-E (2021) recipe, small enough to read.

Stages (each importable alone):
    dalle_ar.data        WebDataset shards in, batches out; the built-in `shapes` and `digits` sets
    dalle_ar.tokenizer   BPE text tokenizer (HF `tokenizers`)
    dalle_ar.dvae        discrete VAE: images <-> codebook indices
    dalle_ar.dalle       decoder-only transformer prior over [text ; image] tokens
    dalle_ar.rerank      CLIP reranking of candidates
    dalle_ar.clip        our small CLIP (trained by the clip stage) and its loss
    dalle_ar.pipeline    prompts in, reranked images out (dalle_ar.generate: folders of them)
    dalle_ar.engine      the one DeepSpeed training loop
    dalle_ar.train       the stages that train through it, and the shipped configs
    dalle_ar.cli         the `dalle-ar` command (the only argument parser)

Shared helpers: dalle_ar.io (configs, safetensors, atomic writes), dalle_ar.checks (argument
checks), dalle_ar.images (to_pil, image_grid). Module map and import rules: docs/architecture.md.
"""

__version__ = "0.1.0"
