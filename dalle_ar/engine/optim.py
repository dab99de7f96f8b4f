"""The one weight-decay rule (AdamW on weight matrices only) and the grad norm DeepSpeed leaves out."""

from __future__ import annotations

from typing import Optional

import torch

_NO_DECAY_MODULES = (torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.LocalResponseNorm,
                     torch.nn.modules.batchnorm._NormBase) + ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ())


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on biases, norms, embeddings (modules or parameters
    named *emb*), nor names listed by an optional `model.no_weight_decay()`."""
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay, seen = [], [], set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            skip = (p.dim() < 2 or isinstance(module, _NO_DECAY_MODULES) or "emb" in pname.lower()
                    or type(module).__name__.endswith(("Norm", "Embedding")) or full in extra)
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def zero0_grad_norm(engine, zero_stage: int, precision: str) -> Optional[float]:
    """DeepSpeed reports no grad norm for ZeRO-0 fp32: take it from .grad before step() (with grad_accum > 1
    the gradients are reduced inside step(), so this is the rank's own norm)."""
    if zero_stage != 0 or precision != "fp32":
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None
