"""One interface over the image tokenizers (the dVAE and the VQ family), and the checks they share.

Every image tokenizer has
    encode(images [B,C,H,W] float in [0,1]) -> LongTensor [B, h, w]
    decode(codes [B, h, w] integers)        -> float32 [B,C,H,W] in [0,1]
    vocab_size, image_size, grid_size, grid(image_size), config, save_pretrained(dir), from_pretrained(dir)
and its directory holds config.json + model.safetensors; config.json's "kind" names the class
("dvae", "vqgan"). A dVAE config.json without "kind" (written by dalle-ar 0.1) is a dVAE.

    tok = load_image_tokenizer("my-model/dvae")   # or .../vqgan: the caller never needs to know which
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .io import CONFIG_NAME

KINDS = ("dvae", "vqgan")


def tokenizer_kind(directory) -> str:
    """The kind named by `directory`/config.json ("dvae" when a 0.1 dVAE config names none)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"no {CONFIG_NAME} in {directory}: not an image tokenizer directory")
    try:
        kind = json.loads(path.read_text()).get("kind", "dvae")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path} is not a JSON object: {e}") from None
    if kind not in KINDS:
        raise ValueError(f"{path}: unknown image tokenizer kind {kind!r}; known: {list(KINDS)}")
    return kind


def tokenizer_class(kind: str):
    if kind == "dvae":
        from .dvae import DiscreteVAE
        return DiscreteVAE
    if kind == "vqgan":
        from .vqgan import VQGAN
        return VQGAN
    raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")


def load_image_tokenizer(directory, device=None):
    """The image tokenizer saved in `directory` (dVAE or VQGAN, by config.json's kind), in eval mode."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image tokenizer directory {directory} not found")
    return tokenizer_class(tokenizer_kind(directory)).from_pretrained(directory, device=device)


# ---- input checks shared by the tokenizers -----------------------------------------------------------

def check_images(images, channels: int, size: int) -> torch.Tensor:
    """ValueError unless `images` is a float [B, channels, size, size] tensor with values in [0, 1]."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor with values in [0, 1], got {got}")
    want = (channels, size, size)
    if images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"images must have shape [B, {want[0]}, {want[1]}, {want[2]}] "
                         f"(channels, image_size), got {tuple(images.shape)}")
    if images.numel():
        lo, hi = torch.aminmax(images.detach())
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # also catches NaN
            raise ValueError(f"images must have values in [0, 1], got [{float(lo):.4g}, {float(hi):.4g}]")
    return images


def check_codes(codes, grid: int, vocab_size: int) -> torch.Tensor:
    """ValueError unless `codes` is an integer [B, grid, grid] tensor in [0, vocab_size); returns it as long."""
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex() \
            or codes.dtype == torch.bool:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"codes must be an integer tensor, got {got}")
    if codes.dim() != 3 or tuple(codes.shape[1:]) != (grid, grid):
        raise ValueError(f"codes must have shape [B, {grid}, {grid}] (grid_size), got {tuple(codes.shape)}")
    if codes.numel():
        lo, hi = torch.aminmax(codes)
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"codes must be in [0, vocab_size={vocab_size}), got values in [{int(lo)}, {int(hi)}]")
    return codes.long()


def check_state_dict(state_dict: dict, expected: dict, what: str, config_name: str) -> None:
    """ValueError naming missing, unexpected and mis-shaped tensors."""
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    bad = sorted(f"{k} {tuple(state_dict[k].shape)} != {tuple(expected[k].shape)}"
                 for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or bad:
        raise ValueError(f"{what} does not match the {config_name}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatch {bad[:5]}")
