"""dalle-ar: the DALL-E (2021) recipe, small enough to read.

Stages (each importable alone):
    dalle_ar.data        WebDataset shards in, batches out; the built-in `shapes` and `digits` sets
    dalle_ar.tokenizer   BPE text tokenizer (HF `tokenizers`)
    dalle_ar.dvae        discrete VAE: images <-> codebook indices
    dalle_ar.dalle       decoder-only transformer prior over [text ; image] tokens
    dalle_ar.rerank      CLIP reranking of candidates
    dalle_ar.pipeline    prompts in, reranked images out
    dalle_ar.engine      the one DeepSpeed training loop
"""

__version__ = "0.1.0"
