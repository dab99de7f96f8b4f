"""Argument checks shared by the models and the weight loaders: each raises ValueError naming the argument."""

from __future__ import annotations

from typing import Optional

import torch


def check_tokens(name: str, t, shape: tuple, high: int, high_name: Optional[str] = None) -> torch.Tensor:
    """An integer tensor of exactly `shape` (None = any size) with values in [0, high) -> long.
    `high_name` names the bound in the message (e.g. "vocab_size")."""
    if not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got "
                         f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if t.numel():
        lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one host sync (a GPU step stalls on each)
        if lo < 0 or hi >= high:
            bound = f"{high_name}={high}" if high_name else high
            raise ValueError(f"{name} holds ids outside [0, {bound}): min {lo}, max {hi}")
    return t.long()


def check_state_dict(state_dict: dict, expected: dict, what: str, against: str = "the config") -> None:
    """ValueError naming missing, unexpected and mis-shaped tensors of `state_dict` against `expected`."""
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    bad = sorted(f"{k} {tuple(state_dict[k].shape)} != {tuple(expected[k].shape)}"
                 for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or bad:
        raise ValueError(f"{what} does not match {against}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatch {bad[:5]}")
