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


def check_images(images, channels: int, size: int) -> torch.Tensor:
    """A float [B, channels, size, size] tensor with values in [0, 1] (what image tokenizers take)."""
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
