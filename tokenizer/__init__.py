"""Text tokenizer: BPE trained with HF `tokenizers` (or any local HF tokenizer) + caption reading."""

from .bpe import CaptionEncoder, TextTokenizer, read_captions

__all__ = ["TextTokenizer", "CaptionEncoder", "read_captions"]
