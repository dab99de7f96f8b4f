"""One interface over the image tokenizers: the dVAE and the VQ family.

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
from typing import Optional

import torch

from . import io
from .checks import check_state_dict
from .io import CONFIG_NAME

KINDS = ("dvae", "vqgan")


class ImageTokenizerMixin:
    """The interface's sizes, read from `self.config` (which has image_size, grid_size and vocab_size),
    and its directory: config.json + model.safetensors, checked against the config."""

    config_class: type = type(None)  # DVAEConfig, VQGANConfig
    label = ""                       # what messages call it: "dVAE", "VQGAN"

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def channels(self) -> int:
        """Image channels it encodes (3: RGB; 1: grey)."""
        c = self.config
        return c.input_channels if hasattr(c, "input_channels") else c.in_channels

    def grid(self, image_size=None) -> int:
        """Side of the code grid for square images of `image_size` (default: the configured size)."""
        size = self.config.image_size if image_size is None else image_size
        return size // (self.config.image_size // self.config.grid_size)

    @classmethod
    def check_weights(cls, state_dict: dict, config, what: str = "state_dict", against: Optional[str] = None) -> None:
        """ValueError unless `state_dict` has the tensors and shapes a model of `config` has (names what is
        missing, unexpected or mis-shaped). The shapes come from the config on the meta device, not from a
        live module: under ZeRO-3 its parameters are partitioned (empty on this rank), and a big model's
        weights need no memory."""
        with torch.device("meta"):
            expected = cls(config).state_dict()
        check_state_dict(state_dict, expected, what, against or f"the {type(config).__name__}")

    def write_pretrained(self, directory, state_dict: dict) -> Path:
        """config.json + model.safetensors holding `state_dict`, once check_weights accepts it."""
        self.check_weights(state_dict, self.config)
        return io.save_pretrained(directory, self.config, state_dict)

    @classmethod
    def from_pretrained(cls, directory, device=None):
        """Load a directory written by save_pretrained (or `dalle-ar convert`); the model is in eval mode."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{cls.label} directory {directory} not found")
        model = cls(io.load_config(directory, cls.config_class))
        io.load_weights(directory, model)
        return model.to(device or "cpu").eval()


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


def load_image_tokenizer_config(directory):
    """The config (DVAEConfig or VQGANConfig) in `directory`: vocab_size, grid_size and image_size without the weights."""
    return io.load_config(directory, tokenizer_class(tokenizer_kind(directory)).config_class)


def load_image_tokenizer(directory, device=None):
    """The image tokenizer saved in `directory` (dVAE or VQGAN, by config.json's kind), in eval mode."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image tokenizer directory {directory} not found")
    return tokenizer_class(tokenizer_kind(directory)).from_pretrained(directory, device=device)
