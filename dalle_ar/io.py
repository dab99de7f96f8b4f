"""Saving and loading: one JSON config beside one safetensors file, written atomically.

Every model in the package (dVAE, prior) is a dataclass config + an nn.Module. Weights go
through safetensors only; nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Type, TypeVar

import torch
from safetensors.torch import load_file, save_file

from .checks import check_state_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

C = TypeVar("C")


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success rename it over `path` (file or folder).

    A crash while writing leaves the old `path` (or nothing) in place, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / "tmp"
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(cls: Type[C], d: dict) -> C:
    """Build a config dataclass from a dict; unknown keys are a ValueError (typos never pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config key(s) {unknown}; known: {sorted(names)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in d.items():
        # JSON has no tuples: restore them where the default is one.
        default = fields[k].default
        if isinstance(v, list) and isinstance(default, tuple):
            v = tuple(v)
        kw[k] = v
    return cls(**kw)


def save_pretrained(directory: str | os.PathLike, config, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write `config.json` + `model.safetensors` into `directory` (each file atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(directory / CONFIG_NAME, config_to_dict(config))
    return directory


def load_config(directory: str | os.PathLike, cls: Type[C]) -> C:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"no {CONFIG_NAME} in {directory}")
    return config_from_dict(cls, json.loads(path.read_text()))


def load_weights(directory: str | os.PathLike, module: torch.nn.Module) -> torch.nn.Module:
    """Load `model.safetensors` into `module`; missing, unexpected or mis-shaped tensors are a ValueError."""
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(f"no {WEIGHTS_NAME} in {directory}")
    state = load_file(str(path))
    check_state_dict(state, module.state_dict(), f"weights in {path}")
    module.load_state_dict(state)
    return module
