"""The data stage: WebDataset shards in, batches out; shard writers; the built-in sets.

    expand_shards, iter_raw_samples, shards_have_codes, tar_samples           (dalle_ar.data.shards)
    write_samples, write_folder, write_csv                                    (dalle_ar.data.writers)
    ShardLoader, preprocess_image                                             (dalle_ar.data.loader)
    shapes.generate_shapes, digits.generate_digits                            (built-in sets)

Names are imported on first use: the tokenizer reads tars through `shards` without loading the
loader, and the built-in sets write shards without it.
"""

import importlib

_EXPORTS = {
    "expand_shards": "shards", "write_samples": "writers", "write_folder": "writers", "write_csv": "writers",
    "iter_raw_samples": "shards", "shards_have_codes": "shards", "tar_samples": "shards",
    "ShardLoader": "loader", "preprocess_image": "loader",
}

__all__ = sorted(_EXPORTS) + ["shapes", "digits"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in ("shapes", "digits", "shards", "writers", "loader"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
