"""The data sections of the stage configs, and how `key=value` overrides find their section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
    """How a stage reads its shards (every stage)."""

    image_size: int = 64
    num_workers: int = 0
    shuffle_buffer: int = 1000
    random_crop: bool = False
    resampled: bool = False          # infinite resampling (multi-node: equal steps per rank)
    epoch_samples: Optional[int] = None
    sample_count: int = 8            # images per sample grid row / reconstructions shown


@dataclass
class DALLEDataConfig(DataConfig):
    tokenizer: Optional[str] = None  # tokenizer directory
    dvae: Optional[str] = None       # frozen image tokenizer, dVAE or VQGAN (encodes raw shards; gives grid and vocab)
    bpe_dropout: bool = False        # BPE dropout on training captions (paper: 0.1)
    sample_prompts: tuple = ()       # prompts of the PNG/TensorBoard sample grids


@dataclass
class CLIPDataConfig(DataConfig):
    tokenizer: Optional[str] = None  # tokenizer directory
    text_len: int = 32               # caption length in tokens


def route_overrides(overrides, sections: dict[str, set]) -> dict[str, list[str]]:
    """Sort `key=value` overrides by section: `section.key`, `ds.<dotted key>`, or a bare `key`
    that exactly one section has. Returns {section: ["key=value", ...]} (ds keys keep their dots)."""
    routed: dict[str, list[str]] = {name: [] for name in (*sections, "ds")}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        head, _, rest = key.partition(".")
        if head == "ds" and rest:
            routed["ds"].append(f"{rest}={text}")
        elif head in sections and rest:
            routed[head].append(f"{rest}={text}")
        else:
            owners = [name for name, fields in sections.items() if key in fields]
            if len(owners) != 1:
                raise ValueError(f"override {key!r}: " + ("unknown key" if not owners else
                                 f"ambiguous, name the section: {[o + '.' + key for o in owners]}"))
            routed[owners[0]].append(item)
    return routed
