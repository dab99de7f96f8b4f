"""The VQGAN's quantizers: z [B,D,h,w] -> (z_q [B,D,h,w] with straight-through gradients, loss, codes [B,h,w]).

Each takes the VQGANConfig (dalle_ar/vqgan.py) and is its `quantize` module (`quantizer`):
- "vq": nearest code, as taming's VectorQuantizer2 (commitment `beta`, straight-through
  gradients), with options: `codebook_ema` (codebook moves by exponential moving averages of
  its assigned vectors, van den Oord et al. 2017), `dead_code_threshold` (codes whose EMA usage
  falls below it restart at a random encoder vector of the batch) and `l2_norm_codes` (lookup
  by cosine similarity in a low-dimensional space: ViT-VQGAN, LlamaGen).
- "gumbel": taming's GumbelQuantize: logits over n_embed, Gumbel-softmax during training (KL
  to the uniform prior), argmax without noise at inference.
- "fsq": finite scalar quantization (Mentzer et al. 2023): each of len(fsq_levels) channels is
  bounded and rounded to one of its levels; no codebook, every code usable, nothing to collapse.
They are written here (each a few lines) rather than taken from vector-quantize-pytorch, whose
module and buffer names differ from taming's and would break the checkpoint mapping: parameter
names (`embedding.weight`; Gumbel's `proj` + `embed.weight`) are taming's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

if TYPE_CHECKING:
    from .vqgan import VQGANConfig


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks when training is distributed, so every rank's codebook stays the same."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


class VectorQuantizer(nn.Module):
    """Nearest-code VQ (taming's VectorQuantizer2, beta on the commitment term as in its legacy=False fix)."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        self.c = c
        self.embedding = nn.Embedding(c.n_embed, c.embed_dim)
        nn.init.uniform_(self.embedding.weight, -1 / c.n_embed, 1 / c.n_embed)
        if c.l2_norm_codes:
            nn.init.normal_(self.embedding.weight)
        if c.codebook_ema is not None:
            self.embedding.weight.requires_grad_(False)  # moved by averages, not by the optimizer
        # Training statistics, outside the state dict (checkpoints and exports hold the codebook only):
        # per-code EMA of assignments per batch and of the summed vectors (EMA codebook), usage for restarts.
        self.register_buffer("usage", torch.ones(c.n_embed), persistent=False)
        self.register_buffer("embed_avg", torch.zeros(0), persistent=False)

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.c.l2_norm_codes else w

    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        w = self.codebook().to(flat.dtype)
        if self.c.l2_norm_codes:
            return (flat @ w.t()).argmax(1)
        d = flat.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1) - 2 * flat @ w.t()
        return d.argmin(1)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        flat = rearrange(z, "b d h w -> (b h w) d").float()
        if self.c.l2_norm_codes:
            flat = F.normalize(flat, dim=1)
        return self._nearest(flat).view(z.shape[0], *z.shape[2:])

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        return rearrange(F.embedding(codes, self.codebook()), "b h w d -> b d h w")

    def forward(self, z):
        c = self.c
        if c.l2_norm_codes:
            z = F.normalize(z, dim=1)
        flat = rearrange(z, "b d h w -> (b h w) d")
        idx = self._nearest(flat.detach().float())
        if self.training and torch.is_grad_enabled() and (c.codebook_ema is not None or c.dead_code_threshold > 0):
            self._update(flat.detach().float(), idx)
        z_q = self.embed(idx.view(z.shape[0], *z.shape[2:])).to(z.dtype)
        commit = (z - z_q.detach()).pow(2).mean()
        codebook = (z_q - z.detach()).pow(2).mean() if c.codebook_ema is None else z.new_zeros(())
        z_q = z + (z_q - z).detach()
        return z_q, codebook + c.beta * commit, idx.view(z.shape[0], *z.shape[2:])

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, idx: torch.Tensor):
        """EMA codebook step and dead-code restarts (both optional)."""
        c = self.c
        w = self.embedding.weight
        if hasattr(w, "ds_numel") and w.ds_numel != w.numel():
            raise ValueError("VQGANConfig.codebook_ema and dead_code_threshold are not supported with ZeRO stage 3 "
                             "(the codebook is partitioned)")
        counts = _all_reduce(torch.bincount(idx, minlength=c.n_embed).float())
        decay = c.codebook_ema if c.codebook_ema is not None else 0.99
        self.usage.mul_(decay).add_(counts, alpha=1 - decay)
        if c.codebook_ema is not None:
            sums = _all_reduce(torch.zeros(c.n_embed, c.embed_dim, device=flat.device).index_add_(0, idx, flat))
            if self.embed_avg.numel() == 0:
                self.embed_avg = w.detach().float().clone() * self.usage[:, None]
            self.embed_avg.mul_(decay).add_(sums, alpha=1 - decay)
            n = self.usage.sum()
            size = (self.usage + 1e-5) / (n + c.n_embed * 1e-5) * n  # Laplace smoothing: no division by 0
            w.data.copy_((self.embed_avg / size[:, None]).to(w.dtype))
        if c.dead_code_threshold > 0:
            dead = self.usage < c.dead_code_threshold
            if dead.any():
                # The same new vectors on every rank: rank 0's picks, broadcast.
                pick = torch.randint(0, len(flat), (int(dead.sum()),), device=flat.device)
                new = flat[pick]
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.broadcast(new, 0)
                w.data[dead] = new.to(w.dtype)
                self.usage[dead] = 1.0  # give restarted codes time to be picked
                if self.embed_avg.numel():
                    self.embed_avg[dead] = new


