"""The decoder-only transformer of the prior: pre-norm blocks, DALL-E's attention masks, a KV cache.

The stream is `[text (text_len) ; image (grid*grid)]`, fed without its last image token, so a
model sees at most `max_len = text_len + grid*grid - 1` positions. Every layer has one mask type
(DALL-E, Ramesh et al. 2021, appendix B.1 and figure 11). In all of them text attends causally
to earlier text and every image token attends to all of the text; they differ in which earlier
image tokens an image token (index i = row * grid + col, raster order) may see:

    full    every earlier image token (dense causal attention)
    row     the previous `grid` image tokens and itself: its row so far plus the end of the row
            above (the Sparse Transformer's local head with stride `grid`, DALL-E figure 11a)
    column  the earlier tokens of its own column (the strided head, figure 11b)
    conv    the earlier tokens within a k x k window centred on it (figure 11d; 11 x 11 in the paper)

Each mask is built once per layer type at construction, as a [max_len, max_len] boolean
non-persistent buffer (True = may attend). Training slices nothing (or uses `is_causal` for
`full`); a cached decoding step at position t uses row t of the same buffer.

One `KVCache` holds the keys and values of every layer in a single tensor
[layers, 2, B, heads, max_len, head_dim], allocated once at the first write and written in place.
A decoding step attends over all max_len cached slots (the mask row hides those after t), so
every step has the same shapes: attention backends that plan per shape (cuDNN on recent GPUs
spends tens of ms on each new one) plan once, not once per token.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

ATTN_TYPES = ("full", "row", "column", "conv")


def build_mask(kind: str, text_len: int, grid: int, conv_kernel: int = 11) -> torch.Tensor:
    """BoolTensor [max_len, max_len]: entry [q, k] is True where position q may attend to key k."""
    if kind not in ATTN_TYPES:
        raise ValueError(f"attention type must be one of {ATTN_TYPES}, got {kind!r}")
    n = text_len + grid * grid - 1
    pos = torch.arange(n)
    q, k = pos[:, None], pos[None, :]
    causal = k <= q
    # Image indices (raster order) of queries and keys; negative for text positions.
    qi, ki = q - text_len, k - text_len
    key_is_text = ki < 0
    if kind == "full":
        image_ok = torch.ones(n, n, dtype=torch.bool)
    elif kind == "row":
        image_ok = qi - ki <= grid
    elif kind == "column":
        image_ok = (qi - ki) % grid == 0
    else:
        r = conv_kernel // 2
        dr = qi.div(grid, rounding_mode="floor") - ki.div(grid, rounding_mode="floor")
        dc = qi.remainder(grid) - ki.remainder(grid)
        image_ok = (dr.abs() <= r) & (dc.abs() <= r)
    # Text queries only ever see (earlier) text keys, through `causal`.
    return causal & (key_is_text | image_ok)


class KVCache:
    """Keys and values of every layer, one tensor [layers, 2, B, heads, max_len, head_dim].

    Allocated at the first write (so it takes the dtype the layers produce, bf16 under autocast
    included) and never grown: `update` copies the new entries in place at [start, start + n)
    and returns views of the keys and values 0 .. `keys` (default start + n).

    `static` (default: on CUDA) makes every decoding step attend over all max_len slots, the mask
    row hiding those after t: one shape for every step, which CUDA graphs and attention backends
    that plan per shape (cuDNN) need. The tensor is then zero-filled, so slots not written yet hold
    no NaN that a zero attention weight would still spread. Otherwise (CPU) a step attends over the
    written slots 0 .. t only, and the tensor is left uninitialised: nothing unwritten is read.
    """

    def __init__(self, layers: int, max_len: int, static: Optional[bool] = None):
        self.layers, self.max_len, self.static = layers, max_len, static
        self.kv: Optional[torch.Tensor] = None
        self.plan: Optional[list] = None  # per-layer weights and mask biases of `Transformer.step`

    def allocate(self, like: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
        if self.static is None:
            self.static = like.is_cuda
        new = like.new_zeros if self.static else like.new_empty
        self.kv = new(self.layers, 2, batch, heads, self.max_len, head_dim)
        return self.kv

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, keys: Optional[int] = None):
        end = start + k.shape[2]
        if self.kv is None:
            b, h, _, d = k.shape
            self.allocate(k, b, h, d)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        kv = self.kv[layer]
        kv[0, :, :, start:end] = k
        kv[1, :, :, start:end] = v
        keys = end if keys is None else keys
        return kv[0, :, :, :keys], kv[1, :, :, :keys]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, attn_mask=None, is_causal=False, cache: Optional[KVCache] = None, layer=0, start=0):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if cache is not None:  # the mask's width says how many cached keys to attend over
            k, v = cache.update(layer, start, k, v, None if attn_mask is None else attn_mask.shape[-1])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(rearrange(y, "b h n d -> b n (h d)")))


class MLP(nn.Module):
    def __init__(self, dim: int, ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(dim, ff_mult * dim)
        self.act = nn.GELU()
        self.proj = nn.Linear(ff_mult * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, ff_mult, dropout)

    def forward(self, x, attn_mask=None, is_causal=False, cache=None, layer=0, start=0):
        x = x + self.attn(self.ln1(x), attn_mask, is_causal, cache, layer, start)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """A stack of blocks over the [text ; image] stream, with a final LayerNorm.

    `attn_types` is cycled over the layers (("row", "column") on 4 layers: row, column, row, column).
    """

    def __init__(self, dim: int, depth: int, heads: int, *, text_len: int, grid: int,
                 attn_types: Sequence[str] = ("full",), conv_kernel: int = 11, ff_mult: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        self.kinds = [attn_types[i % len(attn_types)] for i in range(depth)]
        self.max_len = text_len + grid * grid - 1
        for kind in dict.fromkeys(self.kinds):  # `full` too: decoding steps read its rows
            # Non-persistent: rebuilt from the config, never saved, moved by .to(device).
            self.register_buffer(f"mask_{kind}", build_mask(kind, text_len, grid, conv_kernel), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, ff_mult, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def new_cache(self, static: Optional[bool] = None) -> KVCache:
        return KVCache(len(self.blocks), self.max_len, static)

    def _attn_args(self, kind: str, start: int, n: int, cache: Optional[KVCache]):
        """(attn_mask, is_causal) for n queries at positions start .. start + n - 1."""
        if kind == "full" and start == 0:
            return None, True  # as many queries as keys: plain causal, the fused fast path
        mask = getattr(self, f"mask_{kind}")
        if cache is not None and cache.static and n == 1:
            return mask[start:start + 1], False  # a static decoding step: every slot, one shape
        return mask[start:start + n, :start + n], False

    def _step_plan(self, cache: KVCache, like: torch.Tensor) -> tuple:
        """What `step` uses, built once per cache: per layer the LayerNorm weights, the QKV weight
        with the attention scale folded into its query rows, transposed projections (for in-place
        residual addmm), views of the layer's cache slots (slot-major for the write, [B*heads, ...]
        for attention) and its mask kind; then step-sized buffers and their views, so that a step
        allocates only the outputs of LayerNorm, attention scores and softmax."""
        biases = {}
        layers = []
        B, heads, d = cache.kv.shape[2], cache.kv.shape[3], cache.kv.shape[5]
        dim = heads * d
        for i, (block, kind) in enumerate(zip(self.blocks, self.kinds)):
            if kind not in biases:
                mask = getattr(self, f"mask_{kind}")
                dense = kind == "full" and not cache.static
                biases[kind] = None if dense else torch.zeros(mask.shape, dtype=like.dtype, device=like.device
                                                              ).masked_fill_(~mask, float("-inf"))
            a, m, ln1, ln2 = block.attn, block.mlp, block.ln1, block.ln2
            scale = torch.ones(3 * dim, 1, dtype=like.dtype, device=like.device)
            scale[:dim] = d ** -0.5
            kv = cache.kv[i]  # [2, B, heads, max_len, d]
            layers.append((ln1.weight, ln1.bias, (a.qkv.weight * scale).t(), a.qkv.bias * scale.flatten(),
                           a.proj.weight.t(), a.proj.bias, ln2.weight, ln2.bias, m.fc.weight.t(), m.fc.bias,
                           m.proj.weight.t(), m.proj.bias, kv.permute(3, 0, 1, 2, 4),
                           kv[0].flatten(0, 1).transpose(1, 2), kv[1].flatten(0, 1), kind))
        qkv = like.new_empty(B, 3 * dim)
        q = like.new_empty(B * heads, 1, d)
        hidden = like.new_empty(B, self.blocks[0].mlp.fc.out_features)
        buffers = (qkv, q, q.view(B, heads, d), qkv[:, :dim].view(B, heads, d),
                   qkv[:, dim:].view(B, 2, heads, d).transpose(0, 1), hidden)
        return layers, biases, buffers

    @torch.no_grad()
    def step(self, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        """One decoding step: x [B, dim] at position pos (earlier ones in the cache) -> normed [B, dim].

        Inference only; x is the residual stream and is overwritten. On CPU the step is a flat
        sequence of ~14 ops a layer (no module calls, K and V written into the cache by one copy,
        the residual added in place by addmm, preallocated buffers) over the written slots
        0 .. pos (all slots with a static cache); on CUDA, under autocast and with dropout in
        training mode it is the module path, `forward` with one position.
        """
        # ZeRO-3 (a training run's sample grids) partitions weights and gathers them only around module
        # calls, which the flat step does not make: such a model takes the module path.
        if (x.is_cuda or torch.is_autocast_enabled(x.device.type) or cache.kv is None
                or (self.training and any(b.attn.dropout for b in self.blocks))
                or hasattr(self.blocks[0].attn.qkv.weight, "ds_id")):
            return self.forward(x[:, None], cache, start=pos)[:, 0]
        if pos >= self.max_len:
            raise ValueError(f"position {pos} exceeds max_len={self.max_len}")
        if cache.plan is None:
            cache.plan = self._step_plan(cache, x)
        layers, biases, (qkv, q, q_heads, q_src, kv_src, hidden) = cache.plan
        dim = x.shape[1]
        keys = self.max_len if cache.static else pos + 1
        eps = self.norm.eps
        rows = {kind: None if b is None else b[pos, :keys] for kind, b in biases.items()}
        for ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b, \
                slots, k_all, v_all, kind in layers:
            torch.addmm(qkv_b, F.layer_norm(x, (dim,), ln1_w, ln1_b, eps), qkv_w, out=qkv)
            slots[pos].copy_(kv_src)
            q_heads.copy_(q_src)
            bias = rows[kind]
            k = k_all.narrow(2, 0, keys)
            att = torch.bmm(q, k) if bias is None else torch.baddbmm(bias, q, k)
            y = torch.bmm(att.softmax(-1), v_all.narrow(1, 0, keys))
            x.addmm_(y.view(-1, dim), proj_w).add_(proj_b)
            torch.addmm(fc_b, F.layer_norm(x, (dim,), ln2_w, ln2_b, eps), fc_w, out=hidden)
            x.addmm_(torch._C._nn.gelu_(hidden), out_w).add_(out_b)
        return F.layer_norm(x, (dim,), self.norm.weight, self.norm.bias, eps)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, start: int = 0) -> torch.Tensor:
        """x [B, n, dim] at positions start .. start + n - 1 -> normed hidden states [B, n, dim].

        Without a cache, start must be 0 (the whole prefix is in x). With one, the keys and values
        of positions 0 .. start - 1 come from it and those of x are written into it.
        """
        n = x.shape[1]
        if cache is None and start != 0:
            raise ValueError("start > 0 needs a cache holding the earlier positions")
        if start + n > self.max_len:
            raise ValueError(f"positions {start}..{start + n - 1} exceed max_len={self.max_len}")
        for i, (block, kind) in enumerate(zip(self.blocks, self.kinds)):
            attn_mask, is_causal = self._attn_args(kind, start, n, cache)
            x = block(x, attn_mask, is_causal, cache, i, start)
        return self.norm(x)
