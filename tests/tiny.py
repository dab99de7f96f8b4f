"""A tiny real pipeline (BPE tokenizer, dVAE, prior, small CLIP), untrained, saved part by part."""

from pathlib import Path

import torch

from dalle_ar.dalle import DALLE, DALLEConfig
from dalle_ar.dvae import DiscreteVAE, DVAEConfig

CAPTIONS = ["a small red circle in the top left", "a large blue square in the center",
            "a small green triangle in the bottom right", "red circle left of blue square"] * 4


def save_tiny_parts(root: Path) -> Path:
    """root/{tokenizer,dvae,dalle,clip}: 16 px images, an 8 x 8 code grid, a 12-token text."""
    from dalle_ar.clip import SmallCLIPConfig, build_small_clip
    from dalle_ar.tokenizer import TextTokenizer

    torch.manual_seed(0)
    tok = TextTokenizer.train(CAPTIONS, vocab_size=64, min_frequency=1)
    tok.save_pretrained(root / "tokenizer")
    dvae = DiscreteVAE(DVAEConfig(image_size=16, n_hid=8, group_count=2, vocab_size=16, n_init=8))
    dvae.save_pretrained(root / "dvae")
    dalle = DALLE(DALLEConfig(text_vocab_size=tok.vocab_size, text_len=12, image_vocab_size=16,
                              image_grid=dvae.grid_size, dim=32, depth=2, heads=2))
    dalle.save_pretrained(root / "dalle")
    clip, clip_tok, processor = build_small_clip(tok, SmallCLIPConfig(), image_size=16, text_len=12)
    clip.save_pretrained(root / "clip")
    clip_tok.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    return root