class GumbelQuantizer(nn.Module):
    """taming's GumbelQuantize: logits -> Gumbel-softmax over codes (train) or argmax (inference) -> embed."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        self.c = c
        self.proj = nn.Conv2d(c.embed_dim, c.n_embed, 1)
        self.embed = nn.Embedding(c.n_embed, c.embed_dim)
        self.temperature = c.temp_start

    def codes(self, z):
        return self.proj(z.float() if self.proj.weight.dtype == torch.float32 else z).argmax(1)

    def embed_codes(self, codes):
        return rearrange(self.embed(codes), "b h w d -> b d h w")

    def forward(self, z):
        logits = self.proj(z)
        if self.training and torch.is_grad_enabled():
            soft = F.gumbel_softmax(logits.float(), tau=self.temperature, dim=1, hard=self.c.gumbel_straight_through)
        else:
            soft = F.one_hot(logits.argmax(1), self.c.n_embed).permute(0, 3, 1, 2).float()
        z_q = torch.einsum("bnhw,nd->bdhw", soft.to(z.dtype), self.embed.weight)
        q = logits.float().softmax(1)
        kl = (q * torch.log(q * self.c.n_embed + 1e-10)).sum(1).mean()  # KL(q || uniform), nats per code
        return z_q, self.c.gumbel_kl_weight * kl, soft.argmax(1)


class FSQ(nn.Module):
    """Finite scalar quantization: channel i bounded to levels[i] values by tanh, rounded (straight-through)."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        levels = torch.tensor(c.fsq_levels)
        basis = torch.cumprod(torch.tensor((1,) + c.fsq_levels[:-1]), 0)
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    def _quantize(self, z):
        """z [B,D,h,w] -> values on the grid {-(L//2) .. } / (L//2) per channel (straight-through)."""
        L = self.levels.view(1, -1, 1, 1).to(z.dtype)
        half = (L - 1) * (1 + 1e-3) / 2
        offset = torch.where(L % 2 == 0, 0.5, 0.0)
        bounded = torch.tanh(z + torch.atanh(offset / half)) * half - offset
        rounded = bounded + (bounded.round() - bounded).detach()
        return rounded / (L // 2)

    def _to_codes(self, q):
        L = self.levels.view(1, -1, 1, 1)
        digits = (q * (L // 2) + L // 2).round().long()
        return (digits * self.basis.view(1, -1, 1, 1)).sum(1)

    def codes(self, z):
        return self._to_codes(self._quantize(z.float()))

    def embed_codes(self, codes):
        L, basis = self.levels.view(1, -1, 1, 1), self.basis.view(1, -1, 1, 1)
        digits = (codes[:, None] // basis) % L
        return ((digits - L // 2) / (L // 2)).float()

    def forward(self, z):
        q = self._quantize(z)
        return q, z.new_zeros(()), self._to_codes(q.detach())


def build_quantizer(c: VQGANConfig) -> nn.Module:
    """The quantizer that `c.quantizer` names ("vq", "gumbel" or "fsq")."""
    return {"vq": VectorQuantizer, "gumbel": GumbelQuantizer, "fsq": FSQ}[c.quantizer](c)
