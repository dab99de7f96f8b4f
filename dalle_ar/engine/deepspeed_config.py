"""The DeepSpeed JSON: the user's file or dict over the shipped `zero<stage>.json`, made to agree
with the TrainConfig (one value per setting, named in the error when the two disagree)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from dalle_ar.train import CONFIG_DIR

from .config import TrainConfig, apply_overrides
from .dist import is_rank0


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_ds_config(path_or_dict=None, overrides=None, cfg: Optional[TrainConfig] = None) -> dict:
    """The user's DeepSpeed config: a JSON file or a dict (None: {}), plus overrides (a nested dict merged
    in, or `key=value` strings with dotted keys). With `cfg`, returns the resolved full config
    (`resolve_ds_config`); without, the explicit part only (`train()` resolves it)."""
    if path_or_dict is None:
        ds = {}
    elif isinstance(path_or_dict, dict):
        ds = json.loads(json.dumps(path_or_dict))
    else:
        path = Path(path_or_dict)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config {path} not found")
        try:
            ds = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"DeepSpeed config {path}: invalid JSON ({e})") from None
    if isinstance(overrides, dict):
        ds = _deep_merge(ds, overrides)
    elif overrides:
        ds = apply_overrides(ds, list(overrides), allow_new=True)
    return resolve_ds_config(cfg, ds)[1] if cfg is not None else ds


def _get(d: dict, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _set(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


# TrainConfig field <-> DeepSpeed key, for the keys both describe.
_OWNED = {"batch_size": "train_micro_batch_size_per_gpu", "grad_accum": "gradient_accumulation_steps",
          "grad_clip": "gradient_clipping", "zero_stage": "zero_optimization.stage"}


def resolve_ds_config(cfg: TrainConfig, user_ds: Optional[dict] = None) -> tuple[TrainConfig, dict]:
    """Merge the user's DeepSpeed dict over the packaged `train/configs/zero<stage>.json` and make it agree
    with `cfg`. Returns (cfg, full ds config).

    For each key both describe (batch_size, grad_accum, grad_clip, zero_stage, precision): "auto" or absent
    in the DeepSpeed dict -> the TrainConfig value; an explicit DeepSpeed value equal to it -> fine;
    different while the TrainConfig field is at its default -> the DeepSpeed value is adopted into cfg
    (so `--deepspeed-config zero3.json` alone selects ZeRO-3); different otherwise -> ValueError naming both.
    """
    user = json.loads(json.dumps(user_ds or {}))
    if "scheduler" in user:
        raise ValueError("DeepSpeed config: remove 'scheduler'; the engine owns the LR schedule "
                         "(train.lr, train.min_lr, train.warmup, train.schedule)")
    defaults = TrainConfig()
    changes = {}
    for field, key in _OWNED.items():
        value = _get(user, key, "auto")
        mine = getattr(cfg, field)
        if value == "auto" or value == mine:
            continue
        if mine == getattr(defaults, field):
            changes[field] = type(mine)(value)
        else:
            raise ValueError(f"DeepSpeed config sets {key}={value!r} but train.{field}={mine!r}; "
                             f"set one of them (or make the DeepSpeed value \"auto\")")
    bf16, fp16 = _get(user, "bf16.enabled", "auto"), _get(user, "fp16.enabled", "auto")
    implied = "bf16" if bf16 is True else "fp16" if fp16 is True else "fp32" if (bf16, fp16) == (False, False) else None
    if bf16 is True and fp16 is True:
        raise ValueError("DeepSpeed config enables both bf16 and fp16")
    if implied and implied != cfg.precision:
        if cfg.precision == defaults.precision:
            changes["precision"] = implied
        else:
            raise ValueError(f"DeepSpeed config implies precision {implied} (bf16.enabled={bf16}, "
                             f"fp16.enabled={fp16}) but train.precision={cfg.precision!r}")
    if implied is None and ((cfg.precision == "bf16" and bf16 is False) or (cfg.precision == "fp16" and fp16 is False)):
        raise ValueError(f"DeepSpeed config disables {cfg.precision} but train.precision={cfg.precision!r}")
    if changes:
        cfg = dataclasses.replace(cfg, **changes)
        if is_rank0():
            print(f"[engine] TrainConfig follows the DeepSpeed config: {changes}", flush=True)

    template = CONFIG_DIR / f"zero{cfg.zero_stage}.json"
    if not template.is_file():
        raise FileNotFoundError(f"packaged DeepSpeed config {template} is missing (a broken install?)")
    ds = _deep_merge(json.loads(template.read_text()), user)
    for field, key in _OWNED.items():
        _set(ds, key, getattr(cfg, field))
    _set(ds, "bf16.enabled", cfg.precision == "bf16")
    _set(ds, "fp16.enabled", cfg.precision == "fp16")
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]
    # With several micro-batches a step, step() is the accumulation boundary and backward() only
    # accumulates: a dropped (non-finite) micro-batch then cannot desynchronise DeepSpeed's counters.
    ds.setdefault("managed_gradient_accumulation", cfg.grad_accum == 1)
    ds.setdefault("steps_per_print", 10**9)
    if "optimizer" in ds:  # DeepSpeed builds it (e.g. CPU Adam for offload); hyper-parameters from cfg
        params = ds["optimizer"].setdefault("params", {})
        for k, v in (("lr", cfg.lr), ("betas", list(cfg.betas)), ("eps", cfg.eps), ("weight_decay", cfg.weight_decay)):
            if params.get(k, "auto") == "auto":
                params[k] = v
        if str(ds["optimizer"].get("type", "")).lower() in ("adam", "adamw") and not torch.cuda.is_available():
            params.setdefault("torch_adam", True)  # FusedAdam is a JIT-compiled CUDA op
    return cfg, ds
