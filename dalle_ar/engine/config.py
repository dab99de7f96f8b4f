"""TrainConfig, the learning-rate schedule and `key=value` overrides."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "halving", "constant")


@dataclass
class TrainConfig:
    """Everything the loop needs; saved with every checkpoint. DeepSpeed's JSON follows it (see
    `resolve_ds_config`): batch_size, grad_accum, grad_clip, zero_stage and precision are written into it."""

    steps: int = 1000                 # optimizer steps (each = grad_accum micro-batches per rank)
    batch_size: int = 8               # micro-batch per process (train_micro_batch_size_per_gpu)
    grad_accum: int = 1               # micro-batches per optimizer step (gradient_accumulation_steps)
    lr: float = 3e-4                  # peak learning rate
    min_lr: float = 3e-5              # floor of the cosine and halving schedules
    warmup: int = 100                 # linear warm-up steps from 0
    schedule: str = "cosine"          # after warm-up: cosine to min_lr | halving | constant
    halve_every: int = 0              # halving: halve the LR every N steps after warm-up (paper-style)
    restart_at: int = 0               # >0: the schedule starts over here (warm-up, then down to min_lr at
                                      # `steps`), e.g. for the dVAE's final decoder-only phase
    weight_decay: float = 4.5e-2      # paper; applied to weight matrices only
    betas: tuple = (0.9, 0.96)        # paper
    eps: float = 1e-8
    grad_clip: float = 4.0            # paper: clip the global norm at 4 (0 disables)
    seed: int = 0
    save_every: int = 500             # checkpoint every N steps (0: only at the end)
    keep_last: int = 2                # complete checkpoints kept
    log_every: int = 10
    zero_stage: int = 0               # 0 | 1 | 2 | 3
    precision: str = "fp32"           # fp32 | bf16 | fp16 (bf16.enabled / fp16.enabled in DeepSpeed)
    max_nonfinite: int = 10           # consecutive non-finite losses before giving up
    progress: bool = True             # tqdm bar on rank 0 (only when stderr is a terminal)
    tensorboard: bool = True          # SummaryWriter in out_dir/tb on rank 0
    export: bool = True               # write out_dir/export at the end

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("steps", "batch_size", "grad_accum", "keep_last", "log_every", "max_nonfinite"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("warmup", "save_every", "seed", "halve_every", "restart_at"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "an integer >= 0")
        need(self.lr > 0, "lr", "> 0")
        need(0 <= self.min_lr <= self.lr, "min_lr", "in [0, lr]")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.grad_clip >= 0, "grad_clip", ">= 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)")
        self.betas = tuple(self.betas)
        need(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        need(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
        need(self.zero_stage in (0, 1, 2, 3), "zero_stage", "0, 1, 2 or 3")
        need(self.schedule != "halving" or self.halve_every > 0, "halve_every", "> 0 with schedule='halving'")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0 to cfg.lr, then cosine down to cfg.min_lr at cfg.steps, or halved every
    cfg.halve_every steps down to cfg.min_lr (the paper halves on plateaus; a fixed period resumes
    exactly), or constant. With cfg.restart_at, [0, restart_at) and [restart_at, steps) each run the
    whole schedule."""
    end = cfg.steps
    if 0 < cfg.restart_at < cfg.steps:
        if step >= cfg.restart_at:
            step, end = step - cfg.restart_at, cfg.steps - cfg.restart_at
        else:
            end = cfg.restart_at
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "halving":
        return max(cfg.min_lr, cfg.lr * 0.5 ** ((step - cfg.warmup) // cfg.halve_every))
    t = min(1.0, (step - cfg.warmup) / max(1, end - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def _coerce(key: str, text: str, current):
    """Parse `text` for a field whose current value is `current` (its type decides)."""
    try:
        value = json.loads(text)
    except ValueError:
        value = text  # bare words stay strings: precision=bf16
    if current is None or isinstance(current, dict):
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"override {key!r}: expected true or false, got {text!r}")
        return value
    if isinstance(current, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(current, (int, float)) and value == "auto":
                return value
            raise ValueError(f"override {key!r}: expected a number, got {text!r}")
        if isinstance(current, int) and not (isinstance(value, int) or float(value).is_integer()):
            raise ValueError(f"override {key!r}: expected an integer, got {text!r}")
        return type(current)(value)
    if isinstance(current, (list, tuple)):
        if not isinstance(value, list):
            raise ValueError(f"override {key!r}: expected a JSON list like [0.9, 0.96], got {text!r}")
        return type(current)(value)
    if isinstance(current, str):
        return text if not isinstance(value, str) else value
    return value


def apply_overrides(target, overrides, *, allow_new: bool = False):
    """Apply `a.b=value` overrides to a dict or a dataclass; returns a new object (the input is untouched).

    The value is parsed as JSON and coerced to the type of the value it replaces (`lr=1` -> 1.0,
    `betas=[0.9,0.95]` -> tuple, `precision=bf16` -> "bf16"). An unknown key is a ValueError naming it,
    unless `allow_new` (dicts only; used for DeepSpeed sections, which DeepSpeed validates itself).
    """
    is_dc = dataclasses.is_dataclass(target) and not isinstance(target, type)
    data = dataclasses.asdict(target) if is_dc else json.loads(json.dumps(target))
    for item in overrides or ():
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        path = key.strip().split(".")
        node = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if not isinstance(node, dict) or (part not in node and not (allow_new and not is_dc)):
                where = type(target).__name__ if is_dc else "config"
                known = sorted(node) if isinstance(node, dict) else []
                raise ValueError(f"override {key!r}: unknown key {'.'.join(path[:i + 1])!r} in {where}; known: {known}")
            if last:
                node[part] = _coerce(key, text, node.get(part))
            else:
                node = node.setdefault(part, {})
    if is_dc:
        fields = {f.name: f for f in dataclasses.fields(target)}
        kw = {k: tuple(v) if isinstance(fields[k].default, tuple) and isinstance(v, list) else v for k, v in data.items()}
        return type(target)(**kw)
    return data

